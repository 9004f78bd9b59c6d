r"""The host input pipeline: what it delivers against what the step consumes.

    python -m experiments.bench_pipeline [--calls=30] [--workers=1,2,4]

Two problems, both read through the host pipeline (config.data.pipeline=host)
from array_record files:

* ``multi_digits``: the bundled two-digit canvases (12x16, float32), the
  default config's CNN (multi_head, channels 16/32, K = 2, B = 64, 50 steps
  per call);
* ``images64``: 64x64x3 uint8 images written by a TFDS builder in this script
  (4,000 train / 500 test, pixels stored as raw bytes, two 10-class labels of
  the same image), the same
  CNN with shared inputs (B = 64 per step).

Table 1, per problem: examples/s the step consumes (the jitted step on a batch
already on the device), examples/s the pipeline delivers with 1, 2, 4 Grain
reader threads (read, decode, stack; no step), and a training loop (reader threads +
double-buffered prefetch + step) -- its examples/s and the fraction of its
time the step waited for input (after each step is done, the time until the
next batch is on the device). On 2 cores the reader threads and XLA's step
share the CPU, so the loop is slower than the step alone even when the step
never waits. Ratios to the step's own
rate are what to compare (absolute numbers on a shared 2-core machine are
noise).

Table 2: reading the same random records one by one, in one batched call
(``__getitems__``; both decode every feature with TFDS), and as the pipeline
does (one batched raw read, only the input parsed out of each serialized
example; unique records).
"""

import os
import tempfile
import time

from absl import app
from absl import flags

_CALLS = flags.DEFINE_integer("calls", 30, "Timed host calls per row.")
_WORKERS = flags.DEFINE_list("workers", ["1", "2", "4"], "Grain reader threads.")
_RECORDS = flags.DEFINE_integer("records", 4096, "Records per read benchmark row.")


def _images64_sources(data_dir):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class Images64(tfds.core.GeneratorBasedBuilder):
    """64x64x3 uint8 images, two 10-class labels each (benchmark data)."""
    VERSION = tfds.core.Version("1.1.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          # uint8 pixels as raw bytes (Encoding.NONE would store one int64
          # varint per pixel: 12,288 to parse per image).
          "image": tfds.features.Tensor(shape=(64, 64, 3), dtype=np.uint8,
                                        encoding=tfds.features.Encoding.BYTES),
          "a": tfds.features.ClassLabel(num_classes=10),
          "b": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):  # pylint: disable=unused-argument
      return {"train": self._generate_examples(4000, 0),
              "test": self._generate_examples(500, 1)}

    def _generate_examples(self, n, seed):
      rng = np.random.default_rng(seed)
      for i in range(n):
        img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        yield i, {"image": img, "a": int(img[0, 0, 0] % 10), "b": int(img[0, 0, 1] % 10)}

  builder = Images64(data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    tfds.disable_progress_bar()
    builder.download_and_prepare()
  return builder.info.features, {s: builder.as_data_source(split=s)
                                 for s in ("train", "test")}


def _problems(data_dir):
  from experiments.configs import multi_digits  # pylint: disable=g-import-not-at-top
  from mtljax import build  # pylint: disable=g-import-not-at-top
  from mtljax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mtljax.data import specs  # pylint: disable=g-import-not-at-top

  c = multi_digits.get_config()
  c.data.pipeline = "host"
  yield "multi_digits", c, build.data_from_config(c)

  c = multi_digits.get_config()
  c.data.pipeline, c.sampling.shared_inputs = "host", True
  features, sources = _images64_sources(data_dir)
  spec = specs.catalog_spec(features, "image", ())
  yield "images64", c, pipeline.load("images64", sources=sources, features=features,
                                     spec=spec)


def _rate(fn, calls):
  fn()  # warm up (compile, first reads)
  t0 = time.perf_counter()
  for _ in range(calls):
    fn()
  return calls / (time.perf_counter() - t0)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mtljax import build  # pylint: disable=g-import-not-at-top
  from mtljax import sharding  # pylint: disable=g-import-not-at-top
  from mtljax import train  # pylint: disable=g-import-not-at-top
  from mtljax.data import tfds_access  # pylint: disable=g-import-not-at-top

  calls = _CALLS.value
  data_dir = os.path.join(tempfile.gettempdir(), "mtljax_bench_pipeline")
  rows, reads = [], []
  for name, config, data in _problems(data_dir):
    run = build.build_run(config, data)
    spc = run.steps_per_call
    per_step = config.sampling.examples_per_task * (
        1 if config.sampling.shared_inputs
        else config.sampling.tasks_per_step or len(data.taskset))  # K slots
    per_call = per_step * spc
    pl = run.placement
    batch_sh = pl.host_batch(data.train, config.sampling.shared_inputs, lead=int(spc > 1))
    step = sharding.jit_train_step(run.train_fn, run.state_shardings, batch_sh, pl,
                                   donate=False)
    batch = jax.device_put(run.batches.call(0), batch_sh)
    state = run.state

    def one_step():
      jax.block_until_ready(step(state, batch))
    consume = _rate(one_step, max(calls // 3, 3)) * per_call
    rows.append((name, "step alone (batch on device)", consume, 1.0, None))
    for w in _WORKERS.value:
      it = run.batches.iterator(0, 10**9, workers=int(w), prefetch=2 * int(w))
      deliver = _rate(lambda it=it: next(it), calls) * per_call
      rows.append((name, f"pipeline, {w} thread(s), no step", deliver, deliver / consume, None))
    feed = train.HostFeed(config, data, run, 0)
    s = run.state
    s, _ = feed.train_step(s, feed.next())  # compile
    jax.block_until_ready(s)
    waited, batch = 0.0, feed.next()
    t0 = time.perf_counter()
    for i in range(calls):
      s, meas = feed.train_step(s, batch)
      jax.block_until_ready((s, meas))  # the step is done: from here the device idles
      if i + 1 < calls:                 # until the next batch is there
        t = time.perf_counter()
        batch = feed.next()
        waited += time.perf_counter() - t
    loop_s = time.perf_counter() - t0
    feed.close()
    loop = calls * per_call / loop_s
    rows.append((name, f"training loop ({config.data.workers} threads, prefetch "
                       f"{config.data.prefetch})", loop, loop / consume, waited / loop_s))

    source = data.readers["train"].source
    ids = [int(i) for i in np.random.default_rng(0).integers(0, len(source), _RECORDS.value)]
    reader = data.readers["train"]
    single = _rate(lambda: [source[i] for i in ids], 2) * len(ids)
    batched = _rate(lambda: tfds_access.read_records(source, ids), 2) * len(ids)
    inputs = _rate(lambda: reader.inputs(np.asarray(ids)), 2) * len(np.unique(ids))
    reads.append((name, single, batched, inputs))

  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{os.cpu_count()} CPU cores; {calls} timed host calls per row")
  print()
  print(f"| problem | what | examples/s | x step | waiting for input |")
  print("|---|---|---|---|---|")
  for name, what, rate, ratio, wait in rows:
    w = "-" if wait is None else f"{100 * wait:.1f} %"
    print(f"| {name} | {what} | {rate:,.0f} | {ratio:.2f} | {w} |")
  print()
  print("| problem | record by record, TFDS decode | batched, TFDS decode | batched, input "
        "parsed alone (the pipeline) |")
  print("|---|---|---|---|")
  for name, single, batched, inputs in reads:
    print(f"| {name} | {single:,.0f} records/s | {batched:,.0f} ({batched / single:.2f}x) | "
          f"{inputs:,.0f} ({inputs / single:.2f}x) |")


if __name__ == "__main__":
  app.run(main)
