"""Load a data set by name into per-task arrays ready to live on the device.

``load(name, ...)`` returns a :class:`MultiTaskData`: a :class:`TaskSet` and,
per split, a dict of numpy arrays laid out for sampling inside a jitted step::

    {"x":      [S, N, *input_shape] float32   # S input sources, padded to N
     "source": [T] int32                      # which source each task reads
     "n":      [T] int32                      # valid examples of each task
     "y":      {group: [T_g, N]}}             # labels, per task group

Tasks that read the same inputs (``multi_digits``' left and right digit, the two
``mmoe_synthetic`` targets) share one source, so the inputs are stored once.
Tasks with their own inputs (one sinusoid per task) each get a source.

Regression labels are normalised per task with the *train* split's mean and
standard deviation (kept in ``label_mean``/``label_std`` to report metrics in
original units). Inputs and labels are checked (NaN, label ranges) here, before
anything is compiled.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
import tensorflow_datasets as tfds

from mtljax import params as params_lib
from mtljax import tasks as tasks_lib
from mtljax.data import builders

SPLITS = ("train", "test")


class DataNotAvailableError(RuntimeError):
  """A catalog data set is not prepared here and mtljax never downloads."""


@dataclasses.dataclass(frozen=True)
class TaskColumn:
  """How one task reads a loaded split: its label feature and kind."""
  task: tasks_lib.Task
  label_key: str


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """How the features of a data set become tasks.

  Attributes:
    input_key: the input feature (flattened slash path for nested features).
    columns: one entry per task reading a label column of shared inputs.
    split_key: if set, the data set is a *family*: each value of this integer
      feature is a separate task (named ``f"{prefix}{value:02d}"``) with its own
      inputs; ``columns`` then has exactly one entry, the template.
  """
  input_key: str
  columns: tuple[TaskColumn, ...]
  split_key: str | None = None


@dataclasses.dataclass
class MultiTaskData:
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


def default_data_dir() -> str:
  return os.environ.get("MTLJAX_DATA_DIR",
                        os.path.join(os.path.expanduser("~"), ".cache", "mtljax",
                                     "tensorflow_datasets"))


# ----------------------------------------------------------------------------
# Reading TFDS splits into numpy.
# ----------------------------------------------------------------------------


def read_records(source, indices) -> list[dict]:
  """Records ``indices`` of a data source, flattened to slash paths: one
  batched read (``__getitems__``: array_record reads a batch at once, 1.6x
  faster than record by record here) where the source has one that takes a
  list of indices, else record by record (``tfds.testing.mock_data``'s
  ``__getitems__`` has another signature; plain sequences have none)."""
  indices = [int(i) for i in indices]
  records = None
  getitems = getattr(source, "__getitems__", None)
  if getitems is not None and indices:
    try:
      records = getitems(indices)
    except TypeError:
      records = None
  if records is None or len(records) != len(indices):
    records = [source[i] for i in indices]
  return [params_lib.flatten_dict(r, "/") for r in records]


def read_columns(source, keys: Sequence[str] | None = None, *,
                 indices: Sequence[int] | None = None, chunk: int = 2048,
                 check: Callable[[int, dict], None] | None = None) -> dict[str, np.ndarray]:
  """Features ``keys`` (every feature when None) of records ``indices``
  (default: all), read ``chunk`` records at a time (only the kept columns stay
  in memory). ``check(index, record)`` sees every record before its columns
  are kept."""
  indices = np.arange(len(source)) if indices is None else np.asarray(indices)
  cols: dict[str, list] = {}
  for lo in range(0, len(indices), chunk):
    ids = indices[lo:lo + chunk]
    for i, r in zip(ids, read_records(source, ids)):
      if check is not None:
        check(int(i), r)
      for k in (r if keys is None else keys):
        cols.setdefault(k, []).append(np.asarray(r[k]))
  return {k: np.stack(v) for k, v in cols.items()}


def _bundled_builder(name: str, config_name: str, data_dir: str):
  cls = builders.BUNDLED[name]
  config = cls.config_from_name(config_name)
  make = lambda: cls(config=config, data_dir=data_dir, file_format="array_record")
  builder = make()
  several = jax.process_count() > 1
  if several and jax.process_index() != 0:  # process 0 writes first (one shared disk)
    _barrier(f"mtljax-prepared-{name}-{config_name}")
    builder = make()
  if not builder.is_prepared():
    tfds.disable_progress_bar()
    builder.download_and_prepare()  # (a host with a disk of its own writes its copy)
  if several and jax.process_index() == 0:
    _barrier(f"mtljax-prepared-{name}-{config_name}")
  return builder


def _barrier(name: str) -> None:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  multihost_utils.sync_global_devices(name)


def open_sources(name: str, *, data_dir: str | None = None, builder_config: str = "",
                 splits: Sequence[str] = SPLITS):
  """The TFDS data sources (random access, array_record) of a bundled or
  catalog data set's splits, without reading them.

  Bundled data sets are generated into ``data_dir`` on first use (no network).
  Catalog data sets must already be prepared in ``data_dir`` in array_record
  format; otherwise :class:`DataNotAvailableError` says how to prepare them.

  Returns:
    (builder_info_features, {split: data source})
  """
  data_dir = data_dir or default_data_dir()
  if not name:
    raise ValueError("config.data.name is empty.")
  if name in builders.BUNDLED:
    builder = _bundled_builder(name, builder_config, data_dir)
    return builder.info.features, {s: builder.as_data_source(split=s) for s in splits}

  full = f"{name}/{builder_config}" if builder_config else name
  try:
    builder = tfds.builder(full, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError and friends
    raise ValueError(
        f"config.data.name={name!r} is neither a bundled data set "
        f"({sorted(builders.BUNDLED)}) nor a TFDS catalog data set: {e}") from e
  sources = {}
  for s in splits:
    try:
      sources[s] = builder.as_data_source(split=s)
    except Exception as e:  # not prepared, or prepared in another file format
      raise DataNotAvailableError(
          f"TFDS data set {full!r} (split {s!r}) is not prepared in data_dir="
          f"{data_dir!r}, and mtljax never downloads. On a machine with network "
          f"run `tfds build {name} --file_format=array_record --data_dir=DIR`, "
          f"copy DIR here and pass --config.data.data_dir=DIR. ({type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''})") from e
  return builder.info.features, sources


def read_splits(name: str, *, data_dir: str | None = None, builder_config: str = "",
                splits: Sequence[str] = SPLITS):
  """Reads whole splits of a bundled or catalog data set as numpy arrays
  (:func:`open_sources`, then every record).

  Returns:
    (builder_info_features, {split: {feature_path: array [N, ...]}})
  """
  features, sources = open_sources(name, data_dir=data_dir, builder_config=builder_config,
                                   splits=splits)
  return features, {s: read_columns(src) for s, src in sources.items()}


# ----------------------------------------------------------------------------
# Data specs: which features are inputs and which are task labels.
# ----------------------------------------------------------------------------


def _cls(name, label_key, k):
  return TaskColumn(tasks_lib.Task(name, "classification", k), label_key)


def _reg(name, label_key):
  return TaskColumn(tasks_lib.Task(name, "regression"), label_key)


def _digits_spec(builder_config: str) -> DataSpec:
  classes = builders.Digits.config_from_name(builder_config).classes
  return DataSpec("image", (_cls("digit", "label", len(classes)),))


BUNDLED_SPECS = {
    "digits": _digits_spec,
    "exam": DataSpec("x", (_reg("school_", "y"),), split_key="school"),
    "multi_digits": DataSpec("image", (_cls("left", "left_label", 10),
                                       _cls("right", "right_label", 10))),
    "mmoe_synthetic": DataSpec("x", (_reg("y1", "y1"), _reg("y2", "y2"))),
    "sinusoids": DataSpec("x", (_reg("sine_", "y"),), split_key="task"),
}


def family_task_name(spec: DataSpec, value) -> str:
  """The task of a family data set's ``split_key`` value (``sine_03``)."""
  return f"{spec.columns[0].task.name}{int(value):02d}"


def catalog_spec(features, input_key: str, label_keys: Sequence[str]) -> DataSpec:
  """A spec from a catalog data set's features.

  Without ``label_keys``, every ``ClassLabel`` feature becomes a
  classification task and every scalar bool feature a binary task (nested
  features are addressed by slash paths, e.g. ``attributes/Smiling``).
  """
  flat = flatten_features(features)
  if input_key not in flat:
    raise ValueError(
        f"config.data.input_key={input_key!r} is not a feature of this data set; "
        f"features are {sorted(flat)}.")
  columns = []
  keys = list(label_keys) or [k for k in flat if k != input_key]
  for key in keys:
    if key not in flat:
      raise ValueError(
          f"config.data.label_keys: {key!r} is not a feature; features are "
          f"{sorted(flat)}.")
    feat = flat[key]
    tname = key.replace("/", ".")
    if isinstance(feat, tfds.features.ClassLabel):
      columns.append(_cls(tname, key, feat.num_classes))
    elif np.dtype(feat.np_dtype) == np.bool_ and tuple(feat.shape) == ():
      columns.append(TaskColumn(tasks_lib.Task(tname, "binary"), key))
    elif np.issubdtype(np.dtype(feat.np_dtype), np.floating) and tuple(feat.shape) == ():
      if label_keys:  # only when asked for explicitly
        columns.append(_reg(tname, key))
    elif label_keys:
      raise ValueError(
          f"config.data.label_keys: feature {key!r} ({feat}) is not a class "
          "label, a scalar bool or a scalar float.")
  if not columns:
    raise ValueError("No task labels found: pass config.data.label_keys.")
  return DataSpec(input_key, tuple(columns))


def flatten_features(features, prefix=""):
  """``{slash path: feature}`` of a (nested) ``FeaturesDict``."""
  out = {}
  for k, f in features.items():
    if isinstance(f, tfds.features.FeaturesDict):
      out.update(flatten_features(f, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = f
  return out


# ----------------------------------------------------------------------------
# Arrays per task.
# ----------------------------------------------------------------------------


def _as_inputs(x: np.ndarray) -> np.ndarray:
  if x.dtype == np.uint8:
    return x.astype(np.float32) / 255.0
  return x.astype(np.float32)


def _check_labels(name, split, task: tasks_lib.Task, y: np.ndarray, records=None):
  def where(pos):
    return f"example {pos}" if records is None else f"example {pos} (record {records[pos]})"
  finite = np.isfinite(y) if np.issubdtype(y.dtype, np.floating) else np.ones(y.shape, bool)
  if not np.all(finite):
    bad = int(np.sum(~finite))
    raise ValueError(
        f"Data set {name!r}, split {split!r}, task {task.name!r}: {bad} NaN or infinite "
        f"label(s), the first at {where(int(np.flatnonzero(~finite)[0]))}.")
  if task.kind == "regression":
    return
  hi = task.num_classes if task.kind == "classification" else 2
  if y.size and (y.min() < 0 or y.max() >= hi):
    pos = int(np.flatnonzero((y < 0) | (y >= hi))[0])
    raise ValueError(
        f"Data set {name!r}, split {split!r}, task {task.name!r}: labels must be "
        f"in [0, {hi}), found range [{y.min()}, {y.max()}]; first outside: {where(pos)}, "
        f"label {y[pos]}.")


def build_task_data(name: str, spec: DataSpec, arrays: dict[str, dict[str, np.ndarray]],
                    *, task_names: Sequence[str] = (),
                    max_train_examples: int | None = None,
                    normalize_labels: bool = True, records: bool = False,
                    reduce_sums: Callable[[np.ndarray], np.ndarray] | None = None
                    ) -> MultiTaskData:
  """Lays out loaded splits as per-task arrays (see module docstring).
  ``normalize_labels=False`` keeps regression labels as they are (e.g. when they
  are already on a common scale and per-task statistics would leak per-task
  information into a pooled model).

  ``records=True`` (the host pipeline, :mod:`mtljax.data.pipeline`): the input
  column holds int64 *record indices* of the split's data source, not inputs,
  and the layout has ``records [S, N]`` in place of ``x``. ``reduce_sums``
  (several processes, each with its shard) sums per-task ``[T, 3]`` (count,
  sum, sum of squares) statistics over processes, so regression labels are
  normalised with the whole split's mean and standard deviation and
  ``num_train`` holds the whole split's sizes."""
  per_split_tasks = {}
  for split in SPLITS:
    cols = arrays[split]
    if spec.input_key not in cols:
      raise ValueError(f"Data set {name!r}, split {split!r} has no feature "
                       f"{spec.input_key!r}; it has {sorted(cols)}.")
    x = cols[spec.input_key] if records else _as_inputs(cols[spec.input_key])
    limit = max_train_examples if split == "train" and max_train_examples else None
    entries = []  # (task, x_source, y); tasks reading the same inputs share x
    if spec.split_key is None:
      x = x[:limit]
      for c in spec.columns:
        entries.append((c.task, x, cols[c.label_key][:limit]))
    else:
      (template,) = spec.columns
      ids = cols[spec.split_key]
      for v in np.unique(ids):
        task = dataclasses.replace(template.task, name=family_task_name(spec, v))
        sel = ids == v
        entries.append((task, x[sel][:limit], cols[template.label_key][sel][:limit]))
    per_split_tasks[split] = entries

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
  selected = list(task_names) or train_names
  unknown = [n for n in selected if n not in train_names]
  if unknown:
    raise ValueError(f"config.data.tasks: unknown task(s) {unknown} for data set "
                     f"{name!r}; its tasks are {train_names}.")
  if not selected:
    raise ValueError(f"config.data.tasks selects no task of {name!r}.")
  taskset = tasks_lib.TaskSet(
      tuple(per_split_tasks["train"][train_names.index(n)][0] for n in selected),
      tuple(train_names.index(n) for n in selected))

  layouts = {}
  mean = np.zeros(len(taskset), np.float32)
  std = np.ones(len(taskset), np.float32)
  for split in SPLITS:
    chosen = [per_split_tasks[split][train_names.index(n)] for n in selected]
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
    if split == "train" and reduce_sums is not None:
      sums = reduce_sums(np.asarray(
          [[len(y), np.sum(y, dtype=np.float64) if t.kind == "regression" else 0.0,
            np.sum(np.square(y, dtype=np.float64)) if t.kind == "regression" else 0.0]
           for t, _, y in chosen], np.float64))
      total = sums[:, 0].astype(np.int64)
    if split == "train" and normalize_labels:
      for i, (t, _, y) in enumerate(chosen):
        if t.kind != "regression":
          continue
        if reduce_sums is None:
          mean[i], sd = float(np.mean(y)), float(np.std(y))
        else:
          mean[i] = sums[i, 1] / sums[i, 0]
          sd = float(np.sqrt(max(sums[i, 2] / sums[i, 0] - sums[i, 1] ** 2 / sums[i, 0] ** 2,
                                 0.0)))
        std[i] = sd if sd > 0 else 1.0
    layouts[split] = _layout(taskset, chosen, mean, std, records)

  key = "records" if records else "x"
  shapes = {layouts[s][key].shape[2:] for s in SPLITS}
  if len(shapes) != 1:
    raise ValueError(f"Data set {name!r}: input shapes differ across splits: {shapes}.")
  if records:
    return MultiTaskData(name, taskset, (), layouts["train"], layouts["test"], mean, std,
                         None if reduce_sums is None else total)
  return MultiTaskData(name, taskset, tuple(shapes.pop()), layouts["train"],
                       layouts["test"], mean, std)


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
    yg = np.zeros((len(members), n_max), dtype)
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


def spec_for(name: str, features, builder_config: str = "", input_key: str = "image",
             label_keys: Sequence[str] = ()) -> DataSpec:
  """The :class:`DataSpec` of a bundled data set, or one from a catalog data
  set's features (:func:`catalog_spec`)."""
  if name in BUNDLED_SPECS:
    spec = BUNDLED_SPECS[name]
    return spec(builder_config) if callable(spec) else spec
  return catalog_spec(features, input_key, label_keys)


def input_feature(features, spec: DataSpec):
  """``(shape, dtype)`` the data set declares for its input feature."""
  feat = flatten_features(features)[spec.input_key]
  return tuple(feat.shape), np.dtype(feat.np_dtype)


def load(name: str, *, data_dir: str | None = None, builder_config: str = "",
         task_names: Sequence[str] = (), max_train_examples: int | None = None,
         input_key: str = "image", label_keys: Sequence[str] = (),
         normalize_labels: bool = True, opened=None) -> MultiTaskData:
  """Loads a bundled or catalog data set as a :class:`MultiTaskData`
  (``opened``: ``(features, sources)`` from :func:`open_sources`)."""
  features, sources = opened or open_sources(name, data_dir=data_dir,
                                             builder_config=builder_config)
  arrays = {s: read_columns(src) for s, src in sources.items()}
  spec = spec_for(name, features, builder_config, input_key, label_keys)
  return build_task_data(name, spec, arrays, task_names=task_names,
                         max_train_examples=max_train_examples,
                         normalize_labels=normalize_labels)
