"""Load a data set by name: the entry points from ``config.data``'s settings to
per-task arrays.

``load(name, ...)`` returns a :class:`mtljax.data.task_data.MultiTaskData`: a
:class:`mtljax.tasks.TaskSet` and, per split, the per-task arrays laid out for
sampling inside a jitted step (:mod:`mtljax.data.task_data`). ``name`` is a
bundled data set, a TFDS catalog data set, or several joined by ``+``
(``mnist+fashion_mnist``: their tasks side by side on their own inputs).

The name, builder config and spec (:func:`spec_for`) are checked on the
metadata (:func:`describe_all`) before anything is downloaded, prepared or
generated (:func:`open_all`); the splits once the data set is prepared, before
any record is read. The pieces: :mod:`mtljax.data.tfds_access` (data
directories, builders, data sources, splits, reading records),
:mod:`mtljax.data.specs` (which features are inputs and which are task labels),
:mod:`mtljax.data.task_data` (checks and the per-task layout).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from mtljax.data import builders
from mtljax.data import dense_files
from mtljax.data import specs as specs_lib
from mtljax.data import task_data
from mtljax.data import tfds_access


def local_layout(name: str, local: tfds_access.LocalFiles) -> dense_files.Layout:
  """The layout of a data set of preprocessed files (:data:`~mtljax.data.tfds_access.LOCAL_FILES`)
  with ``local``'s class count and label folder."""
  return dense_files.layout_of(name, classes=local.classes or None,
                               label_folder=local.label_folder or None)


def open_sources(name: str, *, data_dir: str | None = None, builder_config: str = "",
                 splits: Sequence[str] = tfds_access.SPLITS,
                 split_spec: tfds_access.Splits = tfds_access.Splits(), download: bool = False,
                 local: tfds_access.LocalFiles = tfds_access.LocalFiles()):
  """:func:`mtljax.data.tfds_access.open_sources`, or for a data set of
  preprocessed files (:data:`~mtljax.data.tfds_access.LOCAL_FILES`) its
  files under ``local.root`` prepared into ``data_dir`` once
  (:func:`mtljax.data.dense_files.open_dense`): ``(features, {split: data source})``."""
  if name not in tfds_access.LOCAL_FILES:
    return tfds_access.open_sources(name, data_dir=data_dir, builder_config=builder_config,
                                    splits=splits, split_spec=split_spec, download=download)
  tfds_access.check_name(name, builder_config)
  if not local.root:
    raise ValueError(f"data set {name!r} is read from its preprocessed files: set root "
                     "to the directory holding train/ and val/ (the README says where "
                     "the files come from).")
  if split_spec != tfds_access.Splits():
    raise ValueError(f"data set {name!r} has its files' train and val splits; "
                     "train_split, test_split and test_fraction do not apply.")
  return dense_files.open_dense(name, local.root, data_dir=data_dir,
                                classes=local.classes or None,
                                label_folder=local.label_folder or None, splits=splits)


def read_splits(name: str, *, data_dir: str | None = None, builder_config: str = "",
                splits: Sequence[str] = tfds_access.SPLITS,
                local: tfds_access.LocalFiles = tfds_access.LocalFiles()):
  """Reads whole splits of a bundled or catalog data set as numpy arrays
  (:func:`mtljax.data.tfds_access.open_sources`, then every record).

  Returns:
    (builder_info_features, {split: {feature_path: array [N, ...]}})
  """
  features, sources = open_sources(name, data_dir=data_dir, builder_config=builder_config,
                                   splits=splits, local=local)
  return features, {s: tfds_access.read_columns(src) for s, src in sources.items()}


def spec_for(name: str, features, builder_config: str = "", input_key: str = "image",
             label_keys: Sequence[str] | Mapping[str, str] = (), family: str = "",
             local: tfds_access.LocalFiles = tfds_access.LocalFiles()
             ) -> specs_lib.DataSpec:
  """The :class:`~mtljax.data.specs.DataSpec` of a bundled data set, of a data
  set of preprocessed files (its layout's tasks: :func:`mtljax.data.specs.dense_spec`),
  or one from a catalog data set's features (:func:`mtljax.data.specs.catalog_spec`)."""
  if name in tfds_access.LOCAL_FILES:
    if label_keys or family or input_key != "image":
      raise ValueError(f"labels/family/input_key: data set {name!r} has fixed tasks "
                       "(select them with tasks).")
    layout = local_layout(name, local)
    return specs_lib.dense_spec(layout.classes, layout.normals)
  if name in specs_lib.BUNDLED_SPECS:
    if label_keys or family:
      raise ValueError(f"labels/family: bundled data set {name!r} has fixed "
                       "tasks (select them with tasks).")
    spec = specs_lib.BUNDLED_SPECS[name]
    return spec(builder_config) if callable(spec) else spec
  return specs_lib.catalog_spec(features, input_key, label_keys, family)


def describe_all(name: str, *, data_dir: str | None = None, builder_config: str = "",
                 input_key: str = "image", label_keys=(), family: str = "",
                 local: tfds_access.LocalFiles = tfds_access.LocalFiles()
                 ) -> list[tuple[str, Any, None, specs_lib.DataSpec]]:
  """``[(source name, features, None, spec)]`` for every data set of ``name``
  from the metadata alone: nothing is downloaded, prepared or generated (a
  catalog data set's features come from ``tfds.builder(...).info``; a bundled
  one's spec needs none, its features are None). The input, label and family
  settings apply to each; a bad one is refused here."""
  data_dir = data_dir or tfds_access.default_data_dir()
  parts = tfds_access.source_names(name)
  out = []
  for part in parts:
    tfds_access.check_name(part, builder_config)
    features = None
    if part not in builders.BUNDLED and part not in tfds_access.LOCAL_FILES:
      full = f"{part}/{builder_config}" if builder_config else part
      features = tfds_access.catalog_builder(full, data_dir).info.features
    try:
      spec = spec_for(part, features, builder_config, input_key, label_keys, family, local)
    except ValueError as e:
      if len(parts) == 1:
        raise
      raise ValueError(f"{e} (data set {part!r} of {name!r})") from None
    out.append((part, features, None, spec))
  return out


def open_all(name: str, *, data_dir: str | None = None, builder_config: str = "",
             input_key: str = "image", label_keys=(), family: str = "",
             split_spec: tfds_access.Splits = tfds_access.Splits(), download: bool = False,
             check: Callable[[list], None] | None = None,
             local: tfds_access.LocalFiles = tfds_access.LocalFiles()
             ) -> list[tuple[str, Any, dict, specs_lib.DataSpec]]:
  """``[(source name, features, {split: data source}, spec)]`` for every data
  set of ``name`` (several joined by ``+``), without reading records. The
  input, label and family settings apply to each. The specs are made, and
  ``check(describe_all(...))`` runs (e.g. the task counts), before anything is
  downloaded, prepared or generated."""
  described = describe_all(name, data_dir=data_dir, builder_config=builder_config,
                           input_key=input_key, label_keys=label_keys, family=family,
                           local=local)
  split_spec.check()
  if check is not None:
    check(described)
  out = []
  for part, _, _, spec in described:
    features, sources = open_sources(
        part, data_dir=data_dir, builder_config=builder_config, split_spec=split_spec,
        download=download, local=local)
    out.append((part, features, sources, spec))
  return out


def load(name: str, *, data_dir: str | None = None, builder_config: str = "",
         task_names: Sequence[str] = (), max_train_examples: int | None = None,
         input_key: str = "image", label_keys: Sequence[str] | Mapping[str, str] = (),
         family: str = "", normalize_labels: bool = True,
         split_spec: tfds_access.Splits = tfds_access.Splits(), download: bool = False,
         opened=None, local: tfds_access.LocalFiles = tfds_access.LocalFiles()
         ) -> task_data.MultiTaskData:
  """Loads a bundled or catalog data set, or several joined by ``+``
  (``"mnist+fashion_mnist"``: their tasks, named ``SOURCE_TASK``, side by
  side on their own inputs), as a :class:`~mtljax.data.task_data.MultiTaskData`.
  ``opened``: :func:`open_all`'s answer, when already opened (only the spec's
  features are read)."""
  opened = opened or open_all(name, data_dir=data_dir, builder_config=builder_config,
                              input_key=input_key, label_keys=label_keys, family=family,
                              split_spec=split_spec, download=download, local=local)
  several = len(opened) > 1
  source_specs, arrays = [], {s: {} for s in tfds_access.SPLITS}
  for part, features, sources, spec in opened:
    keys = specs_lib.spec_keys(spec)
    keys += specs_lib.mask_keys(
        spec, specs_lib.flatten_features(features) if features is not None else ())
    spec = specs_lib.prefixed(spec, part) if several else spec
    source_specs.append(spec)
    for s, src in sources.items():
      cols = tfds_access.read_columns(src, keys) if len(src) else {}
      arrays[s].update({f"{part}/{k}" if several else k: v for k, v in cols.items()})
  return task_data.build_task_data(name, source_specs, arrays, task_names=task_names,
                                   max_train_examples=max_train_examples,
                                   normalize_labels=normalize_labels)
