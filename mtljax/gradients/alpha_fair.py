"""Alpha-fair methods: Nash-MTL (Navon et al. 2022, alpha = 1) and FairGrad
(Ban & Ji 2024): ``(K w)_i = w_i^{-1/alpha}`` by damped Newton."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtljax.gradients import algebra

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
  floor = jnp.where(last_step < 1e-2,
                    jnp.minimum(algebra.rounding_level(kn, a) * a ** p, 100.0 * tol), 0.0)
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
    raise ValueError(f"fairgrad.alpha must be > 0, got {alpha}.")
  w, info = _alpha_fair_solve(k, float(alpha), iters, tol)
  return k.shape[0] * w, {**info, "w": w}
