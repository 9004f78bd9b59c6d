"""Multi-task architectures as pure ``init`` / ``apply`` over one parameter tree.

::

    params = {"shared": {...},   # theta^sh
              "tasks":  {...}}   # theta^i, leaves stacked on a leading task axis

Architectures (``arch``), i.e. where parameters are shared:

* ``independent``: nothing shared. ``tasks/trunk/...`` is ``[T, ...]`` and
  ``tasks/heads/<group>/...`` is ``[T_g, ...]``; a step vmaps the sampled
  tasks' networks.
* ``multi_head``: ``shared/trunk/...`` and per-task heads ``tasks/heads/<group>``.
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
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtljax import tasks as tasks_lib
from mtljax.models import encoders

ARCHS = ("independent", "multi_head", "concat", "additive", "multiplicative")
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
  """
  arch: str
  taskset: tasks_lib.TaskSet
  init: Callable
  apply: Callable
  task_rows: dict[str, np.ndarray]
  features: Callable
  heads: Callable
  shared_representation: bool


def make_model(arch: str, taskset: tasks_lib.TaskSet, input_shape: Sequence[int], *,
               encoder: str = "mlp", hidden: Sequence[int] = (128, 128),
               channels: Sequence[int] = (16, 32), cond_layers: Sequence[int] = (0,),
               heads: str = "auto") -> Model:
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
  if encoder == "cnn" and len(input_shape) not in (2, 3):
    raise ValueError(f"config.model.encoder='cnn' needs image inputs [H, W] or "
                     f"[H, W, C], got input shape {tuple(input_shape)}.")

  mode = arch if conditioned else None
  if encoder == "mlp":
    trunk = encoders.MLP(hidden, mode, cond_layers)
  else:
    trunk = encoders.CNN(channels, hidden, mode, cond_layers)
  per_task_heads = heads == "per_task" or (heads == "auto" and not conditioned)
  num_tasks = len(taskset)
  stream_ids = jnp.asarray(taskset.stream_ids, jnp.int32)
  local_index = jnp.asarray(taskset.local_index)
  groups = taskset.groups
  x_example = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
  z_example = jnp.zeros((num_tasks,), jnp.float32) if conditioned else None
  feat_dim = jax.eval_shape(
      lambda: trunk.apply(trunk.init(jax.random.key(0), x_example, z_example),
                          x_example, z_example)).shape[-1]

  def trunk_init(rng):
    return trunk.init(rng, x_example, z_example)["params"]

  def head_init(rng, out_dim):
    k = jax.random.normal(rng, (feat_dim, out_dim), jnp.float32) / np.sqrt(feat_dim)
    return {"kernel": k, "bias": jnp.zeros((out_dim,), jnp.float32)}

  def per_task_keys(rng, members):
    return jax.vmap(lambda s: jax.random.fold_in(rng, s))(stream_ids[members])

  def init(rng):
    r_trunk, r_heads = jax.random.split(rng)
    shared, task_params = {}, {}
    if arch == "independent":
      task_params["trunk"] = jax.vmap(trunk_init)(
          per_task_keys(r_trunk, np.arange(num_tasks)))
    else:
      shared["trunk"] = trunk_init(r_trunk)
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

  def features(params, x, task_ids):
    """``[K, B, F]`` trunk features for each slot."""
    if arch == "independent":
      tp = jax.tree.map(lambda a: a[task_ids], params["tasks"]["trunk"])
      return jax.vmap(lambda p, xk: trunk.apply({"params": p}, xk))(tp, x)
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

  task_rows = {}
  if arch == "independent":
    task_rows["trunk"] = np.arange(num_tasks, dtype=np.int32)
  if per_task_heads:
    for g in groups:
      task_rows[f"heads/{g}"] = taskset.group_members(g)
  shared_representation = arch == "multi_head" and per_task_heads
  return Model(arch, taskset, init, apply, task_rows, features, heads_apply,
               shared_representation)
