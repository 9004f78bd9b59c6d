"""Training: the compiled multi-task step, per-task evaluation, and the loop.

One step (``make_train_step``), all inside one ``jax.jit``:

1. ``task_ids [K]`` ~ the task distribution (uniform by default);
2. ``B`` example indices per sampled task, drawn on the device from data that
   lives on the device; inputs ``[K, B, ...]``, labels ``{group: [K, B]}``;
3. the model on all K slots at once (vmapped), per-slot mean loss ``[K]``;
4. the objective ``sum_k w[task_ids[k]] L_k`` and one gradient;
5. the optimizer (:mod:`mtljax.optim`): shared parameters always move, per-task
   rows only for sampled tasks.

``steps_per_call`` steps run per host call under ``lax.scan``; randomness is
``fold_in(seed_key, step)``, so results do not depend on how steps are grouped
into calls (an interrupted and resumed run equals an uninterrupted one).

Only ``*_from_config`` functions and :func:`train_and_evaluate` read a
``ConfigDict``; everything else takes explicit arguments.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mtljax import checkpoint as ckpt_lib
from mtljax import gradients
from mtljax import measure
from mtljax import objectives
from mtljax import optim
from mtljax import params as params_lib
from mtljax import plotting
from mtljax import schedules
from mtljax import tasks as tasks_lib
from mtljax import transfer
from mtljax.data import loading
from mtljax.data import sampling
from mtljax.models import multitask

logger = logging.getLogger("mtljax")

# ----------------------------------------------------------------------------
# Config edges.
# ----------------------------------------------------------------------------


def _positive_int(config, path):
  value = config
  for part in path.split("."):
    value = value[part]
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"config.{path} must be a positive integer, got {value!r}.")
  return int(value)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every name and count that needs no data, before anything loads."""
  m = config.model
  if m.arch not in multitask.ARCHS:
    raise ValueError(f"config.model.arch={m.arch!r} is not one of {multitask.ARCHS}.")
  if m.encoder not in multitask.ENCODERS:
    raise ValueError(f"config.model.encoder={m.encoder!r} is not one of "
                     f"{multitask.ENCODERS}.")
  if m.heads not in multitask.HEADS:
    raise ValueError(f"config.model.heads={m.heads!r} is not one of {multitask.HEADS}.")
  s = config.sampling
  if s.task_sampler not in sampling.SAMPLERS:
    raise ValueError(f"config.sampling.task_sampler={s.task_sampler!r} is not one of "
                     f"{sampling.SAMPLERS}.")
  if s.tasks_per_step < 0:
    raise ValueError(f"config.sampling.tasks_per_step must be >= 0 (0 = all tasks), "
                     f"got {s.tasks_per_step}.")
  _positive_int(config, "sampling.examples_per_task")
  if config.optim.name not in optim.OPTIMIZERS:
    raise ValueError(f"config.optim.name={config.optim.name!r} is not one of "
                     f"{optim.OPTIMIZERS}.")
  if not config.optim.lr > 0:
    raise ValueError(f"config.optim.lr must be > 0, got {config.optim.lr}.")
  if config.optim.schedule not in schedules.SCHEDULES:
    raise ValueError(f"config.optim.schedule={config.optim.schedule!r} is not one of "
                     f"{schedules.SCHEDULES}.")
  optim.parse_rules(config.optim.rules)  # raises on bad syntax, regexes, settings
  if config.optim.layerwise_decay and not 0 < config.optim.layerwise_decay <= 1:
    raise ValueError(f"config.optim.layerwise_decay must be in (0, 1] (ULMFiT: 1/2.6), got "
                     f"{config.optim.layerwise_decay}.")
  if config.optim.frozen_depth < 0:
    raise ValueError(f"config.optim.frozen_depth must be >= 0, got {config.optim.frozen_depth}.")
  if config.optim.unfreeze_every < 0:
    raise ValueError(f"config.optim.unfreeze_every must be >= 0, got "
                     f"{config.optim.unfreeze_every}.")
  if config.tag_lr < 0 or config.tag_groups < 1:
    raise ValueError(f"config.tag_lr must be >= 0 and config.tag_groups >= 1, got "
                     f"{config.tag_lr}, {config.tag_groups}.")
  if config.l2sp_alpha < 0 or config.l2sp_beta < 0:
    raise ValueError("config.l2sp_alpha and config.l2sp_beta must be >= 0.")
  if config.init_from and not os.path.isdir(config.init_from):
    raise ValueError(f"config.init_from={config.init_from!r} is not a directory.")
  objectives.check_method(config.objective.method)
  if config.objective.gram_path not in objectives.GRAM_PATHS:
    raise ValueError(f"config.objective.gram_path={config.objective.gram_path!r} is not "
                     f"one of {objectives.GRAM_PATHS}.")
  for key in ("total_steps", "steps_per_call", "log_steps", "eval_steps",
              "checkpoint_steps", "eval_batch_size"):
    _positive_int(config, key)
  if not config.data.name:
    raise ValueError("config.data.name is empty.")


def data_from_config(config) -> loading.MultiTaskData:
  d = config.data
  return loading.load(
      d.name, data_dir=d.data_dir or None, builder_config=d.builder_config,
      task_names=tuple(d.tasks), max_train_examples=d.max_train_examples or None,
      input_key=d.get("input_key", "image"), label_keys=tuple(d.get("label_keys", ())),
      normalize_labels=d.get("normalize_labels", True))


def model_from_config(config, taskset, input_shape) -> multitask.Model:
  m = config.model
  return multitask.make_model(
      m.arch, taskset, input_shape, encoder=m.encoder, hidden=tuple(m.hidden),
      channels=tuple(m.channels), cond_layers=tuple(m.cond_layers), heads=m.heads,
      soft_lambda=m.soft_lambda, soft_norm=m.soft_norm, soft_layers=m.soft_layers,
      stitch_init=m.stitch_init, num_experts=m.num_experts, tower=tuple(m.tower))


def objective_kwargs_from_config(config) -> dict:
  o = config.objective
  return {"gram_path": o.gram_path, "cagrad_c": o.cagrad_c, "cagrad_rescale": o.cagrad_rescale,
          "solver_iters": o.solver_iters, "dwa_temperature": o.dwa_temperature,
          "dwa_window_steps": o.dwa_window_steps, "famo_w_lr": o.famo_w_lr,
          "famo_gamma": o.famo_gamma, "famo_max_norm": o.famo_max_norm,
          "gradnorm_alpha": o.gradnorm_alpha, "gradnorm_w_lr": o.gradnorm_w_lr,
          "gradnorm_layer": o.gradnorm_layer}


def rules_from_config(config, params) -> tuple:
  """``config.optim.rules`` followed by the generated layer-wise decay /
  gradual-unfreezing rules over the model's layer groups."""
  o = config.optim
  rules = optim.parse_rules(o.rules)
  groups = optim.layer_groups([n for n, _ in params_lib.flatten_with_names(params)])
  generated = ()
  if o.frozen_depth:
    rules = rules + optim.frozen_depth_rules(groups, o.frozen_depth)
  if o.layerwise_decay:
    generated = optim.layerwise_decay_rules(groups, o.layerwise_decay)
  if o.unfreeze_every:
    generated = optim.gradual_unfreezing_rules(groups, o.unfreeze_every, generated)
  if o.frozen_depth and not generated:  # the unfrozen groups train with the defaults
    generated = (optim.Rule(".*"),)
  return rules + generated


def optimizer_from_config(config, params=None):
  """The optimizer; a :class:`mtljax.optim.RuledOptimizer` when the config
  has parameter rules, layer-wise decay or gradual unfreezing (``params``, a
  parameter tree or its shapes, is then needed for the layer groups)."""
  o = config.optim
  kwargs = dict(b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                momentum=o.momentum)
  sched = dict(warmup_steps=o.warmup_steps, end_lr_factor=o.end_lr_factor,
               cut_frac=o.stlr_cut_frac, ratio=o.stlr_ratio)
  if o.rules or o.layerwise_decay or o.unfreeze_every or o.frozen_depth:
    if params is None:
      raise ValueError("optimizer_from_config: parameter rules need the parameter tree.")
    return optim.make_ruled_optimizer(
        o.name, rules_from_config(config, params), lr=o.lr, total_steps=config.total_steps,
        schedule=o.schedule, warmup_steps=o.warmup_steps, end_lr_factor=o.end_lr_factor,
        stlr_cut_frac=o.stlr_cut_frac, stlr_ratio=o.stlr_ratio, **kwargs)
  lr = schedules.make_schedule(o.schedule, o.lr, config.total_steps, **sched)
  return optim.make_optimizer(o.name, lr=lr if o.schedule != "constant" else o.lr, **kwargs)


# ----------------------------------------------------------------------------
# Losses, the train step and the eval step (explicit arguments only).
# ----------------------------------------------------------------------------


def slot_losses(model: multitask.Model, params, x, ys, task_ids) -> jax.Array:
  """``[K]`` mean loss of each slot's task on its ``[B]`` examples."""
  return output_losses(model.taskset, model.apply(params, x, task_ids), ys, task_ids)


def output_losses(ts: tasks_lib.TaskSet, outs, ys, task_ids) -> jax.Array:
  """``[K]`` mean loss of each slot from the model's outputs ``{group: [K, B, out]}``."""
  group_of = jnp.asarray(ts.group_of_task)[task_ids]
  losses = jnp.zeros(task_ids.shape, jnp.float32)
  for gi, g in enumerate(ts.groups):
    per_example = tasks_lib.example_loss(ts.group_task(g), outs[g], ys[g])  # [K, B]
    losses = losses + jnp.where(group_of == gi, per_example.mean(axis=1), 0.0)
  return losses


def task_rows(model: multitask.Model, objective: str = "fixed") -> dict:
  """The model's per-task stacks plus the objective's per-task parameters."""
  rows = dict(model.task_rows)
  if objective == "uncertainty":
    rows["uncertainty"] = np.arange(len(model.taskset), dtype=np.int32)
  return rows


def init_train_state(model: multitask.Model, tx, rng, objective: str = "fixed",
                     objective_kwargs: dict | None = None, anchor=None) -> dict:
  """``{"step", "params", "opt_state", "objective_state"}`` (plus ``"anchor"``,
  the parameters a penalty pulls toward, when given: see ``make_train_step``)."""
  params = model.init(rng)
  state = {"step": jnp.zeros((), jnp.int32)}
  if objective in ("fixed",) + objectives.LOSS_WEIGHTINGS:
    lw = objectives.make_loss_weighting(objective, len(model.taskset),
                                        **_lw_kwargs(objective_kwargs))
    extra = lw.init_params(len(model.taskset))
    if extra:
      params = {"shared": params["shared"], "tasks": {**params["tasks"], objective: extra}}
    state["objective_state"] = lw.init_state()
  elif objective == "gradnorm":
    state["objective_state"] = objectives.gradnorm_init(
        len(model.taskset), _gradnorm_kwargs(objective_kwargs)["w_lr"])
  else:
    state["objective_state"] = {}
  state["params"] = params
  state["opt_state"] = optim.init_state(tx, params, task_rows(model, objective))
  if anchor is not None:
    state["anchor"] = anchor
  return state


_LW_KEYS = ("dwa_temperature", "dwa_window_steps", "famo_w_lr", "famo_gamma",
            "famo_max_norm")


_OBJECTIVE_KWARGS = ("gram_path", "cagrad_c", "cagrad_rescale", "solver_iters", "gradnorm_alpha",
                     "gradnorm_w_lr", "gradnorm_layer") + _LW_KEYS


def _check_objective_kwargs(kwargs):
  unknown = sorted(set(kwargs or {}) - set(_OBJECTIVE_KWARGS))
  if unknown:
    raise ValueError(f"objective_kwargs: unknown key(s) {unknown}; known keys are "
                     f"{sorted(_OBJECTIVE_KWARGS)}.")


def _lw_kwargs(kwargs):
  _check_objective_kwargs(kwargs)
  kwargs = kwargs or {}
  return {k: kwargs[k] for k in _LW_KEYS if k in kwargs}


def _gradnorm_kwargs(kwargs):
  _check_objective_kwargs(kwargs)
  kwargs = kwargs or {}
  return {"alpha": kwargs.get("gradnorm_alpha", 1.5),
          "w_lr": kwargs.get("gradnorm_w_lr", 0.025),
          "layer": kwargs.get("gradnorm_layer", "") or r"trunk/layer_\d+/kernel$"}


def _combiner_kwargs(kwargs):
  _check_objective_kwargs(kwargs)
  kwargs = kwargs or {}
  return {k: kwargs[k] for k in ("cagrad_c", "cagrad_rescale", "solver_iters")
          if k in kwargs}


def make_train_step(model: multitask.Model, tx, *, task_probs: np.ndarray,
                    weights: np.ndarray, tasks_per_step: int, examples_per_task: int,
                    replace: bool = False, steps_per_call: int = 1, seed: int = 0,
                    objective: str = "fixed", objective_kwargs: dict | None = None,
                    shared_inputs: bool = False, penalty: Callable | None = None,
                    tag_lr: float = 0.0) -> Callable:
  """Returns ``train_step(state, data) -> (state, measurements)`` (not jitted).

  ``data`` is a train split as laid out by :mod:`mtljax.data.loading`.
  ``objective`` is a name from :data:`mtljax.objectives.METHODS` and
  ``objective_kwargs`` its hyper-parameters (:func:`objectives.make_combiner`;
  ``gram_path`` for gradient methods, see :mod:`mtljax.objectives`).
  ``shared_inputs``: every slot sees the same B examples (the tasks must share
  one input source, :func:`mtljax.data.sampling.check_shared_inputs`); MGDA-UB
  requires it.
  ``penalty(params, anchor) -> scalar`` (e.g. :func:`mtljax.transfer.l2sp_penalty`)
  is added to the objective and its gradient to every method's update; the
  state must then hold ``"anchor"`` (:func:`init_train_state`).
  ``tag_lr > 0`` adds TAG's lookahead task affinity (:mod:`mtljax.measure`):
  measurements ``tag_sum [T, T]`` / ``tag_count [T, T]`` (source task i, target j).

  Measurements (summed over the ``steps_per_call`` steps): ``loss``, and per
  task ``task_loss_sum [T]`` / ``task_count [T]`` over the slots it filled.
  Gradient methods (and ``mgda_ub``, whose gradients are those of the shared
  representation) add, per task, ``grad_norm_sum [T]`` and ``grad_weight_sum
  [T]`` (the method's beta), the task-pair cosine sums ``grad_cos_sum [T, T]``
  with counts ``grad_pair_count [T, T]``, and ``solver_failures`` (steps whose
  solver reported ``converged == False``).
  """
  ts = model.taskset
  num_tasks = len(ts)
  if not 1 <= tasks_per_step <= num_tasks and not replace:
    raise ValueError(f"config.sampling.tasks_per_step={tasks_per_step} must be in "
                     f"[1, {num_tasks}] when sampling tasks without replacement.")
  if tasks_per_step < 1:
    raise ValueError(f"config.sampling.tasks_per_step must be >= 1, got {tasks_per_step}.")
  probs = jnp.asarray(task_probs, jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  stream_ids = jnp.asarray(ts.stream_ids, jnp.int32)
  ts_arrays = {"local_index": jnp.asarray(ts.local_index)}
  base_key = jax.random.key(seed)
  objectives.check_method(objective)
  gram_path = (objective_kwargs or {}).get("gram_path", "jacobian")
  if gram_path not in objectives.GRAM_PATHS:
    raise ValueError(f"config.objective.gram_path={gram_path!r} is not one of "
                     f"{objectives.GRAM_PATHS}.")
  if gram_path != "jacobian" and objective not in gradients.GRADIENT_METHODS:
    raise ValueError(
        f"config.objective.gram_path={gram_path!r} applies to the gradient methods "
        f"{gradients.GRADIENT_METHODS}, whose per-task parameter gradients it accumulates; "
        f"method {objective!r} does not use it (mgda_ub never forms the parameter "
        "Jacobian). Leave gram_path='jacobian'.")
  if objective == "mgda_ub":
    if not shared_inputs:
      raise ValueError(
          "config.objective.method='mgda_ub' differentiates through one shared "
          "representation of one batch: set config.sampling.shared_inputs=True (the tasks "
          "must label the same inputs).")
    if not model.shared_representation:
      raise ValueError(
          f"config.objective.method='mgda_ub' needs a task-independent shared "
          f"representation followed by per-task heads (arch 'multi_head' with per-task "
          f"heads); arch {model.arch!r} does not have one.")
  combiner = lw = None
  if objective in objectives.GRADIENT_FUNCTIONS:
    combiner = objectives.make_gram_weights(objective, **_combiner_kwargs(objective_kwargs))
  elif objective == "gradnorm":
    gn = _gradnorm_kwargs(objective_kwargs)
  else:
    lw = objectives.make_loss_weighting(objective, num_tasks,
                                        **_lw_kwargs(objective_kwargs))
  rows = task_rows(model, objective)

  def weighted_grads(params, obj_state, x, ys, task_ids, rng):
    def loss_fn(params):
      losses = slot_losses(model, params, x, ys, task_ids)
      total, lam = lw.objective(losses, task_ids, weights, obj_state,
                                params["tasks"].get(objective, {}), rng)
      return total, (losses, lam)
    (total, (losses, lam)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if lw.max_shared_grad_norm > 0:
      grads = {"shared": optax.clip_by_global_norm(lw.max_shared_grad_norm).update(
          grads["shared"], optax.EmptyState())[0], "tasks": grads["tasks"]}
    extra = {} if objective == "fixed" else {"objective_lambda_sum": lam}
    return total, losses, grads, extra, obj_state

  def combined_grads(params, obj_state, x, ys, task_ids, rng):
    w = weights[task_ids]

    def one_slot(x_k, ys_k, t_k, w_k):
      def f(p):
        loss = slot_losses(model, p, x_k[None], jax.tree.map(lambda y: y[None], ys_k),
                           t_k[None])[0]
        return w_k * loss, loss
      (_, loss), g = jax.value_and_grad(f, has_aux=True)(params)
      return loss, g

    # vmap over slots of one slot's gradient: each backward touches only its own
    # B examples (O(K B) work, like one backward of the sum), unlike a vmapped
    # VJP of all slots' losses (O(K^2 B)).
    losses, jac = jax.vmap(one_slot)(x, ys, task_ids, w)
    k = gradients.gram(jac["shared"])  # once: for the method and the conflict logs
    beta, info = combiner(k, rng)
    grads = {"shared": gradients.combine(beta, jac["shared"]),
             "tasks": jax.tree.map(lambda j: j.sum(axis=0), jac["tasks"])}
    return jnp.sum(w * losses), losses, grads, _gram_extra(k, beta, info, task_ids), obj_state

  def accumulated_grads(params, obj_state, x, ys, task_ids, rng):
    w = weights[task_ids]

    def one_slot(x_k, ys_k, t_k, w_k):
      def f(shared):
        p = {"shared": shared, "tasks": params["tasks"]}
        return w_k * slot_losses(model, p, x_k[None], jax.tree.map(lambda y: y[None], ys_k),
                                 t_k[None])[0]
      return jax.grad(f)(params["shared"])

    # Pass 1: each parameter's [K, ...] slot gradients are reduced into the
    # Gram matrix as the backward produces them and are not used again, so the
    # compiler frees them layer by layer (tested on the compiled memory).
    k = gradients.gram(jax.vmap(one_slot)(x, ys, task_ids, w))
    beta, info = combiner(k, rng)
    # Pass 2: one forward, and two cotangents through it: beta * w for the
    # shared direction, w for the task-specific parameters' plain gradients.
    losses, vjp = jax.vjp(
        lambda sh, tp: slot_losses(model, {"shared": sh, "tasks": tp}, x, ys, task_ids),
        params["shared"], params["tasks"])
    g_shared, _ = vjp(beta * w)
    _, g_tasks = vjp(w)
    grads = {"shared": g_shared, "tasks": g_tasks}
    return jnp.sum(w * losses), losses, grads, _gram_extra(k, beta, info, task_ids), obj_state

  def representation_grads(params, obj_state, x, ys, task_ids, rng):
    w = weights[task_ids]
    # Every slot holds the same inputs: Z = f(x; theta^sh) once, [B, F].
    z, trunk_vjp = jax.vjp(
        lambda sh: model.features({"shared": sh, "tasks": params["tasks"]}, x[:1],
                                  task_ids[:1])[0], params["shared"])

    def head_loss(zs, tp):
      outs = model.heads({"shared": params["shared"], "tasks": tp}, zs, task_ids)
      losses = output_losses(ts, outs, ys, task_ids)
      return jnp.sum(w * losses), losses

    zs = jnp.broadcast_to(z, task_ids.shape + z.shape)
    # Slot k's loss reads only zs[k], so dz[k] = grad_Z (w_k L_k): [K, B, F].
    (total, losses), (dz, g_tasks) = jax.value_and_grad(
        head_loss, argnums=(0, 1), has_aux=True)(zs, params["tasks"])
    k = gradients.gram(dz)
    beta, info = combiner(k, rng)
    (g_shared,) = trunk_vjp(jnp.tensordot(beta, dz, axes=1))  # grad of sum beta w L
    grads = {"shared": g_shared, "tasks": g_tasks}
    return total, losses, grads, _gram_extra(k, beta, info, task_ids), obj_state

  def _gram_extra(k, beta, info, task_ids):
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

  def gradnorm_grads(params, obj_state, x, ys, task_ids, rng):
    del rng
    names = [n for n, _ in params_lib.flatten_with_names(params["shared"])
             if re.search(gn["layer"], n)]
    if not names:
      raise ValueError(
          f"config.objective.gradnorm_layer={gn['layer']!r} matches no shared "
          f"parameter; shared parameters are "
          f"{[n for n, _ in params_lib.flatten_with_names(params['shared'])]}.")
    layer = names[-1]  # the last shared layer matching
    w_layer = params_lib.get_path(params["shared"], layer)

    def slot_norm(x_k, ys_k, t_k):
      def f(wl):
        p = {"shared": params_lib.set_path(params["shared"], layer, wl),
             "tasks": params["tasks"]}
        return slot_losses(model, p, x_k[None], jax.tree.map(lambda y: y[None], ys_k),
                           t_k[None])[0]
      return jnp.linalg.norm(jax.grad(f)(w_layer).reshape(-1))

    norms = jax.vmap(slot_norm)(x, ys, task_ids) * weights[task_ids]
    w_gn = obj_state["w"]

    def loss_fn(params):
      losses = slot_losses(model, params, x, ys, task_ids)
      return jnp.sum((weights * w_gn)[task_ids] * losses), losses

    (total, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    new_state, l_grad = objectives.gradnorm_update(
        obj_state, norms, jax.lax.stop_gradient(losses), task_ids, alpha=gn["alpha"],
        w_lr=gn["w_lr"])
    extra = {"objective_lambda_sum": w_gn, "gradnorm_loss": l_grad}
    return total, losses, grads, extra, new_state

  def tag_measure(params, x, ys, task_ids, losses):
    def slot_grad(x_k, ys_k, t_k):
      def f(shared):
        return slot_losses(model, {"shared": shared, "tasks": params["tasks"]}, x_k[None],
                           jax.tree.map(lambda y: y[None], ys_k), t_k[None])[0]
      return jax.grad(f)(params["shared"])
    g = jax.vmap(slot_grad)(x, ys, task_ids)
    z = measure.lookahead_affinity(
        lambda sh: slot_losses(model, {"shared": sh, "tasks": params["tasks"]}, x, ys,
                               task_ids),
        params["shared"], g, tag_lr, jax.lax.stop_gradient(losses))
    pair = (task_ids[:, None], task_ids[None, :])
    return {"tag_sum": jnp.zeros((num_tasks, num_tasks)).at[pair].add(z),
            "tag_count": jnp.zeros((num_tasks, num_tasks)).at[pair].add(1.0)}

  if objective == "mgda_ub":
    grads_fn = representation_grads
  elif combiner is not None:
    grads_fn = accumulated_grads if gram_path == "accumulate" else combined_grads
  elif objective == "gradnorm":
    grads_fn = gradnorm_grads
  else:
    grads_fn = weighted_grads

  expected_obj_state = jax.tree.structure(
      lw.init_state() if lw else
      objectives.gradnorm_init(num_tasks, gn["w_lr"]) if objective == "gradnorm" else {})

  def one_step(state, data):
    if penalty is not None and "anchor" not in state:
      raise ValueError("make_train_step(penalty=...) needs state['anchor']: pass "
                       "anchor= to init_train_state.")
    if jax.tree.structure(state["objective_state"]) != expected_obj_state or (
        objective == "uncertainty" and objective not in state["params"]["tasks"]):
      raise ValueError(
          f"The train state was not initialised for objective {objective!r}: pass "
          f"objective={objective!r} (and the same objective_kwargs) to init_train_state.")
    if tag_lr > 0 and not jax.tree.leaves(state["params"]["shared"]):
      raise ValueError(f"config.tag_lr > 0 measures how one task's step on the shared "
                       f"parameters moves the others' losses; arch {model.arch!r} has no "
                       "shared parameters.")
    if ((combiner is not None or objective == "gradnorm")
        and not jax.tree.leaves(state["params"]["shared"])):
      raise ValueError(
          f"config.objective.method={objective!r} combines per-task gradients of the "
          f"shared parameters, and arch {model.arch!r} has none.")
    rng = jax.random.fold_in(base_key, state["step"])
    r_tasks, r_examples, r_method = jax.random.split(rng, 3)
    task_ids = sampling.sample_tasks(r_tasks, probs, tasks_per_step, replace)
    if shared_inputs:
      idx = sampling.shared_example_indices(r_examples, task_ids, data["n"],
                                            examples_per_task)
    else:
      idx = sampling.example_indices(r_examples, task_ids, stream_ids, data["n"],
                                     examples_per_task)
    x, ys = sampling.gather_batch(data, ts_arrays, task_ids, idx)
    total, losses, grads, extra, obj_state = grads_fn(
        state["params"], state["objective_state"], x, ys, task_ids, r_method)
    if tag_lr > 0:
      extra = {**extra, **tag_measure(state["params"], x, ys, task_ids, losses)}
    if penalty is not None or model.penalty is not None:
      def total_penalty(params):
        out = jnp.zeros((), jnp.float32)
        if model.penalty is not None:  # the architecture's (soft sharing)
          out = out + model.penalty(params)
        if penalty is not None:        # the run's (L2-SP)
          out = out + penalty(params, state["anchor"])
        return out
      pen, pen_grads = jax.value_and_grad(total_penalty)(state["params"])
      total = total + pen
      grads = jax.tree.map(jnp.add, grads, pen_grads)
      extra = {**extra, "penalty": pen}
    active = jnp.zeros((num_tasks,), bool).at[task_ids].set(True)
    lr_scale = state["hparams"]["lr_scale"] if "hparams" in state else None
    params, opt_state = optim.update(tx, grads, state["opt_state"], state["params"],
                                     rows, active, lr_scale)
    if lw is not None:  # loss weightings update after the step (FAMO: new losses)
      new_losses = (slot_losses(model, params, x, ys, task_ids) if lw.needs_new_losses
                    else None)
      obj_state = lw.update(obj_state, losses, task_ids, new_losses)
    meas = {
        "loss": total,
        "task_loss_sum": jax.ops.segment_sum(losses, task_ids, num_tasks),
        "task_count": jax.ops.segment_sum(jnp.ones_like(losses), task_ids, num_tasks),
        **extra,
    }
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                 "objective_state": obj_state}
    for key in ("anchor", "hparams"):  # constants of the run
      if key in state:
        new_state[key] = state[key]
    return new_state, meas

  if steps_per_call == 1:  # a plain step: no loop to pay for
    return one_step

  def train_step(state, data):
    state, meas = jax.lax.scan(lambda s, _: one_step(s, data), state, None,
                               length=steps_per_call)
    return state, jax.tree.map(lambda m: m.sum(axis=0), meas)

  return train_step


def make_eval_step(model: multitask.Model, *, label_mean: np.ndarray,
                   label_std: np.ndarray, num_examples: int, batch_size: int
                   ) -> Callable:
  """Returns ``eval_step(params, split) -> {"sums": {group: {metric: [T]}},
  "count": [T]}`` over every example of every task (not jitted).

  ``num_examples`` is the padded example axis of the split (static).
  """
  ts = model.taskset
  num_tasks = len(ts)
  chunk = int(min(batch_size, num_examples))
  num_chunks = math.ceil(num_examples / chunk)
  task_ids = jnp.arange(num_tasks, dtype=jnp.int32)
  group_of = jnp.asarray(ts.group_of_task)
  mean = jnp.asarray(label_mean)[:, None]
  std = jnp.asarray(label_std)[:, None]
  ts_arrays = {"local_index": jnp.asarray(ts.local_index)}

  def eval_step(params, split):
    # A split may carry its own label statistics (cross-validation folds).
    m = split["label_mean"][:, None] if "label_mean" in split else mean
    sd = split["label_std"][:, None] if "label_std" in split else std

    def body(acc, c):
      pos = c * chunk + jnp.arange(chunk)
      valid = pos[None, :] < split["n"][:, None]                      # [T, C]
      idx = jnp.broadcast_to(jnp.minimum(pos, num_examples - 1), (num_tasks, chunk))
      x, ys = sampling.gather_batch(split, ts_arrays, task_ids, idx)
      outs = model.apply(params, x, task_ids)
      sums = {}
      for gi, g in enumerate(ts.groups):
        vals = tasks_lib.example_metrics(ts.group_task(g), outs[g], ys[g], m, sd)
        mask = valid & (group_of == gi)[:, None]
        sums[g] = {k: acc["sums"][g][k] + jnp.sum(jnp.where(mask, v, 0.0), axis=1)
                   for k, v in vals.items()}
      return {"sums": sums, "count": acc["count"] + valid.sum(axis=1)}, None

    zeros = jnp.zeros((num_tasks,), jnp.float32)
    acc0 = {"sums": {g: {k: zeros for k in ts.group_task(g).metric_names}
                     for g in ts.groups},
            "count": jnp.zeros((num_tasks,), jnp.int32)}
    acc, _ = jax.lax.scan(body, acc0, jnp.arange(num_chunks))
    return acc

  return eval_step


def eval_metrics(taskset: tasks_lib.TaskSet, acc) -> dict[str, dict[str, float]]:
  """``{task: {metric: value}}`` from an eval step's sums and counts."""
  acc = jax.device_get(acc)
  out = {}
  for i, t in enumerate(taskset):
    n = max(int(acc["count"][i]), 1)
    out[t.name] = {k: float(acc["sums"][t.group][k][i]) / n for k in t.metric_names}
  return out


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------


class _Progress:
  """A progress line with throughput and ETA at every log step."""

  def __init__(self, total: int, first: int):
    self.total, self.first, self.t0 = total, first, None

  def line(self, step: int, loss: float) -> str:
    now = time.perf_counter()
    if self.t0 is None:  # the first call includes compilation
      self.t0, self.s0 = now, step
      rate, eta = float("nan"), "?"
    else:
      rate = (step - self.s0) / max(now - self.t0, 1e-9)
      eta = time.strftime("%H:%M:%S", time.gmtime((self.total - step) / max(rate, 1e-9)))
    pct = 100.0 * step / self.total
    width = 20
    bar = "#" * int(width * step / self.total)
    return (f"[{bar:<{width}}] step {step}/{self.total} ({pct:5.1f}%) "
            f"loss {loss:.4f} | {rate:.1f} steps/s | ETA {eta}")


def _reduce_steps_per_call(config) -> int:
  spc = int(config.steps_per_call)
  for key in ("total_steps", "log_steps", "eval_steps", "checkpoint_steps"):
    spc = math.gcd(spc, int(config[key]))
  return spc


def _gradient_record(taskset, meas, steps: int) -> dict:
  """Per-task gradient norms and method weights, pairwise cosines (the
  conflict matrix) and solver failures, averaged over the call's steps."""
  names = taskset.names
  if "objective_lambda_sum" in meas:  # loss weighting: mean lambda over the call
    lam = np.asarray(meas["objective_lambda_sum"]) / steps
    return {f"objective/{a}/lambda": float(lam[i]) for i, a in enumerate(names)}
  if "grad_norm_sum" not in meas:
    return {}
  rec = {"grad/solver_failures": float(np.sum(meas["solver_failures"]))}
  for i, a in enumerate(names):
    n = meas["task_count"][i]
    if n > 0:
      rec[f"grad/{a}/norm"] = float(meas["grad_norm_sum"][i] / n)
      rec[f"grad/{a}/weight"] = float(meas["grad_weight_sum"][i] / n)
    for j in range(i + 1, len(names)):
      c = meas["grad_pair_count"][i, j]
      if c > 0:
        rec[f"grad/cos/{a}/{names[j]}"] = float(meas["grad_cos_sum"][i, j] / c)
  return rec


def _write_jsonl(path, record):
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


class Run(NamedTuple):
  """Everything a training run needs, built from a config and its data."""
  model: multitask.Model
  tx: Any
  state: dict
  train_fn: Callable
  eval_fn: Callable
  steps_per_call: int
  init_report: dict | None


def build_run(config: ml_collections.ConfigDict, data: loading.MultiTaskData,
              eval_split: str = "test") -> Run:
  """The model, optimizer, initial state (loaded from ``config.init_from`` when
  set), train step and eval step of a run on ``data``; nothing is compiled.
  The eval step is sized for ``data.<eval_split>``, and only its shape is read."""
  validate_config(config)
  ts = data.taskset
  num_tasks = len(ts)
  k = config.sampling.tasks_per_step or num_tasks
  probs = sampling.task_probabilities(config.sampling.task_sampler, data.num_train,
                                      config.sampling.temperature)
  weights = tasks_lib.task_weights(ts, config.objective.weights.to_dict())
  steps_per_call = _reduce_steps_per_call(config)
  if config.sampling.shared_inputs:
    sampling.check_shared_inputs(data.train, ts.names)
  logger.info("Data %s: %d tasks %s, input shape %s, train sizes %s, groups %s.",
               data.name, num_tasks, list(ts.names), data.input_shape,
               data.num_train.tolist(), list(ts.groups))
  # --- Model, optimizer, initial state (from another run when init_from) ------
  model = model_from_config(config, ts, data.input_shape)
  objective_kwargs = objective_kwargs_from_config(config)
  init_rng = jax.random.key(config.seed + 1)
  shapes = jax.eval_shape(lambda r: init_train_state(
      model, optax.set_to_zero(), r, config.objective.method, objective_kwargs),
      init_rng)["params"]
  tx = optimizer_from_config(config, shapes)
  if isinstance(tx, optim.RuledOptimizer):
    for line in tx.describe(shapes):
      logger.info("optim rule: %s", line)
  state = jax.jit(lambda r: init_train_state(
      model, tx, r, config.objective.method, objective_kwargs))(init_rng)
  init_report, penalty = None, None
  if config.init_from:
    source, source_step = ckpt_lib.read_params(config.init_from)
    dont_load = [p for p in config.init_dont_load.split(";") if p]
    params, report = ckpt_lib.load_params(state["params"], source, dont_load)
    init_report = {"from": config.init_from, "step": source_step, **report}
    logger.info("init_from %s (step %d): loaded %d, fresh (dont_load) %s, fresh (missing) "
                "%s, unused %s.", config.init_from, source_step, len(report["loaded"]),
                report["fresh_dont_load"], report["fresh_missing"], report["unused"])
    anchor = None
    if config.l2sp_alpha or config.l2sp_beta:
      penalty = transfer.l2sp_penalty(ckpt_lib.loaded_mask(params, report),
                                      config.l2sp_alpha, config.l2sp_beta)
      anchor = params
    state = {**state, "params": params,
             "opt_state": optim.init_state(tx, params, task_rows(model,
                                                                 config.objective.method))}
    if anchor is not None:
      state["anchor"] = jax.tree.map(jnp.copy, anchor)
  elif config.l2sp_alpha or config.l2sp_beta:
    raise ValueError("config.l2sp_alpha/l2sp_beta pull parameters toward pretrained values: "
                     "set config.init_from.")
  train_fn = make_train_step(
      model, tx, task_probs=probs, weights=weights, tasks_per_step=k,
      examples_per_task=config.sampling.examples_per_task,
      replace=config.sampling.replace, steps_per_call=steps_per_call, seed=config.seed,
      objective=config.objective.method, objective_kwargs=objective_kwargs,
      shared_inputs=config.sampling.shared_inputs, penalty=penalty, tag_lr=config.tag_lr)
  eval_fn = make_eval_step(model, label_mean=data.label_mean, label_std=data.label_std,
                           num_examples=data.split(eval_split)["x"].shape[1],
                           batch_size=config.eval_batch_size)
  return Run(model, tx, state, train_fn, eval_fn, steps_per_call, init_report)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       callbacks: Sequence[Callable[[int, dict], None]] = ()) -> dict:
  """Trains, evaluates per task, checkpoints, and writes the workdir outputs.

  Outputs in ``workdir``: ``checkpoints/`` (Orbax), ``metrics.jsonl`` (one line
  per log/eval step), ``summary.json`` (``{"tasks": {TASK: {METRIC: value}},
  ...}``). Running again with the same workdir resumes from the latest
  checkpoint. ``callbacks(step, measurements)`` run after every host call
  (e.g. to stop a run early in tests).

  Returns:
    the summary dict.
  """
  # --- Config, data, model, optimizer, initial state --------------------------
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  data = data_from_config(config)
  run = build_run(config, data)
  ts, model, state = data.taskset, run.model, run.state
  steps_per_call, train_fn, eval_fn = run.steps_per_call, run.train_fn, run.eval_fn
  init_report = run.init_report
  for name, leaf in params_lib.flatten_with_names(state["params"]):
    logger.info("param %-50s %s", name, tuple(leaf.shape))
  logger.info("Parameters: %d (shared %d, per-task %d).",
               params_lib.count(state["params"]),
               params_lib.count(state["params"]["shared"]),
               params_lib.count(state["params"]["tasks"]))
  manager = ckpt_lib.make_manager(workdir)
  restored = ckpt_lib.restore_latest(manager, state)
  resumed_from = None
  if restored is not None:
    resumed_from = int(restored["step"])
    state = restored
    logger.info("Resumed from %s at step %d.", manager.directory, int(state["step"]))
  train_data = jax.device_put(data.train)
  test_data = jax.device_put(data.test)

  train_step = jax.jit(train_fn, donate_argnums=(0,))
  eval_step = jax.jit(eval_fn)
  train_eval_step = None
  if config.eval_train:  # train-split metrics at eval steps: overfitting, shown
    train_eval_step = jax.jit(make_eval_step(
        model, label_mean=data.label_mean, label_std=data.label_std,
        num_examples=data.train["x"].shape[1], batch_size=config.eval_batch_size))
  tag_sum = tag_count = None

  # --- Loop -------------------------------------------------------------------
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  total = int(config.total_steps)
  step = int(state["step"])
  progress = _Progress(total, step)
  last_eval = None
  while step < total:
    state, meas = train_step(state, train_data)
    step += steps_per_call
    for cb in callbacks:
      cb(step, meas)
    if "tag_sum" in meas:  # affinity accumulates over every step of this process
      got = jax.device_get((meas["tag_sum"], meas["tag_count"]))
      tag_sum = got[0] if tag_sum is None else tag_sum + got[0]
      tag_count = got[1] if tag_count is None else tag_count + got[1]
    record = None
    if step % config.log_steps == 0 or step == total:
      meas = jax.device_get(meas)
      record = {"step": step, "train/loss": float(meas["loss"]) / steps_per_call}
      if "penalty" in meas:
        record["train/penalty"] = float(meas["penalty"]) / steps_per_call
      for i, t in enumerate(ts):
        if meas["task_count"][i] > 0:
          record[f"train/{t.name}/loss"] = float(
              meas["task_loss_sum"][i] / meas["task_count"][i])
      record.update(_gradient_record(ts, meas, steps_per_call))
      logger.info("%s", progress.line(step, record["train/loss"]))
    if step % config.eval_steps == 0 or step == total:
      last_eval = eval_metrics(ts, eval_step(state["params"], test_data))
      record = record or {"step": step}
      for tname, ms in last_eval.items():
        for mname, v in ms.items():
          record[f"eval/{tname}/{mname}"] = v
      if train_eval_step is not None:
        last_train_eval = eval_metrics(ts, train_eval_step(state["params"], train_data))
        for tname, ms in last_train_eval.items():
          for mname, v in ms.items():
            record[f"train_eval/{tname}/{mname}"] = v
    if record is not None:
      _write_jsonl(metrics_path, record)
    if step % config.checkpoint_steps == 0 or step == total:
      ckpt_lib.save(manager, step, state)

  if last_eval is None:  # resumed at or past the end: evaluate what was restored
    last_eval = eval_metrics(ts, eval_step(state["params"], test_data))
  compiles = train_step._cache_size()  # pylint: disable=protected-access
  summary = {
      "data": data.name,
      "arch": config.model.arch,
      "step": step,
      "tasks": last_eval,
      "metric_directions": {m: tasks_lib.METRIC_DIRECTIONS[m]
                            for ms in last_eval.values() for m in ms},
      "train_step_compilations": int(compiles),
      "resumed_from_step": resumed_from,
      "init_from": init_report,
      "config": config.to_dict(),
  }
  if train_eval_step is not None:
    summary["train_metrics"] = eval_metrics(ts, train_eval_step(state["params"], train_data))
  if tag_sum is not None:
    affinity = np.where(tag_count > 0, tag_sum / np.maximum(tag_count, 1), np.nan)
    summary["affinity"] = {
        "tasks": list(ts.names), "lookahead_lr": config.tag_lr,
        "matrix": [[None if np.isnan(v) else float(v) for v in row] for row in affinity],
        "definition": "Z[i][j] = 1 - L_j(after a step on task i's gradient) / L_j, "
                      "averaged over the steps of this process (Fifty et al. 2021)"}
    if not np.isnan(affinity).any() and 1 <= config.tag_groups <= len(ts):
      summary["affinity"]["grouping"] = measure.group_tasks(affinity, config.tag_groups,
                                                            ts.names)
    _plot_affinity(affinity, ts.names, os.path.join(workdir, "affinity.png"))
  if config.baselines:
    base = measure.single_task_baselines(config)
    dm, per_task = measure.delta_m(last_eval, base)
    summary["delta_m"] = {"value": dm, "per_task": per_task, "baselines": base,
                          "convention": measure.DELTA_M_CONVENTION}
    logger.info("Delta_m = %+.2f%% vs single-task baselines (positive = better).", dm)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2, default=str)
  manager.close()
  logger.info("Final test metrics:\n%s", format_table(last_eval))
  return summary


def _plot_affinity(affinity, names, path):
  size = (2.0 + 0.5 * len(names), 1.5 + 0.5 * len(names))
  with plotting.figure(path, figsize=size) as (fig, ax):
    lim = np.nanmax(np.abs(affinity)) or 1.0
    im = ax.imshow(affinity, cmap="RdBu", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(names)), names, rotation=90)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("target task j")
    ax.set_ylabel("source task i (lookahead step)")
    fig.colorbar(im)


def format_table(metrics: dict[str, dict[str, float]]) -> str:
  names = sorted({m for ms in metrics.values() for m in ms})
  rows = [["task"] + names]
  for t, ms in metrics.items():
    rows.append([t] + [f"{ms[m]:.4f}" if m in ms else "-" for m in names])
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)
