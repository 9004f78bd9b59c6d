"""GradNorm (Chen et al. 2018, Algorithm 1): task weights learned from the
per-task gradient norms of one shared layer."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from mtljax import jacobians
from mtljax import params as params_lib
from mtljax.objectives.base import Inputs, Objective, Result


# Family 3: GradNorm (weights from per-task gradient norms of one shared layer).


def gradnorm_init(num_tasks: int, w_lr: float) -> dict:
  """GradNorm's state: task weights ``w [T]`` (init 1), one Adam state per task
  (so a task's bias correction counts its own updates, as for the heads), each
  task's first loss and whether it was seen."""
  w = jnp.ones((num_tasks,), jnp.float32)
  return {"w": w, "opt": jax.vmap(optax.adam(w_lr).init)(w),
          "initial_loss": jnp.zeros((num_tasks,), jnp.float32),
          "seen": jnp.zeros((num_tasks,), bool)}


def gradnorm_update(state: dict, norms: jax.Array, losses: jax.Array, task_ids: jax.Array,
                    *, alpha: float, w_lr: float) -> tuple[dict, jax.Array]:
  """One GradNorm weight update from the slots' ``||grad_W w L_k||`` and losses.

  Only sampled tasks' weights (and Adam states) move; then ``w`` is
  renormalised to sum to T. A slot whose loss is exactly 0 has no labelled
  example (:func:`mtljax.tasks.masked_mean`; losses are positive otherwise)
  and is left out: it neither sets its task's first loss nor enters the means
  nor moves its weight. Returns ``(new_state, L_grad)``.
  """
  num_tasks = state["w"].shape[0]
  present = losses > 0
  pf = present.astype(losses.dtype)

  def mean(v):                                               # over present slots
    return jnp.sum(v * pf) / jnp.maximum(jnp.sum(pf), 1.0)
  first = ~state["seen"][task_ids] & present
  l0 = state["initial_loss"].at[task_ids].set(
      jnp.where(first, losses, state["initial_loss"][task_ids]).astype(
          state["initial_loss"].dtype))
  seen = state["seen"].at[task_ids].max(present)
  ratio = jnp.where(present, losses / jnp.maximum(l0[task_ids], 1e-12), 0.0)  # Ltilde
  r = ratio / jnp.maximum(mean(ratio), 1e-12)

  def l_grad(w):
    g = w[task_ids] * norms                                  # G_i per slot
    target = jax.lax.stop_gradient(mean(g) * r ** alpha)
    return jnp.sum(jnp.abs(g - target) * pf)

  value, grad_w = jax.value_and_grad(l_grad)(state["w"])
  upd, opt = jax.vmap(optax.adam(w_lr).update)(grad_w, state["opt"], state["w"])
  active = jnp.zeros((num_tasks,), bool).at[task_ids].max(present)
  w = jnp.where(active, optax.apply_updates(state["w"], upd), state["w"])
  opt = jax.tree.map(lambda new, old: jnp.where(
      active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old), opt, state["opt"])
  w = num_tasks * w / jnp.sum(w)                               # renormalise: sum = T
  return {"w": w, "opt": opt, "initial_loss": l0, "seen": seen}, value


def _natural(name: str) -> list:
  """Sort key reading the digits in a path as numbers (``layer_10`` > ``layer_9``)."""
  return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def gradnorm(num_tasks: int, *, alpha: float = 1.5, w_lr: float = 0.025,
             layer: str = r"(trunk|experts)/(level_\d+/)?layer_\d+/kernel$") -> Objective:
  """GradNorm (Chen et al. 2018, Algorithm 1) on the last shared leaf matching
  ``layer`` (a regex over paths relative to ``shared/``)."""
  if not w_lr > 0 or alpha < 0:
    raise ValueError(f"gradnorm: w_lr must be > 0 and alpha >= 0, got "
                     f"{w_lr}, {alpha}.")
  try:
    rx = re.compile(layer)
  except re.error as e:
    raise ValueError(f"gradnorm.layer={layer!r}: {e}.") from None

  def pick(names):
    found = sorted((n for n in names if rx.search(n)), key=_natural)
    if not found:
      raise ValueError(f"gradnorm.layer={layer!r} matches no shared "
                       f"parameter; shared parameters are {list(names)}.")
    return found[-1:]  # the last shared layer matching (layer_10 after layer_9)

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    ids, w = inp.task_ids, inp.weights[inp.task_ids]
    g, _ = lin.slot_grads(w)                           # rows w_k grad L_k (some leaves)
    named = dict(params_lib.flatten_with_names(g))
    g_layer = named[pick(list(named))[0]]              # [K, ...] on W
    norms = jnp.sqrt(jnp.sum(jnp.square(g_layer.reshape(g_layer.shape[0], -1)), axis=1))
    w_gn = inp.state["w"]
    grads = lin.pullback(w * w_gn[ids])
    new_state, l_grad = gradnorm_update(inp.state, norms, jax.lax.stop_gradient(lin.losses),
                                        ids, alpha=alpha, w_lr=w_lr)
    return Result(jnp.sum(w * w_gn[ids] * lin.losses), grads, new_state,
                  {"objective_lambda_sum": w_gn, "gradnorm_loss": l_grad})

  return Objective("gradnorm", "slots", grads_fn,
                   init_state=lambda: gradnorm_init(num_tasks, w_lr), slot_leaves=pick,
                   hparams={"alpha": alpha, "w_lr": w_lr, "layer": layer})
