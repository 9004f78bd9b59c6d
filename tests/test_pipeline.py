"""The host input pipeline (mtljax.data.pipeline) against the device path.

References: the device path's own draws and gathers (the host must read
exactly those examples), a chi-square test of task and example frequencies
against the sampler's distribution (fixed seed), an uninterrupted run (for
resume), the records of each process's shard (disjoint, covering the split),
and the records of a mocked catalog data set read directly.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import tensorflow_datasets as tfds

import helpers
from mtljax import build
from mtljax import checkpoint as ckpt_lib
from mtljax import cv
from mtljax import steps
from mtljax import train
from mtljax.data import loading
from mtljax.data import pipeline
from mtljax.data import sampling
from mtljax.data import specs
from mtljax.data import tfds_access

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------
# The same draws as the device path.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, builder_config, k, shared, replace, draws", [
    ("multi_digits", "n300_m60_s0", 2, True, False, 1),    # shared inputs, K = T
    ("multi_digits", "n300_m60_s0", 2, False, False, 1),   # per-slot draws of one source
    ("sinusoids", "t5_n30_m20_s0", 3, False, True, 1),     # tasks on different inputs, K < T
    ("multi_digits", "n300_m60_s0", 2, True, False, 3),    # MoDo / SDMGrad: three draws
    ("sinusoids", "t5_n30_m20_s0", 3, False, True, 3),
])
def test_host_batches_are_the_device_path_draws(name, builder_config, k, shared, replace,
                                                draws):
  device = loading.load(name, builder_config=builder_config)
  host = pipeline.load(name, builder_config=builder_config)
  ts = device.taskset
  probs = sampling.task_probabilities("uniform", device.num_train)
  sampler = sampling.make_sampler(ts, probs, k, 6, replace, shared, draws=draws)
  spc, key = 2, jax.random.key(7)
  batches = pipeline.Batches(host, sampler, 7, steps_per_call=spc)
  on_device = jax.tree.map(jnp.asarray, device.train)
  for call in (0, 3):
    got = batches.call(call)
    for i in range(spc):
      r_tasks, r_examples, _ = sampling.step_keys(key, call * spc + i)
      want = steps.sample_batch(sampler, on_device, r_tasks, r_examples)
      np.testing.assert_array_equal(got["task_ids"][i], np.asarray(want.task_ids))
      np.testing.assert_array_equal(got["x"][i], np.asarray(want.x))
      for g in want.ys:
        np.testing.assert_array_equal(got["y"][g][i], np.asarray(want.ys[g]))


def _assert_same_run(a_dir, b_dir, rtol=0.0):
  pa, step_a = ckpt_lib.read_params(a_dir)
  pb, step_b = ckpt_lib.read_params(b_dir)
  assert step_a == step_b and jax.tree.structure(pa) == jax.tree.structure(pb)
  helpers.assert_trees_close(pa, pb, rtol=rtol, atol=0)
  rows = [helpers.metrics_rows(d) for d in (a_dir, b_dir)]
  assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]
  for ra, rb in zip(*rows):
    for key in ra:
      np.testing.assert_allclose(ra[key], rb[key], rtol=1e-5, err_msg=key)


def test_host_run_equals_device_run(tmp_path):
  runs = {}
  for kind in ("device", "host"):
    config = helpers.small_sinusoids_config(**{"data.pipeline": kind})
    runs[kind] = train.train_and_evaluate(config, str(tmp_path / kind))
  assert runs["device"]["data_pipeline"]["pipeline"] == "device"
  host = runs["host"]["data_pipeline"]
  assert host["pipeline"] == "host" and host["calls"] == 8  # 40 steps in calls of 5
  assert runs["host"]["train_step_compilations"] == 1
  _assert_same_run(str(tmp_path / "device"), str(tmp_path / "host"), rtol=1e-6)


class _TinyImages(tfds.core.GeneratorBasedBuilder):
  """12 uint8 8x8x3 images stored two ways (raw bytes; one int64 per pixel)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    t = lambda enc: tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8, encoding=enc)
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "raw": t(tfds.features.Encoding.BYTES), "ints": t(tfds.features.Encoding.NONE),
        "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):  # pylint: disable=unused-argument
    return {"train": self._generate_examples(0), "test": self._generate_examples(1)}

  def _generate_examples(self, seed):
    rng = np.random.default_rng(seed)
    for i in range(12):
      img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
      yield i, {"raw": img, "ints": img, "label": i % 3}


@pytest.mark.parametrize("name, builder_config", [("multi_digits", "n300_m60_s0"),
                                                  ("tiny_images", "")])
def test_the_input_parsed_alone_equals_tfds_decoding(name, builder_config, tmp_path):
  if name == "tiny_images":
    builder = _TinyImages(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    source, keys = builder.as_data_source(split="train"), ("raw", "ints")
  else:
    _, sources = tfds_access.open_sources(name, builder_config=builder_config)
    source, keys = sources["train"], ("image",)
  records = np.array([[3, 0, 3], [7, 11, 1]])
  for key in keys:
    feat = source.dataset_info.features[key]
    reader = pipeline.Reader(source, key, tuple(feat.shape), np.dtype(feat.np_dtype))
    assert reader.raw is not None  # the fast path
    want = np.stack([reader.check(int(i), r) for i, r in
                     zip(records.ravel(), tfds_access.read_records(source, records.ravel()))])
    got = reader.inputs(records)
    np.testing.assert_array_equal(got, want.reshape(got.shape))


# ----------------------------------------------------------------------------
# A small data set of our own: each record's input is its own index.
# ----------------------------------------------------------------------------


class _Records:
  """A random-access source of ``{"x": [index, 0], "y", "task"}`` records;
  ``bad`` record indices get an input of another shape once ``corrupt``."""

  def __init__(self, tasks, y=None, bad=(), shape=(2,)):
    self.tasks = np.asarray(tasks, np.int64)
    self.y = (np.arange(len(tasks), dtype=np.float32) % 7 if y is None
              else np.asarray(y))
    self.bad, self.corrupt, self.shape = set(bad), False, shape

  def __len__(self):
    return len(self.tasks)

  def __getitem__(self, i):
    i = int(i)
    shape = (3,) if (self.corrupt and i in self.bad) else self.shape
    x = np.zeros(shape, np.float32)
    x[0] = i
    return {"x": x, "y": self.y[i], "task": self.tasks[i]}


def _features(y_dtype=np.float32):
  return tfds.features.FeaturesDict({
      "x": tfds.features.Tensor(shape=(2,), dtype=np.float32),
      "y": tfds.features.Tensor(shape=(), dtype=y_dtype),
      "task": tfds.features.Tensor(shape=(), dtype=np.int64)})


_FAMILY = specs.DataSpec("x", (specs._reg("t", "y"),), split_key="task")  # pylint: disable=protected-access


def _family(sizes, test_sizes=None, **kwargs):
  tasks = np.concatenate([np.full(n, t) for t, n in enumerate(sizes)])
  test = np.concatenate([np.full(n, t) for t, n in enumerate(test_sizes or sizes)])
  return {"train": _Records(tasks, **kwargs), "test": _Records(test)}


def test_task_and_example_frequencies_follow_the_sampler():
  # Proportional task sampling with replacement (K i.i.d. draws from p), B
  # examples per slot uniform over the task's own examples.
  sizes = np.array([5, 20, 40])
  sources = _family(sizes)
  data = pipeline.load("fam", sources=sources, features=_features(), spec=_FAMILY)
  probs = sampling.task_probabilities("proportional", data.num_train)
  sampler = sampling.make_sampler(data.taskset, probs, 2, 4, True, False)
  batches = pipeline.Batches(data, sampler, 0, steps_per_call=50)
  ids, records = [], []
  for c in range(8):
    b = batches.call(c)
    ids.append(b["task_ids"].ravel())
    records.append(b["x"][..., 0].astype(np.int64).reshape(len(b["task_ids"]), 2, 4))
  ids = np.concatenate(ids)
  task_counts = np.bincount(ids, minlength=3)
  assert scipy.stats.chisquare(task_counts, task_counts.sum() * probs).pvalue > 1e-3
  records = np.concatenate(records).reshape(-1, 4)  # [slots, B], slot order as ids
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  for t in range(3):
    seen = records[ids == t].ravel() - starts[t]
    assert seen.min() >= 0 and seen.max() < sizes[t]  # only the task's own records
    counts = np.bincount(seen, minlength=sizes[t])
    assert scipy.stats.chisquare(counts).pvalue > 1e-3, t


# ----------------------------------------------------------------------------
# Resume: a killed run continues with the batches it would have read.
# ----------------------------------------------------------------------------


class _Stop(Exception):
  pass


def test_resumed_host_run_reads_the_same_batches(tmp_path):
  config = helpers.small_sinusoids_config(**{"data.pipeline": "host"})
  train.train_and_evaluate(config, str(tmp_path / "whole"))

  def stop_at_15(step, _):
    if step == 15:  # after the checkpoint at 10, in the middle of the data
      raise _Stop()
  with pytest.raises(_Stop):
    train.train_and_evaluate(config, str(tmp_path / "cut"), callbacks=[stop_at_15])
  summary = train.train_and_evaluate(config, str(tmp_path / "cut"))
  assert summary["resumed_from_step"] == 10
  _assert_same_run(str(tmp_path / "whole"), str(tmp_path / "cut"))  # bitwise


@pytest.mark.slow
@pytest.mark.parametrize("method", ["modo", "sdmgrad", "auto_lambda", "moml", "forum"])
def test_a_double_sampling_run_on_either_pipeline_resumes_bitwise(method, tmp_path):
  """MoDo / SDMGrad / MOML read three draws a step, Auto-lambda and FORUM two: the host
  pipeline reads the device path's draws (the same run, to float32 rounding), and a host
  run stopped between checkpoints resumes to the uninterrupted run's bits
  (parameters, every metrics row, the weights' state)."""
  runs = {}
  for kind in ("device", "host"):
    config = helpers.small_sinusoids_config(**{"data.pipeline": kind,
                                               "objective.method": method})
    runs[kind] = train.train_and_evaluate(config, str(tmp_path / kind))
    assert runs[kind]["data_pipeline"]["pipeline"] == kind
  _assert_same_run(str(tmp_path / "device"), str(tmp_path / "host"), rtol=1e-6)

  def stop_at_15(step, _):
    if step == 15:
      raise _Stop()
  config = helpers.small_sinusoids_config(**{"data.pipeline": "host",
                                             "objective.method": method})
  with pytest.raises(_Stop):
    train.train_and_evaluate(config, str(tmp_path / "cut"), callbacks=[stop_at_15])
  summary = train.train_and_evaluate(config, str(tmp_path / "cut"))
  assert summary["resumed_from_step"] == 10
  _assert_same_run(str(tmp_path / "host"), str(tmp_path / "cut"))  # bitwise
  (a, _), (b, _) = (ckpt_lib.read_tree(str(tmp_path / d)) for d in ("host", "cut"))
  key = {"sdmgrad": "w", "moml": "alpha", "forum": "alpha"}.get(method, "lambda")
  np.testing.assert_array_equal(np.asarray(a["objective_state"][key]),
                                np.asarray(b["objective_state"][key]))
  start = 0.1 if method == "auto_lambda" else 1 / 8
  assert not np.allclose(np.asarray(a["objective_state"][key]), start)  # it moved


# ----------------------------------------------------------------------------
# Several processes: disjoint shards covering the split.
# ----------------------------------------------------------------------------


def test_each_process_reads_its_own_shard():
  sizes = [7, 12, 9]
  sources = _family(sizes)
  shards = [pipeline.load("fam", sources=sources, features=_features(), spec=_FAMILY,
                          shard_index=p, shard_count=2) for p in range(2)]
  held = []
  for p, data in enumerate(shards):
    tr = data.train
    held.append({int(r) for t, n in enumerate(tr["n"]) for r in tr["records"][tr["source"][t], :n]})
    assert all(r % 2 == p for r in held[p])
  assert not held[0] & held[1] and held[0] | held[1] == set(range(sum(sizes)))
  probs = sampling.task_probabilities("uniform", np.asarray(sizes))
  sampler = sampling.make_sampler(shards[0].taskset, probs, 2, 6, False, False)
  calls = [pipeline.Batches(d, sampler, 1, steps_per_call=4,
                            shard_index=p, shard_count=2).call(2)
           for p, d in enumerate(shards)]
  np.testing.assert_array_equal(calls[0]["task_ids"], calls[1]["task_ids"])  # same tasks
  for p, b in enumerate(calls):
    assert b["x"].shape[2] == 3  # B = 6 over 2 processes
    assert set(b["x"][..., 0].astype(int).ravel()) <= held[p]


@pytest.mark.slow
def test_two_processes_read_disjoint_shards_and_train_on_a_global_mesh(tmp_path):
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(
      [sys.executable, "tests/pipeline_worker.py", f"127.0.0.1:{port}", str(i),
       str(tmp_path), str(tmp_path / "run")], cwd=_ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  got = [json.load(open(tmp_path / f"p{i}.json")) for i in range(2)]
  whole = build.data_from_config(helpers.small_sinusoids_config(**{"data.pipeline": "device"}))
  n_records = int(np.sum(whole.train["n"]))
  held = [set(g["held"]) for g in got]
  assert not held[0] & held[1] and held[0] | held[1] == set(range(n_records))
  assert not set(got[0]["held_x"]) & set(got[1]["held_x"])  # the shards' inputs differ
  for g, h in zip(got, held):
    assert g["processes"] == 2 and g["devices"] == 8 and g["pipeline"] == "host"
    assert set(g["read_x"]) <= set(g["held_x"])  # inputs only of its own shard's records
    np.testing.assert_array_equal(g["num_train"], whole.num_train)  # the whole split's
    np.testing.assert_allclose(g["label_mean"], whole.label_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g["label_std"], whole.label_std, rtol=1e-5)
    assert np.isfinite(g["loss"])
  assert got[0]["task_ids"] == got[1]["task_ids"]
  assert got[0]["loss"] == got[1]["loss"]  # one global model
  # data=1: both processes read the whole split and feed the same examples, so
  # the run is the one-process run.
  one = train.train_and_evaluate(helpers.small_sinusoids_config(**{
      "data.pipeline": "host", "total_steps": 10, "steps_per_call": 5, "log_steps": 5,
      "eval_steps": 10, "checkpoint_steps": 10}), str(tmp_path / "one"))
  for g in got:
    for task, metrics in one["tasks"].items():
      np.testing.assert_allclose(g["replica_tasks"][task]["mse"], metrics["mse"], rtol=2e-4)
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [5, 10]  # written once, by process 0


# ----------------------------------------------------------------------------
# A catalog data set (mocked, offline): CelebA's 40 binary attributes.
# ----------------------------------------------------------------------------


def test_celeba_like_catalog_data_through_the_host_pipeline(tmp_path):
  with tfds.testing.mock_data(num_examples=24):
    data = pipeline.load("celeb_a", data_dir=str(tmp_path), input_key="image")
    ts = data.taskset
    assert len(ts) == 40 and {t.kind for t in ts} == {"binary"}
    assert data.input_shape == (218, 178, 3)
    probs = sampling.task_probabilities("uniform", data.num_train)
    sampler = sampling.make_sampler(ts, probs, 40, 4, False, True)
    b = pipeline.Batches(data, sampler, 0).call(0)
    assert b["x"].shape == (4, 218, 178, 3)
    source = data.readers["train"].source
    _, r_examples, _ = sampling.step_keys(jax.random.key(0), 0)
    idx = np.asarray(jax.random.randint(r_examples, (4,), 0, 24))  # the shared draw
    records = tfds_access.read_records(source, idx)
    np.testing.assert_allclose(b["x"], np.stack([r["image"] for r in records]) / 255.0,
                               rtol=1e-6)
    (group,) = b["y"]
    for k, t in enumerate(b["task_ids"]):
      want = [r[ts.tasks[t].name.replace(".", "/")] for r in records]
      np.testing.assert_array_equal(b["y"][group][k], np.asarray(want, np.int32))

    config = helpers.small_sinusoids_config(**{
        "data.name": "celeb_a", "data.builder_config": "", "data.data_dir": str(tmp_path),
        "data.device_budget_mb": 1.0, "sampling.tasks_per_step": 0,
        "sampling.shared_inputs": True, "sampling.examples_per_task": 4,
        "total_steps": 4, "steps_per_call": 2, "log_steps": 2, "eval_steps": 4,
        "checkpoint_steps": 4, "eval_batch_size": 8, "model.hidden": (8,)})
    summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["data_pipeline"]["pipeline"] == "host"  # 5.5 MiB of inputs > 1 MiB
  assert len(summary["tasks"]) == 40
  assert all(np.isfinite(m["loss"]) for m in summary["tasks"].values())


# ----------------------------------------------------------------------------
# Choosing, and what is refused.
# ----------------------------------------------------------------------------


def test_auto_chooses_by_size_and_processes():
  assert pipeline.choose("auto", 10 * 2**20, 64)[0] == "device"
  kind, why = pipeline.choose("auto", 100 * 2**20, 64)
  assert kind == "host" and "100.0 MiB" in why and "over the budget" in why
  assert pipeline.choose("auto", 1, 64, process_count=2)[0] == "host"
  assert pipeline.choose("device", 100 * 2**20, 64)[0] == "device"  # asked for
  with pytest.raises(ValueError, match=r"^pipeline='disk' is not one of"):
    pipeline.choose("disk", 1, 64)


def test_bad_pipeline_settings_are_refused_before_loading():
  for key, value, match in (("data.pipeline", "disk", "config.data.pipeline='disk'"),
                            ("data.workers", 0, "config.data.workers must be a positive"),
                            ("data.device_budget_mb", -1.0, "device_budget_mb must be >= 0")):
    with pytest.raises(ValueError, match=match):
      build.validate_config(helpers.small_sinusoids_config(**{key: value}))


def test_what_the_host_pipeline_cannot_do_is_a_clear_error():
  config = helpers.small_sinusoids_config(**{"data.pipeline": "host", "num_seeds": 2})
  data = build.data_from_config(config)
  with pytest.raises(ValueError, match="config.num_seeds=2 .* host pipeline"):
    build.build_run(config, data)
  config.cv.folds = 3
  with pytest.raises(ValueError, match="Cross-validation .* host pipeline"):
    cv.cross_validate(config, data)


def test_a_task_with_an_empty_split_names_the_task_and_split():
  with pytest.raises(ValueError, match=r"task\(s\) \['t02'\] have no examples in split 'test'"):
    pipeline.load("fam", sources=_family([4, 5, 6], [3, 3]), features=_features(),
                  spec=_FAMILY)
  empty = {"train": _Records([0, 0, 1]), "test": _Records([])}
  with pytest.raises(ValueError, match=r"Data set 'fam', split 'test' has no examples"):
    pipeline.load("fam", sources=empty, features=_features(), spec=_FAMILY)


def test_an_input_larger_than_declared_names_task_split_and_record():
  sources = _family([4, 5], bad={6})
  sources["train"].corrupt = True
  with pytest.raises(ValueError, match=r"split 'train', task 't01', record 6: input 'x' has "
                                       r"shape \(3,\), the data set declares \(2,\)"):
    pipeline.load("fam", sources=sources, features=_features(), spec=_FAMILY)


def test_a_label_outside_the_classes_names_task_split_and_record():
  spec = specs.DataSpec("x", (specs._cls("c", "y", 3),))  # pylint: disable=protected-access
  y = np.array([0, 1, 2, 0, 1, 5, 2, 0], np.int64)
  sources = {"train": _Records(np.zeros(8), y=y), "test": _Records(np.zeros(4), y=y[:4])}
  with pytest.raises(ValueError, match=r"split 'train', task 'c': labels must be in \[0, 3\)"
                                       r".*first outside: example 5 \(record 5\), label 5"):
    pipeline.load("cls", sources=sources, features=_features(np.int64), spec=spec)


def test_a_bad_record_met_by_a_reader_thread_is_raised_not_hung():
  sources = _family([30, 30], bad=set(range(60)))
  data = pipeline.load("fam", sources=sources, features=_features(), spec=_FAMILY)
  sources["train"].corrupt = True  # the files changed after loading
  probs = sampling.task_probabilities("uniform", data.num_train)
  sampler = sampling.make_sampler(data.taskset, probs, 2, 4, False, False)
  reader = pipeline.Batches(data, sampler, 0).iterator(0, 10, workers=2)
  feed = pipeline.Prefetch(reader, lambda b: b)
  with pytest.raises(ValueError, match=r"Data set 'fam', split 'train', task 't0[01]', "
                                       r"record \d+: input 'x' has shape \(3,\)"):
    next(feed)
  feed.close()
