"""Data specs: which features of a data set are its inputs and which are whose
task labels.

A :class:`DataSpec` names the input feature and one :class:`TaskColumn` (a
:class:`mtljax.tasks.Task` and its label feature) per task; tasks of one spec
read the same inputs. A spec with ``split_key`` is a *family*: every value of
that integer feature is a task on its own inputs (``sinusoids``' tasks,
Omniglot's ``alphabet``; :func:`family_task_name`).

The bundled data sets' specs are in :data:`BUNDLED_SPECS`. Catalog data sets
become tasks through a spec made from their features (:func:`catalog_spec`):
label features with their kinds (CelebA's 40 ``attributes/...`` as binary
tasks on one input source), or a family feature. Several data sets joined by
``+`` (``mnist+fashion_mnist``) have one spec per data set, its features and
task names under the data set's name (:func:`prefixed`). An optional bool
feature ``<label>_mask`` (:data:`MASK_SUFFIX`, :func:`mask_keys`) marks which
examples are labelled for a task. :func:`task_count_bound` says how many tasks
a data set can have before a record is read.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from mtljax import dense
from mtljax import tasks as tasks_lib
from mtljax.data import builders


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


def _cls(name, label_key, k):
  return TaskColumn(tasks_lib.Task(name, "classification", k), label_key)


def _reg(name, label_key):
  return TaskColumn(tasks_lib.Task(name, "regression"), label_key)


def _digits_spec(builder_config: str) -> DataSpec:
  classes = builders.Digits.config_from_name(builder_config).classes
  return DataSpec("image", (_cls("digit", "label", len(classes)),))


def dense_spec(classes: int, normals: bool) -> DataSpec:
  """The tasks of a dense data set's records (``image``, ``label``,
  ``depth``, ``normal``: :func:`mtljax.data.dense_files.record_features`),
  named as LibMTL names them: ``segmentation`` (``classes`` classes),
  ``depth`` and, with normals, ``normal``."""
  cols = (TaskColumn(tasks_lib.Task("segmentation", "segmentation", classes), "label"),
          TaskColumn(tasks_lib.Task("depth", "depth"), "depth"))
  if normals:
    cols += (TaskColumn(tasks_lib.Task("normal", "normals"), "normal"),)
  return DataSpec("image", cols)


BUNDLED_SPECS = {
    "digits": _digits_spec,
    "exam": DataSpec("x", (_reg("school_", "y"),), split_key="school"),
    "multi_digits": DataSpec("image", (_cls("left", "left_label", 10),
                                       _cls("right", "right_label", 10))),
    "mmoe_synthetic": DataSpec("x", (_reg("y1", "y1"), _reg("y2", "y2"))),
    "sinusoids": DataSpec("x", (_reg("sine_", "y"),), split_key="task"),
    "scenes": dense_spec(builders.scenes.NUM_CLASSES, normals=True),
}


def family_task_name(spec: DataSpec, value) -> str:
  """The task of a family data set's ``split_key`` value (``sine_03``)."""
  return f"{spec.columns[0].task.name}{int(value):02d}"


# What ``config.data.labels`` maps a feature to ("auto": from the feature's type).
# (Per-example kinds only: a catalog feature is one label per example; the
# dense kinds come with the dense data sets' own specs, :func:`dense_spec`.)
EXAMPLE_KINDS = tuple(k for k in tasks_lib.KINDS if k not in dense.DENSE_KINDS)
LABEL_KINDS = ("auto",) + EXAMPLE_KINDS


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
      raise ValueError(f"labels: feature {key!r} ({_describe(feat)}) needs its "
                       f"kind named: one of {EXAMPLE_KINDS}.")
  ok = {"binary": is_bool or is_int or (is_class and getattr(feat, "num_classes", 0) == 2),
        "classification": is_class or is_int,
        "regression": is_float or is_int}[kind]
  if not ok:
    raise ValueError(f"labels: feature {key!r} ({_describe(feat)}) cannot be a "
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
        f"input_key={input_key!r} is not a feature of this data set; "
        f"features are {sorted(flat)}.")
  if isinstance(label_keys, Mapping):
    kinds = dict(label_keys)
  elif isinstance(label_keys, str):
    kinds = {label_keys: "auto"} if label_keys else {}
  else:
    kinds = {k: "auto" for k in label_keys}
  for key, kind in kinds.items():
    if key not in flat:
      raise ValueError(f"labels: {key!r} is not a feature; features are "
                       f"{sorted(flat)}.")
    if kind not in LABEL_KINDS:
      raise ValueError(f"labels[{key!r}]={kind!r} is not one of {LABEL_KINDS}.")
  if family:
    feat = flat.get(family)
    if feat is None or not _scalar(feat) or not np.issubdtype(np.dtype(feat.np_dtype),
                                                               np.integer):
      raise ValueError(f"family={family!r} must be a scalar integer feature; "
                       f"features are {sorted(flat)}.")
    if len(kinds) != 1:
      raise ValueError(f"family={family!r}: labels must name "
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
    raise ValueError("No task labels found: name them in labels "
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


MASK_SUFFIX = "_mask"


def mask_keys(spec: DataSpec, feature_names) -> list[str]:
  """The ``<label>_mask`` features among ``feature_names`` of a spec's labels."""
  names = set(feature_names)
  return [c.label_key + MASK_SUFFIX for c in spec.columns
          if c.label_key + MASK_SUFFIX in names]


def input_feature(features, spec: DataSpec):
  """``(shape, dtype)`` the data set declares for its input feature."""
  feat = flatten_features(features)[spec.input_key]
  return tuple(feat.shape), np.dtype(feat.np_dtype)
