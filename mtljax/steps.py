"""The compiled multi-task step and the per-task evaluation step.

Pure functions of explicit arguments: no config, no I/O. One training step,
all inside one ``jax.jit``, reads like the recipe::

    task_ids [K]   ~ the task distribution (uniform by default)         sample_tasks
    x, ys          ~ B examples per slot, or B shared by every slot      sample_batch
    lin            = losses [K] and their pullbacks, one forward         jacobians.linearize
    result         = the objective's value, gradient and state           objective.gradients
    + penalties    (soft sharing's, L2-SP's)                             add_penalties
    params, opt    = optimizer step; unsampled tasks' rows stay          optim.update
    obj state      = objective.after_update (FAMO: losses after the step)
    measurements   = losses per task, the objective's logs              step_measurements

When every slot reads the same examples (the sampler's ``shared_inputs``) and
the model has a task-independent part (``model.encode``), the trunk runs once on
the ``B`` examples and only the per-task part runs per slot
(:mod:`mtljax.jacobians`).

``steps_per_call`` steps run per host call under ``lax.scan``; randomness is
``fold_in(seed_key, step)`` (``seed_key``: ``state.rng`` when the state
holds one -- the run's seed, checkpointed and vmappable over seeds -- else
``key(seed)``), so results do not depend on how steps are grouped
into calls (an interrupted and resumed run equals an uninterrupted one).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtljax import affinity
from mtljax import jacobians
from mtljax import objectives
from mtljax import optim
from mtljax import params as params_lib
from mtljax import tasks as tasks_lib
from mtljax.data import sampling
from mtljax.dense import augment as dense_augment
from mtljax.dense import metrics as dense_metrics
from mtljax.models import multitask


def as_objective(objective, model: multitask.Model) -> objectives.Objective:
  """An :class:`~mtljax.objectives.Objective`, or a method name built with its
  default hyper-parameters; bound to the model's shared parameter shapes
  (:func:`mtljax.objectives.bind_shared`: a no-op unless its state holds
  per-task gradients)."""
  if isinstance(objective, str):
    objective = objectives.make_objective(objective, len(model.taskset))
  elif not isinstance(objective, objectives.Objective):
    raise TypeError(f"objective must be an Objective or a method name, got {objective!r}.")
  if objective.init_shared_state is None:  # nothing to bind: skip tracing model.init
    return objective
  return objectives.bind_shared(objective,
                                jax.eval_shape(model.init, jax.random.key(0))["shared"])


def task_rows(model: multitask.Model, objective) -> dict:
  """The model's per-task stacks plus the objective's per-task parameters."""
  objective = as_objective(objective, model)
  rows = dict(model.task_rows)
  if jax.eval_shape(objective.init_params):
    rows[objective.name] = np.arange(len(model.taskset), dtype=np.int32)
  return rows


class TrainState(NamedTuple):
  """Everything a train step reads and returns: a pytree that orbax saves
  field by field (:mod:`mtljax.checkpoint`), ``jax.vmap`` maps over stacked
  seeds and :meth:`mtljax.sharding.Placement.state` places.

  Attributes:
    step: int32 ``[]``, the steps taken; step ``s`` draws with ``fold_in(key, s)``.
    params: ``{"shared": ..., "tasks": ...}`` (the objective's own per-task
      parameters, if any, under ``tasks/<objective name>``).
    opt_state: the optimizer's state (:func:`mtljax.optim.init_state`: per-task
      rows for every per-task stack).
    objective_state: the objective's state, structured as its ``init_state()``.
    nonfinite_skipped: int32 ``[]``, updates skipped for a non-finite loss or
      gradient (``on_nonfinite="skip"``).
    rng: ``jax.random.key_data`` of the run's key, or None: the step's
      ``seed`` then keys the draws.
    hparams: ``{"lr_scale": float32 []}`` scaling every update
      (:func:`mtljax.optim.update`; cross-validation's learning rates), or None.
    anchor: the parameters a penalty pulls toward (L2-SP: :func:`make_train_step`'s
      ``penalty``), or None.
    model_state: the model's state that gradients do not train --
      batch-norm running averages, ``{"shared": ..., "tasks": ...}``
      (:attr:`mtljax.models.multitask.Model.init_state`) -- or None for a model
      without. A step updates it once, from the forward its losses come from
      (:attr:`mtljax.jacobians.Linearized.model_state`), and only when the
      step applies (a non-finite step keeps it, as the parameters).

  An optional field is None when a run does not use it (None is an empty
  pytree: nothing to place, map or update; orbax saves it as an empty entry).
  """
  step: Any
  params: Any
  opt_state: Any
  objective_state: Any
  nonfinite_skipped: Any
  rng: Any = None
  hparams: Any = None
  anchor: Any = None
  model_state: Any = None


def init_train_state(model: multitask.Model, tx, rng: jax.Array, objective="fixed", *,
                     anchor=None, hparams=None) -> TrainState:
  """The :class:`TrainState` at step 0: parameters from ``model.init(rng)``
  (and the objective's own) and the model's state from ``model.init_state(rng)``
  (None without), fresh optimizer and objective states, no update
  skipped; ``anchor`` and ``hparams`` as given (``rng`` stays None: the step's
  ``seed`` keys the draws unless the caller sets ``state._replace(rng=...)``)."""
  objective = as_objective(objective, model)
  params = model.init(rng)
  own = objective.init_params()
  if own:
    params = {"shared": params["shared"], "tasks": {**params["tasks"], objective.name: own}}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optim.init_state(tx, params, task_rows(model, objective)),
                    objective_state=objective.init_state(),
                    nonfinite_skipped=jnp.zeros((), jnp.int32), anchor=anchor, hparams=hparams,
                    model_state=None if model.init_state is None else model.init_state(rng))


# ----------------------------------------------------------------------------
# Stages of the step.
# ----------------------------------------------------------------------------


def sample_batch(sampler: sampling.Sampler, data: dict, r_tasks, r_examples
                 ) -> jacobians.Batch:
  """Task ids ``[K]``, then ``B`` examples per slot (or ``B`` for all slots):
  the draw of :func:`mtljax.data.sampling.sample_indices`, gathered. With
  ``sampler.draws = D > 1``, the ``D`` independent draws of
  :func:`mtljax.data.sampling.sample_draws` as ``D K`` slots (each slot with
  its own inputs)."""
  s = sampler
  task_ids, idx = sampling.sample_draws(sampler, data["n"], r_tasks, r_examples)
  if s.all_tasks is not None:
    task_ids = s.slot_tasks  # static: the slots' groups are known when tracing
  arrays = {"local_index": s.local_index}
  if s.shared_batch:
    x, ys = sampling.gather_shared_batch(data, arrays, task_ids, idx)
  else:
    x, ys = sampling.gather_batch(data, arrays, task_ids, idx)
  return jacobians.Batch(x, ys, task_ids, s.shared_batch)


def host_batch(sampler: sampling.Sampler, batch: dict) -> jacobians.Batch:
  """A batch read by the host pipeline: ``{"task_ids" [K], "x" [K, B, ...]
  or [B, ...], "y" {group: [K, B]}}`` (``D K`` slots for ``sampler.draws = D``)."""
  ids = sampler.slot_tasks if sampler.all_tasks is not None else batch["task_ids"]
  return jacobians.Batch(batch["x"], batch["y"], ids, sampler.shared_batch)


# fold_in(r_examples, AUGMENT_STREAM) keys a step's augmentation (a stream of
# its own: the examples drawn do not change when augmentation is switched on).
AUGMENT_STREAM = 0x617567


def dense_augmenter(taskset: tasks_lib.TaskSet, ops, scales=dense_augment.SCALES
                    ) -> Callable | None:
  """``augment(key, batch) -> batch``: the literature's augmentation of a
  step's dense batch (:func:`mtljax.dense.augment.augment_slots`: random
  scale-crop with depth divided by the scale, horizontal flip with the
  normals' x negated; ``ops`` a subset of
  :data:`mtljax.dense.augment.OPS`), or None for no ``ops``. Checked here:
  the task set needs dense tasks."""
  ops = dense_augment.parse_ops(",".join(ops) if not isinstance(ops, str) else ops)
  if not ops:
    return None
  dense_augment.check({"image": np.zeros((2, 2, 3), np.float32)}, scales)
  kinds = {g: taskset.group_task(g).kind for g in taskset.groups
           if taskset.group_task(g).dense}
  if not kinds:
    raise ValueError(f"augment={','.join(ops)!r} crops and flips images with their "
                     f"per-pixel labels; the tasks {list(taskset.names)} have none.")

  def augment(key, batch: jacobians.Batch) -> jacobians.Batch:
    x, ys = dense_augment.augment_slots(key, batch.x, batch.ys, kinds, shared=batch.shared,
                                        ops=ops, scales=scales)
    return jacobians.Batch(x, ys, batch.task_ids, batch.shared)
  return augment


def labelled_slots(taskset: tasks_lib.TaskSet, batch: jacobians.Batch
                   ) -> tuple[jax.Array, jax.Array]:
  """``labelled [K]``: slots with at least one labelled example
  (:func:`mtljax.tasks.slot_masks`); ``present [T]``: tasks with such a slot.

  A slot with no labelled example has loss 0 and gradient 0. Its task then
  counts as not sampled where that matters: its rows of the per-task
  parameters and optimizer state stay bitwise (``optim.update``'s ``active``),
  the objective sees its fixed weight as 0 in this step (so methods that
  normalise over the slots -- FAMO, GLS -- leave it out; every other task's
  weight is as given), and the logs do not count the slot (``task_count``,
  TAG's pairs)."""
  labelled = jnp.any(tasks_lib.slot_masks(taskset, batch.ys, batch.task_ids), axis=1)
  ids = jnp.asarray(batch.task_ids)
  present = jax.ops.segment_sum(labelled.astype(jnp.int32), ids, len(taskset)) > 0
  return labelled, present


def add_penalties(model: multitask.Model, penalty: Callable | None, state: TrainState,
                  total, grads) -> tuple[jax.Array, dict, dict]:
  """The architecture's penalty (soft sharing) and the run's (L2-SP, pulling
  toward ``state.anchor``), added to the objective and its gradient."""
  if penalty is None and model.penalty is None:
    return total, grads, {}

  def total_penalty(params):
    out = jnp.zeros((), jnp.float32)
    if model.penalty is not None:
      out = out + model.penalty(params)
    if penalty is not None:
      out = out + penalty(params, state.anchor)
    return out
  pen, pen_grads = jax.value_and_grad(total_penalty)(state.params)
  return total + pen, jax.tree.map(jnp.add, grads, pen_grads), {"penalty": pen}


def tag_measurements(lin: jacobians.Linearized, params: dict, task_ids, eta: float,
                     num_tasks: int, labelled=None) -> dict:
  """TAG's lookahead affinity of the sampled slots, placed by task pair (only
  pairs of slots that both have labelled examples, ``labelled [K]``)."""
  g, _ = lin.slot_grads(jnp.ones_like(lin.losses))
  z = affinity.lookahead_affinity(
      lambda sh: lin.loss_at({"shared": sh, "tasks": params["tasks"]}), params["shared"],
      g, eta, jax.lax.stop_gradient(lin.losses))
  pair = (task_ids[:, None], task_ids[None, :])
  both = (jnp.ones_like(lin.losses, bool) if labelled is None else labelled)
  both = both[:, None] & both[None, :]
  return {"tag_sum": jnp.zeros((num_tasks, num_tasks)).at[pair].add(jnp.where(both, z, 0.0)),
          "tag_count": jnp.zeros((num_tasks, num_tasks)).at[pair].add(
              both.astype(jnp.float32))}


NONFINITE_POLICIES = ("stop", "skip")
NO_STEP = np.iinfo(np.int32).max


def all_finite(tree) -> jax.Array:
  """Whether every element of ``tree`` is finite: one sum per leaf (NaN and
  inf propagate through a sum; a sum of finite values overflowing to inf means
  gradients near float32's limit, which is divergence too)."""
  return jnp.isfinite(sum(jnp.sum(x, dtype=jnp.float32) for x in jax.tree.leaves(tree)))


def nonfinite_measurements(finite, step, losses, task_ids, num_tasks: int) -> dict:
  """``nonfinite_steps`` (0/1, summed over a call), ``nonfinite_first`` (this
  step, or int32 max when finite; a call keeps the minimum) and
  ``nonfinite_tasks [T]`` (slots whose loss is not finite, by task)."""
  bad = jnp.logical_not(finite)
  return {"nonfinite_steps": bad.astype(jnp.int32),
          "nonfinite_first": jnp.where(bad, step, NO_STEP).astype(jnp.int32),
          "nonfinite_tasks": jax.ops.segment_sum(
              jnp.logical_not(jnp.isfinite(losses)).astype(jnp.int32), task_ids, num_tasks)}


def step_measurements(total, losses, task_ids, num_tasks: int, *extra: dict,
                      labelled=None) -> dict:
  """``loss``, per task ``task_loss_sum [T]`` / ``task_count [T]`` (slots
  with a labelled example, ``labelled [K]``; default every slot), and ``extra``."""
  counted = jnp.ones_like(losses) if labelled is None else labelled.astype(losses.dtype)
  meas = {"loss": total,
          "task_loss_sum": jax.ops.segment_sum(losses, task_ids, num_tasks),
          "task_count": jax.ops.segment_sum(counted, task_ids, num_tasks)}
  for e in extra:
    meas.update(e)
  return meas


def _check_parts(model: multitask.Model, sampler, weights, *, slot_backwards: str,
                 on_nonfinite: str, placement) -> None:
  """The step's parts and options against the model's task set, before tracing."""
  num_tasks = len(model.taskset)
  if not isinstance(sampler, sampling.Sampler):
    raise TypeError(f"make_train_step: sampler must be a mtljax.data.sampling.Sampler "
                    f"(sampling.make_sampler), got {type(sampler).__name__}.")
  jacobians.sequential_backwards(slot_backwards)  # checks the name
  for name, value in (("task_probs", sampler.probs), ("weights", weights)):
    if np.shape(value) != (num_tasks,):
      raise ValueError(f"make_train_step: {name} must have one entry per task "
                       f"({num_tasks}), got shape {np.shape(value)}.")
  ts = model.taskset
  if not (np.array_equal(np.asarray(sampler.stream_ids), np.asarray(ts.stream_ids)) and
          np.array_equal(np.asarray(sampler.local_index), np.asarray(ts.local_index))):
    raise ValueError("make_train_step: the sampler was made for another task set (its tasks' "
                     "stream ids or label rows are not the model's): use "
                     "sampling.make_sampler(model.taskset, ...).")
  if on_nonfinite not in NONFINITE_POLICIES:
    raise ValueError(f"on_nonfinite={on_nonfinite!r} is not one of "
                     f"{NONFINITE_POLICIES}.")
  if placement is not None:
    placement.check_batch(sampler.examples_per_task)


def _check_step(model, objective, sampler, *, tag_lr, one_pass) -> tuple[str, list | None]:
  """Everything about a step that can be wrong, before it is traced; returns
  what to linearise and which shared leaves need per-slot gradients."""
  num_tasks = len(model.taskset)
  tasks_per_step, shared_inputs = sampler.tasks_per_step, sampler.shared_inputs
  if tasks_per_step < 1:
    raise ValueError(f"sampling.tasks_per_step must be >= 1, got {tasks_per_step}.")
  if tasks_per_step > num_tasks and not sampler.replace:
    raise ValueError(f"sampling.tasks_per_step={tasks_per_step} must be in "
                     f"[1, {num_tasks}] when sampling tasks without replacement.")
  if sampler.draws != objective.draws:
    raise ValueError(
        f"objective.method={objective.name!r} reads {objective.draws} independent "
        f"mini-batch(es) of the step's tasks per step and the sampler draws "
        f"{sampler.draws}: make it with sampling.make_sampler(..., "
        f"draws={objective.draws}) (the objective's Objective.draws).")
  if objective.draws > 1 and tag_lr > 0:
    raise ValueError(f"tag_lr > 0 measures affinities between the step's slots; "
                     f"objective.method={objective.name!r} reads {objective.draws} draws "
                     "of the same tasks per step, whose slots are not distinct tasks: "
                     "set tag_lr=0.")
  shared_inputs = sampler.shared_batch  # several draws: each slot has its own inputs
  if tasks_per_step < objective.min_slots:
    raise ValueError(f"objective.method={objective.name!r} with {objective.hparams} needs at "
                     f"least {objective.min_slots} task slots per step, got "
                     f"sampling.tasks_per_step={tasks_per_step}.")
  shared_names = [n for n, _ in params_lib.flatten_with_names(
      jax.eval_shape(model.init, jax.random.key(0))["shared"])]
  needs = objective.needs
  if needs == "representation":
    if one_pass is False:
      raise ValueError(f"objective.method={objective.name!r} differentiates through "
                       "the task-independent representation, which only the one-pass "
                       "path has: leave one_pass=None.")
    if not shared_inputs:
      raise ValueError(
          f"objective.method={objective.name!r} differentiates through one shared "
          "representation of one batch: set sampling.shared_inputs=True (the tasks "
          "must label the same inputs).")
    if model.encode is None:
      raise ValueError(
          f"objective.method={objective.name!r} needs a task-independent shared "
          f"representation followed by per-task parts; arch {model.arch!r} does not "
          "have one.")
  if one_pass and not (shared_inputs and model.encode is not None):
    raise ValueError(f"one_pass=True needs shared inputs and an architecture with a "
                     f"task-independent part; arch {model.arch!r}, shared_inputs="
                     f"{shared_inputs}.")
  if needs == "slots" and not shared_names:
    raise ValueError(
        f"objective.method={objective.name!r} combines per-task gradients of the "
        f"shared parameters, and arch {model.arch!r} has none.")
  if tag_lr > 0 and not shared_names:
    raise ValueError(f"tag_lr > 0 measures how one task's step on the shared "
                     f"parameters moves the others' losses; arch {model.arch!r} has no "
                     "shared parameters.")
  leaves = None
  if needs == "slots" and objective.slot_leaves is not None:
    leaves = objective.slot_leaves(shared_names)
  if tag_lr > 0:  # TAG needs every shared leaf's per-slot gradient
    needs, leaves = ("slots" if needs == "sum" else needs), None
  return needs, leaves


def _check_state(state: TrainState, objective: objectives.Objective, penalty,
                 model: multitask.Model | None = None) -> None:
  """Raised while tracing: not a :class:`TrainState`, or a state built for
  another objective, model or run (its objective state's structure, shapes and
  dtypes are those of ``init_state``; the model's state is there exactly when
  the model has one)."""
  if not isinstance(state, TrainState):
    raise TypeError(f"train_step: the state must be a steps.TrainState (init_train_state), "
                    f"got {type(state).__name__}.")
  if model is not None and model.stateful != (state.model_state is not None):
    have = "has none" if state.model_state is None else "has one"
    raise ValueError(f"train_step: arch {model.arch!r} {'has' if model.stateful else 'has no'} "
                     f"model state (batch-norm statistics) and the train state {have}: "
                     "build the state with init_train_state for this model.")
  if penalty is not None and state.anchor is None:
    raise ValueError("make_train_step(penalty=...) needs state.anchor: pass anchor= to "
                     "init_train_state.")
  want = jax.eval_shape(objective.init_state)
  own = jax.eval_shape(objective.init_params)
  have = state.objective_state
  same = jax.tree.structure(have) == jax.tree.structure(want) and all(
      (jnp.shape(a), jnp.result_type(a)) == (b.shape, b.dtype)
      for a, b in zip(jax.tree.leaves(have), jax.tree.leaves(want)))
  if not same or (own and objective.name not in state.params["tasks"]):
    raise ValueError(
        f"The train state was not initialised for objective {objective.name!r}: pass the "
        f"same objective to init_train_state.")


def make_train_step(model: multitask.Model, tx, objective, sampler: sampling.Sampler, *,
                    weights: np.ndarray, steps_per_call: int = 1, seed: int = 0,
                    penalty: Callable | None = None, tag_lr: float = 0.0,
                    one_pass: bool | None = None, slot_backwards: str = "auto",
                    placement=None, on_nonfinite: str = "stop",
                    host_batches: bool = False, augment: Callable | None = None) -> Callable:
  """Returns ``train_step(state, data) -> (state, measurements)`` (not jitted),
  ``state`` a :class:`TrainState`.

  Args:
    model: a :class:`mtljax.models.multitask.Model`.
    tx: an optax transformation or :class:`mtljax.optim.RuledOptimizer`.
    objective: an :class:`mtljax.objectives.Objective` (or a method name, with
      default hyper-parameters, e.g. ``"fixed"``); the state must come from
      :func:`init_train_state` with the same objective.
    sampler: how a step draws its batch, a :class:`mtljax.data.sampling.Sampler`
      of the model's task set (:func:`mtljax.data.sampling.make_sampler`): the
      ``[T]`` task distribution, K tasks per step, B examples per task, with
      or without replacement, and whether every slot sees the same B examples
      (shared inputs: the tasks must share one input source,
      :func:`mtljax.data.sampling.check_shared_inputs`). The host pipeline
      draws with the same sampler. Its ``draws`` must be the objective's
      :attr:`~mtljax.objectives.Objective.draws` (MoDo, SDMGrad: 3
      independent mini-batches of the step's tasks, one batch of ``3 K``
      slots; with shared inputs each draw's ``B`` examples are read by its
      ``K`` slots, on the per-slot path).
    weights: ``[T]`` fixed task weights.
    steps_per_call: steps per call under ``lax.scan`` (measurements summed).
    seed: the random streams' key ``key(seed)``, unless the state holds
      ``rng`` (``jax.random.key_data`` of a key), which then wins.
    penalty: ``penalty(params, anchor) -> scalar`` (e.g.
      :func:`mtljax.transfer.l2sp_penalty`), added to the objective and its
      gradient to every method's update; the state must hold ``anchor``.
    tag_lr: > 0 adds TAG's lookahead affinity (:mod:`mtljax.affinity`):
      ``tag_sum [T, T]`` / ``tag_count [T, T]`` (source task i, target j).
    one_pass: run the task-independent part once for every slot (default:
      whenever the sampler's shared inputs and the model has one); False
      forces the per-slot path (the reference the one-pass path is tested against).
    slot_backwards: ``"auto"`` | ``"map"`` | ``"vmap"``, how the one-pass path
      runs its K trunk backwards (:func:`mtljax.jacobians.sequential_backwards`).
    placement: a :class:`mtljax.sharding.Placement`: the sampled examples are
      split along its ``data`` axis (``B`` must be divisible by its size).
    on_nonfinite: a step whose loss or gradient is not finite never changes
      the parameters, optimizer or objective state; ``"stop"`` reports it
      (the loop stops), ``"skip"`` also counts it in
      ``state.nonfinite_skipped`` and goes on.
    host_batches: ``data`` is the batch the host pipeline read, not a split.
    augment: ``augment(key, batch) -> batch`` (:func:`dense_augmenter`),
      applied to every step's batch with ``fold_in(r_examples,
      AUGMENT_STREAM)`` -- a function of the run's key and the step, so
      seeded, the same on both pipelines and after a resume -- or None.

  Every part is checked before anything is traced (a bad one raises naming it).
  ``data`` is a train split as laid out by :mod:`mtljax.data.task_data`, the
  step sampling its batch; with ``host_batches`` it is the batch itself, as
  the host pipeline reads it (:mod:`mtljax.data.pipeline`: the same draws,
  :func:`mtljax.data.sampling.sample_indices`), with a leading
  ``[steps_per_call]`` axis when ``steps_per_call > 1``.
  Missing labels (:mod:`mtljax.tasks`): a slot's loss is the mean over its
  labelled examples; a slot with none has loss 0 and gradient 0, and its task
  counts as not sampled in that step (:func:`labelled_slots`).
  Measurements (summed over the ``steps_per_call`` steps): ``loss``, per task
  ``task_loss_sum [T]`` / ``task_count [T]`` (slots with a labelled example),
  and the objective's: loss
  weightings ``objective_lambda_sum [T]``; gradient methods per task
  ``grad_norm_sum``, ``grad_weight_sum`` (the method's beta), ``grad_cos_sum
  [T, T]`` / ``grad_pair_count [T, T]`` and ``solver_failures``; and
  ``nonfinite_steps`` / ``nonfinite_first`` / ``nonfinite_tasks``
  (:func:`nonfinite_measurements`).
  """
  objective = as_objective(objective, model)
  _check_parts(model, sampler, weights, slot_backwards=slot_backwards,
               on_nonfinite=on_nonfinite, placement=placement)
  needs, leaves = _check_step(model, objective, sampler, tag_lr=tag_lr, one_pass=one_pass)
  one_step = _make_one_step(
      model, tx, objective, sampler, jnp.asarray(weights, jnp.float32), needs=needs,
      leaves=leaves, base_key=jax.random.key(seed), penalty=penalty, tag_lr=tag_lr,
      one_pass=one_pass, slot_backwards=slot_backwards, placement=placement,
      host_batches=host_batches, augment=augment)
  return _scan_steps(one_step, steps_per_call, host_batches)


def _step_batch(sampler: sampling.Sampler, state: TrainState, data, base_key, placement,
                host_batches: bool, augment=None) -> tuple[jacobians.Batch, jax.Array]:
  """The step's batch (drawn from ``data``, or the host pipeline's) on the
  placement's ``data`` axis, and the method's key."""
  key = base_key if state.rng is None else jax.random.wrap_key_data(state.rng)
  r_tasks, r_examples, r_method = sampling.step_keys(key, state.step)
  if host_batches:
    batch = host_batch(sampler, data)
  else:
    batch = sample_batch(sampler, data, r_tasks, r_examples)
  if augment is not None:
    batch = augment(jax.random.fold_in(r_examples, AUGMENT_STREAM), batch)
  if placement is not None:
    batch = jacobians.Batch(placement.constrain_batch(batch.x, batch.shared), batch.ys,
                            batch.task_ids, batch.shared)
  return batch, r_method


def _make_one_step(model, tx, objective, sampler, weights, *, needs, leaves, base_key,
                   penalty, tag_lr, one_pass, slot_backwards, placement, host_batches,
                   augment=None) -> Callable:
  """One step, ``(state, data) -> (state, measurements)``, of checked parts."""
  ts = model.taskset
  num_tasks = len(ts)
  rows = task_rows(model, objective)

  def one_step(state, data):
    _check_state(state, objective, penalty, model)
    params = state.params
    batch, r_method = _step_batch(sampler, state, data, base_key, placement, host_batches,
                                  augment)
    ids = batch.task_ids
    # The step's task masks, one meaning each:
    #   labelled [K]  slot k has at least one labelled example in its batch;
    #   sampled [T]   task t fills at least one slot, labelled or not;
    #   present [T]   task t fills at least one labelled slot: the tasks whose
    #                 rows of the per-task parameters and optimizer state move
    #                 (optim.update's `active`). A task sampled but not present
    #                 is seen by the objective with weight 0.
    labelled, present = labelled_slots(ts, batch)
    sampled = jnp.zeros((num_tasks,), bool).at[ids].set(True)
    lin = jacobians.linearize(model, params, batch, needs=needs, slot_leaves=leaves,
                              one_pass=one_pass, slot_backwards=slot_backwards,
                              model_state=state.model_state)
    result = objective.gradients(lin, objectives.Inputs(   # traced ids for objectives
        jnp.asarray(ids), jnp.where(sampled & ~present, 0.0, weights),
        state.objective_state,
        params["tasks"].get(objective.name, {}), r_method))
    total, grads, pen = add_penalties(model, penalty, state, result.total, result.grads)
    # A gradient has its parameter's dtype (an objective's own gradients, e.g.
    # imtl's scales, are computed from float64 losses under jax_enable_x64).
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    tag = (tag_measurements(lin, params, ids, tag_lr, num_tasks, labelled) if tag_lr > 0
           else {})
    lr_scale = None if state.hparams is None else state.hparams["lr_scale"]

    def moved():
      new_params, opt_state = optim.update(tx, grads, state.opt_state, params, rows,
                                           present, lr_scale)
      new_losses = lin.loss_at(new_params) if objective.needs_new_losses else None
      obj_state = objective.after_update(result.state, lin.losses, jnp.asarray(ids),
                                         new_losses)
      # The objective's state keeps the dtypes it was initialised with (its
      # statistics are declared float32): under jax_enable_x64 the float64
      # losses and gradients would otherwise change the carried state's type.
      obj_state = jax.tree.map(lambda new, old: new.astype(old.dtype), obj_state,
                               state.objective_state)
      return {"params": new_params, "opt_state": opt_state, "objective_state": obj_state,
              "model_state": lin.model_state}

    # A non-finite loss or gradient never reaches the state (the last good one
    # stays). The update runs inside the taken branch, so XLA updates the
    # (donated) state in place rather than materialising a new one to choose
    # from (a copy of the parameters and optimizer state per step).
    finite = jnp.isfinite(total) & all_finite(grads)
    kept = jax.lax.cond(finite, moved,
                        lambda: {k: getattr(state, k) for k in
                                 ("params", "opt_state", "objective_state", "model_state")})
    new_state = state._replace(
        **kept, step=state.step + 1,
        nonfinite_skipped=state.nonfinite_skipped + (~finite).astype(jnp.int32))
    return new_state, step_measurements(
        total, lin.losses, ids, num_tasks, result.measurements, pen, tag,
        nonfinite_measurements(finite, state.step, lin.losses, ids, num_tasks),
        labelled=labelled)

  return one_step


def _scan_steps(one_step: Callable, steps_per_call: int, host_batches: bool) -> Callable:
  """``steps_per_call`` steps per call under ``lax.scan``, their measurements
  summed (``nonfinite_first``: the minimum); one step is returned as it is."""
  if steps_per_call == 1:  # a plain step: no loop to pay for
    return one_step

  def train_step(state, data):
    if host_batches:  # one batch per step
      state, meas = jax.lax.scan(one_step, state, data)
    else:
      state, meas = jax.lax.scan(lambda s, _: one_step(s, data), state, None,
                                 length=steps_per_call)
    return state, {k: jax.tree.map(
        lambda a, k=k: a.min(axis=0) if k == "nonfinite_first" else a.sum(axis=0), m)
                   for k, m in meas.items()}

  return train_step


# ----------------------------------------------------------------------------
# Evaluation: every example of every task, in chunks.
# ----------------------------------------------------------------------------


def make_eval_step(model: multitask.Model, *, label_mean: np.ndarray,
                   label_std: np.ndarray, num_examples: int, batch_size: int,
                   dense_convention: str = "exact", shared_inputs: bool = False) -> Callable:
  """Returns ``eval_step(params, split, model_state=None) -> {"sums": {group:
  {metric: [T]}}, "count": [T], "dense": {group: sums}}`` over every example
  of every task (not jitted); a model with state runs in eval mode on
  ``model_state`` (batch norm with its running averages).

  ``num_examples`` is the padded example axis of the split (static). A split
  may carry its own ``label_mean`` / ``label_std`` (cross-validation folds).
  ``shared_inputs``: every task reads the same examples of one input source
  (:func:`mtljax.data.sampling.check_shared_inputs`, as the train step's
  sampler): a chunk's inputs are gathered once and a model's task-independent
  part (``encode``) runs once on them, then every task's ``decode``.
  A dense group's sums are :mod:`mtljax.dense.metrics`' (stacked over the
  group's tasks, under ``dense_convention``) plus its pixel loss's sum and
  count; the per-example groups' are metric sums over labelled examples.
  """
  ts = model.taskset
  num_tasks = len(ts)
  chunk = int(min(batch_size, num_examples))
  num_chunks = math.ceil(num_examples / chunk)
  task_ids = jnp.arange(num_tasks, dtype=jnp.int32)
  ts_arrays = {"local_index": jnp.asarray(ts.local_index)}

  chunk_sums = _chunk_sums(model, dense_convention, shared_inputs)

  def eval_step(params, split, model_state=None):
    m = jnp.asarray(split.get("label_mean", label_mean))[:, None]
    sd = jnp.asarray(split.get("label_std", label_std))[:, None]

    def body(acc, c):
      pos = c * chunk + jnp.arange(chunk)
      valid = pos[None, :] < split["n"][:, None]                      # [T, C]
      idx = jnp.broadcast_to(jnp.minimum(pos, num_examples - 1), (num_tasks, chunk))
      if shared_inputs:
        x, ys = sampling.gather_shared_batch(split, ts_arrays, task_ids, idx[0])
      else:
        x, ys = sampling.gather_batch(split, ts_arrays, task_ids, idx)
      return jax.tree.map(jnp.add, acc, chunk_sums(params, x, ys, valid, m, sd,
                                                   model_state)), None

    acc, _ = jax.lax.scan(body, eval_zeros(ts, dense_convention), jnp.arange(num_chunks))
    return acc

  return eval_step


def eval_zeros(taskset: tasks_lib.TaskSet, dense_convention: str = "exact") -> dict:
  """An evaluation's empty sums: ``{"sums": {group: {metric: [T]}}, "count":
  [T], "dense": {group: sums [T_g, ...]}}`` (:func:`make_eval_step`)."""
  zeros = jnp.zeros((len(taskset),), jnp.float32)
  dense = {}
  for g in taskset.groups:
    task = taskset.group_task(g)
    if task.dense:
      one = {**dense_metrics.zero_sums(task.kind, task.num_classes, dense_convention),
             "loss_sum": np.zeros((), np.float32), "loss_count": np.zeros((), np.int32)}
      rows = len(taskset.group_members(g))
      dense[g] = {k: jnp.zeros((rows,) + v.shape, v.dtype) for k, v in one.items()}
  return {"sums": {g: {k: zeros for k in taskset.group_task(g).metric_names}
                   for g in taskset.groups if not taskset.group_task(g).dense},
          "count": jnp.zeros((len(taskset),), jnp.int32), "dense": dense}


def _chunk_sums(model: multitask.Model, dense_convention: str = "exact",
                shared_inputs: bool = False) -> Callable:
  """``sums(params, x [T, C, ...] (or [C, ...], read by every task), ys
  {group: [T, C, ...]}, valid [T, C], mean [T, 1], std [T, 1], model_state)``:
  one chunk's metric sums and counts per task,
  over the valid examples each task labels (missing labels,
  :func:`mtljax.tasks.label_mask`, are neither summed nor counted; a dense
  task's missing pixels neither)."""
  ts = model.taskset
  task_ids = jnp.arange(len(ts), dtype=jnp.int32)
  group_of = jnp.asarray(ts.group_of_task)

  def sums(params, x, ys, valid, m, sd, model_state=None):
    outs = _eval_outputs(model, params, x, task_ids, model_state, shared_inputs)
    out, dense = {}, {}
    count = jnp.zeros((len(ts),), jnp.int32)
    for gi, g in enumerate(ts.groups):
      task = ts.group_task(g)
      if task.dense:
        members = ts.group_members(g)
        dense[g], labelled = _dense_chunk_sums(task, outs[g][members], ys[g][members],
                                               valid[members], dense_convention)
        count = count.at[members].add(labelled)
        continue
      vals = tasks_lib.example_metrics(task, outs[g], ys[g], m, sd)
      mask = valid & (group_of == gi)[:, None] & tasks_lib.label_mask(task, ys[g])
      out[g] = {k: jnp.sum(jnp.where(mask, v, 0.0), axis=1) for k, v in vals.items()}
      count = count + mask.sum(axis=1).astype(jnp.int32)
    return {"sums": out, "count": count, "dense": dense}
  return sums


def _eval_outputs(model: multitask.Model, params, x, task_ids, model_state, shared: bool):
  """Every task's outputs in eval mode on ``x [T, C, ...]``, or with
  ``shared`` on ``x [C, ...]`` read by every task: the task-independent part
  once, then each task's (the whole model per task when it has no such part)."""
  if not shared:
    return multitask.forward(model, params, x, task_ids, model_state, train=False)[0]
  if model.encode is None:
    xs = jnp.broadcast_to(x, task_ids.shape + x.shape)
    return multitask.forward(model, params, xs, task_ids, model_state, train=False)[0]
  sh_state, task_state = (None, None) if model_state is None else (
      model_state["shared"], model_state["tasks"])
  rep, _ = multitask.encoder(model, params["shared"], x, sh_state, train=False)
  return multitask.decoder(model, params["tasks"], rep, x, task_ids, task_state,
                           train=False)[0]


def _dense_chunk_sums(task: tasks_lib.Task, out, y, valid, convention: str):
  """A dense group's chunk: per task (rows of ``out [T_g, C, H, W, c]``) the
  metrics' sums over its valid examples' valid pixels, the pixel loss's sum
  and count, and the number of labelled examples ``[T_g]``."""
  valid = valid & tasks_lib.example_mask(task, y)                     # [T_g, C]

  def one(o, yy, v):
    got = dense_metrics.batch_sums(task.kind, o, yy, v[:, None, None], convention)
    pix = tasks_lib.label_mask(task, yy) & v[:, None, None]
    loss = tasks_lib.example_loss(task, o, yy)
    return {**got, "loss_sum": jnp.sum(jnp.where(pix, loss, 0.0)),
            "loss_count": jnp.sum(pix, dtype=jnp.int32)}
  return jax.vmap(one)(out, y, valid), valid.sum(axis=1).astype(jnp.int32)


def make_chunk_eval_step(model: multitask.Model, *, label_mean: np.ndarray,
                         label_std: np.ndarray, dense_convention: str = "exact",
                         shared_inputs: bool = False) -> Callable:
  """``chunk_step(params, chunk, model_state=None) -> sums`` for one chunk the host pipeline
  read (``{"x" [T, C, ...], "y" {group: [T, C]}, "valid" [T, C]}``); the sums
  of every chunk add up to :func:`make_eval_step`'s result (not jitted)."""
  chunk_sums = _chunk_sums(model, dense_convention, shared_inputs)
  m = jnp.asarray(label_mean)[:, None]
  sd = jnp.asarray(label_std)[:, None]
  return lambda params, chunk, model_state=None: chunk_sums(
      params, chunk["x"][0] if shared_inputs else chunk["x"], chunk["y"], chunk["valid"], m,
      sd, model_state)


def eval_metrics(taskset: tasks_lib.TaskSet, acc) -> dict[str, dict[str, float]]:
  """``{task: {metric: value}}`` from an eval step's sums and counts (a dense
  task's from its split sums: :func:`mtljax.dense.metrics.finalize`, under the
  convention they were taken with, and its loss over every valid pixel)."""
  acc = jax.device_get(acc)
  out = {}
  for i, t in enumerate(taskset):
    if t.dense:
      row = int(taskset.local_index[i])
      sums = {k: np.asarray(v)[row] for k, v in acc["dense"][t.group].items()}
      loss = float(sums.pop("loss_sum")) / max(int(sums.pop("loss_count")), 1)
      out[t.name] = {"loss": loss, **dense_metrics.finalize(
          t.kind, sums, dense_metrics.convention_of(t.kind, sums))}
      continue
    n = max(int(acc["count"][i]), 1)
    out[t.name] = {k: float(acc["sums"][t.group][k][i]) / n for k in t.metric_names}
  return out
