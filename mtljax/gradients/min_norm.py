"""Min-norm methods: MGDA (Sener & Koltun 2018) and CAGrad (Liu et al. 2021).

Both solve a problem over the simplex in cosine coordinates
(:func:`mtljax.gradients.algebra.cosine_gram`), so rows whose norms differ by
100x cost no float32 precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtljax.gradients import algebra
from mtljax.gradients import solvers

def _check_solver(name: str, exact_up_to: int, tol: float) -> None:
  if not 0 <= exact_up_to <= 12:
    raise ValueError(f"{name}.exact_up_to must be in [0, 12] (the exact "
                     f"solver builds 2^T systems), got {exact_up_to}.")
  if not 0.0 <= tol < 1.0:
    raise ValueError(f"{name}.tol must be in [0, 1), got {tol}.")


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
  _check_solver("mgda", exact_up_to, tol)
  t = k.shape[0]
  kn = k / jnp.maximum(jnp.max(jnp.diag(k)), 1e-30)

  def with_gap(a, converged):
    g = 2.0 * (kn @ a)
    return a, {"gap": g @ a - jnp.min(g), "converged": converged}

  if t > exact_up_to:
    return with_gap(*solvers.min_norm_active_set(kn, iters, tol))
  a, found = solvers.min_norm_exact(kn, tol)

  def active_set():  # the exact candidate unless the active set converged or is better
    b, b_ok = solvers.min_norm_active_set(kn, iters, tol)
    better = b_ok | (b @ kn @ b < a @ kn @ a)
    return with_gap(jnp.where(better, b, a), b_ok)
  return jax.lax.cond(found, lambda: with_gap(a, found), active_set)


# CAGrad: the official code's dual, in cosine coordinates.
#
# With ``w = m * x`` (as MGDA: ``m = n_min / n``) and ``u_i = g_i / n_i``, the
# dual ``F(w) = g_w . g0 + rho ||g_w||`` (``rho = c ||g0||``) is
# ``n_min ||g0|| (x^T q + c sqrt(x^T C x))`` over ``x >= 0``, ``m^T x = 1``,
# with ``q_i = u_i . g0 / ||g0||`` (cosines): every term is of order one.
# Its gradient ``q + c C x / s`` (``s = sqrt(x^T C x)``) is ``u_j . d / ||g0||``
# for ``d = g0 + rho g_w / ||g_w||``.


def _cagrad_face(c, m, q, cr, mask):
  """The stationary point of ``x^T q + cr sqrt(x^T C x)`` on the face ``mask``
  of ``{x >= 0, m^T x = 1}``, or ``t = 0`` when the face has none.

  Stationarity ``q_S + t C_SS x_S = nu m_S`` with ``t = cr / s`` splits as
  ``x = z0 / t + z1``: ``z1`` the face's affine min-norm point
  (:func:`_bordered_solve`, ``z1^T C z1 = nu1``) and ``z0`` the solution of
  ``C_SS z0 - nu0 m_S = -q_S``, ``m_S^T z0 = 0``: one bordered system
  (:func:`bordered_matrix`) with two right-hand sides. ``x^T C x = s^2``
  then gives ``t^2 = (cr^2 + q^T z0) / nu1``. Returns ``(x [T], t)``."""
  k = c.shape[0]
  mf = mask.astype(c.dtype)
  rhs = jnp.zeros((k + 1, 2), c.dtype).at[:k, 0].set(-q * mf).at[k, 1].set(1.0)
  sol = jnp.linalg.solve(solvers.bordered_matrix(c, m, mask), rhs)
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
  masks = jnp.asarray(algebra.support_masks(c.shape[0]))
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
  lip = cn * solvers.largest_eigenvalue(kn) / jnp.sqrt(b @ kn @ b + 1e-12)
  return solvers.minimize_on_simplex(obj, b, lip, iters, tol)


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
    raise ValueError(f"cagrad.c must be in [0, 1), got {c}.")
  if rescale not in (0, 1, 2):
    raise ValueError(f"cagrad: rescale must be 0, 1 or 2, got {rescale}.")
  _check_solver("cagrad", exact_up_to, tol)
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
  cm, n = algebra.cosine_gram(kn)
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
