"""Data augmentation of dense examples as the MTL literature applies it:
random scale-crop and horizontal flip, pure jittable functions of a key.

An example is a dict of mtljax's dense record (:mod:`mtljax.data.dense_files`)::

  image [H, W, 3] float    label [H, W] int (-1 ignored)
  depth [H, W, 1] float (0 missing)    normal [H, W, 3] float (0 missing; optional)

only ``image`` required. Functions take one example; :func:`augment_batch`
vmaps over a batch with one key per example (``jax.random.split(key, B)``), so
a batch's augmentation is a function of the step's key: seeded, and the same
after a resume, on the device path (inside the compiled step) and the host
pipeline alike.

**Random scale-crop** (MTAN's ``RandomScaleCrop``, ``create_dataset.py`` of
github.com/lorenmt/mtan, copied unchanged by LibMTL, CAGrad and Nash-MTL):
draw ``s`` uniformly from ``scales = (1.0, 1.2, 1.5)``, a crop of
``h, w = int(H / s), int(W / s)`` (Python's float division and truncation),
its top-left corner ``i ~ U{0..H-h}``, ``j ~ U{0..W-w}`` (both ends
included, as ``random.randint``), and resize the crop ``[i:i+h, j:j+w]`` back
to ``H x W``:

* ``image``: bilinear, ``align_corners=True``: output row ``y`` reads crop
  row ``r = y (h-1)/(H-1)``, ``(1 - (r - floor r))`` of row ``floor r`` plus
  ``(r - floor r)`` of the next (the last row clamps), the same along columns;
* ``label`` and ``depth``: nearest, PyTorch's ``mode='nearest'``: output row
  ``y`` reads crop row ``min(floor(y * float32(h / H)), h - 1)`` in float32
  (for the shapes of NYUv2, Cityscapes and the bundled scenes this equals the
  exact ``floor(y h / H)``; tests/test_dense_augment.py checks);
* ``depth`` divided by ``s`` (zooming in by ``s`` brings the scene ``s``
  times closer). ``inverse_depth=True`` multiplies instead, the right rule for
  Cityscapes' inverse depth (disparity); the codes that apply this crop to
  Cityscapes divide its inverse depth like NYUv2's depth;
* ``normal``: **nearest by default**, so valid normals stay unit vectors and
  missing ones (0) stay 0. The published code resizes normals bilinearly
  (``align_corners=True``): ``normal_interpolation="bilinear"`` reproduces
  it; its interpolated normals are shorter than 1 where directions differ
  and blend into missing (0) pixels at their border, which the published
  normal loss and metrics (normalising only the prediction, masking only
  exact zeros) take as targets. (MTAN's first version of the crop, July
  2020, used nearest for depth and normals and did not divide depth; the
  bilinear normals and the division by ``s`` came a commit later, nearest
  depth in October 2020.)

With ``s = 1`` the crop is the whole image and the resize is the identity,
bitwise.

**Horizontal flip** (after the crop, with probability 1/2 as the published
``torch.rand(1) < 0.5``): every field's columns reversed, and the normals' x
component (channel 0; the published code negates ``normal[0]`` after moving
channels first) negated: mirroring the image mirrors the horizontal
direction. Flipping twice is the identity, bitwise (a missing normal's
``0`` becomes ``-0.0`` after one flip, which still equals 0).

The crop's window and the flip (:class:`Window`) are drawn by
:func:`draw_window` and applied by :func:`apply_window`; :func:`augment` is
both. Interface for the integration::

  augment_batch(key, batch, scales=SCALES, flip=True,
                normal_interpolation="nearest", inverse_depth=False) -> batch
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

SCALES = (1.0, 1.2, 1.5)
NORMAL_INTERPOLATIONS = ("nearest", "bilinear")
FIELDS = ("image", "label", "depth", "normal")
_RANK = {"image": 3, "label": 2, "depth": 3, "normal": 3}
_CHANNELS = {"image": 3, "depth": 1, "normal": 3}


class Window(NamedTuple):
  """One example's augmentation: ``scale`` (an index into the scales), the
  crop's top-left corner ``top, left``, and whether to ``flip``."""
  scale: jax.Array
  top: jax.Array
  left: jax.Array
  flip: jax.Array


def crop_size(shape: Sequence[int], scale: float) -> tuple[int, int]:
  """``(int(H / scale), int(W / scale))``, as MTAN computes it."""
  h, w = shape
  return int(h / scale), int(w / scale)


def check(example: dict, scales: Sequence[float] = SCALES,
          normal_interpolation: str = "nearest") -> tuple[int, int]:
  """``(H, W)`` of a valid example and options, else a ``ValueError`` naming
  the problem (raised while tracing, before anything compiles)."""
  scales = tuple(scales)
  if not scales or not all(isinstance(s, (int, float)) and math.isfinite(s) and s >= 1
                           for s in scales):
    raise ValueError(f"scales={scales!r}: give one or more finite scales >= 1 (a crop "
                     "is 1/scale of the image).")
  if normal_interpolation not in NORMAL_INTERPOLATIONS:
    raise ValueError(f"normal_interpolation={normal_interpolation!r} is not one of "
                     f"{NORMAL_INTERPOLATIONS}.")
  unknown = sorted(set(example) - set(FIELDS))
  if unknown or "image" not in example:
    raise ValueError(f"a dense example has fields {FIELDS} (image required); got "
                     f"{sorted(example)}.")
  h, w = example["image"].shape[:2]
  for k, x in example.items():
    want = (h, w) + ((_CHANNELS[k],) if k in _CHANNELS else ())
    if tuple(x.shape) != want:
      raise ValueError(f"{k} has shape {tuple(x.shape)}; with image {tuple(example['image'].shape)}"
                       f" it must be {want} (one example; augment_batch takes a batch).")
    if k != "label" and not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{k} has dtype {x.dtype}; it must be floating point.")
  if min(h, w) < 2:
    raise ValueError(f"image shape {(h, w)}: need at least 2x2 pixels.")
  return h, w


# ----------------------------------------------------------------------------
# Resampling tables: per scale, which crop rows/columns each output row/column
# reads (host numpy, static).
# ----------------------------------------------------------------------------


def nearest_index(n: int, m: int) -> np.ndarray:
  """PyTorch's ``mode='nearest'`` source index of each of ``n`` outputs from
  ``m`` inputs: ``min(floor(y * float32(m / n)), m - 1)`` in float32."""
  scale = np.float32(m) / np.float32(n)
  y = np.arange(n, dtype=np.float32)
  return np.minimum(np.floor(y * scale).astype(np.int64), m - 1)


def bilinear_index(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(lo, hi, frac)`` of PyTorch's bilinear ``align_corners=True`` resize
  of ``m`` inputs to ``n`` outputs (float32): output ``y`` is
  ``(1 - frac) x[lo] + frac x[hi]``, ``src = y (m-1)/(n-1)``, ``lo = floor
  src``, ``hi = min(lo + 1, m - 1)``."""
  scale = np.float32(m - 1) / np.float32(n - 1) if n > 1 else np.float32(0)
  src = scale * np.arange(n, dtype=np.float32)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, m - 1)
  frac = np.clip(src - lo.astype(np.float32), 0, 1).astype(np.float32)
  return lo, hi, frac


@functools.lru_cache(maxsize=32)
def _tables(h: int, w: int, scales: tuple[float, ...]) -> dict[str, np.ndarray]:
  sizes = [crop_size((h, w), s) for s in scales]
  out = {"h": np.array([a for a, _ in sizes], np.int32),
         "w": np.array([b for _, b in sizes], np.int32)}
  for axis, n, k in (("y", h, 0), ("x", w, 1)):
    out[f"near_{axis}"] = np.stack([nearest_index(n, sz[k]) for sz in sizes]).astype(np.int32)
    bil = [bilinear_index(n, sz[k]) for sz in sizes]
    out[f"lo_{axis}"] = np.stack([b[0] for b in bil]).astype(np.int32)
    out[f"hi_{axis}"] = np.stack([b[1] for b in bil]).astype(np.int32)
    out[f"frac_{axis}"] = np.stack([b[2] for b in bil])
  return out


# ----------------------------------------------------------------------------
# The augmentation.
# ----------------------------------------------------------------------------


def draw_window(key: jax.Array, shape: Sequence[int], scales: Sequence[float] = SCALES,
                flip: bool = True) -> Window:
  """A random :class:`Window` for an ``H x W`` image (module docstring):
  scale uniform over ``scales``, corner uniform over the positions where the
  crop fits, flip with probability 1/2 (never when ``flip`` is False).

  One draw of four 32-bit words (one threefry call: each call is a large
  program for XLA to compile), each reduced modulo its range: the scale is
  ``b0 mod S``, the corner ``b1 mod (H - h + 1)`` and ``b2 mod (W - w + 1)``,
  the flip the top bit of ``b3``; the modulo's bias is below ``n / 2^32``
  (1e-7 for ``n <= 384``)."""
  h, w = (int(s) for s in shape)
  t = _tables(h, w, tuple(float(s) for s in scales))
  b = jax.random.bits(key, (4,), jnp.uint32)
  s = (b[0] % jnp.uint32(len(t["h"]))).astype(jnp.int32)
  span_h = (h - jnp.asarray(t["h"])[s] + 1).astype(jnp.uint32)
  span_w = (w - jnp.asarray(t["w"])[s] + 1).astype(jnp.uint32)
  top = (b[1] % span_h).astype(jnp.int32)
  left = (b[2] % span_w).astype(jnp.int32)
  f = (b[3] >> 31).astype(bool) if flip else jnp.zeros((), bool)
  return Window(s, top, left, f)


def hflip(example: dict) -> dict:
  """The example mirrored left-right, normals' x component negated."""
  out = {k: x[:, ::-1] for k, x in example.items()}
  if "normal" in out:
    out["normal"] = out["normal"] * jnp.asarray([-1, 1, 1], out["normal"].dtype)
  return out


def apply_window(example: dict, window: Window, *, scales: Sequence[float] = SCALES,
                 normal_interpolation: str = "nearest",
                 inverse_depth: bool = False) -> dict:
  """``example`` scale-cropped and flipped as ``window`` says (module
  docstring)."""
  check(example, scales, normal_interpolation)
  return {k: resample(k, x, window, scales=scales, normal_interpolation=normal_interpolation,
                      inverse_depth=inverse_depth) for k, x in example.items()}


def resample(field: str, x: jax.Array, window: Window, *, scales: Sequence[float] = SCALES,
             normal_interpolation: str = "nearest", inverse_depth: bool = False) -> jax.Array:
  """One field (:data:`FIELDS`) of one example ``[H, W(, C)]`` scale-cropped
  and flipped as ``window`` says, by that field's rule (module docstring;
  :func:`apply_window` checks the example first)."""
  scales = tuple(float(s) for s in scales)
  h, w = x.shape[:2]
  t = {k: jnp.asarray(v) for k, v in _tables(h, w, scales).items()}
  s = window.scale
  top, left = window.top, window.left

  def nearest(x):
    x = jnp.take(x, top + t["near_y"][s], axis=0, mode="clip")
    return jnp.take(x, left + t["near_x"][s], axis=1, mode="clip")

  def bilinear(x):
    fy = t["frac_y"][s][:, None, None].astype(x.dtype)
    x = ((1 - fy) * jnp.take(x, top + t["lo_y"][s], axis=0, mode="clip")
         + fy * jnp.take(x, top + t["hi_y"][s], axis=0, mode="clip"))
    fx = t["frac_x"][s][None, :, None].astype(x.dtype)
    return ((1 - fx) * jnp.take(x, left + t["lo_x"][s], axis=1, mode="clip")
            + fx * jnp.take(x, left + t["hi_x"][s], axis=1, mode="clip"))

  if field == "image" or (field == "normal" and normal_interpolation == "bilinear"):
    out = bilinear(x)
  else:
    out = nearest(x)
  if field == "depth":
    sc = jnp.asarray(scales, jnp.float32)[s].astype(out.dtype)
    out = out * sc if inverse_depth else out / sc
  flipped = hflip({field: out})[field]
  return jnp.where(window.flip, flipped, out)


def augment(key: jax.Array, example: dict, *, scales: Sequence[float] = SCALES,
            flip: bool = True, normal_interpolation: str = "nearest",
            inverse_depth: bool = False) -> dict:
  """One example randomly scale-cropped, then flipped with probability 1/2
  (``flip``), as a function of ``key`` (module docstring)."""
  h, w = check(example, scales, normal_interpolation)
  window = draw_window(key, (h, w), scales, flip)
  return apply_window(example, window, scales=scales,
                      normal_interpolation=normal_interpolation, inverse_depth=inverse_depth)


def augment_batch(key: jax.Array, batch: dict, *, scales: Sequence[float] = SCALES,
                  flip: bool = True, normal_interpolation: str = "nearest",
                  inverse_depth: bool = False) -> dict:
  """:func:`augment` of every example of ``batch`` (leading axis ``B``), example
  ``b`` with key ``jax.random.split(key, B)[b]``."""
  sizes = {k: x.shape[0] if x.ndim else None for k, x in batch.items()}
  if len(set(sizes.values())) != 1 or None in sizes.values():
    raise ValueError(f"augment_batch: every field needs the same leading batch axis; "
                     f"got {sizes}.")
  for k in (f for f in FIELDS if f in batch):
    x = batch[k]
    if x.ndim != _RANK[k] + 1:
      raise ValueError(f"augment_batch: {k} has shape {tuple(x.shape)}; a batch of "
                       f"{k} has {_RANK[k] + 1} axes.")
  keys = jax.random.split(key, next(iter(sizes.values())))
  fn = functools.partial(augment, scales=scales, flip=flip,
                         normal_interpolation=normal_interpolation,
                         inverse_depth=inverse_depth)
  return jax.vmap(fn)(keys, batch)


# ----------------------------------------------------------------------------
# In the train step: a step's batch, every slot's labels with its image.
# ----------------------------------------------------------------------------

OPS = ("scale_crop", "flip")
# The field whose rule a dense task kind's labels follow.
KIND_FIELDS = {"segmentation": "label", "depth": "depth", "normals": "normal"}


def parse_ops(spec: str) -> tuple[str, ...]:
  """``"scale_crop,flip"`` -> the operations (``""``: none); an unknown name
  raises, listing :data:`OPS`."""
  ops = tuple(o.strip() for o in str(spec).split(",") if o.strip())
  unknown = [o for o in ops if o not in OPS]
  if unknown or len(set(ops)) != len(ops):
    raise ValueError(f"augment={spec!r}: give a comma-separated subset of {OPS} "
                     "('' for none).")
  return ops


def augment_slots(key: jax.Array, x: jax.Array, ys: dict, kinds: dict, *, shared: bool,
                  ops: Sequence[str] = OPS, scales: Sequence[float] = SCALES,
                  normal_interpolation: str = "nearest",
                  inverse_depth: bool = False) -> tuple[jax.Array, dict]:
  """A train step's batch augmented: images ``x [B, H, W, 3]`` read by every
  slot (``shared``) or ``[K, B, H, W, 3]``, labels ``ys {group: [K, B, ...]}``
  of which the groups in ``kinds`` (``{group: dense kind}``) are per pixel
  (the others, per example, are left as they are). One window per image
  (``jax.random.split(key, B)``, or ``K * B`` without shared inputs), applied
  to the image and to every slot's labels of it, so an image and its labels
  stay aligned across the tasks that label it. ``ops``: ``scale_crop``
  (:data:`SCALES` or ``scales``) and/or ``flip``."""
  ops = parse_ops(",".join(ops))
  scales = tuple(float(s) for s in scales) if "scale_crop" in ops else (1.0,)
  lead = x.shape[:1] if shared else x.shape[:2]
  hw = x.shape[-3:-1]
  check({"image": jnp.zeros(x.shape[-3:], x.dtype)}, scales, normal_interpolation)
  keys = jax.random.split(key, math.prod(lead))
  windows = jax.vmap(lambda k: draw_window(k, hw, scales, "flip" in ops))(keys)
  windows = jax.tree.map(lambda a: a.reshape(lead), windows)
  kw = dict(scales=scales, normal_interpolation=normal_interpolation,
            inverse_depth=inverse_depth)

  def field_fn(field):
    one = functools.partial(resample, field, **kw)
    return lambda arr, win: one(arr, win)

  image = field_fn("image")
  if shared:
    x = jax.vmap(image)(x, windows)
  else:
    x = jax.vmap(jax.vmap(image))(x, windows)
  out = dict(ys)
  for g, kind in kinds.items():
    fn = field_fn(KIND_FIELDS[kind])
    if shared:   # [K, B, ...]: slot k's label of image b takes image b's window
      out[g] = jax.vmap(jax.vmap(fn), in_axes=(0, None))(ys[g], windows)
    else:
      out[g] = jax.vmap(jax.vmap(fn))(ys[g], windows)
  return x, out
