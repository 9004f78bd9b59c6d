"""What every architecture is built from: the settings they all share
(:class:`Trunk`), the checks of their hyper-parameters, and their parts
(:class:`Parts`: the trunk module, linear heads, per-task towers, per-task
random keys, layer groups).

An architecture is its own module's build function and hyper-parameter
dataclass, recorded in :data:`mtljax.models.multitask.REGISTRY`;
:func:`mtljax.models.multitask.make_model` checks the :class:`Trunk` and the
hyper-parameters, then calls the build function, which makes its
:class:`Parts` and returns the fields of a
:class:`mtljax.models.multitask.Model`. Per-task parameters of task ``t`` are
initialised from ``fold_in(rng, stream_ids[t])`` (:meth:`Parts.per_task_keys`),
so a subset run gets the same initial values.

The checks here raise ``ValueError``s that name the argument (``hidden``,
``mmoe.tower``), not a config path: :mod:`mtljax.build` adds that.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtljax import tasks as tasks_lib
from mtljax.models import encoders
from mtljax.models.backbones import vit as vit_lib

# The dense backbones (mtljax.models.backbone_models): a ResNet trunk with
# per-task DeepLab heads, and the MTAN paper's SegNet.
RESNETS = ("resnet18", "resnet34", "resnet50")
SEGNETS = ("segnet",)
BACKBONES = RESNETS + SEGNETS
# The Vision Transformer (mtljax.models.backbones.vit, Hugging Face ViTModel
# layout): per-example features (the class token), on the architectures built
# for it.
VITS = ("vit",)
VIT_ARCHS = ("multi_head", "independent")
ENCODERS = ("mlp", "cnn", "fcn") + BACKBONES + VITS
# Encoders whose features are per pixel ([B, H, W, F]): the dense tasks' (and
# only theirs: a per-example task needs one feature vector per example), and
# the architectures each is built for.
# (mmoe / cgc / ple and soft are not offered on the backbones: BUILD_NOTES.md,
# issue 26, "MTAN and cross-stitch over ResNet stages".)
DENSE_ARCHS = {"fcn": ("multi_head", "independent"),
               **{r: ("multi_head", "independent", "mtan", "cross_stitch", "ltb")
                  for r in RESNETS},
               "segnet": ("multi_head", "independent", "mtan")}
DENSE_ENCODERS = tuple(DENSE_ARCHS)
HEADS = ("auto", "per_task", "shared")
NORMS = ("batch", "group")
CONV_IMPLS = ("auto", "im2col", "lax")
OUTPUT_STRIDES = (8, 16, 32)


# ----------------------------------------------------------------------------
# Checks shared by the hyper-parameter dataclasses.
# ----------------------------------------------------------------------------


def one_of(name: str, value: Any, allowed: Sequence[Any]) -> None:
  """Raises ``ValueError("<name>=<value> is not one of <allowed>.")``."""
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not one of {tuple(allowed)}.")


def positive_ints(name: str, values: Any) -> tuple[int, ...]:
  """``values`` as a tuple of ints, each > 0 (bools refused); else raises
  ``ValueError("<name> must be positive integers, got ...")``."""
  try:
    values = tuple(values)
  except TypeError:
    raise ValueError(f"{name} must be positive integers, got {values!r}.") from None
  if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
             for v in values):
    raise ValueError(f"{name} must be positive integers, got {values!r}.")
  return tuple(int(v) for v in values)


def at_least(name: str, value: Any, low: int) -> int:
  """``value`` as an int >= ``low`` (bools refused); else raises."""
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
    raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
  if value < low:
    raise ValueError(f"{name} must be >= {low}, got {value!r}.")
  return int(value)


def finite_number(name: str, value: Any) -> float:
  """``value`` as a float, refusing bools, strings, inf and nan."""
  ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
  if not ok or not np.isfinite(value):
    raise ValueError(f"{name} must be a finite number, got {value!r}.")
  return float(value)


# ----------------------------------------------------------------------------
# The settings every architecture shares.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Trunk:
  """The settings every architecture shares (``config.model.<field>``): the
  encoder that is its trunk -- each task's column, each expert -- and where
  its heads live.

  Attributes:
    encoder: ``"mlp"`` (flatten, then ReLU dense layers of widths ``hidden``),
      ``"cnn"`` (3x3 ReLU convolutions of ``channels`` output channels, each
      followed by 2x2 max-pooling, then the dense layers) or ``"fcn"`` (the
      convolutions without pooling, then the dense layers at every pixel:
      per-pixel features for the dense tasks); :data:`ENCODERS`.
    hidden: the dense layers' widths, input to output.
    channels: the convolutions' output channels (``cnn`` only).
    heads: ``"auto"`` (per-task heads, except one head per task group for the
      conditioned architectures), ``"per_task"`` or ``"shared"`` (one head per
      task group at ``shared/heads/<group>``); :data:`HEADS`.
    output_stride: a ResNet encoder's (:data:`BACKBONES`) output stride: 8
      (LibMTL's ``resnet_dilated``, the dense benchmarks' default), 16 or 32
      (torchvision's undilated network).
    normalization: a ResNet encoder's normalisation, ``"batch"`` (batch norm with
      running averages in the model state) or ``"group"``; :data:`NORMS`.
    conv_impl: a backbone's (ResNet, SegNet) convolution, ``"auto"`` (im2col on CPU,
      ``lax.conv`` on GPU/TPU), ``"im2col"`` or ``"lax"``; :data:`CONV_IMPLS`.
    patch_size, vit_width, vit_depth, vit_heads, vit_mlp_dim, vit_eps: the ViT
      encoder's (``encoder="vit"``) patch side, token width (HF
      ``hidden_size``), number of blocks, attention heads, MLP width
      (``intermediate_size``) and layer-norm epsilon (``layer_norm_eps``);
      a Hugging Face checkpoint (``config.init_from``) must have these sizes.
      The ViT reads none of ``hidden``/``channels``: its representation is the
      class token's final-norm output, ``vit_width`` wide.
  """
  encoder: str = "mlp"
  hidden: tuple[int, ...] = (128, 128)
  channels: tuple[int, ...] = (16, 32)
  heads: str = "auto"
  output_stride: int = 8
  normalization: str = "batch"
  conv_impl: str = "auto"
  patch_size: int = 4
  vit_width: int = 64
  vit_depth: int = 4
  vit_heads: int = 4
  vit_mlp_dim: int = 128
  vit_eps: float = 1e-12

  def checked(self) -> Trunk:
    """The names checked, the sizes as tuples of positive ints; raises
    ``ValueError`` naming the field."""
    one_of("encoder", self.encoder, ENCODERS)
    one_of("heads", self.heads, HEADS)
    one_of("output_stride", self.output_stride, OUTPUT_STRIDES)
    one_of("normalization", self.normalization, NORMS)
    one_of("conv_impl", self.conv_impl, CONV_IMPLS)
    channels = positive_ints("channels", self.channels)
    if self.encoder in SEGNETS and len(channels) != 5:
      raise ValueError(f"encoder={self.encoder!r} takes the widths of its 5 levels as channels "
                       f"(the MTAN code's (64, 128, 256, 512, 512)), got {channels}.")
    if self.encoder in SEGNETS and self.normalization != "batch":
      raise ValueError(f"encoder={self.encoder!r} is the MTAN code's SegNet, with batch norm; "
                       f"normalization={self.normalization!r} is not offered with it.")
    vit = {k: at_least(k, getattr(self, k), 1) for k in
           ("patch_size", "vit_width", "vit_depth", "vit_heads", "vit_mlp_dim")}
    eps = finite_number("vit_eps", self.vit_eps)
    if eps <= 0:
      raise ValueError(f"vit_eps must be > 0, got {self.vit_eps!r}.")
    if vit["vit_width"] % vit["vit_heads"]:
      raise ValueError(f"vit_width={vit['vit_width']} is not a multiple of "
                       f"vit_heads={vit['vit_heads']}.")
    return dataclasses.replace(self, hidden=positive_ints("hidden", self.hidden),
                               channels=channels, vit_eps=eps, **vit)

  def check_input_shape(self, input_shape: Sequence[int]) -> None:
    """Raises when the encoder cannot read inputs of this shape (one example's)."""
    if self.encoder in ("cnn", "fcn") and len(input_shape) not in (2, 3):
      raise ValueError(f"encoder={self.encoder!r} needs image inputs [H, W] or [H, W, C], "
                       f"got input shape {tuple(input_shape)}.")
    if self.encoder in RESNETS and (len(input_shape) != 3 or input_shape[-1] != 3):
      raise ValueError(f"encoder={self.encoder!r} needs RGB image inputs [H, W, 3], got "
                       f"input shape {tuple(input_shape)}.")
    if self.encoder in VITS and (len(input_shape) not in (2, 3) or any(
        s % self.patch_size for s in input_shape[:2])):
      raise ValueError(f"encoder={self.encoder!r} needs images [H, W] or [H, W, C] whose sides "
                       f"are multiples of patch_size={self.patch_size}, got input shape "
                       f"{tuple(input_shape)}.")
    if self.encoder in SEGNETS and (len(input_shape) != 3 or min(input_shape[:2]) < 32):
      raise ValueError(f"encoder={self.encoder!r} needs images [H, W, C] of at least 32x32 "
                       f"pixels (5 poolings), got input shape {tuple(input_shape)}.")

  def check_tasks(self, arch: str, taskset: tasks_lib.TaskSet) -> None:
    """Raises unless the encoder's features fit every task: per-pixel
    features (:data:`DENSE_ENCODERS`) for dense tasks only, on an
    architecture built for the encoder (:data:`DENSE_ARCHS`); per-example
    features for the others."""
    dense = [t.name for t in taskset if t.dense]
    if self.encoder in VITS and arch not in VIT_ARCHS:
      raise ValueError(f"arch={arch!r} is not built for encoder={self.encoder!r}; it is built "
                       f"for {VIT_ARCHS}.")
    if self.encoder in DENSE_ENCODERS:
      other = [t.name for t in taskset if not t.dense]
      if other:
        raise ValueError(f"encoder={self.encoder!r} gives per-pixel features; task(s) "
                         f"{other} need one prediction per example (use 'mlp' or 'cnn').")
      if arch not in DENSE_ARCHS[self.encoder]:
        raise ValueError(f"arch={arch!r} does not take per-pixel features from encoder="
                         f"{self.encoder!r} yet; it is built for "
                         f"{DENSE_ARCHS[self.encoder]}.")
      if self.encoder in RESNETS + SEGNETS and self.heads == "shared":
        raise ValueError(f"encoder={self.encoder!r} has one head per task; "
                         "heads='shared' is not offered with it (use heads='auto').")
    elif dense:
      raise ValueError(f"dense task(s) {dense} need per-pixel features: encoder one of "
                       f"{DENSE_ENCODERS}, not {self.encoder!r}.")

  @property
  def layer_names(self) -> tuple[str, ...]:
    """The trunk's layers, input to output: ``conv_i`` (cnn) then ``layer_j``."""
    if self.encoder in VITS:
      return vit_lib.layer_names(self.vit_depth)
    convs = ([f"conv_{i}" for i in range(len(self.channels))]
             if self.encoder in ("cnn", "fcn") else [])
    return tuple(convs + [f"layer_{j}" for j in range(len(self.hidden))])


def checked_tower(arch: str, tower: Any) -> tuple[int, ...]:
  """An architecture's per-task tower widths (``<arch>.tower``), checked."""
  return positive_ints(f"{arch}.tower", tower)


# ----------------------------------------------------------------------------
# The parts.
# ----------------------------------------------------------------------------


class Parts:
  """The flax modules and sizes of one architecture, its heads, towers and
  per-task keys: what the architectures' build functions make a model from.

  Args:
    trunk: the checked :class:`Trunk`.
    taskset: the tasks.
    input_shape: one example's input shape.
    cond_mode: the conditioning of the trunk's dense layers on the one-hot
      task descriptor (:data:`mtljax.models.encoders.COND_MODES`), or None.
    cond_layers: the conditioned dense layers (with ``cond_mode``).
    tower: the per-task ReLU towers' widths (``()``: no tower).
  """

  def __init__(self, trunk: Trunk, taskset: tasks_lib.TaskSet, input_shape: Sequence[int], *,
               cond_mode: str | None = None, cond_layers: Sequence[int] = (),
               tower: Sequence[int] = ()):
    self.trunk, self.taskset = trunk, taskset
    self.input_shape, self.tower = tuple(int(s) for s in input_shape), tuple(tower)
    self.conditioned = cond_mode is not None
    self.per_task_heads = trunk.heads == "per_task" or (trunk.heads == "auto" and
                                                        not self.conditioned)
    self.num_tasks = len(taskset)
    module = {"mlp": lambda: encoders.MLP(trunk.hidden, cond_mode, tuple(cond_layers)),
              "cnn": lambda: encoders.CNN(trunk.channels, trunk.hidden, cond_mode,
                                          tuple(cond_layers)),
              "fcn": lambda: encoders.FCN(trunk.channels, trunk.hidden, cond_mode,
                                          tuple(cond_layers)),
              "vit": lambda: vit_lib.ViT(trunk.vit_width, trunk.vit_depth, trunk.vit_heads,
                                         trunk.vit_mlp_dim, trunk.patch_size, trunk.vit_eps)}
    if trunk.encoder in VITS and cond_mode is not None:
      raise ValueError(f"encoder={trunk.encoder!r} is not conditioned on the task; it is built "
                       f"for {VIT_ARCHS}.")
    self.module = module[trunk.encoder]()
    # The rank of one example's features: 1 ([F]) or 3 ([H, W, F], per pixel).
    self.feat_rank = 3 if trunk.encoder in DENSE_ENCODERS else 1
    self.x_example = jnp.zeros((1,) + self.input_shape, jnp.float32)
    self.z_example = (jnp.zeros((self.num_tasks,), jnp.float32) if self.conditioned
                      else None)
    self.trunk_dim = jax.eval_shape(
        lambda: self.trunk_apply(self.trunk_init(jax.random.key(0)), self.x_example,
                                 self.z_example)).shape[-1]
    self.stream_ids = jnp.asarray(taskset.stream_ids, jnp.int32)
    self.local_index = jnp.asarray(taskset.local_index)

  @property
  def layer_names(self) -> tuple[str, ...]:
    return self.trunk.layer_names

  @property
  def heads_home(self) -> str:
    """Where the heads live: ``tasks`` (a row per task) or ``shared`` (one
    head per task group)."""
    return "tasks" if self.per_task_heads else "shared"

  def trunk_init(self, rng):
    return self.module.init(rng, self.x_example, self.z_example)["params"]

  def trunk_apply(self, p, x, z=None):
    return self.module.apply({"params": p}, x, z)

  def per_task_keys(self, rng, members) -> jax.Array:
    """Keys ``fold_in(rng, stream_id)`` of the tasks ``members``."""
    return jax.vmap(lambda s: jax.random.fold_in(rng, s))(self.stream_ids[members])

  def all_task_keys(self, rng) -> jax.Array:
    return self.per_task_keys(rng, np.arange(self.num_tasks))

  # --- heads -----------------------------------------------------------------

  def heads_init(self, rng, feat_dim: int) -> dict:
    """``{group: {"kernel", "bias"}}``: per-task stacks ``[T_g, ...]`` or one
    head per group."""
    ts, out = self.taskset, {}

    def one(key, out_dim):
      k = jax.random.normal(key, (feat_dim, out_dim), jnp.float32) / np.sqrt(feat_dim)
      return {"kernel": k, "bias": jnp.zeros((out_dim,), jnp.float32)}
    for gi, g in enumerate(ts.groups):
      dim = ts.group_task(g).out_dim
      if self.per_task_heads:  # keyed by stream id only, so subsets init alike
        out[g] = jax.vmap(lambda k, d=dim: one(k, d))(
            self.per_task_keys(rng, ts.group_members(g)))
      else:
        out[g] = one(jax.random.fold_in(rng, gi), dim)
    return out

  def _per_slot(self, feats) -> bool:
    """Whether ``feats`` has a slot axis (``[K, B, ...]``) or is read by every
    slot (``[B, ...]``)."""
    return feats.ndim == self.feat_rank + 2

  def heads_apply(self, head_params, feats, task_ids) -> dict:
    """``{group: [K, B, out]}`` from per-slot ``feats [K, B, F]`` or from
    ``feats [B, F]`` read by every slot (one matmul for all slots' heads);
    per-pixel features ``[K, B, H, W, F]`` / ``[B, H, W, F]`` give
    ``[K, B, H, W, out]`` (a linear head at every pixel)."""
    outs, k = {}, task_ids.shape[0]
    slices = tasks_lib.static_group_slices(self.taskset, task_ids)
    if slices is not None and self.per_task_heads:
      return self._static_heads(head_params, feats, task_ids, slices)
    for g in self.taskset.groups:
      hp = head_params[g]
      if self.per_task_heads:
        rows = jnp.clip(self.local_index[task_ids], 0, hp["kernel"].shape[0] - 1)
        hp = jax.tree.map(lambda a: a[rows], hp)
        outs[g] = self._heads(feats, hp)
      else:
        out = feats @ hp["kernel"] + hp["bias"]
        outs[g] = out if self._per_slot(feats) else jnp.broadcast_to(out, (k,) + out.shape)
    return outs

  def _heads(self, feats, hp):
    """Slot k's head ``hp[k]`` on its features: ``[K, B, ..., out]``."""
    spec = "kbf,kfo->kbo" if self._per_slot(feats) else "bf,kfo->kbo"
    if self.feat_rank == 3:
      spec = spec.replace("b", "bhw")
    bias = hp["bias"].reshape(hp["bias"].shape[:1] + (1,) * self.feat_rank
                              + hp["bias"].shape[1:])
    return jnp.einsum(spec, feats, hp["kernel"]) + bias

  def head_kernels(self, head_params, task_ids) -> dict:
    """``{group: [K, F, out]}``: each slot's kernel of the group's per-task heads
    (a clipped row for slots outside the group, as :meth:`heads_apply` reads)."""
    out = {}
    for g in self.taskset.groups:
      kernel = head_params[g]["kernel"]
      out[g] = kernel[jnp.clip(self.local_index[task_ids], 0, kernel.shape[0] - 1)]
    return out

  def _static_heads(self, head_params, feats, task_ids, slices) -> dict:
    """Per-task heads on a static slot layout: each group's heads run on its
    own slots only; the other slots' rows are zero (never read by the loss)."""
    outs, k = {}, task_ids.shape[0]
    for g, sl in slices.items():
      hp = head_params[g]
      rows = self.taskset.local_index[task_ids[sl]]
      if not np.array_equal(rows, np.arange(hp["kernel"].shape[0])):
        hp = jax.tree.map(lambda a, r=rows: a[r], hp)
      out = self._heads(feats[sl] if self._per_slot(feats) else feats, hp)
      outs[g] = jnp.pad(out, ((sl.start, k - sl.stop),) + ((0, 0),) * (out.ndim - 1))
    return outs

  def head_rows(self) -> dict[str, np.ndarray]:
    if not self.per_task_heads:
      return {}
    return {f"heads/{g}": self.taskset.group_members(g) for g in self.taskset.groups}

  # --- towers ----------------------------------------------------------------

  def towers_init(self, rng, in_dim: int):
    """Per-task ReLU towers of widths ``tower`` on ``[B, in_dim]``
    features, stacked ``[T, ...]``; None without a tower."""
    if not self.tower:
      return None
    mod, f_example = encoders.MLP(self.tower), jnp.zeros((1, in_dim), jnp.float32)
    return jax.vmap(lambda r: mod.init(r, f_example)["params"])(self.all_task_keys(rng))

  def towers_apply(self, towers, h, task_ids, h_axis):
    """Slot k's tower on ``h`` (``[K, B, F]`` with ``h_axis=0``, or ``[B, F]``
    read by every slot with ``h_axis=None``): ``[K, B, F']`` (``h`` unchanged
    without a tower)."""
    if not self.tower:
      return h
    mod = encoders.MLP(self.tower)
    tp = jax.tree.map(lambda a: a[task_ids], towers)
    return jax.vmap(lambda p, a: mod.apply({"params": p}, a), in_axes=(0, h_axis))(tp, h)

  def tower_groups(self) -> list[tuple[str, str]]:
    return [(f"tower_{j}", rf"^tasks/towers/layer_{j}/") for j in range(len(self.tower))]

  def feat_dim(self, in_dim: int) -> int:
    """The heads' input width after the towers."""
    return self.tower[-1] if self.tower else in_dim

  # --- layer groups ----------------------------------------------------------

  def layer_groups(self, trunk_prefixes: str, extra: Sequence[tuple[str, str]] = ()
                   ) -> tuple[tuple[str, str], ...]:
    """Trunk layers (under ``trunk_prefixes``, a regex alternative such as
    ``shared/trunk``), then ``extra`` groups, then the heads."""
    groups = [(n, rf"^({trunk_prefixes})/{n}(/|$)") for n in self.layer_names]
    return tuple(groups) + tuple(extra) + (("heads", r"^(shared|tasks)/heads/"),)

