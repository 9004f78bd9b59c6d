"""Multi-task architectures as pure ``init`` / ``apply`` over one parameter tree:
the :class:`Model` record, the architectures' names (:data:`ARCHS`) and
:func:`make_model`, which checks its arguments and builds the architecture from
its :class:`~mtljax.models.parts.Parts` in :mod:`mtljax.models.shared_trunk`
(``multi_head`` and the conditioned archs), :mod:`mtljax.models.per_task_trunks`
(``independent``, ``soft``, ``cross_stitch``), :mod:`mtljax.models.mixtures`
(``mmoe``, ``omoe``, ``shared_bottom``, ``dselect_k``) or
:mod:`mtljax.models.experts` (``cgc``, ``ple``, ``mtan``).

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
from typing import Callable, Sequence

import numpy as np

from mtljax import tasks as tasks_lib
from mtljax.models import encoders
from mtljax.models import experts
from mtljax.models import mixtures
from mtljax.models import parts as parts_lib
from mtljax.models import per_task_trunks
from mtljax.models import shared_trunk

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


def _check(arch, input_shape, *, encoder, hidden, channels, cond_layers, heads, soft_lambda,
           soft_norm, soft_layers, stitch_init, num_experts, tower, **expert_kw
           ) -> parts_lib.ArchSpec:
  """``make_model``'s arguments as an :class:`~mtljax.models.parts.ArchSpec`:
  every name (against :data:`ARCHS`, :data:`ENCODERS`, :data:`HEADS`,
  :data:`SOFT_NORMS`) and size checked, before anything is traced."""
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
  return parts_lib.ArchSpec(arch, tuple(int(s) for s in input_shape), encoder, hidden, channels,
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
  parts = parts_lib.Parts(spec, taskset)
  if arch in ("independent", "soft"):
    model = per_task_trunks.per_task_trunks_model(parts)
  elif arch == "cross_stitch":
    model = per_task_trunks.cross_stitch_model(parts)
  elif arch in MIXTURES:
    model = mixtures.mixture_model(parts)
  elif arch in EXPERT_LEVELS:
    model = experts.ple_model(parts)
  elif arch == "mtan":
    model = experts.mtan_model(parts)
  else:
    model = shared_trunk.shared_trunk_model(parts)
  return Model(arch=arch, taskset=taskset, **model)

