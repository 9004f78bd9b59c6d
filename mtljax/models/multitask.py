"""Multi-task architectures as pure ``init`` / ``apply`` over one parameter tree:
the :class:`Model` record, the architectures' registry (:data:`REGISTRY`: one
:class:`Architecture` record each, its build function and hyper-parameter
dataclass; :func:`archs` lists them, :func:`register` adds one at run time)
and :func:`make_model`, which checks the shared settings
(:class:`~mtljax.models.parts.Trunk`) and the architecture's hyper-parameters,
then calls its build function: :mod:`mtljax.models.shared_trunk` (``multi_head``
and the conditioned archs), :mod:`mtljax.models.per_task_trunks`
(``independent``, ``soft``, ``cross_stitch``, ``ltb``), :mod:`mtljax.models.mixtures`
(``mmoe``, ``omoe``, ``shared_bottom``, ``dselect_k``) or
:mod:`mtljax.models.experts` (``cgc``, ``ple``, ``mtan``). Each architecture's
hyper-parameters are its own (``soft``'s ``lambda_``, ``mmoe``'s
``num_experts``; ``config.model.<arch>.<name>``); the trunk's are everyone's
(``config.model.<name>``).

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
  (``lambda_``; squared L2 by default, ``norm="l2"`` for the plain norm) over
  the trunk parameters whose path matches ``layers`` (a regex; default every
  trunk layer), returned by ``Model.penalty``. ``lambda = 0`` is ``independent``.
* ``cross_stitch`` (Misra et al. 2016): one network column per task
  (``tasks/trunk``); after every trunk layer l the columns' activations are
  mixed, ``h~_t = sum_t' alpha^l_{t t'} h_t'`` with learned ``alpha^l [T, T]``
  (``shared/stitch/layer_l``), initialised to 0.9 on the diagonal and
  0.1/(T-1) off it (the paper's init; ``init_diagonal=1`` gives the identity, i.e.
  independent networks). Every slot runs all T columns on its inputs.
* ``ltb`` (Guo et al. 2020, Learning to Branch, LibMTL's form): one network
  column per task; before every trunk layer but the first each column reads
  one parent column of the layer before, drawn by a straight-through
  Gumbel-softmax from learned logits ``shared/branch/<layer> [T, T]`` with a
  temperature schedule; the sampler's key and clock are model state
  (:mod:`mtljax.models.branching`). Evaluation reads each column's most
  probable parent.
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
  most ``k`` experts per task once the smooth-step saturates) and
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
shared heads: a pooled model). Per-task trunks (``independent``, ``soft``, ``ltb``,
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
from typing import Any, Callable, Sequence

import numpy as np

from mtljax import tasks as tasks_lib
from mtljax.models import branching
from mtljax.models import experts
from mtljax.models import mixtures
from mtljax.models import per_task_trunks
from mtljax.models import shared_trunk
from mtljax.models.parts import (  # pylint: disable=unused-import
    DENSE_ARCHS, DENSE_ENCODERS, ENCODERS, HEADS, Trunk)


TRUNK_FIELDS = tuple(f.name for f in dataclasses.fields(Trunk))


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
    init_state: ``init_state(rng) -> {"shared": ..., "tasks": ...}``, the
      model's state that gradients do not train (batch-norm running
      statistics; per-task stacks ``[T, ...]`` under ``tasks`` as in the
      parameters), or None for a model without state. A model with state
      takes it in ``apply``, ``encode`` and ``decode`` as the keywords
      ``state`` (the whole state, its ``shared`` part, its ``tasks`` part)
      and ``train`` (batch statistics and updated running averages, or the
      running averages), and returns ``(outputs, new_state)`` (the same part
      of the state back); :func:`forward`, :func:`encoder` and
      :func:`decoder` call either kind alike.
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
  init_state: Callable | None = None

  @property
  def stateful(self) -> bool:
    """Whether the model has state besides its parameters (``init_state``)."""
    return self.init_state is not None


def forward(model: Model, params, x, task_ids, state=None, train: bool = False):
  """``(outputs, new_state)``: ``model.apply`` with the model's state (a model
  without state: its outputs and ``state`` unchanged, None)."""
  if model.init_state is None:
    return model.apply(params, x, task_ids), state
  return model.apply(params, x, task_ids, state=state, train=train)


def encoder(model: Model, shared, x, state=None, train: bool = False):
  """``(rep, new_shared_state)``: ``model.encode`` with ``state``, the shared
  part of the model's state (:func:`forward`)."""
  if model.init_state is None:
    return model.encode(shared, x), state
  return model.encode(shared, x, state=state, train=train)


def decoder(model: Model, task_params, rep, x, task_ids, state=None, train: bool = False):
  """``(outputs, new_task_state)``: ``model.decode`` with ``state``, the
  per-task part of the model's state (:func:`forward`)."""
  if model.init_state is None:
    return model.decode(task_params, rep, x, task_ids), state
  return model.decode(task_params, rep, x, task_ids, state=state, train=train)


@dataclasses.dataclass(frozen=True)
class Architecture:
  """One architecture: its name, its build function and its hyper-parameters.

  Attributes:
    name: its name (``config.model.arch``).
    build: ``build(arch, trunk, hparams, taskset, input_shape) -> dict``, the
      :class:`Model` fields but ``arch`` and ``taskset`` (``init``, ``apply``,
      ``task_rows``, ``layer_groups``, optionally ``encode``, ``decode``,
      ``penalty``, ``rep_heads``), from the checked
      :class:`~mtljax.models.parts.Trunk` and hyper-parameters (None when it
      takes none) and one example's ``input_shape``. Nothing is traced before
      it is called (a wrong value has been refused).
    hparams: its hyper-parameters' frozen dataclass, or None: every field has
      a default (the config's), and ``checked(arch, trunk)`` returns the
      checked, normalised copy (tuples, floats; raising ``ValueError`` that
      names ``<arch>.<field>``). Field names differ from the trunk's
      (:data:`TRUNK_FIELDS`), so a keyword of :func:`make_model` belongs to one.
  """
  name: str
  build: Callable[..., dict]
  hparams: type | None = None

  def __post_init__(self):
    if self.name in TRUNK_FIELDS + ("arch",):
      raise ValueError(f"Architecture {self.name!r}: the name is a config.model key.")
    if self.hparams is None:
      return
    fields = dataclasses.fields(self.hparams) if dataclasses.is_dataclass(self.hparams) else ()
    if not fields or not self.hparams.__dataclass_params__.frozen or not callable(
        getattr(self.hparams, "checked", None)):
      raise ValueError(f"Architecture {self.name!r}: hparams must be a frozen dataclass with "
                       "fields and a checked(arch, trunk) method (None: no hyper-parameters).")
    missing = [f.name for f in fields if f.default is dataclasses.MISSING and
               f.default_factory is dataclasses.MISSING]
    clash = [f.name for f in fields if f.name in TRUNK_FIELDS]
    if missing or clash:
      raise ValueError(f"Architecture {self.name!r}: hyper-parameters {missing} have no "
                       f"default / {clash} are the trunk's ({list(TRUNK_FIELDS)}).")


# The architectures, in the order --list and the config show them.
REGISTRY: dict[str, Architecture] = {a.name: a for a in (
    Architecture("independent", per_task_trunks.independent),
    Architecture("multi_head", shared_trunk.multi_head),
    Architecture("concat", shared_trunk.conditioned, shared_trunk.ConditionedHParams),
    Architecture("additive", shared_trunk.conditioned, shared_trunk.ConditionedHParams),
    Architecture("multiplicative", shared_trunk.conditioned, shared_trunk.ConditionedHParams),
    Architecture("soft", per_task_trunks.soft, per_task_trunks.SoftHParams),
    Architecture("cross_stitch", per_task_trunks.cross_stitch,
                 per_task_trunks.CrossStitchHParams),
    Architecture("mmoe", mixtures.mixture, mixtures.MixtureHParams),
    Architecture("omoe", mixtures.mixture, mixtures.MixtureHParams),
    Architecture("shared_bottom", mixtures.mixture, mixtures.SharedBottomHParams),
    Architecture("cgc", experts.cgc, experts.CGCHParams),
    Architecture("ple", experts.ple, experts.PLEHParams),
    Architecture("dselect_k", mixtures.mixture, mixtures.DSelectKHParams),
    Architecture("mtan", experts.mtan, experts.MTANHParams),
    Architecture("ltb", per_task_trunks.ltb, branching.LTBHParams),
)}


def register(arch: Architecture) -> Architecture:
  """Adds ``arch`` to :data:`REGISTRY` (:func:`make_model`, the config's
  defaults and ``--list`` read it); a taken name raises."""
  if not isinstance(arch, Architecture):
    raise TypeError(f"register: expected an Architecture, got {type(arch).__name__}.")
  if arch.name in REGISTRY:
    raise ValueError(f"register: an architecture named {arch.name!r} exists.")
  REGISTRY[arch.name] = arch
  return arch


def archs() -> tuple[str, ...]:
  """Every architecture's name (read now: a registered one is included)."""
  return tuple(REGISTRY)


def get(arch: str) -> Architecture:
  """The registered architecture ``arch``; an unknown name raises, listing the known."""
  if arch not in REGISTRY:
    raise ValueError(f"arch={arch!r} is not one of {archs()}.")
  return REGISTRY[arch]


def trunk_defaults() -> dict[str, Any]:
  """``{name: default}`` of the settings every architecture shares
  (:class:`~mtljax.models.parts.Trunk`; ``config.model.<name>``)."""
  return {f.name: f.default for f in dataclasses.fields(Trunk)}


def hyperparameters(arch: str) -> dict[str, Any]:
  """``{name: default}`` of ``arch``'s hyper-parameters
  (``config.model.<arch>.<name>``); ``{}`` when it takes none."""
  cls = get(arch).hparams
  return {} if cls is None else {f.name: f.default for f in dataclasses.fields(cls)}


def make_hparams(arch: str, **values) -> Any:
  """``arch``'s hyper-parameter dataclass with ``values`` (the others at their
  defaults; unchecked), or None when it takes none. A name ``arch`` does not
  take raises, listing the ones it takes."""
  known = hyperparameters(arch)
  unknown = sorted(set(values) - set(known))
  if unknown:
    raise ValueError(f"{arch}: unknown hyper-parameter(s) {unknown}; it takes "
                     f"{sorted(known) or 'none'} (and the trunk's {sorted(TRUNK_FIELDS)}).")
  cls = get(arch).hparams
  return None if cls is None else cls(**values)


def checked_arguments(arch: str, trunk: Trunk | None = None, hparams: Any = None,
                      **overrides) -> tuple[Architecture, Trunk, Any]:
  """:func:`make_model`'s arguments, checked without the input shape: the
  record, the checked trunk and the checked hyper-parameters (None when
  ``arch`` takes none). ``overrides`` are trunk fields or ``arch``'s
  hyper-parameters, applied over ``trunk`` / ``hparams`` (their defaults when
  None); any other name raises, listing what ``arch`` takes."""
  record = get(arch)
  trunk = Trunk() if trunk is None else trunk
  if not isinstance(trunk, Trunk):
    raise ValueError(f"trunk must be a Trunk, got {type(trunk).__name__}.")
  own = {k: v for k, v in overrides.items() if k not in TRUNK_FIELDS}
  if hparams is None:
    hparams = make_hparams(arch, **own)
  elif record.hparams is None or not isinstance(hparams, record.hparams):
    want = "None (it takes no hyper-parameters)" if record.hparams is None else (
        f"a {record.hparams.__name__}")
    raise ValueError(f"hparams for arch {arch!r} must be {want}, got "
                     f"{type(hparams).__name__}.")
  else:
    make_hparams(arch, **own)  # unknown names raise
    hparams = dataclasses.replace(hparams, **own)
  trunk = dataclasses.replace(trunk, **{k: v for k, v in overrides.items()
                                        if k in TRUNK_FIELDS}).checked()
  return record, trunk, None if hparams is None else hparams.checked(arch, trunk)


def make_model(arch: str, taskset: tasks_lib.TaskSet, input_shape: Sequence[int], *,
               trunk: Trunk | None = None, hparams: Any = None, **overrides) -> Model:
  """Builds the architecture ``arch`` (one of :func:`archs`); every name and
  size is checked here, before anything is traced.

  Args:
    arch: the architecture's name.
    taskset: the tasks.
    input_shape: one example's input shape.
    trunk: the settings every architecture shares
      (:class:`~mtljax.models.parts.Trunk`; default its defaults).
    hparams: ``arch``'s hyper-parameters, an instance of its record's dataclass
      (:func:`make_hparams`; default its defaults).
    **overrides: the keyword form, for notebooks and tests: each name is a
      trunk field (``hidden=(8,)``) or one of ``arch``'s hyper-parameters
      (``num_experts=4`` for ``mmoe``), applied over ``trunk`` / ``hparams``;
      another name raises, naming ``arch`` and listing what it takes.
  """
  record, trunk, hparams = checked_arguments(arch, trunk, hparams, **overrides)
  trunk.check_input_shape(input_shape)
  trunk.check_tasks(arch, taskset)
  fields = record.build(arch, trunk, hparams, taskset, tuple(int(s) for s in input_shape))
  return Model(arch=arch, taskset=taskset, **fields)
