"""Times scanning, checking and preparing NYUv2-sized mock files
(dense_files), and reading records back: the numbers in
BUILD_NOTES.md ("Dense readers and augmentation").

  PYTHONPATH=$PWD .venv/bin/python scripts/bench_dense_prepare.py [N_TRAIN] [N_VAL]
"""

import os
import shutil
import sys
import tempfile
import time

import numpy as np

from mtljax.data import dense_files as df


def main(n_train: int = 100, n_val: int = 20) -> None:
  h, w = df.NYUV2_SHAPE
  root, data_dir = tempfile.mkdtemp(), tempfile.mkdtemp()
  try:
    r = np.random.default_rng(0)
    for sub, n in (("train", n_train), ("val", n_val)):
      for f in ("image", "label", "depth", "normal"):
        os.makedirs(os.path.join(root, sub, f))
      for i in range(n):
        normal = r.normal(size=(h, w, 3)).astype(np.float32)
        normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
        for f, x in (("image", r.random((h, w, 3), np.float32)),
                     ("label", r.integers(-1, 13, (h, w)).astype(np.float32)),
                     ("depth", r.random((h, w, 1), np.float32)), ("normal", normal)):
          np.save(os.path.join(root, sub, f, f"{i}.npy"), x)
    layout = df.nyuv2_layout()
    t = time.perf_counter()
    counts = df.scan(root, layout)
    fp = df.fingerprint(root, layout, counts)
    t_scan = time.perf_counter() - t
    t = time.perf_counter()
    df.check_files(root, layout, counts)
    t_check = time.perf_counter() - t
    t = time.perf_counter()
    _, sources = df.open_dense("nyuv2_mtan", root, data_dir=data_dir)
    t_open = time.perf_counter() - t
    t = time.perf_counter()
    df.open_dense("nyuv2_mtan", root, data_dir=data_dir)
    t_reopen = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(len(sources["train"])):
      sources["train"][i]
    t_read = time.perf_counter() - t
    n = n_train + n_val
    print(f"{n} images ({n_train} train, {n_val} val) at {h}x{w}, fingerprint {fp}")
    print(f"scan + fingerprint: {t_scan:.3f} s; check every file: {t_check:.2f} s "
          f"({t_check / n * 1e3:.1f} ms/image)")
    print(f"open_dense, first (check + prepare): {t_open:.2f} s ({t_open / n * 1e3:.1f} ms/image)")
    print(f"open_dense, again (reused): {t_reopen:.3f} s")
    print(f"read every train record: {t_read:.2f} s ({t_read / n_train * 1e3:.1f} ms/record)")
    print(f"extrapolated to NYUv2's 1449 images: first open {t_open / n * 1449:.0f} s")
  finally:
    shutil.rmtree(root)
    shutil.rmtree(data_dir)


if __name__ == "__main__":
  main(*(int(a) for a in sys.argv[1:]))
