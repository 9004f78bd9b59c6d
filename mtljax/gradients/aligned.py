"""Aligned-MTL (Senushkin et al. 2023): the rows' principal components rescaled
to equal magnitude, from Jacobi eigenpairs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtljax.gradients import algebra
from mtljax.gradients import solvers

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
    raise ValueError(f"aligned_mtl.resolve must be in (0, 1), got {resolve}.")
  t = k.shape[0]
  algebra.check_factor(factor, t, "aligned_mtl")
  eps = jnp.finfo(k.dtype).eps
  if factor is None:
    lam, v = solvers.jacobi_eigh(k)
    cut, unresolved = t * eps, eps / resolve
  else:
    n = jnp.sqrt(jnp.maximum(jnp.diag(k), 0.0))
    lam, v = solvers.jacobi_factor_eigh(factor.astype(k.dtype) * n[None, :])
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
