"""Times one forward+backward (train mode, batch norm updating) of SegNet
split and MTAN (NYUv2's three heads) at the paper's widths.

  PYTHONPATH=. .venv/bin/python scripts/bench_segnet.py --size 64x80 --batch 2 \\
      --arch split mtan --conv_impl im2col lax --reps 3

Prints one line per (arch, conv_impl): compile seconds and the median of
``--reps`` timed steps (after one warm-up) in seconds.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from mtljax.models.backbones import segnet

NYU = (("seg", "segmentation", 13), ("depth", "depth", 1), ("normal", "normals", 3))


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", default="64x80")
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--arch", nargs="+", default=["split", "mtan"])
  ap.add_argument("--conv_impl", nargs="+", default=["auto"])
  ap.add_argument("--reps", type=int, default=3)
  args = ap.parse_args()
  h, w = (int(a) for a in args.size.split("x"))
  rng = np.random.RandomState(0)
  x = rng.normal(size=(args.batch, h, w, 3)).astype(np.float32)
  wts = {n: rng.normal(size=(args.batch, h, w, c)).astype(np.float32) for n, _, c in NYU}
  print(f"device {jax.devices()[0].device_kind}, {args.batch}x{h}x{w}")
  for arch in args.arch:
    for impl in args.conv_impl:
      model = segnet.make_segnet(NYU, arch=arch, conv_impl=impl)
      v = jax.jit(lambda k, m=model: m.init(k, (h, w, 3)))(jax.random.key(0))

      def loss(p, s, x, wts, m=model):
        out, new = m.apply({"params": p, "batch_stats": s}, x, True)
        return sum(jnp.sum(out[k] * wts[k]) for k in wts), new
      step = jax.jit(jax.value_and_grad(loss, has_aux=True))
      t0 = time.perf_counter()
      compiled = step.lower(v["params"], v["batch_stats"], x, wts).compile()
      t_compile = time.perf_counter() - t0
      jax.block_until_ready(compiled(v["params"], v["batch_stats"], x, wts))
      times = []
      for _ in range(args.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(v["params"], v["batch_stats"], x, wts))
        times.append(time.perf_counter() - t0)
      print(f"{arch:6s} conv_impl={segnet.layers.resolve_conv_impl(impl):7s} "
            f"compile {t_compile:6.1f} s  step median {np.median(times):7.3f} s "
            f"(min {min(times):.3f}, {args.reps} reps)", flush=True)


if __name__ == "__main__":
  main()
