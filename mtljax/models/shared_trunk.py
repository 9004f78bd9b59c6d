"""The shared trunk: ``multi_head`` and the conditioned architectures
(``concat``, ``additive``, ``multiplicative``): one network for every task,
with per-task heads or one head per task group (see
:mod:`mtljax.models.multitask`)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtljax import tasks as tasks_lib
from mtljax.models import backbone_models
from mtljax.models import parts as parts_lib


@dataclasses.dataclass(frozen=True)
class ConditionedHParams:
  """``concat`` / ``additive`` / ``multiplicative``
  (``config.model.<arch>.*``; :mod:`mtljax.models.encoders`).

  Attributes:
    cond_layers: the dense layers (``layer_<l>``, counted after the
      convolutions) conditioned on the one-hot task descriptor; at least one.
  """
  cond_layers: tuple[int, ...] = (0,)

  def checked(self, arch: str, trunk: parts_lib.Trunk) -> ConditionedHParams:
    try:
      layers = tuple(self.cond_layers)
    except TypeError:
      layers = None
    if layers is None or not all(isinstance(l, (int, np.integer)) and not isinstance(l, bool)
                                 for l in layers):
      raise ValueError(f"{arch}.cond_layers must be dense layer indices, got "
                       f"{self.cond_layers!r}.")
    layers = tuple(int(l) for l in layers)
    if not layers:
      raise ValueError(f"{arch}.cond_layers is empty; {arch!r} needs at least one dense layer "
                       "to condition.")
    bad = [l for l in layers if not 0 <= l < len(trunk.hidden)]
    if bad:
      raise ValueError(f"{arch}.cond_layers={layers}: layer(s) {bad} do not exist; the "
                       f"encoder has {len(trunk.hidden)} dense layers (hidden={trunk.hidden}).")
    return dataclasses.replace(self, cond_layers=layers)


def multi_head(arch: str, trunk: parts_lib.Trunk, hparams: None,
               taskset: tasks_lib.TaskSet, input_shape: Sequence[int]) -> dict:
  """``multi_head``: one trunk, heads per task (or per group): the
  :class:`~mtljax.models.multitask.Model` fields."""
  del arch, hparams
  if trunk.encoder in parts_lib.BACKBONES:
    return backbone_models.build("multi_head", trunk, taskset, input_shape)
  return shared_trunk_model(parts_lib.Parts(trunk, taskset, input_shape))


def conditioned(arch: str, trunk: parts_lib.Trunk, hparams: ConditionedHParams,
                taskset: tasks_lib.TaskSet, input_shape: Sequence[int]) -> dict:
  """``concat``, ``additive`` or ``multiplicative`` (``arch`` is the
  conditioning): the :class:`~mtljax.models.multitask.Model` fields."""
  return shared_trunk_model(parts_lib.Parts(trunk, taskset, input_shape, cond_mode=arch,
                                            cond_layers=hparams.cond_layers))


def shared_trunk_model(parts: parts_lib.Parts) -> dict:
  """One network for every task (conditioned on the task when
  ``parts.conditioned``): the :class:`~mtljax.models.multitask.Model` fields."""
  num_tasks = parts.num_tasks
  heads_home = parts.heads_home

  def init(rng):
    r_trunk, r_heads, _ = jax.random.split(rng, 3)
    params = {"shared": {"trunk": parts.trunk_init(r_trunk)}, "tasks": {}}
    params[heads_home]["heads"] = parts.heads_init(r_heads, parts.trunk_dim)
    return params

  def apply(params, x, task_ids):
    p = params["shared"]["trunk"]
    if parts.conditioned:
      z = jax.nn.one_hot(task_ids, num_tasks, dtype=x.dtype)
      feats = jax.vmap(lambda xk, zk: parts.trunk_apply(p, xk, zk))(x, z)
    else:
      feats = jax.vmap(lambda xk: parts.trunk_apply(p, xk))(x)
    return parts.heads_apply(params[heads_home]["heads"], feats, task_ids)

  out = {"init": init, "apply": apply, "task_rows": parts.head_rows(),
         "layer_groups": parts.layer_groups("shared/trunk")}
  if parts.conditioned:
    return out  # the task descriptor enters the trunk: nothing is task-independent

  if parts.per_task_heads:
    def encode(shared, x):
      return parts.trunk_apply(shared["trunk"], x)               # [B, F]

    def decode(task_params, rep, x, task_ids):
      del x
      return parts.heads_apply(task_params["heads"], rep, task_ids)

    def rep_heads(task_params, task_ids):
      return parts.head_kernels(task_params["heads"], task_ids)
    if parts.feat_rank == 1:  # (the factored Gram reads rep [B, F]; per-pixel reps do not)
      out["rep_heads"] = rep_heads
  else:  # a pooled model: the whole network is task-independent
    def encode(shared, x):
      feats = parts.trunk_apply(shared["trunk"], x)
      return {g: o[0] for g, o in parts.heads_apply(shared["heads"], feats,
                                                     jnp.zeros((1,), jnp.int32)).items()}

    def decode(task_params, rep, x, task_ids):
      del task_params, x
      k = task_ids.shape[0]
      return {g: jnp.broadcast_to(o, (k,) + o.shape) for g, o in rep.items()}
  return {**out, "encode": encode, "decode": decode}
