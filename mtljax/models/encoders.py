"""Encoders (trunks): MLP, a small CNN and a small fully convolutional network
(FCN: per-pixel features for the dense tasks), optionally conditioned on a
task descriptor ``z`` at chosen dense layers.

Conditioning of dense layer ``l`` with input ``h`` and descriptor ``z``
(a one-hot task id, ``[Z]``), names as in the parameter tree:

* ``concat``:         ``[h, z] @ kernel + bias``             kernel ``[D + Z, F]``
* ``additive``:       ``h @ kernel + bias + z @ z_kernel``    z_kernel ``[Z, F]``
* ``multiplicative``: ``(h @ kernel + bias) * (z @ z_gate)``  z_gate ``[Z, F]``,
  initialised to ones (every unit open for every task at init; a gate can
  switch units off per task, which interpolates between one shared network and
  per-task sub-networks).

``concat`` and ``additive`` are the same function: split the concat kernel
into its ``h`` rows (``kernel``) and its ``z`` rows (``z_kernel``).

Convolutions are shared and unconditioned; ``condition_layers`` index the dense
layers (``layer_0``, ``layer_1``, ...) that follow them.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

COND_MODES = ("concat", "additive", "multiplicative")


class CondDense(nn.Module):
  features: int
  mode: str | None = None

  @nn.compact
  def __call__(self, h, z=None):
    if self.mode is None or z is None:
      return self._dense(h)
    zb = jnp.broadcast_to(z, h.shape[:-1] + z.shape[-1:]).astype(h.dtype)
    if self.mode == "concat":
      return self._dense(jnp.concatenate([h, zb], axis=-1))
    y = self._dense(h)
    if self.mode == "additive":
      u = self.param("z_kernel", nn.initializers.lecun_normal(), (z.shape[-1], self.features))
      return y + zb @ u
    if self.mode == "multiplicative":
      u = self.param("z_gate", nn.initializers.ones, (z.shape[-1], self.features))
      return y * (zb @ u)
    raise ValueError(f"unknown conditioning mode {self.mode!r}; expected {COND_MODES}.")

  def _dense(self, h):
    k = self.param("kernel", nn.initializers.lecun_normal(), (h.shape[-1], self.features))
    b = self.param("bias", nn.initializers.zeros, (self.features,))
    return h @ k + b


class PatchConv(nn.Module):
  """A stride-1 SAME convolution as im2col (shifted slices) plus one matmul.

  Same parameters and outputs as ``nn.Conv(features, (k, k), padding="SAME")``
  (kernel ``[k, k, C_in, C_out]``, bias ``[C_out]``), but lowered to slices and
  a dot instead of an XLA convolution. On CPU this matters twice (measured in
  BUILD_NOTES.md): XLA:CPU runs convolutions several times slower inside loops
  (``lax.scan``), and vmapping per-task kernels (the ``independent``
  architecture) turns a convolution into a grouped one, which XLA:CPU runs
  poorly; a vmapped dot is a plain batched matmul.
  """
  features: int
  kernel_size: int = 3

  @nn.compact
  def __call__(self, x):  # [B, H, W, C]
    k = self.kernel_size
    c_in = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (k, k, c_in, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    lo = (k - 1) // 2
    xp = jnp.pad(x, ((0, 0), (lo, k - 1 - lo), (lo, k - 1 - lo), (0, 0)))
    h, w = x.shape[1], x.shape[2]
    patches = jnp.concatenate(
        [xp[:, i:i + h, j:j + w, :] for i in range(k) for j in range(k)], axis=-1)
    return patches @ kernel.reshape(k * k * c_in, self.features) + bias


class MLP(nn.Module):
  """Flattens the input, then ``len(hidden)`` ReLU dense layers."""
  hidden: Sequence[int]
  cond_mode: str | None = None
  cond_layers: Sequence[int] = ()

  @nn.compact
  def __call__(self, x, z=None):
    h = x.reshape(x.shape[0], -1)
    return _dense_stack(h, z, self.hidden, self.cond_mode, self.cond_layers)


class CNN(nn.Module):
  """3x3 SAME ReLU convolutions, each followed by 2x2 max-pooling where the
  feature map is at least 2x2, then flatten and ReLU dense layers."""
  channels: Sequence[int]
  hidden: Sequence[int]
  cond_mode: str | None = None
  cond_layers: Sequence[int] = ()

  @nn.compact
  def __call__(self, x, z=None):
    h = _conv_stack(x, self.channels, pool=True)
    h = h.reshape(h.shape[0], -1)
    return _dense_stack(h, z, self.hidden, self.cond_mode, self.cond_layers)


class FCN(nn.Module):
  """Per-pixel features for dense prediction: 3x3 SAME ReLU convolutions of
  ``channels`` (stride 1, no pooling: the map keeps the input's size), then
  ReLU dense layers of ``hidden`` applied at every pixel (1x1 convolutions).
  ``[B, H, W(, C)] -> [B, H, W, F]``. The small dense model that trains on the
  bundled rendered scenes on a CPU; the field's backbones (ResNet, SegNet)
  are their own modules."""
  channels: Sequence[int]
  hidden: Sequence[int]
  cond_mode: str | None = None
  cond_layers: Sequence[int] = ()

  @nn.compact
  def __call__(self, x, z=None):
    h = _conv_stack(x, self.channels, pool=False)
    return _dense_stack(h, z, self.hidden, self.cond_mode, self.cond_layers)


def _conv_stack(x, channels, pool: bool):
  """3x3 SAME ReLU convolutions ``conv_i`` (im2col), each followed by 2x2
  max-pooling where the map is at least 2x2 when ``pool`` (called inside the
  compact ``__call__`` of the module that owns them)."""
  h = x if x.ndim == 4 else x[..., None]  # [B, H, W] -> [B, H, W, 1]
  for i, c in enumerate(channels):
    h = nn.relu(PatchConv(c, 3, name=f"conv_{i}")(h))
    if pool and h.shape[1] >= 2 and h.shape[2] >= 2:
      h = nn.max_pool(h, (2, 2), strides=(2, 2))
  return h


def _dense_stack(h, z, hidden, mode, layers):
  for l, width in enumerate(hidden):
    cm = mode if l in layers else None
    h = nn.relu(CondDense(width, cm, name=f"layer_{l}")(h, z if cm else None))
  return h
