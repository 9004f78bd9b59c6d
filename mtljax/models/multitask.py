"""Multi-task architectures as pure ``init`` / ``apply`` over one parameter tree.

::

    params = {"shared": {...},   # theta^sh
              "tasks":  {...}}   # theta^i, leaves stacked on a leading task axis

Architectures (``arch``), i.e. where parameters are shared:

* ``independent``: nothing shared. ``tasks/trunk/...`` is ``[T, ...]`` and
  ``tasks/heads/<group>/...`` is ``[T_g, ...]``; a step vmaps the sampled
  tasks' networks.
* ``multi_head``: ``shared/trunk/...`` and per-task heads ``tasks/heads/<group>``.
* ``soft``: soft parameter sharing -- per-task copies of the network (as
  ``independent``) plus the penalty ``lambda sum_{t<t'} ||theta^t - theta^t'||``
  (squared L2 by default, ``soft_norm="l2"`` for the plain norm) over the trunk
  parameters whose path matches ``soft_layers`` (a regex; default every trunk
  layer), returned by ``Model.penalty``. ``lambda = 0`` is ``independent``.
* ``cross_stitch`` (Misra et al. 2016): one network column per task
  (``tasks/trunk``); after every trunk layer l the columns' activations are
  mixed, ``h~_t = sum_t' alpha^l_{t t'} h_t'`` with learned ``alpha^l [T, T]``
  (``shared/stitch/layer_l``), initialised to 0.9 on the diagonal and
  0.1/(T-1) off it (the paper's init; ``stitch_init=1`` gives the identity, i.e.
  independent networks). Every slot runs all T columns on its inputs.
* ``mmoe`` (Ma et al. 2018): ``num_experts`` expert trunks (``shared/experts``,
  stacked), one softmax gate per task on the flattened input
  (``tasks/gates``), ``f_t(x) = sum_e softmax(x W_t + b_t)_e expert_e(x)``, then a
  per-task tower (``tasks/towers``, ReLU layers of sizes ``tower``) and head.
  ``omoe``: one gate shared by all tasks (``shared/gate``). ``shared_bottom``:
  one shared trunk, then the per-task towers and heads (the baseline; MMoE with
  one expert computes exactly this).
* ``concat`` / ``additive`` / ``multiplicative``: one network conditioned on the
  one-hot task descriptor ``z_i`` at ``cond_layers`` (see
  :mod:`mtljax.models.encoders`); its output layer is shared too, one per task
  group (``shared/heads/<group>``), so the conditioning is the only per-task
  signal. ``heads="per_task"`` gives these archs per-task heads instead.

Heads are linear: ``features @ kernel + bias``. A task group is the set of tasks
with the same kind and output size; groups are handled by a static loop over
groups (not tasks) inside one compiled function.

``apply(params, x, task_ids)`` takes ``x [K, B, ...]`` for K task slots and
returns ``{group: [K, B, out_g]}``, computed for every slot; the rows of slots
whose task is not in the group are meaningless and are masked by the loss.

Per-task random streams: the per-task parameters of task ``t`` are initialised
from ``fold_in(rng, stream_ids[t])``, so a subset run (see
:meth:`mtljax.tasks.TaskSet.subset`) gets the same initial values.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtljax import tasks as tasks_lib
from mtljax.models import encoders

ARCHS = ("independent", "multi_head", "concat", "additive", "multiplicative", "soft",
         "cross_stitch", "mmoe", "omoe", "shared_bottom")
SOFT_NORMS = ("squared", "l2")
PER_TASK_TRUNK = ("independent", "soft", "cross_stitch")
ENCODERS = ("mlp", "cnn")
HEADS = ("auto", "per_task", "shared")


@dataclasses.dataclass(frozen=True)
class Model:
  """A multi-task model: pure functions plus the layout of its per-task rows.

  Attributes:
    arch: the architecture name.
    taskset: the tasks, in task-axis order.
    init: ``init(rng) -> params``.
    apply: ``apply(params, x [K, B, ...], task_ids [K]) -> {group: [K, B, out]}``.
    task_rows: for each stacked subtree of ``params["tasks"]`` (by slash path
      below ``tasks/``), the global task id of each row, ``[rows]`` int32.
    features: ``features(params, x [K, B, ...], task_ids [K]) -> [K, B, F]``,
      the trunk's output (``apply`` is ``heads(params, features(...))``).
    heads: ``heads(params, feats [K, B, F], task_ids [K]) -> {group: [K, B, out]}``.
    shared_representation: True when the features are one task-independent
      representation ``Z = f(x; theta^sh)`` and everything after it is
      task-specific (``multi_head`` with per-task heads): what MGDA-UB needs.
    penalty: ``penalty(params) -> scalar`` added to the training objective
      (``soft``'s sharing penalty), or None.
  """
  arch: str
  taskset: tasks_lib.TaskSet
  init: Callable
  apply: Callable
  task_rows: dict[str, np.ndarray]
  features: Callable
  heads: Callable
  shared_representation: bool
  penalty: Callable | None = None


def make_model(arch: str, taskset: tasks_lib.TaskSet, input_shape: Sequence[int], *,
               encoder: str = "mlp", hidden: Sequence[int] = (128, 128),
               channels: Sequence[int] = (16, 32), cond_layers: Sequence[int] = (0,),
               heads: str = "auto", soft_lambda: float = 0.0, soft_norm: str = "squared",
               soft_layers: str = "", stitch_init: float = 0.9, num_experts: int = 8,
               tower: Sequence[int] = (8,)) -> Model:
  """Builds a :class:`Model`; every name and size is checked here, before jit."""
  if arch not in ARCHS:
    raise ValueError(f"config.model.arch={arch!r} is not one of {ARCHS}.")
  if encoder not in ENCODERS:
    raise ValueError(f"config.model.encoder={encoder!r} is not one of {ENCODERS}.")
  if heads not in HEADS:
    raise ValueError(f"config.model.heads={heads!r} is not one of {HEADS}.")
  hidden = tuple(int(h) for h in hidden)
  channels = tuple(int(c) for c in channels)
  if any(h <= 0 for h in hidden + channels):
    raise ValueError(f"config.model.hidden/channels must be positive, got "
                     f"{hidden}/{channels}.")
  conditioned = arch in encoders.COND_MODES
  cond_layers = tuple(int(l) for l in cond_layers) if conditioned else ()
  if conditioned:
    if not cond_layers:
      raise ValueError(f"config.model.cond_layers is empty; arch {arch!r} needs at "
                       "least one dense layer to condition.")
    bad = [l for l in cond_layers if not 0 <= l < len(hidden)]
    if bad:
      raise ValueError(f"config.model.cond_layers={cond_layers}: layer(s) {bad} do not "
                       f"exist; the encoder has {len(hidden)} dense layers "
                       f"(config.model.hidden={hidden}).")
  if soft_norm not in SOFT_NORMS:
    raise ValueError(f"config.model.soft_norm={soft_norm!r} is not one of {SOFT_NORMS}.")
  if soft_lambda < 0:
    raise ValueError(f"config.model.soft_lambda must be >= 0, got {soft_lambda}.")
  if arch in ("mmoe", "omoe") and num_experts < 1:
    raise ValueError(f"config.model.num_experts must be >= 1, got {num_experts}.")
  if not 0.0 <= stitch_init <= 1.0:
    raise ValueError(f"config.model.stitch_init must be in [0, 1], got {stitch_init}.")
  tower = tuple(int(t) for t in tower)
  if any(t <= 0 for t in tower):
    raise ValueError(f"config.model.tower must be positive, got {tower}.")
  if encoder == "cnn" and len(input_shape) not in (2, 3):
    raise ValueError(f"config.model.encoder='cnn' needs image inputs [H, W] or "
                     f"[H, W, C], got input shape {tuple(input_shape)}.")

  mode = arch if conditioned else None
  if encoder == "mlp":
    trunk = encoders.MLP(hidden, mode, cond_layers)
  else:
    trunk = encoders.CNN(channels, hidden, mode, cond_layers)
  per_task_heads = heads == "per_task" or (heads == "auto" and not conditioned)
  moe = arch in ("mmoe", "omoe", "shared_bottom")
  num_tasks = len(taskset)
  stream_ids = jnp.asarray(taskset.stream_ids, jnp.int32)
  local_index = jnp.asarray(taskset.local_index)
  groups = taskset.groups
  x_example = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
  z_example = jnp.zeros((num_tasks,), jnp.float32) if conditioned else None
  trunk_dim = jax.eval_shape(
      lambda: trunk.apply(trunk.init(jax.random.key(0), x_example, z_example),
                          x_example, z_example)).shape[-1]
  tower_mod = encoders.MLP(tower)
  f_example = jnp.zeros((1, trunk_dim), jnp.float32)
  feat_dim = (tower[-1] if tower else trunk_dim) if moe else trunk_dim
  in_dim = int(np.prod(input_shape))
  layer_names = ([f"conv_{i}" for i in range(len(channels))] if encoder == "cnn" else []
                 ) + [f"layer_{j}" for j in range(len(hidden))]
  if arch == "soft":
    try:
      soft_re = re.compile(soft_layers or ".*")
    except re.error as e:
      raise ValueError(f"config.model.soft_layers={soft_layers!r}: {e}.") from None
    soft_paths = [n for n in layer_names if soft_re.search(f"trunk/{n}/")]
    if not soft_paths:
      raise ValueError(f"config.model.soft_layers={soft_layers!r} matches no trunk layer; "
                       f"layers are {[f'trunk/{n}/' for n in layer_names]}.")

  def trunk_init(rng):
    return trunk.init(rng, x_example, z_example)["params"]

  def head_init(rng, out_dim):
    k = jax.random.normal(rng, (feat_dim, out_dim), jnp.float32) / np.sqrt(feat_dim)
    return {"kernel": k, "bias": jnp.zeros((out_dim,), jnp.float32)}

  def per_task_keys(rng, members):
    return jax.vmap(lambda s: jax.random.fold_in(rng, s))(stream_ids[members])

  def init(rng):
    r_trunk, r_heads, r_extra = jax.random.split(rng, 3)
    shared, task_params = {}, {}
    if arch in PER_TASK_TRUNK:
      task_params["trunk"] = jax.vmap(trunk_init)(
          per_task_keys(r_trunk, np.arange(num_tasks)))
    elif arch in ("mmoe", "omoe"):
      shared["experts"] = jax.vmap(trunk_init)(jax.random.split(r_trunk, num_experts))
    else:
      shared["trunk"] = trunk_init(r_trunk)
    if arch == "cross_stitch":
      off = (1.0 - stitch_init) / max(num_tasks - 1, 1)
      alpha = jnp.full((num_tasks, num_tasks), off, jnp.float32)
      alpha = alpha.at[jnp.diag_indices(num_tasks)].set(
          stitch_init if num_tasks > 1 else 1.0)
      shared["stitch"] = {n: alpha for n in layer_names}
    if arch == "mmoe":  # zero gates: every expert weighs 1/E at init
      task_params["gates"] = {"kernel": jnp.zeros((num_tasks, in_dim, num_experts)),
                              "bias": jnp.zeros((num_tasks, num_experts))}
    if arch == "omoe":
      shared["gate"] = {"kernel": jnp.zeros((in_dim, num_experts)),
                        "bias": jnp.zeros((num_experts,))}
    if moe and tower:
      task_params["towers"] = jax.vmap(
          lambda r: tower_mod.init(r, f_example)["params"])(
              per_task_keys(r_extra, np.arange(num_tasks)))
    head_params = {}
    for gi, g in enumerate(groups):
      out = taskset.group_task(g).out_dim
      if per_task_heads:  # keyed by stream id only, so subsets init alike
        members = taskset.group_members(g)
        head_params[g] = jax.vmap(lambda k, o=out: head_init(k, o))(
            per_task_keys(r_heads, members))
      else:
        head_params[g] = head_init(jax.random.fold_in(r_heads, gi), out)
    (task_params if per_task_heads else shared)["heads"] = head_params
    return {"shared": shared, "tasks": task_params}

  def stitched(params, xk):
    """All T task columns on one slot's inputs, mixed after every layer: [T, B, F]."""
    cols, alpha = params["tasks"]["trunk"], params["shared"]["stitch"]
    h = xk if xk.ndim == 4 or encoder == "mlp" else xk[..., None]
    h = jnp.broadcast_to(h, (num_tasks,) + h.shape)
    if encoder == "mlp":
      h = h.reshape(num_tasks, h.shape[1], -1)
    for name in layer_names:
      if name.startswith("conv"):
        conv = encoders.PatchConv(channels[int(name[5:])], 3)
        h = jax.vmap(lambda p, a: nn.relu(conv.apply({"params": p}, a)))(cols[name], h)
        if h.shape[2] >= 2 and h.shape[3] >= 2:
          h = jax.vmap(lambda a: nn.max_pool(a, (2, 2), strides=(2, 2)))(h)
      else:
        if h.ndim > 3:
          h = h.reshape(num_tasks, h.shape[1], -1)
        dense = encoders.CondDense(hidden[int(name[6:])])
        h = jax.vmap(lambda p, a: nn.relu(dense.apply({"params": p}, a)))(cols[name], h)
      h = jnp.einsum("ts,s...->t...", alpha[name], h)
    return h.reshape(num_tasks, h.shape[1], -1)

  def moe_features(params, xk, t):
    """One slot's [B, F]: the (gated) expert mixture or shared trunk, then t's tower."""
    if arch == "shared_bottom":
      mix = trunk.apply({"params": params["shared"]["trunk"]}, xk)
    else:
      experts = jax.vmap(lambda p: trunk.apply({"params": p}, xk))(
          params["shared"]["experts"])                                  # [E, B, F]
      gate = (params["tasks"]["gates"] if arch == "mmoe" else None)
      kernel, bias = ((gate["kernel"][t], gate["bias"][t]) if gate is not None else
                      (params["shared"]["gate"]["kernel"], params["shared"]["gate"]["bias"]))
      g = jax.nn.softmax(xk.reshape(xk.shape[0], -1) @ kernel + bias, axis=-1)  # [B, E]
      mix = jnp.einsum("be,ebf->bf", g, experts)
    if not tower:
      return mix
    tp = jax.tree.map(lambda a: a[t], params["tasks"]["towers"])
    return tower_mod.apply({"params": tp}, mix)

  def features(params, x, task_ids):
    """``[K, B, F]`` trunk features for each slot."""
    if arch in ("independent", "soft"):
      tp = jax.tree.map(lambda a: a[task_ids], params["tasks"]["trunk"])
      return jax.vmap(lambda p, xk: trunk.apply({"params": p}, xk))(tp, x)
    if arch == "cross_stitch":
      return jax.vmap(lambda xk, t: stitched(params, xk)[t])(x, task_ids)
    if moe:
      return jax.vmap(lambda xk, t: moe_features(params, xk, t))(x, task_ids)
    p = {"params": params["shared"]["trunk"]}
    if conditioned:
      z = jax.nn.one_hot(task_ids, num_tasks, dtype=x.dtype)
      return jax.vmap(lambda xk, zk: trunk.apply(p, xk, zk))(x, z)
    return jax.vmap(lambda xk: trunk.apply(p, xk))(x)

  def heads_apply(params, feats, task_ids):
    outs = {}
    for g in groups:
      if per_task_heads:
        hp = params["tasks"]["heads"][g]
        rows = jnp.clip(local_index[task_ids], 0, hp["kernel"].shape[0] - 1)
        hp = jax.tree.map(lambda a: a[rows], hp)
        outs[g] = jnp.einsum("kbf,kfo->kbo", feats, hp["kernel"]) + hp["bias"][:, None]
      else:
        hp = params["shared"]["heads"][g]
        outs[g] = feats @ hp["kernel"] + hp["bias"]
    return outs

  def apply(params, x, task_ids):
    return heads_apply(params, features(params, x, task_ids), task_ids)

  penalty = None
  if arch == "soft":
    def penalty(params):
      """``lambda sum_{t<t'} ||theta^t - theta^t'||`` over the chosen layers."""
      cols = params["tasks"]["trunk"]
      leaves = [leaf.reshape(num_tasks, -1) for n in soft_paths
                for leaf in jax.tree.leaves(cols[n])]
      if soft_norm == "squared":  # sum_{t<t'} ||a_t - a_t'||^2 = T sum ||a_t - mean||^2
        return soft_lambda * num_tasks * sum(
            jnp.sum(jnp.square(a - a.mean(axis=0))) for a in leaves)
      # Pairwise squared distances from Gram matrices: O(T^2 + T D) memory.
      d2 = sum(jnp.maximum(jnp.sum(a * a, 1)[:, None] + jnp.sum(a * a, 1)[None, :]
                           - 2.0 * a @ a.T, 0.0) for a in leaves)
      upper = jnp.triu(jnp.ones((num_tasks, num_tasks), bool), 1) & (d2 > 0)
      return soft_lambda * jnp.sum(jnp.where(upper, jnp.sqrt(jnp.where(upper, d2, 1.0)),
                                             0.0))

  task_rows = {}
  if arch in PER_TASK_TRUNK:
    task_rows["trunk"] = np.arange(num_tasks, dtype=np.int32)
  if arch == "mmoe":
    task_rows["gates"] = np.arange(num_tasks, dtype=np.int32)
  if moe and tower:
    task_rows["towers"] = np.arange(num_tasks, dtype=np.int32)
  if per_task_heads:
    for g in groups:
      task_rows[f"heads/{g}"] = taskset.group_members(g)
  shared_representation = arch == "multi_head" and per_task_heads
  return Model(arch, taskset, init, apply, task_rows, features, heads_apply,
               shared_representation, penalty)
