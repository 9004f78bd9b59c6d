"""Per-task trunks: ``independent`` (one network per task), ``soft`` (the same
plus the soft sharing penalty on the trunks' differences), ``cross_stitch``
(one column per task, activations mixed after every trunk layer) and ``ltb``
(one column per task, each column's input drawn from one parent column
between layers: :mod:`mtljax.models.branching`); see
:mod:`mtljax.models.multitask`."""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtljax import tasks as tasks_lib
from mtljax.models import backbone_models
from mtljax.models import branching
from mtljax.models import encoders
from mtljax.models import parts as parts_lib

SOFT_NORMS = ("squared", "l2")


@dataclasses.dataclass(frozen=True)
class SoftHParams:
  """``soft`` (``config.model.soft.*``): the penalty
  ``lambda_ sum_{t<t'} ||theta^t - theta^t'||`` on the per-task trunks.

  Attributes:
    lambda_: the penalty's weight, >= 0 (0: ``independent`` plus a zero penalty).
    norm: ``"squared"`` (squared L2) or ``"l2"`` (the plain norm); :data:`SOFT_NORMS`.
    layers: a regex over the trunk layers' paths ``trunk/<layer>/`` whose
      parameters the penalty covers (``""``: every trunk layer); it must match one.
  """
  lambda_: float = 0.0
  norm: str = "squared"
  layers: str = ""

  def checked(self, arch: str, trunk: parts_lib.Trunk) -> SoftHParams:
    lam = parts_lib.finite_number(f"{arch}.lambda_", self.lambda_)
    if lam < 0:
      raise ValueError(f"{arch}.lambda_ must be >= 0, got {self.lambda_}.")
    parts_lib.one_of(f"{arch}.norm", self.norm, SOFT_NORMS)
    soft_layers(arch, self.layers, trunk.layer_names)
    return dataclasses.replace(self, lambda_=lam)


@dataclasses.dataclass(frozen=True)
class CrossStitchHParams:
  """``cross_stitch`` (``config.model.cross_stitch.*``).

  Attributes:
    init_diagonal: the stitch units' diagonal at init, in [0, 1]; the rest of
      each row is ``(1 - init_diagonal) / (T - 1)`` (0.9: the paper's; 1: the
      identity, i.e. independent networks).
    ones_init: every entry of every unit 1 at init (LibMTL's
      ``Cross_stitch``: ``torch.ones(4, T, T)``) instead of the rows above;
      ``init_diagonal`` is then unused.
  """
  init_diagonal: float = 0.9
  ones_init: bool = False

  def checked(self, arch: str, trunk: parts_lib.Trunk) -> CrossStitchHParams:
    del trunk
    value = parts_lib.finite_number(f"{arch}.init_diagonal", self.init_diagonal)
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"{arch}.init_diagonal must be in [0, 1], got {self.init_diagonal}.")
    if not isinstance(self.ones_init, (bool, np.bool_)):
      raise ValueError(f"{arch}.ones_init must be True or False, got {self.ones_init!r}.")
    return dataclasses.replace(self, init_diagonal=value, ones_init=bool(self.ones_init))


def soft_layers(arch: str, pattern: str, layer_names: Sequence[str]) -> list[str]:
  """The trunk layers whose path ``trunk/<layer>/`` the regex ``pattern``
  (``""``: every layer) matches; raises when it is not a regex or matches none."""
  try:
    soft_re = re.compile(pattern or ".*")
  except re.error as e:
    raise ValueError(f"{arch}.layers={pattern!r}: {e}.") from None
  names = [n for n in layer_names if soft_re.search(f"trunk/{n}/")]
  if not names:
    raise ValueError(f"{arch}.layers={pattern!r} matches no trunk layer; layers are "
                     f"{[f'trunk/{n}/' for n in layer_names]}.")
  return names


def independent(arch: str, trunk: parts_lib.Trunk, hparams: None,
                taskset: tasks_lib.TaskSet, input_shape: Sequence[int]) -> dict:
  """``independent``: one network per task; the
  :class:`~mtljax.models.multitask.Model` fields."""
  del arch, hparams
  if trunk.encoder in parts_lib.BACKBONES:
    return backbone_models.build("independent", trunk, taskset, input_shape)
  return per_task_trunks_model(parts_lib.Parts(trunk, taskset, input_shape))


def soft(arch: str, trunk: parts_lib.Trunk, hparams: SoftHParams,
         taskset: tasks_lib.TaskSet, input_shape: Sequence[int]) -> dict:
  """``soft``: ``independent`` plus the sharing penalty; the
  :class:`~mtljax.models.multitask.Model` fields."""
  parts = parts_lib.Parts(trunk, taskset, input_shape)
  penalty = _soft_penalty(soft_layers(arch, hparams.layers, parts.layer_names), hparams,
                          parts.num_tasks)
  return per_task_trunks_model(parts, penalty)


def cross_stitch(arch: str, trunk: parts_lib.Trunk, hparams: CrossStitchHParams,
                 taskset: tasks_lib.TaskSet, input_shape: Sequence[int]) -> dict:
  """``cross_stitch``: the :class:`~mtljax.models.multitask.Model` fields
  (on a ResNet encoder: stitched ResNet stages, LibMTL's form,
  :func:`mtljax.models.backbone_models.resnet_cross_stitch`)."""
  del arch
  if trunk.encoder in parts_lib.RESNETS:
    return backbone_models.build("cross_stitch", trunk, taskset, input_shape, hparams)
  return cross_stitch_model(parts_lib.Parts(trunk, taskset, input_shape),
                            hparams.init_diagonal, hparams.ones_init)


def per_task_trunks_model(parts: parts_lib.Parts, penalty: Callable | None = None) -> dict:
  """One trunk per task (with ``penalty``, soft sharing's, or none): the
  :class:`~mtljax.models.multitask.Model` fields."""
  num_tasks = parts.num_tasks

  home = parts.heads_home

  def init(rng):
    r_trunk, r_heads, _ = jax.random.split(rng, 3)
    params = {"shared": {}, "tasks": {
        "trunk": jax.vmap(parts.trunk_init)(parts.all_task_keys(r_trunk))}}
    params[home]["heads"] = parts.heads_init(r_heads, parts.trunk_dim)
    return params

  def apply(params, x, task_ids):
    tp = jax.tree.map(lambda a: a[task_ids], params["tasks"]["trunk"])
    feats = jax.vmap(parts.trunk_apply)(tp, x)
    return parts.heads_apply(params[home]["heads"], feats, task_ids)

  rows = {"trunk": np.arange(num_tasks, dtype=np.int32), **parts.head_rows()}
  return {"init": init, "apply": apply, "task_rows": rows, "penalty": penalty,
          "layer_groups": parts.layer_groups("tasks/trunk")}


def _soft_penalty(paths: list[str], hparams: SoftHParams, num_tasks: int) -> Callable:
  lam, norm = hparams.lambda_, hparams.norm

  def penalty(params):
    """``lambda sum_{t<t'} ||theta^t - theta^t'||`` over the chosen layers."""
    cols = params["tasks"]["trunk"]
    leaves = [leaf.reshape(num_tasks, -1) for n in paths for leaf in jax.tree.leaves(cols[n])]
    if norm == "squared":  # sum_{t<t'} ||a_t - a_t'||^2 = T sum ||a_t - mean||^2
      return lam * num_tasks * sum(jnp.sum(jnp.square(a - a.mean(axis=0))) for a in leaves)
    # Pairwise squared distances from Gram matrices: O(T^2 + T D) memory.
    d2 = sum(jnp.maximum(jnp.sum(a * a, 1)[:, None] + jnp.sum(a * a, 1)[None, :]
                         - 2.0 * a @ a.T, 0.0) for a in leaves)
    upper = jnp.triu(jnp.ones((num_tasks, num_tasks), bool), 1) & (d2 > 0)
    return lam * jnp.sum(jnp.where(upper, jnp.sqrt(jnp.where(upper, d2, 1.0)), 0.0))
  return penalty


def mixed_columns(parts: parts_lib.Parts, cols, mixes: dict, xk):
  """All T task columns (``cols``, per-task trunk parameters ``[T, ...]``) on
  one slot's inputs ``xk``, the columns' outputs after layer ``n`` mixed by
  ``mixes[n] [T, T]`` (``h~_t = sum_s mixes[n][t, s] h_s``; layers not in
  ``mixes`` unmixed): ``[T, B, F]``."""
  trunk, num_tasks = parts.trunk, parts.num_tasks
  h = xk if xk.ndim == 4 or trunk.encoder == "mlp" else xk[..., None]
  h = jnp.broadcast_to(h, (num_tasks,) + h.shape)
  if trunk.encoder == "mlp":
    h = h.reshape(num_tasks, h.shape[1], -1)
  for name in trunk.layer_names:
    if name.startswith("conv"):
      conv = encoders.PatchConv(trunk.channels[int(name[5:])], 3)
      h = jax.vmap(lambda p, a: nn.relu(conv.apply({"params": p}, a)))(cols[name], h)
      if h.shape[2] >= 2 and h.shape[3] >= 2:
        h = jax.vmap(lambda a: nn.max_pool(a, (2, 2), strides=(2, 2)))(h)
    else:
      if h.ndim > 3:
        h = h.reshape(num_tasks, h.shape[1], -1)
      dense = encoders.CondDense(trunk.hidden[int(name[6:])])
      h = jax.vmap(lambda p, a: nn.relu(dense.apply({"params": p}, a)))(cols[name], h)
    if name in mixes:
      h = jnp.einsum("ts,s...->t...", mixes[name].astype(h.dtype), h)
  return h.reshape(num_tasks, h.shape[1], -1)


def cross_stitch_model(parts: parts_lib.Parts, init_diagonal: float,
                       ones_init: bool = False) -> dict:
  """One column per task, mixed after every trunk layer by stitch units
  initialised to ``init_diagonal`` on the diagonal (or ones): the
  :class:`~mtljax.models.multitask.Model` fields."""
  trunk, num_tasks = parts.trunk, parts.num_tasks

  def init(rng):
    r_trunk, r_heads, _ = jax.random.split(rng, 3)
    # One array per layer: an eager init must not return one buffer twice
    # (a donated state holding it twice is refused).
    params = {"shared": {"stitch": {n: backbone_models.stitch_init(num_tasks, init_diagonal,
                                                                   ones_init)
                                    for n in trunk.layer_names}},
              "tasks": {"trunk": jax.vmap(parts.trunk_init)(parts.all_task_keys(r_trunk))}}
    params[parts.heads_home]["heads"] = parts.heads_init(r_heads, parts.trunk_dim)
    return params

  def apply(params, x, task_ids):
    cols, alpha = params["tasks"]["trunk"], params["shared"]["stitch"]
    feats = jax.vmap(lambda xk, t: mixed_columns(parts, cols, alpha, xk)[t])(x, task_ids)
    return parts.heads_apply(params[parts.heads_home]["heads"], feats, task_ids)

  rows = {"trunk": np.arange(num_tasks, dtype=np.int32), **parts.head_rows()}
  return {"init": init, "apply": apply, "task_rows": rows,
          "layer_groups": parts.layer_groups("tasks/trunk|shared/stitch")}


def ltb(arch: str, trunk: parts_lib.Trunk, hparams: branching.LTBHParams,
        taskset: tasks_lib.TaskSet, input_shape: Sequence[int]) -> dict:
  """``ltb`` (Learning to Branch, :mod:`mtljax.models.branching`): the
  :class:`~mtljax.models.multitask.Model` fields (on a ResNet encoder:
  LibMTL's form over the stages,
  :func:`mtljax.models.backbone_models.resnet_ltb`)."""
  del arch
  if trunk.encoder in parts_lib.RESNETS:
    return backbone_models.build("ltb", trunk, taskset, input_shape, hparams)
  return ltb_model(parts_lib.Parts(trunk, taskset, input_shape), hparams)


def ltb_model(parts: parts_lib.Parts, hp: branching.LTBHParams) -> dict:
  """One column per task, each column's input before every trunk layer but the
  first drawn from one parent column (``shared/branch/<layer>``: the routing
  of ``<layer>``'s outputs); the sampler's key and clock in the model state.
  Every slot runs all T columns on its inputs (the routing needs them all,
  and the straight-through gradient reaches every parent)."""
  trunk, num_tasks = parts.trunk, parts.num_tasks
  branched = trunk.layer_names[:-1]

  def init(rng):
    r_trunk, r_heads, _ = jax.random.split(rng, 3)
    params = {"shared": {"branch": branching.logits_init(num_tasks, branched)},
              "tasks": {"trunk": jax.vmap(parts.trunk_init)(parts.all_task_keys(r_trunk))}}
    params[parts.heads_home]["heads"] = parts.heads_init(r_heads, parts.trunk_dim)
    return params

  def init_state(rng):
    return {"shared": {"branch": branching.sampler_init(rng)}, "tasks": {}}

  def apply(params, x, task_ids, state=None, train=False):
    alpha, sampler = branching.routing(params["shared"]["branch"], state["shared"]["branch"],
                                       hp, train)
    cols = params["tasks"]["trunk"]
    feats = jax.vmap(lambda xk, t: mixed_columns(parts, cols, alpha, xk)[t])(x, task_ids)
    outs = parts.heads_apply(params[parts.heads_home]["heads"], feats, task_ids)
    return outs, {"shared": {"branch": sampler}, "tasks": state["tasks"]}

  rows = {"trunk": np.arange(num_tasks, dtype=np.int32), **parts.head_rows()}
  return {"init": init, "apply": apply, "init_state": init_state, "task_rows": rows,
          "layer_groups": parts.layer_groups("tasks/trunk|shared/branch")}
