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

Solvers run in JAX on the device: an exact support enumeration for MGDA's
min-norm problem at small T (FISTA beyond, and as its fallback), projected
gradient with backtracking on the simplex (CAGrad), damped Newton (Nash-MTL),
eigendecomposition (Aligned-MTL), a linear solve (IMTL-G).

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
  """``K = G G^T`` ``[T, T]`` for ``G [T, D]`` or a pytree with task axis 0."""
  leaves = jax.tree.leaves(grads)
  if not leaves:
    raise ValueError("gram: no gradients.")
  t = leaves[0].shape[0]
  k = jnp.zeros((t, t), jnp.float32)
  for leaf in leaves:
    if leaf.shape[0] != t:
      raise ValueError(f"gram: leaves disagree on the task axis ({leaf.shape[0]} vs {t}).")
    flat = leaf.reshape(t, -1).astype(jnp.float32)
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


def _support_masks(t: int) -> np.ndarray:
  """``[2^T - 1, T]`` bool: every non-empty subset of the tasks."""
  m = np.arange(1, 2 ** t)[:, None]
  return ((m >> np.arange(t)[None, :]) & 1).astype(bool)


def min_norm_exact(kn: jax.Array, tol: float = 1e-5):
  """The min-norm point of the simplex, ``argmin_a a^T K a``, by enumerating
  supports: on support S the KKT conditions give ``a_S ∝ K_SS^{-1} 1``; a
  candidate is optimal when ``a >= 0`` and ``(K a)_j >= a^T K a`` off S.
  ``kn`` should be scaled to entries of order 1. Returns ``(a, found)``;
  ``found`` is False when no support passed (singular or ill-conditioned
  beyond float precision). Cost ``O(2^T T^3)``: for small T only.
  """
  t = kn.shape[0]
  m = jnp.asarray(_support_masks(t))
  mf = m.astype(kn.dtype)
  eye = jnp.eye(t, dtype=kn.dtype)
  systems = mf[:, :, None] * kn[None] * mf[:, None, :] + eye[None] * (1.0 - mf)[:, None, :]
  u = jnp.linalg.solve(systems, mf[..., None])[..., 0] * mf
  a = u / jnp.sum(u, axis=1, keepdims=True)
  obj = jnp.einsum("si,ij,sj->s", a, kn, a)
  ka = a @ kn                                                  # (K a)_j
  ok = (jnp.all(jnp.isfinite(a), axis=1) & jnp.all(a >= -tol, axis=1)
        & jnp.all(m | (ka >= obj[:, None] - tol), axis=1))
  best = jnp.argmin(jnp.where(ok, obj, jnp.inf))
  a = jnp.maximum(a[best], 0.0)
  return a / jnp.sum(a), ok[best]


def mgda_weights(k: jax.Array, *, iters: int = 300, tol: float = 1e-5,
                 exact_up_to: int = 10):
  """MGDA: ``argmin_{a in simplex} a^T K a`` (the min-norm element).

  For ``T <= exact_up_to`` the exact solver (:func:`min_norm_exact`, all
  ``2^T - 1`` supports at once). If its result misses the duality-gap test (no
  support passed, or float32 rounding near a Pareto-stationary point), FISTA on
  the simplex (:func:`minimize_on_simplex`, ``iters``) refines it, starting
  from the exact candidate, and the better of the two is returned with its own
  ``gap`` and ``converged`` (one that passes its test over one that does not,
  else the smaller ``a^T K a``). For larger T, FISTA alone.

  Args:
    k: ``[T, T]`` Gram matrix.
    iters, tol: the iterative solver's iterations and relative duality-gap
      tolerance (the gap also decides ``converged`` for the exact solver).
    exact_up_to: the largest T solved exactly (at most 12: the solver builds
      ``2^T`` small systems).
  Returns:
    ``beta [T]`` on the simplex, ``info`` with ``gap`` (Frank-Wolfe duality gap
    of ``a^T K a / max_i K_ii``) and ``converged``.
  """
  if not 0 <= exact_up_to <= 12:
    raise ValueError(f"config.objective.mgda.exact_up_to must be in [0, 12] (the exact "
                     f"solver builds 2^T systems), got {exact_up_to}.")
  t = k.shape[0]
  scale = jnp.maximum(jnp.max(jnp.diag(k)), 1e-30)  # same argmin on K / scale
  kn = k / scale
  f = lambda a: a @ kn @ a
  uniform = jnp.full((t,), 1.0 / t, kn.dtype)

  def gap_of(a):
    g = 2.0 * (kn @ a)
    return g @ a - jnp.min(g)

  def iterative(x0):
    lip = 2.0 * largest_eigenvalue(kn)  # f'' = 2 K
    return minimize_on_simplex(f, x0, lip, iters, tol)

  if t > exact_up_to:
    return iterative(uniform)
  a, found = min_norm_exact(kn, tol)
  gap = gap_of(a)
  exact = (a, {"gap": gap, "converged": found & (gap <= tol * (1.0 + jnp.abs(f(a))))})

  def refine():
    b, info = iterative(jnp.where(found, a, uniform))
    b_ok, a_ok = info["converged"], exact[1]["converged"]
    better = (b_ok & ~a_ok) | ((b_ok == a_ok) & (f(b) < f(a)))
    return jax.tree.map(lambda u, v: jnp.where(better, u, v), (b, info), exact)
  return jax.lax.cond(exact[1]["converged"], lambda: exact, refine)


def cagrad_weights(k: jax.Array, *, c: float = 0.5, rescale: int = 1, iters: int = 300,
                   tol: float = 1e-5):
  """CAGrad (Liu et al. 2021), the official code's dual.

  ``w = argmin_{w in simplex} w^T K b + c ||g0|| sqrt(w^T K w)`` with
  ``b = 1/T`` (so ``w^T K b = g_w . g0``); then
  ``d = g0 + c ||g0|| g_w / ||g_w||`` and, for ``rescale=1``, ``d / (1 + c^2)``
  (``rescale=2``: ``d / (1 + c)``; ``0``: none).

  Args:
    k: ``[T, T]`` Gram matrix; c: radius of the ball around ``g0`` in units of
      ``||g0||``, in ``[0, 1)``; rescale: 0, 1 or 2; iters, tol: the dual's
      simplex solver.
  Returns:
    ``beta [T]`` (``d = beta G``), ``info`` with ``gap``, ``converged`` and the
    dual weights ``w``.
  """
  if not 0.0 <= c < 1.0:
    raise ValueError(f"config.objective.cagrad.c must be in [0, 1), got {c}.")
  if rescale not in (0, 1, 2):
    raise ValueError(f"cagrad: rescale must be 0, 1 or 2, got {rescale}.")
  t = k.shape[0]
  b = jnp.full((t,), 1.0 / t)
  g0_norm = jnp.sqrt(jnp.maximum(b @ k @ b, 0.0) + 1e-12)
  scale = jnp.maximum(jnp.trace(k) / t, 1e-30)
  kn = k / scale  # same argmin, better conditioned line search
  cn = c * g0_norm / jnp.sqrt(scale)

  def obj(w):
    return w @ kn @ b + cn * jnp.sqrt(jnp.maximum(w @ kn @ w, 0.0) + 1e-12)

  # f'' <= cn K / ||g_w||: start from the curvature at the uniform point and
  # let backtracking raise it where ||g_w|| is smaller.
  lip = cn * largest_eigenvalue(kn) / jnp.sqrt(b @ kn @ b + 1e-12)
  w, info = minimize_on_simplex(obj, b, lip, iters, tol)
  gw_norm = jnp.sqrt(jnp.maximum(w @ k @ w, 0.0) + 1e-12)
  lam = c * g0_norm / gw_norm
  beta = b + lam * w
  beta = beta / {0: 1.0, 1: 1 + c * c, 2: 1 + c}[rescale]
  return beta, {**info, "w": w}


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

  The order includes task i itself, as in the published code (which shuffles
  all task gradients and skips none): before any projection ``g_i . g_i >= 0``,
  so the visit does nothing, but once ``g_i^PC`` has been projected away from
  conflicting tasks it can conflict with ``g_i`` itself, and then it *is*
  projected onto ``g_i``'s normal plane like any other conflicting gradient.

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


def imtl_g_weights(k: jax.Array, *, eps: float = 1e-12, max_cond: float = 1e6):
  """IMTL-G: ``alpha_{2..T} = g_1 U^T (D U^T)^{-1}``, ``alpha_1 = 1 - sum``,
  with ``D_j = g_1 - g_j``, ``U_j = u_1 - u_j``, ``u = g / ||g||``; then ``d``
  has equal projections on every ``u_i``. Computed from K.

  Args:
    k: ``[T, T]`` Gram matrix; eps: floor of a gradient's norm;
      max_cond: ``converged`` is False when ``D U^T``'s condition number exceeds it.
  """
  t = k.shape[0]
  norms = jnp.sqrt(jnp.maximum(jnp.diag(k), 0.0))
  inv = 1.0 / jnp.maximum(norms, eps)
  # Coefficients (rows) of D = P_D G and U = P_U G over the task gradients.
  e = jnp.eye(t, dtype=k.dtype)
  p_d = e[0][None, :] - e[1:]                      # [T-1, T]
  p_u = (e[0] * inv[0])[None, :] - e[1:] * inv[1:, None]
  du = p_d @ k @ p_u.T                             # D U^T  [T-1, T-1]
  g1u = (e[0] @ k) @ p_u.T                         # g_1 U^T  [T-1]
  # alpha_rest = g_1 U^T (D U^T)^{-1}; the pseudo-inverse keeps it finite when
  # D U^T is singular (zero or repeated gradients), reported by "converged".
  alpha_rest = g1u @ jnp.linalg.pinv(du)
  alpha = jnp.concatenate([1.0 - alpha_rest.sum()[None], alpha_rest])
  cond = jnp.linalg.cond(du)
  return alpha, {"cond": cond, "converged": jnp.isfinite(cond) & (cond < max_cond)}


def nash_mtl_weights(k: jax.Array, *, iters: int = 50, tol: float = 1e-4):
  """Nash-MTL: ``alpha > 0`` with ``K alpha = 1 / alpha``.

  That is the stationary point of ``f(a) = a^T K a / 2 - sum_i log a_i``,
  convex for PSD ``K``; solved by damped Newton in ``log a`` (keeps
  ``a > 0``). There is no solution exactly when some nonnegative combination of
  the gradients vanishes (``G v = 0``, ``v >= 0``, ``v != 0``: a Pareto-stationary
  point, where ``f`` is unbounded below); ``converged`` is then False.

  Args:
    k: ``[T, T]`` Gram matrix; iters: Newton steps; tol: the largest relative
      residual ``|(K a)_i a_i - 1|`` accepted as converged.
  """
  t = k.shape[0]
  scale = jnp.maximum(jnp.trace(k) / t, 1e-30)
  kn = k / scale  # K a = 1/a  <=>  (K/s)(sqrt(s) a) = 1/(sqrt(s) a)

  def residual(a):
    return kn @ a - 1.0 / a

  def newton(z, _):
    a = jnp.exp(z)
    r = residual(a)
    # d/dz of r = (K + diag(1/a^2)) diag(a)
    jac = (kn + jnp.diag(1.0 / (a * a))) * a[None, :]
    dz = jnp.linalg.solve(jac, -r)
    dz = jnp.clip(dz, -1.0, 1.0)  # damping
    z_new = jnp.where(jnp.all(jnp.isfinite(dz)), z + dz, z)
    return z_new, None

  z, _ = jax.lax.scan(newton, jnp.zeros((t,), k.dtype), None, length=iters)
  a = jnp.exp(z)
  res = jnp.max(jnp.abs(residual(a) * a))  # relative: |(Ka)_i a_i - 1|
  alpha = a / jnp.sqrt(scale)
  return alpha, {"residual": res, "converged": res <= tol}


def aligned_mtl_weights(k: jax.Array):
  """Aligned-MTL: ``B = sigma_min V Lambda^{-1/2} V^T`` over the non-null
  eigenpairs of ``K``; the aligned gradients ``B G`` are orthogonal with equal
  norms ``sigma_min``; ``beta = 1^T B``.

  Args:
    k: ``[T, T]`` Gram matrix.
  """
  t = k.shape[0]
  lam, v = jnp.linalg.eigh(k)
  tol = jnp.max(lam) * t * jnp.finfo(k.dtype).eps
  keep = lam > tol
  lam_min = jnp.min(jnp.where(keep, lam, jnp.inf))
  inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
  b = jnp.sqrt(lam_min) * (v * inv_sqrt[None, :]) @ v.T
  b = jnp.where(jnp.any(keep), b, jnp.zeros_like(b))
  return b.sum(axis=0), {"B": b, "rank": keep.sum()}


# The gradient-combination methods of the train step: name -> weight function.
GRAM_METHODS: dict[str, Callable] = {
    "mgda": mgda_weights,
    "pcgrad": pcgrad_weights,
    "cagrad": cagrad_weights,
    "imtl_g": imtl_g_weights,
    "nash_mtl": nash_mtl_weights,
    "aligned_mtl": aligned_mtl_weights,
}
GRADIENT_METHODS = tuple(GRAM_METHODS)


def uses_rng(weights_fn: Callable) -> bool:
  """Whether a weight function takes a random key (its second parameter)."""
  params = list(inspect.signature(weights_fn).parameters.values())
  return len(params) > 1 and params[1].name == "rng"


def hyperparameters(weights_fn: Callable) -> dict:
  """The keyword-only parameters of a weight function and their defaults."""
  return {p.name: p.default for p in inspect.signature(weights_fn).parameters.values()
          if p.kind == inspect.Parameter.KEYWORD_ONLY}


# ----------------------------------------------------------------------------
# The public functions of task gradients: (d, beta, info).
# ----------------------------------------------------------------------------


def _direction(weights, grads):
  beta, info = weights(gram(grads))
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


def cagrad(grads, *, c: float = 0.5, rescale: int = 1, iters: int = 300, tol: float = 1e-5):
  """CAGrad's direction. ``grads``: ``[T, D]`` or a pytree with task axis 0.
  Returns ``(d, beta [T], info)``; see :func:`cagrad_weights`."""
  return _direction(lambda k: cagrad_weights(k, c=c, rescale=rescale, iters=iters, tol=tol),
                    grads)


def pcgrad(grads, rng: jax.Array):
  """PCGrad's direction (the sum of the projected gradients). ``grads``: ``[T, D]``
  or a pytree with task axis 0; ``rng``: the visiting orders' key. Returns
  ``(d, beta [T], info)``; see :func:`pcgrad_weights`."""
  return _direction(lambda k: pcgrad_weights(k, rng), grads)


def imtl_g(grads, *, eps: float = 1e-12, max_cond: float = 1e6):
  """IMTL-G's direction. ``grads``: ``[T, D]`` or a pytree with task axis 0.
  Returns ``(d, beta [T], info)``; see :func:`imtl_g_weights`."""
  return _direction(lambda k: imtl_g_weights(k, eps=eps, max_cond=max_cond), grads)


def nash_mtl(grads, *, iters: int = 50, tol: float = 1e-4):
  """Nash-MTL's direction. ``grads``: ``[T, D]`` or a pytree with task axis 0.
  Returns ``(d, alpha [T], info)``; see :func:`nash_mtl_weights`."""
  return _direction(lambda k: nash_mtl_weights(k, iters=iters, tol=tol), grads)


def aligned_mtl(grads):
  """Aligned-MTL's direction. ``grads``: ``[T, D]`` or a pytree with task axis 0.
  Returns ``(d, beta [T], info)``; see :func:`aligned_mtl_weights`."""
  return _direction(aligned_mtl_weights, grads)
