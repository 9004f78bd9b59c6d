"""Per-pixel losses of the dense task kinds, with their validity masks.

Three kinds (:data:`DENSE_KINDS`); a head outputs ``out [..., H, W, C]`` and
the labels ``y`` are (``...`` = any leading axes, e.g. ``[K, B]``):

* ``segmentation``: ``y [..., H, W]`` int class ids, ``-1`` = ignored pixel;
  ``out`` holds ``C = num_classes`` logits. Loss: softmax cross-entropy
  ``logsumexp(out) - out[y]``.
* ``depth``: ``y [..., H, W, 1]`` float, ``0`` = missing; ``out`` has ``C = 1``.
  Loss: ``|out - y|`` (L1).
* ``normals``: ``y [..., H, W, 3]`` float unit normals, all-zero = missing;
  ``out`` has ``C = 3``. Loss: ``1 - cos(out, y) = 1 - p^ . g^`` with
  ``p^ = out / |out|`` (the unit-normalised prediction) and ``g^ = y / |y|``.

**Normalisation at zero.** ``v^ = v / |v|`` where ``|v|^2 > 1e-24`` and ``0``
elsewhere, written so that neither value nor gradient is NaN: a zero
prediction has loss ``1 - 0 = 1`` and gradient 0 (it has no direction; the
published code divides by ``|p|`` and gets NaN there). The target is
normalised as well, so that ``cos`` is a cosine for any target; the data sets'
normals are unit (the published code's ``p^ . g`` is the same number then).

**Masks and the mean.** :func:`pixel_mask` says which pixels carry a label
(``y >= 0``; ``y != 0``; ``y`` not all-zero); :func:`pixel_loss` gives every
pixel a finite loss with finite gradients (missing labels are replaced by a
valid one first), so that masking by ``where`` gives exactly zero gradient
from missing pixels. :func:`masked_pixel_mean` then averages over **every
valid pixel of the batch** (the trailing ``(B, H, W)`` axes together):
``sum(mask * loss) / max(sum(mask), 1)`` -- 0, with gradient 0, when no pixel
is valid. That is the published code's reduction: LibMTL's
``nn.CrossEntropyLoss(ignore_index=-1)`` (a mean over the non-ignored pixels
of the batch), its ``DepthLoss``/``NormalLoss``
(``sum(|pred - gt| * mask) / count_nonzero(mask)`` over the batch tensor,
``examples/nyu/utils.py``), and MTAN's ``model_fit`` (``im2im_pred/utils.py``),
identical. It is not a mean of per-image means: an image with many valid
pixels weighs more. Missing *examples* (a whole image unlabelled for a task)
combine with missing pixels through ``example_mask`` (``[..., B]``).

**Which pixels the published code masks.** LibMTL and MTAN mark a normal
missing when the *sum* of its components is 0 (``torch.sum(gt, dim=1) != 0``),
not when all are 0; a unit normal whose components happen to sum to 0 is
dropped there. ``rule="published"`` in :func:`pixel_mask` reproduces that;
the default ``"exact"`` is the definition (all-zero = missing). For depth (one
channel) the two rules are the same.

**Labels out of range.** A segmentation label ``>= num_classes`` (or
``< -1``) is a data error: :func:`check_targets` refuses it on the host
(one line naming the file), the data readers' check. Inside a compiled step it
cannot raise; there its loss is that of class ``num_classes - 1`` (the index
is clipped) and it counts as valid, while the metrics drop it as the published
confusion matrices do (``k = (gt >= 0) & (gt < n)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtljax import errors

DENSE_KINDS = ("segmentation", "depth", "normals")
MASK_RULES = ("exact", "published")

# |v|^2 at or below this is "no direction" (unit_normalise returns 0 there).
_TINY_SQ = 1e-24


def out_channels(kind: str, num_classes: int = 0) -> int:
  """The head's channel count ``C`` for a dense kind."""
  _check_kind(kind)
  if kind == "segmentation":
    if num_classes < 2:
      raise ValueError(f"segmentation needs num_classes >= 2, got {num_classes}.")
    return num_classes
  return 1 if kind == "depth" else 3


def _check_kind(kind: str) -> None:
  if kind not in DENSE_KINDS:
    raise ValueError(f"unknown dense kind {kind!r}; expected one of {DENSE_KINDS}.")


def _check_rule(rule: str) -> None:
  if rule not in MASK_RULES:
    raise ValueError(f"unknown mask rule {rule!r}; expected one of {MASK_RULES}.")


def check_shapes(kind: str, out_shape, y_shape) -> None:
  """Refuse ``out``/``y`` shapes that do not fit ``kind`` (at trace time, so
  before anything compiles): one line naming both shapes."""
  _check_kind(kind)
  out_shape, y_shape = tuple(out_shape), tuple(y_shape)
  if len(out_shape) < 3:
    raise ValueError(f"{kind}: predictions must be [..., H, W, C], got shape {out_shape}.")
  want_c = {"depth": 1, "normals": 3}.get(kind)
  if want_c is not None and out_shape[-1] != want_c:
    raise ValueError(f"{kind}: predictions need {want_c} channel(s), got shape {out_shape}.")
  if kind == "segmentation":
    if out_shape[-1] < 2:
      raise ValueError(f"segmentation: predictions need >= 2 class logits, got shape "
                       f"{out_shape}.")
    want_y = out_shape[:-1]
  else:
    want_y = out_shape
  if y_shape != want_y:
    raise ValueError(f"{kind}: labels of shape {y_shape} do not fit predictions of shape "
                     f"{out_shape} (labels must be {want_y}).")


def unit_normalise(v: jax.Array) -> jax.Array:
  """``v / |v|`` over the last axis; 0 where ``|v|^2 <= 1e-24``, with finite
  (zero) gradient there (a double ``where``: no NaN from ``d|v|`` at 0)."""
  sq = jnp.sum(v * v, axis=-1, keepdims=True)
  ok = sq > _TINY_SQ
  inv = jax.lax.rsqrt(jnp.where(ok, sq, jnp.ones((), sq.dtype)))
  return jnp.where(ok, v * inv, jnp.zeros((), v.dtype))


def pixel_mask(kind: str, y: jax.Array, rule: str = "exact") -> jax.Array:
  """``[..., H, W]`` bool: which pixels of the labels ``y`` carry a label.

  ``segmentation``: ``y >= 0``; ``depth``: ``y != 0``; ``normals``: not
  all-zero (``rule="exact"``) or component sum ``!= 0`` (``rule="published"``,
  LibMTL's and MTAN's test; see the module docstring). Works on numpy and jax
  arrays alike.
  """
  _check_kind(kind)
  _check_rule(rule)
  xp = jnp if isinstance(y, jax.Array) else np
  if kind == "segmentation":
    return y >= 0
  if kind == "depth":
    return y[..., 0] != 0
  if rule == "published":
    return xp.sum(y, axis=-1) != 0
  return xp.any(y != 0, axis=-1)


def pixel_loss(kind: str, out: jax.Array, y: jax.Array) -> jax.Array:
  """``[..., H, W]`` per-pixel loss of ``out [..., H, W, C]`` against ``y``.

  Finite, with finite gradients, at every pixel, missing ones included (their
  labels are replaced by class 0 / depth 0 / a zero normal, whose losses are
  finite); mask them with :func:`pixel_mask` and :func:`masked_pixel_mean`.
  """
  check_shapes(kind, out.shape, y.shape)
  if kind == "segmentation":
    c = out.shape[-1]
    yi = jnp.clip(y.astype(jnp.int32), 0, c - 1)  # -1 (ignored) -> 0; see docstring
    logz = jax.nn.logsumexp(out, axis=-1)
    picked = jnp.take_along_axis(out, yi[..., None], axis=-1)[..., 0]
    return logz - picked
  if kind == "depth":
    return jnp.abs(out[..., 0] - y[..., 0].astype(out.dtype))
  p = unit_normalise(out)
  g = unit_normalise(y.astype(out.dtype))
  return 1.0 - jnp.sum(p * g, axis=-1)


def masked_pixel_mean(values: jax.Array, mask: jax.Array,
                      example_mask: jax.Array | None = None) -> jax.Array:
  """``[...]`` mean of ``values [..., B, H, W]`` over the valid pixels of the
  batch (``mask [..., B, H, W]``, and ``example_mask [..., B]`` when given:
  a pixel counts when both hold). 0 with gradient 0 when none is valid.
  """
  if values.ndim < 3 or mask.shape != values.shape:
    raise ValueError(f"masked_pixel_mean: values {values.shape} and mask {mask.shape} must "
                     "both be [..., B, H, W].")
  if example_mask is not None:
    if example_mask.shape != values.shape[:-2]:
      raise ValueError(f"masked_pixel_mean: example_mask {example_mask.shape} must be "
                       f"{values.shape[:-2]} ([..., B]).")
    mask = mask & example_mask[..., None, None]
  axes = (-3, -2, -1)
  total = jnp.sum(jnp.where(mask, values, jnp.zeros((), values.dtype)), axis=axes)
  count = jnp.sum(mask.astype(values.dtype), axis=axes)
  return total * (1.0 / jnp.maximum(count, jnp.ones((), values.dtype)))


def batch_loss(kind: str, out: jax.Array, y: jax.Array,
               example_mask: jax.Array | None = None, rule: str = "exact") -> jax.Array:
  """``[...]`` the loss of a batch: :func:`pixel_loss` averaged over the
  batch's valid pixels (:func:`masked_pixel_mean`); ``out [..., B, H, W, C]``."""
  return masked_pixel_mean(pixel_loss(kind, out, y), pixel_mask(kind, y, rule), example_mask)


def check_targets(kind: str, y: np.ndarray, num_classes: int = 0, where: str = "",
                  normal_tol: float = 1e-3) -> None:
  """Refuse labels a dense task cannot use, on the host (numpy), with one line
  naming ``where`` (the file): segmentation ids outside ``[-1, num_classes)``
  or not integers; depth non-finite or negative; normals non-finite, or
  neither all-zero (missing) nor unit within ``normal_tol``.

  Raises:
    mtljax.errors.DataError
  """
  _check_kind(kind)
  y = np.asarray(y)
  at = f"{where}: " if where else ""
  if kind == "segmentation":
    if num_classes < 2:
      raise ValueError(f"check_targets: segmentation needs num_classes >= 2, got {num_classes}.")
    if y.dtype.kind == "f":
      if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
        raise errors.DataError(f"{at}segmentation labels must be integers (-1 = ignored); "
                               "found non-integer values.")
    elif y.dtype.kind not in "iu":
      raise errors.DataError(f"{at}segmentation labels must be integers, got dtype {y.dtype}.")
    bad = (y < -1) | (y >= num_classes)
    if np.any(bad):
      v = y[bad].flat[0]
      raise errors.DataError(f"{at}segmentation label {v} outside [-1, {num_classes}) "
                             f"(-1 = ignored, {num_classes} classes).")
    return
  if not np.all(np.isfinite(y)):
    raise errors.DataError(f"{at}{kind} holds NaN or infinite values.")
  if kind == "depth":
    if np.any(y < 0):
      raise errors.DataError(f"{at}depth holds negative values (0 = missing).")
    return
  n = np.sqrt(np.sum(np.asarray(y, np.float64) ** 2, axis=-1))
  bad = (n != 0) & (np.abs(n - 1) > normal_tol)
  if np.any(bad):
    raise errors.DataError(f"{at}normals must be unit vectors (or all-zero = missing); found "
                           f"norm {n[bad].flat[0]:.4g}.")
