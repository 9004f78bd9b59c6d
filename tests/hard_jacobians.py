"""Seeded generator of hard task Jacobians for the Gram-based methods' tests.

Each Jacobian is a float64 ``[T, P]`` matrix (one row per task gradient) of one
of these kinds:

* ``gaussian``: i.i.d. standard normal rows;
* ``opposite``: a near-opposite pair, ``g_b = -0.999 g_a + 0.01 n`` (rows 0 and
  1 for T = 2, the last two rows otherwise);
* ``norms_100x``: row 0 is 100x the others (Gaussian rows otherwise);
* ``opposite_100x``: both of the above (for T = 2 the pair itself is 100x
  apart in norm);
* ``collinear``: nearly collinear rows, ``g_i = s_i (u + 1e-3 n_i)`` with a
  common ``u`` and positive scales ``s_i`` spread over a factor 10.

for every ``T`` in :data:`TS` and ``P`` in :data:`PS`. The matrices depend only
on ``seed`` and the cell, so a test that asks for one cell gets the same
matrices as one that asks for all.
"""

from __future__ import annotations

import zlib

import numpy as np

TS = (2, 3, 5, 8)
PS = (10, 50)
KINDS = ("gaussian", "opposite", "norms_100x", "opposite_100x", "collinear")


def _cell_rng(seed: int, kind: str, t: int, p: int) -> np.random.Generator:
  return np.random.default_rng([seed, zlib.crc32(kind.encode()), t, p])


def hard_jacobian_batch(kind: str, t: int, p: int, n: int, seed: int = 0) -> np.ndarray:
  """``[n, T, P]`` float64 Jacobians of one kind (see the module docstring)."""
  if kind not in KINDS:
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}.")
  if t < 2 or p < 1 or n < 1:
    raise ValueError(f"need T >= 2, P >= 1, n >= 1; got T={t}, P={p}, n={n}.")
  rng = _cell_rng(seed, kind, t, p)
  g = rng.normal(size=(n, t, p))
  if kind == "collinear":
    u = rng.normal(size=(n, 1, p))
    s = 10.0 ** rng.uniform(-0.5, 0.5, size=(n, t, 1))
    return s * (u + 1e-3 * g)
  if kind in ("opposite", "opposite_100x"):
    a, b = (0, 1) if t == 2 else (t - 2, t - 1)
    g[:, b] = -0.999 * g[:, a] + 0.01 * rng.normal(size=(n, p))
  if kind in ("norms_100x", "opposite_100x"):
    g[:, 0] *= 100.0
  return g


def hard_jacobians(n: int = 4, seed: int = 0, ts=TS, ps=PS, kinds=KINDS):
  """``{(kind, T, P): [n, T, P] float64}`` over every cell of ``kinds x ts x ps``
  (``len(kinds) * len(ts) * len(ps) * n`` Jacobians in all)."""
  return {(kind, t, p): hard_jacobian_batch(kind, t, p, n, seed)
          for kind in kinds for t in ts for p in ps}


def iter_hard_jacobians(n: int = 4, seed: int = 0, ts=TS, ps=PS, kinds=KINDS):
  """Yields ``(kind, T, P, g [T, P])`` one Jacobian at a time."""
  for (kind, t, p), batch in hard_jacobians(n, seed, ts, ps, kinds).items():
    for g in batch:
      yield kind, t, p, g
