"""Layers of the dense backbones: a 2-D convolution with a choice of
implementation, batch norm with torch's semantics (optionally synchronised
over a named data axis), group norm, and bilinear resizing with torch's two
corner conventions. Images are NHWC, kernels HWIO (``[kh, kw, C_in, C_out]``).

Convolution (:func:`conv2d`, :class:`Conv`)
-------------------------------------------
With input ``x[b, h, w, c]``, kernel ``K[i, j, c, f]``, stride ``s``,
dilation ``d`` and the input zero-padded by ``(p_lo, p_hi)`` per spatial dim,

  ``y[b, u, v, f] = sum_{i, j, c} xp[b, s*u + d*i, s*v + d*j, c] K[i, j, c, f]``

with ``H_out = (H + p_lo + p_hi - d*(kh - 1) - 1) // s + 1`` (torch's
``Conv2d`` with ``padding=p`` is ``p_lo = p_hi = p``). Two implementations,
equal up to float rounding:

* ``"lax"``: ``lax.conv_general_dilated`` (cuDNN on GPU, the TPU convolution
  unit: the fast path there).
* ``"im2col"``: the ``kh*kw`` shifted, strided slices ``xp[:, d*i::s, d*j::s]``
  concatenated on the channel axis (index ``(i*kw + j)*C + c``, the row-major
  flattening of ``K``'s first three axes) and one matmul with
  ``K.reshape(kh*kw*C, F)``. XLA:CPU runs this faster than its convolution in
  the backbones here (the table in ``docs/notes/backbones-resnet.md``,
  ``experiments/bench_backbones.py``), and a vmapped dot is a batched matmul
  where a vmapped convolution becomes a grouped one.

``conv_impl="auto"`` picks ``"im2col"`` on the CPU backend and ``"lax"`` on
every other (:func:`resolve_conv_impl`); ``"im2col"`` / ``"lax"`` force one.
Only ``groups = 1``.

Batch norm (:class:`BatchNorm`), torch's ``BatchNorm2d`` semantics
-----------------------------------------------------------------
Over the ``n = B*H*W`` values of a channel (``n`` summed over the devices of
``axis_name`` when given: synchronised batch norm, every device normalising
with the statistics of the global batch, as ``torch.nn.SyncBatchNorm``)

  ``mu = mean(x)``, ``s2 = mean((x - mu)^2)`` (biased),
  ``y = (x - mu) / sqrt(s2 + eps) * scale + bias``            (train mode)
  ``running_mean <- (1 - m) running_mean + m mu``
  ``running_var  <- (1 - m) running_var  + m s2 * n / (n - 1)`` (unbiased)
  ``y = (x - running_mean) / sqrt(running_var + eps) * scale + bias`` (eval)

with torch's ``momentum m = 0.1`` and ``eps = 1e-5`` (flax's ``nn.BatchNorm``
differs: its ``momentum`` is ``1 - m`` and its running variance is the biased
one). ``scale`` / ``bias`` are parameters (init 1 / 0), ``mean`` / ``var``
live in the ``"batch_stats"`` collection (init 0 / 1); the statistics are
updated only in train mode and not while initialising, so ``apply(...,
train=True, mutable=["batch_stats"])`` returns the new running averages and
``train=False`` reads them. Statistics are computed in float32 at least. A
train-mode call with one value per channel (batch 1 into the ASPP's image
pooling) is refused, as torch refuses it.
Under ``axis_name`` every device must hold the same number of examples.

Group norm (:class:`GroupNorm`)
-------------------------------
``torch.nn.GroupNorm``: the ``C`` channels split into ``G`` groups of
consecutive channels, each normalised over ``(H, W, C/G)`` per example with
the biased variance and ``eps = 1e-5``, then a per-channel affine. No state;
the same in train and eval mode. :func:`norm_layer` builds either from the
``norm="batch"|"group"`` config value.

Resizing (:func:`resize_bilinear`)
----------------------------------
``torch.nn.functional.interpolate(mode="bilinear")`` as two interpolation
matrices (``y = R_h x R_w^T`` per channel). Output pixel ``o`` reads source
coordinate ``o*(n_in - 1)/(n_out - 1)`` with ``align_corners=True`` and
``max(0, (o + 0.5)*n_in/n_out - 0.5)`` with ``align_corners=False`` (torch's
half-pixel rule, clamped at 0), linear between the two neighbouring source
pixels, the upper one clamped to ``n_in - 1``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CONV_IMPLS = ("auto", "im2col", "lax")
NORMS = ("batch", "group")

Padding = int | tuple[int, int] | Sequence[tuple[int, int]]


def resolve_conv_impl(impl: str, backend: str | None = None) -> str:
  """``"im2col"`` or ``"lax"``: ``impl`` itself, or for ``"auto"``
  ``"im2col"`` on the CPU backend and ``"lax"`` on GPU/TPU (``backend``:
  the backend to decide for, default ``jax.default_backend()``)."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  backend = backend or jax.default_backend()
  return "im2col" if backend == "cpu" else "lax"


def _pair(v, what: str) -> tuple[int, int]:
  if isinstance(v, (int, np.integer)):
    v = (int(v), int(v))
  v = tuple(int(a) for a in v)
  if len(v) != 2 or min(v) < 1:
    raise ValueError(f"{what} must be a positive int or a pair of them, got {v!r}")
  return v


def _padding(padding: Padding) -> tuple[tuple[int, int], tuple[int, int]]:
  """torch's ``padding`` (an int, ``(ph, pw)``) or explicit ``((lo, hi), (lo, hi))``."""
  if isinstance(padding, (int, np.integer)):
    return ((int(padding),) * 2,) * 2
  p = tuple(padding)
  if len(p) == 2 and all(isinstance(a, (int, np.integer)) for a in p):
    return ((int(p[0]),) * 2, (int(p[1]),) * 2)
  if len(p) == 2 and all(len(a) == 2 for a in p):
    out = tuple((int(a[0]), int(a[1])) for a in p)
    if min(min(a) for a in out) < 0:
      raise ValueError(f"padding must be >= 0, got {padding!r}")
    return out
  raise ValueError(f"padding must be an int, (ph, pw) or ((lo, hi), (lo, hi)), got {padding!r}")


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int | Sequence[int] = 1,
           dilation: int | Sequence[int] = 1, padding: Padding = 0,
           impl: str = "auto") -> jax.Array:
  """``x [B, H, W, C] * kernel [kh, kw, C, F] -> [B, H_out, W_out, F]``
  (the formula in the module docstring); ``impl`` ``"auto"|"im2col"|"lax"``."""
  impl = resolve_conv_impl(impl)
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(f"conv2d takes x [B, H, W, C] and kernel [kh, kw, C, F], "
                     f"got shapes {x.shape} and {kernel.shape}")
  if x.shape[-1] != kernel.shape[2]:
    raise ValueError(f"conv2d: x has {x.shape[-1]} channels, the kernel expects "
                     f"{kernel.shape[2]} (only groups=1 is supported)")
  s, d, pad = _pair(stride, "stride"), _pair(dilation, "dilation"), _padding(padding)
  kh, kw, c, f = kernel.shape
  h_out = (x.shape[1] + sum(pad[0]) - d[0] * (kh - 1) - 1) // s[0] + 1
  w_out = (x.shape[2] + sum(pad[1]) - d[1] * (kw - 1) - 1) // s[1] + 1
  if h_out < 1 or w_out < 1:
    raise ValueError(f"conv2d: input {x.shape[1]}x{x.shape[2]} is smaller than the "
                     f"dilated {kh}x{kw} kernel (dilation {d}, padding {pad})")
  if impl == "lax":
    return lax.conv_general_dilated(
        x, kernel.astype(x.dtype), window_strides=s, padding=pad, rhs_dilation=d,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  xp = jnp.pad(x, ((0, 0), pad[0], pad[1], (0, 0))) if any(map(sum, pad)) else x
  cols = [
      lax.slice(xp, (0, d[0] * i, d[1] * j, 0),
                (xp.shape[0], d[0] * i + s[0] * (h_out - 1) + 1,
                 d[1] * j + s[1] * (w_out - 1) + 1, c),
                (1, s[0], s[1], 1))
      for i in range(kh) for j in range(kw)]
  patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
  return patches @ kernel.reshape(kh * kw * c, f).astype(x.dtype)


def torch_kaiming_normal_fan_out(key, shape, dtype=jnp.float32):
  """torchvision's ResNet conv init (``kaiming_normal_(mode="fan_out",
  nonlinearity="relu")``): N(0, 2 / (kh*kw*C_out)) for an HWIO kernel."""
  fan_out = shape[0] * shape[1] * shape[3]
  return jax.random.normal(key, shape, dtype) * jnp.sqrt(2.0 / fan_out).astype(dtype)


class Conv(nn.Module):
  """A 2-D convolution (:func:`conv2d`), torch's ``Conv2d`` arguments.

  Parameters ``kernel [kh, kw, C_in, features]`` and, with ``use_bias``,
  ``bias [features]``. ``padding=None`` is torch's usual "same" padding for
  odd kernels, ``dilation * (k - 1) // 2`` on each side.
  """
  features: int
  kernel_size: int | tuple[int, int] = 3
  stride: int | tuple[int, int] = 1
  dilation: int | tuple[int, int] = 1
  padding: Padding | None = None
  use_bias: bool = False
  conv_impl: str = "auto"
  kernel_init: Callable[..., Any] = torch_kaiming_normal_fan_out
  bias_init: Callable[..., Any] = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = _pair(self.kernel_size, "kernel_size")
    d = _pair(self.dilation, "dilation")
    pad = self.padding
    if pad is None:
      pad = (d[0] * (kh - 1) // 2, d[1] * (kw - 1) // 2)
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features))
    y = conv2d(x, kernel, stride=self.stride, dilation=d, padding=pad, impl=self.conv_impl)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,)).astype(y.dtype)
    return y


class BatchNorm(nn.Module):
  """Batch norm over the last (channel) axis with torch's semantics (module
  docstring): ``momentum`` is torch's (weight of the new batch), the running
  variance is unbiased. ``axis_name``: reduce the statistics over that named
  axis too (synchronised batch norm under ``vmap`` / ``shard_map`` /
  ``pmap``). ``__call__(x, train)``: batch statistics (and, unless
  initialising, running-average updates) with ``train=True``, the running
  averages with ``train=False``."""
  momentum: float = 0.1
  epsilon: float = 1e-5
  axis_name: str | None = None
  scale_init: Callable[..., Any] = nn.initializers.ones
  bias_init: Callable[..., Any] = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c = x.shape[-1]
    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), stat_dtype))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), stat_dtype))
    scale = self.param("scale", self.scale_init, (c,))
    bias = self.param("bias", self.bias_init, (c,))
    if train:
      axes = tuple(range(x.ndim - 1))
      xf = x.astype(stat_dtype)
      n = int(np.prod([x.shape[a] for a in axes]))
      if n == 1 and self.axis_name is None:
        raise ValueError(f"BatchNorm in train mode needs more than one value per channel, "
                         f"got input shape {x.shape} (torch refuses the same; with batch "
                         "size 1 use norm='group' or a larger batch)")
      mean = jnp.mean(xf, axes)
      if self.axis_name is not None:
        mean = lax.pmean(mean, self.axis_name)
        n = n * lax.psum(1, self.axis_name)
      var = jnp.mean(jnp.square(xf - mean), axes)
      if self.axis_name is not None:
        var = lax.pmean(var, self.axis_name)
      if not self.is_initializing():
        m = self.momentum
        unbias = n / jnp.maximum(n - 1, 1)  # n is traced under some transforms
        ra_mean.value = (1 - m) * ra_mean.value + m * mean
        ra_var.value = (1 - m) * ra_var.value + m * var * unbias
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = lax.rsqrt(var + self.epsilon) * scale
    return ((x.astype(stat_dtype) - mean) * mul + bias).astype(x.dtype)


class GroupNorm(nn.Module):
  """torch's ``GroupNorm(num_groups, C)`` over the last (channel) axis:
  groups of consecutive channels, biased variance, per-channel affine
  ``scale`` / ``bias``. ``train`` is accepted and ignored (no state)."""
  num_groups: int = 32
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {c} channels do not split into "
                       f"{self.num_groups} groups")
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    g = x.astype(stat_dtype).reshape(x.shape[:-1] + (self.num_groups, c // self.num_groups))
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    mean = jnp.mean(g, axes, keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axes, keepdims=True)
    y = ((g - mean) * lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    return (y * scale + bias).astype(x.dtype)


def norm_layer(norm: str = "batch", *, axis_name: str | None = None,
               num_groups: int = 32, momentum: float = 0.1,
               epsilon: float = 1e-5) -> Callable[..., nn.Module]:
  """A constructor ``make(name=..., scale_init=...)`` of the normalisation
  ``norm`` (``"batch"``: :class:`BatchNorm` with ``axis_name``, ``momentum``;
  ``"group"``: :class:`GroupNorm` with ``num_groups``). The modules are
  called as ``layer(x, train)``."""
  if norm == "batch":
    def make(name=None, scale_init=nn.initializers.ones):
      return BatchNorm(momentum=momentum, epsilon=epsilon, axis_name=axis_name,
                       scale_init=scale_init, name=name)
    return make
  if norm == "group":
    if axis_name is not None:
      raise ValueError("norm='group' has no cross-device statistics; axis_name "
                       "applies to norm='batch' only")
    def make_g(name=None, scale_init=nn.initializers.ones):
      if scale_init is not nn.initializers.ones:
        raise ValueError("GroupNorm here initialises its scale to ones only")
      return GroupNorm(num_groups=num_groups, epsilon=epsilon, name=name)
    return make_g
  raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _interp_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
  """``R [n_out, n_in]`` with ``y = R x`` torch's 1-D linear interpolation."""
  o = np.arange(n_out, dtype=np.float64)
  if align_corners:
    src = o * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros_like(o)
  else:
    src = np.maximum((o + 0.5) * (n_in / n_out) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  r = np.zeros((n_out, n_in))
  np.add.at(r, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(r, (np.arange(n_out), hi), frac)
  return r


def resize_bilinear(x: jax.Array, size: tuple[int, int], *,
                    align_corners: bool) -> jax.Array:
  """``x [B, H, W, C] -> [B, size[0], size[1], C]`` as torch's
  ``F.interpolate(mode="bilinear", align_corners=...)`` (module docstring).
  LibMTL upsamples its heads' outputs to the image with
  ``align_corners=True``; its ASPP pooling branch uses ``False``."""
  h, w = x.shape[1], x.shape[2]
  if (h, w) == tuple(size):
    return x
  rh = jnp.asarray(_interp_matrix(h, size[0], align_corners), x.dtype)
  rw = jnp.asarray(_interp_matrix(w, size[1], align_corners), x.dtype)
  return jnp.einsum("oh,bhwc,pw->bopc", rh, x, rw)
