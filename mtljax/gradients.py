"""Gradient-combination methods as pure, jittable functions of task gradients.

Every method here returns an update direction ``d = sum_j beta_j g_j`` whose
weights ``beta`` are computable from the Gram matrix ``K = G G^T`` alone
(``G [T, D]``: one row per task gradient of the shared parameters). So each
method is written once as ``NAME_weights(K, [rng,] *, hyper-parameters) ->
(beta, info)`` and exposed as ``NAME(G, [rng,] *, hyper-parameters) -> (d, beta,
info)``, where ``G`` is a ``[T, D]`` matrix or a pytree whose leaves have a
leading task axis (``K`` is then summed over leaves, never materialising the
concatenated Jacobian). ``info`` is a dict of scalars that says whether an
iterative solver converged (no method silently degrades to another; a caller
decides what to do with ``converged == False``).

:data:`GRAM_METHODS` maps each method's name to its weight function; the train
step's objectives (:mod:`mtljax.objectives`) are built from it, and the
keyword-only parameters of each weight function are the method's
hyper-parameters (``config.objective.NAME.PARAM``). Adding a gradient method is
one weight function and one entry there.

Solvers run in JAX on the device, on the cosine matrix ``C`` of the gradients
(:func:`cosine_gram`: ``K = diag(n) C diag(n)``) where the method allows, so
that gradients whose norms differ by 100x cost no float32 precision: exact
support / active-set enumeration for the small QPs at small T (MGDA's min-norm
point; UPGrad's and DualProj's dual-cone projections; CAGrad's dual, face by
face in closed form), Wolfe's active-set
algorithm (MGDA) or FISTA (the dual-cone QPs; CAGrad's dual, on the simplex)
beyond, damped Newton (Nash-MTL, FairGrad), Jacobi eigenpairs (Aligned-MTL),
a spectral pseudo-inverse of ``C`` (IMTL-G, ConFIG). Every ``converged`` test
is relative (to the optimum's scale, plus float rounding).

Scaling conventions (stated per method, as the papers' code does them):

* ``mgda``: ``beta`` on the simplex (sums to 1): ``d`` is the min-norm point of
  the convex hull of the gradients (Sener & Koltun 2018, no normalisation).
* ``mgda_ub``: MGDA's solver applied to ``G_Z [T, ...]``, the task gradients
  with respect to the shared *representation* ``Z = f(x; theta^sh)`` of one
  batch that every task labels (Sener & Koltun 2018, section 3.3, the upper
  bound ``||dZ/dtheta^sh|| ||grad_Z L||``); ``d`` is then a direction in
  ``Z``-space, which the train step back-propagates once through the trunk.
* ``pcgrad``: ``d = sum_i g_i^PC`` (a *sum* over tasks, Yu et al. 2020).
* ``cagrad``: ``d = (g0 + c ||g0|| g_w / ||g_w||) / (1 + c^2)`` with ``g0`` the
  *mean* gradient (Liu et al. 2021, official code's ``rescale=1``).
* ``imtl_g``: ``beta`` sums to 1 (Liu et al. 2021, IMTL-G).
* ``nash_mtl``: ``beta`` solves ``K beta = 1 / beta`` (Navon et al. 2022); no
  normalisation.
* ``aligned_mtl``: ``beta = 1^T B`` with ``B = sigma_min V Lambda^{-1/2} V^T``
  (Senushkin et al. 2023, uniform task weights).
* ``upgrad``: ``beta = sum_i w^(i)``, the projections of ``g_i / T`` onto the
  dual cone (Quinton & Rey 2024, TorchJD's mean weighting); ``dualproj``: the
  projection of the mean.
* ``config``: ``d = (sum_i g_i . u) u`` with ``u`` the unit equal-cosine
  direction (Liu et al. 2024, the code's ``ProjectionLength``).
* ``fairgrad``: ``beta = T w`` with ``(K w)_i = w_i^{-1/alpha}`` (Ban & Ji 2024,
  the code's ``n_tasks`` factor).
"""

from __future__ import annotations

import inspect
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


# ----------------------------------------------------------------------------
# Gram matrices and directions for matrices or pytrees of task gradients.
# ----------------------------------------------------------------------------


def gram(grads) -> jax.Array:
  """``K = G G^T`` ``[T, T]`` for ``G [T, D]`` or a pytree with task axis 0; in
  float32, or float64 when the gradients are (``jax_enable_x64``)."""
  leaves = jax.tree.leaves(grads)
  if not leaves:
    raise ValueError("gram: no gradients.")
  t = leaves[0].shape[0]
  # float32 at least; float64 for float64 gradients (under jax_enable_x64).
  dtype = jnp.result_type(jnp.float32, *(leaf.dtype for leaf in leaves))
  k = jnp.zeros((t, t), dtype)
  for leaf in leaves:
    if leaf.shape[0] != t:
      raise ValueError(f"gram: leaves disagree on the task axis ({leaf.shape[0]} vs {t}).")
    flat = leaf.reshape(t, -1).astype(dtype)
    k = k + flat @ flat.T
  return k


def combine(beta: jax.Array, grads):
  """``sum_j beta_j g_j`` for a matrix or pytree of task gradients."""
  return jax.tree.map(lambda g: jnp.tensordot(beta.astype(g.dtype), g, axes=1), grads)


# ----------------------------------------------------------------------------
# Simplex solver.
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# Methods: weights from the Gram matrix.
# ----------------------------------------------------------------------------


def _support_masks(t: int, empty: bool = False) -> np.ndarray:
  """``[2^T - 1, T]`` bool: every non-empty subset of the tasks (``empty``:
  the empty one too, first: ``[2^T, T]``)."""
  m = np.arange(0 if empty else 1, 2 ** t)[:, None]
  return ((m >> np.arange(t)[None, :]) & 1).astype(bool)


def cosine_gram(k: jax.Array):
  """``(C, n)`` with ``K = diag(n) C diag(n)``: ``n [T]`` the gradients' norms
  and ``C [T, T]`` their cosines, unit diagonal (a zero gradient gets ``C_ii = 1``
  and zeros off the diagonal). The methods below solve their small systems on
  ``C`` and rescale: its entries are of order one whatever the norms, so rows
  whose norms differ by 100x cost no float32 precision."""
  n = jnp.sqrt(jnp.maximum(jnp.diag(k), 0.0))
  pos = n > jnp.finfo(k.dtype).tiny ** 0.5
  inv = jnp.where(pos, 1.0 / jnp.where(pos, n, 1.0), 0.0)
  eye = jnp.eye(k.shape[0], dtype=bool)
  return jnp.where(eye, 1.0, k * inv[:, None] * inv[None, :]), n


def _rounding(a: jax.Array, x: jax.Array) -> jax.Array:
  """``16 eps (|A| |x|)``: the float rounding level of ``A x``, per entry."""
  return 16.0 * jnp.finfo(a.dtype).eps * (jnp.abs(a) @ jnp.abs(x))


def cosine_factor(grads) -> jax.Array:
  """``R [T, T]`` with ``C = R^T R`` for the cosine matrix ``C`` of the rows
  (:func:`cosine_gram`, a zero row's ``C_ii = 1`` included): the triangular
  factor of a Householder QR of the unit rows, ``U^T = Q R`` (``[D, T]``, zero
  rows padded in when ``D < T``).

  The spectral methods (IMTL-G, ConFIG, Aligned-MTL) take it as ``factor`` on
  the Jacobian path, where the rows are held: the eigenpairs of ``C`` then come
  from ``R``'s one-sided Jacobi rotations (:func:`jacobi_factor_eigh`), whose
  condition is ``cond(R) = sqrt(cond(C))``. Forming ``C`` (or ``K``) first
  squares it: float32 loses every eigenvalue of ``C`` below ~``1e-7``, e.g. the
  difference of two nearly opposite or nearly collinear gradients, which the
  factor keeps down to ~``1e-14``. Costs one QR of ``[D, T]`` (as the Gram,
  ``O(D T^2)``) and a copy of the rows.

  ``grads``: ``[T, D]`` or a pytree with task axis 0; float32 at least,
  float64 for float64 rows (as :func:`gram`)."""
  leaves = jax.tree.leaves(grads)
  if not leaves:
    raise ValueError("cosine_factor: no gradients.")
  t = leaves[0].shape[0]
  dtype = jnp.result_type(jnp.float32, *(leaf.dtype for leaf in leaves))
  flat = jnp.concatenate([leaf.reshape(t, -1).astype(dtype) for leaf in leaves], axis=1)
  if flat.shape[1] < t:
    flat = jnp.pad(flat, ((0, 0), (0, t - flat.shape[1])))
  n = jnp.linalg.norm(flat, axis=1)
  pos = n > jnp.finfo(dtype).tiny ** 0.5
  u = flat * jnp.where(pos, 1.0 / jnp.where(pos, n, 1.0), 0.0)[:, None]
  r = jnp.linalg.qr(u.T, mode="r")                     # [T, T]; zero rows: zero columns
  # A zero row's C_ii = 1 (as cosine_gram): the rows of diag(1 - pos) below R.
  return jnp.concatenate([r, jnp.diag((~pos).astype(dtype))], axis=0)


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


def _check_factor(factor, t: int, name: str):
  if factor is not None and (factor.ndim != 2 or factor.shape[1] != t):
    raise ValueError(f"{name}: factor must be [M, {t}] (cosine_factor of the rows), "
                     f"got shape {factor.shape}.")


def _spectral_pinv_ones(c: jax.Array, factor: jax.Array | None = None):
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


# ----------------------------------------------------------------------------
# MGDA: the min-norm point of the convex hull, in cosine coordinates.
#
# With ``a = m * x`` (``m = n_min / n`` in (0, 1]) the problem
# ``min_{a in simplex} a^T K a`` is ``n_min^2 min x^T C x`` over ``x >= 0``,
# ``m^T x = 1``; the KKT test ``(K a)_j >= a^T K a`` reads ``q_j >= x^T C x``
# with ``q = (C x) / m``.
# ----------------------------------------------------------------------------


def _min_norm_scaled(k: jax.Array):
  c, n = cosine_gram(k)
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
  floor = (_rounding(c, x) + 16.0 * jnp.finfo(c.dtype).eps * jnp.abs(f)) / m
  return jnp.all(q >= (1.0 - tol) * f - floor) & jnp.all(x >= 0) & jnp.isfinite(f)


def _bordered_matrix(c, m, mask):
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
  :func:`_bordered_matrix`)."""
  t = c.shape[0]
  rhs = jnp.zeros((t + 1,), c.dtype).at[t].set(1.0)
  return jnp.linalg.solve(_bordered_matrix(c, m, mask), rhs)[:t] * mask.astype(c.dtype)


def min_norm_exact(kn: jax.Array, tol: float = 1e-5):
  """The min-norm point of the simplex, ``argmin_a a^T K a``, by enumerating
  supports: on support S the KKT system (:func:`_bordered_solve`, in cosine
  coordinates) gives the candidate; it is optimal when ``a >= 0`` and
  ``(K a)_j >= (1 - tol) a^T K a`` for every j (:func:`_min_norm_kkt`).
  Returns ``(a, found)``; ``found`` is False when no support passed. Cost
  ``O(2^T T^3)``: for small T only.
  """
  c, m = _min_norm_scaled(kn)
  masks = jnp.asarray(_support_masks(kn.shape[0]))
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


def mgda_weights(k: jax.Array, *, iters: int = 300, tol: float = 1e-5,
                 exact_up_to: int = 10):
  """MGDA: ``argmin_{a in simplex} a^T K a`` (the min-norm element).

  Both solvers work on the cosine matrix (:func:`cosine_gram`) and rescale. For
  ``T <= exact_up_to`` the support enumeration (:func:`min_norm_exact`); if no
  support passes the KKT test in float32, and for larger T, Wolfe's active-set
  algorithm (:func:`min_norm_active_set`, at most ``iters`` steps). The test,
  relative to the optimum, is ``(K a)_j >= (1 - tol) a^T K a`` for every task up
  to float rounding: ``converged`` is true only when ``d = a G`` is the min-norm
  point to that accuracy, and hence a common descent direction
  (``g_j . d >= 0``).

  Args:
    k: ``[T, T]`` Gram matrix.
    iters: the active-set solver's step budget; tol: the relative KKT
      tolerance, in ``[0, 1)``.
    exact_up_to: the largest T solved by enumeration (at most 12: it builds
      ``2^T`` small systems).
  Returns:
    ``beta [T]`` on the simplex, ``info`` with ``gap`` (Frank-Wolfe duality gap
    of ``a^T K a / max_i K_ii``) and ``converged``.
  """
  if not 0 <= exact_up_to <= 12:
    raise ValueError(f"config.objective.mgda.exact_up_to must be in [0, 12] (the exact "
                     f"solver builds 2^T systems), got {exact_up_to}.")
  if not 0.0 <= tol < 1.0:
    raise ValueError(f"config.objective.mgda.tol must be in [0, 1), got {tol}.")
  t = k.shape[0]
  kn = k / jnp.maximum(jnp.max(jnp.diag(k)), 1e-30)

  def with_gap(a, converged):
    g = 2.0 * (kn @ a)
    return a, {"gap": g @ a - jnp.min(g), "converged": converged}

  if t > exact_up_to:
    return with_gap(*min_norm_active_set(kn, iters, tol))
  a, found = min_norm_exact(kn, tol)

  def active_set():  # the exact candidate unless the active set converged or is better
    b, b_ok = min_norm_active_set(kn, iters, tol)
    better = b_ok | (b @ kn @ b < a @ kn @ a)
    return with_gap(jnp.where(better, b, a), b_ok)
  return jax.lax.cond(found, lambda: with_gap(a, found), active_set)


# ----------------------------------------------------------------------------
# CAGrad: the official code's dual, in cosine coordinates.
#
# With ``w = m * x`` (as MGDA: ``m = n_min / n``) and ``u_i = g_i / n_i``, the
# dual ``F(w) = g_w . g0 + rho ||g_w||`` (``rho = c ||g0||``) is
# ``n_min ||g0|| (x^T q + c sqrt(x^T C x))`` over ``x >= 0``, ``m^T x = 1``,
# with ``q_i = u_i . g0 / ||g0||`` (cosines): every term is of order one.
# Its gradient ``q + c C x / s`` (``s = sqrt(x^T C x)``) is ``u_j . d / ||g0||``
# for ``d = g0 + rho g_w / ||g_w||``.
# ----------------------------------------------------------------------------


def _cagrad_face(c, m, q, cr, mask):
  """The stationary point of ``x^T q + cr sqrt(x^T C x)`` on the face ``mask``
  of ``{x >= 0, m^T x = 1}``, or ``t = 0`` when the face has none.

  Stationarity ``q_S + t C_SS x_S = nu m_S`` with ``t = cr / s`` splits as
  ``x = z0 / t + z1``: ``z1`` the face's affine min-norm point
  (:func:`_bordered_solve`, ``z1^T C z1 = nu1``) and ``z0`` the solution of
  ``C_SS z0 - nu0 m_S = -q_S``, ``m_S^T z0 = 0``: one bordered system
  (:func:`_bordered_matrix`) with two right-hand sides. ``x^T C x = s^2``
  then gives ``t^2 = (cr^2 + q^T z0) / nu1``. Returns ``(x [T], t)``."""
  k = c.shape[0]
  mf = mask.astype(c.dtype)
  rhs = jnp.zeros((k + 1, 2), c.dtype).at[:k, 0].set(-q * mf).at[k, 1].set(1.0)
  sol = jnp.linalg.solve(_bordered_matrix(c, m, mask), rhs)
  z0, z1 = sol[:k, 0] * mf, sol[:k, 1] * mf
  nu1 = -sol[k, 1]                       # = z1^T C z1 (the sign of the border)
  t2 = (cr * cr + q @ z0) / jnp.where(nu1 > 0, nu1, 1.0)
  t = jnp.where((nu1 > 0) & (t2 > 0), jnp.sqrt(jnp.maximum(t2, 0.0)), 0.0)
  return z0 / jnp.where(t > 0, t, 1.0) + z1, t


def _cagrad_kkt(c, m, q, cr, x, s, tol):
  """Whether ``x`` minimises the dual to relative ``tol`` (plus float rounding):
  ``grad_j >= m_j x^T grad`` for every task, i.e. ``g_j . d >= min_i g_i . d``
  relative to ``||g_j|| ||g0||`` (``grad_j = u_j . d / ||g0||``, at most
  ``1 + c`` in size)."""
  cx = c @ x
  grad = q + cr * cx / s
  f = x @ grad
  eps = 16.0 * jnp.finfo(c.dtype).eps
  floor = eps * (jnp.abs(q) + cr * (jnp.abs(c) @ jnp.abs(x)) / s) + eps * m * (
      jnp.abs(x) @ jnp.abs(grad))
  return jnp.all(grad >= m * f - tol - floor) & jnp.all(x >= 0) & jnp.isfinite(f) & (s > 0)


def _cagrad_exact(c, m, q, cr, tol):
  """The dual's minimiser by enumerating the simplex's faces
  (:func:`_cagrad_face`, vmapped over all ``2^T - 1``); the best candidate that
  passes :func:`_cagrad_kkt`. Returns ``(x, s, found)``."""
  masks = jnp.asarray(_support_masks(c.shape[0]))
  x_raw, t = jax.vmap(lambda mk: _cagrad_face(c, m, q, cr, mk))(masks)
  x = jnp.where(masks, jnp.maximum(x_raw, 0.0), 0.0)
  s = cr / jnp.where(t > 0, t, 1.0)
  ok = ((t > 0) & jax.vmap(lambda xs, ss: _cagrad_kkt(c, m, q, cr, xs, ss, tol))(x, s)
        & (jnp.min(jnp.where(masks, x_raw, 0.0), axis=1)
           >= -tol * jnp.max(jnp.abs(x), axis=1)))
  obj = x @ q + cr * s
  best = jnp.argmin(jnp.where(ok, obj, jnp.inf))
  return x[best], s[best], ok[best]


def _cagrad_fista(kn, b, cn, iters, tol):
  """The dual by FISTA (:func:`minimize_on_simplex`) on ``kn``, from ``b``."""
  def obj(w):
    return w @ kn @ b + cn * jnp.sqrt(jnp.maximum(w @ kn @ w, 0.0) + 1e-12)

  # f'' <= cn K / ||g_w||: start from the curvature at the uniform point and
  # let backtracking raise it where ||g_w|| is smaller.
  lip = cn * largest_eigenvalue(kn) / jnp.sqrt(b @ kn @ b + 1e-12)
  return minimize_on_simplex(obj, b, lip, iters, tol)


def cagrad_weights(k: jax.Array, *, c: float = 0.5, rescale: int = 1, iters: int = 300,
                   tol: float = 1e-5, exact_up_to: int = 10):
  """CAGrad (Liu et al. 2021), the official code's dual.

  ``w = argmin_{w in simplex} w^T K b + c ||g0|| sqrt(w^T K w)`` with
  ``b = 1/T`` (so ``w^T K b = g_w . g0``); then
  ``d = g0 + c ||g0|| g_w / ||g_w||`` and, for ``rescale=1``, ``d / (1 + c^2)``
  (``rescale=2``: ``d / (1 + c)``; ``0``: none).

  For ``T <= exact_up_to`` the dual is solved exactly, in cosine coordinates,
  by enumerating the simplex's faces (each face's stationary point in closed
  form from one small bordered system, :func:`_cagrad_face`); the optimality
  test is relative: ``g_j . d >= min_i g_i . d - tol ||g_j|| ||g0||`` for every
  task, up to float rounding. Beyond, and if no face passes in float32, FISTA
  on the simplex (:func:`minimize_on_simplex`, at most ``iters`` steps; its
  test is the Frank-Wolfe gap ``<= tol (1 + |F|)``).

  Args:
    k: ``[T, T]`` Gram matrix; c: radius of the ball around ``g0`` in units of
      ``||g0||``, in ``[0, 1)``; rescale: 0, 1 or 2; iters, tol: the dual's
      FISTA budget and the (relative) optimality tolerance, tol in ``[0, 1)``;
      exact_up_to: the largest T solved by enumeration (at most 12: it builds
      ``2^T`` small systems).
  Returns:
    ``beta [T]`` (``d = beta G``), ``info`` with ``gap`` (the dual's
    Frank-Wolfe gap over ``tr K / T``), ``converged`` and the dual weights ``w``.
  """
  if not 0.0 <= c < 1.0:
    raise ValueError(f"config.objective.cagrad.c must be in [0, 1), got {c}.")
  if rescale not in (0, 1, 2):
    raise ValueError(f"cagrad: rescale must be 0, 1 or 2, got {rescale}.")
  if not 0 <= exact_up_to <= 12:
    raise ValueError(f"config.objective.cagrad.exact_up_to must be in [0, 12] (the exact "
                     f"solver builds 2^T systems), got {exact_up_to}.")
  if not 0.0 <= tol < 1.0:
    raise ValueError(f"config.objective.cagrad.tol must be in [0, 1), got {tol}.")
  t = k.shape[0]
  b = jnp.full((t,), 1.0 / t, k.dtype)
  scale = jnp.maximum(jnp.trace(k) / t, 1e-30)
  kn = k / scale  # same argmin, better conditioned
  g0n = jnp.sqrt(jnp.maximum(b @ kn @ b, 0.0) + 1e-12)
  divisor = {0: 1.0, 1: 1 + c * c, 2: 1 + c}[rescale]

  def from_w(w, info):
    gw_norm = jnp.sqrt(jnp.maximum(w @ kn @ w, 0.0) + 1e-12)
    return (b + (c * g0n / gw_norm) * w) / divisor, {**info, "w": w}

  def fista():
    return from_w(*_cagrad_fista(kn, b, c * g0n, iters, tol))

  if t > exact_up_to:
    return fista()
  cm, n = cosine_gram(kn)
  nc = jnp.maximum(n, 1e-30 * jnp.max(n) + jnp.finfo(n.dtype).tiny)
  m = jnp.min(nc) / nc
  g0c = jnp.maximum(jnp.sqrt(jnp.maximum(n @ cm @ n, 0.0)) / t, 1e-30)
  q = cm @ n / (t * g0c)                  # cos(u_i, g0)
  x, s, found = _cagrad_exact(cm, m, q, c, tol)
  w = m * x
  grad_w = nc * (q + c * (cm @ x) / s)    # g_j . d / ||g0||, in kn units
  gap = (w @ grad_w - jnp.min(grad_w)) * g0c
  # d = g0 + rho g_w / ||g_w||, ||g_w|| = n_min s, g_w = sum_i n_min x_i u_i.
  exact = ((b + (c * g0c / s) * x / nc) / divisor,
           {"gap": gap, "converged": found, "w": w})

  def fallback():  # the exact candidate unless FISTA converged
    f_beta, f_info = fista()
    return jax.tree.map(lambda a, e: jnp.where(f_info["converged"], a, e),
                        (f_beta, f_info), (exact[0], {**exact[1], "converged": False}))
  return jax.lax.cond(found, lambda: exact, fallback)


def pcgrad_orders(rng: jax.Array, t: int) -> jax.Array:
  """``[T, T]``: row i is the random order in which task i visits all tasks,
  itself included (see :func:`pcgrad_weights` on self-projection)."""
  return jax.vmap(lambda r: jax.random.permutation(r, t))(jax.random.split(rng, t))


def pcgrad_weights(k: jax.Array, rng: jax.Array):
  """PCGrad (Yu et al. 2020) in coefficient space.

  ``g_i^PC = C_i G``; visiting task j (in task i's random order), if
  ``g_i^PC . g_j < 0`` then ``C_i -= (g_i^PC . g_j / ||g_j||^2) e_j``.
  ``g_i^PC . g_j = (C_i K)_j``. Returns ``beta = sum_i C_i`` (``d`` is the
  *sum* of the projected gradients).

  Visiting order. Each task draws its own random permutation of *all* T
  tasks, itself included -- LibMTL's ``PCGrad`` (``random.shuffle`` of
  ``range(task_num)`` per task, no task skipped), which projects against the
  *original* ``g_j``. The authors' TensorFlow code (``PCGrad_tf.py``) also skips
  no task, but its ``tf.random.shuffle(loss)`` discards its result, so every
  task visits ``0, 1, ..., T-1`` in that fixed order; we keep the random orders
  the paper describes. So a gradient *can* be projected onto itself: before any
  projection ``g_i . g_i >= 0`` (and after one, ``g_i^PC . g_i =
  ||g_i||^2 - (g_i . g_j)^2 / ||g_j||^2 >= 0`` by Cauchy-Schwarz), but after two
  or more projections ``g_i^PC . g_i < 0`` is possible (rare: conflicting
  gradients, ``i`` visited late), and then ``g_i^PC`` is projected onto
  ``g_i``'s normal plane like any other conflicting gradient
  (``test_pcgrad_projects_onto_itself_as_the_published_loop``).

  Args:
    k: ``[T, T]`` Gram matrix; rng: the key of the random visiting orders.
  """
  t = k.shape[0]
  orders = pcgrad_orders(rng, t)
  sq = jnp.diag(k)

  def one_task(i, order):
    def visit(ci, j):
      dot = ci @ k[:, j]
      coef = jnp.where((dot < 0) & (sq[j] > 0), dot / jnp.where(sq[j] > 0, sq[j], 1.0), 0.0)
      return ci.at[j].add(-coef), None
    ci, _ = jax.lax.scan(visit, jax.nn.one_hot(i, t, dtype=k.dtype), order)
    return ci

  c = jax.vmap(one_task)(jnp.arange(t), orders)
  return c.sum(axis=0), {"coefficients": c}


def _equal_cosine(k: jax.Array, factor: jax.Array | None = None, keep=None):
  """``(b, spec)`` with ``b = C^+ 1 / n``: ``d = b G`` has the same projection
  on every unit gradient (``u_i . d = 1`` for full-rank ``C``); zero gradients
  (and those off ``keep``) get ``b_i = 0``. ``spec``: :func:`_spectral_pinv_ones`
  of ``C``, from ``factor`` when given, plus the norms ``n`` (of the kept rows).
  The shared core of IMTL-G and ConFIG."""
  if keep is not None:
    k = k * keep[:, None] * keep[None, :]
  c, n = cosine_gram(k)
  if factor is not None and keep is not None:
    # A dropped row: a zero column of R, and C_ii = 1 (as cosine_gram does).
    factor = jnp.concatenate([factor * keep[None, :], jnp.diag(1.0 - keep)], axis=0)
  spec = _spectral_pinv_ones(c, factor)
  pos = n > 0
  return jnp.where(pos, spec["y"] / jnp.where(pos, n, 1.0), 0.0), {**spec, "n": n}


# IMTL-G from the factor: the largest first-order relative error of the
# normalisation sum(b) accepted as converged (alpha's scale to ~1e-2, with the
# estimate's slack: on the tests' hard Jacobians every result it passes matches
# the float64 reference in direction and, to 1 %, in norm).
IMTL_SCALE_RESOLVE = 3e-3


def imtl_g_weights(k: jax.Array, factor: jax.Array | None = None, *, eps: float = 1e-12,
                   max_cond: float = 1e6):
  """IMTL-G (Liu et al. 2021): ``d = alpha G`` with ``sum alpha = 1`` and equal
  projections ``u_i . d`` on every unit gradient ``u_i = g_i / ||g_i||``.

  The paper's closed form ``alpha_{2..T} = g_1 U^T (D U^T)^{-1}`` (``D_j = g_1 -
  g_j``, ``U_j = u_1 - u_j``) is the same point as ``alpha ∝ K^{-1} n =
  diag(n)^{-1} C^{-1} 1`` (``K = diag(n) C diag(n)``, :func:`cosine_gram`); we
  solve that on the cosine matrix ``C`` (spectral pseudo-inverse), whose
  rounding does not grow with the spread of the norms -- from ``C``'s
  triangular factor when the rows are at hand (``factor``,
  :func:`cosine_factor`: the train step's Jacobian path), which resolves
  ``C``'s small eigenvalues where a float32 Gram cannot (nearly collinear or
  nearly opposite rows).

  Args:
    k: ``[T, T]`` Gram matrix; factor: ``None`` or :func:`cosine_factor` of the
      rows behind ``k``; eps: gradients with norm below it count as zero
      (weight 0); max_cond: ``converged`` is False when the condition number of
      what was decomposed (``C``; ``R``, i.e. ``sqrt(cond(C))``, given
      ``factor``) exceeds it (float32 resolves ``C``'s entries to ~1e-7).
  Returns:
    ``alpha [T]``, ``info`` with ``cond`` (of ``C``) and ``converged``; given
    ``factor``, also ``sensitivity`` (the first-order relative error of the
    normalisation ``sum(b)``, ``b = C^+ 1 / n``, under the factor's rounding),
    and ``converged`` requires ``sensitivity <= IMTL_SCALE_RESOLVE``: nearly
    collinear rows can leave ``C`` resolved but ``sum(b)`` (the scale of
    ``alpha``, even its sign) not.
  """
  if not max_cond > 1.0:
    raise ValueError(f"config.objective.imtl_g.max_cond must be > 1, got {max_cond}.")
  _check_factor(factor, k.shape[0], "imtl_g")
  keep = (jnp.sqrt(jnp.maximum(jnp.diag(k), 0.0)) > eps).astype(k.dtype)
  b, spec = _equal_cosine(k, factor, keep)
  total = jnp.sum(b)
  alpha = b / jnp.where(total != 0, total, 1.0)
  converged = jnp.isfinite(spec["cond"]) & (spec["solved_cond"] < max_cond) & (total != 0)
  info = {"cond": spec["cond"]}
  if factor is not None:
    # The normalisation sum(b) = n^-1 . y, y = C^+ 1, to first order under the
    # factor's rounding (dC = R^T dR + dR^T R, dR ~ eps):
    # eps (|R^-T n^-1| |C^+ 1| + |C^+ n^-1| |R^-T 1|). Nearly collinear rows
    # make it exceed |sum(b)| while C itself is resolved: alpha's scale, even
    # its sign, is then unknown (flagged, never returned as converged). From a
    # Gram, cond(C) < max_cond already bounds it (on every hard Jacobian of
    # the tests).
    n = spec["n"]
    ninv = jnp.where(n > 0, 1.0 / jnp.where(n > 0, n, 1.0), 0.0)
    p1 = spec["v"].T @ jnp.ones_like(n)
    pn = spec["v"].T @ ninv
    inv = spec["inv"]

    def norm(x, power):  # |C^(-power/2) x| over the kept eigenpairs
      return jnp.sqrt(jnp.sum(inv ** power * x * x))
    err = jnp.finfo(k.dtype).eps * (norm(pn, 1) * norm(p1, 2) + norm(pn, 2) * norm(p1, 1))
    info["sensitivity"] = err / jnp.maximum(jnp.abs(total), jnp.finfo(k.dtype).tiny)
    converged = converged & (info["sensitivity"] <= IMTL_SCALE_RESOLVE)
  return alpha, {**info, "converged": converged}


def config_weights(k: jax.Array, factor: jax.Array | None = None, *, max_cond: float = 1e5):
  """ConFIG (Liu et al. 2024, Eq. 2, official code's defaults: equal weights,
  ``ProjectionLength``): ``d_u = pinv(U) 1`` for the unit gradients ``U``
  (rows ``g_i / ||g_i||``), normalised, times ``sum_i g_i . d_u / ||d_u||``.

  From the Gram matrix: ``pinv(U) = U^T (U U^T)^+``, ``U U^T = C``
  (:func:`cosine_gram`), so ``d_u = sum_i y_i u_i`` with ``y = C^+ 1`` and
  ``||d_u||^2 = y^T C y``, ``g_j . d_u = n_j (C y)_j``. Eigenvalues of ``C``
  below ``T eps lambda_max`` are cut (the pseudo-inverse's tolerance). Given
  ``factor`` (:func:`cosine_factor` of the rows, ``C = R^T R``: the train
  step's Jacobian path) the eigenpairs come from ``R`` (condition
  ``sqrt(cond(C))``), as ``pinv(U)`` from ``U``'s SVD would, and singular
  values of ``R`` below ``T eps sigma_max`` are cut.

  Args:
    k: ``[T, T]`` Gram matrix; factor: ``None`` or :func:`cosine_factor` of the
      rows; max_cond: ``converged`` is False when the condition number of what
      was decomposed (``C``, or ``R`` given ``factor``) exceeds it (float32
      resolves ``C`` to ~1e-7, and a nearly null eigenpair -- a near-opposite
      pair among many tasks -- dominates ``C^+ 1``).
  Returns:
    ``beta [T]``, ``info`` with ``cond`` (of ``C``), ``rank`` and
    ``converged``; every task's cosine to ``d`` is the same when ``C`` has full
    rank.
  """
  if not max_cond > 1.0:
    raise ValueError(f"config.objective.config.max_cond must be > 1, got {max_cond}.")
  _check_factor(factor, k.shape[0], "config")
  b, spec = _equal_cosine(k, factor)
  sq = jnp.maximum(spec["ycy"], jnp.finfo(k.dtype).tiny)
  length = jnp.sum(spec["n"] * spec["cy"]) / jnp.sqrt(sq)
  return b * length / jnp.sqrt(sq), {
      "cond": spec["cond"], "rank": spec["rank"],
      "converged": jnp.isfinite(spec["cond"]) & (spec["solved_cond"] < max_cond)}


def _alpha_fair_solve(k: jax.Array, alpha: float, iters: int, tol: float):
  """``w > 0`` with ``(K w)_i = w_i^{-1/alpha}``: the stationary point of the
  convex ``w^T K w / 2 - sum_i h(w_i)``, ``h' = w^{-1/alpha}``, by damped Newton
  in ``z = log w`` on ``K / s`` (``s = tr K / T``; rescaled by
  ``s^{-alpha/(alpha+1)}``), started at the solution for orthogonal gradients.
  There is no solution exactly when some nonnegative combination of the
  gradients vanishes (a Pareto-stationary point); ``converged`` (every
  relative residual ``|(K w)_i w_i^{1/alpha} - 1| <= tol``, plus the float
  rounding of ``(K w)_i`` up to ``100 tol`` once the Newton steps have
  stalled) is then False."""
  t = k.shape[0]
  scale = jnp.maximum(jnp.trace(k) / t, 1e-30)
  kn = k / scale
  p = 1.0 / alpha

  def newton(carry, _):
    z, _ = carry
    a = jnp.exp(z)
    r = kn @ a - a ** -p
    jac = (kn + jnp.diag(p * a ** (-p - 1.0))) * a[None, :]   # dr/dz
    dz = jnp.clip(jnp.linalg.solve(jac, -r), -1.0, 1.0)      # damping
    finite = jnp.all(jnp.isfinite(dz))
    # |z| <= 30: a solution in these units is far inside; beyond, none exists.
    z = jnp.clip(jnp.where(finite, z + dz, z), -30.0, 30.0)
    return (z, jnp.where(finite, jnp.max(jnp.abs(dz)), jnp.inf)), None

  diag = jnp.maximum(jnp.diag(kn), 1e-12)
  z0 = -jnp.log(diag) / (1.0 + p)          # K diagonal: w_i = K_ii^{-alpha/(alpha+1)}
  (z, last_step), _ = jax.lax.scan(newton, (z0, jnp.asarray(jnp.inf, k.dtype)), None,
                                   length=iters)
  a = jnp.exp(z)
  res = jnp.abs((kn @ a) * a ** p - 1.0)
  # The float rounding of (K w)_i: near-opposite gradients make K w a small
  # difference of large terms, which float32 resolves to ~1e-3 only. Allowed
  # up to 100 tol, and only once Newton has stalled: where no solution exists
  # K w cancels exactly and the relative residual stays near 1.
  floor = jnp.where(last_step < 1e-2, jnp.minimum(_rounding(kn, a) * a ** p, 100.0 * tol), 0.0)
  w = a * scale ** (-1.0 / (1.0 + p))
  ok = jnp.all(jnp.isfinite(w))   # no solution (K ~ 0): zeros, not converged
  return jnp.where(ok, w, 0.0), {"residual": jnp.max(res),
                                 "converged": ok & jnp.all(res <= tol + floor)}


def nash_mtl_weights(k: jax.Array, *, iters: int = 50, tol: float = 1e-4):
  """Nash-MTL (Navon et al. 2022): ``alpha > 0`` with ``K alpha = 1 / alpha``
  (:func:`_alpha_fair_solve` with ``alpha = 1``); no normalisation.

  Args:
    k: ``[T, T]`` Gram matrix; iters: Newton steps; tol: the largest relative
      residual ``|(K a)_i a_i - 1|`` accepted as converged.
  """
  return _alpha_fair_solve(k, 1.0, iters, tol)


def fairgrad_weights(k: jax.Array, *, alpha: float = 2.0, iters: int = 50,
                     tol: float = 1e-4):
  """FairGrad (Ban & Ji 2024): alpha-fair weights ``w > 0`` solving
  ``(K w)_i = w_i^{-1/alpha}`` (the official code solves it with scipy's
  ``least_squares``; here :func:`_alpha_fair_solve` on the device), then
  ``beta = T w`` (the code's ``newgrad * n_tasks``, "to match the sum loss").
  ``alpha = 1`` is Nash-MTL's system; the default 2 is the paper's experiments'
  (``run.sh``; the code's argparse default is 1).

  Args:
    k: ``[T, T]`` Gram matrix; alpha: the fairness exponent, > 0; iters: Newton
      steps; tol: the largest relative residual ``|(K w)_i w_i^{1/alpha} - 1|``
      accepted as converged.
  """
  if not alpha > 0:
    raise ValueError(f"config.objective.fairgrad.alpha must be > 0, got {alpha}.")
  w, info = _alpha_fair_solve(k, float(alpha), iters, tol)
  return k.shape[0] * w, {**info, "w": w}


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


def aligned_mtl_weights(k: jax.Array, factor: jax.Array | None = None, *,
                        resolve: float = 1e-2):
  """Aligned-MTL (Senushkin et al. 2023): ``B = sigma_min V Lambda^{-1/2} V^T``
  over the non-null eigenpairs of ``K``; the aligned gradients ``B G`` are
  orthogonal with equal norms ``sigma_min``; ``beta = 1^T B`` (uniform task
  weights).

  The eigenpairs come from :func:`jacobi_eigh` of ``K`` (relative accuracy
  ~``eps cond(C)``) or, given ``factor`` (:func:`cosine_factor` of the rows:
  the train step's Jacobian path), from :func:`jacobi_factor_eigh` of
  ``R diag(n)`` (``K = (R diag(n))^T R diag(n)``; relative accuracy
  ~``eps sqrt(cond(C))``, which resolves nearly collinear rows). An eigenpair
  is null when its eigenvalue is at rounding level *for the rows it involves*:
  its quotient ``lambda_k / sum_i V_ik^2 K_ii`` (the cosine matrix's Rayleigh
  quotient at ``diag(n) v_k``) at or below ``T eps`` (``(T eps)^2`` from the
  factor) -- a relative cut that keeps the small but real eigenvalue of a
  near-opposite pair next to a 100x larger gradient. The Gram is as precise as
  its dtype: float64 under ``jax_enable_x64`` (:func:`gram`).

  Args:
    k: ``[T, T]`` Gram matrix; factor: ``None`` or :func:`cosine_factor` of the
      rows; resolve: ``converged`` is False when an eigenvalue's relative
      error (~``eps / quotient`` from ``K``, ~``eps / sqrt(quotient)`` from the
      factor) is above ``resolve``: whether it is null cannot be told and ``B``
      is unreliable (exactly rank-deficient Grams, e.g. duplicate tasks, are
      flagged too).
  Returns:
    ``beta [T]``, ``info`` with ``B``, ``rank`` and ``converged``.
  """
  if not 0 < resolve < 1:
    raise ValueError(f"config.objective.aligned_mtl.resolve must be in (0, 1), got {resolve}.")
  t = k.shape[0]
  _check_factor(factor, t, "aligned_mtl")
  eps = jnp.finfo(k.dtype).eps
  if factor is None:
    lam, v = jacobi_eigh(k)
    cut, unresolved = t * eps, eps / resolve
  else:
    n = jnp.sqrt(jnp.maximum(jnp.diag(k), 0.0))
    lam, v = jacobi_factor_eigh(factor.astype(k.dtype) * n[None, :])
    cut, unresolved = (t * eps) ** 2, (eps / resolve) ** 2
  scale = (v * v).T @ jnp.maximum(jnp.diag(k), 0.0)      # sum_i V_ik^2 K_ii
  ratio = lam / jnp.maximum(scale, jnp.finfo(k.dtype).tiny)
  keep = (ratio > cut) & (lam > 0)
  lam_min = jnp.min(jnp.where(keep, lam, jnp.inf))
  inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
  b = jnp.sqrt(lam_min) * (v * inv_sqrt[None, :]) @ v.T
  b = jnp.where(jnp.any(keep), b, jnp.zeros_like(b))
  # Flagged: an eigenpair float precision cannot resolve (kept or cut: in
  # float32 a real but tiny one and a null one look alike).
  converged = jnp.any(keep) & ~jnp.any(ratio < unresolved)
  return b.sum(axis=0), {"B": b, "rank": keep.sum(), "converged": converged}


# ----------------------------------------------------------------------------
# UPGrad and DualProj: projections onto the dual cone {d : G d >= 0}.
# ----------------------------------------------------------------------------


def _box_qp_exact(a: jax.Array, lo: jax.Array, tol: float):
  """``argmin_{x >= lo} x^T A x`` (``A`` PSD) by enumerating the free sets F:
  ``A_FF x_F = -A_FA lo_A``, ``x_A = lo_A``; a candidate is optimal when
  ``x_F >= lo_F``, ``(A x)_F = 0`` and ``(A x)_A >= 0`` (to relative ``tol``
  plus float rounding). Returns ``(x, found)``. Cost ``O(2^T T^3)``."""
  t = a.shape[0]
  masks = jnp.asarray(_support_masks(t, empty=True))
  eye = jnp.eye(t, dtype=a.dtype)

  def candidate(free):
    f = free.astype(a.dtype)
    system = f[:, None] * a * f[None, :] + eye * (1.0 - f)[None, :]
    rhs = f * -(a @ ((1.0 - f) * lo)) + (1.0 - f) * lo
    x = jnp.where(free, jnp.linalg.solve(system, rhs), lo)
    mu = a @ x
    slack = tol * (jnp.abs(a) @ jnp.abs(x)) + _rounding(a, x)
    scale = jnp.max(jnp.abs(x))
    ok = (jnp.all(jnp.where(free, (x >= lo - tol * scale) & (jnp.abs(mu) <= slack),
                            mu >= -slack)) & jnp.all(jnp.isfinite(x)))
    return jnp.maximum(x, lo), ok

  x, ok = jax.vmap(candidate)(masks)
  obj = jnp.einsum("si,ij,sj->s", x, a, x)
  best = jnp.argmin(jnp.where(ok, obj, jnp.inf))
  return x[best], ok[best]


def _box_qp_iterative(a: jax.Array, lo: jax.Array, iters: int, tol: float):
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
  return x, res <= tol * jnp.max(jnp.abs(x)) + _rounding(a, x).max() / lip


def _dual_cone_weights(k, u, norm_eps, reg_eps, exact_up_to, iters, tol):
  """``w [..., T]`` with ``w G`` the projection of ``u G`` (``u [..., T]``) onto
  the dual cone ``{d : G d >= 0}``: by Proposition 1 of Quinton & Rey (2024),
  ``w = argmin_{v >= u} v^T K v`` -- on TorchJD's regularised Gram
  ``K' = K / tr K + reg_eps I`` (``K' = reg_eps I`` when ``tr K < norm_eps``).

  Solved in cosine coordinates ``x = n v / sqrt(tr K)``: ``v^T K' v = x^T A x``
  with ``A = C + reg_eps tr K diag(n)^{-2}`` and ``x >= n u / sqrt(tr K)``;
  exactly (:func:`_box_qp_exact`) for ``T <= exact_up_to``, else
  :func:`_box_qp_iterative`. Zero gradients keep ``v_i = u_i``.
  Returns ``(w, converged)``."""
  t = k.shape[0]
  tr = jnp.trace(k)
  c, n = cosine_gram(k)
  pos = n > jnp.sqrt(jnp.maximum(tr, 0.0)) * 1e-15
  n_safe = jnp.where(pos, n, 1.0)
  rt = jnp.sqrt(jnp.maximum(tr, jnp.finfo(tr.dtype).tiny))
  a = jnp.where(pos[:, None] & pos[None, :], c, jnp.eye(t, dtype=k.dtype))
  a = a + jnp.diag(jnp.where(pos, reg_eps * tr / (n_safe * n_safe), 0.0))

  def one(ui):
    lo = jnp.where(pos, n * ui / rt, 0.0)
    if t <= exact_up_to:
      x, ok = _box_qp_exact(a, lo, tol)
    else:
      x, ok = _box_qp_iterative(a, lo, iters, tol)
    v = jnp.where(pos, rt * x / n_safe, ui)
    small = tr < norm_eps
    return jnp.where(small, ui, v), ok | small

  flat = u.reshape(-1, t)
  w, ok = jax.vmap(one)(flat)
  return w.reshape(u.shape), jnp.all(ok)


def _check_dual_cone_args(name, norm_eps, reg_eps, exact_up_to, tol):
  if not (norm_eps >= 0 and reg_eps >= 0):
    raise ValueError(f"config.objective.{name}: norm_eps and reg_eps must be >= 0, got "
                     f"{norm_eps}, {reg_eps}.")
  if not 0 <= exact_up_to <= 12:
    raise ValueError(f"config.objective.{name}.exact_up_to must be in [0, 12] (the exact "
                     f"solver builds 2^T systems), got {exact_up_to}.")
  if not tol > 0:
    raise ValueError(f"config.objective.{name}.tol must be > 0, got {tol}.")


def upgrad_weights(k: jax.Array, *, norm_eps: float = 1e-4, reg_eps: float = 1e-4,
                   exact_up_to: int = 10, iters: int = 1000, tol: float = 1e-5):
  """UPGrad (Quinton & Rey 2024, TorchJD's defaults): each task gradient
  ``g_i / T`` (the mean weighting's share) projected onto the dual cone of the
  rows, the projections summed: ``beta = sum_i w^(i)`` with
  ``w^(i) = argmin_{v >= e_i / T} v^T K' v`` (:func:`_dual_cone_weights`).

  Args:
    k: ``[T, T]`` Gram matrix; norm_eps: below this trace the Gram is treated
      as zero (TorchJD's ``normalize``; the result is then the mean);
      reg_eps: added to the trace-normalised Gram's diagonal (TorchJD's
      ``regularize``; 0 gives the exact projection, ``G d >= 0``);
      exact_up_to: the largest T solved by enumeration (at most 12); iters, tol:
      the iterative solver beyond, and the relative KKT tolerance of both.
  Returns:
    ``beta [T]``, ``info`` with ``converged`` and the projections' weights ``W [T, T]``.
  """
  _check_dual_cone_args("upgrad", norm_eps, reg_eps, exact_up_to, tol)
  t = k.shape[0]
  w, ok = _dual_cone_weights(k, jnp.eye(t, dtype=k.dtype) / t, norm_eps, reg_eps,
                             exact_up_to, iters, tol)
  return w.sum(axis=0), {"converged": ok, "W": w}


def dualproj_weights(k: jax.Array, *, norm_eps: float = 1e-4, reg_eps: float = 1e-4,
                     exact_up_to: int = 10, iters: int = 1000, tol: float = 1e-5):
  """DualProj (Quinton & Rey 2024, after GEM's Eq. 11; TorchJD's defaults): the
  mean gradient projected onto the dual cone of the rows,
  ``beta = argmin_{v >= 1 / T} v^T K' v`` (:func:`_dual_cone_weights`).

  Args: as :func:`upgrad_weights`.
  Returns:
    ``beta [T]``, ``info`` with ``converged``.
  """
  _check_dual_cone_args("dualproj", norm_eps, reg_eps, exact_up_to, tol)
  t = k.shape[0]
  w, ok = _dual_cone_weights(k, jnp.full((t,), 1.0 / t, k.dtype), norm_eps, reg_eps,
                             exact_up_to, iters, tol)
  return w, {"converged": ok}


# The gradient-combination methods of the train step: name -> weight function.
GRAM_METHODS: dict[str, Callable] = {
    "mgda": mgda_weights,
    "pcgrad": pcgrad_weights,
    "cagrad": cagrad_weights,
    "imtl_g": imtl_g_weights,
    "nash_mtl": nash_mtl_weights,
    "aligned_mtl": aligned_mtl_weights,
    "upgrad": upgrad_weights,
    "dualproj": dualproj_weights,
    "config": config_weights,
    "fairgrad": fairgrad_weights,
}
GRADIENT_METHODS = tuple(GRAM_METHODS)


def uses_rng(weights_fn: Callable) -> bool:
  """Whether a weight function takes a random key (its second parameter)."""
  params = list(inspect.signature(weights_fn).parameters.values())
  return len(params) > 1 and params[1].name == "rng"


def uses_factor(weights_fn: Callable) -> bool:
  """Whether a weight function takes the rows' :func:`cosine_factor` (a
  ``factor`` parameter, not keyword-only: it is data, not a hyper-parameter)."""
  p = inspect.signature(weights_fn).parameters.get("factor")
  return p is not None and p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD


def hyperparameters(weights_fn: Callable) -> dict:
  """The keyword-only parameters of a weight function and their defaults."""
  return {p.name: p.default for p in inspect.signature(weights_fn).parameters.values()
          if p.kind == inspect.Parameter.KEYWORD_ONLY}


# ----------------------------------------------------------------------------
# The public functions of task gradients: (d, beta, info).
# ----------------------------------------------------------------------------


def _direction(weights, grads, factor: bool = False):
  """``weights(K)`` (or ``weights(K, cosine_factor(grads))``: the rows are here)."""
  k = gram(grads)
  beta, info = weights(k, cosine_factor(grads)) if factor else weights(k)
  return combine(beta, grads), beta, info


def mgda(grads, *, iters: int = 300, tol: float = 1e-5, exact_up_to: int = 10):
  """MGDA's min-norm direction. ``grads``: ``[T, D]`` or a pytree with task axis 0.
  Returns ``(d, beta [T], info)``; see :func:`mgda_weights`."""
  return _direction(lambda k: mgda_weights(k, iters=iters, tol=tol,
                                           exact_up_to=exact_up_to), grads)


def mgda_ub(rep_grads, *, iters: int = 300, tol: float = 1e-5, exact_up_to: int = 10):
  """MGDA-UB (Sener & Koltun 2018, sec. 3.3): MGDA's min-norm weights on the task
  gradients with respect to the shared representation ``rep_grads`` (``[T, B, F]``,
  ``[T, D]`` or a pytree with task axis 0). Returns ``(d_Z, beta [T], info)``,
  ``d_Z`` a direction in representation space."""
  return mgda(rep_grads, iters=iters, tol=tol, exact_up_to=exact_up_to)


def cagrad(grads, *, c: float = 0.5, rescale: int = 1, iters: int = 300, tol: float = 1e-5,
           exact_up_to: int = 10):
  """CAGrad's direction. ``grads``: ``[T, D]`` or a pytree with task axis 0.
  Returns ``(d, beta [T], info)``; see :func:`cagrad_weights`."""
  return _direction(lambda k: cagrad_weights(k, c=c, rescale=rescale, iters=iters, tol=tol,
                                             exact_up_to=exact_up_to), grads)


def pcgrad(grads, rng: jax.Array):
  """PCGrad's direction (the sum of the projected gradients). ``grads``: ``[T, D]``
  or a pytree with task axis 0; ``rng``: the visiting orders' key. Returns
  ``(d, beta [T], info)``; see :func:`pcgrad_weights`."""
  return _direction(lambda k: pcgrad_weights(k, rng), grads)


def imtl_g(grads, *, eps: float = 1e-12, max_cond: float = 1e6):
  """IMTL-G's direction. ``grads``: ``[T, D]`` or a pytree with task axis 0.
  Returns ``(d, beta [T], info)``; see :func:`imtl_g_weights`."""
  return _direction(lambda k, r: imtl_g_weights(k, r, eps=eps, max_cond=max_cond), grads,
                    factor=True)


def nash_mtl(grads, *, iters: int = 50, tol: float = 1e-4):
  """Nash-MTL's direction. ``grads``: ``[T, D]`` or a pytree with task axis 0.
  Returns ``(d, alpha [T], info)``; see :func:`nash_mtl_weights`."""
  return _direction(lambda k: nash_mtl_weights(k, iters=iters, tol=tol), grads)


def aligned_mtl(grads, *, resolve: float = 1e-2):
  """Aligned-MTL's direction. ``grads``: ``[T, D]`` or a pytree with task axis 0.
  Returns ``(d, beta [T], info)``; see :func:`aligned_mtl_weights`."""
  return _direction(lambda k, r: aligned_mtl_weights(k, r, resolve=resolve), grads,
                    factor=True)


def upgrad(grads, *, norm_eps: float = 1e-4, reg_eps: float = 1e-4, exact_up_to: int = 10,
           iters: int = 1000, tol: float = 1e-5):
  """UPGrad's direction. ``grads``: ``[T, D]`` or a pytree with task axis 0.
  Returns ``(d, beta [T], info)``; see :func:`upgrad_weights`."""
  return _direction(lambda k: upgrad_weights(k, norm_eps=norm_eps, reg_eps=reg_eps,
                                             exact_up_to=exact_up_to, iters=iters, tol=tol),
                    grads)


def dualproj(grads, *, norm_eps: float = 1e-4, reg_eps: float = 1e-4, exact_up_to: int = 10,
             iters: int = 1000, tol: float = 1e-5):
  """DualProj's direction. ``grads``: ``[T, D]`` or a pytree with task axis 0.
  Returns ``(d, beta [T], info)``; see :func:`dualproj_weights`."""
  return _direction(lambda k: dualproj_weights(k, norm_eps=norm_eps, reg_eps=reg_eps,
                                               exact_up_to=exact_up_to, iters=iters, tol=tol),
                    grads)


def config(grads, *, max_cond: float = 1e5):
  """ConFIG's direction. ``grads``: ``[T, D]`` or a pytree with task axis 0.
  Returns ``(d, beta [T], info)``; see :func:`config_weights`."""
  return _direction(lambda k, r: config_weights(k, r, max_cond=max_cond), grads, factor=True)


def fairgrad(grads, *, alpha: float = 2.0, iters: int = 50, tol: float = 1e-4):
  """FairGrad's direction. ``grads``: ``[T, D]`` or a pytree with task axis 0.
  Returns ``(d, beta [T], info)``; see :func:`fairgrad_weights`."""
  return _direction(lambda k: fairgrad_weights(k, alpha=alpha, iters=iters, tol=tol), grads)
