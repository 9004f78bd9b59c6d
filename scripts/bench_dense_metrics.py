"""Times ``mtljax.dense.metrics.batch_sums`` and one normals loss-and-gradient
at NYUv2's evaluation shape (B=8, 288x384, 13 classes), per kind and
convention: compile plus first call, then the fastest of 5 calls.

Usage: ``python scripts/bench_dense_metrics.py [B H W]``.
"""

import sys
import time

import jax
import numpy as np

from mtljax.dense import losses
from mtljax.dense import metrics


def _time(f, *args):
  t0 = time.perf_counter()
  jax.block_until_ready(f(*args))
  first = time.perf_counter() - t0
  runs = []
  for _ in range(5):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    runs.append(time.perf_counter() - t0)
  return first, min(runs)


def main():
  b, h, w = (int(a) for a in sys.argv[1:4]) if len(sys.argv) > 3 else (8, 288, 384)
  rng = np.random.default_rng(0)
  g = rng.normal(size=(b, h, w, 3)).astype(np.float32)
  g /= np.linalg.norm(g, axis=-1, keepdims=True)
  data = {
      "segmentation": (rng.normal(size=(b, h, w, 13)).astype(np.float32),
                       rng.integers(-1, 13, (b, h, w)).astype(np.int32)),
      "depth": (rng.uniform(0.5, 5, (b, h, w, 1)).astype(np.float32),
                rng.uniform(0, 5, (b, h, w, 1)).astype(np.float32)),
      "normals": ((g + 0.5 * rng.normal(size=g.shape)).astype(np.float32), g),
  }
  print(jax.devices(), f"B={b} H={h} W={w}")
  for kind, (o, y) in data.items():
    o, y = jax.device_put(o), jax.device_put(y)
    for conv in ("exact", "mtan"):
      if kind == "segmentation" and conv == "mtan":
        continue  # the same sums as exact
      f = jax.jit(lambda o, y, kind=kind, conv=conv: metrics.batch_sums(kind, o, y,
                                                                          convention=conv))
      first, best = _time(f, o, y)
      print(f"batch_sums {kind:13s} {conv:6s} compile+first {first * 1e3:8.1f} ms  "
            f"min of 5 {best * 1e3:8.2f} ms")
  o, y = (jax.device_put(a) for a in data["normals"])
  f = jax.jit(jax.value_and_grad(lambda o, y: losses.batch_loss("normals", o, y)))
  first, best = _time(f, o, y)
  print(f"normals loss+grad compile+first {first * 1e3:8.1f} ms  min of 5 {best * 1e3:8.2f} ms")


if __name__ == "__main__":
  main()
