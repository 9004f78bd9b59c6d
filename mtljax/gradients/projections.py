"""Projection methods: PCGrad (Yu et al. 2020), from the Gram matrix alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
