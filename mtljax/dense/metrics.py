"""Dense metrics, exact over a whole split: additive sums on the device, batch
by batch; the metrics from them on the host.

**Protocol.** ``sums = zero_sums(kind, ...)``; per batch
``sums = add(sums, batch_sums(kind, out, y, ...))`` (jittable, no host sync:
every entry is a sum of counts or of per-pixel values, so any split of the
data into batches, even uneven ones, gives the same sums as one pass, up to
float32 rounding); then ``finalize(kind, sums, ...) -> {metric: float}`` on
the host in float64. ``batch_sums`` reduces over every leading axis of
``out [..., H, W, C]`` (vmap it for a task or seed axis); ``valid``
(of the pixels' rank, broadcastable to ``[..., H, W]``: an example mask as
``example_mask[:, None, None]``)
drops padding examples or unlabelled ones besides the missing pixels.

**Metrics** (:data:`METRIC_NAMES`, directions in :data:`DENSE_METRIC_DIRECTIONS`),
over the split's valid pixels ``P`` (:func:`mtljax.dense.losses.pixel_mask`):

* ``segmentation``: the confusion matrix ``N[g, p]`` (ground truth g,
  predicted class ``p = argmax out``) over the split;
  ``IoU_c = N_cc / (sum_p N_cp + sum_g N_gc - N_cc)``,
  ``miou = mean_c IoU_c`` over the classes whose union is non-empty (present
  in the ground truth or predicted), ``pix_acc = sum_c N_cc / sum N``. A
  class in the ground truth but never predicted, or predicted but absent from
  the ground truth, has IoU 0 and counts; a class absent from both is left
  out. (LibMTL's ``SegMetric`` and MTAN's ``ConfMatrix`` take ``torch.mean``
  of ``IoU``, which is NaN then -- 0/0 -- and equal to this otherwise: every
  convention here leaves such a class out, a NaN being no number to compare.)
* ``depth``: ``abs_err = sum_P |p - y| / |P|``,
  ``rel_err = sum_P |p - y| / y / |P|``.
* ``normals``: the angle ``a = angle(p, y)`` in degrees per valid pixel;
  ``mean_angle``, ``median_angle``, and ``within_11_25``, ``within_22_5``,
  ``within_30``: the fraction of pixels with ``a < t`` (strictly, as the
  published ``error < 11.25``). The angle is ``atan2(|p^ x g^|, p^ . g^)``
  (accurate near 0, where ``acos`` of a float32 cosine is off by up to 0.02
  degrees); a zero prediction has no direction and gets 90 degrees (the
  published code's ``pred / |pred|`` gives NaN there).

**The median.** On the device ``batch_sums`` accumulates a histogram of the
angles with ``bins`` equal bins on [0, 180] degrees (default
:data:`DEFAULT_BINS` = 18000: width ``w = 0.01`` degree); ``finalize`` returns
the midpoint of the bin holding the median's order statistic(s) (the mean of
two midpoints for an even count), within ``w / 2`` (0.005 degree) of the
exact median of the float32 angles (:func:`median_bound`; plus the float32
rounding of ``angle / w`` at a bin edge, ~1e-5 degree). The exact median is
a host-side pass: :class:`AngleGatherer` keeps the valid angles of each batch
(:func:`normal_angles`, 4 bytes per valid pixel: 290 MB for NYUv2's test
split) and ``finalize(..., median=gatherer.median())`` uses it -- what
LibMTL does (it concatenates every angle of the split).

**Conventions** (``convention`` of :func:`batch_sums` and :func:`finalize`;
the same for both, or ``finalize`` refuses the sums):

* ``"exact"``: the definitions above, every valid pixel of the split equal.
* ``"libmtl"``: LibMTL (``examples/nyu/utils.py``). ``DepthMetric`` keeps per
  batch ``sum|p - y| / n_b`` and ``n_b = pred.size()[0]`` *after*
  ``masked_select`` (the batch's valid pixels, not its images) and returns
  ``sum_b mean_b n_b / sum_b n_b``: the exact value (up to rounding), so it
  is computed as such. ``NormalMetric`` concatenates every angle of the split:
  mean, median, fractions over all pixels, as ``exact``; but a normal is
  missing when its components *sum* to 0 (``rule="published"``), and the
  angle is ``acos(clip(p^ . y, -1, 1))`` with the target as stored.
  Segmentation as ``exact``.
* ``"mtan"``: MTAN's trainer (``im2im_pred/utils.py``), which Nash-MTL's
  NYUv2 trainer copies (``experiments/nyuv2/utils.py``, ``trainer.py``): ``depth_error`` and ``normal_error``
  are computed per batch (mean, *median*, fractions over the batch's valid
  pixels) and the split's value is the plain mean over batches
  (``avg_cost += cost / test_batch``), so it depends on the batch size and a
  smaller last batch weighs as much as a full one. Per-batch medians are exact
  (a sort on the device). Masks and angles as ``libmtl``; segmentation as
  ``exact`` (one confusion matrix over the split). Batches without a valid
  pixel are left out of the mean (the published code gets NaN from them).

**Sums** (``{name: array}``, int32 counts, float32 sums; all conventions):
``batches`` (int32, batches added). segmentation: ``confusion [C, C]``.
depth: ``count``, ``abs_sum``, ``rel_sum``. normals: ``count``,
``angle_sum``, ``within [3]``, ``hist [bins]``; with a published mask rule
also ``published_mask`` (= ``batches``: marks the rule the sums were taken
with). ``"mtan"`` adds ``batch_terms`` (batches with a valid pixel) and
``batch_abs``/``batch_rel`` (sum over batches of the batch means) or
``batch_mean``/``batch_median``/``batch_within [3]``.

Interface for the integration::

    zero_sums(kind, num_classes=0, convention="exact", bins=DEFAULT_BINS) -> sums
    batch_sums(kind, out, y, valid=None, convention="exact", bins=DEFAULT_BINS) -> sums
    add(a, b) -> sums
    finalize(kind, sums, convention="exact", median=None) -> {metric: float}
    normal_angles(out, y, convention="exact") -> (angles [..., H, W], mask)
    AngleGatherer().add(angles, mask); .median()
    METRIC_NAMES[kind], DENSE_METRIC_DIRECTIONS
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mtljax.dense import losses

CONVENTIONS = ("exact", "libmtl", "mtan")
DEFAULT_BINS = 18000
NORMAL_THRESHOLDS = (11.25, 22.5, 30.0)

METRIC_NAMES = {
    "segmentation": ("miou", "pix_acc"),
    "depth": ("abs_err", "rel_err"),
    "normals": ("mean_angle", "median_angle", "within_11_25", "within_22_5", "within_30"),
}

# Whether a larger value of each metric is better (the form of
# mtljax.tasks.METRIC_DIRECTIONS; the integration merges the two).
DENSE_METRIC_DIRECTIONS = {
    "miou": "higher",
    "pix_acc": "higher",
    "abs_err": "lower",
    "rel_err": "lower",
    "mean_angle": "lower",
    "median_angle": "lower",
    "within_11_25": "higher",
    "within_22_5": "higher",
    "within_30": "higher",
}


def _check(kind: str, convention: str, bins: int | None = None) -> None:
  losses._check_kind(kind)  # pylint: disable=protected-access
  if convention not in CONVENTIONS:
    raise ValueError(f"unknown metric convention {convention!r}; expected one of "
                     f"{CONVENTIONS}.")
  if bins is not None and (not isinstance(bins, (int, np.integer)) or bins < 1):
    raise ValueError(f"bins must be a positive integer, got {bins!r}.")


def mask_rule(convention: str) -> str:
  """The pixel-mask rule (:func:`mtljax.dense.losses.pixel_mask`) of a convention."""
  return "exact" if convention == "exact" else "published"


def median_bound(bins: int = DEFAULT_BINS) -> float:
  """Bound (degrees) on ``|histogram median - exact median|`` of the float32
  angles: half a bin, ``90 / bins`` (the middle order statistics lie in the
  bins whose midpoints are averaged; a value within float32 rounding, ~1e-5
  degree, of a bin edge may be binned on the other side)."""
  return 90.0 / bins


def _keys(kind: str, convention: str) -> set[str]:
  keys = {"batches"}
  if kind == "segmentation":
    return keys | {"confusion"}
  keys |= {"count"}
  if kind == "depth":
    keys |= {"abs_sum", "rel_sum"}
    if convention == "mtan":
      keys |= {"batch_terms", "batch_abs", "batch_rel"}
    return keys
  keys |= {"angle_sum", "within", "hist"}
  if convention != "exact":
    keys |= {"published_mask"}
  if convention == "mtan":
    keys |= {"batch_terms", "batch_mean", "batch_median", "batch_within"}
  return keys


def zero_sums(kind: str, num_classes: int = 0, convention: str = "exact",
              bins: int = DEFAULT_BINS) -> dict[str, np.ndarray]:
  """The sums of an empty split (numpy; a jit argument or carry as is)."""
  _check(kind, convention, bins)
  i32, f32 = np.int32, np.float32
  c = losses.out_channels(kind, num_classes) if kind == "segmentation" else 0
  shapes = {"batches": ((), i32), "confusion": ((c, c), i32), "count": ((), i32),
            "abs_sum": ((), f32), "rel_sum": ((), f32), "angle_sum": ((), f32),
            "within": ((3,), i32), "hist": ((bins,), i32), "published_mask": ((), i32),
            "batch_terms": ((), i32), "batch_abs": ((), f32), "batch_rel": ((), f32),
            "batch_mean": ((), f32), "batch_median": ((), f32), "batch_within": ((3,), f32)}
  return {k: np.zeros(*shapes[k]) for k in sorted(_keys(kind, convention))}


def add(a: Mapping, b: Mapping) -> dict:
  """``a + b`` entry by entry (jittable; numpy or jax)."""
  if set(a) != set(b):
    raise ValueError(f"add: sums of different kinds or conventions: {sorted(a)} vs "
                     f"{sorted(b)}.")
  shapes = {k: (np.shape(a[k]), np.shape(b[k])) for k in a if np.shape(a[k]) != np.shape(b[k])}
  if shapes:
    raise ValueError(f"add: sums of different shapes (classes or histogram bins): {shapes}.")
  return {k: a[k] + b[k] for k in a}


def normal_angles(out: jax.Array, y: jax.Array, convention: str = "exact"
                  ) -> tuple[jax.Array, jax.Array]:
  """``(angles [..., H, W] float32 degrees, mask [..., H, W] bool)`` between
  the predicted normals ``out [..., H, W, 3]`` and the targets ``y``: the
  module docstring's angle (``exact``) or the published one (``libmtl``,
  ``mtan``); ``mask`` is the convention's valid pixels. Jittable."""
  _check("normals", convention)
  losses.check_shapes("normals", out.shape, y.shape)
  out = out.astype(jnp.float32)
  y = y.astype(jnp.float32)
  mask = losses.pixel_mask("normals", y, mask_rule(convention))
  p = losses.unit_normalise(out)
  has_dir = jnp.any(p != 0, axis=-1)
  if convention == "exact":
    g = losses.unit_normalise(y)
    cross = jnp.linalg.norm(jnp.cross(p, g), axis=-1)
    rad = jnp.arctan2(cross, jnp.sum(p * g, axis=-1))
  else:
    rad = jnp.arccos(jnp.clip(jnp.sum(p * y, axis=-1), -1.0, 1.0))
  deg = jnp.where(has_dir, jnp.degrees(rad), jnp.float32(90.0))
  return deg, mask


def batch_sums(kind: str, out: jax.Array, y: jax.Array, valid: jax.Array | None = None,
               convention: str = "exact", bins: int = DEFAULT_BINS) -> dict[str, jax.Array]:
  """The sums of one batch (see the module docstring), over every leading axis
  of ``out [..., H, W, C]`` and ``y``. ``valid`` (bool, of rank
  ``out.ndim - 1``, broadcastable to ``[..., H, W]``) further restricts the
  pixels counted. Jittable; shapes and
  arguments are checked at trace time."""
  _check(kind, convention, bins)
  losses.check_shapes(kind, out.shape, y.shape)
  i32, f32 = jnp.int32, jnp.float32
  pix_shape = out.shape[:-1]
  if valid is not None:
    # Same rank as the pixels: a [B] mask would align with W, not B.
    v_shape = jnp.shape(valid)
    if len(v_shape) != len(pix_shape) or any(a not in (1, b) for a, b in zip(v_shape, pix_shape)):
      raise ValueError(f"{kind}: valid of shape {v_shape} does not fit the pixels {pix_shape}: "
                       "give it their rank (an example mask [B] as mask[:, None, None]).")
    valid = jnp.broadcast_to(jnp.asarray(valid, bool), pix_shape)
  sums = {"batches": jnp.ones((), i32)}

  if kind == "segmentation":
    c = out.shape[-1]
    pred = jnp.argmax(out, axis=-1).astype(i32)
    gt = y.astype(i32)
    m = (gt >= 0) & (gt < c)  # the published confusion matrices' test
    if valid is not None:
      m = m & valid
    idx = jnp.where(m, gt * c + pred, c * c).reshape(-1)
    conf = jnp.zeros((c * c,), i32).at[idx].add(1, mode="drop")
    sums["confusion"] = conf.reshape(c, c)
    return sums

  if kind == "depth":
    p = out[..., 0].astype(f32)
    g = y[..., 0].astype(f32)
    m = losses.pixel_mask("depth", y)
    if valid is not None:
      m = m & valid
    err = jnp.abs(p - g)
    rel = err / jnp.where(m, g, jnp.ones((), f32))
    n = jnp.sum(m, dtype=i32)
    s_abs = jnp.sum(jnp.where(m, err, 0.0))
    s_rel = jnp.sum(jnp.where(m, rel, 0.0))
    sums.update(count=n, abs_sum=s_abs, rel_sum=s_rel)
    if convention == "mtan":
      has = n > 0
      inv = 1.0 / jnp.maximum(n, 1).astype(f32)
      sums.update(batch_terms=has.astype(i32), batch_abs=jnp.where(has, s_abs * inv, 0.0),
                  batch_rel=jnp.where(has, s_rel * inv, 0.0))
    return sums

  deg, m = normal_angles(out, y, convention)
  if valid is not None:
    m = m & valid
  n = jnp.sum(m, dtype=i32)
  thresholds = jnp.asarray(NORMAL_THRESHOLDS, f32)
  under = (deg[..., None] < thresholds) & m[..., None]
  within = jnp.sum(under.reshape(-1, 3), axis=0, dtype=i32)
  width = 180.0 / bins
  b = jnp.clip(jnp.floor(deg / width).astype(i32), 0, bins - 1)
  b = jnp.where(m, b, bins).reshape(-1)
  hist = jnp.zeros((bins,), i32).at[b].add(1, mode="drop")
  s_angle = jnp.sum(jnp.where(m, deg, 0.0))
  sums.update(count=n, angle_sum=s_angle, within=within, hist=hist)
  if convention != "exact":
    sums["published_mask"] = jnp.ones((), i32)
  if convention == "mtan":
    has = n > 0
    inv = 1.0 / jnp.maximum(n, 1).astype(f32)
    srt = jnp.sort(jnp.where(m, deg, jnp.inf).reshape(-1))
    lo = srt[jnp.maximum(n - 1, 0) // 2]
    hi = srt[n // 2]
    med = 0.5 * (lo + hi)
    sums.update(batch_terms=has.astype(i32),
                batch_mean=jnp.where(has, s_angle * inv, 0.0),
                batch_median=jnp.where(has, med, 0.0),
                batch_within=jnp.where(has, within.astype(f32) * inv, 0.0))
  return sums


def _hist_median(hist: np.ndarray) -> float:
  counts = np.asarray(hist, np.int64)
  n = int(counts.sum())
  if n == 0:
    return math.nan
  width = 180.0 / len(counts)
  cum = np.cumsum(counts)
  j = np.searchsorted(cum, [(n - 1) // 2, n // 2], side="right")
  return float(np.mean((j + 0.5) * width))


def convention_of(kind: str, sums: Mapping) -> str:
  """The first convention (in :data:`CONVENTIONS` order) whose sums have the
  keys of ``sums``: the one they were taken with, or one that finalises them
  to the same numbers (a segmentation's sums, and depth's under ``exact`` and
  ``libmtl``, are the same in every convention that shares their keys)."""
  have = set(sums)
  for c in CONVENTIONS:
    if _keys(kind, c) == have:
      return c
  raise ValueError(f"{kind}: sums with keys {sorted(have)} are no convention's "
                   f"({CONVENTIONS}).")


def finalize(kind: str, sums: Mapping, convention: str = "exact",
             median: float | None = None) -> dict[str, float]:
  """``{metric: float}`` from a split's sums (host, float64). ``median``
  (``normals``; ``exact``/``libmtl``) replaces the histogram median, e.g. with
  :meth:`AngleGatherer.median`. A metric with no valid pixel is NaN (0/0)."""
  _check(kind, convention)
  sums = {k: np.asarray(v) for k, v in sums.items()}
  want = _keys(kind, convention)
  if set(sums) != want:
    have = [c for c in CONVENTIONS if _keys(kind, c) == set(sums)]
    were = f"convention {have[0]!r}" if have else f"keys {sorted(sums)}"
    raise ValueError(f"finalize({kind}, convention={convention!r}): these sums were "
                     f"accumulated with {were}; pass the same convention to batch_sums.")
  if median is not None and (kind != "normals" or convention == "mtan"):
    raise ValueError(f"finalize: median is for normals under 'exact' or 'libmtl', not {kind} "
                     f"under {convention!r} (mtan's per-batch medians are exact already).")

  def ratio(a, b):
    return float(a) / float(b) if float(b) != 0 else math.nan

  if kind == "segmentation":
    h = sums["confusion"].astype(np.float64)
    inter = np.diag(h)
    union = h.sum(0) + h.sum(1) - inter
    present = union > 0
    miou = float(np.mean(inter[present] / union[present])) if present.any() else math.nan
    return {"miou": miou, "pix_acc": ratio(inter.sum(), h.sum())}

  if convention == "mtan":
    t = sums["batch_terms"]
    if kind == "depth":
      return {"abs_err": ratio(sums["batch_abs"], t), "rel_err": ratio(sums["batch_rel"], t)}
    w = sums["batch_within"].astype(np.float64)
    return {"mean_angle": ratio(sums["batch_mean"], t),
            "median_angle": ratio(sums["batch_median"], t),
            "within_11_25": ratio(w[0], t), "within_22_5": ratio(w[1], t),
            "within_30": ratio(w[2], t)}

  n = sums["count"]
  if kind == "depth":
    return {"abs_err": ratio(sums["abs_sum"], n), "rel_err": ratio(sums["rel_sum"], n)}
  w = sums["within"]
  return {"mean_angle": ratio(sums["angle_sum"], n),
          "median_angle": float(median) if median is not None else _hist_median(sums["hist"]),
          "within_11_25": ratio(w[0], n), "within_22_5": ratio(w[1], n),
          "within_30": ratio(w[2], n)}


class AngleGatherer:
  """The exact host-side median of a split's normal angles: keeps the valid
  angles of each batch (:func:`normal_angles`' outputs, fetched to the host)
  and takes ``np.median`` of all of them, in float64."""

  def __init__(self):
    self._chunks: list[np.ndarray] = []

  def add(self, angles, mask) -> None:
    angles, mask = np.asarray(angles), np.asarray(mask, bool)
    if angles.shape != mask.shape:
      raise ValueError(f"AngleGatherer.add: angles {angles.shape} and mask {mask.shape} "
                       "differ in shape.")
    self._chunks.append(angles[mask].astype(np.float32))

  @property
  def count(self) -> int:
    return int(sum(c.size for c in self._chunks))

  def median(self) -> float:
    if not self.count:
      return math.nan
    return float(np.median(np.concatenate(self._chunks).astype(np.float64)))
