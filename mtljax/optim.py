"""Optimizers (optax) and the per-task update rule.

``make_optimizer`` builds one optax ``GradientTransformation`` from explicit
arguments (``*_from_config`` in the loop reads the config).

The update of a multi-task parameter tree (:func:`init_state`, :func:`update`):

* ``shared`` gets one optimizer state, updated every step;
* each stacked subtree of ``tasks`` (a model's ``task_rows``) gets
  ``vmap(tx.init)``: one independent optimizer state *per task row*, including
  Adam's step count. A row whose task was not sampled this step keeps its
  parameters and its whole optimizer state bitwise unchanged; a sampled row is
  updated by its own state. So a task's head behaves exactly as if trained by
  its own Adam on the steps its task was sampled (Adam's bias correction counts
  that task's updates) -- the fix for "Adam keeps moving heads of tasks that
  were not sampled".

One consequence, by design: transformations that look across leaves (global
norm clipping) see the shared tree and each task row separately.

Parameter groups (``config.optim.rules``, :class:`RuledOptimizer`): an ordered
list of ``(regex over slash paths, settings)``; the first rule whose regex
matches (``re.search``) a parameter's full path (``shared/trunk/layer_0/kernel``,
``tasks/heads/classification10/kernel``) decides its settings, and every
parameter must match one rule. Settings:

* ``lr_mult`` (1.0): multiplies the learning rate (and its schedule);
* ``frozen`` (False): the group gets ``optax.set_to_zero()`` -- no update and no
  optimizer state;
* ``wd_mult`` (1.0): multiplies the weight decay (``adamw``);
* ``schedule`` (the optimizer's): a name from :data:`mtljax.schedules.SCHEDULES`;
* ``unfreeze_at`` (0): the group is frozen for its first ``unfreeze_at``
  updates and then trains with an optimizer state that starts fresh at that
  step (:func:`delayed`, a mask on the updates: nothing recompiles). For shared
  parameters the count is the train step.

The groups become one ``optax.partition`` per parameter subtree (the shared
tree, and each per-task stack under ``vmap``). Parameters whose update is zero
stay bitwise unchanged (``p`` is kept rather than ``p + 0``, which would turn
``-0.0`` into ``0.0``).

Decoupled L2-SP (:class:`DecoupledL2SP`, ``config.l2sp_mode="decoupled"``):
every trained group gets ``loaded`` and ``fresh`` variants whose chain puts
``alpha (w - w0)`` (:func:`pull_to_initial`, ``w0`` held in the optimizer
state from ``init``) or ``beta w`` between the optimizer's scaling and its
learning rate, as optax's AdamW places its weight decay.

Generated rules: :func:`layerwise_decay_rules` (layer ``l`` of ``L`` gets
``lr * decay^(L - l)``; ULMFiT's factor 2.6 between consecutive layers is
``decay = ULMFIT_DECAY = 1 / 2.6``), :func:`gradual_unfreezing_rules`
(layer groups unfrozen from the top, one every N steps) and
:func:`frozen_depth_rules`, over the layer groups the model declares
(:attr:`mtljax.models.multitask.Model.layer_groups`, checked by
:func:`check_layer_groups`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from mtljax import params as params_lib
from mtljax import schedules as schedules_lib

logger = logging.getLogger("mtljax")
ULMFIT_DECAY = 1.0 / 2.6

OPTIMIZERS = ("adam", "adamw", "sgd")


def make_optimizer(name: str = "adam", *, lr: float = 1e-3, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                   momentum: float = 0.0,
                   decoupled: optax.GradientTransformation | None = None
                   ) -> optax.GradientTransformation:
  """optax's ``adam`` / ``adamw`` / ``sgd``. ``decoupled``: a transformation
  inserted after the optimizer's own scaling (Adam's, then AdamW's weight
  decay; SGD's momentum) and before the learning rate, as optax places AdamW's
  decay -- e.g. :func:`pull_to_initial` (decoupled L2-SP): its term is then
  multiplied by the (scheduled, rule-multiplied) learning rate only."""
  if name not in OPTIMIZERS:
    raise ValueError(f"name={name!r} is not one of {OPTIMIZERS}.")
  if not callable(lr) and not lr > 0:
    raise ValueError(f"lr must be > 0, got {lr}.")
  if decoupled is not None:  # the same chains as optax.adam / adamw / sgd
    scale = {"adam": lambda: optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
             "adamw": lambda: optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                                          optax.add_decayed_weights(weight_decay)),
             "sgd": lambda: optax.trace(decay=momentum) if momentum else optax.identity()}
    return optax.chain(scale[name](), decoupled, optax.scale_by_learning_rate(lr))
  if name == "adam":
    return optax.adam(lr, b1=b1, b2=b2, eps=eps)
  if name == "adamw":
    return optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  return optax.sgd(lr, momentum=momentum or None)


# ----------------------------------------------------------------------------
# Parameter groups by rules.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
  """One parameter group: a regex over slash paths and its settings."""
  pattern: str
  lr_mult: float = 1.0
  frozen: bool = False
  wd_mult: float = 1.0
  schedule: str = ""
  unfreeze_at: int = 0

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"rules: bad regex {self.pattern!r}: {e}.") from None
    if not self.lr_mult >= 0 or not self.wd_mult >= 0:
      raise ValueError(f"rules[{self.pattern!r}]: lr_mult and wd_mult must be "
                       f">= 0, got {self.lr_mult}, {self.wd_mult}.")
    if self.schedule and self.schedule not in schedules_lib.SCHEDULES:
      raise ValueError(f"rules[{self.pattern!r}]: schedule {self.schedule!r} "
                       f"is not one of {schedules_lib.SCHEDULES}.")
    if self.unfreeze_at < 0:
      raise ValueError(f"rules[{self.pattern!r}]: unfreeze_at must be >= 0.")

  def settings(self) -> str:
    if self.frozen:
      return "frozen"
    out = [f"lr x{self.lr_mult:g}"]
    if self.wd_mult != 1.0:
      out.append(f"wd x{self.wd_mult:g}")
    if self.schedule:
      out.append(self.schedule)
    if self.unfreeze_at:
      out.append(f"unfrozen at {self.unfreeze_at}")
    return ", ".join(out)


_SETTING_TYPES = {"lr_mult": float, "frozen": bool, "wd_mult": float, "schedule": str,
                  "unfreeze_at": int}


def _rule_from(pattern, settings) -> Rule:
  unknown = sorted(set(settings) - set(_SETTING_TYPES))
  if unknown:
    raise ValueError(f"rules[{pattern!r}]: unknown setting(s) {unknown}; "
                     f"settings are {sorted(_SETTING_TYPES)}.")
  return Rule(pattern, **{k: _SETTING_TYPES[k](v) for k, v in settings.items()})


def parse_rules(spec) -> tuple[Rule, ...]:
  """Rules from a config value.

  Either a sequence of ``(regex, {setting: value})`` pairs (or :class:`Rule`),
  or, for the command line, a string ``"REGEX:key=value,key=value;REGEX:frozen"``
  (a bare ``frozen`` means ``frozen=True``; the regex may not contain ``:;,``).
  """
  if not spec:
    return ()
  if isinstance(spec, str):
    rules = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
      pattern, _, rest = part.partition(":")
      settings = {}
      for item in filter(None, (i.strip() for i in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
          if key != "frozen":
            raise ValueError(f"rules: {item!r} in {part!r} is not key=value.")
          value = True
        elif key == "frozen":
          value = value.lower() in ("1", "true", "yes")
        settings[key] = value
      rules.append(_rule_from(pattern, settings))
    return tuple(rules)
  out = []
  for r in spec:
    if isinstance(r, Rule):
      out.append(r)
    else:
      pattern, settings = r
      out.append(_rule_from(pattern, dict(settings)))
  return tuple(out)


def check_layer_groups(groups: Sequence[tuple[str, str]], param_names: Sequence[str]) -> None:
  """Raises unless every parameter is in exactly one layer group.

  ``groups`` are ``(name, regex)`` from input to output, declared by the model
  (:attr:`mtljax.models.multitask.Model.layer_groups`); layer-wise rules
  (:func:`layerwise_decay_rules`, :func:`gradual_unfreezing_rules`,
  :func:`frozen_depth_rules`) are generated over them.
  """
  if not groups:
    raise ValueError("layer groups: the model declares none.")
  compiled = [(g, re.compile(rx)) for g, rx in groups]
  loose, doubled = [], []
  for n in param_names:
    hits = [g for g, rx in compiled if rx.search(n)]
    if not hits:
      loose.append(n)
    elif len(hits) > 1:
      doubled.append(f"{n} in {hits}")
  if loose:
    raise ValueError(f"layer-wise rules (layerwise_decay / unfreeze_every / "
                     f"frozen_depth) need every parameter in a layer group; {loose} are in "
                     f"none of {[g for g, _ in groups]}.")
  if doubled:
    raise ValueError(f"layer groups overlap: {doubled}.")


def layerwise_decay_rules(groups: Sequence[tuple[str, str]], decay: float) -> tuple[Rule, ...]:
  """Group ``l`` of ``L`` (1 = input side, L = top) gets ``lr_mult = decay^(L - l)``."""
  if not 0 < decay <= 1:
    raise ValueError(f"layerwise_decay must be in (0, 1] (ULMFiT: 1/2.6), "
                     f"got {decay}.")
  n = len(groups)
  return tuple(Rule(rx, lr_mult=decay ** (n - 1 - i)) for i, (_, rx) in enumerate(groups))


def gradual_unfreezing_rules(groups: Sequence[tuple[str, str]], every: int,
                             base: Sequence[Rule] = ()) -> tuple[Rule, ...]:
  """The top group trains from step 0, the next one down from ``every``, ...

  ``base``: rules for the same groups (e.g. :func:`layerwise_decay_rules`) whose
  other settings are kept.
  """
  if every <= 0:
    raise ValueError(f"unfreeze_every must be > 0, got {every}.")
  n = len(groups)
  base = list(base) or [Rule(rx) for _, rx in groups]
  return tuple(dataclasses.replace(r, unfreeze_at=(n - 1 - i) * every)
               for i, r in enumerate(base))


def frozen_depth_rules(groups: Sequence[tuple[str, str]], depth: int) -> tuple[Rule, ...]:
  """The ``depth`` layer groups nearest the input frozen (``depth < len(groups)``)."""
  if not 0 <= depth < len(groups):
    raise ValueError(f"frozen_depth={depth} must be in [0, {len(groups)}): the "
                     f"model has layer groups {[g for g, _ in groups]} and the top one "
                     "always trains.")
  return tuple(Rule(rx, frozen=True) for _, rx in groups[:depth])


class PullState(NamedTuple):
  anchor: Any  # the parameters at init


def pull_to_initial(coef: float) -> optax.GradientTransformation:
  """Adds ``coef * (w - w0)`` to the updates, ``w0`` the parameters ``init``
  was called with (decoupled L2-SP's pull toward the loaded weights: build
  the optimizer state after loading). Stateless in ``w``: the anchor never
  changes."""
  def init(params):
    return PullState(jax.tree.map(jnp.array, params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("pull_to_initial needs the parameters (tx.update(g, s, params)).")
    return jax.tree.map(lambda u, w, w0: u + coef * (w - w0).astype(u.dtype),
                        updates, params, state.anchor), state
  return optax.GradientTransformation(init, update)


class DecoupledL2SP(NamedTuple):
  """Decoupled L2-SP in a :class:`RuledOptimizer`: after the optimizer's
  scaling, ``+ alpha (w - w0)`` on parameters whose ``kind(path)`` is
  ``"loaded"`` (``w0``: their values when the optimizer state is initialised)
  and ``+ beta w`` on ``"fresh"`` ones; ``None``: neither. The learning rate
  (schedule, ``lr_mult``) then multiplies them, as AdamW's weight decay."""
  alpha: float
  beta: float
  kind: Callable[[str], str | None]


class DelayedState(NamedTuple):
  count: jax.Array
  inner: Any


def delayed(inner: optax.GradientTransformation, start: int) -> optax.GradientTransformation:
  """Zero updates and an untouched ``inner`` state for the first ``start``
  calls; from then on ``inner`` runs from its initial (fresh) state."""
  def init(params):
    return DelayedState(jnp.zeros((), jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    new_updates, new_inner = inner.update(updates, state.inner, params)
    on = state.count >= start
    updates = jax.tree.map(lambda u: jnp.where(on, u, jnp.zeros_like(u)), new_updates)
    kept = jax.tree.map(lambda a, b: jnp.where(on, a, b), new_inner, state.inner)
    return updates, DelayedState(jnp.minimum(state.count + 1, start), kept)
  return optax.GradientTransformation(init, update)


class RuledOptimizer:
  """An optimizer whose settings vary by parameter group (see module docstring).

  ``make_tx(lr_schedule, weight_decay_mult, decoupled=None) ->
  GradientTransformation`` builds the base optimizer of a group (``decoupled``
  as in :func:`make_optimizer`); ``schedule_for(name, lr_mult)`` its schedule.
  ``schedules[i]``: rule ``i``'s schedule (None for a frozen rule), counted
  from the group's ``unfreeze_at``.
  ``l2sp``: a :class:`DecoupledL2SP`; every trained group then also gets a
  ``loaded`` and a ``fresh`` variant carrying its term.
  """

  def __init__(self, rules: Sequence[Rule], make_tx: Callable, schedule_for: Callable,
               default_schedule: str, l2sp: DecoupledL2SP | None = None):
    if not rules:
      raise ValueError("rules: empty rule list.")
    self.rules = tuple(rules)
    self.l2sp = l2sp
    # Each rule's learning-rate schedule (a function of the group's own update
    # count; None when frozen): what its transforms use, and what the log shows.
    self.schedules = tuple(None if r.frozen else schedule_for(r.schedule or default_schedule,
                                                              r.lr_mult) for r in self.rules)
    self._transforms = {}
    for i, r in enumerate(self.rules):
      if r.frozen:
        self._transforms[f"rule{i}"] = optax.set_to_zero()
        continue
      variants = {"": None}
      if l2sp is not None:
        variants.update({"/loaded": pull_to_initial(l2sp.alpha),
                         "/fresh": optax.add_decayed_weights(l2sp.beta)})
      for suffix, extra in variants.items():
        tx = make_tx(self.schedules[i], r.wd_mult, extra)
        if r.unfreeze_at:
          tx = delayed(tx, r.unfreeze_at)
        self._transforms[f"rule{i}{suffix}"] = tx

  def rule_index(self, path: str) -> int | None:
    for i, r in enumerate(self.rules):
      if re.search(r.pattern, path):
        return i
    return None

  def assign(self, params) -> dict[str, int]:
    """``{path: rule index}`` for every parameter; raises on unmatched ones."""
    names = [n for n, _ in params_lib.flatten_with_names(params)]
    out = {n: self.rule_index(n) for n in names}
    unmatched = [n for n, i in out.items() if i is None]
    if unmatched:
      raise ValueError(f"rules: parameter(s) {unmatched} match no rule "
                       f"(rules: {[r.pattern for r in self.rules]}); add a final "
                       "catch-all rule such as '.*'.")
    return out

  def describe(self, params) -> list[str]:
    lines = []
    for name, i in self.assign(params).items():
      lines.append(f"{name} -> rule {i} {self.rules[i].pattern!r}: "
                   f"{self.rules[i].settings()}")
    unused = [r.pattern for i, r in enumerate(self.rules)
              if i not in set(self.assign(params).values())]
    if unused:
      lines.append(f"rules matching no parameter: {unused}")
    return lines

  def transform(self, prefix: str) -> optax.GradientTransformation:
    """The partitioned optimizer of the subtree at ``prefix`` (``shared`` or
    ``tasks/<stack>``), for the stacked subtree and for one row alike."""
    def labels(tree):
      def one(name, _):
        path = f"{prefix}/{name}" if name else prefix
        i = self.rule_index(path)
        if i is None:
          raise ValueError(f"rules: parameter {prefix}/{name} matches no rule.")
        kind = self.l2sp.kind(path) if self.l2sp is not None else None
        return f"rule{i}/{kind}" if kind and not self.rules[i].frozen else f"rule{i}"
      return params_lib.tree_map_with_names(one, tree)
    return optax.partition(self._transforms, labels)


def make_ruled_optimizer(name: str, rules: Sequence[Rule], *, lr: float, total_steps: int,
                         schedule: str = "constant", warmup_steps: int = 0,
                         end_lr_factor: float = 0.0, stlr_cut_frac: float = 0.1,
                         stlr_ratio: float = 32.0, l2sp: DecoupledL2SP | None = None,
                         **opt_kwargs) -> RuledOptimizer:
  """A :class:`RuledOptimizer` over ``make_optimizer(name, ...)`` (``l2sp``:
  decoupled L2-SP, see :class:`DecoupledL2SP`)."""
  wd = opt_kwargs.pop("weight_decay", 0.0)

  def schedule_for(sched, mult):
    return schedules_lib.make_schedule(sched, lr * mult, total_steps,
                                       warmup_steps=warmup_steps, end_lr_factor=end_lr_factor,
                                       cut_frac=stlr_cut_frac, ratio=stlr_ratio)

  def make_tx(lr_schedule, wd_mult, decoupled=None):
    return make_optimizer(name, lr=lr_schedule, weight_decay=wd * wd_mult,
                          decoupled=decoupled, **opt_kwargs)
  return RuledOptimizer(rules, make_tx, schedule_for, schedule, l2sp)


def _tx_for(tx, prefix: str) -> optax.GradientTransformation:
  return tx.transform(prefix) if isinstance(tx, RuledOptimizer) else tx


def apply_updates(params, updates):
  """``params + updates``, keeping ``params`` bitwise where the update is 0."""
  return jax.tree.map(
      lambda p, u: jnp.where(u == 0, p, (p + u).astype(p.dtype)), params, updates)


def _check_rows(params, task_rows):
  covered = set(task_rows)
  for name, _ in params_lib.flatten_with_names(params["tasks"]):
    if not any(name == c or name.startswith(c + "/") for c in covered):
      raise ValueError(f"per-task parameter tasks/{name} is in no task stack "
                       f"{sorted(covered)}.")


def _nested_set(tree: dict, path: str, value):
  parts = path.split("/")
  node = tree
  for p in parts[:-1]:
    node = node.setdefault(p, {})
  node[parts[-1]] = value


def init_state(tx, params, task_rows) -> dict:
  """``{"shared": state, "tasks": {stack path (nested): vmapped state}}``.

  ``tx``: an optax ``GradientTransformation`` or a :class:`RuledOptimizer`.
  """
  _check_rows(params, task_rows)
  if isinstance(tx, RuledOptimizer):
    tx.assign(params)  # every parameter matches a rule, before anything compiles
  tasks_state = {}
  for name in task_rows:
    _nested_set(tasks_state, name, jax.vmap(_tx_for(tx, f"tasks/{name}").init)(
        params_lib.get_path(params["tasks"], name)))
  return {"shared": _tx_for(tx, "shared").init(params["shared"]), "tasks": tasks_state}


def _select_rows(mask, new, old):
  def sel(a, b):
    return jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
  return jax.tree.map(sel, new, old)


def update(tx, grads, opt_state, params, task_rows, active: jax.Array, lr_scale=None):
  """One optimizer step; rows of tasks with ``active[t] == False`` don't move.

  Args:
    active: ``[T]`` bool, the tasks sampled in this step.
    lr_scale: an optional (traced) scalar multiplying every update. The updates
      of SGD, Adam and AdamW are linear in the learning rate and their states do
      not depend on it, so this equals running with ``lr * lr_scale`` -- which
      lets cross-validation vmap over learning rates.

  Returns:
    (new_params, new_opt_state)
  """
  upd, shared_state = _tx_for(tx, "shared").update(grads["shared"], opt_state["shared"],
                                                   params["shared"])
  if lr_scale is not None:
    upd = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), upd)
  new_params = {"shared": apply_updates(params["shared"], upd),
                "tasks": params["tasks"]}
  new_tasks_state = {}
  for name, rows in task_rows.items():
    p = params_lib.get_path(params["tasks"], name)
    g = params_lib.get_path(grads["tasks"], name)
    s = params_lib.get_path(opt_state["tasks"], name)
    u, s_new = jax.vmap(_tx_for(tx, f"tasks/{name}").update)(g, s, p)
    if lr_scale is not None:
      u = jax.tree.map(lambda v: v * lr_scale.astype(v.dtype), u)
    mask = active[jnp.asarray(rows)]
    p_new = _select_rows(mask, apply_updates(p, u), p)
    new_params["tasks"] = params_lib.set_path(new_params["tasks"], name, p_new)
    _nested_set(new_tasks_state, name, _select_rows(mask, s_new, s))
  return new_params, {"shared": shared_state, "tasks": new_tasks_state}
