"""Equal-cosine methods: IMTL-G (Liu et al. 2021) and ConFIG (Liu et al. 2024).

Both find the direction with equal cosine to every row from the spectral
pseudo-inverse of the cosine matrix (or, on the Jacobian path, of the rows'
triangular factor: :func:`mtljax.gradients.algebra.cosine_factor`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtljax.gradients import algebra
from mtljax.gradients import solvers

def _equal_cosine(k: jax.Array, factor: jax.Array | None = None, keep=None):
  """``(b, spec)`` with ``b = C^+ 1 / n``: ``d = b G`` has the same projection
  on every unit gradient (``u_i . d = 1`` for full-rank ``C``); zero gradients
  (and those off ``keep``) get ``b_i = 0``. ``spec``: :func:`spectral_pinv_ones`
  of ``C``, from ``factor`` when given, plus the norms ``n`` (of the kept rows).
  The shared core of IMTL-G and ConFIG."""
  if keep is not None:
    k = k * keep[:, None] * keep[None, :]
  c, n = algebra.cosine_gram(k)
  if factor is not None and keep is not None:
    # A dropped row: a zero column of R, and C_ii = 1 (as cosine_gram does).
    factor = jnp.concatenate([factor * keep[None, :], jnp.diag(1.0 - keep)], axis=0)
  spec = solvers.spectral_pinv_ones(c, factor)
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
    raise ValueError(f"imtl_g.max_cond must be > 1, got {max_cond}.")
  algebra.check_factor(factor, k.shape[0], "imtl_g")
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
    raise ValueError(f"config.max_cond must be > 1, got {max_cond}.")
  algebra.check_factor(factor, k.shape[0], "config")
  b, spec = _equal_cosine(k, factor)
  sq = jnp.maximum(spec["ycy"], jnp.finfo(k.dtype).tiny)
  length = jnp.sum(spec["n"] * spec["cy"]) / jnp.sqrt(sq)
  return b * length / jnp.sqrt(sq), {
      "cond": spec["cond"], "rank": spec["rank"],
      "converged": jnp.isfinite(spec["cond"]) & (spec["solved_cond"] < max_cond)}
