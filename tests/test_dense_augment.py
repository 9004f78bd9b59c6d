"""Dense augmentation (mtljax/dense/augment.py) against a float64 numpy
re-implementation of MTAN's RandomScaleCrop (lorenmt/mtan, create_dataset.py:
slice the crop, resize with F.interpolate's definitions, depth / s) and the
published flip; one jitted program per function under test, cases as data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtljax.dense import augment as aug

H, W = 36, 48  # scales 1.2 and 1.5 crop 30x40 and 24x32
C = 5


def make_example(seed: int, h: int = H, w: int = W) -> dict:
  """Image in [0, 1], labels -1..C-1, depth with missing zeros, unit normals
  with missing zeros."""
  r = np.random.default_rng(seed)
  normal = r.normal(size=(h, w, 3))
  normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
  missing = r.random((h, w)) < 0.2
  normal[missing] = 0.0
  depth = r.uniform(0.5, 10.0, (h, w, 1))
  depth[r.random((h, w)) < 0.2] = 0.0
  return {"image": r.random((h, w, 3)).astype(np.float32),
          "label": r.integers(-1, C, (h, w)).astype(np.int32),
          "depth": depth.astype(np.float32), "normal": normal.astype(np.float32)}


def stack(examples):
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


# ----------------------------------------------------------------------------
# The reference: MTAN's RandomScaleCrop on a given scale and corner, in numpy.
# ----------------------------------------------------------------------------


def ref_bilinear(crop: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """F.interpolate(mode='bilinear', align_corners=True) in float64: output
  pixel (y, x) samples the crop at (y (h-1)/(H-1), x (w-1)/(W-1))."""
  h, w = crop.shape[:2]
  c = crop.astype(np.float64)
  ry = np.arange(out_h) * (h - 1) / (out_h - 1)
  rx = np.arange(out_w) * (w - 1) / (out_w - 1)
  y0 = np.floor(ry).astype(int)
  x0 = np.floor(rx).astype(int)
  y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
  fy, fx = (ry - y0)[:, None, None], (rx - x0)[None, :, None]
  return ((1 - fy) * ((1 - fx) * c[y0][:, x0] + fx * c[y0][:, x1])
          + fy * ((1 - fx) * c[y1][:, x0] + fx * c[y1][:, x1]))


def ref_nearest(crop: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """F.interpolate(mode='nearest'): output row y reads floor(y h / H) (exact
  integer arithmetic; PyTorch's float32 version is checked to agree)."""
  h, w = crop.shape[:2]
  return crop[(np.arange(out_h) * h) // out_h][:, (np.arange(out_w) * w) // out_w]


def ref_scale_crop(ex: dict, sc: float, i: int, j: int, flip: bool = False,
                   normal_bilinear: bool = False) -> dict:
  """MTAN's RandomScaleCrop with the draw given, then the published flip."""
  hh, ww = ex["image"].shape[:2]
  h, w = int(hh / sc), int(ww / sc)
  crop = {k: v[i:i + h, j:j + w] for k, v in ex.items()}
  out = {"image": ref_bilinear(crop["image"], hh, ww),
         "label": ref_nearest(crop["label"], hh, ww),
         "depth": ref_nearest(crop["depth"], hh, ww) / np.float32(sc),
         "normal": (ref_bilinear(crop["normal"], hh, ww) if normal_bilinear
                    else ref_nearest(crop["normal"], hh, ww))}
  if flip:
    out = {k: v[:, ::-1].copy() for k, v in out.items()}
    out["normal"][..., 0] = -out["normal"][..., 0]
  return out


def check_against_reference(got: dict, ex: dict, sc: float, i: int, j: int, flip: bool,
                            normal_bilinear: bool = False) -> None:
  ref = ref_scale_crop(ex, sc, i, j, flip, normal_bilinear)
  # Bilinear: the sampling coordinate is float32, as PyTorch's: off by up to
  # max(H, W) * eps32 pixels, times a neighbour difference of at most 1 (image)
  # or 2 (normals).
  tol = 2 * max(ex["image"].shape[:2]) * np.finfo(np.float32).eps
  np.testing.assert_allclose(got["image"], ref["image"], rtol=0, atol=tol)
  np.testing.assert_array_equal(got["label"], ref["label"])
  # float32 division to 1 ulp (XLA divides by a broadcast scalar as a product
  # with its reciprocal); missing depth stays exactly 0.
  np.testing.assert_allclose(got["depth"], ref["depth"], rtol=2.4e-7, atol=0)
  if normal_bilinear:
    np.testing.assert_allclose(got["normal"], ref["normal"], rtol=0, atol=2 * tol)
  else:
    np.testing.assert_array_equal(got["normal"], ref["normal"])


# ----------------------------------------------------------------------------
# Tables (numpy only).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(288, 384), (128, 256), (256, 512), (64, 80), (H, W)])
def test_pytorch_float32_nearest_index_is_the_exact_floor_for_these_shapes(shape):
  for scale in aug.SCALES:
    for n, m in zip(shape, aug.crop_size(shape, scale)):
      np.testing.assert_array_equal(aug.nearest_index(n, m), (np.arange(n) * m) // n)


def test_crop_sizes_are_mtans_python_float_truncation():
  # int(288 / 1.2) is 240 in float64; a float32 division would give 239.
  assert aug.crop_size((288, 384), 1.2) == (240, 320)
  assert aug.crop_size((128, 256), 1.2) == (106, 213)
  assert aug.crop_size((288, 384), 1.5) == (192, 256)


# ----------------------------------------------------------------------------
# Scale-crop on given windows, against the reference.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def windowed():
  """Six examples, each with its own window (every scale, extreme corners,
  one flip), through one jitted vmapped apply_window: nearest normals,
  bilinear normals, inverse depth."""
  cases = [(0, 0, 0, False), (1, 0, 0, False), (1, H - 30, W - 40, False),
           (2, 5, 7, False), (2, H - 24, W - 32, True), (0, 0, 0, True)]
  examples = [make_example(10 + k) for k in range(len(cases))]
  window = aug.Window(*(np.array(c, dt) for c, dt in zip(
      zip(*cases), (np.int32, np.int32, np.int32, np.bool_))))

  @jax.jit
  @jax.vmap
  def run(ex, win):
    return (aug.apply_window(ex, win),
            aug.apply_window(ex, win, normal_interpolation="bilinear"),
            aug.apply_window({"depth": ex["depth"], "image": ex["image"]}, win,
                             inverse_depth=True)["depth"])

  out = jax.tree.map(np.asarray, run(stack(examples), window))
  return cases, examples, out


def test_scale_crop_matches_mtans_random_scale_crop(windowed):
  cases, examples, (nearest, _, _) = windowed
  for b, ((s, i, j, flip), ex) in enumerate(zip(cases, examples)):
    got = {k: v[b] for k, v in nearest.items()}
    check_against_reference(got, ex, aug.SCALES[s], i, j, flip)


def test_published_bilinear_normals_option_matches_the_reference(windowed):
  cases, examples, (_, bilinear, _) = windowed
  for b, ((s, i, j, flip), ex) in enumerate(zip(cases, examples)):
    got = {k: v[b] for k, v in bilinear.items()}
    check_against_reference(got, ex, aug.SCALES[s], i, j, flip, normal_bilinear=True)
  # ... whose normals are no longer unit vectors where they were blended.
  norms = np.linalg.norm(bilinear["normal"][1], axis=-1)
  assert norms[norms > 0].min() < 0.9


def test_depth_scales_by_one_over_s_and_inverse_depth_by_s(windowed):
  cases, examples, (nearest, _, inverse) = windowed
  for b, ((s, i, j, flip), ex) in enumerate(zip(cases, examples)):
    sc = np.float32(aug.SCALES[s])
    h, w = int(H / aug.SCALES[s]), int(W / aug.SCALES[s])
    ref = ref_nearest(ex["depth"][i:i + h, j:j + w], H, W)
    ref = ref[:, ::-1] if flip else ref
    np.testing.assert_allclose(nearest["depth"][b], ref / sc, rtol=2.4e-7, atol=0)
    np.testing.assert_array_equal(inverse[b], ref * sc)
    assert np.all((nearest["depth"][b] == 0) == (ref == 0))  # missing stays missing


def test_scale_one_without_flip_is_the_identity_bitwise(windowed):
  _, examples, (nearest, bilinear, _) = windowed
  for out in (nearest, bilinear):
    for k, v in examples[0].items():
      np.testing.assert_array_equal(out[k][0], v)


def test_labels_keep_ignored_pixels_and_no_new_class(windowed):
  cases, examples, (nearest, _, _) = windowed
  for b, ex in enumerate(examples):
    got = set(np.unique(nearest["label"][b]))
    assert -1 in got and got <= set(np.unique(ex["label"]))
    assert nearest["label"][b].dtype == np.int32


def test_normals_stay_unit_where_valid_and_zero_where_missing(windowed):
  _, _, (nearest, _, _) = windowed
  norms = np.linalg.norm(nearest["normal"].astype(np.float64), axis=-1)
  valid = norms > 0
  assert valid.mean() > 0.7 and (~valid).any()
  np.testing.assert_allclose(norms[valid], 1.0, atol=1e-6)


# ----------------------------------------------------------------------------
# Flip.
# ----------------------------------------------------------------------------


def test_flip_twice_is_the_identity_bitwise_and_negates_normal_x():
  ex = make_example(3)
  flip = jax.jit(aug.hflip)
  once = jax.tree.map(np.asarray, flip(ex))
  twice = jax.tree.map(np.asarray, flip(once))
  for k, v in ex.items():
    assert twice[k].tobytes() == v.tobytes(), k
  for k in ("image", "label", "depth"):
    np.testing.assert_array_equal(once[k], ex[k][:, ::-1])
  np.testing.assert_array_equal(once["normal"][..., 0], -ex["normal"][:, ::-1, 0])
  np.testing.assert_array_equal(once["normal"][..., 1:], ex["normal"][:, ::-1, 1:])


# ----------------------------------------------------------------------------
# Random draws: keyed, per example, uniform.
# ----------------------------------------------------------------------------

B = 6


N_WINDOWS = 6000


@pytest.fixture(scope="module")
def batch_fn():
  """augment_batch, the windows of its documented per-example keys
  (``split(key, B)``), and N_WINDOWS windows of the keys ``[0, n]``, in one
  jit."""
  def run(key, batch):
    windows = jax.vmap(lambda k: aug.draw_window(k, (H, W)))(jax.random.split(key, B))
    keys = jnp.stack([jnp.zeros(N_WINDOWS, jnp.uint32),
                      jnp.arange(N_WINDOWS, dtype=jnp.uint32)], 1)
    many = jax.vmap(lambda k: aug.draw_window(k, (H, W)))(keys)
    return aug.augment_batch(key, batch), windows, many
  return jax.jit(run)


def key_data(seed: int) -> np.ndarray:
  return np.array([0, seed], np.uint32)  # jax.random.PRNGKey(seed)'s data, no eager op


@pytest.fixture(scope="module")
def drawn(batch_fn):
  examples = [make_example(20 + b) for b in range(B)]
  batch = stack(examples)
  return examples, [jax.tree.map(np.asarray, batch_fn(key_data(seed), batch))
                    for seed in (7, 7, 8)]


def test_augment_batch_uses_one_key_per_example_and_matches_the_reference(drawn):
  examples, ((out, win, _), (out2, _, _), (out3, win3, _)) = drawn
  for k in out:
    assert out[k].tobytes() == out2[k].tobytes()  # the same key: the same batch
  assert any(out[k].tobytes() != out3[k].tobytes() for k in out)
  windows = list(zip(win.scale, win.top, win.left, win.flip))
  assert len(set(windows)) > 1 and windows != list(zip(*win3))  # per example, per key
  for b, ((s, i, j, flip), ex) in enumerate(zip(windows, examples)):
    got = {k: v[b] for k, v in out.items()}
    check_against_reference(got, ex, aug.SCALES[s], int(i), int(j), bool(flip))


def test_windows_are_uniform_over_scales_corners_and_flips(drawn):
  w = drawn[1][0][2]
  n = len(w.scale)
  counts = np.bincount(w.scale, minlength=3)
  sd = np.sqrt(n * (1 / 3) * (2 / 3))
  assert np.all(np.abs(counts - n / 3) < 4 * sd), counts
  assert abs(w.flip.mean() - 0.5) < 4 * np.sqrt(0.25 / n)
  for s, sc in enumerate(aug.SCALES):
    h, w_ = aug.crop_size((H, W), sc)
    sel = w.scale == s
    for corner, span in ((w.top[sel], H - h), (w.left[sel], W - w_)):
      assert corner.min() == 0 and corner.max() == span  # both ends included
      if span:
        # Uniform on {0..span}: the mean is span/2 within 4 standard errors.
        se = np.sqrt(((span + 1) ** 2 - 1) / 12 / sel.sum())
        assert abs(corner.mean() - span / 2) < 4 * se


# ----------------------------------------------------------------------------
# Bad input: a ValueError naming the problem, while tracing.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, example_edit, match", [
    ({"scales": (0.8, 1.0)}, None, r"scales=\(0.8, 1.0\)"),
    ({"scales": ()}, None, r"scales=\(\)"),
    ({"normal_interpolation": "cubic"}, None, "normal_interpolation='cubic'"),
    ({}, lambda e: e.update(mask=e["label"]), r"fields .* got \['depth', 'image'"),
    ({}, lambda e: e.pop("image"), "image required"),
    ({}, lambda e: e.update(depth=e["depth"][..., 0]), r"depth has shape \(36, 48\)"),
    ({}, lambda e: e.update(image=(e["image"] * 255).astype(np.uint8)), "dtype uint8"),
])
def test_bad_options_and_examples_are_named(kwargs, example_edit, match):
  ex = make_example(0)
  if example_edit:
    example_edit(ex)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda e: aug.augment(jnp.zeros(2, jnp.uint32), e, **kwargs), ex)


def test_a_batch_with_mismatched_sizes_is_named():
  batch = stack([make_example(0), make_example(1)])
  batch["label"] = batch["label"][:1]
  with pytest.raises(ValueError, match="same leading batch axis"):
    jax.eval_shape(lambda b: aug.augment_batch(jnp.zeros(2, jnp.uint32), b), batch)
  with pytest.raises(ValueError, match="a batch of image has 4 axes"):
    jax.eval_shape(lambda b: aug.augment_batch(jnp.zeros(2, jnp.uint32), b),
                   make_example(0))


@pytest.mark.slow
def test_nyuv2_sized_batch_matches_the_reference():
  """At NYUv2's 288x384, a batch of 4 through the published options (bilinear
  normals): each example MTAN's crop of the window its key drew."""
  hh, ww = 288, 384
  examples = [make_example(40 + b, hh, ww) for b in range(4)]

  @jax.jit
  def run(key, batch):
    windows = jax.vmap(lambda k: aug.draw_window(k, (hh, ww)))(jax.random.split(key, 4))
    return aug.augment_batch(key, batch, normal_interpolation="bilinear"), windows

  out, win = jax.tree.map(np.asarray, run(key_data(3), stack(examples)))
  assert len(set(win.scale.tolist())) > 1
  for b, ex in enumerate(examples):
    got = {k: v[b] for k, v in out.items()}
    check_against_reference(got, ex, aug.SCALES[win.scale[b]], int(win.top[b]),
                            int(win.left[b]), bool(win.flip[b]), normal_bilinear=True)
