"""The device mesh and every sharding of a run: one module owns both.

A run's mesh has three axes (XLA SPMD, ``jax.sharding.AxisType.Auto``: the
compiler inserts the collectives):

* ``data``: the examples of a step's batch are split along it (data
  parallelism); parameters are replicated across it.
* ``task``: stacked per-task leaves (``tasks/...``, leading axis T), their
  optimizer state and per-task data are split along it, so thousands of task
  heads spread over devices.
* ``seed``: with ``config.num_seeds`` N > 1, the stacked seeds (the state's
  leading axis) are split along it (``vmap(..., spmd_axis_name="seed")``), so
  each device group trains its own seeds. Default 1.

Shardings come from ordered rules ``(regex over slash paths, PartitionSpec)``;
the first rule whose regex matches (``re.search``) a parameter's path decides
its spec, e.g. ``("^tasks/", P("task"))``. The defaults: stacked task leaves
along ``task`` when that axis is > 1, everything else replicated. An optimizer
state leaf takes the spec of the parameter it mirrors (Adam's ``mu``/``nu``);
the step counter, the objective's state and counts are replicated.

On the command line a rule list is ``"REGEX:AXES;REGEX:AXES"``, ``AXES`` a
comma-separated entry per leading dimension (an axis name, or ``_`` for not
split), e.g. ``"^tasks/:task;kernel$:_,data;.*:"``.

Everything is checked before compiling: the mesh's axis sizes against the
device count, every axis name in a rule, every parameter matched by a rule,
and every split dimension divisible by its axes' size.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mtljax import params as params_lib

AXES = ("data", "task", "seed")


# ----------------------------------------------------------------------------
# The mesh.
# ----------------------------------------------------------------------------


def make_mesh(data: int = -1, task: int = 1, devices: Sequence | None = None,
              seed: int = 1) -> Mesh:
  """A ``(data, task, seed)`` mesh over ``devices`` (default: every device of
  every process). One size may be -1: whatever the others leave."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = {"data": int(data), "task": int(task), "seed": int(seed)}
  unknown = [k for k, v in sizes.items() if v == -1]
  if len(unknown) > 1:
    raise ValueError("at most one of data/task/seed may be -1 (the rest of "
                     "the devices).")
  for k, v in sizes.items():
    if v == 0 or v < -1:
      raise ValueError(f"{k}={v} must be a positive size or -1.")
  if unknown:
    other = math.prod(v for k, v in sizes.items() if v != -1)
    if n % other:
      raise ValueError(f"{n} devices cannot be split into "
                       f"{'x'.join(f'{k}={v}' for k, v in sizes.items() if v != -1)} "
                       "and a whole number for the rest.")
    sizes[unknown[0]] = n // other
  total = math.prod(sizes.values())
  if total != n:
    raise ValueError(f"mesh {' x '.join(f'{k}={v}' for k, v in sizes.items())} = "
                     f"{total} devices, but there are {n} ({jax.default_backend()}); the "
                     "product must equal the device count (use -1 for one axis to take "
                     "the rest).")
  return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES,
                       axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


# ----------------------------------------------------------------------------
# Rules.
# ----------------------------------------------------------------------------


def _axis_entry(entry, where: str):
  if entry is None or entry in ("", "_"):
    return None
  names = (entry,) if isinstance(entry, str) else tuple(entry)
  bad = [a for a in names if a not in AXES]
  if bad:
    raise ValueError(f"{where}: unknown mesh axis {bad[0]!r}; axes are {AXES}.")
  return names[0] if len(names) == 1 else names


def parse_rules(spec) -> tuple[tuple[str, P], ...]:
  """Rules from a config value: ``"REGEX:AXES;..."`` or a sequence of
  ``(regex, PartitionSpec | tuple of axis entries)``. Checks axis names and
  regexes."""
  if not spec:
    return ()
  pairs = []
  if isinstance(spec, str):
    for part in filter(None, (p.strip() for p in spec.split(";"))):
      pattern, sep, axes = part.rpartition(":")
      if not sep:
        raise ValueError(f"rules: {part!r} is not REGEX:AXES.")
      pairs.append((pattern, [a.strip() for a in axes.split(",")] if axes.strip() else []))
  else:
    pairs = [(p, list(s)) for p, s in spec]
  rules = []
  for pattern, axes in pairs:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"rules: bad regex {pattern!r}: {e}.") from None
    rules.append((pattern, P(*[_axis_entry(a, f"rules[{pattern!r}]")
                               for a in axes])))
  return tuple(rules)


def default_rules(mesh: Mesh) -> tuple[tuple[str, P], ...]:
  """Stacked task leaves along ``task`` (when it is > 1); the rest replicated."""
  if mesh.shape["task"] > 1:
    return (("^tasks/", P("task")), (".*", P()))
  return ((".*", P()),)


def _axis_size(mesh: Mesh, entry) -> int:
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else entry
  return math.prod(mesh.shape[a] for a in names)


def _check_spec(mesh: Mesh, name: str, shape, spec: P) -> None:
  if len(spec) > len(shape):
    raise ValueError(f"sharding rule for {name}: spec {spec} has more entries than the "
                     f"leaf has dimensions {tuple(shape)}.")
  for dim, entry in enumerate(spec):
    size = _axis_size(mesh, entry)
    if shape[dim] % size:
      raise ValueError(
          f"{name} {tuple(shape)}: dimension {dim} ({shape[dim]}) is split along mesh axis "
          f"{entry!r} of size {size}, which does not divide it. Choose a mesh whose "
          f"{entry!r} size divides {shape[dim]} (e.g. a task axis dividing the task "
          "count), or a rule that leaves this leaf replicated.")


_CATCH_ALL = (".*", "", "^", ".")


def param_specs(params, rules, mesh: Mesh) -> dict:
  """A tree of PartitionSpecs for ``params`` (``{"shared", "tasks"}``): the
  first matching rule; a parameter no rule matches, or a rule (other than a
  final catch-all such as ``.*``) that matches no parameter, is an error."""
  used = [False] * len(rules)
  unmatched = []

  def spec(name, leaf):
    for i, (pattern, s) in enumerate(rules):
      if re.search(pattern, name):
        used[i] = True
        _check_spec(mesh, name, np.shape(leaf), s)
        return s
    unmatched.append(name)
    return P()
  out = params_lib.tree_map_with_names(spec, params)
  if unmatched:
    raise ValueError(f"rules: no rule matches {unmatched[:5]}"
                     f"{' ...' if len(unmatched) > 5 else ''}; end the rules with '.*:' "
                     "to replicate the rest.")
  unused = [rules[i][0] for i, u in enumerate(used)
            if not u and rules[i][0] not in _CATCH_ALL]
  if unused:
    raise ValueError(f"rules: rule(s) {unused} match no parameter; parameters "
                     f"are e.g. {[n for n, _ in params_lib.flatten_with_names(params)][:6]}.")
  return out


# ----------------------------------------------------------------------------
# A run's placement: the mesh, its rules, and the shardings they give.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Placement:
  """The mesh of a run and its parameter rules (defaults when ``rules`` is
  empty)."""
  mesh: Mesh
  rules: tuple = ()

  @property
  def param_rules(self):
    return self.rules or default_rules(self.mesh)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def named(self, spec: P, lead: int = 0) -> NamedSharding:
    return NamedSharding(self.mesh, P(*((None,) * lead + tuple(spec))))

  def batch_spec(self, shared_inputs: bool) -> P:
    """The sampled inputs' examples along ``data``: ``x [B, ...]`` when every
    slot shares them, else ``[K, B, ...]``."""
    return P("data") if shared_inputs else P(None, "data")

  def check_batch(self, examples_per_task: int) -> None:
    d = self.mesh.shape["data"]
    if examples_per_task % d:
      raise ValueError(f"examples_per_task={examples_per_task} is split "
                       f"along mesh axis 'data' of size {d}, which does not divide it; "
                       "choose a data axis size dividing it.")

  def constrain_batch(self, x, shared_inputs: bool):
    """``x`` constrained to :meth:`batch_spec` (inside the step)."""
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(self.mesh, self.batch_spec(shared_inputs)))

  def host_batch(self, batch: dict, shared_inputs: bool, lead: int = 0):
    """Shardings of a host pipeline batch (``lead`` leading steps axes):
    inputs as :meth:`batch_spec`, labels ``[K, B]`` along ``data`` on ``B``,
    task ids replicated."""
    return {"task_ids": self.named(P(), lead),
            "x": self.named(self.batch_spec(shared_inputs), lead),
            "y": {g: self.named(P(None, "data"), lead) for g in batch["y"]}}

  # -- trees ------------------------------------------------------------------

  def params(self, params, lead: int = 0):
    specs = param_specs(_unlead(params, lead), self.param_rules, self.mesh)
    return jax.tree.map(lambda s: self.named(s, lead), specs,
                        is_leaf=lambda x: isinstance(x, P))

  def opt_state(self, opt_state, params, lead: int = 0):
    """Each optimizer-state leaf mirrors a parameter (same path suffix and
    shape: Adam's moments) and takes its spec; a per-task stack's other
    leaves (Adam's per-task counts ``[T]``) follow the stack's first axis;
    the rest is replicated."""
    plain = _unlead(params, lead)
    specs = dict(params_lib.flatten_with_names(
        param_specs(plain, self.param_rules, self.mesh)))
    shapes = {n: np.shape(v) for n, v in params_lib.flatten_with_names(plain)}

    def one(name, leaf):
      shape = np.shape(leaf)[lead:]
      root = name.split("/", 1)[0]
      for pname, pspec in specs.items():
        if shapes[pname] == shape and _mirrors(name, pname):
          return self.named(pspec, lead)
      if root == "tasks" and len(shape) >= 1:
        top = name.split("/")[1] if "/" in name else ""
        stack_specs = [s for p, s in specs.items() if p.startswith(f"tasks/{top}/")]
        first = stack_specs[0][0] if stack_specs and len(stack_specs[0]) else None
        if first is not None and shape[0] % _axis_size(self.mesh, first) == 0:
          return self.named(P(first), lead)
      return self.named(P(), lead)
    return params_lib.tree_map_with_names(one, opt_state)

  def state(self, state, lead: int = 0, seeds: bool = False):
    """Shardings for a train state (:class:`mtljax.steps.TrainState`, the same
    structure back) with ``lead`` leading (vmapped) axes that are not split --
    except, with ``seeds``, the one leading seeds axis, split along the mesh's
    ``seed`` axis. ``params`` and ``anchor`` follow the rules, ``opt_state``
    mirrors ``params``; every other field (the step, counters, keys, the
    objective's state, ``hparams``) is replicated, and a None field stays None."""
    out = jax.tree.map(lambda _: self.named(P(), lead), state)
    out = out._replace(params=self.params(state.params, lead),
                       opt_state=self.opt_state(state.opt_state, state.params, lead))
    if state.anchor is not None:
      out = out._replace(anchor=self.params(state.anchor, lead))
    if seeds and self.mesh.shape["seed"] > 1:
      n = {np.shape(a)[0] for a in jax.tree.leaves(state)}
      self.check_seeds(n.pop() if len(n) == 1 else 0)
      out = jax.tree.map(lambda sh: NamedSharding(self.mesh, P("seed", *sh.spec[1:])), out,
                         is_leaf=lambda x: isinstance(x, NamedSharding))
    return out

  @property
  def seed_axis(self) -> str | None:
    """``"seed"`` when the mesh splits seeds (``vmap``'s ``spmd_axis_name``)."""
    return "seed" if self.mesh.shape["seed"] > 1 else None

  def data_shard(self) -> tuple[int, int]:
    """``(index, count)``: which of ``count`` equal slices of the ``data``
    axis this process's devices hold. Processes holding the same slice are
    replicas (they must feed the same examples); with one process, or a
    ``data`` axis inside every process, it is ``(0, 1)``."""
    devices = np.asarray(self.mesh.devices)
    mine = sorted({int(i) for i in np.argwhere(np.vectorize(
        lambda d: d.process_index == jax.process_index())(devices))[:, 0]})
    size = self.mesh.shape["data"]
    if not mine or size % len(mine) or mine != list(range(mine[0], mine[0] + len(mine))) \
        or mine[0] % len(mine):
      raise ValueError(f"The mesh gives process {jax.process_index()} the data-axis rows "
                       f"{mine} of {size}, not one of equal contiguous slices; the host "
                       "pipeline cannot split examples so. Choose a data axis size that is a "
                       "multiple of the process count (or 1).")
    return mine[0] // len(mine), size // len(mine)

  def check_seeds(self, num_seeds: int) -> None:
    s = self.mesh.shape["seed"]
    if s > 1 and (num_seeds < 2 or num_seeds % s):
      raise ValueError(f"seed={s} splits num_seeds={num_seeds} seeds "
                       "over devices; num_seeds must be a multiple of it (or set "
                       "seed=1).")

  def data(self, split: dict, num_tasks: int, lead: int = 0):
    """A split's arrays: per-task leaves (inputs of one source per task,
    labels ``[T_g, N]``) along ``task`` where the axis divides them; the rest
    replicated."""
    t = self.mesh.shape["task"]

    def one(name, leaf):
      shape = np.shape(leaf)[lead:]
      per_task = (name == "x" and shape[0] == num_tasks) or name.startswith("y/")
      if t > 1 and per_task and len(shape) >= 1 and shape[0] % t == 0:
        return self.named(P("task"), lead)
      return self.named(P(), lead)
    return params_lib.tree_map_with_names(one, split)


def _unlead(tree, lead: int):
  if not lead:
    return tree
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[lead:], a.dtype), tree)


def _mirrors(opt_name: str, param_name: str) -> bool:
  """Whether an optimizer leaf's path is the parameter's path with optimizer
  internals inserted after its stack prefix: ``shared/0/mu/trunk/w`` mirrors
  ``shared/trunk/w``; ``tasks/heads/0/mu/reg/kernel`` mirrors
  ``tasks/heads/reg/kernel``."""
  o, p = opt_name.split("/"), param_name.split("/")
  if o[0] != p[0] or len(o) < len(p):
    return False
  return any(o[:k] == p[:k] and o[len(o) - (len(p) - k):] == p[k:]
             for k in range(1, len(p)))


# ----------------------------------------------------------------------------
# Placing and compiling: the one place a step is jitted.
# ----------------------------------------------------------------------------


def unaliased(tree):
  """``tree`` with every array leaf that is the same array as an earlier leaf
  replaced by a copy. A donated argument must not hold one buffer twice (XLA
  refuses the call: "Attempt to donate the same buffer twice"), and an eager
  init can return one array in two places."""
  seen = set()

  def one(leaf):
    if isinstance(leaf, jax.Array):
      if id(leaf) in seen:
        return jnp.copy(leaf)
      seen.add(id(leaf))
    return leaf
  return jax.tree.map(one, tree)


def place(tree, shardings):
  """``tree`` on the devices with ``shardings`` (before the loop, so the step
  compiles once), no two leaves sharing a buffer (:func:`unaliased`: the
  placed state is donated). With several processes every process passes the
  same values (same seed, same data) and each builds only its devices'
  shards."""
  tree = unaliased(tree)
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def one(leaf, sh):
    if isinstance(leaf, jax.Array) and leaf.sharding == sh:
      return leaf
    host = np.asarray(jax.device_get(leaf))
    return jax.make_array_from_callback(host.shape, sh, lambda idx: host[idx])
  return jax.tree.map(one, tree, shardings)


# ----------------------------------------------------------------------------
# Several processes (hosts): jax.distributed.
# ----------------------------------------------------------------------------


def initialize_distributed(coordinator: str = "", num_processes: int = 0,
                           process_id: int = -1, *, auto: bool = False) -> bool:
  """Joins a multi-process run (``jax.distributed.initialize``): from explicit
  arguments, or with ``auto`` from the cluster's environment (SLURM, Open MPI,
  TPU pods, ...). On CPU, collectives across processes use gloo. Returns
  whether this is a multi-process run. Call before any other jax call."""
  if not coordinator and not auto:
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--coordinator={coordinator!r} needs --num_processes >= 1 and "
                       f"0 <= --process_id < num_processes, got {num_processes}, "
                       f"{process_id}.")
    jax.distributed.initialize(coordinator, num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()
  return jax.process_count() > 1


def is_primary() -> bool:
  """Process 0: the one that writes logs, metrics, summaries and plots
  (checkpoints are written by every process together, through Orbax)."""
  return jax.process_index() == 0


def any_process(flag: bool) -> bool:
  """True when ``flag`` is set on any process (a collective: every process
  calls it at the same point)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.max(multihost_utils.process_allgather(np.int32(bool(flag)))))


def jit_train_step(fn: Callable, state_shardings, data_shardings, placement: Placement, *,
                   donate: bool = True) -> Callable:
  """``fn(state, data) -> (state, measurements)`` jitted with the state's
  shardings in and out, the data's in, and replicated measurements."""
  return jax.jit(fn, in_shardings=(state_shardings, data_shardings),
                 out_shardings=(state_shardings, placement.replicated),
                 donate_argnums=(0,) if donate else ())


def prepare_train_step(fn: Callable, state, data: dict, num_tasks: int,
                       placement: Placement | None = None, *, donate: bool = True):
  """For library users (notebooks, benchmarks): places ``state`` and ``data``
  on ``placement`` (default: every device along ``data``) and jits ``fn``.
  Returns ``(step, state, data)``. ``fn`` should be built with the same
  placement (``make_train_step(..., placement=...)``) so the batch is split."""
  placement = placement or Placement(make_mesh())
  state_sh = placement.state(state)
  data_sh = placement.data(data, num_tasks)
  return (jit_train_step(fn, state_sh, data_sh, placement, donate=donate),
          place(state, state_sh), place(data, data_sh))


def jit_eval_step(fn: Callable, params_shardings, data_shardings, placement: Placement,
                  model_state_shardings=None) -> Callable:
  """``fn(params, split, model_state) -> sums`` jitted; results replicated
  (``model_state``: the model's batch statistics, or None)."""
  return jax.jit(fn, in_shardings=(params_shardings, data_shardings, model_state_shardings),
                 out_shardings=placement.replicated)


def describe(shardings) -> list[str]:
  """``"path: spec"`` lines for the log."""
  return [f"{n}: {s.spec}" for n, s in params_lib.flatten_with_names(shardings)]

