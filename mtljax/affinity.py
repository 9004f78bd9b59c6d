"""Task affinity by lookahead (TAG, Fifty et al. 2021), as the train step
measures it: pure JAX, no config, no I/O.

For the slots of one step, ``Z_{i->j} = 1 - L_j(theta^sh - eta g_i) /
L_j(theta^sh)``, with ``g_i`` slot i's gradient of the shared parameters and
``L_j`` slot j's loss on its own batch: how much a step on task i alone lowers
task j's loss. The step (``config.tag_lr > 0``,
:func:`mtljax.steps.tag_measurements`) sums it per task pair; the run's
summary averages the sums and groups the tasks (:func:`mtljax.measure.group_tasks`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def lookahead_affinity(loss_of_slots: Callable, shared, slot_grads, eta: float,
                       losses: jax.Array) -> jax.Array:
  """``Z [K, K]``, ``Z[i, j] = 1 - L_j(shared - eta g_i) / L_j(shared)``.

  ``loss_of_slots(shared) -> [K]`` evaluates every slot's loss on its batch
  with the given shared parameters; ``slot_grads`` has a leading slot axis;
  ``losses [K]`` are the losses at ``shared``.
  """
  def after(g_i):
    return loss_of_slots(jax.tree.map(lambda p, g: p - eta * g, shared, g_i))
  looked = jax.vmap(after)(slot_grads)                                   # [K, K]
  return 1.0 - looked / jnp.maximum(losses[None, :], 1e-12)
