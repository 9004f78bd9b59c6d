"""Dual-cone methods: UPGrad and DualProj (Quinton & Rey 2024, TorchJD): the
projections of weighted rows onto the dual cone ``{d : G d >= 0}``, by box
QPs in the dual."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtljax.gradients import algebra
from mtljax.gradients import solvers

def _dual_cone_weights(k, u, norm_eps, reg_eps, exact_up_to, iters, tol):
  """``w [..., T]`` with ``w G`` the projection of ``u G`` (``u [..., T]``) onto
  the dual cone ``{d : G d >= 0}``: by Proposition 1 of Quinton & Rey (2024),
  ``w = argmin_{v >= u} v^T K v`` -- on TorchJD's regularised Gram
  ``K' = K / tr K + reg_eps I`` (``K' = reg_eps I`` when ``tr K < norm_eps``).

  Solved in cosine coordinates ``x = n v / sqrt(tr K)``: ``v^T K' v = x^T A x``
  with ``A = C + reg_eps tr K diag(n)^{-2}`` and ``x >= n u / sqrt(tr K)``;
  exactly (:func:`box_qp_exact`) for ``T <= exact_up_to``, else
  :func:`box_qp_iterative`. Zero gradients keep ``v_i = u_i``.
  Returns ``(w, converged)``."""
  t = k.shape[0]
  tr = jnp.trace(k)
  c, n = algebra.cosine_gram(k)
  pos = n > jnp.sqrt(jnp.maximum(tr, 0.0)) * 1e-15
  n_safe = jnp.where(pos, n, 1.0)
  rt = jnp.sqrt(jnp.maximum(tr, jnp.finfo(tr.dtype).tiny))
  a = jnp.where(pos[:, None] & pos[None, :], c, jnp.eye(t, dtype=k.dtype))
  a = a + jnp.diag(jnp.where(pos, reg_eps * tr / (n_safe * n_safe), 0.0))

  def one(ui):
    lo = jnp.where(pos, n * ui / rt, 0.0)
    if t <= exact_up_to:
      x, ok = solvers.box_qp_exact(a, lo, tol)
    else:
      x, ok = solvers.box_qp_iterative(a, lo, iters, tol)
    v = jnp.where(pos, rt * x / n_safe, ui)
    small = tr < norm_eps
    return jnp.where(small, ui, v), ok | small

  flat = u.reshape(-1, t)
  w, ok = jax.vmap(one)(flat)
  return w.reshape(u.shape), jnp.all(ok)


def _check_dual_cone_args(name, norm_eps, reg_eps, exact_up_to, tol):
  if not (norm_eps >= 0 and reg_eps >= 0):
    raise ValueError(f"{name}: norm_eps and reg_eps must be >= 0, got "
                     f"{norm_eps}, {reg_eps}.")
  if not 0 <= exact_up_to <= 12:
    raise ValueError(f"{name}.exact_up_to must be in [0, 12] (the exact "
                     f"solver builds 2^T systems), got {exact_up_to}.")
  if not tol > 0:
    raise ValueError(f"{name}.tol must be > 0, got {tol}.")


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
