"""SegNet and MTAN-over-SegNet: the dense-prediction models of the MTAN paper
(Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR
2019), written from its published code (github.com/lorenmt/mtan,
``im2im_pred/model_segnet_{single,split,mtan}.py``), as flax modules used as
pure functions of ``{"params", "batch_stats"}``.

**SegNet** (shared, task-independent). Widths ``f = (f_0..f_4)`` (the code's
``filter = [64, 128, 256, 512, 512]``). A *block* is 3x3 conv (padding 1,
bias) -> BatchNorm -> ReLU. Encoder level ``j = 0..4``: ``n_j = (2, 2, 3, 3, 3)``
blocks to ``f_j`` channels (VGG-16's 13 convolutions); ``e0_j`` is the first
block's output, ``e1_j`` the last's; then 2x2 max pooling *with indices*.
Decoder level ``l = 4..0``: max *unpooling* by level ``l``'s indices (``u_l``),
then ``n_l`` blocks to ``o_l = f_{l-1}`` channels (``o_0 = f_0``), output
``d_l``. The last decoder output ``d_0`` ``[B, H, W, f_0]`` is the shared
representation of the split model.

**Pooling and unpooling** (torch's ``MaxPool2d(2, 2, return_indices=True)`` and
``MaxUnpool2d(2, 2)``): each 2x2 window ``w = (x[2i, 2j], x[2i, 2j+1],
x[2i+1, 2j], x[2i+1, 2j+1])`` gives ``max w`` and ``k = argmax w``, the first
maximum in that row-major order (torch's CPU and CUDA kernels scan the window
row-major and replace the running maximum only on ``>``, so of tied elements
the first one wins; ``jnp.argmax`` returns the first too). Unpooling writes
each value at its window's position ``k`` and zeros elsewhere (a one-hot
placement, no scatter), so gradients flow to the arg-max positions only, as in
torch. An odd height or width loses its last row/column to the pooling (torch's
floor); unpooling restores the pre-pool size with zeros there (torch's
``MaxUnpool2d`` with ``output_size``). The MTAN code calls unpooling without
``output_size`` and so needs H and W divisible by 32 (288x384 is); here any
size >= 32x32 works (e.g. 64x80), and for multiples of 32 it is the code's
computation exactly.

**Heads** (per task, as the code): 3x3 conv ``f_0 -> f_0`` then 1x1 conv
``f_0 -> C``, no normalisation or nonlinearity between them. ``segmentation``
(``C`` classes) returns logits (the code returns ``log_softmax`` of them:
``seg_log_softmax=True``; a cross-entropy of either is the same number, since
``log_softmax`` is idempotent); ``depth`` (``C = 1``) is raw; ``normals``
(``C = 3``) is divided by its L2 norm over channels as the code does
(``normalize_normals``), with the norm floored at 1e-12 (torch's
``F.normalize``) where the code divides by the bare norm (NaN at 0). Heads of
one ``(kind, C)`` form a group whose parameters are stacked on a leading axis
(``tasks/heads/<kind><C>``): on the split model's shared ``d_0`` the group's
3x3 convolutions run as one convolution with the kernels concatenated on the
output axis; on MTAN's per-task features as a vmap over the group.

**MTAN** (``arch="mtan"``, ``model_segnet_mtan.py``): the shared SegNet plus,
per task ``t``, attention modules ``att = 1x1 conv -> BN -> ReLU -> 1x1 conv ->
BN -> sigmoid`` (per-task parameters). Encoder, ``j = 0..4``::

    mask = att^enc_{t,j}(e0_j)                      (j = 0)
    mask = att^enc_{t,j}(concat(e0_j, a_t))         (j > 0)
    a_t  = maxpool(block^enc_j(mask * e1_j))        (block shared by all tasks)

with ``block^enc_j: f_j -> f_{min(j+1, 4)}``. Decoder, ``l = 4..0``::

    a_t  = block^dec_l(upsample(a_t))               (block shared by all tasks)
    mask = att^dec_{t,l}(concat(u_l, a_t))
    a_t  = mask * d_l

with ``block^dec_l: o_{l+1} -> o_l`` (``l = 4``: ``f_4 -> f_4``), ``upsample``
bilinear with ``align_corners=True`` to ``u_l``'s size (the code's
``scale_factor=2``: the same for multiples of 32), then the heads on the
attended ``a_t``. The ``block^*`` convolutions are one set of parameters
applied to every task's features, as in the code (one ``nn.ModuleList``, not
one per task); their batch norm therefore normalises each task's features with
that task's batch statistics (train mode) and shares its scale, shift and
running statistics. torch updates those running statistics once per task, in
task order, ``r <- (1 - m) r + m s_t`` for ``t = 0..T-1``;
``shared_update="sequential"`` (default) computes exactly that in closed form,
``r <- (1 - m)^T r + sum_t m (1 - m)^(T-1-t) s_t``; ``"mean"`` updates once
with the task-mean statistics, ``r <- (1 - m) r + m mean_t s_t`` (order-free).

Every per-task tensor carries a leading task axis ``T``: per-task parameters
are stacked ``[T, ...]``, attended features are ``[T, B, H, W, C]``, and all
tasks' branches run as one batched computation (einsums over the task axis for
the 1x1 convolutions, the shared 3x3 convolutions on the task-merged batch);
no Python loop over tasks. The concat before a 1x1 convolution is never formed:
``concat(s, a) @ K = s @ K[:C_s] + a @ K[C_s:]`` with ``s`` (shared, no task
axis) multiplied once per task by an einsum.

**Batch norm** as torch's ``BatchNorm2d`` (:class:`.layers.BatchNorm`; the
code trains with it): train mode normalises by the batch mean and biased
variance over ``(B, H, W)`` and updates the running averages ``r <- (1 - m) r
+ m s`` with momentum ``m = 0.1`` and the *unbiased* batch variance (``n / (n
- 1)``); eval mode normalises by the running averages (initial mean 0,
variance 1); eps 1e-5. :class:`TaskBatchNorm` is the same over ``[T, B, H, W,
C]`` with statistics per task (the attention modules, and the shared blocks
above). ``axis_name`` computes the batch statistics across a mapped data axis
(synchronised batch norm). Statistics live in the ``batch_stats`` collection,
parameters in ``params``, both with the same paths. Convolutions are
:func:`.layers.conv2d` (``conv_impl``: ``"auto"``, ``"im2col"``, ``"lax"``).

The outputs, in train and eval mode, and every running statistic after a
train-mode forward equal those of the MTAN code's own torch modules run on
the same weights (``tests/test_segnet.py``, fixture from
``scripts/make_segnet_fixtures.py``).

**Initialisation** as the code: conv kernels Xavier-normal (``std =
sqrt(2 / (fan_in + fan_out))``, fans times the receptive field, an untruncated
normal), biases 0, BN scale 1 and shift 0.

**Parameters.** The code's trainable parameter counts (``count_parameters``)
are reproduced: single-task SegNet for 13-class segmentation 24,981,069 (the
code's own ``REL`` denominator), split 25,055,185 and MTAN 44,229,073 with the
three NYUv2 heads (the code also counts the 3 ``logsigma`` of its uncertainty
weighting, which is not part of the model here), MTAN / single = 1.77 as in
the paper's table. Conv biases feeding a batch norm are kept (the code has
them); in train mode their gradient is 0, the batch norm removes any constant.

Interface for the integration (:func:`make_segnet`)::

    model = make_segnet(specs, arch="split" | "mtan", widths=(64, 128, 256, 512, 512),
                        seg_log_softmax=False, normalize_normals=True,
                        shared_update="sequential", axis_name=None, conv_impl="auto")
    variables = model.init(rng, (H, W, C_in))   # {"params", "batch_stats"}
    outputs, batch_stats = model.apply(variables, x [B, H, W, C_in], train)
    #   outputs: {task_name: [B, H, W, C_task]}; batch_stats: the new
    #   statistics in train mode (the old ones, unchanged, in eval mode).
    rep, stats_a = model.encode(variables, x, train)       # shared SegNet
    outputs, stats_b = model.decode(variables, rep, train)  # task part
    #   apply = decode . encode; stats_a holds the new shared statistics
    #   (params/shared), stats_b the task part's (params/tasks).

``specs`` are ``(name, kind, channels)`` triples or objects with ``name``,
``kind`` and ``out_dim`` (a :class:`mtljax.tasks.Task` of a dense kind).
``params["shared"]`` (the SegNet) is the task-independent part: for ``split``,
``rep`` is ``d_0`` ``[B, H, W, f_0]`` and ``decode`` is the heads; for
``mtan``, ``rep`` is the dict of every level's shared features (``e0``,
``e1``, ``u``, ``d``; lists by level) that the attention modules read.
``params["tasks"]`` holds ``attention/{encoder,decoder}_<level>_{mask,block}``
(``mask`` stacked ``[T, ...]``, ``block`` shared by the tasks) and
``heads/<kind><C>`` (stacked ``[T_g, ...]``, rows in the order of the specs of
that group: :attr:`SegNetModel.head_rows`). :attr:`SegNetModel.layer_groups`
lists ``(name, regex over slash paths)`` from input to output:
``encoder_0..4``, ``decoder_4..0`` (shared), then for ``mtan``
``attention_encoder_0..4``, ``attention_decoder_4..0``, then ``heads``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mtljax.models.backbones import layers

KINDS = ("segmentation", "depth", "normals")
ARCHS = ("split", "mtan")
SHARED_UPDATES = ("sequential", "mean")
MTAN_WIDTHS = (64, 128, 256, 512, 512)
LEVELS = 5
BLOCKS_PER_LEVEL = (2, 2, 3, 3, 3)
MIN_SIZE = 2 ** LEVELS
BN_MOMENTUM = 0.1  # torch's convention: r <- (1 - m) r + m s
BN_EPS = 1e-5
NORMALS_EPS = 1e-12


# ---------------------------------------------------------------------------
# Pooling, unpooling, upsampling: pure functions on [..., H, W, C].

def max_pool_with_indices(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """2x2 stride-2 max pooling over the two axes before the last.

  Returns ``(pooled [..., H//2, W//2, C], index [..., H//2, W//2, C] int32)``,
  ``index = 2 dy + dx`` in ``0..3``, the first maximum of the window in
  row-major order (torch's tie rule). An odd last row/column is dropped.
  """
  *lead, h, w, c = x.shape
  h2, w2 = h // 2, w // 2
  win = x[..., :2 * h2, :2 * w2, :].reshape(*lead, h2, 2, w2, 2, c)
  win = jnp.moveaxis(win, (-4, -2), (-2, -1)).reshape(*lead, h2, w2, c, 4)
  idx = jnp.argmax(win, axis=-1)
  pooled = jnp.take_along_axis(win, idx[..., None], axis=-1)[..., 0]
  return pooled, idx.astype(jnp.int32)


def max_pool(x: jax.Array) -> jax.Array:
  """2x2 stride-2 max pooling; the gradient goes to the first maximum of each
  window, as torch's (``jnp.max`` would split it among ties)."""
  return max_pool_with_indices(x)[0]


def max_unpool(y: jax.Array, index: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Inverse placement of :func:`max_pool_with_indices`: ``y [..., h, w, C]``
  written at ``index`` in each 2x2 window, zeros elsewhere, zero-padded to
  ``out_hw`` (the pre-pool size, ``2h`` or ``2h + 1``)."""
  *lead, h, w, c = y.shape
  onehot = index[..., None] == jnp.arange(4, dtype=index.dtype)
  z = jnp.where(onehot, y[..., None], jnp.zeros((), y.dtype))
  z = jnp.moveaxis(z.reshape(*lead, h, w, c, 2, 2), (-2, -1), (-4, -2))
  z = z.reshape(*lead, 2 * h, 2 * w, c)
  pad = [(0, 0)] * len(lead) + [(0, out_hw[0] - 2 * h), (0, out_hw[1] - 2 * w), (0, 0)]
  return jnp.pad(z, pad)


def upsample_bilinear(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Bilinear resize of ``x [..., H, W, C]`` (any leading axes) to ``out_hw``
  with ``align_corners=True`` (:func:`.layers.resize_bilinear`)."""
  *lead, h, w, c = x.shape
  y = layers.resize_bilinear(x.reshape(-1, h, w, c), tuple(out_hw), align_corners=True)
  return y.reshape(*lead, *out_hw, c)


# ---------------------------------------------------------------------------
# Convolution and batch norm: :mod:`.layers` (torch semantics), plus the
# task-axis batch norm MTAN's attention needs.

def conv2d(x: jax.Array, kernel: jax.Array, bias: jax.Array, impl: str = "auto") -> jax.Array:
  """SAME stride-1 convolution (torch's ``padding=(k-1)//2``) of ``x [..., H,
  W, C_in]`` (any leading axes) with ``kernel [k, k, C_in, C_out]`` plus
  ``bias [C_out]`` (:func:`.layers.conv2d`, ``impl`` its implementation
  choice); 1x1 is a matmul."""
  if kernel.shape[0] == 1 and kernel.shape[1] == 1:
    return x @ kernel[0, 0] + bias
  *lead, h, w, c = x.shape
  y = layers.conv2d(x.reshape(-1, h, w, c), kernel, padding=(kernel.shape[0] - 1) // 2,
                    impl=impl)
  return y.reshape(*lead, h, w, kernel.shape[-1]) + bias


def xavier_normal(stacked: bool = False) -> Callable:
  """torch's ``xavier_normal_``: untruncated normal, ``std = sqrt(2 / (fan_in
  + fan_out))`` with fans counting the receptive field; ``stacked`` excludes
  a leading task axis from the fans."""
  return nn.initializers.variance_scaling(
      1.0, "fan_avg", "normal", batch_axis=(0,) if stacked else ())


class TaskBatchNorm(nn.Module):
  """Batch norm with torch's semantics (:class:`.layers.BatchNorm`) on ``x [T,
  B, ..., C]`` with a leading task axis: train mode normalises each task's
  features with that task's batch statistics.

  Attributes:
    tasks: ``T``.
    per_task: own scale, shift and running statistics per task (``[T, C]``:
      MTAN's attention masks); else one shared set (``[C]``: the blocks shared
      by the tasks), its running statistics updated from the ``T`` batch
      statistics by ``shared_update`` (module docstring).
  """
  tasks: int
  per_task: bool = True
  shared_update: str = "sequential"
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPS
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    t, c = self.tasks, x.shape[-1]
    pshape = (t, c) if self.per_task else (c,)
    scale = self.param("scale", nn.initializers.ones, pshape)
    shift = self.param("bias", nn.initializers.zeros, pshape)
    r_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(pshape, jnp.float32))
    r_var = self.variable("batch_stats", "var", lambda: jnp.ones(pshape, jnp.float32))
    red = tuple(range(1, x.ndim - 1))
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if train:
      n = math.prod(x.shape[i] for i in red)
      if n == 1 and self.axis_name is None:
        raise ValueError(f"TaskBatchNorm in train mode needs more than one value per task "
                         f"and channel, got input shape {x.shape} (torch refuses the same).")
      mean = xf.mean(red)  # [T, C]
      if self.axis_name is not None:
        mean = lax.pmean(mean, self.axis_name)
        n = n * lax.psum(1, self.axis_name)
      var = jnp.square(xf - _expand(mean, x.ndim)).mean(red)
      if self.axis_name is not None:
        var = lax.pmean(var, self.axis_name)
      if not self.is_initializing():
        unbiased = var * (n / jnp.maximum(n - 1, 1))
        r_mean.value = self._update(r_mean.value, mean)
        r_var.value = self._update(r_var.value, unbiased)
    else:
      mean, var = r_mean.value, r_var.value
    if not self.per_task:
      scale, shift = scale[None], shift[None]
      if not train:
        mean, var = mean[None], var[None]
    mul = lax.rsqrt(var + self.epsilon) * scale
    y = (xf - _expand(mean, x.ndim)) * _expand(mul, x.ndim) + _expand(shift, x.ndim)
    return y.astype(x.dtype)

  def _update(self, r: jax.Array, s: jax.Array) -> jax.Array:
    m = self.momentum
    if self.per_task:
      return (1 - m) * r + m * s
    if self.shared_update == "mean":
      return (1 - m) * r + m * s.mean(0)
    t = s.shape[0]  # torch's order: task 0's statistics first
    w = m * (1 - m) ** np.arange(t - 1, -1, -1, dtype=np.float64)
    return (1 - m) ** t * r + jnp.einsum("t,tc->c", jnp.asarray(w, s.dtype), s)


def _expand(v: jax.Array, ndim: int) -> jax.Array:
  """``[T, C]`` broadcastable against ``[T, B, ..., C]`` (``ndim`` axes)."""
  return v.reshape(v.shape[:1] + (1,) * (ndim - 2) + v.shape[-1:])


class ConvBNReLU(nn.Module):
  """The code's ``conv_layer``: 3x3 conv -> BatchNorm -> ReLU. With ``tasks``
  the input is ``[T, B, H, W, C]``: one conv for all tasks, batch statistics
  per task, scale/shift/running statistics shared (the MTAN ``block``s)."""
  features: int
  tasks: int = 0
  shared_update: str = "sequential"
  axis_name: str | None = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kernel = self.param("kernel", xavier_normal(), (3, 3, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    y = conv2d(x, kernel, bias, self.conv_impl)
    if self.tasks:
      y = TaskBatchNorm(self.tasks, per_task=False, shared_update=self.shared_update,
                        axis_name=self.axis_name, name="bn")(y, train)
    else:
      y = layers.BatchNorm(BN_MOMENTUM, BN_EPS, axis_name=self.axis_name, name="bn")(y, train)
    return nn.relu(y)


class Level(nn.Module):
  """``n`` ConvBNReLU blocks: the first to ``features`` from the input, the
  rest ``features -> features``. Returns (first output, last output)."""
  features: int
  n: int
  axis_name: str | None = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train):
    kw = dict(axis_name=self.axis_name, conv_impl=self.conv_impl)
    first = h = ConvBNReLU(self.features, name="conv_0", **kw)(x, train)
    for i in range(1, self.n):
      h = ConvBNReLU(self.features, name=f"conv_{i}", **kw)(h, train)
    return first, h


def decoder_widths(widths: Sequence[int]) -> tuple[int, ...]:
  """``o_l``: decoder level ``l``'s output channels (``f_{l-1}``, ``o_0 = f_0``)."""
  return (widths[0],) + tuple(widths[:-1])


class SharedSegNet(nn.Module):
  """The shared encoder-decoder. Returns the dict of its features (module
  docstring): ``e0``, ``e1`` by encoder level, ``u`` (unpooled input) and
  ``d`` (output) by decoder level, each a list of 5 ``[B, H_l, W_l, C]``."""
  widths: tuple[int, ...] = MTAN_WIDTHS
  axis_name: str | None = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, list[jax.Array]]:
    kw = dict(axis_name=self.axis_name, conv_impl=self.conv_impl)
    e0, e1, idx, sizes = [], [], [], []
    h = x
    for j in range(LEVELS):
      a, b = Level(self.widths[j], BLOCKS_PER_LEVEL[j], name=f"encoder_{j}", **kw)(h, train)
      e0.append(a)
      e1.append(b)
      sizes.append(b.shape[-3:-1])
      h, i = max_pool_with_indices(b)
      idx.append(i)
    o = decoder_widths(self.widths)
    u, d = [None] * LEVELS, [None] * LEVELS
    for lv in reversed(range(LEVELS)):
      u[lv] = max_unpool(h, idx[lv], sizes[lv])
      _, h = Level(o[lv], BLOCKS_PER_LEVEL[lv], name=f"decoder_{lv}", **kw)(u[lv], train)
      d[lv] = h
    return {"e0": e0, "e1": e1, "u": u, "d": d}


class AttentionMask(nn.Module):
  """Per-task ``att_layer``: 1x1 conv -> BN -> ReLU -> 1x1 conv -> BN -> sigmoid
  on ``concat(s, a)``, ``s [B, H, W, C_s]`` shared and ``a [T, B, H, W, C_a]``
  per task (or None). Kernels ``[T, 1, 1, C_s + C_a, F]``: the code's layout
  with a task axis. Returns ``[T, B, H, W, features]``."""
  tasks: int
  hidden: int
  features: int
  axis_name: str | None = None

  @nn.compact
  def __call__(self, s: jax.Array, a: jax.Array | None, train: bool) -> jax.Array:
    t, cs = self.tasks, s.shape[-1]
    cin = cs + (0 if a is None else a.shape[-1])
    k0 = self.param("conv_0_kernel", xavier_normal(True), (t, 1, 1, cin, self.hidden))
    b0 = self.param("conv_0_bias", nn.initializers.zeros, (t, self.hidden))
    y = jnp.einsum("bhwc,tcf->tbhwf", s, k0[:, 0, 0, :cs])
    if a is not None:
      y = y + jnp.einsum("tbhwc,tcf->tbhwf", a, k0[:, 0, 0, cs:])
    y = y + b0[:, None, None, None, :]
    y = nn.relu(TaskBatchNorm(t, axis_name=self.axis_name, name="bn_0")(y, train))
    k1 = self.param("conv_1_kernel", xavier_normal(True), (t, 1, 1, self.hidden, self.features))
    b1 = self.param("conv_1_bias", nn.initializers.zeros, (t, self.features))
    y = jnp.einsum("tbhwc,tcf->tbhwf", y, k1[:, 0, 0]) + b1[:, None, None, None, :]
    y = TaskBatchNorm(t, axis_name=self.axis_name, name="bn_1")(y, train)
    return nn.sigmoid(y)


class MTANAttention(nn.Module):
  """All tasks' attention branches over the shared features ``rep`` (the
  dict :class:`SharedSegNet` returns); returns the attended ``a [T, B, H, W,
  f_0]`` the heads read."""
  tasks: int
  widths: tuple[int, ...] = MTAN_WIDTHS
  shared_update: str = "sequential"
  axis_name: str | None = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, rep: dict[str, list[jax.Array]], train: bool) -> jax.Array:
    f, o, t = self.widths, decoder_widths(self.widths), self.tasks
    kw = dict(tasks=t, shared_update=self.shared_update, axis_name=self.axis_name,
              conv_impl=self.conv_impl)
    a = None
    for j in range(LEVELS):
      mask = AttentionMask(t, f[j], f[j], self.axis_name,
                           name=f"encoder_{j}_mask")(rep["e0"][j], a, train)
      h = mask * rep["e1"][j]
      h = ConvBNReLU(f[min(j + 1, LEVELS - 1)], name=f"encoder_{j}_block", **kw)(h, train)
      a = max_pool(h)
    for lv in reversed(range(LEVELS)):
      a = upsample_bilinear(a, rep["u"][lv].shape[-3:-1])
      width = f[-1] if lv == LEVELS - 1 else o[lv]
      a = ConvBNReLU(width, name=f"decoder_{lv}_block", **kw)(a, train)
      mask = AttentionMask(t, o[lv], o[lv], self.axis_name,
                           name=f"decoder_{lv}_mask")(rep["u"][lv], a, train)
      a = mask * rep["d"][lv]
    return a


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  """One task's head: its name, kind (:data:`KINDS`) and output channels."""
  name: str
  kind: str
  channels: int

  @property
  def group(self) -> str:
    return f"{self.kind}{self.channels}"


class HeadGroup(nn.Module):
  """The heads of one group of ``g`` tasks, parameters stacked ``[g, ...]``:
  3x3 conv ``C -> C`` then 1x1 conv ``C -> channels``. ``x`` is ``[B, H, W, C]``
  (every head reads it) or ``[g, B, H, W, C]`` (row r for head r). Returns
  ``[g, B, H, W, channels]``."""
  g: int
  channels: int
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    k3 = self.param("conv_0_kernel", xavier_normal(True), (self.g, 3, 3, c, c))
    b3 = self.param("conv_0_bias", nn.initializers.zeros, (self.g, c))
    k1 = self.param("conv_1_kernel", xavier_normal(True), (self.g, 1, 1, c, self.channels))
    b1 = self.param("conv_1_bias", nn.initializers.zeros, (self.g, self.channels))
    if x.ndim == 5:
      h = jax.vmap(lambda xi, k, b: conv2d(xi, k, b, self.conv_impl))(x, k3, b3)
    else:  # every head on the same input: one convolution, g * C output channels
      kcat = jnp.moveaxis(k3, 0, -2).reshape(3, 3, c, self.g * c)
      h = conv2d(x, kcat, b3.reshape(-1), self.conv_impl)
      h = jnp.moveaxis(h.reshape(*h.shape[:-1], self.g, c), -2, 0)
    return jnp.einsum("gbhwc,gcf->gbhwf", h, k1[:, 0, 0]) + b1[:, None, None, None, :]


class Heads(nn.Module):
  """Per-task heads, one :class:`HeadGroup` per ``(kind, channels)``. ``x`` is
  ``[B, H, W, f_0]`` (every task reads it: split) or ``[T, B, H, W, f_0]``
  (row t for task t: MTAN). Returns ``{name: [B, H, W, channels]}``."""
  specs: tuple[HeadSpec, ...]
  seg_log_softmax: bool = False
  normalize_normals: bool = True
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    out = {}
    for group, rows in _groups(self.specs).items():
      spec = self.specs[rows[0]]
      xg = x
      if x.ndim == 5 and rows != tuple(range(x.shape[0])):
        xg = x[np.asarray(rows)]
      y = HeadGroup(len(rows), spec.channels, self.conv_impl, name=group)(xg)
      if spec.kind == "segmentation" and self.seg_log_softmax:
        y = jax.nn.log_softmax(y, axis=-1)
      if spec.kind == "normals" and self.normalize_normals:
        norm = jnp.sqrt(jnp.sum(y * y, axis=-1, keepdims=True))
        y = y / jnp.maximum(norm, NORMALS_EPS)
      for r, i in enumerate(rows):
        out[self.specs[i].name] = y[r]
    return {s.name: out[s.name] for s in self.specs}


def _groups(specs: Sequence[HeadSpec]) -> dict[str, tuple[int, ...]]:
  groups: dict[str, list[int]] = {}
  for i, s in enumerate(specs):
    groups.setdefault(s.group, []).append(i)
  return {k: tuple(v) for k, v in groups.items()}


class TaskPart(nn.Module):
  """Everything after the shared SegNet: MTAN's attention (``mtan``) and the heads."""
  specs: tuple[HeadSpec, ...]
  arch: str = "split"
  widths: tuple[int, ...] = MTAN_WIDTHS
  seg_log_softmax: bool = False
  normalize_normals: bool = True
  shared_update: str = "sequential"
  axis_name: str | None = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, rep: Any, train: bool) -> dict[str, jax.Array]:
    h = rep
    if self.arch == "mtan":
      h = MTANAttention(len(self.specs), self.widths, self.shared_update,
                        self.axis_name, self.conv_impl, name="attention")(rep, train)
    return Heads(self.specs, self.seg_log_softmax, self.normalize_normals,
                 self.conv_impl, name="heads")(h)


class SegNetMTL(nn.Module):
  """Shared SegNet (``shared``) plus the task part (``tasks``)."""
  specs: tuple[HeadSpec, ...]
  arch: str = "split"
  widths: tuple[int, ...] = MTAN_WIDTHS
  seg_log_softmax: bool = False
  normalize_normals: bool = True
  shared_update: str = "sequential"
  axis_name: str | None = None
  conv_impl: str = "auto"

  def setup(self):
    self.shared = SharedSegNet(self.widths, self.axis_name, self.conv_impl)
    self.tasks = TaskPart(self.specs, self.arch, self.widths, self.seg_log_softmax,
                          self.normalize_normals, self.shared_update, self.axis_name,
                          self.conv_impl)

  def encode(self, x: jax.Array, train: bool) -> Any:
    rep = self.shared(x, train)
    return rep["d"][0] if self.arch == "split" else rep

  def decode(self, rep: Any, train: bool) -> dict[str, jax.Array]:
    return self.tasks(rep, train)

  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    return self.decode(self.encode(x, train), train)


# ---------------------------------------------------------------------------
# The model record the integration calls.

@dataclasses.dataclass(frozen=True)
class SegNetModel:
  """Pure functions over ``variables = {"params", "batch_stats"}`` (module
  docstring). ``head_rows``: per head group, the spec names of its rows."""
  module: SegNetMTL
  specs: tuple[HeadSpec, ...]
  head_rows: dict[str, tuple[str, ...]]
  layer_groups: tuple[tuple[str, str], ...]
  task_independent: tuple[str, ...] = ("shared",)

  def init(self, rng: jax.Array, input_shape: Sequence[int]) -> dict[str, Any]:
    """Variables for inputs ``[B, *input_shape]`` (``(H, W, C_in)``). Runs
    one eval-mode forward on a ``[1, H, W, C_in]`` zero image: call it under
    ``jax.jit`` (op by op at 288x384 it takes minutes on a CPU)."""
    _check_input_shape(tuple(input_shape))
    x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
    return dict(self.module.init(rng, x, False))

  def apply(self, variables: dict[str, Any], x: jax.Array, train: bool):
    """``({name: [B, H, W, C]}, batch_stats)``."""
    _check_input_shape(tuple(x.shape[1:]))
    return self._run(variables, train, x, None)

  def encode(self, variables: dict[str, Any], x: jax.Array, train: bool):
    """``(rep, batch_stats)``: the shared SegNet; only ``shared`` statistics change."""
    _check_input_shape(tuple(x.shape[1:]))
    return self._run(variables, train, x, SegNetMTL.encode)

  def decode(self, variables: dict[str, Any], rep: Any, train: bool):
    """``(outputs, batch_stats)``: the task part on ``rep``; only ``tasks``
    statistics change."""
    return self._run(variables, train, rep, SegNetMTL.decode)

  def _run(self, variables, train, arg, method):
    kw = {} if method is None else {"method": method}
    if not train:
      return self.module.apply(variables, arg, False, **kw), variables["batch_stats"]
    out, new = self.module.apply(variables, arg, True, mutable=["batch_stats"], **kw)
    return out, new["batch_stats"]


def _check_input_shape(shape: tuple[int, ...]) -> None:
  if len(shape) != 3:
    raise ValueError(f"SegNet input must be images [B, H, W, C], got per-example "
                     f"shape {shape}.")
  h, w, _ = shape
  if h < MIN_SIZE or w < MIN_SIZE:
    raise ValueError(f"SegNet needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels "
                     f"({LEVELS} 2x2 poolings), got {h}x{w}.")


_KIND_CHANNELS = {"depth": 1, "normals": 3}


def head_specs(tasks: Sequence[Any]) -> tuple[HeadSpec, ...]:
  """``HeadSpec``s from ``(name, kind, channels)`` triples or task objects
  (``name``, ``kind``, ``out_dim``), checked: kinds in :data:`KINDS`, depth 1
  channel, normals 3, segmentation >= 2 classes, unique names."""
  specs = []
  for t in tasks:
    if isinstance(t, HeadSpec):
      spec = t
    elif isinstance(t, (tuple, list)) and len(t) == 3:
      spec = HeadSpec(*t)
    elif hasattr(t, "name") and hasattr(t, "kind") and hasattr(t, "out_dim"):
      spec = HeadSpec(t.name, t.kind, t.out_dim)
    else:
      raise ValueError(f"SegNet task {t!r}: expected (name, kind, channels) or a task "
                       "with name, kind and out_dim.")
    if spec.kind not in KINDS:
      raise ValueError(f"SegNet task {spec.name!r}: kind {spec.kind!r} has no dense head; "
                       f"expected one of {KINDS}.")
    want = _KIND_CHANNELS.get(spec.kind)
    if want is not None and spec.channels != want:
      raise ValueError(f"SegNet task {spec.name!r}: a {spec.kind} head has {want} "
                       f"channel(s), got {spec.channels}.")
    if spec.kind == "segmentation" and (not isinstance(spec.channels, int)
                                        or spec.channels < 2):
      raise ValueError(f"SegNet task {spec.name!r}: segmentation needs >= 2 classes, "
                       f"got {spec.channels}.")
    specs.append(spec)
  if not specs:
    raise ValueError("SegNet needs at least one task.")
  names = [s.name for s in specs]
  if len(set(names)) != len(names):
    raise ValueError(f"SegNet task names must be unique, got {names}.")
  return tuple(specs)


def layer_groups(arch: str) -> tuple[tuple[str, str], ...]:
  """``(name, regex)`` over slash parameter paths, from input to output."""
  groups = [(f"encoder_{j}", f"shared/encoder_{j}/.*") for j in range(LEVELS)]
  groups += [(f"decoder_{lv}", f"shared/decoder_{lv}/.*") for lv in reversed(range(LEVELS))]
  if arch == "mtan":
    groups += [(f"attention_encoder_{j}", f"tasks/attention/encoder_{j}_.*")
               for j in range(LEVELS)]
    groups += [(f"attention_decoder_{lv}", f"tasks/attention/decoder_{lv}_.*")
               for lv in reversed(range(LEVELS))]
  groups.append(("heads", "tasks/heads/.*"))
  return tuple(groups)


def make_segnet(tasks: Sequence[Any], *, arch: str = "split",
                widths: Sequence[int] = MTAN_WIDTHS, seg_log_softmax: bool = False,
                normalize_normals: bool = True, shared_update: str = "sequential",
                axis_name: str | None = None, conv_impl: str = "auto") -> SegNetModel:
  """The SegNet ``split`` (hard sharing; one task: the code's single-task
  SegNet) or ``mtan`` model over ``tasks`` (module docstring)."""
  if arch not in ARCHS:
    raise ValueError(f"SegNet arch must be one of {ARCHS}, got {arch!r}.")
  widths = tuple(widths)
  if len(widths) != LEVELS or not all(isinstance(w, (int, np.integer)) and w > 0
                                      for w in widths):
    raise ValueError(f"SegNet widths must be {LEVELS} positive integers, got {widths}.")
  if shared_update not in SHARED_UPDATES:
    raise ValueError(f"SegNet shared_update must be one of {SHARED_UPDATES}, "
                     f"got {shared_update!r}.")
  layers.resolve_conv_impl(conv_impl)
  specs = head_specs(tasks)
  module = SegNetMTL(specs, arch, tuple(int(w) for w in widths), seg_log_softmax,
                     normalize_normals, shared_update, axis_name, conv_impl)
  rows = {g: tuple(specs[i].name for i in r) for g, r in _groups(specs).items()}
  return SegNetModel(module, specs, rows, layer_groups(arch))
