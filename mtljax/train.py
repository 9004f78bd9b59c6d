"""The run loop: train, evaluate per task, checkpoint, log, summarise.

:func:`train_and_evaluate` builds a run from its config (:mod:`mtljax.build`),
resumes from the workdir's latest checkpoint, calls the compiled step
(:mod:`mtljax.steps`) ``steps_per_call`` steps at a time, evaluates every task
at eval steps, writes ``metrics.jsonl`` / ``summary.json`` / checkpoints, and
(when configured) measures transfer against single-task baselines
(:mod:`mtljax.measure`, which receives this function to train them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtljax import build
from mtljax import checkpoint as ckpt_lib
from mtljax import errors
from mtljax import measure
from mtljax import params as params_lib
from mtljax import plotting
from mtljax import sharding
from mtljax import steps
from mtljax import tasks as tasks_lib
from mtljax import tensorboard
from mtljax import workdir as workdir_lib
from mtljax.data import pipeline
from mtljax.models import multitask

logger = logging.getLogger("mtljax")


class _Progress:
  """A progress line with throughput and ETA. The clock starts when the first
  call returns (it includes compilation); rates come from the calls after it."""

  def __init__(self, total: int, first: int):
    self.total, self.t0, self.s0 = total, None, first

  def tick(self, step: int) -> None:
    """After every call."""
    if self.t0 is None:
      self.t0, self.s0 = time.perf_counter(), step

  def line(self, step: int, loss: float) -> str:
    if self.t0 is not None and step > self.s0:
      rate = (step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)
      eta = time.strftime("%H:%M:%S", time.gmtime((self.total - step) / max(rate, 1e-9)))
      speed = f"{rate:.1f} steps/s | ETA {eta}"
    else:
      speed = "first call (compiling) | ETA after the next call"
    pct = 100.0 * step / self.total
    width = 20
    bar = "#" * int(width * step / self.total)
    return (f"[{bar:<{width}}] step {step}/{self.total} ({pct:5.1f}%) "
            f"loss {loss:.4f} | {speed}")


def gradient_record(taskset, meas, steps_per_call: int) -> dict:
  """A loss weighting's mean lambda, and per-task gradient norms and method
  weights, pairwise cosines (the conflict matrix) and solver failures,
  averaged over a call's steps: each that the objective measures (moco, imtl
  and excess_mtl measure both)."""
  names = taskset.names
  rec = {}
  if "objective_lambda_sum" in meas:  # loss weighting: mean lambda over the call
    lam = np.asarray(meas["objective_lambda_sum"]) / steps_per_call
    rec.update({f"objective/{a}/lambda": float(lam[i]) for i, a in enumerate(names)})
  if "objective_meta_grad_sum" in meas:  # auto_lambda, moml: mean meta-gradient over the call
    g = np.asarray(meas["objective_meta_grad_sum"]) / steps_per_call
    rec.update({f"objective/{a}/meta_grad": float(g[i]) for i, a in enumerate(names)})
  if "objective_qp_failures" in meas:  # forum: steps whose QP found no feasible active set
    rec["objective/qp_failures"] = float(np.sum(meas["objective_qp_failures"]))
  if "grad_norm_sum" not in meas:
    return rec
  rec["grad/solver_failures"] = float(np.sum(meas["solver_failures"]))
  for i, a in enumerate(names):
    n = meas["task_count"][i]
    if n > 0:
      rec[f"grad/{a}/norm"] = float(meas["grad_norm_sum"][i] / n)
      rec[f"grad/{a}/weight"] = float(meas["grad_weight_sum"][i] / n)
    for j in range(i + 1, len(names)):
      c = meas["grad_pair_count"][i, j]
      if c > 0:
        rec[f"grad/cos/{a}/{names[j]}"] = float(meas["grad_cos_sum"][i, j] / c)
  return rec


def train_record(taskset, meas, step: int, steps_per_call: int) -> dict:
  """The ``train/...`` entries of a log step (``meas`` on the host)."""
  record = {"step": step, "train/loss": float(meas["loss"]) / steps_per_call}
  if "penalty" in meas:
    record["train/penalty"] = float(meas["penalty"]) / steps_per_call
  for i, t in enumerate(taskset):
    if meas["task_count"][i] > 0:
      record[f"train/{t.name}/loss"] = float(meas["task_loss_sum"][i] / meas["task_count"][i])
  record.update(gradient_record(taskset, meas, steps_per_call))
  return record


def learning_rates(config, lr_schedules: Sequence[build.LrSchedule]
                   ) -> Callable[[int], dict]:
  """``step -> {key: lr}`` for each of the optimizer's schedules (``optim/lr``,
  or ``optim/lr/rule<i>`` per parameter rule: :func:`mtljax.build.optimizer_from_config`,
  carried on the run as ``Run.lr_schedules``): the learning rate of the update
  that ended at ``step`` (update ``step - 1`` counted from 0), as scheduled by
  the global step -- 0 for a frozen group and before a group's
  ``unfreeze_at``. (A task's own parameters count only the steps that sampled
  the task; with a schedule other than constant theirs lag behind.)

  The schedules are evaluated once per group at the log steps' update counts
  here (``config.total_steps``, ``config.log_steps``), so a log row only
  looks a float up."""
  total, every = int(config.total_steps), max(int(config.log_steps), 1)
  logged = np.unique(np.append(np.arange(every, total + 1, every), total))

  def table(fn, start):  # {update count: lr}: one vectorised call, then python floats
    counts = np.maximum(logged - 1 - start, 0)
    rates = np.broadcast_to(np.asarray(jax.device_get(fn(counts)), np.float64), counts.shape)
    return fn, dict(zip(counts.tolist(), rates.tolist()))
  groups = [(s.key, None if s.schedule is None else table(s.schedule, s.start), s.start)
            for s in lr_schedules]

  def at(step: int) -> dict:
    out = {}
    for key, rates, start in groups:
      count = step - 1 - start
      if rates is None or count < 0:
        out[key] = 0.0
      else:  # a step off the log grid (not asked by the loop): the schedule itself
        out[key] = rates[1][count] if count in rates[1] else float(rates[0](count))
    return out
  return at


class SeedMetrics(NamedTuple):
  """Per-task metrics of N seeds: ``mean`` and ``se`` (standard error,
  ``std(ddof=1) / sqrt(N)``) ``{task: {metric}}``, and ``per_seed`` (a list)."""
  mean: dict
  se: dict
  per_seed: list


def per_seed(tree, n: int) -> list:
  """``n`` trees, one per row of every leaf's leading (seed) axis."""
  tree = jax.device_get(tree)
  return [jax.tree.map(lambda a, i=i: a[i], tree) for i in range(n)]


def mean_se(values) -> tuple[float, float]:
  """Mean and standard error (``std(ddof=1) / sqrt(n)``; NaN for one value) of
  the values that are not None."""
  v = np.asarray([x for x in values if x is not None], np.float64)
  if v.size == 0:
    return float("nan"), float("nan")
  se = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
  return float(v.mean()), se


def seed_metrics(metrics: list[dict]) -> SeedMetrics:
  mean, se = {}, {}
  for t, ms in metrics[0].items():
    mean[t], se[t] = {}, {}
    for m in ms:
      mean[t][m], se[t][m] = mean_se([x[t][m] for x in metrics])
  return SeedMetrics(mean, se, metrics)


def combine_seed_records(records: list[dict]) -> dict:
  """One metrics row from N seeds' rows: each key's mean, ``KEY/se``, and
  ``per_seed`` ``{KEY: [one value per seed]}``."""
  keys = [k for k in dict.fromkeys(k for r in records for k in r) if k != "step"]
  out = {"step": records[0]["step"]}
  for k in keys:
    out[k], out[f"{k}/se"] = mean_se([r.get(k) for r in records])
  out["per_seed"] = {k: [r.get(k) for r in records] for k in keys}
  return out


def _add_metrics(record: dict, prefix: str, metrics) -> dict:
  """``record`` with ``PREFIX/TASK/METRIC`` added; with N seeds (a
  :class:`SeedMetrics`) the mean, ``/se`` and each seed's value in the row's
  ``per_seed`` lists, as the train keys have them (TensorBoard's ``/seed_S``
  tags)."""
  record.update(_flat_metrics(prefix, metrics))
  if isinstance(metrics, SeedMetrics):
    flats = [_flat_metrics(prefix, m) for m in metrics.per_seed]
    record.setdefault("per_seed", {}).update({k: [f[k] for f in flats] for k in flats[0]})
  return record


def _flat_metrics(prefix: str, metrics) -> dict:
  if isinstance(metrics, SeedMetrics):
    flat = _flat_metrics(prefix, metrics.mean)
    flat.update({f"{k}/se": v for k, v in _flat_metrics(prefix, metrics.se).items()})
    return flat
  return {f"{prefix}/{t}/{m}": v for t, ms in metrics.items() for m, v in ms.items()}


class _Affinity:
  """TAG's affinity sums over the steps of this process."""

  def __init__(self):
    self.sum = self.count = None

  def add(self, meas):
    """Adds on the device (no host sync: read once, by :meth:`summary`)."""
    if "tag_sum" not in meas:
      return
    got = (meas["tag_sum"], meas["tag_count"])
    self.sum = got[0] if self.sum is None else self.sum + got[0]
    self.count = got[1] if self.count is None else self.count + got[1]

  def summary(self, config, taskset) -> dict | None:
    if self.sum is None:
      return None
    total, count = jax.device_get((self.sum, self.count))
    if total.ndim == 3:  # N seeds: pooled
      total, count = total.sum(axis=0), count.sum(axis=0)
    affinity = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    out = {"tasks": list(taskset.names), "lookahead_lr": config.tag_lr,
           "matrix": [[None if np.isnan(v) else float(v) for v in row] for row in affinity],
           "definition": "Z[i][j] = 1 - L_j(after a step on task i's gradient) / L_j, "
                         "averaged over the steps of this process (Fifty et al. 2021)"}
    if not np.isnan(affinity).any() and 1 <= config.tag_groups <= len(taskset):
      out["grouping"] = measure.group_tasks(affinity, config.tag_groups, taskset.names)
    return out


# ----------------------------------------------------------------------------
# The loop's compiled call: donated state, a device-side stop on non-finite steps.
# ----------------------------------------------------------------------------

DONATE_STATE = True  # the loop's state is donated to its step (tests compare with False)
NONFINITE_KEYS = ("nonfinite_steps", "nonfinite_first", "nonfinite_tasks")


def halting_step(fn: Callable) -> Callable:
  """``fn(state, data) -> (state, meas)`` as ``((state, guard), data) ->
  ((state, guard), meas)``, for ``on_nonfinite="stop"`` without a host sync per call.

  ``guard = {"halted": bool [], "nonfinite": {key: meas[key]}}``
  (:data:`NONFINITE_KEYS`). A call whose steps are all finite runs ``fn`` and
  returns ``halted`` False; the first call with a non-finite step runs ``fn`` as
  well (its bad steps never apply: :func:`mtljax.steps.make_train_step`) and
  sets ``halted``, keeping that call's non-finite measurements. From then on
  every call is the identity on ``(state, guard)`` (a ``lax.cond``: nothing is
  computed; with donation the buffers are passed through) and its
  measurements are zeros (``nonfinite_first``: int32 max). The loop reads the
  guard only where it reads the device anyway (log, eval, checkpoint,
  preemption points) and raises then, with the message of the call that went
  bad: the state after it is never logged, evaluated or saved, exactly as when
  the loop checked after every call."""
  shapes = {}

  def step(carry, data):
    state, guard = carry
    shapes.clear()  # this trace's, set by run (traced first: lax.cond's true branch)

    def run():
      new, meas = fn(state, data)
      shapes["meas"] = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), meas)
      bad = jnp.sum(meas["nonfinite_steps"]) > 0
      return (new, {"halted": bad, "nonfinite": {k: meas[k] for k in NONFINITE_KEYS}}), meas

    def hold():
      like = shapes.get("meas") or jax.eval_shape(fn, state, data)[1]
      meas = {k: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), v) for k, v in like.items()}
      meas["nonfinite_first"] = jnp.full(like["nonfinite_first"].shape, steps.NO_STEP,
                                         like["nonfinite_first"].dtype)
      return (state, guard), meas
    return jax.lax.cond(jnp.logical_not(guard["halted"]), run, hold)
  return step


def initial_guard(num_tasks: int, num_seeds: int) -> dict:
  """The guard of :func:`halting_step` before any call: not halted."""
  lead = (num_seeds,) if num_seeds > 1 else ()
  return {"halted": np.zeros((), bool),
          "nonfinite": {"nonfinite_steps": np.zeros(lead, np.int32),
                        "nonfinite_first": np.full(lead, steps.NO_STEP, np.int32),
                        "nonfinite_tasks": np.zeros(lead + (num_tasks,), np.int32)}}


def jit_loop_step(run, data_shardings, policy: str) -> Callable:
  """The run's step as the loop calls it: ``(carry, data) -> (carry, meas)``,
  ``carry`` the state (``on_nonfinite="skip"``) or ``(state, guard)``
  (``"stop"``: :func:`halting_step`), donated (:data:`DONATE_STATE`)."""
  pl = run.placement
  if policy == "stop":
    return sharding.jit_train_step(halting_step(run.train_fn),
                                   (run.state_shardings, pl.replicated), data_shardings, pl,
                                   donate=DONATE_STATE)
  return sharding.jit_train_step(run.train_fn, run.state_shardings, data_shardings, pl,
                                 donate=DONATE_STATE)


class DeviceFeed:
  """The device path: both splits on the device, the step samples its batch."""

  def __init__(self, config, data, run):
    pl, n_tasks = run.placement, len(data.taskset)
    train_sh, test_sh = pl.data(data.train, n_tasks), pl.data(data.test, n_tasks)
    self.splits = {"train": sharding.place(data.train, train_sh),
                   "test": sharding.place(data.test, test_sh)}
    params_sh, ms_sh = run.state_shardings.params, run.state_shardings.model_state
    self.train_step = jit_loop_step(run, train_sh, config.get("on_nonfinite", "stop"))
    self.eval_steps = {"test": sharding.jit_eval_step(run.eval_fn, params_sh, test_sh, pl,
                                                      ms_sh)}
    if config.eval_train:  # sized for the train split
      self.eval_steps["train"] = sharding.jit_eval_step(steps.make_eval_step(
          run.model, label_mean=data.label_mean, label_std=data.label_std,
          num_examples=data.train["x"].shape[1], batch_size=config.eval_batch_size,
          dense_convention=config.get("dense_convention", "exact"),
          shared_inputs=bool(config.sampling.shared_inputs)),
          params_sh, train_sh, pl, ms_sh)

  def next(self):
    return self.splits["train"]

  def evaluate(self, params, split, model_state=None):
    return self.eval_steps[split](params, self.splits[split], model_state)

  def close(self):
    pass

  def summary(self) -> dict:
    return {"pipeline": "device"}


class HostFeed:
  """The host pipeline (:mod:`mtljax.data.pipeline`): batches read by Grain
  threads from the call of step ``first_step`` on, prefetched to the devices
  with the step's input shardings; evaluation chunk by chunk."""

  def __init__(self, config, data, run, first_step: int):
    pl, spc = run.placement, run.steps_per_call
    self.data, self.chunk = data, int(config.eval_batch_size)
    self.dense_convention = config.get("dense_convention", "exact")
    batch_sh = pl.host_batch(data.train, config.sampling.shared_inputs, lead=int(spc > 1))
    self.train_step = jit_loop_step(run, batch_sh, config.get("on_nonfinite", "stop"))
    self._chunk_step = jax.jit(run.eval_fn, out_shardings=pl.replicated)
    self._replicated = pl.replicated
    count, prefetch = run.batches.shard_count, config.data.get("prefetch", 2)

    def start():  # on the first batch asked for (no threads left behind by setup errors)
      reader = run.batches.iterator(first_step // spc, int(config.total_steps) // spc,
                                    workers=config.data.get("workers", 2),
                                    prefetch=2 * prefetch)
      return pipeline.Prefetch(reader, lambda b: pipeline.put(b, batch_sh, count),
                               size=prefetch)
    self._start, self.feed, self.calls = start, None, 0

  def next(self):
    if self.feed is None:
      self.feed = self._start()
    self.calls += 1
    return next(self.feed)

  def evaluate(self, params, split, model_state=None):
    acc = steps.eval_zeros(self.data.taskset, self.dense_convention)
    for chunk in pipeline.eval_chunks(self.data, split, self.chunk):
      chunk = sharding.place(chunk, jax.tree.map(lambda _: self._replicated, chunk))
      acc = jax.tree.map(jnp.add, acc, self._chunk_step(params, chunk, model_state))
    return acc

  def close(self):
    if self.feed is not None:
      self.feed.close()

  def summary(self) -> dict:
    return {"pipeline": "host", "calls": self.calls,
            "input_wait_s": round(self.feed.wait_s if self.feed else 0.0, 3)}


def _log_parameters(state, num_seeds: int = 1) -> None:
  """The model's parameter count: of one model, also with N seeds (whose
  parameters carry a leading seed axis: N models side by side)."""
  for name, leaf in params_lib.flatten_with_names(state.params):
    logger.debug("param %-50s %s", name, tuple(leaf.shape))
  total, shared, tasks = (params_lib.count(p) // num_seeds for p in
                          (state.params, state.params["shared"], state.params["tasks"]))
  seeds = f"; {num_seeds} seeds train {num_seeds} such models" if num_seeds > 1 else ""
  logger.info("Parameters: %d (shared %d, per-task %d)%s.", total, shared, tasks, seeds)


def _step(state) -> int:
  """The state's step counter (every seed's is the same)."""
  return int(np.max(jax.device_get(state.step)))


class NonFiniteError(errors.RunError):
  """A non-finite loss or gradient under ``config.on_nonfinite = "stop"``."""


class Preempted(RuntimeError):
  """SIGTERM or SIGINT (Ctrl-C) arrived: a checkpoint was saved; rerunning
  resumes. ``exit_code``: 128 + the signal's number, as a shell reports it."""

  def __init__(self, step: int, directory: str, signum: int = signal.SIGTERM):
    name = signal.Signals(signum).name
    super().__init__(f"Preempted ({name}) at step {step}: checkpoint saved in {directory}; "
                     "rerun the same command to resume.")
    self.step = step
    self.exit_code = 128 + int(signum)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def _sigterm_flag():
  """A flag set by SIGTERM (what cluster schedulers send before killing a
  job) or SIGINT (Ctrl-C), checked after every call with one process, at the
  loop's sync points with several (:func:`_loop`) (``flag["signum"]``:
  the first signal's number); a second SIGINT raises ``KeyboardInterrupt`` at
  once (stop now, without saving). The previous handlers are restored."""
  flag = {"set": False, "signum": None}
  if threading.current_thread() is not threading.main_thread():
    yield flag  # signals reach the main thread only
    return

  def handler(signum, frame):  # pylint: disable=unused-argument
    if flag["set"] and signum == signal.SIGINT:
      raise KeyboardInterrupt
    if not flag["set"]:
      logger.warning("%s: stopping at the next step with a checkpoint (Ctrl-C again: stop now, "
                     "without saving).", signal.Signals(signum).name)
    flag["set"], flag["signum"] = True, flag["signum"] or signum
  old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
  try:
    yield flag
  finally:
    for s, h in old.items():
      signal.signal(s, h)


def _nonfinite_message(ts, meas, last_saved, directory, seed0: int = 0) -> str:
  which = ""
  if np.ndim(meas["nonfinite_steps"]) == 1:  # N seeds: the first seed that went bad
    i = int(np.flatnonzero(np.asarray(meas["nonfinite_steps"]))[0])
    meas = jax.tree.map(lambda a: a[i], meas)
    which = f" of seed {seed0 + i}"
  first = int(meas["nonfinite_first"]) + 1
  tasks = [ts.names[i] for i, c in enumerate(np.asarray(meas["nonfinite_tasks"])) if c > 0]
  what = (f"the loss of task(s) {tasks}" if tasks
          else "the gradient (every task's loss was finite)")
  kept = (f"the last good checkpoint is step {last_saved} in {directory}"
          if last_saved is not None else "no checkpoint had been saved yet")
  return (f"Non-finite value in {what}{which} at training step {first}; the update was not applied "
          f"and the run stopped ({kept}). Lower config.optim.lr, check the data, or set "
          "config.on_nonfinite='skip' to skip such updates and count them.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       callbacks: Sequence[Callable[[int, dict], None]] = ()) -> dict:
  """Trains, evaluates per task, checkpoints, and writes the workdir outputs.

  Outputs in ``workdir``: ``checkpoints/`` (Orbax), ``metrics.jsonl`` (one line
  per log/eval step), ``summary.json`` (``{"tasks": {TASK: {METRIC: value}},
  ...}``), ``config.json`` (the config of the first run whose data and model
  were built: a config refused while building them stores nothing). Running again with
  the same workdir resumes from the latest readable checkpoint (the config
  must be the same apart from :data:`mtljax.workdir.RESUMABLE_KEYS`;
  ``metrics.jsonl`` is cut back to the restored step). One run per workdir at
  a time. SIGTERM or Ctrl-C saves a checkpoint and raises :class:`Preempted`
  (a second Ctrl-C: ``KeyboardInterrupt`` at once); a
  non-finite loss or gradient raises :class:`NonFiniteError` (or is skipped
  and counted: ``config.on_nonfinite``). ``callbacks(step, measurements)``
  run after every host call (e.g. to stop a run early in tests); they are
  no sync point: after a non-finite step under ``"stop"`` they see the calls
  up to the next sync point, which hold the state and measure zeros.

  Returns:
    the summary dict.
  """
  build.validate_config(config)
  fresh = not os.path.exists(workdir)
  workdir_lib.check_writable(workdir)
  primary = sharding.is_primary()  # with several processes, process 0 writes
  lock = workdir_lib.Lock(workdir) if primary else contextlib.nullcontext()
  with lock, _sigterm_flag() as sigterm:
    # Compared now, stored only once the data and the run are built: a config
    # refused while building leaves no config.json behind to refuse its fix.
    try:
      workdir_lib.check_config(workdir, config.to_dict(), write=False,
                               stored_with_checkpoints=_stored_identity(workdir))
      return _train(config, workdir, callbacks, sigterm)
    except BaseException:
      if fresh and primary:  # refused before writing anything: no empty workdir left
        workdir_lib.remove_if_unused(workdir)
      raise


def _stored_identity(workdir: str) -> tuple[int, dict] | None:
  """The config kept with the workdir's latest checkpoint (its manifest)."""
  return ckpt_lib.read_identity(os.path.join(workdir, "checkpoints"))


def _train(config, workdir, callbacks, sigterm) -> dict:
  # --- Data, model, objective, optimizer, initial state -------------------------
  data = build.data_from_config(config)
  run = build.build_run(config, data)
  if sharding.is_primary():
    workdir_lib.check_config(workdir, config.to_dict(), write=True,
                             stored_with_checkpoints=_stored_identity(workdir))
  _log_parameters(run.state, run.num_seeds)
  manager = ckpt_lib.make_manager(workdir)
  try:
    return _loop(config, workdir, callbacks, sigterm, data, run, manager)
  finally:
    manager.close()


def _resume(workdir, run, manager) -> tuple[steps.TrainState, int | None]:
  """The state the loop starts from -- the workdir's latest readable
  checkpoint (``metrics.jsonl`` cut back to its step), else the run's fresh
  state -- and the restored step (None when fresh)."""
  state, resumed_from = run.state, None
  restored = ckpt_lib.restore_latest(manager, state)
  if restored is not None:
    resumed_from = _step(restored)
    state = restored
    logger.info("Resumed from %s at step %d.", manager.directory, resumed_from)
  dropped = workdir_lib.trim_metrics(workdir, _step(state)) if sharding.is_primary() else 0
  if dropped:
    logger.info("metrics.jsonl: dropped %d row(s) past step %d (written after the last "
                "checkpoint).", dropped, _step(state))
  if _step(state) % run.steps_per_call:
    raise errors.ConfigError(
        f"config.steps_per_call: the checkpoint in {manager.directory} is at step "
        f"{_step(state)}, which steps_per_call={run.steps_per_call} does not divide (this "
        "run's calls would not "
        "line up with the steps already taken): resume with a config.steps_per_call "
        f"dividing {_step(state)} and the intervals.")
  return state, resumed_from


def _train_row(config, ts, run, state, meas, step: int, lr_at: Callable) -> dict:
  """A log step's row: the call's ``train/...`` entries (N seeds: the mean,
  ``/se`` and ``per_seed``), skipped updates under ``on_nonfinite="skip"``,
  and the learning rates."""
  host, n_seeds, spc = jax.device_get(meas), run.num_seeds, run.steps_per_call
  if n_seeds == 1:
    record = train_record(ts, host, step, spc)
  else:
    record = combine_seed_records([train_record(ts, m, step, spc)
                                   for m in per_seed(host, n_seeds)])
  if config.get("on_nonfinite", "stop") == "skip":
    record["train/nonfinite_skipped"] = int(np.sum(jax.device_get(state.nonfinite_skipped)))
  record.update(lr_at(step))
  return record


def _feed(config, data, run, step: int):
  """The run's feed from step ``step`` on: :class:`DeviceFeed`, or
  :class:`HostFeed` for data read by the host pipeline."""
  if run.batches is None:
    return DeviceFeed(config, data, run)
  return HostFeed(config, data, run, step)


def _loop(config, workdir, callbacks, sigterm, data, run, manager) -> dict:
  """Resumes, trains to ``config.total_steps`` call by call (logs, evaluations,
  checkpoints, the non-finite policy, SIGTERM), then writes and returns the summary.

  The host reads the device only at sync points -- log, eval and checkpoint
  steps, the last step, and a preemption -- and never between them: calls are
  dispatched back to back, the state donated to each (:func:`jit_loop_step`).
  Under ``on_nonfinite="stop"`` the step itself halts after a call with a
  non-finite step (:func:`halting_step`) and the loop raises at the next sync
  point, before it logs, evaluates or saves anything. A SIGTERM is seen after
  the next call with one process; with several, the processes agree on it
  (a collective) at sync points only, so a run stops within
  ``min(log_steps, eval_steps, checkpoint_steps)`` steps of the signal."""
  ts, spc, n_seeds = data.taskset, run.steps_per_call, run.num_seeds
  primary, policy = sharding.is_primary(), config.get("on_nonfinite", "stop")
  state, resumed_from = _resume(workdir, run, manager)
  last_saved = resumed_from
  feed = _feed(config, data, run, _step(state))
  state = sharding.place(state, run.state_shardings)
  guard = None
  if policy == "stop":  # placed like the step's output, so the step compiles once
    guard = initial_guard(len(ts), n_seeds)
    guard = sharding.place(guard, jax.tree.map(lambda _: run.placement.replicated, guard))
  train_step = feed.train_step
  single = jax.process_count() == 1

  def evaluate(split):
    """``{task: {metric}}`` (the mean over seeds), and per seed when N > 1."""
    acc = feed.evaluate(state.params, split, state.model_state)
    if n_seeds == 1:
      return steps.eval_metrics(ts, acc)
    return seed_metrics([steps.eval_metrics(ts, a) for a in per_seed(acc, n_seeds)])

  def check_finite():
    """At a sync point: raises if a call since the last one went non-finite."""
    if guard is None:
      return
    got = jax.device_get(guard)
    if got["halted"]:
      raise NonFiniteError(_nonfinite_message(ts, got["nonfinite"], last_saved,
                                              manager.directory, config.seed))

  # --- Loop -------------------------------------------------------------------
  metrics_path = os.path.join(workdir, workdir_lib.METRICS_FILE)
  total, step = int(config.total_steps), _step(state)
  progress, affinity, last_eval = _Progress(total, step), _Affinity(), None
  lr_at = learning_rates(config, run.lr_schedules)
  board = None
  if primary and config.get("tensorboard", True):  # hides what metrics.jsonl dropped
    board = tensorboard.Board(workdir, config.to_dict(), purge_step=step + 1,
                              seeds=[config.seed + i for i in range(n_seeds)] if n_seeds > 1
                              else ())
  try:
    while step < total:
      if guard is None:
        state, meas = train_step(state, feed.next())
      else:
        (state, guard), meas = train_step((state, guard), feed.next())
      step += spc
      progress.tick(step)
      for cb in callbacks:
        cb(step, meas)
      affinity.add(meas)
      record = None
      logs, evals = step % config.log_steps == 0, step % config.eval_steps == 0
      saves = step % config.checkpoint_steps == 0 or step == total
      if logs or evals or saves:  # a sync point
        check_finite()
      if logs or step == total:
        record = _train_row(config, ts, run, state, meas, step, lr_at)
        logger.info("%s", progress.line(step, record["train/loss"]))
      if evals or step == total:
        last_eval = evaluate("test")
        record = _add_metrics(record or {"step": step}, "eval", last_eval)
        if config.eval_train:  # train-split metrics at eval steps: overfitting, shown
          _add_metrics(record, "train_eval", evaluate("train"))
      if record is not None and primary:
        workdir_lib.append_jsonl(metrics_path, record)
        if board is not None:
          board.write(workdir_lib.json_safe(record))
      # Every process stops at one step: with several, they agree at sync points only.
      preempted = (sharding.any_process(sigterm["set"]) if single or logs or evals or saves
                   else False)
      if saves or preempted:
        if last_saved != step:
          check_finite()  # (a preemption between sync points)
          ckpt_lib.save(manager, step, state, identity=config.to_dict())
          last_saved = step
        if preempted and step < total:
          raise Preempted(step, str(manager.directory), sigterm["signum"] or signal.SIGTERM)

  finally:  # the reader threads stop with the loop, however it ends
    feed.close()
    if board is not None:
      board.close()
  if last_eval is None:  # resumed at or past the end: evaluate what was restored
    last_eval = evaluate("test")
  summary = _summary(config, data, run, last_eval, step=step, resumed_from=resumed_from,
                     compilations=int(train_step._cache_size()),  # pylint: disable=protected-access
                     nonfinite_skipped=int(np.sum(jax.device_get(state.nonfinite_skipped))),
                     pipeline=feed.summary(), evaluate=evaluate,
                     affinity=affinity.summary(config, ts))
  if primary:
    workdir_lib.write_json(os.path.join(workdir, "summary.json"), summary, indent=2)
    if config.get("plots", True):
      plotting.run_plots(workdir, plotting.metrics_rows(workdir), workdir_lib.json_safe(summary))
      if any(t.dense for t in ts):
        dense_examples(run.model, data, state.params, summary["num_seeds"],
                       os.path.join(workdir, "dense_examples.png"),
                       model_state=state.model_state)
  n_seeds = summary["num_seeds"]
  logger.info("Final test metrics%s:\n%s",
              f" (mean ± s.e. over n={n_seeds} seeds)" if n_seeds > 1 else "",
              format_table(summary["tasks"], summary.get("tasks_se")))
  return workdir_lib.json_safe(summary)


def dense_examples(model, data, params, num_seeds: int, path: str, num: int = 4,
                   model_state=None) -> dict:
  """``dense_examples.png``: the first ``num`` test images, each dense task's
  ground truth and the model's prediction (seed 0's parameters and model
  state, in eval mode): class maps,
  depth on one scale per image, normals as colours. Returns
  :func:`mtljax.plotting.plot_dense_examples`' summary."""
  ts = data.taskset
  params, model_state = jax.device_get(
      (params, model_state) if num_seeds == 1 else
      jax.tree.map(lambda a: a[0], (params, model_state)))
  test = data.test
  n = int(min(num, np.min(test["n"])))
  src = int(test["source"][0])  # (dense data sets read one input source)
  x = (data.readers["test"].inputs(np.asarray(test["records"][src, :n]))
       if data.readers is not None else np.asarray(test["x"][src, :n]))
  ids = np.arange(len(ts), dtype=np.int32)
  outs = jax.device_get(jax.jit(lambda p, xs, s: multitask.forward(model, p, xs, ids, s)[0])(
      params, np.broadcast_to(x, (len(ts),) + x.shape), model_state))
  columns, classes = [], {}
  for i, t in enumerate(ts):
    if not t.dense:
      continue
    y = np.asarray(test["y"][t.group][int(ts.local_index[i]), :n])
    out = np.asarray(outs[t.group][i], np.float64)
    if t.kind == "segmentation":
      truth, pred = y, out.argmax(-1)
      classes[f"{t.name} truth"] = classes[f"{t.name} predicted"] = t.num_classes
    elif t.kind == "depth":
      truth, pred = y[..., 0], out[..., 0]
    else:
      norm = np.linalg.norm(out, axis=-1, keepdims=True)
      truth, pred = y, out / np.where(norm > 0, norm, 1.0)
    columns += [(f"{t.name} truth", t.kind, list(truth)), (f"{t.name} predicted", t.kind,
                                                           list(pred))]
  return plotting.plot_dense_examples(list(x), columns, path, classes)


def _summary(config, data, run, last_eval, *, step: int, resumed_from, compilations: int,
             nonfinite_skipped: int, pipeline: dict, evaluate: Callable,
             affinity: dict | None) -> dict:
  """The run's ``summary.json``: the last evaluation (N seeds: the mean, with
  ``tasks_se`` and ``per_seed``), how the run went, the train split's metrics
  (``config.eval_train``), TAG's affinity and Δm against the single-task
  baselines (``config.baselines``)."""
  n_seeds = run.num_seeds
  seeds_report = None
  if isinstance(last_eval, SeedMetrics):
    seeds_report = {"seeds": [config.seed + i for i in range(n_seeds)],
                    "tasks": last_eval.per_seed, "tasks_se": last_eval.se}
    last_eval = last_eval.mean
  summary = {
      "data": data.name, "arch": config.model.arch, "step": step, "tasks": last_eval,
      "metric_directions": {m: tasks_lib.METRIC_DIRECTIONS[m]
                            for ms in last_eval.values() for m in ms},
      "train_step_compilations": compilations,
      "resumed_from_step": resumed_from, "init_from": run.init_report,
      "nonfinite_skipped": nonfinite_skipped,
      "num_seeds": n_seeds,
      "mesh": dict(run.placement.mesh.shape),
      "data_pipeline": pipeline,
      "config": config.to_dict(),
  }
  if seeds_report is not None:  # "tasks" is the mean over seeds
    summary["tasks_se"] = seeds_report["tasks_se"]
    summary["per_seed"] = seeds_report
  if config.eval_train:
    train_metrics = evaluate("train")
    summary["train_metrics"] = getattr(train_metrics, "mean", train_metrics)
  if affinity is not None:
    summary["affinity"] = affinity
  if config.baselines:
    summary["delta_m"] = _delta_m(config, last_eval, seeds_report)
  return summary


def _delta_m(config, last_eval: dict, seeds_report: dict | None) -> dict:
  """Δm against the single-task baselines (trained once, then cached:
  :mod:`mtljax.measure`); with N seeds also paired per seed, mean ± s.e."""
  base_summary = measure.single_task_baseline_summary(config, train_and_evaluate)
  base = base_summary["tasks"]
  dm, per_task = measure.delta_m(last_eval, base)
  out = {"value": dm, "per_task": per_task, "baselines": base,
         "convention": measure.DELTA_M_CONVENTION,
         # Nash-MTL's average over every metric at once (sign: positive = better).
         "value_per_metric": measure.delta_m(last_eval, base, average="per_metric")[0]}
  if seeds_report is not None:  # paired: seed s of the run against seed s of the baselines
    per = [measure.delta_m(mine, theirs)[0] for mine, theirs in
           zip(seeds_report["tasks"], base_summary["per_seed"]["tasks"])]
    mean, se = mean_se(per)
    out.update({"per_seed": per, "mean_over_seeds": mean, "se": se})
  logger.info("Delta_m = %+.2f%% vs single-task baselines (positive = better).", dm)
  return out


def format_table(metrics: dict[str, dict[str, float]],
                 se: dict[str, dict[str, float]] | None = None) -> str:
  """The final metrics as a right-aligned text table, a row per task; with
  ``se`` (several seeds) each cell is ``mean ± s.e.``."""
  names = sorted({m for ms in metrics.values() for m in ms})
  rows = [["task"] + names]

  def cell(t, m):
    e = (se or {}).get(t, {}).get(m)
    return f"{metrics[t][m]:.4f}" + ("" if se is None or e is None else f" ± {e:.4f}")
  for t, ms in metrics.items():
    rows.append([t] + [cell(t, m) if m in ms else "-" for m in names])
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)
