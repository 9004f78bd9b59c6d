"""Task and example sampling: pure, jittable functions of an rng.

The lecture's recipe samples a mini-batch of tasks *uniformly, whatever each
task's data size*, then a mini-batch of examples per sampled task. Task
distributions:

* ``uniform``:       ``p_i = 1 / T``
* ``proportional``:  ``p_i = N_i / sum_j N_j``
* ``temperature``:   ``p_i ∝ N_i^(1/tau)`` (tau = 1 is proportional, tau -> inf
  is uniform)

``sample_tasks(..., replace=True)`` draws K i.i.d. tasks from ``p``, so each
task's frequency is exactly ``p_i``. ``replace=False`` (the default) draws K
*distinct* tasks by successive sampling from ``p`` (Gumbel top-k, i.e.
Plackett-Luce): for uniform ``p`` every K-subset is equally likely and with
``K = T`` every task is in every step; for non-uniform ``p`` the inclusion
probabilities are those of successive sampling, not ``K p_i``.

Examples: by default every slot draws its own B examples
(:func:`example_indices`). With *shared inputs* (``config.sampling.shared_inputs``,
:func:`shared_example_indices`) one draw of B examples serves every slot -- the
multi-label setting where all tasks label the same inputs, which methods that
differentiate through one shared representation (MGDA-UB) require.

**One step's draw** (:func:`sample_indices`, with the keys of
:func:`step_keys`) is the single definition both data paths read: the compiled
step gathers those examples on the device (:func:`mtljax.steps.sample_batch`),
the host pipeline (:mod:`mtljax.data.pipeline`) reads those records. A
:class:`Sampler` (:func:`make_sampler`) holds what the draw needs; a run builds
it once (:func:`mtljax.build.build_run`) and hands it to both.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtljax import tasks as tasks_lib

SAMPLERS = ("uniform", "proportional", "temperature")


def task_probabilities(sampler: str, sizes, temperature: float = 1.0) -> np.ndarray:
  """``[T]`` float64 task probabilities for a sampler name and data sizes."""
  sizes = np.asarray(sizes, np.float64)
  if sizes.ndim != 1 or sizes.size == 0:
    raise ValueError(f"task sizes must be a non-empty vector, got shape {sizes.shape}.")
  if np.any(sizes <= 0):
    raise ValueError(f"every task needs at least one training example, sizes={sizes}.")
  if sampler == "uniform":
    p = np.ones_like(sizes)
  elif sampler == "proportional":
    p = sizes
  elif sampler == "temperature":
    if not temperature > 0:
      raise ValueError(f"temperature must be > 0, got {temperature}.")
    p = sizes ** (1.0 / temperature)
  else:
    raise ValueError(f"task_sampler={sampler!r} is not one of {SAMPLERS}.")
  return p / p.sum()


def sample_tasks(rng: jax.Array, probs: jax.Array, num_tasks: int,
                 replace: bool = False) -> jax.Array:
  """``[K]`` int32 task ids (see module docstring for ``replace``). The draws
  are float32 whatever ``probs``' dtype (the same tasks under jax_enable_x64)."""
  logp = jnp.log(jnp.asarray(probs, jnp.float32))
  if replace:
    return jax.random.categorical(rng, logp, shape=(num_tasks,)).astype(jnp.int32)
  g = jax.random.gumbel(rng, logp.shape, logp.dtype)
  _, ids = jax.lax.top_k(logp + g, num_tasks)
  return ids.astype(jnp.int32)


def occurrence_index(task_ids: jax.Array) -> jax.Array:
  """``[K]``: how many earlier slots hold the same task (0 for a first draw)."""
  k = task_ids.shape[0]
  same = task_ids[:, None] == task_ids[None, :]
  earlier = jnp.tril(jnp.ones((k, k), bool), -1)
  return jnp.sum(same & earlier, axis=1).astype(jnp.int32)


def example_indices(rng: jax.Array, task_ids: jax.Array, stream_ids: jax.Array,
                    n: jax.Array, batch_size: int) -> jax.Array:
  """``[K, B]`` example indices, i.i.d. uniform over each task's examples.

  The key of slot k is ``fold_in(fold_in(rng, stream_ids[t]), occurrence)``,
  so a task's examples depend on its stream id, not on which slot it fell in
  nor on the other tasks sampled.
  """
  occ = occurrence_index(task_ids)

  def one(t, o):
    key = jax.random.fold_in(jax.random.fold_in(rng, stream_ids[t]), o)
    return jax.random.randint(key, (batch_size,), 0, n[t], jnp.int32)

  return jax.vmap(one)(task_ids, occ)


def check_shared_inputs(split: dict, task_names=None) -> None:
  """Raises unless every task reads the same inputs (one source, same size).

  Call it on host arrays before compiling a step with shared inputs.
  """
  source = np.asarray(split["source"])
  n = np.asarray(split["n"])
  names = list(task_names) if task_names is not None else [str(i) for i in range(len(n))]
  if len(set(source.tolist())) != 1 or len(set(n.tolist())) != 1:
    detail = ", ".join(f"{a}: source {s}, {c} examples" for a, s, c in zip(names, source, n))
    raise ValueError(
        "shared_inputs=True needs every task to label the same inputs "
        f"(one input source, equal sizes); here {detail}.")


def shared_example_indices(rng: jax.Array, task_ids: jax.Array, n: jax.Array,
                           batch_size: int) -> jax.Array:
  """``[K, B]`` indices, the same B i.i.d. uniform draws for every slot (the
  tasks share one input source of ``n[task_ids[0]]`` examples; see
  :func:`check_shared_inputs`)."""
  idx = jax.random.randint(rng, (batch_size,), 0, n[task_ids[0]], jnp.int32)
  return jnp.broadcast_to(idx, task_ids.shape + (batch_size,))


def gather_batch(split: dict, taskset_arrays: dict, task_ids: jax.Array,
                 idx: jax.Array) -> tuple[jax.Array, dict]:
  """Inputs ``[K, B, ...]`` and labels ``{group: [K, B]}`` for given indices.

  Args:
    split: a split's arrays (``x``, ``source``, ``y``) as laid out by
      :func:`mtljax.data.task_data.build_task_data`.
    taskset_arrays: ``{"local_index": [T]}`` from the task set.
    task_ids: ``[K]``; idx: ``[K, B]``.

  Labels of a group are gathered for every slot (rows of tasks outside the
  group read row 0 of that group and are masked by the loss).
  """
  x = split["x"][split["source"][task_ids][:, None], idx]
  return x, gather_labels(split["y"], taskset_arrays["local_index"], task_ids, idx)


def gather_labels(y: dict, local_index, task_ids, idx) -> dict:
  """Labels ``{group: [K, B]}`` of slots ``task_ids [K]`` at examples ``idx``
  (``[K, B]``, or ``[B]`` for every slot). Rows of tasks outside a group read
  row 0 of that group (masked by the loss). Missing labels come along as they
  are stored (:func:`mtljax.tasks.missing_label`: the label mask travels in
  the labels, :func:`mtljax.tasks.label_mask`). Works on numpy arrays (the
  host pipeline) and jax arrays (inside the step) alike."""
  local = local_index[task_ids]
  idx = idx if idx.ndim == 2 else idx[None, :]
  return {g: yg[local.clip(0, yg.shape[0] - 1)[:, None], idx] for g, yg in y.items()}


def gather_shared_batch(split: dict, taskset_arrays: dict, task_ids: jax.Array,
                        idx: jax.Array) -> tuple[jax.Array, dict]:
  """Inputs ``[B, ...]`` (once) and labels ``{group: [K, B]}`` when every slot
  reads the same examples ``idx [B]`` of one shared input source (see
  :func:`check_shared_inputs`)."""
  x = split["x"][split["source"][task_ids[0]], idx]
  return x, gather_labels(split["y"], taskset_arrays["local_index"], task_ids, idx)


# ----------------------------------------------------------------------------
# One step's draw: what the compiled step and the host pipeline share.
# ----------------------------------------------------------------------------


class Sampler(NamedTuple):
  """What drawing a step's tasks and examples needs (arrays closed over by the
  step; the host pipeline keeps host copies)."""
  probs: jax.Array          # [T] task distribution
  stream_ids: jax.Array     # [T] each task's stream id (its examples' key)
  local_index: jax.Array    # [T] each task's row in its group's label stack
  tasks_per_step: int       # K
  examples_per_task: int    # B
  replace: bool             # K i.i.d. tasks, else K distinct ones
  shared_inputs: bool       # one draw of B examples serves every slot
  all_tasks: np.ndarray | None = None  # K = T without replacement: the slots' tasks
  draws: int = 1            # independent example draws per step (MoDo, SDMGrad: 3)

  @property
  def slot_tasks(self) -> np.ndarray | None:
    """The static task of every slot of a step's batch (``all_tasks`` once
    per draw, :func:`sample_draws`), or None when the tasks are sampled."""
    return None if self.all_tasks is None else np.tile(self.all_tasks, self.draws)

  @property
  def shared_batch(self) -> bool:
    """Whether a step's batch holds one ``[B, ...]`` input read by every slot
    (shared inputs and one draw; with several draws each draw has its own)."""
    return self.shared_inputs and self.draws == 1


def make_sampler(taskset: tasks_lib.TaskSet, task_probs, tasks_per_step: int,
                 examples_per_task: int, replace: bool = False,
                 shared_inputs: bool = False, draws: int = 1) -> Sampler:
  """The :class:`Sampler` of ``taskset`` with task distribution ``task_probs``
  ``[T]``; with ``tasks_per_step == len(taskset)`` and no replacement every
  task is in every step, in the task set's grouped order (a static layout).
  ``draws``: independent mini-batches per step (:func:`sample_draws`; the
  objective's :attr:`mtljax.objectives.Objective.draws`)."""
  ts = taskset
  if isinstance(draws, bool) or not isinstance(draws, (int, np.integer)) or draws < 1:
    raise ValueError(f"make_sampler: draws must be an integer >= 1, got {draws!r}.")
  all_tasks = ts.grouped_order if tasks_per_step == len(ts) and not replace else None
  return Sampler(jnp.asarray(task_probs, jnp.float32), jnp.asarray(ts.stream_ids, jnp.int32),
                 jnp.asarray(ts.local_index), int(tasks_per_step), int(examples_per_task),
                 bool(replace), bool(shared_inputs), all_tasks, int(draws))


def step_keys(key: jax.Array, step) -> jax.Array:
  """The three keys of step ``step``: tasks, examples, the method's."""
  return jax.random.split(jax.random.fold_in(key, step), 3)


def sample_indices(sampler: Sampler, n: jax.Array, r_tasks, r_examples,
                   examples_per_task: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Task ids ``[K]`` and example indices: ``[B]`` shared by every slot, or
  ``[K, B]``, each below the task's ``n``. The one definition of a step's
  draw: the device path gathers these on the device, the host pipeline
  (:mod:`mtljax.data.pipeline`) reads these records. ``examples_per_task``
  overrides ``B`` (a process's share of it)."""
  s = sampler
  b = s.examples_per_task if examples_per_task is None else examples_per_task
  if s.all_tasks is not None:  # every task in every step: a static slot layout
    task_ids = jnp.asarray(s.all_tasks, jnp.int32)
  else:
    task_ids = sample_tasks(r_tasks, s.probs, s.tasks_per_step, s.replace)
  if s.shared_inputs:
    return task_ids, shared_example_indices(r_examples, task_ids, n, b)[0]
  return task_ids, example_indices(r_examples, task_ids, s.stream_ids, n, b)


# fold_in(r_examples, DRAW_STREAM) keys the draws after a step's first
# (:func:`draw_keys`): a stream of its own, so the first draw is the
# single-draw step's batch.
DRAW_STREAM = 0x647261


def draw_keys(r_examples: jax.Array, draws: int) -> jax.Array:
  """``[draws]`` example keys of a step: ``r_examples`` itself for draw 0
  (so a step's first draw is the batch a one-draw step reads), then
  ``fold_in(fold_in(r_examples, DRAW_STREAM), d)`` for draw ``d >= 1``."""
  extra = jax.random.fold_in(r_examples, DRAW_STREAM)
  later = [jax.random.fold_in(extra, d) for d in range(1, draws)]
  return jnp.stack([r_examples] + later)


def sample_draws(sampler: Sampler, n: jax.Array, r_tasks, r_examples,
                 examples_per_task: int | None = None) -> tuple[jax.Array, jax.Array]:
  """A step's ``D = sampler.draws`` independent mini-batches as one batch of
  ``D K`` slots: task ids ``[D K]`` (the step's K tasks, drawn once with
  ``r_tasks`` and repeated for every draw: draw d holds slots
  ``d K .. (d + 1) K - 1``) and example indices ``[D K, B]``, draw d's drawn
  as :func:`sample_indices` with draw d's key of :func:`draw_keys` (with
  shared inputs, draw d's ``B`` examples are read by each of its K slots).
  With ``D = 1`` this is :func:`sample_indices` itself (``[B]`` indices with
  shared inputs). Methods that need several independent estimates of the
  same tasks' gradients in one step (MoDo, SDMGrad: double sampling) read
  them from these slots; both data paths draw with this function."""
  if sampler.draws == 1:
    return sample_indices(sampler, n, r_tasks, r_examples, examples_per_task)
  keys = draw_keys(r_examples, sampler.draws)
  ids, idx = jax.vmap(lambda r: sample_indices(sampler, n, r_tasks, r, examples_per_task))(keys)
  k = ids.shape[1]
  if sampler.shared_inputs:                     # [D, B]: each draw's B, for its K slots
    idx = jnp.broadcast_to(idx[:, None, :], (sampler.draws, k, idx.shape[-1]))
  return ids.reshape(-1), idx.reshape(sampler.draws * k, idx.shape[-1])
