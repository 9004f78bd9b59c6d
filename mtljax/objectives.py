"""Multi-task objectives: how per-task losses and gradients become one update.

The lecture's objective is ``sum_i w_i L_i(theta, D_i)``; in a step it is taken
over the K sampled task slots: ``sum_k w[task_ids[k]] * L_k`` -- a *sum*, not a
mean, so a task's gradient is exactly its own weighted gradient (a single-task
run of the same task sees the same gradient).

Methods (``config.objective.method``):

* ``fixed``: the weighted sum with fixed weights ``config.objective.weights``
  (a mapping task name -> weight; unnamed tasks weigh 1); one backward pass.
* gradient combination, :data:`mtljax.gradients.GRADIENT_METHODS`
  (``mgda``, ``pcgrad``, ``cagrad``, ``imtl_g``, ``nash_mtl``,
  ``aligned_mtl``): the per-slot gradients of the *shared* parameters,
  ``G [K, ...]`` (row k is the gradient of ``w[task_ids[k]] L_k``), come from one
  vmapped VJP; the method turns them into one direction (see
  :mod:`mtljax.gradients` for each method's scaling). Task-specific parameters
  get their own plain gradients (of the weighted sum).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from mtljax import gradients

METHODS = ("fixed",) + gradients.GRADIENT_METHODS


def check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(f"config.objective.method={method!r} is not one of {METHODS}.")


def weighted_sum(losses: jax.Array, task_ids: jax.Array, weights: jax.Array) -> jax.Array:
  """``sum_k weights[task_ids[k]] * losses[k]`` for ``losses [K]``."""
  return jnp.sum(weights[task_ids] * losses)


def make_combiner(method: str, *, cagrad_c: float = 0.5, cagrad_rescale: int = 1,
                  solver_iters: int = 300) -> Callable:
  """``combine(G, rng) -> (d, beta [K], info)`` for a gradient method."""
  check_method(method)
  if method == "fixed":
    raise ValueError("make_combiner: 'fixed' needs no per-task gradients.")
  if method == "cagrad" and not 0.0 <= cagrad_c < 1.0:
    raise ValueError(f"config.objective.cagrad_c must be in [0, 1), got {cagrad_c}.")
  table = {
      "mgda": lambda g, r: gradients.mgda(g, iters=solver_iters),
      "pcgrad": lambda g, r: gradients.pcgrad(g, r),
      "cagrad": lambda g, r: gradients.cagrad(g, c=cagrad_c, rescale=cagrad_rescale,
                                              iters=solver_iters),
      "imtl_g": lambda g, r: gradients.imtl_g(g),
      "nash_mtl": lambda g, r: gradients.nash_mtl(g),
      "aligned_mtl": lambda g, r: gradients.aligned_mtl(g),
  }
  return table[method]
