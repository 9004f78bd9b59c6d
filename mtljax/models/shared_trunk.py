"""The shared trunk: ``multi_head`` and the conditioned architectures
(``concat``, ``additive``, ``multiplicative``): one network for every task,
with per-task heads or one head per task group (see
:mod:`mtljax.models.multitask`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtljax.models import parts as parts_lib


def shared_trunk_model(parts: parts_lib.Parts) -> dict:
  """``multi_head``, ``concat``, ``additive`` or ``multiplicative``: the
  :class:`~mtljax.models.multitask.Model` fields."""
  spec, num_tasks = parts.spec, parts.num_tasks
  heads_home = parts.heads_home

  def init(rng):
    r_trunk, r_heads, _ = jax.random.split(rng, 3)
    params = {"shared": {"trunk": parts.trunk_init(r_trunk)}, "tasks": {}}
    params[heads_home]["heads"] = parts.heads_init(r_heads, parts.trunk_dim)
    return params

  def apply(params, x, task_ids):
    p = params["shared"]["trunk"]
    if spec.conditioned:
      z = jax.nn.one_hot(task_ids, num_tasks, dtype=x.dtype)
      feats = jax.vmap(lambda xk, zk: parts.trunk_apply(p, xk, zk))(x, z)
    else:
      feats = jax.vmap(lambda xk: parts.trunk_apply(p, xk))(x)
    return parts.heads_apply(params[heads_home]["heads"], feats, task_ids)

  out = {"init": init, "apply": apply, "task_rows": parts.head_rows(),
         "layer_groups": parts.layer_groups("shared/trunk")}
  if spec.conditioned:
    return out  # the task descriptor enters the trunk: nothing is task-independent

  if spec.per_task_heads:
    def encode(shared, x):
      return parts.trunk_apply(shared["trunk"], x)               # [B, F]

    def decode(task_params, rep, x, task_ids):
      del x
      return parts.heads_apply(task_params["heads"], rep, task_ids)

    def rep_heads(task_params, task_ids):
      return parts.head_kernels(task_params["heads"], task_ids)
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
