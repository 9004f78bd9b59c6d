"""ResNet-18/34/50 as torchvision's, the dilated output-stride-8 variant of
LibMTL's ``resnet_dilated``, and LibMTL's DeepLab ASPP head.

Interface (flax linen, NHWC float input, images already normalised):

* ``ResNet(depth=18|34|50, output_stride=32|16|8, num_classes=None,
  norm="batch"|"group", axis_name=None, conv_impl="auto",
  zero_init_residual=False)``; ``__call__(x, train=False)`` returns a dict of
  the stage features by name, ``{"stem", "layer1", ..., "layer4"}`` (plus
  ``"logits"`` with ``num_classes``); the parameter / batch-stats trees have
  the same top-level names (plus ``"fc"``), so fine-tuning addresses stages
  as ``params["layer3"]``. :data:`STAGES` lists them input to output.
* ``DeepLabHead(num_outputs, rates=(12, 24, 36), channels=256, dropout=0.5,
  norm=..., axis_name=..., conv_impl=...)``; ``__call__(features, train=False,
  out_size=None, align_corners=True)`` returns ``[B, H, W, num_outputs]``,
  bilinearly resized to ``out_size`` when given. With ``train=True`` and
  ``dropout > 0`` the apply needs ``rngs={"dropout": key}``.

Training: ``apply(variables, x, train=True, mutable=["batch_stats"])``
returns ``(features, {"batch_stats": new})`` (:mod:`.layers` has the batch
norm's torch semantics); evaluation: ``apply(variables, x, train=False)``.

The network (torchvision ``resnet.py``, "v1.5": the stride of a bottleneck
block sits on its 3x3 convolution)
----------------------------------------------------------------------
``stem``: conv 7x7/2 (pad 3, no bias), BN, ReLU, max-pool 3x3/2 (pad 1, padding
never wins the max) -- the stem feature is the max-pool's output, at 1/4 of the
input. ``layer1..4``: 64, 128, 256, 512 planes, ``(2, 2, 2, 2)`` basic blocks
(ResNet-18), ``(3, 4, 6, 3)`` basic (34) or bottleneck blocks (50, expansion
4); ``layer2..4`` halve the resolution in their first block.

* basic block: ``relu(bn2(conv3x3(relu(bn1(conv3x3/s(x))))) + sc(x))``
* bottleneck: ``relu(bn3(conv1x1(relu(bn2(conv3x3/s(relu(bn1(conv1x1(x))))))))
  + sc(x))``

with ``sc`` the identity, or ``bn(conv1x1/s(x))`` (``downsample_conv``,
``downsample_bn``) where the stride or the width changes. Convolutions have no
bias. ``logits = fc(mean_{H,W} layer4)`` with ``num_classes``. Init as
torchvision: convolution kernels N(0, 2 / (k*k*C_out)), BN scale 1 / bias 0,
``fc`` U(+-1/sqrt(C)); ``zero_init_residual`` zeroes the last BN's scale of
each block (off by default, like torchvision).

Dilation (LibMTL's ``ResnetDilated._nostride_dilate``, matched exactly)
---------------------------------------------------------------------
``output_stride=8`` applies ``dilate=2`` to ``layer3`` and ``dilate=4`` to
``layer4`` (``16``: ``dilate=2`` to ``layer4`` only): in those stages every
stride-2 convolution becomes stride 1, a 3x3 one that was strided gets
dilation ``dilate // 2``, every other 3x3 gets ``dilate``; padding equals the
dilation. So at output stride 8 the stages' 3x3 dilations are, per block,

* ResNet-50 (one 3x3 per block): layer3 ``1, 2, 2, ...``, layer4 ``2, 4, 4``
  -- the same as torchvision's ``replace_stride_with_dilation=[False, True,
  True]``;
* ResNet-18/34 (``(conv1, conv2)`` per block): layer3 ``(1, 2), (2, 2), ...``,
  layer4 ``(2, 4), (4, 4), ...`` -- torchvision refuses dilation in basic
  blocks; the second conv of a stage's first block gets the stage's full
  dilation in LibMTL, which is what is matched here.

The 1x1 downsample projections lose their stride and stay undilated. The
parameters do not depend on the output stride: ImageNet weights load into
any of them.

DeepLab head (LibMTL ``examples/nyu/aspp.py``, torchvision's DeepLabV3 head)
---------------------------------------------------------------------------
ASPP with ``channels = 256``: five branches on the features -- ``branch0``
1x1 conv; ``branch1..3`` 3x3 convs with dilation = padding = ``rates`` (12,
24, 36); ``pool``: global average, 1x1 conv, BN, ReLU, resized back to the
feature size (a constant: torch's ``align_corners=False`` resize of a 1x1 map
is a broadcast) -- each conv without bias and followed by BN and ReLU;
concatenated (1280 channels) and projected by ``project`` (1x1 conv, BN,
ReLU, dropout 0.5). Then ``head`` (3x3 conv to 256 without bias, BN, ReLU) and
``classifier`` 1x1 with bias to ``num_outputs``. The head's convolutions have
torch's default init (kaiming-uniform with ``a = sqrt(5)``: U(+-1/sqrt(fan_in))
for kernel and bias), as LibMTL leaves them. LibMTL's trainer resizes the
head's output to the image size (288x384 on NYUv2) with bilinear
``align_corners=True`` (``process_preds``), in training and evaluation: that
is ``out_size`` with the default ``align_corners=True`` here.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtljax.models.backbones import layers

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
          50: ("bottleneck", (3, 4, 6, 3))}
OUTPUT_STRIDES = (8, 16, 32)
EXPANSION = {"basic": 1, "bottleneck": 4}


def torch_default_init(fan_in_axes: Sequence[int]):
  """torch's default ``Conv2d`` / ``Linear`` init, kaiming-uniform with
  ``a = sqrt(5)``: U(-b, b) with ``b = 1/sqrt(fan_in)``, fan-in the product
  of the kernel's ``fan_in_axes`` (also used for the bias, given the kernel's
  fan-in through ``fan_in``)."""
  def init(key, shape, dtype=jnp.float32):
    fan_in = 1
    for a in fan_in_axes:
      fan_in *= shape[a]
    b = 1.0 / jnp.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -b, b)
  return init


def _bias_init(fan_in: int):
  def init(key, shape, dtype=jnp.float32):
    b = 1.0 / jnp.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -b, b)
  return init


def stage_dilations(kind: str, blocks: int, dilate: int) -> tuple[tuple[int, ...], ...]:
  """Per block, the dilations of its 3x3 convolutions (basic: ``(conv1,
  conv2)``, bottleneck: ``(conv2,)``) in a stage that LibMTL dilates by
  ``dilate`` (1: not dilated) -- the module docstring's rule."""
  first = dilate // 2 if dilate > 1 else 1
  if kind == "basic":
    return ((first, dilate),) + ((dilate, dilate),) * (blocks - 1)
  return ((first,),) + ((dilate,),) * (blocks - 1)


class _Block(nn.Module):
  kind: str            # "basic" | "bottleneck"
  planes: int
  stride: int
  dilations: tuple[int, ...]
  downsample: bool
  norm: str = "batch"
  axis_name: str | None = None
  conv_impl: str = "auto"
  zero_init_residual: bool = False
  # The convolutions' kernel init; None: torchvision's ResNet init (kaiming
  # normal, fan out). LibMTL's MTAN builds its attention blocks outside the
  # ResNet, so they keep torch's default init (``torch_default_init``).
  kernel_init: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    make_norm = layers.norm_layer(self.norm, axis_name=self.axis_name)
    last_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    init = {} if self.kernel_init is None else {"kernel_init": self.kernel_init}
    conv = lambda f, k, s, d, name: layers.Conv(  # noqa: E731
        f, k, stride=s, dilation=d, conv_impl=self.conv_impl, name=name, **init)
    if self.kind == "basic":
      out_ch = self.planes
      h = conv(self.planes, 3, self.stride, self.dilations[0], "conv1")(x)
      h = nn.relu(make_norm(name="bn1")(h, train))
      h = conv(self.planes, 3, 1, self.dilations[1], "conv2")(h)
      h = make_norm(name="bn2", scale_init=last_init)(h, train)
    else:
      out_ch = self.planes * 4
      h = conv(self.planes, 1, 1, 1, "conv1")(x)
      h = nn.relu(make_norm(name="bn1")(h, train))
      h = conv(self.planes, 3, self.stride, self.dilations[0], "conv2")(h)
      h = nn.relu(make_norm(name="bn2")(h, train))
      h = conv(out_ch, 1, 1, 1, "conv3")(h)
      h = make_norm(name="bn3", scale_init=last_init)(h, train)
    sc = x
    if self.downsample:
      sc = conv(out_ch, 1, self.stride, 1, "downsample_conv")(x)
      sc = make_norm(name="downsample_bn")(sc, train)
    return nn.relu(h + sc)


class _Stage(nn.Module):
  kind: str
  planes: int
  blocks: int
  stride: int
  dilate: int
  in_channels: int
  norm: str = "batch"
  axis_name: str | None = None
  conv_impl: str = "auto"
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False, penultimate: bool = False):
    """The stage's output; with ``penultimate``, ``(output, the input of its
    last block)`` (what LibMTL's MTAN attends: ``layer[:-1]`` and ``layer[-1]``)."""
    stride = 1 if self.dilate > 1 else self.stride
    out_ch = self.planes * EXPANSION[self.kind]
    pre = x
    for i, dil in enumerate(stage_dilations(self.kind, self.blocks, self.dilate)):
      pre = x
      x = _Block(self.kind, self.planes, stride if i == 0 else 1, dil,
                 downsample=(i == 0 and (self.stride != 1 or self.in_channels != out_ch)),
                 norm=self.norm, axis_name=self.axis_name, conv_impl=self.conv_impl,
                 zero_init_residual=self.zero_init_residual, name=f"block{i}")(x, train)
    return (x, pre) if penultimate else x


def stage_modules(depth: int, output_stride: int, *, norm: str = "batch",
                  axis_name: str | None = None, conv_impl: str = "auto",
                  zero_init_residual: bool = False) -> dict[str, nn.Module]:
  """The ResNet's stages as modules, ``{"stem", "layer1", ..., "layer4"}``:
  made inside :class:`ResNet` (its submodules) or outside it, where each one
  applies to ``params[stage]`` of a ResNet's parameters (the per-stage
  architectures: MTAN and cross-stitch over ResNet stages)."""
  kind, counts = DEPTHS[depth]
  dilate = {32: (1, 1), 16: (1, 2), 8: (2, 4)}[output_stride]
  common = dict(norm=norm, axis_name=axis_name, conv_impl=conv_impl)
  out, in_ch = {"stem": _Stem(**common, name="stem")}, 64
  for s, (planes, n) in enumerate(zip((64, 128, 256, 512), counts)):
    out[f"layer{s + 1}"] = _Stage(kind, planes, n, stride=1 if s == 0 else 2,
                                  dilate=(1, 1, dilate[0], dilate[1])[s], in_channels=in_ch,
                                  zero_init_residual=zero_init_residual, **common,
                                  name=f"layer{s + 1}")
    in_ch = planes * EXPANSION[kind]
  return out


class _Stem(nn.Module):
  norm: str = "batch"
  axis_name: str | None = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = layers.Conv(64, 7, stride=2, padding=3, conv_impl=self.conv_impl, name="conv1")(x)
    h = nn.relu(layers.norm_layer(self.norm, axis_name=self.axis_name)(name="bn1")(h, train))
    return nn.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ResNet(nn.Module):
  """torchvision's ResNet-18/34/50, optionally dilated as LibMTL's
  ``resnet_dilated`` (module docstring). ``__call__(x [B, H, W, 3], train)``
  returns ``{"stem", "layer1", "layer2", "layer3", "layer4"}`` (and
  ``"logits"`` with ``num_classes``)."""
  depth: int = 50
  output_stride: int = 32
  num_classes: int | None = None
  norm: str = "batch"
  axis_name: str | None = None
  conv_impl: str = "auto"
  zero_init_residual: bool = False

  def _check(self):
    if self.depth not in DEPTHS:
      raise ValueError(f"ResNet depth must be one of {tuple(DEPTHS)}, got {self.depth!r}")
    if self.output_stride not in OUTPUT_STRIDES:
      raise ValueError(f"ResNet output_stride must be one of {OUTPUT_STRIDES}, "
                       f"got {self.output_stride!r}")
    layers.resolve_conv_impl(self.conv_impl, "cpu")
    layers.norm_layer(self.norm, axis_name=self.axis_name)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    self._check()
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"ResNet takes images [B, H, W, 3], got shape {x.shape}")
    modules = stage_modules(self.depth, self.output_stride, norm=self.norm,
                            axis_name=self.axis_name, conv_impl=self.conv_impl,
                            zero_init_residual=self.zero_init_residual)
    out, h = {}, x
    for name in STAGES:
      h = out[name] = modules[name](h, train)
    in_ch = self.feature_channels
    if self.num_classes is not None:
      pooled = jnp.mean(h, axis=(1, 2))
      out["logits"] = nn.Dense(self.num_classes, kernel_init=torch_default_init((0,)),
                               bias_init=_bias_init(in_ch), name="fc")(pooled)
    return out

  @property
  def feature_channels(self) -> int:
    """Channels of ``layer4`` (512 for ResNet-18/34, 2048 for ResNet-50)."""
    kind, _ = DEPTHS[self.depth]
    return 512 * EXPANSION[kind]


class DeepLabHead(nn.Module):
  """LibMTL's ``DeepLabHead`` (ASPP, 3x3 conv, BN, ReLU, 1x1 classifier; the
  module docstring). ``__call__(features, train, out_size=None,
  align_corners=True)``."""
  num_outputs: int
  rates: tuple[int, ...] = (12, 24, 36)
  channels: int = 256
  dropout: float = 0.5
  norm: str = "batch"
  axis_name: str | None = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               out_size: tuple[int, int] | None = None,
               align_corners: bool = True) -> jax.Array:
    if not 0 <= self.dropout < 1:
      raise ValueError(f"DeepLabHead dropout must be in [0, 1), got {self.dropout!r}")
    make_norm = layers.norm_layer(self.norm, axis_name=self.axis_name)
    c = self.channels

    def cbr(h, k, d, name, features=c):
      h = layers.Conv(features, k, dilation=d, conv_impl=self.conv_impl,
                      kernel_init=torch_default_init((0, 1, 2)), name=f"{name}_conv")(h)
      return nn.relu(make_norm(name=f"{name}_bn")(h, train))

    branches = [cbr(x, 1, 1, "branch0")]
    branches += [cbr(x, 3, r, f"branch{i + 1}") for i, r in enumerate(self.rates)]
    pooled = cbr(jnp.mean(x, axis=(1, 2), keepdims=True), 1, 1, "pool")
    branches.append(jnp.broadcast_to(pooled, x.shape[:3] + (c,)))
    h = cbr(jnp.concatenate(branches, axis=-1), 1, 1, "project")
    h = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0)(h)
    h = cbr(h, 3, 1, "head")
    h = layers.Conv(self.num_outputs, 1, use_bias=True, conv_impl=self.conv_impl,
                    kernel_init=torch_default_init((0, 1, 2)),
                    bias_init=_bias_init(c), name="classifier")(h)
    if out_size is not None:
      h = layers.resize_bilinear(h, tuple(out_size), align_corners=align_corners)
    return h
