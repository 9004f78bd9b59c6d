"""Convolution implementations on the dense backbones (issue 26): one
training-mode forward + backward (batch statistics, gradients of every
parameter) of ResNet-18 dilated to output stride 8, with and without
LibMTL's DeepLab ASPP head, per ``conv_impl`` and image size.

Timing: rounds interleave the implementations (and a reference: a fixed
float32 1024x1024 matmul, 4 products) so that a slow patch of a shared
machine hits all of them; each entry is the median over rounds of the mean
of ``--steps`` calls. Printed: ms per step, the ratio to the reference's time
(a machine-independent number), the ratio im2col / lax, and the first
call's time (compile + one step; the persistent compilation cache is off).

  python experiments/bench_backbones.py                # 64x80 and 144x192, B=2
  python experiments/bench_backbones.py --depth 50 --sizes 144x192
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mtljax.models.backbones.resnet import DeepLabHead, ResNet  # noqa: E402


def make_step(depth: int, impl: str, head: bool, shape):
  net = ResNet(depth, output_stride=8, conv_impl=impl)
  dl = DeepLabHead(13, dropout=0.0, conv_impl=impl)
  x = np.float32(np.random.default_rng(0).normal(size=shape))
  v = jax.jit(net.init)(jax.random.key(0), x)
  feat = jax.eval_shape(lambda v, x: net.apply(v, x, False)["layer4"], v, x)
  hv = jax.jit(dl.init)(jax.random.key(1), jnp.zeros(feat.shape, feat.dtype))

  def loss(p, hp, x):
    out, s = net.apply({**v, "params": p}, x, True, mutable=["batch_stats"])
    if not head:
      return jnp.mean(jnp.square(out["layer4"])), s
    y, hs = dl.apply({**hv, "params": hp}, out["layer4"], True, out_size=x.shape[1:3],
                     mutable=["batch_stats"])
    return jnp.mean(jnp.square(y)), (s, hs)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  return lambda: step(v["params"], hv["params"], x)


def reference():
  a = jnp.asarray(np.random.default_rng(1).normal(size=(1024, 1024)), jnp.float32)
  f = jax.jit(lambda a: a @ a @ a @ a @ a)
  return lambda: f(a)


def timed(fn, steps):
  t = time.perf_counter()
  for _ in range(steps):
    jax.block_until_ready(fn())
  return (time.perf_counter() - t) / steps


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--depth", type=int, default=18)
  ap.add_argument("--sizes", default="64x80,144x192")
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--steps", type=int, default=3)
  args = ap.parse_args()
  print(f"backend {jax.default_backend()}, {jax.devices()[0].device_kind}, "
        f"ResNet-{args.depth} OS8, B={args.batch}, {args.rounds} rounds x {args.steps} steps")
  ref = reference()
  first_ref = timed(ref, 1)
  rows = []
  for size in args.sizes.split(","):
    h, w = map(int, size.split("x"))
    for head in (False, True):
      fns, first = {}, {}
      for impl in ("lax", "im2col"):
        fns[impl] = make_step(args.depth, impl, head, (args.batch, h, w, 3))
        first[impl] = timed(fns[impl], 1)
      times = {k: [] for k in ("ref", "lax", "im2col")}
      for _ in range(args.rounds):
        times["ref"].append(timed(ref, args.steps))
        for impl in ("lax", "im2col"):
          times[impl].append(timed(fns[impl], args.steps))
      med = {k: statistics.median(t) for k, t in times.items()}
      rows.append((size, "+ASPP" if head else "backbone", med, first))
  del first_ref
  print(f"{'size':>8} {'model':>9} | {'lax ms':>8} {'/ref':>6} {'first s':>7} | "
        f"{'im2col ms':>9} {'/ref':>6} {'first s':>7} | {'im2col/lax':>10}")
  for size, model, med, first in rows:
    print(f"{size:>8} {model:>9} | {med['lax'] * 1e3:8.1f} {med['lax'] / med['ref']:6.2f} "
          f"{first['lax']:7.1f} | {med['im2col'] * 1e3:9.1f} {med['im2col'] / med['ref']:6.2f} "
          f"{first['im2col']:7.1f} | {med['im2col'] / med['lax']:10.2f}")
  print(f"ref: 4 float32 1024x1024 matmuls, {statistics.median(r[2]['ref'] for r in rows) * 1e3:.1f} ms (median over rows)")


if __name__ == "__main__":
  main()
