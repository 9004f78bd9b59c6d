"""Ready for accelerators (issue 27): the loop never reads the device between
its sync points, the state is donated to the step with no copy kept, the
non-finite stop and its message are those of a call-by-call check, and
``scripts/device_check.sh`` runs on CPU in tiny mode.

References, all independent of the loop under test:

* the transfer count: ``jax.transfer_guard_device_to_host("disallow_explicit")``
  held from one call's callback to the next one's, between sync points (any
  device-to-host read, explicit or implicit, raises);
* donation: the previous state's buffers are ``is_deleted()`` after a call,
  and a whole run with donation equals, bit for bit, the run without
  (:data:`mtljax.train.DONATE_STATE` off);
* the non-finite stop: the loop of before, written here as the reference --
  the raw step called call by call, the measurements read after every call,
  the first bad call's message and the last checkpoint before it.

Compiles (fast tier): the run with donation and the one without share the
step's program through the persistent cache; the tiny-step test compiles its
own small config.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import helpers
from mtljax import build
from mtljax import checkpoint
from mtljax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  # Sync points at 20 and 40 (log, eval, checkpoint); calls of 5 steps; TAG's
  # affinity on, so its per-call sums are covered too.
  return helpers.small_sinusoids_config(**{
      "log_steps": 20, "eval_steps": 20, "checkpoint_steps": 20, "tag_lr": 0.1, **overrides})


def _assert_bitwise(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


class _GuardBetweenSyncPoints:
  """A callback that, from the callback of a call that is not a sync point to
  the next call's, holds ``transfer_guard_device_to_host("disallow_explicit")``
  (any device-to-host read raises -- on accelerators; the CPU backend ignores
  transfer guards) and counts reads of a ``jax.Array``'s host value (every
  ``int()``, ``float()``, ``bool()``, ``.item()``, ``.tolist()``,
  ``jax.device_get`` and ``np.array`` goes through ``ArrayImpl._value``; only
  ``np.asarray`` of a CPU array escapes, through the buffer protocol). The loop's
  own work between them -- the next call's dispatch and input, the
  measurements' bookkeeping, the SIGTERM and non-finite checks -- runs under it."""

  def __init__(self, sync_every: int, total: int):
    self.sync_every, self.total, self.held, self.windows, self.reads = sync_every, total, None, 0, 0

  def spy(self, original):
    def value(array):
      if self.held is not None:
        self.reads += 1
      return original.fget(array)
    return property(value)

  def __call__(self, step, meas):  # pylint: disable=unused-argument
    if self.held is not None:
      self.held.__exit__(None, None, None)
      self.held = None
      self.windows += 1
    if step % self.sync_every and step != self.total:
      self.held = jax.transfer_guard_device_to_host("disallow_explicit")
      self.held.__enter__()


@pytest.fixture(scope="module")
def donated_run(tmp_path_factory):
  from jax._src import array  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("donated"))
  guard = _GuardBetweenSyncPoints(20, 40)
  with pytest.MonkeyPatch.context() as mp:  # a counting wrapper: the value read is the same
    mp.setattr(array.ArrayImpl, "_value", guard.spy(array.ArrayImpl._value))
    summary = train.train_and_evaluate(_config(), workdir, callbacks=[guard])
  return workdir, summary, guard


def test_the_loop_reads_nothing_from_the_device_between_sync_points(donated_run):
  _, summary, guard = donated_run
  assert guard.windows == 6  # calls ending at 5->10, 10->15, 15->20, 25->30, 30->35, 35->40
  assert guard.reads == 0
  assert summary["step"] == 40 and "affinity" in summary
  assert summary["train_step_compilations"] == 1


def test_a_run_with_donation_equals_the_run_without_bitwise(donated_run, tmp_path,
                                                            monkeypatch):
  workdir, summary, _ = donated_run
  monkeypatch.setattr(train, "DONATE_STATE", False)
  kept = train.train_and_evaluate(_config(), str(tmp_path))
  assert kept["train_step_compilations"] == 1
  assert kept["tasks"] == summary["tasks"] and kept["affinity"] == summary["affinity"]
  assert helpers.metrics_rows(tmp_path) == helpers.metrics_rows(workdir)
  kept_state = helpers.final_state(tmp_path, _config())
  _assert_bitwise(kept_state, helpers.final_state(workdir, _config(), like=kept_state))


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_the_step_is_donated_and_the_loop_keeps_no_copy(policy):
  config = helpers.small_sinusoids_config(total_steps=10, on_nonfinite=policy)
  data = build.data_from_config(config)
  run = build.build_run(config, data)
  feed = train.DeviceFeed(config, data, run)
  carry = run.state
  if policy == "stop":
    guard = train.initial_guard(len(data.taskset), 1)
    carry = (run.state, jax.device_put(guard, jax.tree.map(
        lambda _: run.placement.replicated, guard)))
  new, meas = feed.train_step(carry, feed.next())
  new, meas = feed.train_step(new, feed.next())  # placed like the output: no second compile
  assert feed.train_step._cache_size() == 1  # pylint: disable=protected-access
  # The run's initial state (what the loop places and passes) was donated: no copy kept.
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(carry))
  assert all(not leaf.is_deleted() for leaf in jax.tree.leaves(new))
  assert int(np.asarray(meas["nonfinite_steps"])) == 0


def _diverging(**overrides):  # SGD at lr=5 on sines: non-finite after a few dozen steps
  return helpers.small_sinusoids_config(**{
      "optim.name": "sgd", "optim.lr": 5.0, "total_steps": 400, "steps_per_call": 2,
      "log_steps": 100, "eval_steps": 100, "checkpoint_steps": 10, **overrides})


def _call_by_call_reference(config, directory):
  """The loop of before: the raw step (not donated), the measurements read
  after every call; returns the expected message, the bad call's step, the
  last checkpoint step before it and the state there."""
  data = build.data_from_config(config)
  run = build.build_run(config, data)
  step_fn = jax.jit(run.train_fn)
  state, step, saved = run.state, 0, (None, None)
  while True:
    state, meas = step_fn(state, data.train)
    step += run.steps_per_call
    meas = jax.device_get(meas)
    if int(np.sum(meas["nonfinite_steps"])):
      message = train._nonfinite_message(  # pylint: disable=protected-access
          data.taskset, meas, saved[0], directory, config.seed)
      return message, step, saved
    if step % config.checkpoint_steps == 0:
      saved = (step, jax.device_get(state))
    assert step < config.total_steps, "the reference run did not diverge"


def test_the_non_finite_stop_is_that_of_a_call_by_call_check(tmp_path):
  workdir = str(tmp_path / "run")
  seen = []
  with pytest.raises(train.NonFiniteError) as info:
    train.train_and_evaluate(_diverging(), workdir,
                             callbacks=[lambda s, m: seen.append((s, jax.device_get(m)))])
  manager = checkpoint.make_manager(workdir)
  directory = manager.directory
  manager.close()
  message, bad_step, (good, good_state) = _call_by_call_reference(_diverging(), directory)
  assert str(info.value) == message
  # The loop went on dispatching up to the next sync point; those calls held the state.
  assert seen[-1][0] == -(-bad_step // 10) * 10
  for s, m in seen:
    if s > bad_step:
      assert int(np.sum(m["nonfinite_steps"])) == 0 and float(m["loss"]) == 0.0
  rows = helpers.metrics_rows(workdir) if os.path.exists(
      os.path.join(workdir, "metrics.jsonl")) else []
  assert all(r["step"] < bad_step for r in rows)
  if good is None:
    assert "no checkpoint had been saved yet" in message
  else:
    _assert_bitwise(helpers.final_state(workdir, _diverging()), good_state)


@pytest.mark.slow
def test_device_check_runs_in_tiny_mode_on_cpu(tmp_path):
  out = tmp_path / "device_check.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable}
  proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "device_check.sh"), "--tiny",
                         "--out", str(out), "--no-tests", "--", "--nodefault_experiment"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["mode"] == "tiny" and report["backend"] == "cpu"
  assert report["versions"]["jax"] == jax.__version__
  assert set(report["benchmarks"]) == {
      f"{b}:{p}" for b in ("bench_objectives", "bench_train_step", "bench_dense_step")
      for p in ("float32", "bfloat16")}
  for rows in report["benchmarks"].values():
    assert rows and all(r["ms_per_step"] > 0 for r in rows)
  assert report["cost_analysis"] and all(
      r["flops_per_step"] > 0 and r["bytes_per_step"] > 0 for r in report["cost_analysis"])
  assert "device_check" in proc.stdout and "ms/step" in proc.stdout


def test_a_state_holding_one_array_twice_is_placed_as_two_buffers_and_donated():
  """XLA refuses a donated argument that holds one buffer twice; an eager
  init can return one array in two places. ``sharding.place`` copies the
  second (``unaliased``: equal values, distinct buffers), so the library
  path of notebooks and benchmarks (eager ``init_train_state``, then
  ``prepare_train_step``, donated) runs; here on cross-stitch, whose
  stitch units were one array per model before."""
  from mtljax import optim, sharding, steps  # pylint: disable=g-import-not-at-top
  from mtljax.data import sampling  # pylint: disable=g-import-not-at-top
  from mtljax.models import multitask  # pylint: disable=g-import-not-at-top
  a = jax.numpy.arange(3.0)
  tree = sharding.unaliased({"x": a, "y": a, "z": [a, 1]})
  assert tree["x"] is a and tree["y"] is not a and tree["z"][0] is not a
  assert len({id(tree["x"]), id(tree["y"]), id(tree["z"][0])}) == 3
  for leaf in (tree["y"], tree["z"][0]):
    np.testing.assert_array_equal(leaf, a)
  assert tree["z"][1] == 1

  data = helpers.toy_data()
  model = multitask.make_model("cross_stitch", data.taskset, data.input_shape, hidden=(8, 4))
  tx = optim.make_optimizer("adam", lr=1e-3)
  state = steps.init_train_state(model, tx, jax.random.key(0))
  state = state._replace(params={**state.params, "shared": {"stitch": {
      n: state.params["shared"]["stitch"]["layer_0"] for n in ("layer_0", "layer_1")}}})
  fn = steps.make_train_step(model, tx, "fixed", sampling.make_sampler(
      data.taskset, sampling.task_probabilities("uniform", data.num_train), 4, 8),
      weights=np.ones(4))
  step, placed, d = sharding.prepare_train_step(fn, state, data.train, 4)
  new, _ = step(placed, d)
  new, meas = step(new, d)
  assert np.isfinite(float(meas["loss"]))
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(placed))
