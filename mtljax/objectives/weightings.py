"""Loss weightings and scalarisations: the shared gradient is the pullback of
``d objective / d L`` (one backward). Equal/fixed weights, RLW, DWA,
uncertainty, min-max, FAMO, and the scalarisations GLS and STCH (with their
arithmetic)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from mtljax import jacobians
from mtljax.objectives.base import Inputs, Objective, Result, check_hparam, keep_state, no_state


# Family 1: loss weightings (the gradient is the pullback of d objective / d L).


def loss_weighting(name: str, scalarize: Callable, *, init_state: Callable = no_state,
                   init_params: Callable = no_state, after_update: Callable = keep_state,
                   needs_new_losses: bool = False, max_shared_grad_norm: float = 0.0,
                   hparams: dict | None = None, log_lambda: bool = True) -> Objective:
  """An :class:`Objective` from ``scalarize(losses [K], inputs) -> (value,
  lambda [T])``, differentiable in the losses and in ``inputs.params``."""

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    def value(losses, own):
      return scalarize(losses, inp._replace(params=own))
    (total, lam), (c, g_own) = jax.value_and_grad(value, argnums=(0, 1), has_aux=True)(
        lin.losses, inp.params)
    grads = lin.pullback(c)
    if g_own:
      grads = {"shared": grads["shared"], "tasks": {**grads["tasks"], name: g_own}}
    if max_shared_grad_norm > 0:
      shared, _ = optax.clip_by_global_norm(max_shared_grad_norm).update(
          grads["shared"], optax.EmptyState())
      grads = {"shared": shared, "tasks": grads["tasks"]}
    meas = {"objective_lambda_sum": lam} if log_lambda else {}
    return Result(total, grads, inp.state, meas)

  return Objective(name, "sum", grads_fn, init_state, init_params, after_update,
                   needs_new_losses, None, dict(hparams or {}))


def weighted_sum(losses: jax.Array, task_ids: jax.Array, weights: jax.Array) -> jax.Array:
  """``sum_k weights[task_ids[k]] * losses[k]`` for ``losses [K]``."""
  return jnp.sum(weights[task_ids] * losses)


def fixed(num_tasks: int) -> Objective:
  """Equal (or fixed, ``weights``) weighting."""
  return loss_weighting("fixed", lambda l, inp: (weighted_sum(l, inp.task_ids, inp.weights),
                                                 jnp.ones((num_tasks,))), log_lambda=False)


def rlw_weights(rng: jax.Array, num_tasks: int) -> jax.Array:
  """``softmax(z)``, ``z ~ N(0, I_T)``."""
  return jax.nn.softmax(jax.random.normal(rng, (num_tasks,), jnp.float32))


def rlw(num_tasks: int) -> Objective:
  """Random loss weighting (Lin et al. 2022)."""
  def scalarize(l, inp):
    lam = rlw_weights(inp.rng, num_tasks)
    return jnp.sum((inp.weights * lam)[inp.task_ids] * l), lam
  return loss_weighting("rlw", scalarize)


def min_max(num_tasks: int) -> Objective:
  """The worst sampled task's weighted loss."""
  def scalarize(l, inp):
    wl = inp.weights[inp.task_ids] * l
    worst = jnp.argmax(wl)
    return wl[worst], jnp.zeros((num_tasks,)).at[inp.task_ids[worst]].set(1.0)
  return loss_weighting("min_max", scalarize)


def uncertainty(num_tasks: int) -> Objective:
  """Uncertainty weighting (Kendall et al. 2018) with ``s = log sigma^2`` per task."""
  def scalarize(l, inp):
    s = inp.params["log_var"]
    return (jnp.sum(inp.weights[inp.task_ids] * (l * 0.5 * jnp.exp(-s[inp.task_ids])
                                                 + 0.5 * s[inp.task_ids])),
            0.5 * jnp.exp(-s))
  return loss_weighting("uncertainty", scalarize,
                        init_params=lambda: {"log_var": jnp.zeros((num_tasks,), jnp.float32)})


def dwa_weights(prev: jax.Array, prev2: jax.Array, windows_done: jax.Array,
                temperature: float) -> jax.Array:
  """``T softmax((prev / prev2) / tau)``, or ones before two full windows.

  With task sampling a task may have no loss yet in the window two back
  (``prev2 == 0``: losses are positive); its ratio is then 1 (neutral), not 0.
  """
  num_tasks = prev.shape[0]
  ratio = jnp.where(prev2 > 0, prev / jnp.where(prev2 > 0, prev2, 1.0), 1.0)
  lam = num_tasks * jax.nn.softmax(ratio / temperature)
  return jnp.where(windows_done >= 2, lam, jnp.ones_like(lam))


def dwa(num_tasks: int, *, temperature: float = 2.0, window_steps: int = 100) -> Objective:
  """Dynamic weight average (Liu et al. 2019) over windows of ``window_steps``."""
  if not temperature > 0 or window_steps < 1:
    raise ValueError(f"dwa.temperature must be > 0 and dwa.window_steps >= 1, got "
                     f"{temperature}, {window_steps}.")

  def init():  # distinct buffers, so the state can be donated
    z = lambda: jnp.zeros((num_tasks,), jnp.float32)
    return {"sum": z(), "count": z(), "prev": z(), "prev2": z(),
            "steps": jnp.zeros((), jnp.int32), "windows": jnp.zeros((), jnp.int32)}

  def scalarize(l, inp):
    st = inp.state
    lam = dwa_weights(st["prev"], st["prev2"], st["windows"], temperature)
    return jnp.sum((inp.weights * lam)[inp.task_ids] * l), lam

  def update(st, l, ids, new_losses=None):
    del new_losses
    # A slot whose loss is exactly 0 has no labelled example (tasks.masked_mean;
    # losses are positive otherwise): it is not part of its task's window mean.
    present = (l > 0).astype(l.dtype)
    total = st["sum"] + jax.ops.segment_sum(jax.lax.stop_gradient(l), ids, num_tasks)
    count = st["count"] + jax.ops.segment_sum(present, ids, num_tasks)
    steps = st["steps"] + 1
    done = steps % window_steps == 0
    mean = jnp.where(count > 0, total / jnp.maximum(count, 1.0), st["prev"])
    z = jnp.zeros_like(total)
    return {"sum": jnp.where(done, z, total), "count": jnp.where(done, z, count),
            "prev": jnp.where(done, mean, st["prev"]),
            "prev2": jnp.where(done, st["prev"], st["prev2"]),
            "steps": steps, "windows": st["windows"] + done.astype(jnp.int32)}
  return loss_weighting("dwa", scalarize, init_state=init, after_update=update,
                        hparams={"temperature": temperature, "window_steps": window_steps})


def famo_weights_optimizer(w_lr: float, gamma: float) -> optax.GradientTransformation:
  """torch ``Adam(lr, weight_decay=gamma)``: L2 decay added to the gradient."""
  return optax.chain(optax.add_decayed_weights(gamma), optax.adam(w_lr))


def famo_logit_gradient(xi: jax.Array, delta: jax.Array) -> jax.Array:
  """``J_softmax(xi)^T delta``."""
  z = jax.nn.softmax(xi)
  return z * (delta - z @ delta)


def famo(num_tasks: int, *, w_lr: float = 0.025, gamma: float = 0.01, max_norm: float = 1.0,
         min_losses: tuple = ()) -> Objective:
  """FAMO (Liu et al. 2023); ``min_losses``: per-task loss lower bounds (default 0)."""
  if not w_lr > 0 or gamma < 0 or max_norm < 0:
    raise ValueError(f"famo: w_lr must be > 0, gamma >= 0 and "
                     f"max_norm >= 0 (0 = no clipping), got {w_lr}, {gamma}, {max_norm}.")
  if min_losses and len(min_losses) != num_tasks:
    raise ValueError(f"famo.min_losses has {len(min_losses)} values for "
                     f"{num_tasks} tasks.")
  floor = (jnp.asarray(min_losses, jnp.float32) if min_losses
           else jnp.zeros((num_tasks,), jnp.float32))
  tx_w = famo_weights_optimizer(w_lr, gamma)

  def init():
    xi = jnp.zeros((num_tasks,), jnp.float32)
    return {"xi": xi, "opt": tx_w.init(xi)}

  def scalarize(l, inp):
    ids = inp.task_ids
    z = jax.nn.softmax(inp.state["xi"])[ids] * inp.weights[ids]
    d = l - floor[ids] + 1e-8
    c = jax.lax.stop_gradient(jnp.sum(z / d))
    return jnp.sum(jnp.log(d) * z / c), jax.nn.softmax(inp.state["xi"])

  def update(st, l, ids, new_losses):
    delta_k = jnp.log(l - floor[ids] + 1e-8) - jnp.log(new_losses - floor[ids] + 1e-8)
    delta = jax.ops.segment_sum(jax.lax.stop_gradient(delta_k), ids, num_tasks)
    upd, opt = tx_w.update(famo_logit_gradient(st["xi"], delta), st["opt"], st["xi"])
    return {"xi": optax.apply_updates(st["xi"], upd), "opt": opt}
  return loss_weighting("famo", scalarize, init_state=init, after_update=update,
                        needs_new_losses=True, max_shared_grad_norm=max_norm,
                        hparams={"w_lr": w_lr, "gamma": gamma, "max_norm": max_norm})


# Scalarisations of the losses: STCH (Lin et al. 2024) and GLS (Chennupati 2019).


def stch_terms(losses: jax.Array, nadir: jax.Array, weights: jax.Array) -> jax.Array:
  """``w_k log(L_k / z_k)``, ``-inf`` for a slot of weight 0 (it does not compete)."""
  live = weights > 0
  return jnp.where(live, weights * jnp.log(jnp.where(live, losses, nadir) / nadir + 1e-20),
                   -jnp.inf)


def stch_softmax(x: jax.Array, mu: float) -> jax.Array:
  """``softmax(x / mu)`` over the finite terms of :func:`stch_terms` (0 for a
  slot of weight 0; all 0 when every slot has weight 0)."""
  live = jnp.isfinite(x)
  p = jax.nn.softmax(jnp.where(jnp.any(live), x, 0.0) / mu)
  return jnp.where(live, p, 0.0)


def live_count(weights: jax.Array) -> jax.Array:
  """The number of slots of weight > 0 (at least 1): the ``K`` of GLS's and
  STCH's normalisations, so that a slot of weight 0 (unlabelled, or a task
  not trained) changes neither."""
  return jnp.maximum(jnp.sum(weights > 0), 1).astype(weights.dtype)


def stch_value(losses: jax.Array, nadir: jax.Array, weights: jax.Array, *,
               mu: float) -> jax.Array:
  """``K (mu logsumexp_k(w_k log(L_k / z_k) / mu) + c)`` over the ``K`` slots
  of weight > 0 (0 when there is none), ``c = stop_gradient(max_k w_k
  log(L_k / z_k))``: the authors' MTL code's value (log losses, nadir ``z``
  from the warm-up; ``K`` their ``task_num``) plus ``K c``, their max-shift
  added back, so the value is the smooth Tchebycheff function itself
  (``-> K max_k`` as ``mu -> 0``); the gradient is theirs exactly."""
  x = stch_terms(losses, nadir, weights)
  live = weights > 0
  any_live = jnp.any(live)
  top = jax.lax.stop_gradient(jnp.where(any_live, jnp.max(x), 0.0))
  s = jnp.sum(jnp.where(live, jnp.exp((jnp.where(live, x, top) - top) / mu), 0.0))
  value = mu * jnp.log(jnp.where(any_live, s, 1.0)) + top
  return jnp.where(any_live, live_count(weights) * value, 0.0)


def gls_value(losses: jax.Array, weights: jax.Array) -> jax.Array:
  """``prod_k L_k^(w_k / K)`` over the ``K`` slots of weight > 0 (the
  geometric mean of their losses for unit weights; 1 if there is none), in
  logs."""
  logs = jnp.log(jnp.where(weights > 0, losses, 1.0))
  return jnp.exp(jnp.sum(weights * logs) / live_count(weights))


def gls(num_tasks: int) -> Objective:
  """Geometric loss strategy (Chennupati et al. 2019): ``prod_k L_k^(w_k / K)``
  over the K sampled slots of weight > 0 (the geometric mean of the sampled,
  labelled tasks' losses for unit weights; LibMTL's ``prod(L)^(1/T)`` when
  every task is sampled); its gradient is ``(G / K) sum_k w_k grad L_k / L_k``."""
  def scalarize(l, inp):
    w = inp.weights[inp.task_ids]
    value = gls_value(l, w)
    lam = jax.ops.segment_sum(   # d value / d L_k; 0 for a slot of weight 0 (maybe L = 0)
        jax.lax.stop_gradient(value) * w / (live_count(w) * jnp.where(w > 0, l, 1.0)),
        inp.task_ids, num_tasks)
    return value, lam
  return loss_weighting("gls", scalarize)


def stch(num_tasks: int, *, mu: float = 1.0, warmup_steps: int = 400,
         nadir_steps: int = 100) -> Objective:
  """Smooth Tchebycheff scalarisation (Lin et al. 2024, the authors' STCH_MTL
  code): for ``warmup_steps`` steps the objective is ``sum_k w_k log L_k``;
  over the next ``nadir_steps`` steps (the authors: 4 warm-up epochs, then one
  epoch averaged; here one "epoch" = 100 steps) each task's mean loss over its
  slots of weight > 0 is the nadir ``z_t`` (a task without one keeps
  collecting until it has one); once every task of weight > 0 has a nadir,
  ``K mu logsumexp_k(w_k log(L_k / z_t) / mu)`` over the K slots of weight > 0
  (0 if there is none; :func:`mtljax.stch_value`: the authors'
  value plus ``K max_k w_k log(L_k / z_t)``, their max-shift added back, so
  it ``-> K max_k`` as ``mu -> 0``; the gradient is theirs).
  The nadir statistics are updated in the step (state ``loss_sum``, ``count``
  per task, ``steps``)."""
  check_hparam("stch", mu > 0 and warmup_steps >= 0 and nadir_steps >= 1,
         f"mu must be > 0, warmup_steps >= 0 and nadir_steps >= 1, got {mu}, "
         f"{warmup_steps}, {nadir_steps}")

  def init():
    return {"loss_sum": jnp.zeros((num_tasks,), jnp.float32),
            "count": jnp.zeros((num_tasks,), jnp.float32), "steps": jnp.zeros((), jnp.int32)}

  def scalarize(l, inp):
    st, ids, w = inp.state, inp.task_ids, inp.weights[inp.task_ids]
    has = st["count"] > 0
    ready = (st["steps"] >= warmup_steps + nadir_steps) & jnp.all(has | (inp.weights <= 0))
    nadir = jnp.where(has, st["loss_sum"] / jnp.maximum(st["count"], 1.0), 1.0)[ids]

    def smooth(l):
      x = jax.lax.stop_gradient(stch_terms(l, nadir, w))
      return (stch_value(l, nadir, w, mu=mu),
              live_count(w) * stch_softmax(x, mu))

    def logs(l):
      return jnp.sum(w * jnp.log(jnp.where(w > 0, l, 1.0) + 1e-20)), (w > 0).astype(l.dtype)

    value, lam = jax.lax.cond(ready, smooth, logs, l)
    return value, jax.ops.segment_sum(lam, ids, num_tasks)

  def update(st, l, ids, w):
    steps = st["steps"]
    collect = (steps >= warmup_steps) & ((steps < warmup_steps + nadir_steps)
                                         | (st["count"] == 0))
    live = (w > 0).astype(l.dtype)                     # weight 0: unlabelled or not trained
    seen = jax.ops.segment_sum(live, ids, num_tasks)
    total = jax.ops.segment_sum(live * jax.lax.stop_gradient(l), ids, num_tasks)
    return {"loss_sum": jnp.where(collect, st["loss_sum"] + total, st["loss_sum"]),
            "count": jnp.where(collect, st["count"] + seen, st["count"]),
            "steps": steps + 1}

  base = loss_weighting("stch", scalarize, init_state=init,
                        hparams={"mu": mu, "warmup_steps": warmup_steps,
                                 "nadir_steps": nadir_steps})

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    res = base.gradients(lin, inp)
    return res._replace(state=update(inp.state, lin.losses, inp.task_ids,
                                     inp.weights[inp.task_ids]))

  return dataclasses.replace(base, gradients=grads_fn)
