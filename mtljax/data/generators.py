"""Deterministic numpy generators behind the bundled TFDS builders.

They are plain functions of a seed so tests can check them directly; the TFDS
builders in :mod:`mtljax.data.builders` only write their output to array_record
files.
"""

from __future__ import annotations

import numpy as np

# ----------------------------------------------------------------------------
# multi_digits: MultiMNIST-style overlays of scikit-learn's handwritten digits.
# ----------------------------------------------------------------------------

DIGIT_SIZE = 8
CANVAS_SHAPE = (12, 16)  # rows, columns
# Top-left corners: left digit columns 0..3, right digit columns 5..8, rows 0..4.
# Horizontal gap between the two corners is 2..8 < 8, so the digits overlap in
# 0..6 columns, as in MultiMNIST (Sabour et al. 2017; Sener & Koltun 2018).
LEFT_COLS = (0, 3)
RIGHT_COLS = (5, 8)
ROWS = (0, 4)


def split_digit_sources(seed: int, test_fraction: float = 0.25):
  """Split scikit-learn's 1,797 digit images into train/test *source* ids.

  The split is stratified by class so both sides have every digit.

  Returns:
    (images [1797, 8, 8] float32 in [0, 1], labels [1797] int64,
     train_ids, test_ids) where the id arrays are disjoint and sorted.
  """
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)
  labels = digits.target.astype(np.int64)
  rng = np.random.default_rng([seed, 0])
  test_ids = []
  for c in range(10):
    ids = np.flatnonzero(labels == c)
    ids = rng.permutation(ids)
    test_ids.append(ids[: int(round(test_fraction * len(ids)))])
  test_ids = np.sort(np.concatenate(test_ids))
  train_ids = np.setdiff1d(np.arange(len(labels)), test_ids)
  return images, labels, train_ids, test_ids


def compose_multi_digits(images: np.ndarray, labels: np.ndarray,
                         source_ids: np.ndarray, num_examples: int,
                         rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Overlay pairs of two *different* source images on a 12x16 canvas.

  Pixels are combined by maximum. Returns a dict of arrays with
  ``image [N, 12, 16]``, ``left_label``, ``right_label``, ``left_source``,
  ``right_source`` (``[N]`` int64).
  """
  if len(source_ids) < 2:
    raise ValueError("compose_multi_digits needs at least two source images.")
  left = rng.choice(source_ids, num_examples)
  right = rng.choice(source_ids, num_examples)
  same = left == right
  while np.any(same):  # redraw until the two images differ
    right[same] = rng.choice(source_ids, int(same.sum()))
    same = left == right
  ly = rng.integers(ROWS[0], ROWS[1] + 1, num_examples)
  lx = rng.integers(LEFT_COLS[0], LEFT_COLS[1] + 1, num_examples)
  ry = rng.integers(ROWS[0], ROWS[1] + 1, num_examples)
  rx = rng.integers(RIGHT_COLS[0], RIGHT_COLS[1] + 1, num_examples)
  canvas = np.zeros((num_examples,) + CANVAS_SHAPE, np.float32)
  s = DIGIT_SIZE
  for i in range(num_examples):
    a = np.zeros(CANVAS_SHAPE, np.float32)
    a[ly[i]:ly[i] + s, lx[i]:lx[i] + s] = images[left[i]]
    b = np.zeros(CANVAS_SHAPE, np.float32)
    b[ry[i]:ry[i] + s, rx[i]:rx[i] + s] = images[right[i]]
    canvas[i] = np.maximum(a, b)
  return {
      "image": canvas,
      "left_label": labels[left],
      "right_label": labels[right],
      "left_source": left.astype(np.int64),
      "right_source": right.astype(np.int64),
  }


def make_multi_digits(seed: int, num_train: int, num_test: int,
                      test_fraction: float = 0.25, missing: float = 0.0
                      ) -> dict[str, dict[str, np.ndarray]]:
  """Both splits of ``multi_digits``; no source image appears in both.

  ``missing`` > 0: each train example's left and right label is missing,
  independently, with that probability (:func:`drop_labels`); the test split
  keeps every label (and all-True masks, so both splits have one feature set).
  """
  images, labels, train_ids, test_ids = split_digit_sources(seed, test_fraction)
  out = {
      "train": compose_multi_digits(images, labels, train_ids, num_train,
                                    np.random.default_rng([seed, 1])),
      "test": compose_multi_digits(images, labels, test_ids, num_test,
                                   np.random.default_rng([seed, 2])),
  }
  if missing > 0:
    keys = ("left_label", "right_label")
    out["train"] = drop_labels(out["train"], keys, missing, np.random.default_rng([seed, 4]))
    out["test"] = drop_labels(out["test"], keys, 0.0, np.random.default_rng([seed, 5]))
  return out


def drop_labels(arrays: dict[str, np.ndarray], keys, fraction: float,
                rng: np.random.Generator) -> dict[str, np.ndarray]:
  """``arrays`` with each label in ``keys`` missing with probability
  ``fraction``, independently per example and label: a bool feature
  ``<key>_mask`` (True: labelled) and the label set to -1 where missing (the
  TFDS ``ClassLabel`` convention for "no label")."""
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"missing label fraction must be in [0, 1), got {fraction}.")
  out = dict(arrays)
  for key in keys:
    mask = rng.random(len(arrays[key])) >= fraction
    out[key + "_mask"] = mask
    out[key] = np.where(mask, arrays[key], -1).astype(arrays[key].dtype)
  return out


def make_digits(classes, shots: int, seed: int, test_fraction: float = 0.25,
                canvas: bool = False) -> dict[str, dict[str, np.ndarray]]:
  """Single 8x8 digits of the given classes, labels re-numbered ``0..len-1`` in
  the order given; the train/test split is :func:`split_digit_sources` with
  seed 0 (the same as ``multi_digits``'s default), so every ``digits`` config
  shares one test split. ``shots > 0`` keeps that many train images per class,
  chosen with ``seed``; ``shots == 0`` keeps all. ``canvas``: each digit at a
  random position of a ``multi_digits``-sized 12x16 canvas (rows 0-4, columns
  0-8), so a ``multi_digits`` network reads it unchanged."""
  classes = [int(c) for c in classes]
  if len(set(classes)) != len(classes) or not classes or min(classes) < 0 or max(classes) > 9:
    raise ValueError(f"digits: classes must be distinct digits 0-9, got {classes}.")
  images, labels, train_ids, test_ids = split_digit_sources(0, test_fraction)
  rng = np.random.default_rng([seed, 3])
  remap = {c: i for i, c in enumerate(classes)}
  out = {}
  for split, ids in (("train", train_ids), ("test", test_ids)):
    keep = []
    for c in classes:
      cid = ids[labels[ids] == c]
      if split == "train" and shots:
        if shots > len(cid):
          raise ValueError(f"digits: {shots} shots but class {c} has {len(cid)} train images.")
        cid = np.sort(rng.choice(cid, shots, replace=False))
      keep.append(cid)
    keep = np.sort(np.concatenate(keep))
    image = images[keep]
    if canvas:
      r = np.random.default_rng([seed, 4 if split == "train" else 5])
      placed = np.zeros((len(keep),) + CANVAS_SHAPE, np.float32)
      ys = r.integers(ROWS[0], ROWS[1] + 1, len(keep))
      xs = r.integers(0, RIGHT_COLS[1] + 1, len(keep))
      for i in range(len(keep)):
        placed[i, ys[i]:ys[i] + DIGIT_SIZE, xs[i]:xs[i] + DIGIT_SIZE] = image[i]
      image = placed
    out[split] = {"image": image,
                  "label": np.array([remap[int(l)] for l in labels[keep]], np.int64),
                  "source": keep.astype(np.int64)}
  return out


# ----------------------------------------------------------------------------
# mmoe_synthetic: two regression tasks with controlled correlation (Ma et al.
# KDD 2018, "Modeling Task Relationships in Multi-task Learning with
# Multi-gate Mixture-of-Experts", section 3.2).
# ----------------------------------------------------------------------------


def mmoe_task_weights(p: float, dim: int, scale: float, rng: np.random.Generator):
  """``w1 = c u1``, ``w2 = c (p u1 + sqrt(1 - p^2) u2)`` for orthonormal u1, u2."""
  if not -1.0 <= p <= 1.0:
    raise ValueError(f"mmoe_synthetic: correlation p must be in [-1, 1], got {p}.")
  q, _ = np.linalg.qr(rng.normal(size=(dim, 2)))
  u1, u2 = q[:, 0], q[:, 1]
  w1 = scale * u1
  w2 = scale * (p * u1 + np.sqrt(1.0 - p * p) * u2)
  return w1, w2


def mmoe_labels(x: np.ndarray, w: np.ndarray, alpha: np.ndarray, beta: np.ndarray,
                noise: np.ndarray) -> np.ndarray:
  """``y = w.x + sum_i sin(alpha_i w.x + beta_i) + noise``."""
  wx = x @ w
  return wx + np.sin(np.outer(wx, alpha) + beta).sum(axis=1) + noise


def mmoe_sines(sines_seed: int, num_sines: int = 10) -> tuple[np.ndarray, np.ndarray]:
  """The fixed sine parameters ``alpha, beta ~ N(0, 1)`` drawn from
  ``default_rng([sines_seed, 3])`` (the paper's values are not published)."""
  rng = np.random.default_rng([sines_seed, 3])
  return rng.normal(size=num_sines), rng.normal(size=num_sines)


def make_mmoe_synthetic(p: float, seed: int, num_train: int, num_test: int,
                        dim: int = 100, scale: float = 1.0, num_sines: int = 10,
                        noise_std: float = 0.1, sines_seed: int | None = None) -> dict:
  """Both splits plus the generating parameters (for tests).

  ``x ~ N(0, I_dim)``; ``noise ~ N(0, noise_std^2)`` (the paper's variance
  0.01 is std 0.1); ``alpha_i, beta_i ~ N(0, 1)``: fixed by ``sines_seed``
  (:func:`mmoe_sines`, the same label shape for every data ``seed``, as in
  the paper), or drawn with the data set from ``seed`` when it is None. The
  data ``seed`` draws ``w1``, ``w2``, the inputs and the noise.
  """
  rng = np.random.default_rng([seed, 0])
  w1, w2 = mmoe_task_weights(p, dim, scale, rng)
  alpha = rng.normal(size=num_sines)
  beta = rng.normal(size=num_sines)
  if sines_seed is not None:
    alpha, beta = mmoe_sines(sines_seed, num_sines)
  out = {"params": {"w1": w1, "w2": w2, "alpha": alpha, "beta": beta}}
  for split, n, stream in (("train", num_train, 1), ("test", num_test, 2)):
    r = np.random.default_rng([seed, stream])
    x = r.normal(size=(n, dim))
    y1 = mmoe_labels(x, w1, alpha, beta, noise_std * r.normal(size=n))
    y2 = mmoe_labels(x, w2, alpha, beta, noise_std * r.normal(size=n))
    out[split] = {"x": x.astype(np.float32), "y1": y1.astype(np.float32),
                  "y2": y2.astype(np.float32)}
  return out


# ----------------------------------------------------------------------------
# sinusoids: y = A sin(x - phi), A ~ U[0.1, 5], phi ~ U[0, pi], x ~ U[-5, 5]
# (Finn et al. 2017, MAML's regression family).
# ----------------------------------------------------------------------------


def make_sinusoids(seed: int, num_tasks: int, train_per_task: int,
                   test_per_task: int) -> dict:
  rng = np.random.default_rng([seed, 0])
  amplitude = rng.uniform(0.1, 5.0, num_tasks)
  phase = rng.uniform(0.0, np.pi, num_tasks)
  out = {"params": {"amplitude": amplitude, "phase": phase}}
  for split, n, stream in (("train", train_per_task, 1), ("test", test_per_task, 2)):
    r = np.random.default_rng([seed, stream])
    x = r.uniform(-5.0, 5.0, (num_tasks, n))
    y = amplitude[:, None] * np.sin(x - phase[:, None])
    task = np.repeat(np.arange(num_tasks), n)
    out[split] = {
        "x": x.reshape(-1, 1).astype(np.float32),
        "y": y.reshape(-1).astype(np.float32),
        "task": task.astype(np.int64),
        "amplitude": amplitude[task].astype(np.float32),
        "phase": phase[task].astype(np.float32),
    }
  return out
