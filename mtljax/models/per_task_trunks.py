"""Per-task trunks: ``independent`` (one network per task), ``soft`` (the same
plus the soft sharing penalty on the trunks' differences) and ``cross_stitch``
(one column per task, activations mixed after every trunk layer); see
:mod:`mtljax.models.multitask`."""

from __future__ import annotations

import re
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtljax.models import encoders
from mtljax.models import parts as parts_lib


def per_task_trunks_model(parts: parts_lib.Parts) -> dict:
  """``independent`` or ``soft`` (with its penalty): the
  :class:`~mtljax.models.multitask.Model` fields."""
  spec, num_tasks = parts.spec, parts.num_tasks

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
  penalty = _soft_penalty(spec, num_tasks) if spec.arch == "soft" else None
  return {"init": init, "apply": apply, "task_rows": rows, "penalty": penalty,
          "layer_groups": parts.layer_groups("tasks/trunk")}


def _soft_penalty(spec: parts_lib.ArchSpec, num_tasks: int) -> Callable:
  try:
    soft_re = re.compile(spec.soft_layers or ".*")
  except re.error as e:
    raise ValueError(f"config.model.soft_layers={spec.soft_layers!r}: {e}.") from None
  paths = [n for n in spec.layer_names if soft_re.search(f"trunk/{n}/")]
  if not paths:
    raise ValueError(f"config.model.soft_layers={spec.soft_layers!r} matches no trunk "
                     f"layer; layers are {[f'trunk/{n}/' for n in spec.layer_names]}.")
  lam = spec.soft_lambda

  def penalty(params):
    """``lambda sum_{t<t'} ||theta^t - theta^t'||`` over the chosen layers."""
    cols = params["tasks"]["trunk"]
    leaves = [leaf.reshape(num_tasks, -1) for n in paths for leaf in jax.tree.leaves(cols[n])]
    if spec.soft_norm == "squared":  # sum_{t<t'} ||a_t - a_t'||^2 = T sum ||a_t - mean||^2
      return lam * num_tasks * sum(jnp.sum(jnp.square(a - a.mean(axis=0))) for a in leaves)
    # Pairwise squared distances from Gram matrices: O(T^2 + T D) memory.
    d2 = sum(jnp.maximum(jnp.sum(a * a, 1)[:, None] + jnp.sum(a * a, 1)[None, :]
                         - 2.0 * a @ a.T, 0.0) for a in leaves)
    upper = jnp.triu(jnp.ones((num_tasks, num_tasks), bool), 1) & (d2 > 0)
    return lam * jnp.sum(jnp.where(upper, jnp.sqrt(jnp.where(upper, d2, 1.0)), 0.0))
  return penalty


def cross_stitch_model(parts: parts_lib.Parts) -> dict:
  """``cross_stitch``: the :class:`~mtljax.models.multitask.Model` fields."""
  spec, num_tasks = parts.spec, parts.num_tasks

  def init(rng):
    r_trunk, r_heads, _ = jax.random.split(rng, 3)
    off = (1.0 - spec.stitch_init) / max(num_tasks - 1, 1)
    alpha = jnp.full((num_tasks, num_tasks), off, jnp.float32)
    alpha = alpha.at[jnp.diag_indices(num_tasks)].set(
        spec.stitch_init if num_tasks > 1 else 1.0)
    params = {"shared": {"stitch": {n: alpha for n in spec.layer_names}},
              "tasks": {"trunk": jax.vmap(parts.trunk_init)(parts.all_task_keys(r_trunk))}}
    params[parts.heads_home]["heads"] = parts.heads_init(r_heads, parts.trunk_dim)
    return params

  def stitched(params, xk):
    """All T task columns on one slot's inputs, mixed after every layer: [T, B, F]."""
    cols, alpha = params["tasks"]["trunk"], params["shared"]["stitch"]
    h = xk if xk.ndim == 4 or spec.encoder == "mlp" else xk[..., None]
    h = jnp.broadcast_to(h, (num_tasks,) + h.shape)
    if spec.encoder == "mlp":
      h = h.reshape(num_tasks, h.shape[1], -1)
    for name in spec.layer_names:
      if name.startswith("conv"):
        conv = encoders.PatchConv(spec.channels[int(name[5:])], 3)
        h = jax.vmap(lambda p, a: nn.relu(conv.apply({"params": p}, a)))(cols[name], h)
        if h.shape[2] >= 2 and h.shape[3] >= 2:
          h = jax.vmap(lambda a: nn.max_pool(a, (2, 2), strides=(2, 2)))(h)
      else:
        if h.ndim > 3:
          h = h.reshape(num_tasks, h.shape[1], -1)
        dense = encoders.CondDense(spec.hidden[int(name[6:])])
        h = jax.vmap(lambda p, a: nn.relu(dense.apply({"params": p}, a)))(cols[name], h)
      h = jnp.einsum("ts,s...->t...", alpha[name], h)
    return h.reshape(num_tasks, h.shape[1], -1)

  def apply(params, x, task_ids):
    feats = jax.vmap(lambda xk, t: stitched(params, xk)[t])(x, task_ids)
    return parts.heads_apply(params[parts.heads_home]["heads"], feats, task_ids)

  rows = {"trunk": np.arange(num_tasks, dtype=np.int32), **parts.head_rows()}
  return {"init": init, "apply": apply, "task_rows": rows,
          "layer_groups": parts.layer_groups("tasks/trunk|shared/stitch")}
