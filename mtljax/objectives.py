"""Multi-task objectives: how per-task losses become one scalar to minimise.

The lecture's objective is ``sum_i w_i L_i(theta, D_i)``; in a step it is taken
over the K sampled task slots: ``sum_k w[task_ids[k]] * L_k`` -- a *sum*, not a
mean, so a task's gradient is exactly its own weighted gradient (a single-task
run of the same task sees the same gradient).

Methods (``config.objective.method``):

* ``fixed``: the weighted sum with fixed weights ``config.objective.weights``
  (a mapping task name -> weight; unnamed tasks weigh 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

METHODS = ("fixed",)


def check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(f"config.objective.method={method!r} is not one of {METHODS}.")


def weighted_sum(losses: jax.Array, task_ids: jax.Array, weights: jax.Array) -> jax.Array:
  """``sum_k weights[task_ids[k]] * losses[k]`` for ``losses [K]``."""
  return jnp.sum(weights[task_ids] * losses)
