"""Task data: loaded splits checked and laid out as per-task arrays ready to
live on the device (:class:`MultiTaskData`, :func:`build_task_data`).

Per split, a dict of numpy arrays laid out for sampling inside a jitted step::

    {"x":      [S, N, *input_shape] float32   # S input sources, padded to N
     "source": [T] int32                      # which source each task reads
     "n":      [T] int32                      # valid examples of each task
     "y":      {group: [T_g, N, ...]}}        # labels, per task group

A dense task's labels keep their per-pixel axes (``[T_g, N, H, W]`` for
segmentation, ``[T_g, N, H, W, C]`` for depth and normals) and are checked by
:func:`mtljax.dense.losses.check_targets`; an example with no valid pixel is
an unlabelled example.

Tasks that read the same inputs (``multi_digits``' left and right digit, the two
``mmoe_synthetic`` targets) share one source, so the inputs are stored once.
Tasks with their own inputs (one sinusoid per task) each get a source.

Regression labels are normalised per task with the *train* split's mean and
standard deviation (kept in ``label_mean``/``label_std`` to report metrics in
original units). Inputs and labels are checked (NaN, label ranges) here, before
anything is compiled.

Examples labelled for only some tasks: a bool feature ``<label>_mask`` (True:
labelled), or the label -1 for classification and binary labels, marks a
missing label; the layout stores it as :func:`mtljax.tasks.missing_label`
(:func:`mark_missing`), and regression statistics use labelled examples only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np

from mtljax import dense
from mtljax import errors
from mtljax import tasks as tasks_lib
from mtljax.data import specs as specs_lib
from mtljax.data import tfds_access


@dataclasses.dataclass
class MultiTaskData:
  """A data set's tasks and its splits laid out as per-task arrays (module
  docstring), with the train split's regression label statistics."""
  name: str
  taskset: tasks_lib.TaskSet
  input_shape: tuple[int, ...]
  train: dict[str, Any]
  test: dict[str, Any]
  label_mean: np.ndarray  # [T]
  label_std: np.ndarray   # [T]
  # The whole train split's sizes when this process holds a shard of it.
  total_train: np.ndarray | None = None
  # The host pipeline's readers {split: mtljax.data.pipeline.Reader}: the
  # splits then hold record indices ``records [S, N]`` in place of ``x``.
  readers: dict | None = None

  @property
  def num_train(self) -> np.ndarray:
    """``[T]`` train examples per task (of the whole split, every process)."""
    return self.train["n"] if self.total_train is None else self.total_train

  def split(self, split: str) -> dict[str, Any]:
    return {"train": self.train, "test": self.test}[split]


def _as_inputs(x: np.ndarray) -> np.ndarray:
  if x.dtype == np.uint8:
    return x.astype(np.float32) / 255.0
  return x.astype(np.float32)


def _check_labels(name, split, task: tasks_lib.Task, y: np.ndarray, records=None,
                  labelled=None):
  """Raises on a NaN, infinite or out-of-range label among the ``labelled``
  entries (default: those not :func:`mtljax.tasks.missing_label`); a dense
  task's labels through :func:`mtljax.dense.losses.check_targets` (one line
  naming the first bad example)."""
  def where(pos):
    return f"example {pos}" if records is None else f"example {pos} (record {records[pos]})"
  if task.dense:
    _check_dense_labels(name, split, task, y, where, labelled)
    return
  labelled = tasks_lib.label_mask(task, y) if labelled is None else labelled
  finite = np.isfinite(y) if np.issubdtype(y.dtype, np.floating) else np.ones(y.shape, bool)
  finite |= ~labelled
  if not np.all(finite):
    bad = int(np.sum(~finite))
    raise ValueError(
        f"Data set {name!r}, split {split!r}, task {task.name!r}: {bad} NaN or infinite "
        f"label(s), the first at {where(int(np.flatnonzero(~finite)[0]))}.")
  if task.kind == "regression":
    return
  hi = task.num_classes if task.kind == "classification" else 2
  outside = labelled & ((y < 0) | (y >= hi))
  if np.any(outside):
    pos = int(np.flatnonzero(outside)[0])
    raise ValueError(
        f"Data set {name!r}, split {split!r}, task {task.name!r}: labels must be "
        f"in [0, {hi}) (-1: no label), found range [{y[labelled].min()}, "
        f"{y[labelled].max()}]; first outside: {where(pos)}, label {y[pos]}.")


def _check_dense_labels(name, split, task: tasks_lib.Task, y: np.ndarray, where, labelled):
  """:func:`mtljax.dense.losses.check_targets` on the ``labelled`` examples
  (``[N]``; default all), all at once, then, on an error, example by
  example to name the first bad one."""
  y = np.asarray(y)
  if labelled is not None:
    y = y[np.asarray(labelled, bool)]
  try:
    dense.check_targets(task.kind, y, task.num_classes)
  except errors.DataError:
    positions = (np.arange(len(y)) if labelled is None
                 else np.flatnonzero(np.asarray(labelled, bool)))
    for pos, yi in zip(positions, y):
      dense.check_targets(task.kind, yi, task.num_classes,
                          where=f"Data set {name!r}, split {split!r}, task {task.name!r}, "
                                f"{where(int(pos))}")
    raise


def mark_missing(name: str, spec: specs_lib.DataSpec, cols: dict, split: str,
                 records: bool = False) -> dict:
  """``cols`` with each label column's unlabelled examples set to
  :func:`mtljax.tasks.missing_label`, after checking the labelled ones.

  An example is unlabelled for a task when the optional bool feature
  ``<label>_mask`` (True: labelled) is False, or, for classification and
  binary labels, when the label is ``-1`` (TFDS ``ClassLabel``'s "no label").
  Any other bad label -- NaN or infinite (also in regression, unless its mask
  is False), or an integer outside ``[0, classes)`` -- raises, naming the
  example (and record)."""
  out = dict(cols)
  rec = cols.get(spec.input_key) if records else None
  for c in spec.columns:
    if c.label_key not in cols:
      continue  # reported by the caller
    y = np.asarray(cols[c.label_key])
    mask = cols.get(c.label_key + specs_lib.MASK_SUFFIX)
    per_example = y.shape[:1] if c.task.dense else y.shape  # a dense label is [N, H, W, ...]
    labelled = np.ones(per_example, bool) if mask is None else np.asarray(mask).astype(bool)
    if mask is not None and labelled.shape != per_example:
      raise ValueError(f"Data set {name!r}, split {split!r}: feature "
                       f"{c.label_key + specs_lib.MASK_SUFFIX!r} has shape "
                       f"{labelled.shape}, its label {c.label_key!r} {y.shape}.")
    task = c.task
    if task.kind not in ("regression",) + dense.DENSE_KINDS:  # a dense label masks pixels
      labelled &= y != -1
      if getattr(c, "classes_from_data", False):  # the class count comes later
        task = dataclasses.replace(task, num_classes=max(int(np.max(y, initial=0)) + 1, 2))
    _check_labels(name, split, task, y, rec, labelled)
    if not np.all(labelled):
      kind = np.float32 if c.task.kind == "regression" else y.dtype
      wide = labelled.reshape(labelled.shape + (1,) * (y.ndim - labelled.ndim))
      out[c.label_key] = np.where(wide, y, tasks_lib.missing_label(c.task)).astype(kind)
  return out


def _entries(name, spec: specs_lib.DataSpec, cols, split, records, limit):
  """``[(task, inputs, labels, column)]`` of one split; tasks reading the same
  inputs share one inputs array (``_layout`` stores it once)."""
  if spec.input_key not in cols:
    raise ValueError(f"Data set {name!r}, split {split!r} has no feature "
                     f"{spec.input_key!r}; it has {sorted(cols)}.")
  x = cols[spec.input_key] if records else _as_inputs(cols[spec.input_key])
  limit = limit or None
  if spec.split_key is None:
    x = x[:limit]
    return [(c.task, x, cols[c.label_key][:limit], c) for c in spec.columns]
  (template,) = spec.columns
  ids = cols[spec.split_key]
  out = []
  for v in np.unique(ids):
    task = dataclasses.replace(template.task, name=specs_lib.family_task_name(spec, v))
    sel = ids == v
    out.append((task, x[sel][:limit], cols[template.label_key][sel][:limit], template))
  return out


def all_process_max(values: np.ndarray) -> np.ndarray:
  """The elementwise maximum of ``values`` over every process (each calls
  this with the same shape); ``values`` itself with one process."""
  values = np.asarray(values)
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.max(np.asarray(multihost_utils.process_allgather(values)), axis=0)


def _classes_from_data(spec: specs_lib.DataSpec, entries, reduce_max=all_process_max):
  """``{split: [(task, x, y)]}`` from ``entries`` with the class count of each
  ``classes_from_data`` column set from its train labels: the maximum + 1
  over every task of a family (one group, one stacked head) and, through
  ``reduce_max`` (``[C] -> [C]``, one call, every process), over every
  process's shard of the train split (on the host pipeline a shard can miss a
  split's largest class)."""
  cols = [c for c in spec.columns if c.classes_from_data]
  counts = {}
  if cols:
    local = [max([int(np.max(y)) + 1 for _, _, y, cc in entries["train"]
                  if cc is c and len(y)] + [2]) for c in cols]
    counts = dict(zip(map(id, cols), (int(k) for k in reduce_max(np.asarray(local,
                                                                             np.int64)))))
  return {split: [(dataclasses.replace(t, num_classes=counts[id(c)]) if id(c) in counts
                   else t, x, y) for t, x, y, c in entries[split]]
          for split in tfds_access.SPLITS}


def build_task_data(name: str, spec: specs_lib.DataSpec | Sequence[specs_lib.DataSpec],
                    arrays: dict[str, dict[str, np.ndarray]],
                    *, task_names: Sequence[str] = (),
                    max_train_examples: int | None = None,
                    normalize_labels: bool = True, records: bool = False,
                    reduce_sums: Callable[[np.ndarray], np.ndarray] | None = None,
                    reduce_max: Callable[[np.ndarray], np.ndarray] = all_process_max
                    ) -> MultiTaskData:
  """Lays out loaded splits as per-task arrays (see module docstring).
  ``spec``: one spec, or one per source of a multi-source data set (each
  reading its own, prefixed, features of ``arrays``;
  :func:`mtljax.data.specs.prefixed`). ``normalize_labels=False`` keeps
  regression labels as they are (e.g. when they are already on a common scale
  and per-task statistics would leak per-task information into a pooled
  model).

  ``records=True`` (the host pipeline, :mod:`mtljax.data.pipeline`): the input
  column holds int64 *record indices* of the split's data source, not inputs,
  and the layout has ``records [S, N]`` in place of ``x``. ``reduce_sums``
  (several processes, each with its shard) sums per-task ``[T, 4]`` (count,
  labelled count, sum, sum of squares) statistics over processes, so
  regression labels are normalised with the whole split's mean and standard
  deviation and ``num_train`` holds the whole split's sizes. ``reduce_max``
  (default: over every process, :func:`all_process_max`) makes a class count
  taken from the train labels (a plain integer label as classification) the
  largest over every process's shard, so all processes build one model."""
  source_specs = (spec,) if isinstance(spec, specs_lib.DataSpec) else tuple(spec)
  per_split_tasks = _tasks_per_split(name, source_specs, arrays, records, max_train_examples,
                                     reduce_max)
  train_names = _check_same_tasks(name, per_split_tasks)
  selected = _selected_tasks(name, task_names, train_names)
  taskset = tasks_lib.TaskSet(
      tuple(per_split_tasks["train"][train_names.index(n)][0] for n in selected),
      tuple(train_names.index(n) for n in selected))

  layouts, total = {}, None
  mean = np.zeros(len(taskset), np.float32)
  std = np.ones(len(taskset), np.float32)
  for split in tfds_access.SPLITS:
    chosen = [per_split_tasks[split][train_names.index(n)] for n in selected]
    _check_chosen(name, split, chosen, records)
    if split == "train":
      total = _label_statistics(chosen, mean, std, normalize_labels, reduce_sums)
    layouts[split] = _layout(taskset, chosen, mean, std, records)

  key = "records" if records else "x"
  shapes = {layouts[s][key].shape[2:] for s in tfds_access.SPLITS}
  if len(shapes) != 1:
    raise ValueError(f"Data set {name!r}: input shapes differ across splits: {shapes}.")
  if records:
    return MultiTaskData(name, taskset, (), layouts["train"], layouts["test"], mean, std,
                         total)
  return MultiTaskData(name, taskset, tuple(shapes.pop()), layouts["train"],
                       layouts["test"], mean, std)


def _tasks_per_split(name, source_specs, arrays, records, max_train_examples, reduce_max
                     ) -> dict[str, list]:
  """``{split: [(task, inputs, labels)]}`` over every spec, in spec order:
  missing labels marked (:func:`mark_missing`), each spec's tasks read
  (``max_train_examples`` per train task) and their class counts taken from
  the data where a column asks for it."""
  per_split_tasks = {split: [] for split in tfds_access.SPLITS}
  for sp in source_specs:
    marked = {split: mark_missing(name, sp, arrays[split], split, records)
              for split in tfds_access.SPLITS}
    entries = {split: _entries(name, sp, marked[split], split, records,
                               max_train_examples if split == "train" else None)
               for split in tfds_access.SPLITS}
    counted = _classes_from_data(sp, entries, reduce_max)
    for split in tfds_access.SPLITS:
      per_split_tasks[split] += counted[split]
  return per_split_tasks


def _check_same_tasks(name, per_split_tasks) -> list[str]:
  """The train split's task names, after checking that the test split has the
  same tasks in the same order (a family value with no examples in one split
  is named)."""
  train_names = [t.name for t, _, _ in per_split_tasks["train"]]
  test_names = [t.name for t, _, _ in per_split_tasks["test"]]
  if train_names != test_names:
    only = {s: sorted(set(a) - set(b)) for s, a, b in (("train", train_names, test_names),
                                                        ("test", test_names, train_names))}
    empty = "; ".join(f"task(s) {v} have no examples in split {other!r}"
                      for s, v in only.items() if v
                      for other in ({"train", "test"} - {s}))
    raise ValueError(f"Data set {name!r}: {empty or 'the task order differs'} (train tasks "
                     f"{train_names}, test tasks {test_names}).")
  return train_names


def _selected_tasks(name, task_names, train_names) -> list[str]:
  """``config.data.tasks`` (default: every task), checked against the data
  set's tasks."""
  selected = list(task_names) or train_names
  unknown = [n for n in selected if n not in train_names]
  if unknown:
    raise ValueError(f"tasks: unknown task(s) {unknown} for data set "
                     f"{name!r}; its tasks are {train_names}.")
  if not selected:
    raise ValueError(f"tasks selects no task of {name!r}.")
  return selected


def _check_chosen(name, split, chosen, records) -> None:
  """Raises on a selected task of ``split`` with no examples, as many inputs as
  labels, non-finite inputs (not on the host pipeline: ``records``), a bad
  label, or no labelled example."""
  for t, x, y in chosen:
    if len(x) == 0:
      raise ValueError(f"Data set {name!r}, split {split!r}: task {t.name!r} "
                       "has no examples.")
    if len(x) != len(y):
      raise ValueError(f"Data set {name!r}, split {split!r}, task {t.name!r}: "
                       f"{len(x)} inputs but {len(y)} labels.")
    if not records and not np.all(np.isfinite(x)):
      raise ValueError(f"Data set {name!r}, split {split!r}, task {t.name!r}: "
                       "inputs contain NaN or infinite values.")
    _check_labels(name, split, t, y, x if records else None)
    if not np.any(tasks_lib.example_mask(t, y)):
      raise ValueError(f"Data set {name!r}, split {split!r}: task {t.name!r} has no "
                       "labelled examples (every label is missing).")


def _label_statistics(chosen, mean, std, normalize_labels, reduce_sums):
  """Fills ``mean [T]`` and ``std [T]`` (in place) with the train split's
  regression label statistics, over the labelled examples (over every process
  through ``reduce_sums``; left at 0 and 1 for other kinds, or without
  ``normalize_labels``). Returns the whole split's ``[T]`` example counts
  when ``reduce_sums`` is given, else None."""
  total = None
  if reduce_sums is not None:
    sums = reduce_sums(np.asarray([_label_sums(t, y) for t, _, y in chosen], np.float64))
    total = sums[:, 0].astype(np.int64)
  if normalize_labels:
    for i, (t, _, y) in enumerate(chosen):
      if t.kind != "regression":
        continue
      if reduce_sums is None:  # over the labelled examples only
        labelled = y[tasks_lib.label_mask(t, y)]
        mean[i], sd = float(np.mean(labelled)), float(np.std(labelled))
      else:
        mean[i] = sums[i, 2] / sums[i, 1]
        sd = float(np.sqrt(max(sums[i, 3] / sums[i, 1] - sums[i, 2] ** 2 / sums[i, 1] ** 2,
                               0.0)))
      std[i] = sd if sd > 0 else 1.0
  return total


def _label_sums(task: tasks_lib.Task, y: np.ndarray) -> list[float]:
  """``[examples, labelled examples, sum, sum of squares]`` of a task's labels
  (the sums over labelled regression labels; 0 for other kinds)."""
  labelled = tasks_lib.example_mask(task, y)
  yl = np.asarray(y[labelled], np.float64) if task.kind == "regression" else np.zeros(0)
  return [len(y), float(np.sum(labelled)), float(np.sum(yl)), float(np.sum(yl * yl))]


def _layout(taskset, chosen, mean, std, records: bool = False):
  """Sources deduplicated by identity of the input array."""
  sources, source_of = [], []
  for _, x, _ in chosen:
    for j, s in enumerate(sources):
      if s is x:
        source_of.append(j)
        break
    else:
      sources.append(x)
      source_of.append(len(sources) - 1)
  shapes = {s.shape[1:] for s in sources}
  if len(shapes) != 1:
    raise ValueError(f"Tasks have different input shapes {sorted(shapes)}; one "
                     "network needs one input shape.")
  n_max = max(len(s) for s in sources)
  xs = np.zeros((len(sources), n_max) + sources[0].shape[1:],
                np.int64 if records else np.float32)
  for j, s in enumerate(sources):
    xs[j, :len(s)] = s
  ys = {}
  for g in taskset.groups:
    members = taskset.group_members(g)
    dtype = taskset.tasks[members[0]].label_dtype
    label_shapes = {np.shape(chosen[i][2])[1:] for i in members}
    if len(label_shapes) != 1:  # a dense group's label maps differ in size
      raise ValueError(f"Tasks {[taskset.tasks[i].name for i in members]} of group {g!r} "
                       f"have labels of different shapes {sorted(label_shapes)}.")
    yg = np.zeros((len(members), n_max) + label_shapes.pop(), dtype)
    for row, i in enumerate(members):
      t, _, y = chosen[i]
      y = np.asarray(y)
      if t.kind == "regression":
        y = (y.astype(np.float32) - mean[i]) / std[i]
      yg[row, :len(y)] = y.astype(dtype)
    ys[g] = yg
  return {
      "records" if records else "x": xs,
      "source": np.asarray(source_of, np.int32),
      "n": np.asarray([len(x) for _, x, _ in chosen], np.int32),
      "y": ys,
  }
