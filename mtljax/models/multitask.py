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
* ``cgc`` / ``ple`` (Tang et al. 2020: shared and per-task experts, per-task
  gates; PLE stacks ``num_levels`` levels with a shared gate between them),
  ``dselect_k`` (Hazimeh et al. 2021: MMoE's experts with DSelect-k gates, at
  most ``dselect_k`` experts per task once the smooth-step saturates) and
  ``mtan`` (Liu et al. 2019: the shared trunk with per-task attention modules
  at every trunk layer): :mod:`mtljax.models.experts`, with per-task towers
  and heads as the mixtures.
* ``heads``: ``"auto"`` gives per-task heads (``tasks/heads/<group>``) except for
  the conditioned archs; ``"per_task"`` / ``"shared"`` force it, for every arch
  (shared: one head per task group at ``shared/heads/<group>``).
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

**The task-independent part.** Where an architecture computes something that
does not depend on the task, it says so with ``encode`` / ``decode``::

    rep  = encode(params["shared"], x [B, ...])             # once per example
    outs = decode(params["tasks"], rep, x, task_ids [K])     # {group: [K, B, out]}

with ``apply(params, broadcast(x), ids) == decode(tasks, encode(shared, x), x,
ids)`` (tested). ``decode`` reads only per-task parameters, so when every slot
sees the same examples the step runs ``encode`` once; per-slot gradients with
respect to ``rep`` are a ``vmap`` over slots of one slot's gradient with respect
to the one ``rep`` (:mod:`mtljax.jacobians`).
``rep`` is: the trunk's features (``multi_head`` with per-task heads,
``shared_bottom``), the expert outputs ``[E, B, F]`` (``mmoe`` and
``dselect_k``: the gates are per task and read ``x`` or nothing; ``cgc``: the
shared experts, the task experts run in ``decode``), the gated mixture
(``omoe``), or the whole network's per-group outputs (``multi_head`` with
shared heads: a pooled model). Per-task trunks (``independent``, ``soft``,
``cross_stitch``), ``ple`` with more than one level and ``mtan`` (their
per-task parts read shared parameters), the conditioned archs and the mixtures
with shared heads (``heads="shared"``: their per-task part would read shared
parameters) have no such split: ``encode`` is None.

**Layer groups.** ``Model.layer_groups`` lists the model's layers from input to
output as ``(name, regex over slash paths)`` -- trunk/expert layers (with the
cross-stitch units of that layer), MMoE/OMoE gates, tower layers, heads -- for
layer-wise learning rates and gradual unfreezing (:mod:`mtljax.optim`). Every
parameter of the model is in exactly one group (tested per architecture).

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
from mtljax.models import experts

ARCHS = ("independent", "multi_head", "concat", "additive", "multiplicative", "soft",
         "cross_stitch", "mmoe", "omoe", "shared_bottom", "cgc", "ple", "dselect_k", "mtan")
SOFT_NORMS = ("squared", "l2")
PER_TASK_TRUNK = ("independent", "soft", "cross_stitch")
MIXTURES = ("mmoe", "omoe", "shared_bottom", "dselect_k")
EXPERT_LEVELS = ("cgc", "ple")
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
    layer_groups: ``((name, regex), ...)`` from input to output (module docstring).
    encode: ``encode(shared_params, x [B, ...]) -> rep`` (a pytree), the
      task-independent part, or None when the architecture has none.
    decode: ``decode(task_params, rep, x [B, ...], task_ids [K]) -> {group:
      [K, B, out]}``, every slot reading the same ``rep``; None with ``encode``.
    penalty: ``penalty(params) -> scalar`` added to the training objective
      (``soft``'s sharing penalty), or None.
    rep_heads: when ``decode`` is affine in ``rep [B, F]`` -- slot k's outputs
      are ``rep @ W[group][k] + bias`` (linear heads on the trunk) --
      ``rep_heads(task_params, task_ids [K]) -> {group: W [K, F, out]}`` (rows of
      slots outside the group are any kernel of the group; their outputs are
      never read); else None. Lets the step form the Gram matrix of per-slot
      representation gradients without materialising them
      (:mod:`mtljax.jacobians`).
  """
  arch: str
  taskset: tasks_lib.TaskSet
  init: Callable
  apply: Callable
  task_rows: dict[str, np.ndarray]
  layer_groups: tuple[tuple[str, str], ...]
  encode: Callable | None = None
  decode: Callable | None = None
  penalty: Callable | None = None
  rep_heads: Callable | None = None


@dataclasses.dataclass(frozen=True)
class _Spec:
  """A checked architecture description (everything ``make_model`` takes)."""
  arch: str
  input_shape: tuple[int, ...]
  encoder: str
  hidden: tuple[int, ...]
  channels: tuple[int, ...]
  cond_layers: tuple[int, ...]
  per_task_heads: bool
  soft_lambda: float
  soft_norm: str
  soft_layers: str
  stitch_init: float
  num_experts: int
  tower: tuple[int, ...]
  task_experts: int = 1
  num_levels: int = 1
  level_hidden: tuple[int, ...] = ()
  dselect_k: int = 2
  dselect_gamma: float = 1.0
  dselect_per_example: bool = False
  dselect_entropy_reg: float = 0.0

  @property
  def conditioned(self) -> bool:
    return self.arch in encoders.COND_MODES

  @property
  def layer_names(self) -> tuple[str, ...]:
    convs = [f"conv_{i}" for i in range(len(self.channels))] if self.encoder == "cnn" else []
    return tuple(convs + [f"layer_{j}" for j in range(len(self.hidden))])


def _check(arch, input_shape, *, encoder, hidden, channels, cond_layers, heads, soft_lambda,
           soft_norm, soft_layers, stitch_init, num_experts, tower, **expert_kw) -> _Spec:
  """Every name and size checked, before anything is traced."""
  for field, value, allowed in (("arch", arch, ARCHS), ("encoder", encoder, ENCODERS),
                                ("heads", heads, HEADS), ("soft_norm", soft_norm, SOFT_NORMS)):
    if value not in allowed:
      raise ValueError(f"config.model.{field}={value!r} is not one of {allowed}.")
  hidden, channels = tuple(int(h) for h in hidden), tuple(int(c) for c in channels)
  if any(h <= 0 for h in hidden + channels):
    raise ValueError(f"config.model.hidden/channels must be positive, got "
                     f"{hidden}/{channels}.")
  conditioned = arch in encoders.COND_MODES
  cond_layers = tuple(int(l) for l in cond_layers) if conditioned else ()
  if conditioned and not cond_layers:
    raise ValueError(f"config.model.cond_layers is empty; arch {arch!r} needs at "
                     "least one dense layer to condition.")
  bad = [l for l in cond_layers if not 0 <= l < len(hidden)]
  if bad:
    raise ValueError(f"config.model.cond_layers={cond_layers}: layer(s) {bad} do not "
                     f"exist; the encoder has {len(hidden)} dense layers "
                     f"(config.model.hidden={hidden}).")
  if soft_lambda < 0:
    raise ValueError(f"config.model.soft_lambda must be >= 0, got {soft_lambda}.")
  if arch in ("mmoe", "omoe", "dselect_k", "cgc", "ple") and num_experts < 1:
    raise ValueError(f"config.model.num_experts must be >= 1 for arch {arch!r}, got "
                     f"{num_experts}.")
  if not 0.0 <= stitch_init <= 1.0:
    raise ValueError(f"config.model.stitch_init must be in [0, 1], got {stitch_init}.")
  tower = tuple(int(t) for t in tower)
  if any(t <= 0 for t in tower):
    raise ValueError(f"config.model.tower must be positive, got {tower}.")
  if encoder == "cnn" and len(input_shape) not in (2, 3):
    raise ValueError(f"config.model.encoder='cnn' needs image inputs [H, W] or "
                     f"[H, W, C], got input shape {tuple(input_shape)}.")
  if arch == "mtan" and not hidden + (channels if encoder == "cnn" else ()):
    raise ValueError(f"arch 'mtan' with encoder {encoder!r} needs at least one trunk layer "
                     "to attend (config.model.hidden / channels are empty).")
  per_task_heads = heads == "per_task" or (heads == "auto" and not conditioned)
  return _Spec(arch, tuple(int(s) for s in input_shape), encoder, hidden, channels,
               cond_layers, per_task_heads, float(soft_lambda), soft_norm, soft_layers,
               float(stitch_init), int(num_experts), tower,
               **_check_experts(arch, hidden, int(num_experts), **expert_kw))


def _check_experts(arch, hidden, num_experts, *, task_experts, num_levels, level_hidden,
                   dselect_k, dselect_gamma, dselect_per_example, dselect_entropy_reg
                   ) -> dict:
  """The CGC / PLE / DSelect-k settings, checked (unused ones keep defaults)."""
  level_hidden = tuple(int(h) for h in level_hidden)
  if any(h <= 0 for h in level_hidden):
    raise ValueError(f"config.model.level_hidden must be positive, got {level_hidden}.")
  out = {}
  if arch in EXPERT_LEVELS:
    if task_experts < 0:
      raise ValueError(f"config.model.task_experts must be >= 0, got {task_experts}.")
    levels = 1 if arch == "cgc" else int(num_levels)
    if levels < 1:
      raise ValueError(f"config.model.num_levels must be >= 1 for arch 'ple', got "
                       f"{num_levels}.")
    if levels > 1 and not (level_hidden or hidden):
      raise ValueError("arch 'ple' with num_levels > 1 needs config.model.level_hidden (or "
                       "config.model.hidden, whose last width is the default).")
    out = dict(task_experts=int(task_experts), num_levels=levels,
               level_hidden=level_hidden or tuple(hidden[-1:]))
  if arch == "dselect_k":
    if not 1 <= dselect_k <= num_experts:
      raise ValueError(f"config.model.dselect_k must be in [1, num_experts={num_experts}], "
                       f"got {dselect_k}.")
    if not (dselect_gamma > 0 and np.isfinite(dselect_gamma)):
      raise ValueError(f"config.model.dselect_gamma must be a finite number > 0, got "
                       f"{dselect_gamma}.")
    if not (dselect_entropy_reg >= 0 and np.isfinite(dselect_entropy_reg)):
      raise ValueError(f"config.model.dselect_entropy_reg must be >= 0, got "
                       f"{dselect_entropy_reg}.")
    power_of_2 = num_experts & (num_experts - 1) == 0
    if dselect_per_example and (dselect_entropy_reg > 0 or not power_of_2):
      raise ValueError(
          "arch 'dselect_k' with dselect_per_example=True: the entropy regulariser "
          f"(dselect_entropy_reg={dselect_entropy_reg}) and the reachability term of "
          f"num_experts={num_experts} (not a power of 2) read the batch, which a model "
          "penalty cannot; use static gates or dselect_entropy_reg=0 with a power of 2.")
    out = dict(dselect_k=int(dselect_k), dselect_gamma=float(dselect_gamma),
               dselect_per_example=bool(dselect_per_example),
               dselect_entropy_reg=float(dselect_entropy_reg))
  return out


def make_model(arch: str, taskset: tasks_lib.TaskSet, input_shape: Sequence[int], *,
               encoder: str = "mlp", hidden: Sequence[int] = (128, 128),
               channels: Sequence[int] = (16, 32), cond_layers: Sequence[int] = (0,),
               heads: str = "auto", soft_lambda: float = 0.0, soft_norm: str = "squared",
               soft_layers: str = "", stitch_init: float = 0.9, num_experts: int = 8,
               tower: Sequence[int] = (8,), task_experts: int = 1, num_levels: int = 2,
               level_hidden: Sequence[int] = (), dselect_k: int = 2,
               dselect_gamma: float = 1.0, dselect_per_example: bool = False,
               dselect_entropy_reg: float = 0.0) -> Model:
  """Builds a :class:`Model`; every name and size is checked here, before jit.

  ``num_experts``: experts of mmoe / omoe / dselect_k, shared experts of cgc /
  ple; ``task_experts``: cgc / ple experts per task; ``num_levels``: ple's
  extraction levels (cgc is one); ``level_hidden``: widths of ple's experts at
  levels >= 1 (``()``: one layer of width ``hidden[-1]``); ``dselect_k``,
  ``dselect_gamma``, ``dselect_per_example``, ``dselect_entropy_reg``: DSelect-k's
  number of selectors, smooth-step width, gates reading the input (else static
  per task), entropy regulariser weight (:mod:`mtljax.models.experts`)."""
  spec = _check(arch, input_shape, encoder=encoder, hidden=hidden, channels=channels,
                cond_layers=cond_layers, heads=heads, soft_lambda=soft_lambda,
                soft_norm=soft_norm, soft_layers=soft_layers, stitch_init=stitch_init,
                num_experts=num_experts, tower=tower, task_experts=task_experts,
                num_levels=num_levels, level_hidden=level_hidden, dselect_k=dselect_k,
                dselect_gamma=dselect_gamma, dselect_per_example=dselect_per_example,
                dselect_entropy_reg=dselect_entropy_reg)
  parts = _Parts(spec, taskset)
  if arch in ("independent", "soft"):
    model = _per_task_trunks(parts)
  elif arch == "cross_stitch":
    model = _cross_stitch(parts)
  elif arch in MIXTURES:
    model = _mixture(parts)
  elif arch in EXPERT_LEVELS:
    model = experts.ple_model(parts)
  elif arch == "mtan":
    model = experts.mtan_model(parts)
  else:
    model = _one_network(parts)
  return Model(arch=arch, taskset=taskset, **model)


# ----------------------------------------------------------------------------
# Pieces every architecture uses: the trunk module, heads, per-task keys.
# ----------------------------------------------------------------------------


class _Parts:
  """The flax modules and sizes of one architecture, and its heads."""

  def __init__(self, spec: _Spec, taskset: tasks_lib.TaskSet):
    self.spec, self.taskset = spec, taskset
    self.num_tasks = len(taskset)
    mode = spec.arch if spec.conditioned else None
    self.trunk = (encoders.MLP(spec.hidden, mode, spec.cond_layers) if spec.encoder == "mlp"
                  else encoders.CNN(spec.channels, spec.hidden, mode, spec.cond_layers))
    self.x_example = jnp.zeros((1,) + spec.input_shape, jnp.float32)
    self.z_example = (jnp.zeros((self.num_tasks,), jnp.float32) if spec.conditioned
                      else None)
    self.trunk_dim = jax.eval_shape(
        lambda: self.trunk_apply(self.trunk_init(jax.random.key(0)), self.x_example,
                                 self.z_example)).shape[-1]
    self.stream_ids = jnp.asarray(taskset.stream_ids, jnp.int32)
    self.local_index = jnp.asarray(taskset.local_index)

  @property
  def heads_home(self) -> str:
    """Where the heads live: ``tasks`` (a row per task) or ``shared`` (one
    head per task group)."""
    return "tasks" if self.spec.per_task_heads else "shared"

  def trunk_init(self, rng):
    return self.trunk.init(rng, self.x_example, self.z_example)["params"]

  def trunk_apply(self, p, x, z=None):
    return self.trunk.apply({"params": p}, x, z)

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
      if self.spec.per_task_heads:  # keyed by stream id only, so subsets init alike
        out[g] = jax.vmap(lambda k, d=dim: one(k, d))(
            self.per_task_keys(rng, ts.group_members(g)))
      else:
        out[g] = one(jax.random.fold_in(rng, gi), dim)
    return out

  def heads_apply(self, head_params, feats, task_ids) -> dict:
    """``{group: [K, B, out]}`` from per-slot ``feats [K, B, F]`` or from
    ``feats [B, F]`` read by every slot (one matmul for all slots' heads)."""
    outs, k = {}, task_ids.shape[0]
    slices = tasks_lib.static_group_slices(self.taskset, task_ids)
    if slices is not None and self.spec.per_task_heads:
      return self._static_heads(head_params, feats, task_ids, slices)
    for g in self.taskset.groups:
      hp = head_params[g]
      if self.spec.per_task_heads:
        rows = jnp.clip(self.local_index[task_ids], 0, hp["kernel"].shape[0] - 1)
        hp = jax.tree.map(lambda a: a[rows], hp)
        spec = "kbf,kfo->kbo" if feats.ndim == 3 else "bf,kfo->kbo"
        outs[g] = jnp.einsum(spec, feats, hp["kernel"]) + hp["bias"][:, None]
      else:
        out = feats @ hp["kernel"] + hp["bias"]
        outs[g] = out if feats.ndim == 3 else jnp.broadcast_to(out, (k,) + out.shape)
    return outs

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
      f = feats[sl] if feats.ndim == 3 else feats
      spec = "kbf,kfo->kbo" if feats.ndim == 3 else "bf,kfo->kbo"
      out = jnp.einsum(spec, f, hp["kernel"]) + hp["bias"][:, None]
      outs[g] = jnp.pad(out, ((sl.start, k - sl.stop), (0, 0), (0, 0)))
    return outs

  def head_rows(self) -> dict[str, np.ndarray]:
    if not self.spec.per_task_heads:
      return {}
    return {f"heads/{g}": self.taskset.group_members(g) for g in self.taskset.groups}

  # --- towers ----------------------------------------------------------------

  def towers_init(self, rng, in_dim: int):
    """Per-task ReLU towers of widths ``spec.tower`` on ``[B, in_dim]``
    features, stacked ``[T, ...]``; None without a tower."""
    if not self.spec.tower:
      return None
    mod, f_example = encoders.MLP(self.spec.tower), jnp.zeros((1, in_dim), jnp.float32)
    return jax.vmap(lambda r: mod.init(r, f_example)["params"])(self.all_task_keys(rng))

  def towers_apply(self, towers, h, task_ids, h_axis):
    """Slot k's tower on ``h`` (``[K, B, F]`` with ``h_axis=0``, or ``[B, F]``
    read by every slot with ``h_axis=None``): ``[K, B, F']`` (``h`` unchanged
    without a tower)."""
    if not self.spec.tower:
      return h
    mod = encoders.MLP(self.spec.tower)
    tp = jax.tree.map(lambda a: a[task_ids], towers)
    return jax.vmap(lambda p, a: mod.apply({"params": p}, a), in_axes=(0, h_axis))(tp, h)

  def tower_groups(self) -> list[tuple[str, str]]:
    return [(f"tower_{j}", rf"^tasks/towers/layer_{j}/") for j in range(len(self.spec.tower))]

  def feat_dim(self, in_dim: int) -> int:
    """The heads' input width after the towers."""
    return self.spec.tower[-1] if self.spec.tower else in_dim

  # --- layer groups ----------------------------------------------------------

  def layer_groups(self, trunk_prefixes: str, extra: Sequence[tuple[str, str]] = ()
                   ) -> tuple[tuple[str, str], ...]:
    """Trunk layers (under ``trunk_prefixes``, a regex alternative such as
    ``shared/trunk``), then ``extra`` groups, then the heads."""
    groups = [(n, rf"^({trunk_prefixes})/{n}(/|$)") for n in self.spec.layer_names]
    return tuple(groups) + tuple(extra) + (("heads", r"^(shared|tasks)/heads/"),)


def _broadcast_slots(tree, k: int):
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (k,) + a.shape), tree)


# ----------------------------------------------------------------------------
# One network: multi_head and the conditioned architectures.
# ----------------------------------------------------------------------------


def _one_network(parts: _Parts) -> dict:
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


# ----------------------------------------------------------------------------
# Per-task trunks: independent, soft (plus its penalty), cross_stitch.
# ----------------------------------------------------------------------------


def _per_task_trunks(parts: _Parts) -> dict:
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


def _soft_penalty(spec: _Spec, num_tasks: int) -> Callable:
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


def _cross_stitch(parts: _Parts) -> dict:
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


# ----------------------------------------------------------------------------
# Mixtures: mmoe, omoe, shared_bottom (experts or a trunk, gates, towers).
# ----------------------------------------------------------------------------


def _mixture(parts: _Parts) -> dict:
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
