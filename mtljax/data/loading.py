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

Examples labelled for only some tasks: a bool feature ``<label>_mask`` (True:
labelled), or the label -1 for classification and binary labels, marks a
missing label; the layout stores it as :func:`mtljax.tasks.missing_label`
(:func:`mark_missing`), and regression statistics use labelled examples only.

Catalog data sets become tasks through a :class:`DataSpec` made from their
features (:func:`catalog_spec`): label features with their kinds (CelebA's 40
``attributes/...`` as binary tasks on one input source), a *family* feature
whose every value is a task on its own inputs (Omniglot's ``alphabet``), and
several data sets joined by ``+`` (``mnist+fashion_mnist``: one spec per data
set, :func:`prefixed`). :class:`Splits` maps mtljax's train and test splits to
TFDS split strings, or holds a seeded fraction of the train split out as the
test split. The name, builder config and spec are checked on the metadata
(:func:`check_name`, :func:`describe_all`) before anything is downloaded,
prepared or generated; the splits (unknown, malformed, empty) once the data
set is prepared, before any record is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import socket
from typing import Any, Callable, Mapping, Sequence

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
  # A classification label without a declared class count (a plain integer
  # feature): the class count is the train labels' maximum + 1 (over every
  # task of a family), and test labels outside it are an error.
  classes_from_data: bool = False


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


@dataclasses.dataclass(frozen=True)
class Splits:
  """Which TFDS splits become mtljax's ``train`` and ``test`` splits.

  Attributes:
    train, test: TFDS split strings (``"train"``, ``"train+test"``,
      ``"train[:80%]"``).
    test_fraction: > 0: the test split is this fraction of the ``train``
      split's records, drawn at random (seed ``seed``) and held out; ``test``
      must then be ``""`` (e.g. Omniglot, whose splits hold different
      alphabets, so each alphabet-task needs examples carved out of one split).
    seed: the held-out draw's seed (independent of the run's seed, so runs
      with several seeds see one split).
  """
  train: str = "train"
  test: str = "test"
  test_fraction: float = 0.0
  seed: int = 0

  def check(self) -> None:
    if not (isinstance(self.test_fraction, (int, float)) and 0 <= self.test_fraction < 1):
      raise ValueError(f"config.data.test_fraction must be in [0, 1) (0 = the data set's "
                       f"own test split), got {self.test_fraction!r}.")
    if not isinstance(self.train, str) or not self.train:
      raise ValueError(f"config.data.train_split must be a TFDS split string such as "
                       f"'train' or 'train+test', got {self.train!r}.")
    if self.test_fraction and self.test:
      raise ValueError(f"config.data.test_fraction={self.test_fraction} holds out part of "
                       f"config.data.train_split as the test split: set "
                       f"config.data.test_split='' (it is {self.test!r}).")
    if not self.test_fraction and (not isinstance(self.test, str) or not self.test):
      raise ValueError(f"config.data.test_split must be a TFDS split string such as 'test' "
                       f"(or '' with config.data.test_fraction > 0), got {self.test!r}.")


class Subset:
  """Records ``indices`` of a data source, as a data source (a held-out split)."""

  def __init__(self, source, indices):
    self.source, self.indices = source, np.asarray(indices, np.int64)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]

  def __getitems__(self, ids):
    return read_records(self.source, self.indices[np.asarray(ids, np.int64)])


def hold_out(source, fraction: float, seed: int) -> dict:
  """``{"train": Subset, "test": Subset}``: a random ``fraction`` of
  ``source``'s records (at least one) held out as the test split, both kept
  in record order."""
  n = len(source)
  order = np.random.default_rng(seed).permutation(n)
  n_test = min(max(int(round(fraction * n)), 1), n)
  if n_test >= n:
    raise ValueError(f"config.data.test_fraction={fraction} holds out {n_test} of the train "
                     f"split's {n} record(s): none would be left to train on.")
  return {"train": Subset(source, np.sort(order[n_test:])),
          "test": Subset(source, np.sort(order[:n_test]))}


def source_names(name: str) -> tuple[str, ...]:
  """The data sets of ``config.data.name``: one name, or several joined by
  ``+`` (``"mnist+fashion_mnist"``: each data set's tasks on its own inputs)."""
  parts = tuple(p.strip() for p in str(name).split("+"))
  if not name or not all(parts):
    raise ValueError(f"config.data.name={name!r}: give a data set name, or several joined "
                     "by '+' (e.g. 'mnist+fashion_mnist').")
  if len(set(parts)) != len(parts):
    raise ValueError(f"config.data.name={name!r} names a data set twice.")
  return parts


_EMPTY_SPLIT_FIELDS = {"train": ("num_train", "train_per_task"),
                       "test": ("num_test", "test_per_task")}


def check_name(name: str, builder_config: str = "") -> None:
  """Checks ``config.data.name`` (and a bundled data set's builder config)
  without touching the disk: every part is bundled or in the TFDS catalog.
  A bundled builder config that would write an empty split is refused here
  (TFDS would stop with an assertion while writing it)."""
  parts = source_names(name)
  if len(parts) > 1 and builder_config:
    raise ValueError(f"config.data.builder_config={builder_config!r} applies to one data "
                     f"set; config.data.name={name!r} has {len(parts)} (write "
                     "'NAME/CONFIG' for a catalog data set's builder config).")
  for part in parts:
    if part in builders.BUNDLED:
      config = builders.BUNDLED[part].config_from_name(builder_config)
      for split, fields in _EMPTY_SPLIT_FIELDS.items():
        for f in fields:
          if getattr(config, f, None) == 0:
            raise ValueError(f"config.data.builder_config={builder_config!r}: data set "
                             f"{part!r}, split {split!r} has no examples ({f}=0).")
      continue
    try:
      tfds.builder_cls(part.split("/")[0])
    except Exception:  # pylint: disable=broad-except  (DatasetNotFoundError and friends)
      try:
        known = list(builders.BUNDLED) + tfds.list_builders(with_community_datasets=False)
      except Exception:  # pylint: disable=broad-except
        known = list(builders.BUNDLED)
      near = difflib.get_close_matches(part, list(dict.fromkeys(known)), n=3)
      hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else \
          " (tfds.list_builders() lists the catalog)."
      raise ValueError(f"config.data.name={part!r} is neither a bundled data set "
                       f"({', '.join(sorted(builders.BUNDLED))}) nor a TFDS catalog data "
                       f"set{hint}") from None


def _bundled_builder(name: str, config_name: str, data_dir: str):
  cls = builders.BUNDLED[name]
  config = cls.config_from_name(config_name)
  make = lambda: cls(config=config, data_dir=data_dir, file_format="array_record")
  builder = make()
  index, count = _processes()
  if count > 1 and index != 0:  # process 0 writes first (one shared disk)
    _barrier(f"mtljax-prepared-{name}-{config_name}")
    builder = make()
  if not builder.is_prepared():
    tfds.disable_progress_bar()
    _prepare(builder, name)  # (a host with a disk of its own writes its copy)
  if count > 1 and index == 0:
    _barrier(f"mtljax-prepared-{name}-{config_name}")
  return builder


def _prepare(builder, name: str) -> None:
  """``download_and_prepare``, with TFDS's assertion on a split that would be
  empty as one line naming the data set and the split."""
  try:
    builder.download_and_prepare()
  except AssertionError as e:
    m = re.search(r'split "([^"]+)": No examples were yielded', str(e))
    if m is None:
      raise
    config = getattr(builder.builder_config, "name", "")
    raise ValueError(f"config.data.builder_config={config!r}: data set {name!r}, split "
                     f"{m.group(1)!r} has no examples.") from None


def _processes() -> tuple[int, int]:
  """``(this process's index, process count)``."""
  return jax.process_index(), jax.process_count()


def _barrier(name: str) -> None:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  multihost_utils.sync_global_devices(name)


# Where TFDS keeps its mirror of prepared data sets and most downloads: a
# quick probe so that an offline run fails in seconds, not after TFDS's
# download retries (3.5 minutes for mnist, measured).
NETWORK_PROBE = ("storage.googleapis.com", 443)


def _check_network(timeout: float = 5.0) -> None:
  try:
    socket.create_connection(NETWORK_PROBE, timeout=timeout).close()
  except OSError as e:
    raise ConnectionError(f"no network: {NETWORK_PROBE[0]}:{NETWORK_PROBE[1]} not reachable "
                          f"within {timeout:g} s ({e})") from None


def _catalog_builder(full: str, data_dir: str):
  """``tfds.builder`` of a catalog data set (nothing downloaded: its features
  come from the code, or from ``data_dir`` when prepared)."""
  try:
    return tfds.builder(full, data_dir=data_dir, file_format="array_record")
  except Exception as e:  # pylint: disable=broad-except  (an unknown builder config)
    raise ValueError(f"config.data.builder_config: TFDS data set {full!r}: "
                     f"{str(e).strip().splitlines()[0]}") from None


def _split_source(builder, name: str, split: str, tfds_split: str):
  """``builder.as_data_source(tfds_split)``, mtljax's ``split`` (``train``
  or ``test``) read from a builder that knows its splits (prepared): an
  unknown, malformed or empty TFDS split is one line naming the config key
  (TFDS raises ``Unknown split`` or, for a slice with no records, ``Paths
  sequence can not be of 0 length``)."""
  known = list(builder.info.splits)
  key = f"config.data.{split}_split={tfds_split!r}"
  if known:  # (a mocked or unprepared builder knows no split: TFDS decides)
    try:
      n = builder.info.splits[tfds_split].num_examples
    except (ValueError, KeyError) as e:
      why = (str(e).strip().strip('"').splitlines() or [type(e).__name__])[0].rstrip(".")
      if why.startswith("Unknown split"):
        raise ValueError(f"{key}: unknown split of data set {name!r}; available: "
                         f"{known}.") from None
      raise ValueError(f"{key}: data set {name!r}: {why} (available: {known}).") from None
    if not n:
      raise ValueError(f"{key}: data set {name!r}, split {tfds_split!r} has no "
                       "examples.")
  return builder.as_data_source(split=tfds_split)


def _catalog_sources(name, full, data_dir, tfds_splits, download):
  """Data sources of a catalog data set's splits; one not prepared in
  ``data_dir`` is downloaded and prepared first when ``download`` (with
  several processes, process 0 first, the others after it, as for bundled
  data sets). A prepared data set is never downloaded again: its split
  errors are :func:`_split_source`'s."""
  index, count = _processes()
  if count > 1 and index != 0:  # process 0 downloads first (one shared disk)
    _barrier(f"mtljax-prepared-{full}")
  builder = _catalog_builder(full, data_dir)
  error = None
  if not builder.is_prepared() and download:
    try:
      _check_network()
      tfds.disable_progress_bar()
      builder.download_and_prepare()
      builder = _catalog_builder(full, data_dir)  # (its info now has the splits)
    except Exception as e:  # pylint: disable=broad-except  (no network, ...)
      error = e
  if count > 1 and index == 0:
    _barrier(f"mtljax-prepared-{full}")
  prepared = builder.is_prepared()
  sources = {}
  for s, tfds_split in tfds_splits.items():
    if prepared:
      sources[s] = _split_source(builder, full, s, tfds_split)
      continue
    try:  # (not prepared: TFDS's mock data sets, or an error saying how to prepare)
      sources[s] = builder.as_data_source(split=tfds_split)
    except Exception as e:  # pylint: disable=broad-except  (not prepared, other format)
      e = error or e
      raise DataNotAvailableError(
          f"TFDS data set {full!r} (split {tfds_split!r}) is not prepared in data_dir="
          f"{data_dir!r}{' and could not be downloaded' if download else ''}. On a machine "
          f"with network run `tfds build {name} --file_format=array_record --data_dir=DIR` "
          f"(or set config.data.download=True there), copy DIR here and pass "
          f"--config.data.data_dir=DIR. ({type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''})") from e
  return builder.info.features, sources


def open_sources(name: str, *, data_dir: str | None = None, builder_config: str = "",
                 splits: Sequence[str] = SPLITS, split_spec: Splits = Splits(),
                 download: bool = False):
  """The TFDS data sources (random access, array_record) of a bundled or
  catalog data set's splits, without reading them.

  Bundled data sets are generated into ``data_dir`` on first use (no network).
  Catalog data sets are read from ``data_dir`` in array_record format; one not
  prepared there is downloaded and prepared when ``download`` (needs the
  network), otherwise :class:`DataNotAvailableError` says how to prepare it.
  ``split_spec`` maps mtljax's splits to TFDS splits (and a held-out test
  split, :class:`Splits`).

  Returns:
    (builder_info_features, {split: data source})
  """
  data_dir = data_dir or default_data_dir()
  if len(source_names(name)) > 1:
    raise ValueError(f"open_sources reads one data set; {name!r} has several (load() "
                     "reads each).")
  check_name(name, builder_config)
  split_spec.check()
  tfds_splits = {"train": split_spec.train, "test": split_spec.test}
  wanted = ("train",) if split_spec.test_fraction else tuple(splits)
  if name in builders.BUNDLED:
    builder = _bundled_builder(name, builder_config, data_dir)
    features = builder.info.features
    sources = {s: _split_source(builder, name, s, tfds_splits[s]) for s in wanted}
  else:
    full = f"{name}/{builder_config}" if builder_config else name
    features, sources = _catalog_sources(name, full, data_dir,
                                         {s: tfds_splits[s] for s in wanted}, download)
  if split_spec.test_fraction:
    held = hold_out(sources["train"], split_spec.test_fraction, split_spec.seed)
    sources = {s: held[s] for s in splits}
  return features, sources


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


# What ``config.data.labels`` maps a feature to ("auto": from the feature's type).
LABEL_KINDS = ("auto",) + tuple(tasks_lib.KINDS)


def _scalar(feat) -> bool:
  return tuple(getattr(feat, "shape", (None,))) == ()


def _describe(feat) -> str:
  """A feature in words: ``scalar bool``, ``a class label with 50 classes``."""
  if isinstance(feat, tfds.features.ClassLabel):
    return f"a class label with {feat.num_classes} classes"
  shape = tuple(getattr(feat, "shape", ()))
  dtype = np.dtype(feat.np_dtype).name if hasattr(feat, "np_dtype") else type(feat).__name__
  return f"scalar {dtype}" if shape == () else f"shape {shape} {dtype}"


def _column(key: str, feat, kind: str, explicit: bool) -> TaskColumn | None:
  """The task reading feature ``key`` as ``kind`` (None: an ``auto`` feature
  that is no label, when the features were not named)."""
  tname = key.replace("/", ".")
  dtype = np.dtype(feat.np_dtype) if hasattr(feat, "np_dtype") else None
  is_class = isinstance(feat, tfds.features.ClassLabel)
  is_bool = _scalar(feat) and dtype == np.bool_
  is_int = _scalar(feat) and dtype is not None and np.issubdtype(dtype, np.integer)
  is_float = _scalar(feat) and dtype is not None and np.issubdtype(dtype, np.floating)
  if kind == "auto":
    if is_class:
      kind = "classification"
    elif is_bool:
      kind = "binary"
    elif is_float and explicit:
      kind = "regression"
    elif not explicit:
      return None
    else:
      raise ValueError(f"config.data.labels: feature {key!r} ({_describe(feat)}) needs its "
                       f"kind named: one of {tasks_lib.KINDS}.")
  ok = {"binary": is_bool or is_int or (is_class and getattr(feat, "num_classes", 0) == 2),
        "classification": is_class or is_int,
        "regression": is_float or is_int}[kind]
  if not ok:
    raise ValueError(f"config.data.labels: feature {key!r} ({_describe(feat)}) cannot be a "
                     f"{kind!r} label (binary: a scalar bool, integer or 2-class label; "
                     "classification: a class label or scalar integer; regression: a "
                     "scalar number).")
  if kind == "classification" and is_class:
    return _cls(tname, key, feat.num_classes)
  if kind == "classification":  # a plain integer: the class count comes from the data
    return TaskColumn(tasks_lib.Task(tname, "classification", 2), key, classes_from_data=True)
  return TaskColumn(tasks_lib.Task(tname, kind), key)


def catalog_spec(features, input_key: str, label_keys: Sequence[str] | Mapping[str, str] = (),
                 family: str = "") -> DataSpec:
  """A spec from a catalog data set's features.

  Args:
    features: the data set's ``FeaturesDict``.
    input_key: the input feature (slash paths for nested features).
    label_keys: the label features, as a sequence (kinds from their types) or
      a mapping ``{feature: kind}`` with kinds in :data:`LABEL_KINDS`; the tasks
      follow the data set's feature order (a config's mapping has none). Empty:
      every ``ClassLabel`` feature becomes a classification task and every
      scalar bool feature a binary task (CelebA's 40 ``attributes/...``). A
      plain integer feature as ``classification`` takes its class count from
      the data (the train labels' maximum + 1).
    family: an integer feature whose every value is a task of its own with its
      own inputs (Omniglot's ``alphabet``: tasks ``alphabet_00``, ...);
      ``label_keys`` then names exactly one label, every task's.
  """
  flat = flatten_features(features)
  if input_key not in flat:
    raise ValueError(
        f"config.data.input_key={input_key!r} is not a feature of this data set; "
        f"features are {sorted(flat)}.")
  if isinstance(label_keys, Mapping):
    kinds = dict(label_keys)
  elif isinstance(label_keys, str):
    kinds = {label_keys: "auto"} if label_keys else {}
  else:
    kinds = {k: "auto" for k in label_keys}
  for key, kind in kinds.items():
    if key not in flat:
      raise ValueError(f"config.data.labels: {key!r} is not a feature; features are "
                       f"{sorted(flat)}.")
    if kind not in LABEL_KINDS:
      raise ValueError(f"config.data.labels[{key!r}]={kind!r} is not one of {LABEL_KINDS}.")
  if family:
    feat = flat.get(family)
    if feat is None or not _scalar(feat) or not np.issubdtype(np.dtype(feat.np_dtype),
                                                               np.integer):
      raise ValueError(f"config.data.family={family!r} must be a scalar integer feature; "
                       f"features are {sorted(flat)}.")
    if len(kinds) != 1:
      raise ValueError(f"config.data.family={family!r}: config.data.labels must name "
                       f"exactly one label feature (every family task's), got "
                       f"{sorted(kinds)}.")
  explicit = bool(kinds)
  kinds = {k: kinds[k] for k in flat if k in kinds}  # tasks in the data set's feature order
  if not explicit:
    kinds = {k: "auto" for k in flat if k not in (input_key, family)
             and not (k.endswith(MASK_SUFFIX) and k[:-len(MASK_SUFFIX)] in flat)}
  columns = [c for c in (_column(k, flat[k], kind, explicit) for k, kind in kinds.items())
             if c is not None]
  if not columns:
    raise ValueError("No task labels found: name them in config.data.labels "
                     "({feature: kind}).")
  if family:
    (c,) = columns
    columns = [dataclasses.replace(c, task=dataclasses.replace(c.task, name=f"{family}_"))]
  return DataSpec(input_key, tuple(columns), split_key=family or None)


def prefixed(spec: DataSpec, source: str) -> DataSpec:
  """``spec`` as one source of a multi-source data set: feature paths under
  ``source/`` and task names ``source_TASK`` (``mnist_label``)."""
  return DataSpec(
      f"{source}/{spec.input_key}",
      tuple(dataclasses.replace(c, label_key=f"{source}/{c.label_key}", task=dataclasses.replace(
          c.task, name=f"{source}_{c.task.name}")) for c in spec.columns),
      f"{source}/{spec.split_key}" if spec.split_key else None)


def spec_keys(spec: DataSpec) -> list[str]:
  """The features a spec reads: input, labels, family key."""
  return list(dict.fromkeys([spec.input_key] + [c.label_key for c in spec.columns] +
                            ([spec.split_key] if spec.split_key else [])))


def task_count_bound(name: str, features, spec: DataSpec, builder_config: str = ""
                     ) -> tuple[int | None, str]:
  """The most tasks a data set can have, known before reading a record, and
  why: its label columns, a bundled family's builder config, or a family
  key's class count; ``(None, "")`` when only the records tell."""
  if spec.split_key is None:
    n = len(spec.columns)
    return n, f"{n} label feature{'s' if n > 1 else ''}"
  if name in builders.BUNDLED:
    n = getattr(builders.BUNDLED[name].config_from_name(builder_config), "num_tasks", None)
    return (n, f"builder config {builder_config!r}") if n else (None, "")
  feat = flatten_features(features).get(spec.split_key)
  if isinstance(feat, tfds.features.ClassLabel):
    return feat.num_classes, f"family feature {spec.split_key!r} has {feat.num_classes} values"
  return None, ""


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


def _check_labels(name, split, task: tasks_lib.Task, y: np.ndarray, records=None,
                  labelled=None):
  """Raises on a NaN, infinite or out-of-range label among the ``labelled``
  entries (default: those not :func:`mtljax.tasks.missing_label`)."""
  def where(pos):
    return f"example {pos}" if records is None else f"example {pos} (record {records[pos]})"
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


MASK_SUFFIX = "_mask"


def mask_keys(spec: DataSpec, feature_names) -> list[str]:
  """The ``<label>_mask`` features among ``feature_names`` of a spec's labels."""
  names = set(feature_names)
  return [c.label_key + MASK_SUFFIX for c in spec.columns
          if c.label_key + MASK_SUFFIX in names]


def mark_missing(name: str, spec: DataSpec, cols: dict, split: str,
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
    mask = cols.get(c.label_key + MASK_SUFFIX)
    labelled = np.ones(y.shape, bool) if mask is None else np.asarray(mask).astype(bool)
    if mask is not None and labelled.shape != y.shape:
      raise ValueError(f"Data set {name!r}, split {split!r}: feature "
                       f"{c.label_key + MASK_SUFFIX!r} has shape {labelled.shape}, its "
                       f"label {c.label_key!r} {y.shape}.")
    task = c.task
    if task.kind != "regression":
      labelled &= y != -1
      if getattr(c, "classes_from_data", False):  # the class count comes later
        task = dataclasses.replace(task, num_classes=max(int(np.max(y, initial=0)) + 1, 2))
    _check_labels(name, split, task, y, rec, labelled)
    if not np.all(labelled):
      kind = np.float32 if c.task.kind == "regression" else y.dtype
      out[c.label_key] = np.where(labelled, y, tasks_lib.missing_label(c.task)).astype(kind)
  return out


def _entries(name, spec: DataSpec, cols, split, records, limit):
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
    task = dataclasses.replace(template.task, name=family_task_name(spec, v))
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


def _classes_from_data(spec: DataSpec, entries, reduce_max=all_process_max):
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
                   else t, x, y) for t, x, y, c in entries[split]] for split in SPLITS}


def build_task_data(name: str, spec: DataSpec | Sequence[DataSpec],
                    arrays: dict[str, dict[str, np.ndarray]],
                    *, task_names: Sequence[str] = (),
                    max_train_examples: int | None = None,
                    normalize_labels: bool = True, records: bool = False,
                    reduce_sums: Callable[[np.ndarray], np.ndarray] | None = None,
                    reduce_max: Callable[[np.ndarray], np.ndarray] = all_process_max
                    ) -> MultiTaskData:
  """Lays out loaded splits as per-task arrays (see module docstring).
  ``spec``: one spec, or one per source of a multi-source data set (each
  reading its own, prefixed, features of ``arrays``; :func:`prefixed`).
  ``normalize_labels=False`` keeps regression labels as they are (e.g. when they
  are already on a common scale and per-task statistics would leak per-task
  information into a pooled model).

  ``records=True`` (the host pipeline, :mod:`mtljax.data.pipeline`): the input
  column holds int64 *record indices* of the split's data source, not inputs,
  and the layout has ``records [S, N]`` in place of ``x``. ``reduce_sums``
  (several processes, each with its shard) sums per-task ``[T, 4]`` (count,
  labelled count, sum, sum of squares) statistics over processes, so regression labels are
  normalised with the whole split's mean and standard deviation and
  ``num_train`` holds the whole split's sizes. ``reduce_max`` (default: over
  every process, :func:`all_process_max`) makes a class count taken from the
  train labels (a plain integer label as classification) the largest over
  every process's shard, so all processes build one model."""
  specs = (spec,) if isinstance(spec, DataSpec) else tuple(spec)
  per_split_tasks = {split: [] for split in SPLITS}
  for sp in specs:
    marked = {split: mark_missing(name, sp, arrays[split], split, records) for split in SPLITS}
    entries = {split: _entries(name, sp, marked[split], split, records,
                               max_train_examples if split == "train" else None)
               for split in SPLITS}
    counted = _classes_from_data(sp, entries, reduce_max)
    for split in SPLITS:
      per_split_tasks[split] += counted[split]
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
      if not np.any(tasks_lib.label_mask(t, y)):
        raise ValueError(f"Data set {name!r}, split {split!r}: task {t.name!r} has no "
                         "labelled examples (every label is missing).")
    if split == "train" and reduce_sums is not None:
      sums = reduce_sums(np.asarray([_label_sums(t, y) for t, _, y in chosen], np.float64))
      total = sums[:, 0].astype(np.int64)
    if split == "train" and normalize_labels:
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


def _label_sums(task: tasks_lib.Task, y: np.ndarray) -> list[float]:
  """``[examples, labelled examples, sum, sum of squares]`` of a task's labels
  (the sums over labelled regression labels; 0 for other kinds)."""
  labelled = tasks_lib.label_mask(task, y)
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
             label_keys: Sequence[str] | Mapping[str, str] = (), family: str = ""
             ) -> DataSpec:
  """The :class:`DataSpec` of a bundled data set, or one from a catalog data
  set's features (:func:`catalog_spec`)."""
  if name in BUNDLED_SPECS:
    if label_keys or family:
      raise ValueError(f"config.data.labels/family: bundled data set {name!r} has fixed "
                       "tasks (select them with config.data.tasks).")
    spec = BUNDLED_SPECS[name]
    return spec(builder_config) if callable(spec) else spec
  return catalog_spec(features, input_key, label_keys, family)


def input_feature(features, spec: DataSpec):
  """``(shape, dtype)`` the data set declares for its input feature."""
  feat = flatten_features(features)[spec.input_key]
  return tuple(feat.shape), np.dtype(feat.np_dtype)


def describe_all(name: str, *, data_dir: str | None = None, builder_config: str = "",
                 input_key: str = "image", label_keys=(), family: str = ""
                 ) -> list[tuple[str, Any, None, DataSpec]]:
  """``[(source name, features, None, spec)]`` for every data set of ``name``
  from the metadata alone: nothing is downloaded, prepared or generated (a
  catalog data set's features come from ``tfds.builder(...).info``; a bundled
  one's spec needs none, its features are None). The input, label and family
  settings apply to each; a bad one is refused here."""
  data_dir = data_dir or default_data_dir()
  parts = source_names(name)
  out = []
  for part in parts:
    check_name(part, builder_config)
    features = None
    if part not in builders.BUNDLED:
      full = f"{part}/{builder_config}" if builder_config else part
      features = _catalog_builder(full, data_dir).info.features
    try:
      spec = spec_for(part, features, builder_config, input_key, label_keys, family)
    except ValueError as e:
      if len(parts) == 1:
        raise
      raise ValueError(f"{e} (data set {part!r} of {name!r})") from None
    out.append((part, features, None, spec))
  return out


def open_all(name: str, *, data_dir: str | None = None, builder_config: str = "",
             input_key: str = "image", label_keys=(), family: str = "",
             split_spec: Splits = Splits(), download: bool = False,
             check: Callable[[list], None] | None = None
             ) -> list[tuple[str, Any, dict, DataSpec]]:
  """``[(source name, features, {split: data source}, spec)]`` for every data
  set of ``name`` (several joined by ``+``), without reading records. The
  input, label and family settings apply to each. The specs are made, and
  ``check(describe_all(...))`` runs (e.g. the task counts), before anything is
  downloaded, prepared or generated."""
  described = describe_all(name, data_dir=data_dir, builder_config=builder_config,
                           input_key=input_key, label_keys=label_keys, family=family)
  split_spec.check()
  if check is not None:
    check(described)
  out = []
  for part, _, _, spec in described:
    features, sources = open_sources(part, data_dir=data_dir, builder_config=builder_config,
                                     split_spec=split_spec, download=download)
    out.append((part, features, sources, spec))
  return out


def load(name: str, *, data_dir: str | None = None, builder_config: str = "",
         task_names: Sequence[str] = (), max_train_examples: int | None = None,
         input_key: str = "image", label_keys: Sequence[str] | Mapping[str, str] = (),
         family: str = "", normalize_labels: bool = True, split_spec: Splits = Splits(),
         download: bool = False, opened=None) -> MultiTaskData:
  """Loads a bundled or catalog data set, or several joined by ``+``
  (``"mnist+fashion_mnist"``: their tasks, named ``SOURCE_TASK``, side by
  side on their own inputs), as a :class:`MultiTaskData`. ``opened``:
  :func:`open_all`'s answer, when already opened (only the spec's features
  are read)."""
  opened = opened or open_all(name, data_dir=data_dir, builder_config=builder_config,
                              input_key=input_key, label_keys=label_keys, family=family,
                              split_spec=split_spec, download=download)
  several = len(opened) > 1
  specs, arrays = [], {s: {} for s in SPLITS}
  for part, features, sources, spec in opened:
    keys = spec_keys(spec)
    keys += mask_keys(spec, flatten_features(features) if features is not None else ())
    spec = prefixed(spec, part) if several else spec
    specs.append(spec)
    for s, src in sources.items():
      cols = read_columns(src, keys) if len(src) else {}
      arrays[s].update({f"{part}/{k}" if several else k: v for k, v in cols.items()})
  return build_task_data(name, specs, arrays, task_names=task_names,
                         max_train_examples=max_train_examples,
                         normalize_labels=normalize_labels)
