"""NYUv2 and Cityscapes from the preprocessed ``.npy`` files of the MTL
literature, checked, and prepared once into mtljax's own format.

**The layout on disk** (MTAN's release, read unchanged by LibMTL, CAGrad,
Nash-MTL and FAMO)::

  ROOT/train/<field>/{0..n-1}.npy      (mtljax's train split)
  ROOT/val/<field>/{0..m-1}.npy        (mtljax's test split: those codes test on val)

one file per image and field, every file of a field of one shape, channels
last (the PyTorch readers ``np.moveaxis(x, -1, 0)`` on load):

========  =====================  ==========================================
field     on disk                meaning
========  =====================  ==========================================
image     ``[H, W, 3]`` float    RGB as stored (MTAN's files: in [0, 1])
label     ``[H, W]`` int/float   class id in [0, C), -1 = ignored pixel
depth     ``[H, W, 1]`` float    >= 0, 0 = missing (Cityscapes: inverse depth)
normal    ``[H, W, 3]`` float    unit surface normal (x, y, z), 0 = missing
========  =====================  ==========================================

* **NYUv2** (:func:`nyuv2_layout`, TFDS name ``nyuv2_mtan``): 795 train / 654
  val images at ``H, W = 288, 384``, 13 classes, folders ``image``, ``label``,
  ``depth``, ``normal``.
* **Cityscapes** (:func:`cityscapes_layout`, TFDS name ``cityscapes_mtan``):
  2975 train / 500 val images at ``128, 256`` (MTAN also released ``256,
  512``), no normals. MTAN's release holds ``label_2``, ``label_7`` and
  ``label_19`` (2-, 7- and 19-class labels); ``classes`` picks the folder
  ``label_{classes}``. LibMTL's example reads a folder named ``label`` (its
  copy of the 7-class labels): pass ``label_folder="label"``. Plain
  ``cityscapes`` is TFDS's own builder of the raw, full-resolution data set.

**Checks** (:func:`scan`, :func:`check_files`), all before anything is
written, each a one-line :class:`mtljax.errors.DataError` naming the folder or
file: ROOT or a split or field folder missing; file names other than
``{i}.npy``; indices not ``0..n-1``; a field folder with a different count
from the others; a file of the wrong shape or dtype (a float field must be
floating point); NaN or infinite values (depth, image, normals); negative
depth; a label that is not an integer or lies outside ``[-1, C)``.

**mtljax's record** (:func:`record_features`, the same for every dense data
set, the bundled rendered scenes included)::

  image  [H, W, 3] float32    label  [H, W] int32 (-1 ignored)
  depth  [H, W, 1] float32    normal [H, W, 3] float32 (NYUv2 only)

written by a TFDS builder (raw-bytes ``Tensor`` features) as array_record in
the data directory, **once**: :func:`open_dense` scans ROOT (names, counts,
each file's size and modification time: milliseconds), names the prepared
copy by a fingerprint of that scan (:func:`fingerprint`), checks every file
and prepares only when no copy of that fingerprint is there, under
:func:`mtljax.data.tfds_access.preparing`'s lock (runs preparing the same
copy take turns; with several processes process 0 prepares, the others wait
at a barrier). Changing a file under ROOT (its size or modification time)
prepares a new copy; the old one stays until deleted. The copy is then read
with ``builder.as_data_source`` (random access, no TensorFlow). A split over
TFDS's 1000 MiB in-memory writer limit (NYUv2's both, Cityscapes' train) is
written as parts of consecutive files merged into one split of several shards
(:mod:`mtljax.data.split_parts`; without it TFDS needs TensorFlow), records
still in file order; the data directory's free disk is checked before any
file is read.

**Sizes** (:func:`dense_bytes`): every value is 4 bytes (float32 / int32), so
a split of ``n`` images takes ``n H W (3 + 1 + 1 [+ 3]) 4`` bytes: NYUv2's
train split 0.98 GiB of images and 2.6 GiB in all (labels, depth, normals),
the figure the pipeline's ``auto`` choice weighs against its budget.

Interface for the integration::

  features, sources = open_dense("nyuv2_mtan", root, data_dir=...)
  features, sources = open_dense("cityscapes_mtan", root, classes=7)
  # sources: {"train": data source, "test": data source} of dicts
  # {"image", "label", "depth"[, "normal"]}
  dense_bytes(shape, n, normals) -> {"image": B, "label": B, ..., "total": B}
  source_bytes(features, sources) -> {split: {field: B, "total": B}}
  layout_of(name, classes=..., shape=..., label_folder=...) -> Layout
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import re
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from mtljax import errors
from mtljax.data import split_parts
from mtljax.data import tfds_access

logger = logging.getLogger("mtljax")

_VERSION = tfds.core.Version("1.0.0")
SPLIT_FOLDERS = {"train": "train", "test": "val"}  # mtljax split -> folder under ROOT
NYUV2_SHAPE = (288, 384)
NYUV2_CLASSES = 13
CITYSCAPES_SHAPES = ((128, 256), (256, 512))
CITYSCAPES_CLASSES = (2, 7, 19)
_NPY = re.compile(r"(0|[1-9]\d*)\.npy")


@dataclasses.dataclass(frozen=True)
class Layout:
  """One preprocessed data set's files: TFDS ``name``, image ``shape`` (H, W),
  ``classes`` of the labels, the folder the labels are in, and whether it has
  surface normals."""
  name: str
  shape: tuple[int, int]
  classes: int
  label_folder: str = "label"
  normals: bool = False

  @property
  def fields(self) -> tuple[str, ...]:
    """The record's fields, in record order."""
    return ("image", "label", "depth") + (("normal",) if self.normals else ())

  def folder(self, field: str) -> str:
    return self.label_folder if field == "label" else field

  def file_shape(self, field: str) -> tuple[int, ...]:
    h, w = self.shape
    return {"image": (h, w, 3), "label": (h, w), "depth": (h, w, 1),
            "normal": (h, w, 3)}[field]


def nyuv2_layout() -> Layout:
  """NYUv2 as MTAN preprocessed it: 288x384, 13 classes, normals."""
  return Layout("nyuv2_mtan", NYUV2_SHAPE, NYUV2_CLASSES, "label", True)


def cityscapes_layout(classes: int = 7, shape: Sequence[int] = (128, 256),
                      label_folder: str | None = None) -> Layout:
  """Cityscapes as MTAN preprocessed it: ``classes`` 2, 7 or 19 (folder
  ``label_{classes}`` unless ``label_folder`` names another, e.g. LibMTL's
  ``label``), 128x256 or 256x512, inverse depth, no normals."""
  if classes not in CITYSCAPES_CLASSES:
    raise ValueError(f"classes={classes!r}: MTAN's preprocessed Cityscapes has "
                     f"{', '.join(map(str, CITYSCAPES_CLASSES))}-class labels.")
  shape = tuple(int(s) for s in shape)
  if shape not in CITYSCAPES_SHAPES:
    raise ValueError(f"shape={shape}: MTAN's preprocessed Cityscapes comes at "
                     f"{' or '.join(f'{h}x{w}' for h, w in CITYSCAPES_SHAPES)}.")
  folder = label_folder or f"label_{classes}"
  if not re.fullmatch(r"[A-Za-z0-9_.-]+", folder):
    raise ValueError(f"label_folder={label_folder!r} is not a folder name.")
  return Layout("cityscapes_mtan", shape, classes, folder, False)


def layout_of(name: str, *, classes: int | None = None, shape: Sequence[int] | None = None,
              label_folder: str | None = None) -> Layout:
  """The :class:`Layout` of data set ``name`` (``nyuv2_mtan`` takes none of
  the options; ``cityscapes_mtan`` defaults to 7 classes at 128x256)."""
  if name == "nyuv2_mtan":
    given = {k: v for k, v in (("classes", classes), ("shape", shape),
                               ("label_folder", label_folder)) if v is not None}
    layout = nyuv2_layout()
    if given.get("classes", NYUV2_CLASSES) != NYUV2_CLASSES or tuple(
        given.get("shape", NYUV2_SHAPE)) != NYUV2_SHAPE or given.get(
            "label_folder", "label") != "label":
      raise ValueError(f"nyuv2_mtan has {NYUV2_CLASSES} classes at "
                       f"{NYUV2_SHAPE[0]}x{NYUV2_SHAPE[1]} in folder 'label'; got {given}.")
    return layout
  if name == "cityscapes_mtan":
    return cityscapes_layout(7 if classes is None else classes,
                             (128, 256) if shape is None else shape, label_folder)
  raise ValueError(f"{name!r} is not a preprocessed dense data set "
                   f"({', '.join(sorted(DENSE))}).")


# ----------------------------------------------------------------------------
# Checks.
# ----------------------------------------------------------------------------


def _listing(path: str) -> str:
  try:
    names = sorted(os.listdir(path))
  except OSError:
    return "unreadable"
  shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
  return f"it holds: {shown}" if names else "it is empty"


def scan(root: str, layout: Layout) -> dict[str, int]:
  """``{split: number of images}`` of ROOT's ``train`` and ``val`` folders,
  after checking the folders, the file names and counts (module docstring);
  no file is opened."""
  if not os.path.isdir(root):
    raise errors.DataError(f"{layout.name}: ROOT {root!r} is not a directory (give the "
                           "folder that holds 'train' and 'val').")
  counts = {}
  for split, sub in SPLIT_FOLDERS.items():
    base = os.path.join(root, sub)
    if not os.path.isdir(base):
      raise errors.DataError(f"{layout.name}: folder {base!r} is missing ({_listing(root)}).")
    per_field = {}
    for field in layout.fields:
      folder = os.path.join(base, layout.folder(field))
      if not os.path.isdir(folder):
        hint = ""
        if field == "label" and layout.name == "cityscapes_mtan":
          hint = " (choose the labels with classes=2/7/19, or label_folder='label' for LibMTL's copy)"
        raise errors.DataError(f"{layout.name}: folder {folder!r} is missing{hint} "
                               f"({_listing(base)}).")
      indices = []
      for entry in os.listdir(folder):
        if not entry.endswith(".npy"):
          continue
        m = _NPY.fullmatch(entry)
        if m is None:
          raise errors.DataError(f"{layout.name}: file {os.path.join(folder, entry)!r} is not "
                                 "named {i}.npy with i = 0, 1, 2, ...")
        indices.append(int(m.group(1)))
      if not indices:
        raise errors.DataError(f"{layout.name}: folder {folder!r} has no .npy files.")
      indices.sort()
      n = len(indices)
      if indices[-1] != n - 1:
        first = next(k for k, i in enumerate(indices) if i != k)
        raise errors.DataError(f"{layout.name}: file {os.path.join(folder, f'{first}.npy')!r} "
                               f"is missing: the {n} files of {folder!r} are not numbered "
                               f"0..{n - 1} (the highest is {indices[-1]}.npy).")
      per_field[field] = n
    if len(set(per_field.values())) > 1:
      ref = layout.fields[0]
      odd = next(f for f in layout.fields if per_field[f] != per_field[ref])
      raise errors.DataError(
          f"{layout.name}: folder {os.path.join(base, layout.folder(odd))!r} has "
          f"{per_field[odd]} files but {os.path.join(base, layout.folder(ref))!r} has "
          f"{per_field[ref]}: every field needs one file per image.")
    counts[split] = per_field[layout.fields[0]]
  return counts


def _path(root: str, layout: Layout, split: str, field: str, i: int) -> str:
  return os.path.join(root, SPLIT_FOLDERS[split], layout.folder(field), f"{i}.npy")


def _load(path: str, layout: Layout, field: str) -> np.ndarray:
  try:
    x = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise errors.DataError(f"{layout.name}: file {path!r} is not a readable .npy array "
                           f"({errors.os_reason(e) or str(e).splitlines()[0]}).") from None
  want = layout.file_shape(field)
  if x.shape != want:
    raise errors.DataError(f"{layout.name}: file {path!r} has shape {x.shape}; {field} "
                           f"files are {want} (H, W{', C' if len(want) == 3 else ''}).")
  if field == "label":
    ok = np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
  else:
    ok = np.issubdtype(x.dtype, np.floating)
  if not ok:
    raise errors.DataError(f"{layout.name}: file {path!r} has dtype {x.dtype}; {field} "
                           f"files are {'integer or ' * (field == 'label')}floating point.")
  return x


def check_values(path: str, layout: Layout, field: str, x: np.ndarray) -> None:
  """The value checks of one loaded file (module docstring)."""
  name = layout.name
  if field == "label":
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating):
      bad = ~np.isfinite(x) | (x != np.round(x))
      if bad.any():
        v = float(x[bad].flat[0])
        raise errors.DataError(f"{name}: file {path!r} has a label {v:g} that is not an "
                               "integer class id.")
    lo, hi = x.min(), x.max()
    if lo < -1 or hi >= layout.classes:
      v = lo if lo < -1 else hi
      raise errors.DataError(f"{name}: file {path!r} has label {v:g} outside [-1, "
                             f"{layout.classes}) (-1 = ignored; {layout.classes} classes).")
    return
  finite = np.isfinite(x)
  if not finite.all():
    what = "NaN" if np.isnan(x).any() else "infinite values"
    raise errors.DataError(f"{name}: file {path!r} ({field}) contains {what} at "
                           f"{int((~finite).sum())} value(s); missing {field} is 0.")
  if field == "depth" and (x < 0).any():
    raise errors.DataError(f"{name}: file {path!r} has negative depth {x.min():g} "
                           "(depth is >= 0, 0 = missing).")


def check_files(root: str, layout: Layout, counts: dict[str, int]) -> None:
  """Opens every file of the scanned splits: shape and dtype, then values."""
  for split, n in counts.items():
    for field in layout.fields:
      for i in range(n):
        path = _path(root, layout, split, field, i)
        check_values(path, layout, field, _load(path, layout, field))


def validate(root: str, layout: Layout) -> dict[str, int]:
  """:func:`scan` and :func:`check_files`: ``{split: count}`` of a ROOT that
  passes every check."""
  counts = scan(root, layout)
  check_files(root, layout, counts)
  return counts


def read_example(root: str, layout: Layout, split: str, i: int) -> dict[str, np.ndarray]:
  """Image ``i`` of ``split`` as mtljax's record (float32; label int32)."""
  out = {}
  for field in layout.fields:
    x = _load(_path(root, layout, split, field, i), layout, field)
    out[field] = (np.rint(x).astype(np.int32) if field == "label"
                  else x.astype(np.float32))
  return out


# ----------------------------------------------------------------------------
# mtljax's record, sizes.
# ----------------------------------------------------------------------------


def record_features(shape: Sequence[int], normals: bool) -> tfds.features.FeaturesDict:
  """The record of every dense data set at image ``shape`` (H, W): raw-bytes
  ``Tensor`` features (module docstring)."""
  h, w = (int(s) for s in shape)
  t = lambda s, d: tfds.features.Tensor(shape=s, dtype=d,
                                        encoding=tfds.features.Encoding.BYTES)
  feats = {"image": t((h, w, 3), np.float32), "label": t((h, w), np.int32),
           "depth": t((h, w, 1), np.float32)}
  if normals:
    feats["normal"] = t((h, w, 3), np.float32)
  return tfds.features.FeaturesDict(feats)


_CHANNELS = {"image": 3, "label": 1, "depth": 1, "normal": 3}


def dense_bytes(shape: Sequence[int], num_examples: int, normals: bool) -> dict[str, int]:
  """Bytes of ``num_examples`` records at ``shape`` as float32/int32, per field
  and ``total`` (every value 4 bytes): NYUv2's train split (795 at 288x384)
  is 1,055,047,680 bytes (0.98 GiB) of images and 2.6 GiB in all."""
  h, w = (int(s) for s in shape)
  fields = ("image", "label", "depth") + (("normal",) if normals else ())
  out = {f: int(num_examples) * h * w * _CHANNELS[f] * 4 for f in fields}
  out["total"] = sum(out.values())
  return out


def layout_bytes(layout: Layout, counts: dict[str, int]) -> dict[str, dict[str, int]]:
  """:func:`dense_bytes` of each split in ``counts`` (:func:`scan`'s answer)."""
  return {s: dense_bytes(layout.shape, n, layout.normals) for s, n in counts.items()}


def source_bytes(features, sources: dict) -> dict[str, dict[str, int]]:
  """``{split: {field: bytes, "total": bytes}}`` of prepared dense data sources
  as float32/int32 (every value 4 bytes), from the record's declared
  ``features`` and each source's length: any dense data set's, the bundled
  scenes' included."""
  per = {k: math.prod(f.shape) * 4 for k, f in features.items()}
  out = {}
  for split, src in sources.items():
    out[split] = {k: len(src) * b for k, b in per.items()}
    out[split]["total"] = sum(out[split].values())
  return out


# ----------------------------------------------------------------------------
# Preparation: TFDS builders, one builder config per (layout, ROOT fingerprint).
# ----------------------------------------------------------------------------


def fingerprint(root: str, layout: Layout, counts: dict[str, int]) -> str:
  """12 hex digits of a hash of the layout, ROOT's real path and every
  file's name, size and modification time (no file is read)."""
  h = hashlib.sha256()
  h.update(repr((dataclasses.astuple(layout), os.path.realpath(root),
                 sorted(counts.items()))).encode())
  for split, n in sorted(counts.items()):
    for field in layout.fields:
      for i in range(n):
        st = os.stat(_path(root, layout, split, field, i))
        h.update(f"{split}/{field}/{i}:{st.st_size}:{st.st_mtime_ns};".encode())
  return h.hexdigest()[:12]


def config_name(layout: Layout, fp: str) -> str:
  """The builder config's name: the layout's options and ROOT's fingerprint."""
  h, w = layout.shape
  label = "" if layout.label_folder in ("label", f"label_{layout.classes}") else (
      "_" + re.sub(r"[^A-Za-z0-9]", "", layout.label_folder))
  return f"c{layout.classes}_{h}x{w}{label}_{fp}"


@dataclasses.dataclass
class DenseFilesConfig(tfds.core.BuilderConfig):
  root: str = ""
  layout: Layout | None = None
  counts: dict | None = None


class _DenseFiles(split_parts.PartedBuilder, tfds.core.GeneratorBasedBuilder,
                  skip_registration=True):
  """Reads a validated ROOT (the config's) into mtljax's dense record; a
  split over :data:`mtljax.data.split_parts.PART_BYTES` is written in parts
  and merged into one split (:mod:`mtljax.data.split_parts`)."""

  VERSION = _VERSION
  BUILDER_CONFIGS: list = []

  def _info(self):
    c = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f"{self.name}: MTAN's preprocessed .npy files read into mtljax's "
                     "dense record (image, label -1 ignored, depth 0 missing"
                     f"{', normal' if c.layout.normals else ''})."),
        features=record_features(c.layout.shape, c.layout.normals),
        disable_shuffling=True)  # record i is file {i}.npy

  def _split_sizes(self):
    c = self.builder_config
    record = split_parts.raw_record_bytes(self.info.features)
    return {split: (n, record) for split, n in c.counts.items()}

  def _generate_examples(self, split, start, stop):
    """Files ``start..stop-1`` of ``split``, keyed by index (file order)."""
    c = self.builder_config
    for i in range(start, stop):
      yield i, read_example(c.root, c.layout, split, i)


class Nyuv2Mtan(_DenseFiles):
  """NYUv2 (MTAN's preprocessed files): segmentation (13), depth, normals."""
  name = "nyuv2_mtan"


class CityscapesMtan(_DenseFiles):
  """Cityscapes (MTAN's preprocessed files): segmentation (2/7/19), depth."""
  name = "cityscapes_mtan"


DENSE = {"nyuv2_mtan": Nyuv2Mtan, "cityscapes_mtan": CityscapesMtan}


def builder(name: str, root: str, *, data_dir: str | None = None, classes: int | None = None,
            shape: Sequence[int] | None = None, label_folder: str | None = None,
            prepare: bool = True):
  """The TFDS builder of ROOT's files as data set ``name``, prepared into
  ``data_dir`` unless a copy of the same files is there already (module
  docstring). ``prepare=False``: the builder, prepared or not."""
  layout = layout_of(name, classes=classes, shape=shape, label_folder=label_folder)
  root = os.path.abspath(os.path.expanduser(root))
  data_dir = data_dir or tfds_access.default_data_dir()
  counts = scan(root, layout)
  config = DenseFilesConfig(name=config_name(layout, fingerprint(root, layout, counts)),
                            root=root, layout=layout, counts=counts)
  cls = DENSE[name]
  make = lambda: cls(config=config, data_dir=data_dir, file_format="array_record")
  b = make()
  if not prepare:
    return b
  index, count = tfds_access._processes()  # pylint: disable=protected-access
  barrier = f"mtljax-prepared-{name}-{config.name}"
  if count > 1 and index != 0:  # process 0 writes first (one shared disk)
    tfds_access._barrier(barrier)  # pylint: disable=protected-access
    b = make()
  if not b.is_prepared():
    with tfds_access.preparing(data_dir, name, config.name, b.version):
      b = make()  # (prepared meanwhile by the run that held the lock?)
      if not b.is_prepared():
        b.check_disk()  # (the records fit on the data directory's disk)
        check_files(root, layout, counts)  # every file, before anything is written
        logger.info("Preparing %s from %s (%s) into %s.", name, root,
                    ", ".join(f"{s} {n}" for s, n in counts.items()), data_dir)
        tfds.disable_progress_bar()
        b.download_and_prepare()
        b = make()
  if count > 1 and index == 0:
    tfds_access._barrier(barrier)  # pylint: disable=protected-access
  return b


def open_dense(name: str, root: str, *, data_dir: str | None = None,
               classes: int | None = None, shape: Sequence[int] | None = None,
               label_folder: str | None = None,
               splits: Sequence[str] = tfds_access.SPLITS):
  """``(features, {split: data source})`` of ROOT's preprocessed files as data
  set ``name`` (``nyuv2_mtan`` or ``cityscapes_mtan``), prepared once
  (:func:`builder`). mtljax's ``test`` split is the files' ``val``."""
  unknown = [s for s in splits if s not in SPLIT_FOLDERS]
  if unknown:
    raise ValueError(f"splits {unknown} are not mtljax splits {tuple(SPLIT_FOLDERS)}.")
  b = builder(name, root, data_dir=data_dir, classes=classes, shape=shape,
              label_folder=label_folder)
  return b.info.features, {s: b.as_data_source(split=s) for s in splits}
