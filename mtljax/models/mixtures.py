"""Mixtures: ``mmoe`` (experts, a softmax gate per task), ``omoe`` (one gate
shared by every task), ``dselect_k`` (MMoE's experts with DSelect-k gates,
:mod:`mtljax.models.experts`) and ``shared_bottom`` (one shared trunk), each
followed by per-task towers and heads; see :mod:`mtljax.models.multitask`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtljax.models import experts
from mtljax.models import parts as parts_lib


def mixture_model(parts: parts_lib.Parts) -> dict:
  """``mmoe``, ``omoe``, ``shared_bottom`` or ``dselect_k``: the
  :class:`~mtljax.models.multitask.Model` fields."""
  spec, num_tasks = parts.spec, parts.num_tasks
  arch, tower = spec.arch, spec.tower
  in_dim = int(np.prod(spec.input_shape))
  per_task_gates = arch in ("mmoe", "dselect_k")
  gate_weights = (experts.dselect_gate(spec, in_dim) if arch == "dselect_k"
                  else experts.softmax_gate(spec.num_experts, in_dim))

  def init(rng):
    r_trunk, r_heads, r_extra = jax.random.split(rng, 3)
    shared, task_params = {}, {}
    if arch == "shared_bottom":
      shared["trunk"] = parts.trunk_init(r_trunk)
    else:
      shared["experts"] = jax.vmap(parts.trunk_init)(
          jax.random.split(r_trunk, spec.num_experts))
    if per_task_gates:  # keyed by stream id (dselect_k's gates are random)
      task_params["gates"] = jax.vmap(gate_weights.init)(
          parts.all_task_keys(jax.random.fold_in(r_extra, 1)))
    elif arch == "omoe":
      shared["gate"] = gate_weights.init(r_extra)
    if tower:
      task_params["towers"] = parts.towers_init(r_extra, parts.trunk_dim)
    params = {"shared": shared, "tasks": task_params}
    params[parts.heads_home]["heads"] = parts.heads_init(r_heads, parts.feat_dim(
        parts.trunk_dim))
    return params

  def gated(gate, x, experts_out):
    """``sum_e g(x)_e experts[e]``: ``[B, F]``."""
    return jnp.einsum("be,ebf->bf", gate_weights(gate, x), experts_out)

  def encode(shared, x):
    if arch == "shared_bottom":
      return parts.trunk_apply(shared["trunk"], x)                         # [B, F]
    experts_out = jax.vmap(lambda p: parts.trunk_apply(p, x))(shared["experts"])  # [E, B, F]
    return experts_out if per_task_gates else gated(shared["gate"], x, experts_out)

  def per_task(task_params, heads, rep, x, task_ids):
    h, h_axis = rep, None                       # [B, F] for every slot, or per slot
    if per_task_gates:
      gates = jax.tree.map(lambda a: a[task_ids], task_params["gates"])
      h, h_axis = jax.vmap(lambda g: gated(g, x, rep))(gates), 0           # [K, B, F]
    h = parts.towers_apply(task_params.get("towers"), h, task_ids, h_axis)  # [K, B, F']
    return parts.heads_apply(heads, h, task_ids)

  def apply(params, x, task_ids):
    heads = params[parts.heads_home]["heads"]
    outs = jax.vmap(lambda xk, t: per_task(params["tasks"], heads, encode(params["shared"], xk),
                                           xk, t[None]))(x, task_ids)
    return {g: o[:, 0] for g, o in outs.items()}

  def decode(task_params, rep, x, task_ids):
    return per_task(task_params, task_params["heads"], rep, x, task_ids)

  rows = {"towers": np.arange(num_tasks, dtype=np.int32)} if tower else {}
  if per_task_gates:
    rows["gates"] = np.arange(num_tasks, dtype=np.int32)
  rows.update(parts.head_rows())
  extra = [] if arch == "shared_bottom" else [("gates", r"^(tasks/gates|shared/gate)/")]
  out = {"init": init, "apply": apply, "task_rows": rows,
         "layer_groups": parts.layer_groups("shared/trunk|shared/experts",
                                            extra + parts.tower_groups())}
  if arch == "dselect_k" and not spec.dselect_per_example:
    out["penalty"] = experts.dselect_penalty(spec)
  if not spec.per_task_heads:  # the per-task part would read shared heads: per slot
    return out
  return {**out, "encode": encode, "decode": decode}
