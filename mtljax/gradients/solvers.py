"""The small solvers the gradient methods share, on ``[T, T]`` matrices.

Projection onto and FISTA over the simplex; exact support enumeration and
Wolfe's active set for the min-norm point (MGDA, in cosine coordinates); the
box-constrained QPs of the dual-cone projections (exact and FISTA); Jacobi
eigen-decompositions (two-sided on ``K``, one-sided on a factor) and the
spectral pseudo-inverse built on them. Every ``converged`` test is relative (to
the optimum's scale, plus float rounding).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mtljax.gradients import algebra

# Simplex solver.


def project_simplex(v: jax.Array) -> jax.Array:
  """Euclidean projection onto the probability simplex (Duchi et al. 2008)."""
  n = v.shape[0]
  u = jnp.sort(v)[::-1]
  css = jnp.cumsum(u)
  idx = jnp.arange(1, n + 1)
  cond = u - (css - 1.0) / idx > 0
  rho = jnp.max(jnp.where(cond, idx, 0))
  theta = (css[rho - 1] - 1.0) / rho
  return jnp.maximum(v - theta, 0.0)


def minimize_on_simplex(f: Callable, x0: jax.Array, lipschitz: jax.Array,
                        iters: int = 300, tol: float = 1e-5):
  """FISTA with gradient restart (O'Donoghue & Candes 2015) for a convex ``f``
  on the simplex.

  The step is ``1 / L`` from ``lipschitz`` (exact for a quadratic); if the
  sufficient-decrease test fails, ``L`` doubles (backtracking, never shrinks).
  Returns ``(x, info)``: ``info["gap"]`` is the Frank-Wolfe duality gap
  ``max_i grad.(x - e_i)`` (0 at the optimum) and ``info["converged"]`` is
  ``gap <= tol (1 + |f(x)|)``.
  """
  grad = jax.grad(f)

  def gap_of(x):
    g = grad(x)
    return g @ x - jnp.min(g)

  def step(carry, _):
    x, y, s, lip, best, best_gap = carry
    fy, gy = f(y), grad(y)

    def too_long(c):
      lip, xn = c
      d = xn - y
      slack = 1e-6 * jnp.abs(fy) + 1e-12  # float32 rounding
      return (f(xn) > fy + gy @ d + 0.5 * lip * (d @ d) + slack) & (lip < 1e12)

    def backtrack(c):
      lip, _ = c
      return 2.0 * lip, project_simplex(y - gy / (2.0 * lip))

    lip, x_new = jax.lax.while_loop(too_long, backtrack,
                                    (lip, project_simplex(y - gy / lip)))
    s_new = (1 + jnp.sqrt(1 + 4 * s * s)) / 2
    restart = (y - x_new) @ (x_new - x) > 0
    y_new = jnp.where(restart, x_new, x_new + ((s - 1) / s_new) * (x_new - x))
    # Keep the iterate with the smallest duality gap: in float32 the momentum
    # can drift once the gap reaches rounding level.
    gap = gap_of(x_new)
    better = gap < best_gap
    best = jnp.where(better, x_new, best)
    best_gap = jnp.where(better, gap, best_gap)
    return (x_new, y_new, jnp.where(restart, 1.0, s_new), lip, best, best_gap), None

  lip0 = jnp.maximum(lipschitz, 1e-12).astype(x0.dtype)
  init = (x0, x0, jnp.ones((), x0.dtype), lip0, x0, gap_of(x0))
  (_, _, _, _, x, gap), _ = jax.lax.scan(step, init, None, length=iters)
  return x, {"gap": gap, "converged": gap <= tol * (1.0 + jnp.abs(f(x)))}


def largest_eigenvalue(k: jax.Array, power_iters: int = 30) -> jax.Array:
  """``lambda_max`` of a PSD ``K``: exact (``eigvalsh``) up to T = 32, a power
  iteration estimate beyond (O(T^2) per iteration instead of O(T^3); a low
  estimate only makes the first step of :func:`minimize_on_simplex` too long,
  which its backtracking corrects)."""
  t = k.shape[0]
  if t <= 32:
    return jnp.linalg.eigvalsh(k)[-1]

  def body(v, _):
    w = k @ v
    return w / jnp.maximum(jnp.linalg.norm(w), 1e-30), None
  v, _ = jax.lax.scan(body, jnp.full((t,), 1.0 / jnp.sqrt(t), k.dtype), None,
                      length=power_iters)
  return 1.05 * (v @ k @ v)


def _jacobi_rotation(aii, ajj, aij):
  """``(cos, sin, tan)`` of the Jacobi rotation zeroing ``aij`` of the symmetric
  2x2 ``[[aii, aij], [aij, ajj]]`` (Golub & Van Loan, Alg. 8.5.1; the smaller
  angle)."""
  nz = aij != 0
  tau = (ajj - aii) / (2.0 * jnp.where(nz, aij, 1.0))
  tt = jnp.where(nz, jnp.where(tau >= 0, 1.0, -1.0) / (jnp.abs(tau) + jnp.sqrt(1.0 + tau * tau)),
                 0.0)
  c = 1.0 / jnp.sqrt(1.0 + tt * tt)
  return c, tt * c, tt


def jacobi_factor_eigh(a: jax.Array, sweeps: int = 10):
  """``(lambda [T], V [T, T])`` with ``A^T A = V diag(lambda) V^T``, from
  ``A [M, T]`` by one-sided (Hestenes) Jacobi rotations of its columns: each
  rotation makes two columns orthogonal, from their inner products computed
  afresh, never forming ``A^T A``. Every eigenvalue is resolved to relative
  accuracy ~``eps cond(A D^{-1})`` (``D`` the column norms; Demmel & Veselic
  1992), i.e. ``eps sqrt(cond(C))`` for the cosine matrix ``C`` -- where
  :func:`jacobi_eigh` on ``A^T A`` gets ``eps cond(C)``. Unsorted."""
  t = a.shape[1]
  if t == 1:
    return jnp.sum(a * a, axis=0), jnp.ones((1, 1), a.dtype)
  p, q = np.triu_indices(t, 1)
  pairs = jnp.asarray(np.tile(np.stack([p, q], 1), (sweeps, 1)))

  def rotate(carry, pq):
    a, v = carry
    i, j = pq[0], pq[1]
    ai, aj = a[:, i], a[:, j]
    aii, ajj, aij = ai @ ai, aj @ aj, ai @ aj
    c, s, tt = _jacobi_rotation(aii, ajj, aij)
    a = a.at[:, i].set(c * ai - s * aj).at[:, j].set(s * ai + c * aj)
    vi, vj = v[:, i], v[:, j]
    v = v.at[:, i].set(c * vi - s * vj).at[:, j].set(s * vi + c * vj)
    return (a, v), None

  (a, v), _ = jax.lax.scan(rotate, (a, jnp.eye(t, dtype=a.dtype)), pairs)
  return jnp.sum(a * a, axis=0), v


def jacobi_eigh(k: jax.Array, sweeps: int = 10):
  """``(lambda [T], V [T, T])`` with ``K = V diag(lambda) V^T``, by cyclic
  two-sided Jacobi rotations (Golub & Van Loan, Alg. 8.5.2), ``sweeps`` sweeps
  over all pairs. For a positive semi-definite ``K`` Jacobi resolves every
  eigenvalue to *relative* accuracy ~ ``eps cond(C)`` (Demmel & Veselic 1992;
  ``C`` the cosine matrix, :func:`cosine_gram`), where ``eigh``'s error is
  ``eps lambda_max`` for all of them: rows whose norms differ by 100x (a graded
  ``K``) keep their small eigenvalues. Unsorted."""
  t = k.shape[0]
  if t == 1:
    return jnp.diag(k), jnp.ones((1, 1), k.dtype)
  p, q = np.triu_indices(t, 1)
  pairs = jnp.asarray(np.tile(np.stack([p, q], 1), (sweeps, 1)))

  def rotate(carry, pq):
    a, v = carry
    i, j = pq[0], pq[1]
    aii, ajj, aij = a[i, i], a[j, j], a[i, j]
    c, s, tt = _jacobi_rotation(aii, ajj, aij)
    ri, rj = a[i], a[j]
    a = a.at[i].set(c * ri - s * rj).at[j].set(s * ri + c * rj)
    ci, cj = a[:, i], a[:, j]
    a = a.at[:, i].set(c * ci - s * cj).at[:, j].set(s * ci + c * cj)
    a = (a.at[i, i].set(aii - tt * aij).at[j, j].set(ajj + tt * aij)
         .at[i, j].set(0.0).at[j, i].set(0.0))
    vi, vj = v[:, i], v[:, j]
    v = v.at[:, i].set(c * vi - s * vj).at[:, j].set(s * vi + c * vj)
    return (a, v), None

  (a, v), _ = jax.lax.scan(rotate, (k, jnp.eye(t, dtype=k.dtype)), pairs)
  return jnp.diag(a), v


def spectral_pinv_ones(c: jax.Array, factor: jax.Array | None = None):
  """``C^+ 1`` and what the methods read from it, from ``C``'s eigenpairs:
  ``eigh(C)`` with eigenvalues at or below ``T eps lambda_max`` cut (what
  ``C``'s rounding cannot resolve), or, given ``factor`` (``C = R^T R``,
  :func:`cosine_factor`), :func:`jacobi_factor_eigh` of ``R`` with those at or
  below ``(T eps)^2 lambda_max`` cut (singular values of ``R`` below ``T eps
  sigma_max``: the pseudo-inverse's usual tolerance on ``U``).

  Returns a dict: ``y = C^+ 1``; ``cy = C y`` (``1`` projected on the kept
  eigenvectors) and ``ycy = y^T C y``, from the eigenpairs rather than by
  products with a large ``y``; ``cond`` (``cond(C)``, inf when singular);
  ``solved_cond``, the condition of what was decomposed (``C``, or ``R`` with
  ``sqrt(cond(C))``); ``rank``."""
  t = c.shape[0]
  eps = jnp.finfo(c.dtype).eps
  if factor is None:
    lam, v = jnp.linalg.eigh(c)
    cut = t * eps
  else:
    lam, v = jacobi_factor_eigh(factor.astype(c.dtype))
    cut = (t * eps) ** 2
  lmax, lmin = jnp.max(lam), jnp.min(lam)
  keep = lam > cut * lmax
  inv = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
  proj = v.T @ jnp.ones((t,), c.dtype)
  cond = jnp.where(lmin > 0, lmax / jnp.where(lmin > 0, lmin, 1.0), jnp.inf)
  return {"y": v @ (inv * proj), "cy": v @ (keep * proj), "ycy": jnp.sum(inv * proj * proj),
          "cond": cond, "solved_cond": cond if factor is None else jnp.sqrt(cond),
          "rank": keep.sum(), "lam": lam, "v": v, "inv": inv}


# MGDA: the min-norm point of the convex hull, in cosine coordinates.
#
# With ``a = m * x`` (``m = n_min / n`` in (0, 1]) the problem
# ``min_{a in simplex} a^T K a`` is ``n_min^2 min x^T C x`` over ``x >= 0``,
# ``m^T x = 1``; the KKT test ``(K a)_j >= a^T K a`` reads ``q_j >= x^T C x``
# with ``q = (C x) / m``.


def _min_norm_scaled(k: jax.Array):
  c, n = algebra.cosine_gram(k)
  # finfo.tiny, not 1e-38: a float32 subnormal, flushed to zero on CPU (an
  # all-zero Jacobian then gave 0 / 0).
  n = jnp.maximum(n, 1e-30 * jnp.max(n) + jnp.finfo(n.dtype).tiny)
  return c, jnp.min(n) / n


def _min_norm_kkt(c, m, x, tol):
  """Whether ``a = m x`` is the min-norm point to relative ``tol`` (plus float
  rounding): ``(K a)_j >= (1 - tol) a^T K a`` for every task. This is also the
  common-descent test: ``g_j . d = (K a)_j``."""
  cx = c @ x
  f = x @ cx
  q = cx / m
  floor = (algebra.rounding_level(c, x) + 16.0 * jnp.finfo(c.dtype).eps * jnp.abs(f)) / m
  return jnp.all(q >= (1.0 - tol) * f - floor) & jnp.all(x >= 0) & jnp.isfinite(f)


def bordered_matrix(c, m, mask):
  """``[C_SS m_S; m_S^T 0]`` ``[T + 1, T + 1]`` for the support ``mask`` (identity
  rows and columns off it): regular when ``0`` is in the support's affine hull
  (Pareto-stationary points), unlike ``C_SS``."""
  mf = mask.astype(c.dtype)
  top = jnp.concatenate([mf[:, None] * c * mf[None, :] + jnp.diag(1.0 - mf),
                         (mf * m)[:, None]], axis=1)
  bottom = jnp.concatenate([mf * m, jnp.zeros((1,), c.dtype)])[None]
  return jnp.concatenate([top, bottom], axis=0)


def _bordered_solve(c, m, mask):
  """``x`` minimising ``x^T C x`` over ``m^T x = 1`` on the support ``mask``
  (the KKT system ``[C_SS m_S; m_S^T 0] [x; lambda] = [0; 1]``,
  :func:`bordered_matrix`)."""
  t = c.shape[0]
  rhs = jnp.zeros((t + 1,), c.dtype).at[t].set(1.0)
  return jnp.linalg.solve(bordered_matrix(c, m, mask), rhs)[:t] * mask.astype(c.dtype)


def min_norm_exact(kn: jax.Array, tol: float = 1e-5):
  """The min-norm point of the simplex, ``argmin_a a^T K a``, by enumerating
  supports: on support S the KKT system (:func:`_bordered_solve`, in cosine
  coordinates) gives the candidate; it is optimal when ``a >= 0`` and
  ``(K a)_j >= (1 - tol) a^T K a`` for every j (:func:`_min_norm_kkt`).
  Returns ``(a, found)``; ``found`` is False when no support passed. Cost
  ``O(2^T T^3)``: for small T only.
  """
  c, m = _min_norm_scaled(kn)
  masks = jnp.asarray(algebra.support_masks(kn.shape[0]))
  x_raw = jax.vmap(lambda s: _bordered_solve(c, m, s))(masks)
  x = jnp.where(masks, jnp.maximum(x_raw, 0.0), 0.0)  # clip rounding below zero
  ok = (jax.vmap(lambda xs: _min_norm_kkt(c, m, xs, tol))(x)
        & (jnp.min(jnp.where(masks, x_raw, 0.0), axis=1)
           >= -tol * jnp.max(jnp.abs(x), axis=1)))
  obj = jnp.einsum("si,ij,sj->s", x, c, x)
  best = jnp.argmin(jnp.where(ok, obj, jnp.inf))
  a = m * x[best]
  return a / jnp.sum(a), ok[best]


def min_norm_active_set(kn: jax.Array, iters: int = 300, tol: float = 1e-5):
  """The min-norm point of the simplex by Wolfe's (1976) active-set algorithm,
  in cosine coordinates: exact after finitely many steps (at most ``iters``).

  Start at the shortest gradient; a *major* step adds the task ``j`` of least
  ``(K a)_j`` unless :func:`_min_norm_kkt` holds; a *minor* step moves towards
  the affine minimiser of the support (:func:`_bordered_solve`) and drops the
  tasks whose weight reaches zero, until the affine minimiser lies inside.
  Returns ``(a, converged)``: converged when the KKT test passed.
  """
  c, m = _min_norm_scaled(kn)
  t = c.shape[0]
  j0 = jnp.argmax(m)                                # shortest gradient
  x0 = jax.nn.one_hot(j0, t, dtype=c.dtype) / m[j0]
  s0 = jax.nn.one_hot(j0, t, dtype=bool)

  def body(state):
    x, s, _, it = state
    y = _bordered_solve(c, m, s)
    inside = jnp.all(jnp.where(s, y > 0, True)) & jnp.all(jnp.isfinite(y))
    # Major step: y is the support's minimiser; stop or add a task.
    kkt = _min_norm_kkt(c, m, y, tol)
    j = jnp.argmin((c @ y) / m)
    s_major = s | (jax.nn.one_hot(j, t, dtype=bool) & ~kkt)
    stuck = s[j] & ~kkt                               # rounding: nothing to add
    # Minor step: the longest move towards y that keeps x >= 0.
    ratio = jnp.where(s & (y <= 0), x / jnp.where(s & (y <= 0), x - y, 1.0), jnp.inf)
    i = jnp.argmin(ratio)
    theta = jnp.clip(ratio[i], 0.0, 1.0)
    x_minor = jnp.maximum(x + theta * (y - x), 0.0).at[i].set(0.0)
    s_minor = s & (x_minor > 0)
    x_new = jnp.where(inside, y, x_minor)
    s_new = jnp.where(inside, s_major, s_minor)
    done = jnp.where(inside, jnp.where(kkt, 1, jnp.where(stuck, 2, 0)), 0).astype(jnp.int32)
    return x_new, s_new, done, it + 1

  x, _, done, _ = jax.lax.while_loop(
      lambda st: (st[2] == 0) & (st[3] < iters), body, (x0, s0, jnp.int32(0), jnp.int32(0)))
  a = m * x
  return a / jnp.sum(a), (done == 1) & _min_norm_kkt(c, m, x, tol)


# UPGrad and DualProj: projections onto the dual cone {d : G d >= 0}.


def box_qp_exact(a: jax.Array, lo: jax.Array, tol: float):
  """``argmin_{x >= lo} x^T A x`` (``A`` PSD) by enumerating the free sets F:
  ``A_FF x_F = -A_FA lo_A``, ``x_A = lo_A``; a candidate is optimal when
  ``x_F >= lo_F``, ``(A x)_F = 0`` and ``(A x)_A >= 0`` (to relative ``tol``
  plus float rounding). Returns ``(x, found)``. Cost ``O(2^T T^3)``."""
  t = a.shape[0]
  masks = jnp.asarray(algebra.support_masks(t, empty=True))
  eye = jnp.eye(t, dtype=a.dtype)

  def candidate(free):
    f = free.astype(a.dtype)
    system = f[:, None] * a * f[None, :] + eye * (1.0 - f)[None, :]
    rhs = f * -(a @ ((1.0 - f) * lo)) + (1.0 - f) * lo
    x = jnp.where(free, jnp.linalg.solve(system, rhs), lo)
    mu = a @ x
    slack = tol * (jnp.abs(a) @ jnp.abs(x)) + algebra.rounding_level(a, x)
    scale = jnp.max(jnp.abs(x))
    ok = (jnp.all(jnp.where(free, (x >= lo - tol * scale) & (jnp.abs(mu) <= slack),
                            mu >= -slack)) & jnp.all(jnp.isfinite(x)))
    return jnp.maximum(x, lo), ok

  x, ok = jax.vmap(candidate)(masks)
  obj = jnp.einsum("si,ij,sj->s", x, a, x)
  best = jnp.argmin(jnp.where(ok, obj, jnp.inf))
  return x[best], ok[best]


def box_qp_iterative(a: jax.Array, lo: jax.Array, iters: int, tol: float):
  """``argmin_{x >= lo} x^T A x`` by FISTA with gradient restart (projection
  ``max(x, lo)``). ``converged``: the natural residual
  ``||x - max(x - 2 A x / L, lo)||_inf <= tol max|x|``."""
  lip = 2.0 * jnp.maximum(largest_eigenvalue(a), 1e-30)
  proj = lambda x: jnp.maximum(x, lo)

  def step(carry, _):
    x, y, s = carry
    x_new = proj(y - 2.0 * (a @ y) / lip)
    s_new = (1 + jnp.sqrt(1 + 4 * s * s)) / 2
    restart = (y - x_new) @ (x_new - x) > 0
    y_new = jnp.where(restart, x_new, x_new + ((s - 1) / s_new) * (x_new - x))
    return (x_new, y_new, jnp.where(restart, 1.0, s_new)), None

  x0 = proj(jnp.zeros_like(lo))
  (x, _, _), _ = jax.lax.scan(step, (x0, x0, jnp.ones((), a.dtype)), None, length=iters)
  res = jnp.max(jnp.abs(x - proj(x - 2.0 * (a @ x) / lip)))
  return x, res <= tol * jnp.max(jnp.abs(x)) + algebra.rounding_level(a, x).max() / lip
