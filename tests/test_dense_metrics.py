"""Dense losses and metrics (issue 25) against float64 numpy written from the
definitions and from the published code (LibMTL's examples/nyu/utils.py,
MTAN's im2im_pred/utils.py, Nash-MTL's delta_fn, LibMTL's count_improvement).

Compiles (fast tier): one program for the three losses and their gradients
(vmapped over two cases), one for the metrics (the three kinds' sums under the
three conventions, vmapped over a split's batches); everything else is
numpy. The slow test compiles one program per batch shape."""

import functools

import jax
import numpy as np
import pytest

from mtljax import errors
from mtljax import measure
from mtljax.dense import losses
from mtljax.dense import metrics

C = 5  # segmentation classes in the metric tests


# ----------------------------------------------------------------------------
# float64 references
# ----------------------------------------------------------------------------


def _unit(v):
  n = np.linalg.norm(v, axis=-1, keepdims=True)
  return np.where(n > 1e-12, v / np.where(n > 0, n, 1), 0.0)


def _np_pixel_losses(outs, ys):
  """Per-pixel losses from the definitions, float64."""
  s_out, d_out, n_out = (np.asarray(o, np.float64) for o in outs)
  s_y, d_y, n_y = ys
  m = s_out.max(-1, keepdims=True)
  logz = (m + np.log(np.exp(s_out - m).sum(-1, keepdims=True)))[..., 0]
  yi = np.where(s_y >= 0, s_y, 0)
  seg = logz - np.take_along_axis(s_out, yi[..., None], -1)[..., 0]
  depth = np.abs(d_out[..., 0] - d_y[..., 0])
  normals = 1.0 - np.sum(_unit(n_out) * _unit(n_y.astype(np.float64)), -1)
  return seg, depth, normals


def _np_masks(ys, example_mask):
  s_y, d_y, n_y = ys
  e = example_mask[:, None, None]
  return (s_y >= 0) & e, (d_y[..., 0] != 0) & e, np.any(n_y != 0, -1) & e


def _np_mean_loss(kind_index, out, ys, example_mask):
  outs = [None, None, None]
  outs[kind_index] = out
  for i in range(3):
    if outs[i] is None:
      outs[i] = np.zeros(ys[i].shape[:3] + ((C_LOSS, 1, 3)[i],))
  vals = _np_pixel_losses(outs, ys)[kind_index]
  mask = _np_masks(ys, example_mask)[kind_index]
  return vals[mask].sum() / max(mask.sum(), 1)


def _np_grads(outs, ys, example_mask):
  """Gradients of the batch-mean losses w.r.t. the outputs, float64, by hand."""
  s_out, d_out, n_out = (np.asarray(o, np.float64) for o in outs)
  s_y, d_y, n_y = ys
  ms, md, mn = _np_masks(ys, example_mask)
  e = np.exp(s_out - s_out.max(-1, keepdims=True))
  soft = e / e.sum(-1, keepdims=True)
  onehot = np.eye(s_out.shape[-1])[np.where(s_y >= 0, s_y, 0)]
  g_seg = (soft - onehot) * ms[..., None] / max(ms.sum(), 1)
  g_depth = np.sign(d_out - d_y) * md[..., None] / max(md.sum(), 1)
  norm = np.linalg.norm(n_out, axis=-1, keepdims=True)
  p, g = _unit(n_out), _unit(n_y.astype(np.float64))
  cos = np.sum(p * g, -1, keepdims=True)
  d = -(g - cos * p) / np.where(norm > 0, norm, 1) * (norm > 0)
  g_norm = d * mn[..., None] / max(mn.sum(), 1)
  return g_seg, g_depth, g_norm


def _np_angles(p, g, published):
  """Degrees; a zero prediction gets 90 (the published code: NaN)."""
  p = np.asarray(p, np.float64)
  g = np.asarray(g, np.float64)
  pu = _unit(p)
  if published:
    cos = np.clip(np.sum(pu * g, -1), -1, 1)
  else:
    cos = np.clip(np.sum(pu * _unit(g), -1), -1, 1)
  deg = np.degrees(np.arccos(cos))
  return np.where(np.linalg.norm(p, axis=-1) > 0, deg, 90.0)


def _np_confusion(pred, gt):
  k = (gt >= 0) & (gt < C)
  return np.bincount(C * gt[k] + pred[k], minlength=C * C).reshape(C, C)


def _np_seg_metrics(pred, gt):
  """mIoU over the classes present in the ground truth or the prediction, and
  pixel accuracy, one class at a time."""
  ious = []
  valid = gt >= 0
  for c in range(C):
    inter = np.sum((pred == c) & (gt == c) & valid)
    union = np.sum(((pred == c) | (gt == c)) & valid)
    if union:
      ious.append(inter / union)
  return {"miou": np.mean(ious), "pix_acc": np.mean(pred[valid] == gt[valid])}


def _np_normal_stats(a):
  return {"mean_angle": np.mean(a), "median_angle": np.median(a),
          "within_11_25": np.mean(a < 11.25), "within_22_5": np.mean(a < 22.5),
          "within_30": np.mean(a < 30)}


# ----------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------

C_LOSS = 4


def _loss_batch(rng, b=3, h=3, w=4):
  s_out = rng.normal(size=(b, h, w, C_LOSS)) * 2
  s_y = rng.integers(0, C_LOSS, (b, h, w))
  s_y[rng.random((b, h, w)) < 0.25] = -1
  d_out = rng.uniform(0.2, 4, (b, h, w, 1))
  d_y = rng.uniform(0.5, 4, (b, h, w, 1))
  d_y[rng.random((b, h, w)) < 0.25] = 0
  n_y = _unit(rng.normal(size=(b, h, w, 3)))
  n_y[rng.random((b, h, w)) < 0.25] = 0
  n_y[0, 0, 1] = np.array([1, -1, 0]) / np.sqrt(2)  # sums to 0: valid ("exact" rule)
  n_out = rng.normal(size=(b, h, w, 3))
  n_out[0, 1, 1] = 0  # a zero prediction at a valid pixel
  n_y[0, 1, 1] = np.array([0, 0, 1.0])
  outs = (s_out, d_out, n_out)
  ys = (s_y.astype(np.int32), d_y, n_y)
  return outs, ys


@functools.lru_cache(maxsize=None)
def _loss_fn():
  """Per-pixel losses, batch means and their gradients for the three kinds at
  once, vmapped over cases (one program)."""
  kinds = losses.DENSE_KINDS

  def f(outs, ys, example_mask):
    def total(outs):
      means = tuple(losses.batch_loss(k, o, y, example_mask) for k, o, y in zip(kinds, outs, ys))
      return sum(means), means  # each mean depends on its own outputs only
    (_, means), grads = jax.value_and_grad(total, has_aux=True)(outs)
    per_pixel = tuple(losses.pixel_loss(k, o, y) for k, o, y in zip(kinds, outs, ys))
    return per_pixel, means, grads
  return jax.jit(jax.vmap(f))


def test_pixel_losses_and_gradients_match_float64_numpy_and_fully_masked_batches_give_zero():
  rng = np.random.default_rng(0)
  outs, ys = _loss_batch(rng)
  example_mask = np.array([True, False, True])
  # Case 1: the same predictions, every label missing.
  ys_none = (np.full_like(ys[0], -1), np.zeros_like(ys[1]), np.zeros_like(ys[2]))
  f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
  stack = lambda a, b: np.stack([a, b])  # noqa: E731
  res = _loss_fn()(tuple(stack(f32(o), f32(o)) for o in outs),
                   (stack(ys[0], ys_none[0]), f32(stack(ys[1], ys_none[1])),
                    f32(stack(ys[2], ys_none[2]))),
                   stack(example_mask, np.ones(3, bool)))
  per_pixel, means, grads = jax.tree.map(lambda a: np.asarray(a)[0], res)
  want_pp = _np_pixel_losses(outs, ys)
  masks = _np_masks(ys, example_mask)
  want_grads = _np_grads(outs, ys, example_mask)
  for i, kind in enumerate(losses.DENSE_KINDS):
    assert np.all(np.isfinite(per_pixel[i])), kind
    np.testing.assert_allclose(per_pixel[i], want_pp[i], rtol=1e-5, atol=1e-5, err_msg=kind)
    want = want_pp[i][masks[i]].mean()
    np.testing.assert_allclose(means[i], want, rtol=1e-5, err_msg=kind)
    np.testing.assert_allclose(grads[i], want_grads[i], rtol=1e-4, atol=1e-6, err_msg=kind)
    # Missing pixels and the unlabelled example give exactly zero gradient.
    assert np.all(grads[i][~masks[i]] == 0), kind
    assert np.all(grads[i][1] == 0), kind
  # The zero prediction at a valid pixel: loss 1, gradient 0 (not NaN).
  assert per_pixel[2][0, 1, 1] == pytest.approx(1.0)
  assert np.all(grads[2][0, 1, 1] == 0)
  # The target whose components sum to 0 is a valid pixel under the exact rule.
  assert masks[2][0, 0, 1] and np.any(grads[2][0, 0, 1] != 0)
  # A fully masked batch: finite per-pixel losses, mean 0, gradient 0.
  per_pixel, means, grads = jax.tree.map(lambda a: np.asarray(a)[1], res)
  for i in range(3):
    assert np.all(np.isfinite(per_pixel[i]))
    assert means[i] == 0
    assert np.all(grads[i] == 0)


def test_numpy_loss_gradients_agree_with_finite_differences():
  """The hand-written float64 gradients above, against central differences of
  the float64 losses (so the reference itself is checked)."""
  rng = np.random.default_rng(1)
  outs, ys = _loss_batch(rng)
  example_mask = np.array([True, True, False])
  want = _np_grads(outs, ys, example_mask)
  masks = _np_masks(ys, example_mask)
  eps = 1e-6
  for i in range(3):
    out = np.asarray(outs[i], np.float64)
    picks = np.argwhere(masks[i])[:4]
    for b, h, w in picks:
      for c in range(out.shape[-1]):
        if i == 2 and np.linalg.norm(out[b, h, w]) == 0:
          continue
        up, dn = out.copy(), out.copy()
        up[b, h, w, c] += eps
        dn[b, h, w, c] -= eps
        fd = (_np_mean_loss(i, up, ys, example_mask)
              - _np_mean_loss(i, dn, ys, example_mask)) / (2 * eps)
        assert fd == pytest.approx(want[i][b, h, w, c], rel=1e-5, abs=1e-8)


def test_pixel_mask_rules_and_published_normals_test():
  y = np.zeros((1, 2, 2, 3), np.float32)
  y[0, 0, 0] = [0.6, -0.6, 0.0]  # unit-ish direction whose components sum to 0
  y[0, 0, 1] = [0.0, 0.0, 1.0]
  exact = losses.pixel_mask("normals", y)
  published = losses.pixel_mask("normals", y, rule="published")
  np.testing.assert_array_equal(exact, [[[True, True], [False, False]]])
  np.testing.assert_array_equal(published, [[[False, True], [False, False]]])
  np.testing.assert_array_equal(losses.pixel_mask("segmentation", np.array([[[-1, 0, 3]]])),
                                [[[False, True, True]]])
  np.testing.assert_array_equal(
      losses.pixel_mask("depth", np.array([[[[0.0], [2.0]]]])), [[[False, True]]])


@pytest.mark.parametrize("kind, out_shape, y_shape, match", [
    ("depth", (2, 4, 4, 3), (2, 4, 4, 1), "need 1 channel"),
    ("normals", (2, 4, 4, 3), (2, 4, 4), r"labels of shape \(2, 4, 4\) do not fit"),
    ("segmentation", (2, 4, 4, 5), (2, 4, 4, 1), r"labels must be \(2, 4, 4\)"),
    ("segmentation", (4, 5), (4,), r"\[\.\.\., H, W, C\]"),
    ("edges", (2, 4, 4, 1), (2, 4, 4, 1), "unknown dense kind 'edges'"),
])
def test_shape_and_kind_errors_before_anything_compiles(kind, out_shape, y_shape, match):
  with pytest.raises(ValueError, match=match):
    losses.pixel_loss(kind, np.zeros(out_shape, np.float32), np.zeros(y_shape, np.float32))


@pytest.mark.parametrize("kind, y, match", [
    ("segmentation", np.array([[0, 5]]), r"f\.npy: segmentation label 5 outside \[-1, 5\)"),
    ("segmentation", np.array([[0.5, 1.0]]), r"f\.npy: segmentation labels must be integers"),
    ("depth", np.array([[[np.nan]]]), r"f\.npy: depth holds NaN"),
    ("depth", np.array([[[-1.0]]]), r"f\.npy: depth holds negative"),
    ("normals", np.array([[[0.0, 0.0, 2.0]]]), r"f\.npy: normals must be unit"),
])
def test_check_targets_names_the_file(kind, y, match):
  with pytest.raises(errors.DataError, match=match) as e:
    losses.check_targets(kind, y, num_classes=5, where="f.npy")
  assert "\n" not in str(e.value)
  good = {"segmentation": np.array([[-1, 4]]), "depth": np.array([[[0.0], [3.0]]]),
          "normals": np.array([[[0.0, 0.0, 0.0], [0.0, 0.6, 0.8]]])}[kind]
  losses.check_targets(kind, good, num_classes=5, where="f.npy")


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------

NB, B, H, W = 3, 4, 5, 6
SIZES = (4, 2, 3)  # uneven batches: the rest of each batch is padding
HIST_BINS = {"exact": 360, "libmtl": metrics.DEFAULT_BINS, "mtan": 90}


def _split(seed=3):
  rng = np.random.default_rng(seed)
  shape = (NB, B, H, W)
  s_out = rng.normal(size=shape + (C,)).astype(np.float32)
  s_out[..., 2] = -20  # class 2: never predicted, and absent from the ground truth
  s_out[..., 4] = -20  # class 4: in the ground truth, never predicted
  s_y = rng.choice([0, 1, 4], size=shape).astype(np.int32)  # class 3: predicted, not in GT
  s_y[rng.random(shape) < 0.15] = -1
  d_y = rng.uniform(0.5, 5, shape + (1,)).astype(np.float32)
  d_y[rng.random(shape) < 0.2] = 0
  d_y[2] = 0  # a batch without a valid depth pixel
  d_out = rng.uniform(0.5, 5, shape + (1,)).astype(np.float32)
  d_out[1] *= 3  # the small batch errs more: per-batch means differ from the pixels' mean
  n_y = _unit(rng.normal(size=shape + (3,))).astype(np.float32)
  n_y[rng.random(shape) < 0.2] = 0
  n_y[0, 0, 0, :3] = np.array([1, -1, 0], np.float32) / np.sqrt(np.float32(2))  # sum 0 (3 pixels)
  n_out = (n_y + 0.6 * rng.normal(size=shape + (3,))).astype(np.float32)
  n_out[0, 1, 2, 3] = 0  # zero predictions at (mostly) valid pixels
  n_out[1, 0, 1, 1] = 0
  valid = np.arange(B)[None, :] < np.array(SIZES)[:, None]
  return {"seg": (s_out, s_y), "depth": (d_out, d_y), "normals": (n_out, n_y), "valid": valid}


# The kinds whose sums differ by convention: segmentation's are the same under
# all three and depth's under exact and libmtl (module docstring), so one
# program computes each distinct set once.
_PROGRAM_KINDS = {"exact": ("segmentation", "depth", "normals"), "libmtl": ("normals",),
                  "mtan": ("depth", "normals")}


@functools.lru_cache(maxsize=None)
def _sums_fn():
  def f(s_out, s_y, d_out, d_y, n_out, n_y, valid):
    v = valid[:, None, None]
    args = {"segmentation": (s_out, s_y), "depth": (d_out, d_y), "normals": (n_out, n_y)}
    r = {}
    for conv, kinds in _PROGRAM_KINDS.items():
      r[conv] = {k: metrics.batch_sums(k, *args[k], v, conv, HIST_BINS[conv]) for k in kinds}
      if conv != "mtan":
        r[conv]["angles"] = metrics.normal_angles(n_out, n_y, conv)
    return r
  return jax.jit(jax.vmap(f))


@pytest.fixture(scope="module")
def split_sums():
  """``{convention: (per-batch sums, the split's sums, angles)}`` by kind, from
  one program run once over the split's batches."""
  data = _split()
  res = jax.tree.map(np.asarray, _sums_fn()(*data["seg"], *data["depth"], *data["normals"],
                                            data["valid"]))
  out = {}
  for conv in metrics.CONVENTIONS:
    per_batch = {k: res[conv].get(k, res["exact"][k])
                 for k in ("segmentation", "depth", "normals")}
    total = {}
    for kind in per_batch:
      acc = metrics.zero_sums(kind, C, conv, HIST_BINS[conv])
      for i in range(NB):
        acc = metrics.add(acc, {k: v[i] for k, v in per_batch[kind].items()})
      total[kind] = acc
    out[conv] = (per_batch, total, res[conv].get("angles"))
  return data, out


def _valid_examples(data, kind):
  """The split's real examples (padding dropped), concatenated."""
  o, y = data[kind]
  return o[data["valid"]], y[data["valid"]]


def test_segmentation_miou_and_pixel_accuracy_match_numpy_with_absent_classes(split_sums):
  data, sums = split_sums
  out, gt = _valid_examples(data, "seg")
  pred = out.argmax(-1)
  # The cases the test is for are in the data.
  assert not np.any(pred == 2) and not np.any(gt == 2)
  assert np.any(pred == 3) and not np.any(gt == 3)
  assert np.any(gt == 4) and not np.any(pred == 4)
  want = _np_seg_metrics(pred, gt)
  for conv in metrics.CONVENTIONS:
    total = sums[conv][1]["segmentation"]
    np.testing.assert_array_equal(total["confusion"], _np_confusion(pred, gt))
    got = metrics.finalize("segmentation", total, conv)
    assert got == pytest.approx(want, rel=1e-12), conv
  # mIoU averages 4 classes (0, 1, 3 with IoU 0, 4 with IoU 0): class 2 left out.
  assert want["miou"] < 0.5


def test_depth_errors_exact_libmtl_and_mtan_match_numpy(split_sums):
  data, sums = split_sums
  out, gt = _valid_examples(data, "depth")
  m = gt[..., 0] != 0
  p, g = out[..., 0][m].astype(np.float64), gt[..., 0][m].astype(np.float64)
  exact = {"abs_err": np.mean(np.abs(p - g)), "rel_err": np.mean(np.abs(p - g) / g)}
  assert metrics.finalize("depth", sums["exact"][1]["depth"]) == pytest.approx(exact, rel=1e-5)
  # LibMTL's DepthMetric, line by line: per batch sum/n_b, weights n_b.
  records, bs = [], []
  for i in range(NB):
    o, y = data["depth"][0][i][:SIZES[i]], data["depth"][1][i][:SIZES[i]]
    mask = y[..., 0] != 0
    if not mask.any():
      continue  # LibMTL: 0/0 = NaN here; batches without pixels are skipped
    po, yo = o[..., 0][mask].astype(np.float64), y[..., 0][mask].astype(np.float64)
    records.append([np.sum(np.abs(po - yo)) / mask.sum(), np.sum(np.abs(po - yo) / yo) / mask.sum()])
    bs.append(po.size)
  rec, bs = np.array(records), np.array(bs)
  libmtl = {"abs_err": (rec[:, 0] * bs).sum() / bs.sum(), "rel_err": (rec[:, 1] * bs).sum() / bs.sum()}
  assert libmtl == pytest.approx(exact, rel=1e-12)  # the same number, as the docstring says
  assert metrics.finalize("depth", sums["libmtl"][1]["depth"], "libmtl") == pytest.approx(
      libmtl, rel=1e-5)
  # MTAN: the plain mean of the per-batch errors.
  mtan = {"abs_err": rec[:, 0].mean(), "rel_err": rec[:, 1].mean()}
  got = metrics.finalize("depth", sums["mtan"][1]["depth"], "mtan")
  assert got == pytest.approx(mtan, rel=1e-5)
  assert abs(got["abs_err"] - exact["abs_err"]) > 0.1  # uneven batches: a real difference


def test_normal_metrics_exact_and_libmtl_match_numpy_and_the_median_bounds(split_sums):
  data, sums = split_sums
  out, gt = _valid_examples(data, "normals")
  for conv, published in (("exact", False), ("libmtl", True)):
    mask = (np.sum(gt, -1) != 0) if published else np.any(gt != 0, -1)
    a = _np_angles(out, gt, published)[mask]
    want = _np_normal_stats(a)
    per_batch, total, (angles, amask) = sums[conv]
    gatherer = metrics.AngleGatherer()
    for i in range(NB):
      gatherer.add(angles[i], amask[i] & data["valid"][i][:, None, None])
    assert gatherer.count == a.size
    exact_median = gatherer.median()
    assert exact_median == pytest.approx(want["median_angle"], abs=1e-4), conv
    got = metrics.finalize("normals", total["normals"], conv, median=exact_median)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6), conv
    hist = metrics.finalize("normals", total["normals"], conv)
    bound = metrics.median_bound(HIST_BINS[conv])
    assert abs(hist["median_angle"] - want["median_angle"]) <= bound + 1e-4, conv
  # The sum-zero normal is the rules' one difference; zero predictions get 90 degrees.
  assert sums["exact"][1]["normals"]["count"] == sums["libmtl"][1]["normals"]["count"] + 3
  assert np.sum(sums["exact"][2][0] == 90.0) >= 2


def test_normal_metrics_mtan_are_means_of_per_batch_values(split_sums):
  data, sums = split_sums
  terms = []
  for i in range(NB):
    o, y = data["normals"][0][i][:SIZES[i]], data["normals"][1][i][:SIZES[i]]
    mask = np.sum(y, -1) != 0
    terms.append(_np_normal_stats(_np_angles(o, y, True)[mask]))
  want = {k: np.mean([t[k] for t in terms]) for k in terms[0]}
  got = metrics.finalize("normals", sums["mtan"][1]["normals"], "mtan")
  assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_uneven_padded_batches_sum_to_the_counts_and_histogram_of_the_split(split_sums):
  """The additive sums of the three uneven batches (their padding masked by
  ``valid``) equal the counts of the split's real examples (numpy)."""
  data, sums = split_sums
  total = sums["exact"][1]
  out, gt = _valid_examples(data, "depth")
  m = gt[..., 0] != 0
  assert total["depth"]["count"] == m.sum()
  per_batch = sums["exact"][0]
  assert per_batch["depth"]["count"][2] == 0  # the batch without depth pixels
  n_out, n_y = _valid_examples(data, "normals")
  a = _np_angles(n_out, n_y, False)[np.any(n_y != 0, -1)]
  width = 180.0 / HIST_BINS["exact"]
  want_hist = np.bincount(np.minimum((a / width).astype(int), HIST_BINS["exact"] - 1),
                          minlength=HIST_BINS["exact"])
  assert np.abs(total["normals"]["hist"] - want_hist).sum() <= 2  # bin edges in float32
  assert total["normals"]["hist"].sum() == a.size
  assert list(total["normals"]["within"]) == [np.sum(a < t) for t in metrics.NORMAL_THRESHOLDS]


def test_finalize_refuses_sums_of_another_convention_and_bad_arguments(split_sums):
  _, sums = split_sums
  with pytest.raises(ValueError, match="accumulated with convention 'exact'"):
    metrics.finalize("normals", sums["exact"][1]["normals"], "mtan")
  with pytest.raises(ValueError, match="accumulated with convention 'mtan'"):
    metrics.finalize("depth", sums["mtan"][1]["depth"], "exact")
  with pytest.raises(ValueError, match="unknown metric convention 'pytorch'"):
    metrics.zero_sums("depth", convention="pytorch")
  with pytest.raises(ValueError, match=r"valid of shape \(2,\) does not fit the pixels "
                     r"\(2, 3, 2\): give it their rank"):
    metrics.batch_sums("depth", np.ones((2, 3, 2, 1)), np.ones((2, 3, 2, 1)), np.ones(2, bool))
  with pytest.raises(ValueError, match="bins must be a positive integer"):
    metrics.batch_sums("normals", np.ones((1, 2, 2, 3)), np.ones((1, 2, 2, 3)), bins=0)
  with pytest.raises(ValueError, match="median is for normals"):
    metrics.finalize("normals", sums["mtan"][1]["normals"], "mtan", median=1.0)
  with pytest.raises(ValueError, match="different kinds or conventions"):
    metrics.add(sums["exact"][1]["normals"], sums["libmtl"][1]["normals"])
  with pytest.raises(ValueError, match="different shapes"):
    metrics.add(sums["exact"][1]["normals"], metrics.zero_sums("normals"))


def test_empty_split_gives_nan_and_directions_cover_every_metric():
  for kind in ("segmentation", "depth", "normals"):
    got = metrics.finalize(kind, metrics.zero_sums(kind, C))
    assert set(got) == set(metrics.METRIC_NAMES[kind])
    assert all(np.isnan(v) for v in got.values())
  names = {m for ms in metrics.METRIC_NAMES.values() for m in ms}
  assert names == set(metrics.DENSE_METRIC_DIRECTIONS)
  assert len(names) == 9
  # The histogram median of a hand-made histogram: bins 1 and 2 hold the middle.
  hist = np.zeros(180, np.int32)
  hist[[0, 1, 2, 5]] = [1, 1, 1, 1]
  assert metrics._hist_median(hist) == pytest.approx((1.5 + 2.5) / 2)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------
# Delta_m: per task (LibMTL) and per metric (Nash-MTL)
# ----------------------------------------------------------------------------


def test_delta_m_per_task_and_per_metric_on_a_three_task_table():
  names = {"seg": ["miou", "pix_acc"], "depth": ["abs_err", "rel_err"],
           "normals": list(metrics.METRIC_NAMES["normals"])}
  base = {"seg": [0.3830, 0.6376], "depth": [0.6754, 0.2780],
          "normals": [25.01, 19.21, 0.3014, 0.5720, 0.6915]}
  new = {"seg": [0.4010, 0.6500], "depth": [0.6100, 0.2600],
         "normals": [25.90, 20.10, 0.2900, 0.5600, 0.6800]}
  dirs = metrics.DENSE_METRIC_DIRECTIONS
  table = {t: dict(zip(names[t], new[t])) for t in names}
  baseline = {t: dict(zip(names[t], base[t])) for t in names}
  # LibMTL's count_improvement: weight 1 = higher is better.
  weight = {t: [1 if dirs[m] == "higher" else 0 for m in names[t]] for t in names}
  libmtl = np.mean([np.mean((-1.0) ** np.array(weight[t]) * (np.array(base[t]) - np.array(new[t]))
                            / np.array(base[t])) for t in names]) * 100
  # Nash-MTL's delta_fn: SIGN 1 = higher is better, KK = -1; positive = worse there.
  order = [(t, m) for t in names for m in names[t]]
  a = np.array([table[t][m] for t, m in order])
  b = np.array([baseline[t][m] for t, m in order])
  sign = np.array([1 if dirs[m] == "higher" else 0 for _, m in order])
  nash = ((-np.ones(9)) ** sign * (a - b) / b).mean() * 100.0
  dm_task, per_task = measure.delta_m(table, baseline, dirs)
  dm_metric, per_task2 = measure.delta_m(table, baseline, dirs, average="per_metric")
  assert dm_task == pytest.approx(libmtl, rel=1e-12)
  assert dm_metric == pytest.approx(-nash, rel=1e-12)
  assert per_task == per_task2
  assert abs(dm_task - dm_metric) > 0.1  # the two really differ on this table
  with pytest.raises(ValueError, match="average must be 'per_task' or 'per_metric'"):
    measure.delta_m(table, baseline, dirs, average="per_image")


# ----------------------------------------------------------------------------
# Slow: bigger split, real uneven batch shapes, the default histogram
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_uneven_batch_shapes_equal_one_pass_and_default_histogram_median():
  rng = np.random.default_rng(7)
  n, h, w = 11, 24, 32
  g = _unit(rng.normal(size=(n, h, w, 3))).astype(np.float32)
  g[rng.random((n, h, w)) < 0.1] = 0
  p = (g + 0.5 * rng.normal(size=g.shape)).astype(np.float32)
  d_y = rng.uniform(0.5, 5, (n, h, w, 1)).astype(np.float32)
  d_y[rng.random((n, h, w)) < 0.1] = 0
  d_out = rng.uniform(0.5, 5, (n, h, w, 1)).astype(np.float32)
  fn = jax.jit(lambda o, y, do, dy: (metrics.batch_sums("normals", o, y),
                                     metrics.batch_sums("depth", do, dy)))
  one = jax.tree.map(np.asarray, fn(p, g, d_out, d_y))
  acc = (metrics.zero_sums("normals"), metrics.zero_sums("depth"))
  for lo, hi in ((0, 4), (4, 5), (5, 11)):  # three shapes: three programs
    part = fn(p[lo:hi], g[lo:hi], d_out[lo:hi], d_y[lo:hi])
    acc = tuple(metrics.add(x, jax.tree.map(np.asarray, y)) for x, y in zip(acc, part))
  for a, b in zip(acc, one):
    assert a["batches"] == 3 and b["batches"] == 1
    for k in set(a) - {"batches"}:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
  a = _np_angles(p, g, False)[np.any(g != 0, -1)]
  got = metrics.finalize("normals", acc[0])
  assert abs(got["median_angle"] - np.median(a)) <= metrics.median_bound() + 1e-4
  want = _np_normal_stats(a)
  del want["median_angle"], got["median_angle"]
  assert got == pytest.approx(want, rel=1e-5)
