"""TFDS access: where data sets live, their splits opened as random-access
data sources, and records read from them.

mtljax has two splits, ``train`` and ``test`` (:data:`SPLITS`); :class:`Splits`
maps them to TFDS split strings, or holds a seeded fraction of the train split
out as the test split (:func:`hold_out`, a :class:`Subset` of records).
:func:`open_sources` opens one data set's splits without reading them:

* a *bundled* data set (:data:`mtljax.data.builders.BUNDLED`) is generated into
  the data directory (:func:`default_data_dir`) on first use, no network; with
  several processes process 0 writes first and the others wait at a barrier;
  runs of their own that prepare the same data set and version into one data
  directory take turns (:func:`preparing`: a file lock), the later ones
  reading what the first prepared;
* a TFDS *catalog* data set is read from the data directory in array_record
  format; one not prepared there is downloaded and prepared only when asked
  (after a quick network probe, :data:`NETWORK_PROBE`), else
  :class:`DataNotAvailableError` says how to prepare it.

The name and builder config are checked without touching the disk
(:func:`check_name`, :func:`source_names` for several data sets joined by
``+``); the splits (unknown, malformed, empty) once the data set is prepared,
before any record is read. :func:`read_records` and :func:`read_columns` read
records as flattened slash paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import logging
import os
import re
import socket
from typing import Callable, Sequence

import jax
import numpy as np
import tensorflow_datasets as tfds

from mtljax import errors
from mtljax import params as params_lib
from mtljax.data import builders

SPLITS = ("train", "test")
logger = logging.getLogger("mtljax")


class DataNotAvailableError(errors.DataError):
  """A catalog data set is not prepared here and mtljax never downloads."""


def default_data_dir() -> str:
  return os.environ.get("MTLJAX_DATA_DIR",
                        os.path.join(os.path.expanduser("~"), ".cache", "mtljax",
                                     "tensorflow_datasets"))


# ----------------------------------------------------------------------------
# Reading records into numpy.
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


# ----------------------------------------------------------------------------
# mtljax's splits as TFDS splits, and a held-out test split.
# ----------------------------------------------------------------------------


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
      raise ValueError(f"test_fraction must be in [0, 1) (0 = the data set's "
                       f"own test split), got {self.test_fraction!r}.")
    if not isinstance(self.train, str) or not self.train:
      raise ValueError(f"train_split must be a TFDS split string such as "
                       f"'train' or 'train+test', got {self.train!r}.")
    if self.test_fraction and self.test:
      raise ValueError(f"test_fraction={self.test_fraction} holds out part of "
                       f"train_split as the test split: set "
                       f"test_split='' (it is {self.test!r}).")
    if not self.test_fraction and (not isinstance(self.test, str) or not self.test):
      raise ValueError(f"test_split must be a TFDS split string such as 'test' "
                       f"(or '' with test_fraction > 0), got {self.test!r}.")


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
    raise ValueError(f"test_fraction={fraction} holds out {n_test} of the train "
                     f"split's {n} record(s): none would be left to train on.")
  return {"train": Subset(source, np.sort(order[n_test:])),
          "test": Subset(source, np.sort(order[:n_test]))}


# ----------------------------------------------------------------------------
# Data set names, checked without touching the disk.
# ----------------------------------------------------------------------------


# Data sets read from preprocessed files the user downloaded elsewhere
# (mtljax.data.dense_files): their files are under LocalFiles.root.
LOCAL_FILES = ("nyuv2_mtan", "cityscapes_mtan")


@dataclasses.dataclass(frozen=True)
class LocalFiles:
  """Where a :data:`LOCAL_FILES` data set's preprocessed files are
  (``config.data.root``) and how to read them: ``classes`` (0: the layout's
  default; Cityscapes: 2, 7 or 19) and ``label_folder`` ('': ``label`` for
  NYUv2, ``label_{classes}`` for Cityscapes; LibMTL's copy names it ``label``)."""
  root: str = ""
  classes: int = 0
  label_folder: str = ""


def source_names(name: str) -> tuple[str, ...]:
  """The data sets of ``config.data.name``: one name, or several joined by
  ``+`` (``"mnist+fashion_mnist"``: each data set's tasks on its own inputs)."""
  parts = tuple(p.strip() for p in str(name).split("+"))
  if not name or not all(parts):
    raise ValueError(f"name={name!r}: give a data set name, or several joined "
                     "by '+' (e.g. 'mnist+fashion_mnist').")
  if len(set(parts)) != len(parts):
    raise ValueError(f"name={name!r} names a data set twice.")
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
    raise ValueError(f"builder_config={builder_config!r} applies to one data "
                     f"set; name={name!r} has {len(parts)} (write "
                     "'NAME/CONFIG' for a catalog data set's builder config).")
  for part in parts:
    if part in LOCAL_FILES:
      if len(parts) > 1:
        raise ValueError(f"name={name!r}: {part!r} is read from its own files (root) and "
                         "cannot be joined with another data set by '+'.")
      if builder_config:
        raise ValueError(f"builder_config={builder_config!r}: {part!r} has no builder "
                         "configs (its files are chosen by root, classes and label_folder).")
      continue
    if part in builders.BUNDLED:
      config = builders.BUNDLED[part].config_from_name(builder_config)
      for split, fields in _EMPTY_SPLIT_FIELDS.items():
        for f in fields:
          if getattr(config, f, None) == 0:
            raise ValueError(f"builder_config={builder_config!r}: data set "
                             f"{part!r}, split {split!r} has no examples ({f}=0).")
      continue
    try:
      cls = tfds.builder_cls(part.split("/")[0])
    except Exception:  # pylint: disable=broad-except  (DatasetNotFoundError and friends)
      try:
        known = list(builders.BUNDLED) + tfds.list_builders(with_community_datasets=False)
      except Exception:  # pylint: disable=broad-except
        known = list(builders.BUNDLED)
      near = difflib.get_close_matches(part, list(dict.fromkeys(known)), n=3)
      hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else \
          " (tfds.list_builders() lists the catalog)."
      raise ValueError(f"name={part!r} is neither a bundled data set "
                       f"({', '.join(sorted(builders.BUNDLED))}), a data set of "
                       f"preprocessed files ({', '.join(LOCAL_FILES)}) nor a TFDS catalog "
                       f"data set{hint}") from None
    if builder_config and "/" not in part:
      _check_catalog_config(part, cls, builder_config)


def _check_catalog_config(part: str, cls, builder_config: str) -> None:
  """Refuses a builder config the catalog data set ``part`` (its builder class
  ``cls``) does not have, naming the bundled data set it belongs to if any
  (e.g. ``name=mnist`` with multi_digits' config left in place): TFDS's own
  error lists no close match and comes later."""
  names = [c.name for c in getattr(cls, "BUILDER_CONFIGS", None) or ()]
  if builder_config.split(":")[0] in names:
    return
  owners = []
  candidates = () if builder_config == "default" else sorted(builders.BUNDLED.items())
  for bundled, bcls in candidates:
    try:
      bcls.config_from_name(builder_config)
    except ValueError:
      continue
    owners.append(bundled)
  shown = ", ".join(repr(n) for n in names[:5]) + (f", ... ({len(names)} in all)"
                                                   if len(names) > 5 else "")
  has = (f"whose builder configs are {shown}): set builder_config='' or one of them"
         if names else "which has no builder configs): set builder_config=''")
  whose = (f"belongs to the bundled data set{'s' * (len(owners) > 1)} "
           f"{', '.join(repr(o) for o in owners)}, not to {part!r}" if owners
           else f"is not a builder config of {part!r}")
  raise ValueError(f"builder_config={builder_config!r} {whose} ({has}.")


# ----------------------------------------------------------------------------
# Builders (bundled: generated; catalog: downloaded when asked) and sources.
# ----------------------------------------------------------------------------


def lock_path(data_dir: str, name: str, config_name: str, version) -> str:
  """The lock file of one data set, builder config and version in ``data_dir``."""
  safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{name}-{config_name or 'default'}-{version}")
  return os.path.join(data_dir, ".mtljax-locks", f"{safe}.lock")


@contextlib.contextmanager
def preparing(data_dir: str, name: str, config_name: str, version):
  """Holds the data set's preparation lock (``fcntl.flock`` on
  :func:`lock_path`; the kernel drops it when the holder dies): a run that
  finds it taken says so and waits. Inside, check again whether the data set
  is prepared: the holder before may have prepared it."""
  path = lock_path(data_dir, name, config_name, version)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      logger.warning("Data set %r (%s, version %s) is being prepared in %s by another run: "
                     "waiting for it.", name, config_name or "default", version, data_dir)
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


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
    with preparing(data_dir, name, config.name, builder.version):
      builder = make()  # (prepared meanwhile by the run that held the lock?)
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
    raise ValueError(f"builder_config={config!r}: data set {name!r}, split "
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


def catalog_builder(full: str, data_dir: str):
  """``tfds.builder`` of a catalog data set (nothing downloaded: its features
  come from the code, or from ``data_dir`` when prepared)."""
  try:
    return tfds.builder(full, data_dir=data_dir, file_format="array_record")
  except Exception as e:  # pylint: disable=broad-except  (an unknown builder config)
    raise ValueError(f"builder_config: TFDS data set {full!r}: "
                     f"{str(e).strip().splitlines()[0]}") from None


def _split_source(builder, name: str, split: str, tfds_split: str):
  """``builder.as_data_source(tfds_split)``, mtljax's ``split`` (``train``
  or ``test``) read from a builder that knows its splits (prepared): an
  unknown, malformed or empty TFDS split is one line naming the config key
  (TFDS raises ``Unknown split`` or, for a slice with no records, ``Paths
  sequence can not be of 0 length``)."""
  known = list(builder.info.splits)
  key = f"{split}_split={tfds_split!r}"
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
  builder = catalog_builder(full, data_dir)
  error = None
  if not builder.is_prepared() and download:
    try:
      _check_network()  # before the lock: offline, nothing is written to data_dir
      with preparing(data_dir, name, full.partition("/")[2], builder.version):
        builder = catalog_builder(full, data_dir)  # (prepared meanwhile by the lock's holder?)
        if not builder.is_prepared():
          tfds.disable_progress_bar()
          builder.download_and_prepare()
        builder = catalog_builder(full, data_dir)  # (its info now has the splits)
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
  split, :class:`Splits`). A :data:`LOCAL_FILES` data set is read from
  ``local.root``'s preprocessed files, prepared into ``data_dir`` once
  (:func:`mtljax.data.dense_files.open_dense`).

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
  if name in LOCAL_FILES:
    raise ValueError(f"data set {name!r} is read from its preprocessed files: open it with "
                     "mtljax.data.loading.open_all(..., local=LocalFiles(root=...)).")
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
