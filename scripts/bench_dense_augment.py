"""Times augment_batch on a NYUv2-sized batch (B=8, 288x384), both normal
interpolations: the numbers in BUILD_NOTES.md ("Dense readers and augmentation").

  PYTHONPATH=$PWD .venv/bin/python scripts/bench_dense_augment.py
"""

import time

import jax
import numpy as np

from mtljax.dense import augment as A

r = np.random.default_rng(0); B, H, W = 8, 288, 384
batch = {"image": r.random((B, H, W, 3), np.float32), "label": r.integers(-1, 13, (B, H, W)).astype(np.int32),
         "depth": r.random((B, H, W, 1), np.float32), "normal": r.random((B, H, W, 3), np.float32)}
batch = jax.device_put(batch)
for opt in ("nearest", "bilinear"):
  f = jax.jit(lambda k, b: A.augment_batch(k, b, normal_interpolation=opt))
  t = time.perf_counter(); jax.block_until_ready(f(np.array([0, 1], np.uint32), batch)); c = time.perf_counter() - t
  ts = []
  for i in range(20):
    t = time.perf_counter(); jax.block_until_ready(f(np.array([0, i], np.uint32), batch)); ts.append(time.perf_counter() - t)
  print(opt, f"compile+first {c:.2f} s, median {np.median(ts)*1e3:.1f} ms per batch of {B} at {H}x{W}")
