"""Gradient combination in the train step: a :class:`~mtljax.gradients.GramMethod`
applied to the per-slot gradients of the shared parameters (or, for MGDA-UB,
of the shared representation), on the ``jacobian`` or ``accumulate`` path."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from mtljax import gradients
from mtljax import jacobians
from mtljax.objectives.base import Inputs, Objective, Result


GRAM_PATHS = ("jacobian", "accumulate")


# Family 2: gradient combination from the Gram matrix of per-slot gradients.


def gram_measurements(k: jax.Array, beta: jax.Array, info: dict, task_ids: jax.Array,
                      num_tasks: int) -> dict:
  """Per-task gradient norms and method weights, task-pair cosine sums and
  counts, and solver failures, placed by task id."""
  norms = jnp.sqrt(jnp.maximum(jnp.diag(k), 0.0))
  cos = k / jnp.maximum(norms[:, None] * norms[None, :], 1e-30)
  pair = (task_ids[:, None], task_ids[None, :])
  return {
      "grad_norm_sum": jax.ops.segment_sum(norms, task_ids, num_tasks),
      "grad_weight_sum": jax.ops.segment_sum(beta, task_ids, num_tasks),
      "grad_cos_sum": jnp.zeros((num_tasks, num_tasks)).at[pair].add(cos),
      "grad_pair_count": jnp.zeros((num_tasks, num_tasks)).at[pair].add(1.0),
      "solver_failures": (1.0 - info["converged"].astype(jnp.float32)
                          if "converged" in info else jnp.zeros(())),
  }


def without_absent_slots(weights: Callable) -> Callable:
  """``weights(K, rng)`` of a min-norm method (MGDA) solved on the *present*
  slots only, ``present [K]`` = fixed weight > 0 (a slot with no labelled
  example gets weight 0 for its step, as does a task of config weight 0).

  An absent slot's row is zero, so the min-norm point of the hull would be 0
  and the shared parameters would not move. Giving the absent slots a large
  diagonal ``M`` (orthogonal to everything) makes the minimiser
  ``((1 - t) b, t)`` with ``b`` exactly the min-norm point of the present rows
  and ``t = |b|^2 / (|b|^2 + M)``; the absent weights are then set to 0 and the
  present ones rescaled by ``1 / (1 - t)``: MGDA on the present slots.
  """
  def fn(k, rng, present, factor=None):  # min-norm methods read K only
    big = 1e6 * jnp.maximum(jnp.max(jnp.diag(k)), 1e-30)
    beta, info = weights(k + jnp.diag(jnp.where(present, 0.0, big)), rng)
    kept = jnp.where(present, beta, 0.0)
    total = jnp.sum(kept)
    scale = jnp.where((total > 0) & jnp.any(present), jnp.sum(beta) / jnp.maximum(total, 1e-30),
                      1.0)
    return kept * scale, info
  return fn


def gram_combiner(method: gradients.GramMethod, num_tasks: int, *,
                  gram_path: str = "jacobian", **hp) -> Objective:
  """The objective of a gradient method (:class:`mtljax.gradients.GramMethod`)
  with hyper-parameters ``hp``: its weights from the Gram matrix of the
  per-slot gradients (rows ``w_k grad L_k``), on ``gram_path``."""
  if not isinstance(method, gradients.GramMethod):
    raise TypeError(f"gram_combiner: expected a gradients.GramMethod, got "
                    f"{type(method).__name__}.")
  if gram_path not in GRAM_PATHS:
    raise ValueError(f"gram_path={gram_path!r} is not one of {GRAM_PATHS}.")
  bound = method.bind(**hp)
  if method.min_norm:
    present_weights = without_absent_slots(bound)
  else:  # a method that takes the mask leaves the absent slots out itself (Krum)
    present_weights = lambda k, rng, present, factor=None: bound(k, rng, factor, present)  # noqa: E731

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    w = inp.weights[inp.task_ids]
    weights = functools.partial(present_weights, present=w > 0)
    if gram_path == "jacobian":
      g, g_tasks = lin.slot_grads(w)                # rows w_k grad L_k: [K, ...]
      k = gradients.gram(g)
      # The spectral methods decompose the rows' factor, not K (cond sqrt(K)'s).
      factor = gradients.cosine_factor(g) if method.takes_factor else None
      beta, info = weights(k, inp.rng, factor=factor)
      shared = gradients.combine(beta, g)
    else:  # G G^T without holding G, then one more backward for the direction
      k, g_tasks = lin.slot_gram(w)
      beta, info = weights(k, inp.rng)
      shared = lin.pullback(beta * w)["shared"]
    return Result(jnp.sum(w * lin.losses), {"shared": shared, "tasks": g_tasks}, inp.state,
                  gram_measurements(k, beta, info, inp.task_ids, num_tasks))

  return Objective(method.name, "slots", grads_fn, hparams={**hp, "gram_path": gram_path},
                   min_slots=method.rows_needed(hp))


def mgda_ub(num_tasks: int, **hp) -> Objective:
  """MGDA-UB: MGDA on the per-slot gradients of the shared representation;
  ``hp`` are MGDA's hyper-parameters (``gradients.REGISTRY["mgda"].hparams``,
  defaults included)."""
  mgda = gradients.REGISTRY["mgda"]
  hp = {**mgda.hparams, **hp}
  weights = without_absent_slots(mgda.bind(**hp))

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    w = inp.weights[inp.task_ids]
    k, g_tasks = lin.rep_gram(w)                    # Gram of grad_Z (w_k L_k), [K, K]
    beta, info = weights(k, inp.rng, w > 0)
    # sum_k beta_k grad_Z (w_k L_k) back through the trunk: one backward of
    # sum_k beta_k w_k L_k through the one linearisation.
    shared = lin.pullback(beta * w)["shared"]
    return Result(jnp.sum(w * lin.losses), {"shared": shared, "tasks": g_tasks}, inp.state,
                  gram_measurements(k, beta, info, inp.task_ids, num_tasks))

  return Objective("mgda_ub", "representation", grads_fn, hparams=hp)
