"""Tasks: ``T_i = {p_i(x), p_i(y|x), L_i}`` as data plus pure functions.

A :class:`Task` names a supervised problem and carries its kind (which fixes the
per-example loss, the metrics, and the size of the output head). A
:class:`TaskSet` is an ordered tuple of tasks plus the bookkeeping that lets
tasks of different kinds and head sizes be trained in one compiled step: tasks
with the same ``(kind, out_dim)`` form a **task group**; each group's heads are
stacked on a leading axis and vmapped on their own.

Losses and metrics are written once here, per kind:

* ``classification`` (``num_classes`` >= 2): softmax cross-entropy; metrics
  ``accuracy`` (higher is better) and ``loss``.
* ``binary``: sigmoid cross-entropy on one logit; ``accuracy`` and ``loss``.
* ``regression`` (scalar target): squared error on the per-task *normalised*
  label (so scales are comparable across tasks, as the lecture asks); metrics
  ``mse`` and ``mae`` in the label's original units, and ``loss`` (normalised).
* the **dense** kinds (:data:`mtljax.dense.DENSE_KINDS`, one label per pixel;
  losses and masks in :mod:`mtljax.dense.losses`): ``segmentation``
  (``num_classes`` >= 2; label ``[H, W]`` int, -1 = ignored pixel;
  cross-entropy), ``depth`` (label ``[H, W, 1]``, 0 = missing; L1) and
  ``normals`` (label ``[H, W, 3]``, all-zero = missing; 1 - cosine). A slot's
  loss is the mean over **every valid pixel of its batch**
  (:func:`mtljax.dense.losses.masked_pixel_mean`, as the published code
  reduces), not a mean of per-image means. Their metrics are exact over a
  split (:mod:`mtljax.dense.metrics`: sums on the device, finalised on the
  host), not means of per-example values.

**Missing labels.** An example may be labelled for only some tasks. The mask
travels in the labels themselves: an unlabelled entry holds :func:`missing_label`
(``-1`` for classification and binary, as TFDS's ``ClassLabel`` writes "no
label"; NaN for regression), and :func:`label_mask` reads it back. Losses are
means over each slot's *labelled* examples (:func:`slot_losses`; a slot with no
labelled example has loss 0 and gradient 0), and metrics are sums over labelled
examples, divided by their count. How the mask enters from a data set is
:func:`mtljax.data.task_data.mark_missing`'s (a ``<label>_mask`` feature, or ``-1``).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtljax import dense

KINDS = ("classification", "binary", "regression") + dense.DENSE_KINDS

# Whether a larger value of each metric is better; used by reports and Delta_m.
METRIC_DIRECTIONS = {
    "accuracy": "higher",
    "loss": "lower",
    "mse": "lower",
    "mae": "lower",
    **dense.DENSE_METRIC_DIRECTIONS,
}


@dataclasses.dataclass(frozen=True)
class Task:
  """One supervised task.

  Attributes:
    name: unique name, used in measurement names (``eval/<name>/accuracy``).
    kind: one of :data:`KINDS`.
    num_classes: number of classes for ``classification`` and
      ``segmentation``; ignored otherwise.
  """

  name: str
  kind: str
  num_classes: int = 0

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"Task name must be a non-empty string, got {self.name!r}.")
    if "/" in self.name:
      raise ValueError(f"Task name {self.name!r} must not contain '/'.")
    if self.kind not in KINDS:
      raise ValueError(
          f"Task {self.name!r}: unknown kind {self.kind!r}; expected one of {KINDS}.")
    if self.kind in ("classification", "segmentation") and self.num_classes < 2:
      raise ValueError(
          f"Task {self.name!r}: {self.kind} needs num_classes >= 2, "
          f"got {self.num_classes}.")

  @property
  def dense(self) -> bool:
    """One label per pixel (a dense kind), not one per example."""
    return self.kind in dense.DENSE_KINDS

  @property
  def out_dim(self) -> int:
    """The head's outputs per example (per pixel for a dense kind)."""
    if self.dense:
      return dense.losses.out_channels(self.kind, self.num_classes)
    return self.num_classes if self.kind == "classification" else 1

  @property
  def group(self) -> str:
    """Tasks with equal ``group`` share a stacked head: same kind and size."""
    return f"{self.kind}{self.out_dim}"

  @property
  def label_dtype(self):
    return (np.int32 if self.kind in ("classification", "binary", "segmentation")
            else np.float32)

  @property
  def metric_names(self) -> tuple[str, ...]:
    if self.dense:
      return ("loss",) + dense.METRIC_NAMES[self.kind]
    if self.kind == "regression":
      return ("loss", "mse", "mae")
    return ("loss", "accuracy")


@dataclasses.dataclass(frozen=True)
class TaskSet:
  """An ordered, non-empty set of tasks and its task groups.

  Attributes:
    tasks: the tasks, in the order of the task axis of every stacked array.
    stream_ids: one int per task that seeds the task's own random streams
      (per-task parameter initialisation and example sampling). Defaults to the
      task's index; :meth:`subset` keeps the original ids, so a single-task run
      of a subset sees exactly the random numbers that task saw in the full run.
  """

  tasks: tuple[Task, ...]
  stream_ids: tuple[int, ...] = ()

  def __post_init__(self):
    tasks = tuple(self.tasks)
    if not tasks:
      raise ValueError("TaskSet is empty: at least one task is required.")
    names = [t.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
      raise ValueError(f"TaskSet has duplicate task names: {dupes}.")
    object.__setattr__(self, "tasks", tasks)
    ids = tuple(self.stream_ids) or tuple(range(len(tasks)))
    if len(ids) != len(tasks):
      raise ValueError(
          f"TaskSet: {len(ids)} stream_ids for {len(tasks)} tasks.")
    object.__setattr__(self, "stream_ids", tuple(int(i) for i in ids))

  def __len__(self) -> int:
    return len(self.tasks)

  def __iter__(self):
    return iter(self.tasks)

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(t.name for t in self.tasks)

  def index(self, name: str) -> int:
    try:
      return self.names.index(name)
    except ValueError:
      raise KeyError(f"Unknown task {name!r}; tasks are {list(self.names)}.") from None

  def subset(self, names: Sequence[str]) -> "TaskSet":
    """The tasks named, in the order given, keeping their stream ids."""
    if isinstance(names, str):
      names = [names]
    idx = [self.index(n) for n in names]
    return TaskSet(tuple(self.tasks[i] for i in idx),
                   tuple(self.stream_ids[i] for i in idx))

  # --- task groups --------------------------------------------------------

  @property
  def groups(self) -> tuple[str, ...]:
    """Group names in order of first appearance."""
    return tuple(dict.fromkeys(t.group for t in self.tasks))

  def group_members(self, group: str) -> np.ndarray:
    """Global task indices in ``group``, in task order: ``[T_g]`` int32."""
    return np.array([i for i, t in enumerate(self.tasks) if t.group == group],
                    np.int32)

  def group_task(self, group: str) -> Task:
    """A representative task of ``group`` (all members share kind and size)."""
    return self.tasks[int(self.group_members(group)[0])]

  @property
  def group_of_task(self) -> np.ndarray:
    """``[T]`` int32: index into :attr:`groups` of each task."""
    gs = self.groups
    return np.array([gs.index(t.group) for t in self.tasks], np.int32)

  @property
  def grouped_order(self) -> np.ndarray:
    """``[T]`` int32: every task once, each group's tasks contiguous (groups in
    :attr:`groups` order, tasks in task order within a group) -- the static slot
    layout of a step that trains every task (see :func:`static_group_slices`)."""
    return np.concatenate([self.group_members(g) for g in self.groups]).astype(np.int32)

  @property
  def local_index(self) -> np.ndarray:
    """``[T]`` int32: each task's row inside its group's stacked arrays."""
    out = np.zeros(len(self.tasks), np.int32)
    for g in self.groups:
      members = self.group_members(g)
      out[members] = np.arange(len(members))
    return out


# ----------------------------------------------------------------------------
# Per-example losses and metrics, by group (all tasks in a group share them).
# ----------------------------------------------------------------------------


def missing_label(task: Task):
  """The value an unlabelled entry holds in a task's label arrays: ``-1`` for
  classification, binary and segmentation (int labels), NaN for regression, 0
  for depth and normals (a missing depth, an all-zero normal)."""
  if task.kind == "regression":
    return np.float32(np.nan)
  if task.kind in ("depth", "normals"):
    return np.float32(0.0)
  return task.label_dtype(-1)


def label_mask(task: Task, y):
  """Bool, whether each entry of the labels ``y`` (numpy or jax, of any task
  of the group) is a label rather than :func:`missing_label`: ``[...]`` for
  ``y [...]``; for a dense kind one entry per pixel, ``[..., H, W]``
  (:func:`mtljax.dense.losses.pixel_mask`)."""
  if task.dense:
    return dense.pixel_mask(task.kind, y)
  if task.kind == "regression":
    return y == y  # not NaN
  return y >= 0


def example_mask(task: Task, y):
  """``[...]`` bool, whether each example of ``y`` (``[...]``, or ``[..., H,
  W(, C)]`` for a dense kind) is labelled: for a dense kind, whether any of
  its pixels is."""
  m = label_mask(task, y)
  if task.dense:
    xp = np if isinstance(m, np.ndarray) else jnp
    return xp.any(m, axis=(-2, -1))
  return m


def fill_missing(task: Task, y):
  """``y`` with unlabelled entries set to 0 (a valid label, so losses and their
  gradients stay finite before they are masked). Dense labels are returned as
  they are (:func:`mtljax.dense.losses.pixel_loss` is finite on missing
  pixels)."""
  if task.dense:
    return y
  return jnp.where(label_mask(task, y), y, jnp.zeros((), y.dtype))


def example_loss(task: Task, out: jax.Array, y: jax.Array) -> jax.Array:
  """Per-example training loss.

  Args:
    task: any task of the group (only kind and size are used).
    out: ``[..., out_dim]`` model outputs (logits or normalised prediction).
    y: ``[...]`` labels: int class ids, {0,1} for binary, normalised floats;
      unlabelled entries (:func:`missing_label`) get the finite loss of label
      0, for the caller to mask (:func:`label_mask`).

  Returns:
    ``[...]`` float32 losses; ``[..., H, W]`` per-pixel losses for a dense
    kind (``out [..., H, W, C]``, :func:`mtljax.dense.losses.pixel_loss`).
  """
  if task.dense:
    return dense.pixel_loss(task.kind, out, y)
  y = fill_missing(task, y)
  if task.kind == "classification":
    logz = jax.nn.logsumexp(out, axis=-1)
    picked = jnp.take_along_axis(out, y[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return logz - picked
  if task.kind == "binary":
    logit = out[..., 0]
    yf = y.astype(logit.dtype)
    # log(1 + e^z) - y z, stable.
    return jax.nn.softplus(logit) - yf * logit
  err = out[..., 0] - y
  return err * err


def static_group_slices(taskset: TaskSet, task_ids) -> dict[str, slice] | None:
  """``{group: slice of the slots holding its tasks}`` when ``task_ids`` is a
  concrete numpy array whose groups occupy contiguous slots (as
  :attr:`TaskSet.grouped_order` does); None for traced ids or interleaved groups.

  With a static layout, heads and losses are computed for each group's own
  slots only (half the head work with two groups), instead of for every slot
  and masked.
  """
  if not isinstance(task_ids, np.ndarray):
    return None
  group_of = taskset.group_of_task[task_ids]
  out = {}
  for gi, g in enumerate(taskset.groups):
    pos = np.flatnonzero(group_of == gi)
    if len(pos) and not np.array_equal(pos, np.arange(pos[0], pos[0] + len(pos))):
      return None
    out[g] = slice(int(pos[0]), int(pos[0]) + len(pos)) if len(pos) else slice(0, 0)
  return out


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of ``values [..., B]`` over the entries where ``mask [..., B]`` holds
  (0 where none does): ``sum(mask * values) / max(sum(mask), 1)``."""
  total = jnp.sum(jnp.where(mask, values, jnp.zeros((), values.dtype)), axis=-1)
  count = jnp.sum(mask.astype(values.dtype), axis=-1)
  # times the reciprocal, as XLA computes a mean (division by a constant):
  # with every entry labelled this equals jnp.mean bitwise.
  return total * (1.0 / jnp.maximum(count, jnp.ones((), values.dtype)))


def slot_masks(taskset: TaskSet, ys: dict, task_ids) -> jax.Array:
  """``[K, B]`` bool: which of each slot's examples its task labels (read from
  the labels of the slot's own group, :func:`example_mask`)."""
  group_of = jnp.asarray(taskset.group_of_task)[jnp.asarray(task_ids)]
  mask = None
  for gi, g in enumerate(taskset.groups):
    m = (group_of == gi)[:, None] & example_mask(taskset.group_task(g), ys[g])
    mask = m if mask is None else mask | m
  return mask


def batch_mean_loss(task: Task, out: jax.Array, y: jax.Array) -> jax.Array:
  """``[...]`` the loss of a batch of each slot: the mean of :func:`example_loss`
  over the labelled examples of ``out [..., B, out]`` / ``y [..., B]``
  (:func:`masked_mean`), or for a dense kind over every valid pixel of the
  batch (``out [..., B, H, W, C]``; :func:`mtljax.dense.losses.masked_pixel_mean`).
  0, with gradient 0, when nothing is labelled."""
  if task.dense:
    return dense.masked_pixel_mean(example_loss(task, out, y), label_mask(task, y))
  return masked_mean(example_loss(task, out, y), label_mask(task, y))


def slot_losses(taskset: TaskSet, outs: dict, ys: dict, task_ids: jax.Array) -> jax.Array:
  """``[K]`` mean loss of each slot's task over its labelled examples among
  its ``B`` (:func:`batch_mean_loss`: 0, with gradient 0, when none is
  labelled; over the valid pixels of the batch for a dense kind).

  ``outs``: ``{group: [K, B, out]}`` (``[K, B, H, W, C]`` for a dense group;
  every group computed for every slot); ``ys``: ``{group: [K, B(, H, W,
  ...)]}``; slot k's loss is read from its task's group. With a static slot
  layout (:func:`static_group_slices`) each group's loss is computed on its
  own slots only.
  """
  slices = static_group_slices(taskset, task_ids)
  if slices is not None:
    pieces = []
    for g, s in slices.items():
      if s.stop > s.start:
        task = taskset.group_task(g)
        pieces.append((s.start, batch_mean_loss(task, outs[g][s], ys[g][s])))
    return jnp.concatenate([p for _, p in sorted(pieces, key=lambda e: e[0])])
  group_of = jnp.asarray(taskset.group_of_task)[task_ids]
  losses = jnp.zeros(task_ids.shape, jnp.float32)
  for gi, g in enumerate(taskset.groups):
    per_slot = batch_mean_loss(taskset.group_task(g), outs[g], ys[g])
    losses = losses + jnp.where(group_of == gi, per_slot, 0.0)
  return losses


def example_metrics(task: Task, out: jax.Array, y: jax.Array,
                    mean: jax.Array, std: jax.Array) -> dict[str, jax.Array]:
  """Per-example metric values (to be summed and divided by a count).

  ``mean``/``std`` are the task's label statistics (broadcastable to ``y``);
  regression metrics are reported in the label's original units. Unlabelled
  entries get finite values, for the caller to mask (:func:`label_mask`).
  A dense kind's metrics are not per-example values (they are exact over a
  split: :mod:`mtljax.dense.metrics`), so it is refused here.
  """
  if task.dense:
    raise ValueError(f"Task {task.name!r}: a {task.kind} task's metrics are split sums "
                     "(mtljax.dense.metrics), not per-example values.")
  y = fill_missing(task, y)
  metrics = {"loss": example_loss(task, out, y)}
  if task.kind == "classification":
    metrics["accuracy"] = (jnp.argmax(out, axis=-1) == y).astype(jnp.float32)
  elif task.kind == "binary":
    metrics["accuracy"] = ((out[..., 0] > 0) == (y > 0)).astype(jnp.float32)
  else:
    err = (out[..., 0] - y) * std  # prediction and label de-normalised alike
    metrics["mse"] = err * err
    metrics["mae"] = jnp.abs(err)
  return metrics


def task_weights(taskset: TaskSet, weights: Mapping[str, float] | Sequence[float] | None
                 ) -> np.ndarray:
  """``[T]`` float32 weights ``w_i`` from a mapping name->w or a full sequence.

  Tasks missing from a mapping get weight 1. Unknown names, a sequence of the
  wrong length, negative or non-finite weights, and every weight 0 (nothing
  would train) raise.
  """
  w = np.ones(len(taskset), np.float32)
  if weights is None:
    return w
  if isinstance(weights, Mapping):
    for name, value in weights.items():
      w[taskset.index(name)] = float(value)
  else:
    weights = list(weights)
    if not weights:
      return w
    if len(weights) != len(taskset):
      raise ValueError(
          f"Task weights: got {len(weights)} values for {len(taskset)} tasks "
          f"{list(taskset.names)}.")
    w[:] = np.asarray(weights, np.float32)
  if not np.all(np.isfinite(w)) or np.any(w < 0):
    raise ValueError(f"Task weights must be finite and >= 0, got {w.tolist()}.")
  if not np.any(w > 0):
    raise ValueError(f"Task weights are all 0 for tasks {list(taskset.names)}: nothing would "
                     "train; give at least one task a weight > 0.")
  return w
