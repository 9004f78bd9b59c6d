"""The bundled ``scenes`` data set: statistics of a variant and a figure of a
few of its test images (image, class, depth, normals).

    PYTHONPATH=. .venv/bin/python scripts/scenes_examples.py [--config quick]
        [--figure docs/figures/scenes_examples.png] [--num 4]

Generates the variant with :func:`mtljax.data.scenes.make_scenes` (what the
TFDS builder writes), prints its generation time, per-class pixel fractions and
depth statistics, and draws its first ``--num`` test images.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mtljax.data import builders
from mtljax.data import scenes


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="quick")
  ap.add_argument("--figure", default="docs/figures/scenes_examples.png")
  ap.add_argument("--num", type=int, default=4)
  args = ap.parse_args()
  c = builders.Scenes.config_from_name(args.config)
  t0 = time.perf_counter()
  data = scenes.make_scenes(c.seed, c.num_train, c.num_test, c.height, c.width,
                            depth_missing=c.depth_missing, normal_missing=c.normal_missing,
                            label_missing=c.label_missing)
  print(f"{c.name}: {c.num_train} train / {c.num_test} test at {c.height}x{c.width}, "
        f"generated in {time.perf_counter() - t0:.1f} s")
  for split, a in data.items():
    lab = a["label"]
    frac = np.bincount(lab[lab >= 0].ravel(), minlength=scenes.NUM_CLASSES) / lab.size
    present = np.array([(lab == k).any((1, 2)).mean() for k in range(scenes.NUM_CLASSES)])
    print(f"[{split}] class: pixel fraction / fraction of images showing it")
    for k, name in enumerate(scenes.CLASS_NAMES):
      print(f"  {name:9s} {frac[k]:.4f}  {present[k]:.3f}")
    if (lab < 0).any():
      print(f"  ignored   {(lab < 0).mean():.4f}")
    d = a["depth"][..., 0]
    valid = d > 0
    print(f"  depth: valid {valid.mean():.4f}, min {d[valid].min():.2f}, median "
          f"{np.median(d[valid]):.2f}, max {d[valid].max():.2f} m")
    print(f"  image: mean {a['image'].mean():.3f}, std {a['image'].std():.3f}")
  if args.figure:
    _figure(data["test"], args.num, args.figure)
    print("wrote", args.figure)


def _figure(a, num, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  cmap = plt.get_cmap("tab10", scenes.NUM_CLASSES)
  fig, axes = plt.subplots(num, 4, figsize=(7.2, 1.5 * num), squeeze=False)
  for i in range(num):
    lab = np.ma.masked_less(a["label"][i], 0)
    d = np.ma.masked_equal(a["depth"][i, ..., 0], 0.0)
    panels = [(a["image"][i], {}), (lab, dict(cmap=cmap, vmin=-0.5, vmax=scenes.NUM_CLASSES - 0.5)),
              (d, dict(cmap="viridis")), ((a["normal"][i] + 1.0) / 2.0, {})]
    for j, (img, kw) in enumerate(panels):
      ax = axes[i, j]
      im = ax.imshow(img, interpolation="nearest", **kw)
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(("image", "class", "depth (m)", "normal (n+1)/2")[j], fontsize=8)
      if j == 2:
        fig.colorbar(im, ax=ax, fraction=0.04).ax.tick_params(labelsize=6)
  handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(k)) for k in range(scenes.NUM_CLASSES)]
  fig.legend(handles, scenes.CLASS_NAMES, loc="lower center", ncol=scenes.NUM_CLASSES,
             fontsize=7, frameon=False)
  fig.tight_layout(rect=(0, 0.05, 1, 1))
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  main()
