"""Splits larger than TFDS's in-memory writer limit, written without TensorFlow.

**The problem.** TFDS's writer (``tensorflow_datasets/core/shuffle.py``,
``Shuffler``) keeps a split's serialised records in memory up to
``MAX_MEM_BUFFER_SIZE`` = 1000 MiB and spills a larger split to temporary
bucket files through ``tf.io.gfile``: TensorFlow, which mtljax does not
install. Preparing such a split dies with ``No module named 'tensorflow'``
after all the reading or rendering (``disable_shuffling`` too goes through the
``Shuffler``). NYUv2's train split (795 images at 288x384, 32 bytes per pixel:
2.6 GiB), its val split (2.2 GiB) and Cityscapes' train split (2975 at
128x256, 1.8 GiB) are all over it.

**The way round.** A split of ``n`` records of at most ``b`` bytes each (a
bound: :func:`raw_record_bytes`) whose ``n b`` exceeds :data:`PART_BYTES` is
generated as ``K = ceil(n / k)`` TFDS splits ``{split}_part0``, ...,
``{split}_part{K-1}`` of ``k = floor(PART_BYTES / b)`` consecutive records
each (:func:`part_ranges`, :func:`part_names`): each part stays in the
``Shuffler``'s memory. Once TFDS has written them (one after another: the
preparation holds one part in memory at a time), :func:`merge_parts` renames
part ``p``'s shard files to shards of one split ``{split}`` in part order and
replaces the parts' ``SplitInfo``s by one whose ``shard_lengths`` are the
parts' concatenated, all inside TFDS's temporary preparation folder, before
TFDS writes ``dataset_info.json`` and renames the folder into place. The
prepared data set is then exactly what TFDS writes for a split of several
shards (its own ``{DATASET}-{SPLIT}.array_record-{X}-of-{Y}`` files): the
parts are hidden from every reader; ``as_data_source("train")``, slices
(``"train[:80%]"``), ``info.splits["train"].num_examples`` and mtljax's raw
array_record reader see one split, records in part order and, within a part,
in TFDS's order (the key order with ``disable_shuffling``, else TFDS's hash
of the key salted with the part's name).

A split of at most :data:`PART_BYTES` is written as one TFDS split under its
own name, as TFDS would write it: since :data:`PART_BYTES` defaults to TFDS's
limit, every split TFDS could write without TensorFlow is written exactly as
before (the same records in the same order), and only the splits it could not
write are parted. Peak memory while preparing is about one part (at most
:data:`PART_BYTES`) plus what the generator holds.

(The other routes: parts read back as ``as_data_source("train_0+train_1")``
works on this TFDS version (record order and random access across parts
checked), but every reader would have to know the part names, and
``tfds_access.open_sources``' split checks, TFDS slices and ``info.splits``
would not see a ``train`` split; raising TFDS's ``MAX_MEM_BUFFER_SIZE`` keeps
the whole split in memory, 2.6 GiB for NYUv2; writing array_record files
without TFDS would drop the builder and its ``dataset_info.json``.)

**Interface** (a builder mixes in :class:`PartedBuilder` before
``tfds.core.GeneratorBasedBuilder``)::

  class MyBuilder(split_parts.PartedBuilder, tfds.core.GeneratorBasedBuilder):
    def _split_sizes(self) -> {split: (num_examples, record_bytes bound)}
    def _generate_examples(self, split, start, stop): yields (key, example)
        for records start..stop-1 of split (keys unique within the split)

  PART_BYTES                      # tests lower it (monkeypatch this module's)
  raw_record_bytes(features) -> bytes bound of one serialised record
  part_ranges(num_examples, record_bytes) -> [(start, stop), ...]
  part_names(split, num_parts) -> [split] or [split_part0, ...]
  merge_parts(split_dict) -> SplitDict (renames the parts' files)
  builder.check_disk()            # one-line DataError if the records won't fit
"""

from __future__ import annotations

import math
import os
import re
import shutil

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle
from tensorflow_datasets.core import splits as splits_lib

from mtljax import errors

# The most bytes of serialised records one TFDS split (a part) may hold:
# TFDS's in-memory limit (the Shuffler spills above it). Read when a
# preparation starts, so a test may lower it.
PART_BYTES: int = tfds_shuffle.MAX_MEM_BUFFER_SIZE
# A tf.train.Example's own bytes beyond its features' raw bytes, at most
# (feature names, length prefixes: 97 for the 4-feature dense record).
RECORD_OVERHEAD = 256
_PART = re.compile(r"(?P<split>.+)_part(?P<part>0|[1-9]\d*)")


def raw_record_bytes(features: tfds.features.FeaturesDict) -> int:
  """An upper bound on one serialised record of ``features``, every one a
  fixed-shape ``Tensor`` stored as raw bytes (``Encoding.BYTES``): the
  arrays' bytes plus :data:`RECORD_OVERHEAD`."""
  total = RECORD_OVERHEAD
  for key, f in features.items():
    if (type(f) is not tfds.features.Tensor or f._encoding != tfds.features.Encoding.BYTES  # pylint: disable=protected-access
        or any(s is None for s in f.shape)):
      raise ValueError(f"feature {key!r} is not a fixed-shape Tensor stored as raw bytes "
                       "(Encoding.BYTES): its serialised size has no bound here.")
    total += math.prod(f.shape) * np.dtype(f.np_dtype).itemsize
  return total


def records_per_part(record_bytes: int) -> int:
  """``floor(min(PART_BYTES, TFDS's limit) / record_bytes)``, at least 1."""
  limit = min(PART_BYTES, tfds_shuffle.MAX_MEM_BUFFER_SIZE)
  if record_bytes > limit:
    raise ValueError(f"one record of {record_bytes} bytes is over the {limit} bytes a TFDS "
                     "split can hold in memory without TensorFlow.")
  return max(1, limit // int(record_bytes))


def part_ranges(num_examples: int, record_bytes: int) -> list[tuple[int, int]]:
  """``[(start, stop), ...]``: consecutive record ranges of at most
  :func:`records_per_part` records covering ``0..num_examples-1``; one range
  when the split fits in one part."""
  k = records_per_part(record_bytes)
  n = int(num_examples)
  if n <= k:
    return [(0, n)]
  return [(lo, min(n, lo + k)) for lo in range(0, n, k)]


def part_names(split: str, num_parts: int) -> list[str]:
  """The TFDS splits that hold ``split``: itself when one part, else
  ``{split}_part0``, ``{split}_part1``, ..."""
  if _PART.fullmatch(split):
    raise ValueError(f"split {split!r} looks like a part's name (NAME_partK).")
  return [split] if num_parts == 1 else [f"{split}_part{p}" for p in range(num_parts)]


def merge_parts(split_dict: splits_lib.SplitDict) -> splits_lib.SplitDict:
  """``split_dict`` with every ``{split}_part{p}`` (p = 0..K-1) replaced by one
  split ``{split}``: the parts' shard files renamed, in part order, to the
  shards of ``{split}`` (same folder and template), its ``shard_lengths`` the
  parts' concatenated and ``num_bytes`` their sum. Splits that are no part
  are kept as they are."""
  parts: dict[str, dict[int, splits_lib.SplitInfo]] = {}
  out: dict[str, splits_lib.SplitInfo | None] = {}  # (in the splits' order)
  for name, info in split_dict.items():
    m = _PART.fullmatch(name)
    if m is None:
      out[name] = info
    else:
      parts.setdefault(m.group("split"), {})[int(m.group("part"))] = info
      out.setdefault(m.group("split"), None)
  if not parts:
    return split_dict
  for split, by_part in parts.items():
    if sorted(by_part) != list(range(len(by_part))) or out[split] is not None:
      raise ValueError(f"split {split!r}: parts {sorted(by_part)} are not 0..K-1 or the "
                       "split exists besides its parts.")
    infos = [by_part[p] for p in range(len(by_part))]
    template = infos[0].filename_template.replace(split=split)
    lengths = [int(x) for info in infos for x in info.shard_lengths]
    old = [path for info in infos for path in info.filepaths]
    new = template.sharded_filepaths(len(lengths))
    if len(old) != len(new):
      raise RuntimeError(f"split {split!r}: {len(old)} part files for {len(new)} shards.")
    for a, b in zip(old, new):
      os.rename(os.fspath(a), os.fspath(b))
      if os.path.exists(f"{os.fspath(a)}_index.json"):  # (TFDS's index, where written)
        os.rename(f"{os.fspath(a)}_index.json", f"{os.fspath(b)}_index.json")
    out[split] = splits_lib.SplitInfo(
        name=split, shard_lengths=lengths, num_bytes=sum(int(i.num_bytes) for i in infos),
        filename_template=template)
  return splits_lib.SplitDict(list(out.values()))


def _free_bytes(path: str) -> int:
  """Free bytes on the file system of ``path`` (its nearest existing folder)."""
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def _size(b: int) -> str:
  return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


class PartedBuilder:
  """Mixin for a ``tfds.core.GeneratorBasedBuilder`` of raw-bytes records
  whose splits may exceed TFDS's in-memory limit (module docstring): the
  builder defines :meth:`_split_sizes` and ``_generate_examples(split, start,
  stop)``; this mixin makes the TFDS splits (the parts), merges them after
  TFDS wrote them, and first refuses a preparation the data directory's disk
  cannot hold (one line naming the sizes)."""

  def _split_sizes(self) -> dict[str, tuple[int, int]]:
    """``{split: (number of records, bound on one record's bytes)}``."""
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    del dl_manager  # generated or read locally
    out = {}
    for split, (n, record) in self._split_sizes().items():
      ranges = part_ranges(n, record)
      for name, (lo, hi) in zip(part_names(split, len(ranges)), ranges):
        out[name] = self._generate_examples(split, lo, hi)  # pytype: disable=wrong-arg-count
    return out

  def check_disk(self) -> None:
    """Refuses (one-line :class:`mtljax.errors.DataError`) a preparation
    whose records (by their bound) would not fit on the data directory's
    file system. Also called first thing in the preparation."""
    sizes = self._split_sizes()
    need = sum(n * record for n, record in sizes.values())
    where = os.fspath(self.data_dir)  # pytype: disable=attribute-error
    free = _free_bytes(where)
    if need > free:
      config = getattr(self.builder_config, "name", "") or "default"  # pytype: disable=attribute-error
      raise errors.DataError(
          f"{self.name}/{config}: preparing needs about {_size(need)} in {where!r} "  # pytype: disable=attribute-error
          f"({', '.join(f'{s} {n}' for s, (n, _) in sizes.items())} records) but only "
          f"{_size(free)} is free there.")

  def _download_and_prepare(self, dl_manager, download_config):
    self.check_disk()
    super()._download_and_prepare(dl_manager, download_config)  # pytype: disable=attribute-error
    self.info.set_splits(merge_parts(self.info.splits))  # pytype: disable=attribute-error

