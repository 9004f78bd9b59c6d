"""The host input pipeline: data that does not fit on the device.

The device path (:mod:`mtljax.data.loading`) puts every input on the device
and samples inside the compiled step. Here only the *labels* and an index of
records live in memory; each step's inputs are read from the split's data
source (TFDS array_record, or any random-access sequence of dicts), decoded
and normalised on the host, in Grain worker threads, and prefetched to the
device with the step's input shardings, double-buffered.

The draws are the step's own: task ids and example indices come from
:func:`mtljax.data.sampling.sample_indices` with the keys of
:func:`mtljax.data.sampling.step_keys` (computed on the host's CPU), so with one
process the host path reads exactly the examples the device path gathers, and
a batch is a pure function of ``(seed, step)``. The pipeline's state is
therefore the step, which the checkpoint holds: a resumed run reads the
batches it would have read (bitwise-identical parameters).

Several processes: each reads only its shard of the train split (every
``processes``-th record from its index), draws ``B / processes`` examples per slot from it (the same
task ids everywhere), and the global batch is assembled with
``jax.make_array_from_process_local_data``. Label statistics and task sizes are
summed over processes. Every process reads the whole test split.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import queue
import threading
import time
from typing import Any, Callable, Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_parser

from mtljax.data import loading
from mtljax.data import sampling
from mtljax.data import specs as specs_lib
from mtljax.data import task_data
from mtljax.data import tfds_access

_EXAMPLE = example_parser.tf_example_pb2.Example

logger = logging.getLogger("mtljax")

PIPELINES = ("auto", "device", "host")


# ----------------------------------------------------------------------------
# Choosing a pipeline.
# ----------------------------------------------------------------------------


def input_bytes(features, sources: dict, spec: specs_lib.DataSpec) -> int:
  """Bytes the device path needs for the inputs of every split (float32),
  and for a dense task's per-pixel labels (4 bytes a value: a segmentation
  map, depth, normals), which are as large as the images."""
  shape, _ = specs_lib.input_feature(features, spec)
  if any(d is None or d < 0 for d in shape):
    raise ValueError(f"Input feature {spec.input_key!r} has a dynamic shape {shape}; "
                     "mtljax needs inputs of one fixed shape.")
  per_example = math.prod(shape)
  flat = specs_lib.flatten_features(features)
  for c in spec.columns:
    if c.task.dense:
      per_example += math.prod(flat[c.label_key].shape)
  return sum(len(src) for src in sources.values()) * per_example * 4


def default_budget_mb() -> float:
  """A quarter of the first device's memory where the backend reports it
  (GPU, TPU), else 4096 MiB (CPU)."""
  try:
    limit = jax.devices()[0].memory_stats()["bytes_limit"]
    return float(limit) / 4 / 2**20
  except Exception:  # pylint: disable=broad-except  (CPU: no memory_stats)
    return 4096.0


def choose(pipeline: str, nbytes: int, budget_mb: float, process_count: int = 1
           ) -> tuple[str, str]:
  """``(pipeline, why)``: ``auto`` picks the device path when the inputs fit
  ``budget_mb`` and one process runs, else the host pipeline."""
  if pipeline not in PIPELINES:
    raise ValueError(f"pipeline={pipeline!r} is not one of {PIPELINES}.")
  budget_mb = budget_mb or default_budget_mb()
  size = (f"inputs (with any per-pixel labels) {nbytes / 2**20:.1f} MiB as float32, budget "
          f"{budget_mb:g} MiB")
  if pipeline != "auto":
    return pipeline, f"config.data.pipeline={pipeline!r} ({size})"
  if process_count > 1:
    return "host", f"{process_count} processes: each reads its own shard ({size})"
  if nbytes > budget_mb * 2**20:
    return "host", f"{size}: over the budget"
  return "device", f"{size}: they fit"


# ----------------------------------------------------------------------------
# Reading records.
# ----------------------------------------------------------------------------


class BadRecord(ValueError):
  """A record whose input is not what the data set declares."""

  def __init__(self, index: int, what: str):
    super().__init__(what)
    self.index, self.what = index, what


@dataclasses.dataclass(frozen=True)
class Reader:
  """Reads and decodes the inputs of one split's records.

  From a TFDS array_record source whose input is a plain ``Tensor`` feature,
  only the input is parsed out of each record's serialized ``tf.train.Example``
  (4x faster than TFDS decoding every feature of the record, which is Python
  per feature); any other source goes through its own ``__getitems__``.
  Both give the same arrays (tests/test_pipeline.py)."""
  source: Any
  input_key: str
  input_shape: tuple
  input_dtype: np.dtype

  @functools.cached_property
  def raw(self):
    """The source's raw array_record reader, when the fast path applies."""
    inner = getattr(self.source, "data_source", None)
    info = getattr(self.source, "dataset_info", None)
    if inner is None or info is None or getattr(self.source, "decoders", None):
      return None
    if not type(inner).__module__.startswith("array_record"):
      return None  # e.g. tfds.testing.mock_data's stand-in
    feat = specs_lib.flatten_features(info.features).get(self.input_key)
    if type(feat) is not tfds.features.Tensor or feat._encoding not in (  # pylint: disable=protected-access
        tfds.features.Encoding.NONE, tfds.features.Encoding.BYTES):
      return None
    return inner

  def decode(self, index: int, x: np.ndarray) -> np.ndarray:
    """The record's input as float32 (uint8 / 255), or :class:`BadRecord`."""
    if x.shape != self.input_shape:
      raise BadRecord(index, f"input {self.input_key!r} has shape {x.shape}, the data set "
                             f"declares {self.input_shape}")
    if x.dtype == np.uint8:
      return x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
      raise BadRecord(index, f"input {self.input_key!r} contains NaN or infinite values")
    return x

  def check(self, index: int, record: dict) -> np.ndarray:
    return self.decode(index, np.asarray(record[self.input_key]))

  def _parse(self, index: int, serialized: bytes) -> np.ndarray:
    features = _EXAMPLE.FromString(serialized).features.feature
    kind = features[self.input_key].WhichOneof("kind") if self.input_key in features else None
    if kind is None:
      raise BadRecord(index, f"the record has no input {self.input_key!r}")
    feature = features[self.input_key]
    if kind == "bytes_list":  # Encoding.BYTES: the array's raw bytes
      flat = np.frombuffer(feature.bytes_list.value[0], self.input_dtype)
    else:
      flat = np.asarray(getattr(feature, kind).value, self.input_dtype)
    size = math.prod(self.input_shape)
    if flat.size != size:
      raise BadRecord(index, f"input {self.input_key!r} has {flat.size} values, the data set "
                             f"declares shape {self.input_shape}")
    return self.decode(index, flat.reshape(self.input_shape))

  def inputs(self, records: np.ndarray) -> np.ndarray:
    """``[*records.shape, *input_shape]`` float32 (each record read once,
    in one batched read)."""
    uniq, inv = np.unique(records, return_inverse=True)
    out = np.empty((len(uniq),) + self.input_shape, np.float32)
    ids = [int(i) for i in uniq]
    if self.raw is not None:
      for j, (i, r) in enumerate(zip(ids, self.raw.__getitems__(ids))):
        out[j] = self._parse(i, r)
    else:
      for j, (i, r) in enumerate(zip(ids, tfds_access.read_records(self.source, ids))):
        out[j] = self.check(i, r)
    return out[inv.reshape(-1)].reshape(records.shape + self.input_shape)


def _task_of_record(spec: specs_lib.DataSpec, record: dict) -> str:
  """The task(s) a record belongs to, for errors."""
  if spec.split_key is None:
    return f"task(s) {[c.task.name for c in spec.columns]}"
  return f"task {specs_lib.family_task_name(spec, record[spec.split_key])!r}"


def shard(n: int, index: int, count: int) -> np.ndarray:
  """Records of shard ``index`` of ``count``: every ``count``-th from
  ``index`` (strided, so a split written task by task gives every shard
  every task's examples)."""
  return np.arange(index, n, count, dtype=np.int64)


def load(name: str, *, data_dir: str | None = None, builder_config: str = "",
         task_names=(), max_train_examples: int | None = None, input_key: str = "image",
         label_keys=(), normalize_labels: bool = True, sources: dict | None = None,
         features=None, spec: specs_lib.DataSpec | None = None, shard_index: int = 0,
         shard_count: int = 1) -> task_data.MultiTaskData:
  """A data set for the host pipeline: labels and record indices in memory
  (``records [S, N]`` in place of ``x``), inputs read on demand
  (``data.readers``). ``sources``/``features``/``spec`` stand in for a TFDS
  data set (any random-access sequence of dicts, for tests and custom data).

  Every record is read once here (batched): its labels (and ``<label>_mask``
  features: missing labels, :func:`mtljax.data.task_data.mark_missing`) are
  kept, its input is checked against the declared shape and for NaN. ``shard_index`` of
  ``shard_count`` (:meth:`mtljax.sharding.Placement.data_shard`: this process's
  slice of the mesh's ``data`` axis): only that shard of the train split is
  read (``max_train_examples`` then counts per shard); with several processes
  task sizes and label statistics are summed over the shards."""
  p, count = int(shard_index), int(shard_count)
  if sources is None:
    features, sources = tfds_access.open_sources(name, data_dir=data_dir,
                                                 builder_config=builder_config)
  if spec is None:
    spec = loading.spec_for(name, features, builder_config, input_key, label_keys)
  shape, dtype = specs_lib.input_feature(features, spec)
  keys = list(dict.fromkeys([c.label_key for c in spec.columns] +
                            ([spec.split_key] if spec.split_key else []) +
                            specs_lib.mask_keys(spec, specs_lib.flatten_features(features))))
  arrays, readers = {}, {}
  for split, src in sources.items():
    reader = Reader(src, spec.input_key, shape, np.dtype(dtype))
    ids = shard(len(src), p, count) if split == "train" else shard(len(src), 0, 1)
    where = (f" (shard {p} of {count}: records {p}::{count})"
             if count > 1 and split == "train" else "")
    if not len(ids):
      raise ValueError(f"Data set {name!r}, split {split!r} has no examples{where}.")

    def check(i, r, split=split, reader=reader):
      try:
        reader.check(i, r)
      except BadRecord as e:
        task = _task_of_record(spec, r)
        raise ValueError(f"Data set {name!r}, split {split!r}, {task}, record {i}: "
                         f"{e.what}.") from None
    cols = tfds_access.read_columns(src, keys, indices=ids, check=check)
    cols[spec.input_key] = ids
    arrays[split], readers[split] = cols, reader
  if jax.process_count() > 1:
    logger.info("Host pipeline: process %d of %d reads train shard %d of %d (records "
                "%d::%d, %d of %d).", jax.process_index(), jax.process_count(), p, count,
                p, count, len(shard(len(sources["train"]), p, count)), len(sources["train"]))
  reduce = None
  if count > 1 and jax.process_count() > 1:  # (count > 1 in one process: a simulation)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    replicas = jax.process_count() // count  # processes holding the same shard
    reduce = lambda a: np.sum(multihost_utils.process_allgather(a), axis=0) / replicas
  limit = max(max_train_examples // count, 1) if max_train_examples else None
  try:
    data = task_data.build_task_data(name, spec, arrays, task_names=task_names,
                                     max_train_examples=limit,
                                     normalize_labels=normalize_labels, records=True,
                                     reduce_sums=reduce)
  except ValueError as e:
    if count > 1:
      raise ValueError(f"{e} (this process reads shard {p} of {count} of the train "
                       "split: use fewer shards or the device pipeline)") from None
    raise
  return dataclasses.replace(data, input_shape=shape, readers=readers)


# ----------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------


class Batches:
  """The training batches of a run, a pure function of ``(seed, step)``.

  ``call(c)`` is host call ``c``'s batch: ``steps_per_call`` steps stacked
  (no leading axis when it is 1), ``{"task_ids" [K] int32, "x" [K, B, ...] or
  [B, ...] float32, "y" {group: [K, B]}}``, with ``B`` this process's share;
  with ``sampler.draws = D > 1`` (:func:`mtljax.data.sampling.sample_draws`)
  the ``D`` draws are ``D K`` slots, each with its own ``[B, ...]`` inputs.
  """

  def __init__(self, data: task_data.MultiTaskData, sampler: sampling.Sampler, seed: int, *,
               steps_per_call: int = 1, shard_index: int = 0, shard_count: int = 1):
    if data.readers is None:
      raise ValueError("Batches needs data loaded for the host pipeline "
                       "(mtljax.data.pipeline.load).")
    self.data, self.sampler, self.spc = data, sampler, int(steps_per_call)
    p, count = int(shard_index), int(shard_count)
    self.shard_count = count
    b = sampler.examples_per_task
    if b % count:
      raise ValueError(f"examples_per_task={b} is split over {count} "
                       "data shards, which does not divide it.")
    self.local_b = b // count
    self.local_index = np.asarray(data.taskset.local_index)
    split = data.train
    try:  # the draws are small integer work: the host's CPU device
      cpu = jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu: the default device
      cpu = jax.local_devices()[0]
    n = np.asarray(split["n"], np.int32)
    # The sampler's arrays as host constants (with several processes, arrays
    # made for the device mesh span devices of other processes).
    sampler = sampler._replace(**{f: np.asarray(getattr(sampler, f))
                                  for f in ("probs", "stream_ids", "local_index")})
    local_b, spc = self.local_b, self.spc

    def draws(call):
      key = jax.random.key(seed)  # the step's key(seed) (state.rng)
      smp = sampler._replace(**{f: jnp.asarray(getattr(sampler, f))
                                for f in ("probs", "stream_ids", "local_index")})

      def one(i):
        r_tasks, r_examples, _ = sampling.step_keys(key, call * spc + i)
        if count > 1:  # this shard's own examples, the same tasks everywhere
          r_examples = jax.random.fold_in(r_examples, p)
        return sampling.sample_draws(smp, jnp.asarray(n), r_tasks, r_examples, local_b)
      return jax.vmap(one)(jnp.arange(spc))
    with jax.default_device(cpu):
      self._draws = jax.jit(draws)
    self._cpu = cpu

  def indices(self, call: int) -> tuple[np.ndarray, np.ndarray]:
    """Task ids ``[spc, D K]`` and example indices ``[spc, (D K,) B]`` of a call
    (``D = sampler.draws``)."""
    with jax.default_device(self._cpu):
      ids, idx = self._draws(jnp.asarray(call, jnp.int32))
    return np.asarray(ids), np.asarray(idx)

  def call(self, call: int) -> dict:
    ids, idx = self.indices(call)
    split, reader = self.data.train, self.data.readers["train"]
    out = {"task_ids": ids, "x": [], "y": []}
    for t_ids, e_idx in zip(ids, idx):
      if self.sampler.shared_batch:
        records = split["records"][split["source"][t_ids[0]], e_idx]
      else:
        records = split["records"][split["source"][t_ids][:, None], e_idx]
      try:
        out["x"].append(reader.inputs(records))
      except BadRecord as e:
        rows = np.argwhere(records == e.index)[0]
        task = self.data.taskset.names[t_ids[rows[0]] if records.ndim == 2 else t_ids[0]]
        raise ValueError(f"Data set {self.data.name!r}, split 'train', task {task!r}, "
                         f"record {e.index}: {e.what}.") from None
      out["y"].append(sampling.gather_labels(split["y"], self.local_index, t_ids, e_idx))
    batch = {"task_ids": ids.astype(np.int32), "x": np.stack(out["x"]),
             "y": {g: np.stack([y[g] for y in out["y"]]) for g in out["y"][0]}}
    if self.spc == 1:
      batch = jax.tree.map(lambda a: a[0], batch)
    return batch

  def iterator(self, first_call: int, num_calls: int, workers: int = 2,
               prefetch: int = 4) -> Iterator[dict]:
    """Calls ``first_call .. num_calls - 1`` read by ``workers`` Grain threads."""
    ds = grain.MapDataset.range(first_call, num_calls).map(self.call)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=max(int(workers), 1),
                                                     prefetch_buffer_size=int(prefetch))))


def eval_chunks(data: task_data.MultiTaskData, split_name: str, chunk: int
                ) -> Iterator[dict]:
  """Every example of every task, ``chunk`` positions at a time:
  ``{"x" [T, C, ...], "y" {group: [T, C]}, "valid" [T, C]}``."""
  split, reader = data.split(split_name), data.readers[split_name]
  n = np.asarray(split["n"])
  num_tasks = len(n)
  tasks = np.arange(num_tasks)
  local = np.asarray(data.taskset.local_index)
  for c in range(math.ceil(int(n.max()) / chunk)):
    pos = c * chunk + np.arange(chunk)
    valid = pos[None, :] < n[:, None]
    idx = np.minimum(pos[None, :], n[:, None] - 1)
    records = split["records"][split["source"][:, None], idx]
    try:
      x = reader.inputs(records)
    except BadRecord as e:
      task = data.taskset.names[int(np.argwhere(records == e.index)[0][0])]
      raise ValueError(f"Data set {data.name!r}, split {split_name!r}, task {task!r}, "
                       f"record {e.index}: {e.what}.") from None
    yield {"x": x, "y": sampling.gather_labels(split["y"], local, tasks, idx), "valid": valid}


# ----------------------------------------------------------------------------
# To the device.
# ----------------------------------------------------------------------------


def put(batch, shardings, shard_count: int = 1):
  """A host batch on the devices: ``device_put`` with one process; with
  several, each process's piece (``1 / shard_count`` of the examples, the
  example axis being the one split along ``data``) becomes its part of the
  global array."""
  if jax.process_count() == 1:
    return jax.device_put(batch, shardings)

  def global_shape(a, sh):
    shape = list(np.shape(a))
    for dim, entry in enumerate(sh.spec):
      if entry == "data":
        shape[dim] *= shard_count
    return tuple(shape)
  shapes = jax.tree.map(global_shape, batch, shardings)
  return jax.tree.map(jax.make_array_from_process_local_data, shardings, batch, shapes)


class Prefetch:
  """Keeps ``size`` batches on the device ahead of the step (a thread puts
  them with the step's input shardings while the step runs). ``wait_s``:
  seconds ``next`` spent waiting for input. ``close`` stops the thread
  whatever it is doing (it never blocks on a full queue)."""

  _END = object()

  def __init__(self, batches: Iterator[dict], put_fn: Callable, size: int = 2):
    self._q: queue.Queue = queue.Queue(maxsize=max(int(size), 1))
    self._stop = threading.Event()
    self.wait_s = 0.0

    def offer(item) -> bool:
      while not self._stop.is_set():
        try:
          self._q.put(item, timeout=0.1)
          return True
        except queue.Full:
          continue
      return False

    def work():
      try:
        for b in batches:
          if self._stop.is_set() or not offer(put_fn(b)):
            return
        offer(self._END)
      except BaseException as e:  # pylint: disable=broad-except
        offer(e)
    self._thread = threading.Thread(target=work, daemon=True, name="mtljax-prefetch")
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    t0 = time.perf_counter()
    item = self._q.get()
    self.wait_s += time.perf_counter() - t0
    if item is self._END:
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self, timeout: float = 5.0) -> None:
    self._stop.set()
    while True:  # free the queue's slots (and the device batches in them)
      try:
        self._q.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout)
