"""Surviving faults: kill and preemption, non-finite values, workdirs in bad
states, determinism (mtljax/train.py, mtljax/workdir.py, mtljax/checkpoint.py).

The kill tests run the README's command line in a process of their own and
kill it with SIGKILL or SIGTERM; the rerun must end with the bits of an
uninterrupted run (parameters, optimizer state and every metrics row).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import helpers
from mtljax import build
from mtljax import checkpoint
from mtljax import errors
from mtljax import optim
from mtljax import steps
from mtljax import tasks
from mtljax import train
from mtljax import workdir as workdir_lib
from mtljax.data import sampling
from mtljax.models import multitask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small(**overrides):
  return helpers.small_sinusoids_config(**overrides)


def _final_state(workdir, like):
  manager = checkpoint.make_manager(str(workdir))
  try:
    return checkpoint.restore_latest(manager, like)
  finally:
    manager.close()


def _assert_bitwise(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


# ----------------------------------------------------------------------------
# Kill and preemption: a process of its own.
# ----------------------------------------------------------------------------

_CLI_FLAGS = [  # 600 steps, a checkpoint every 50, a row every 10
    "--config.model.arch=multi_head", "--config.model.hidden=(16,16)",
    "--config.sampling.examples_per_task=8", "--config.total_steps=600",
    "--config.steps_per_call=5", "--config.log_steps=10", "--config.eval_steps=100",
    "--config.checkpoint_steps=50", "--config.eval_batch_size=64"]


def _command(workdir):
  return [sys.executable, "-m", "experiments.main",
          "--config=experiments/configs/sinusoids.py:quick", f"--workdir={workdir}",
          *_CLI_FLAGS]


def _run_to_end(workdir):
  proc = subprocess.run(_command(workdir), cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _start_and_signal(workdir, sig, after_step: int):
  """Starts the run, waits for a finished checkpoint at or after
  ``after_step``, sends ``sig``; returns (returncode, stderr, killed_before_end)."""
  proc = subprocess.Popen(_command(workdir), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  ckpts = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    done = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
    if done and max(done) >= after_step:
      break
    time.sleep(0.02)
  finished_early = proc.poll() is not None
  if not finished_early:
    proc.send_signal(sig)
  _, err = proc.communicate(timeout=300)
  return proc.returncode, err, not finished_early


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  _run_to_end(workdir)
  return workdir


def _like():
  c = _small()
  c.model.hidden = (16, 16)
  return build.build_run(c, build.data_from_config(c)).state


def test_sigkill_mid_run_then_the_same_command_ends_bitwise_like_an_uninterrupted_run(
    straight_run, tmp_path):
  workdir = str(tmp_path / "killed")
  rc, _, killed = _start_and_signal(workdir, signal.SIGKILL, after_step=100)
  assert killed and rc == -signal.SIGKILL
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  proc = _run_to_end(workdir)
  assert "Resumed from" in proc.stderr
  assert helpers.metrics_rows(workdir) == helpers.metrics_rows(straight_run)  # trimmed past the checkpoint, then redone
  like = _like()
  _assert_bitwise(_final_state(workdir, like), _final_state(straight_run, like))
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  with open(os.path.join(straight_run, "summary.json")) as f:
    assert summary["tasks"] == json.load(f)["tasks"]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly_then_resumes_bitwise(
    straight_run, tmp_path):
  workdir = str(tmp_path / "preempted")
  rc, err, signalled = _start_and_signal(workdir, signal.SIGTERM, after_step=50)
  assert signalled and rc == 143, err[-2000:]
  assert "Traceback" not in err and "Preempted (SIGTERM) at step" in err
  step = int(err.split("Preempted (SIGTERM) at step ")[1].split(":")[0])
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                 if d.isdigit())
  assert saved[-1] == step  # saved where it stopped, not only at the interval
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  _run_to_end(workdir)
  assert helpers.metrics_rows(workdir) == helpers.metrics_rows(straight_run)
  like = _like()
  _assert_bitwise(_final_state(workdir, like), _final_state(straight_run, like))


def test_ctrl_c_saves_a_checkpoint_like_sigterm_and_exits_130(tmp_path):
  workdir = str(tmp_path / "interrupted")
  rc, err, signalled = _start_and_signal(workdir, signal.SIGINT, after_step=50)
  assert signalled and rc == 130, err[-2000:]
  assert "Traceback" not in err and "Preempted (SIGINT) at step" in err
  step = int(err.split("Preempted (SIGINT) at step ")[1].split(":")[0])
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                 if d.isdigit())
  assert saved[-1] == step


def _interrupt(times: int, at_step: int):
  def callback(step, _):
    if step == at_step:
      for _ in range(times):
        os.kill(os.getpid(), signal.SIGINT)
  return callback


def test_one_ctrl_c_saves_at_the_step_and_a_second_stops_at_once(tmp_path):
  old = signal.getsignal(signal.SIGINT)
  with pytest.raises(train.Preempted) as e:
    train.train_and_evaluate(_small(total_steps=40), str(tmp_path / "a"),
                             callbacks=[_interrupt(1, 15)])
  assert str(e.value).startswith("Preempted (SIGINT) at step 15: checkpoint saved in ")
  assert e.value.exit_code == 130 and e.value.step == 15
  assert "15" in os.listdir(tmp_path / "a" / "checkpoints")
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(_small(total_steps=40), str(tmp_path / "b"),
                             callbacks=[_interrupt(2, 15)])
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["10"]  # nothing saved at 15
  assert signal.getsignal(signal.SIGINT) is old  # the handlers are restored


# ----------------------------------------------------------------------------
# Non-finite losses and gradients.
# ----------------------------------------------------------------------------


def _nan_input_step(on_nonfinite):
  """A step on four regression tasks with inputs of their own; task 2's inputs
  are NaN, so every step sampling it is non-finite and no other is."""
  from mtljax.data import task_data  # pylint: disable=g-import-not-at-top
  data = task_data.build_task_data("family", *helpers.family_data([20] * 4, [10] * 4))
  train_split = jax.tree.map(np.array, data.train)
  train_split["x"][2] = np.nan
  ts = data.taskset
  model = multitask.make_model("multi_head", ts, data.input_shape, hidden=(8,))
  tx = optim.make_optimizer("adam", lr=1e-2)
  fn = steps.make_train_step(
      model, tx, "fixed", sampling.make_sampler(
          ts, sampling.task_probabilities("uniform", data.num_train), 2, 8),
      weights=tasks.task_weights(ts, None), seed=3, on_nonfinite=on_nonfinite)
  return ts, jax.jit(fn), steps.init_train_state(model, tx, jax.random.key(0)), train_split


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_non_finite_step_leaves_the_state_untouched_and_names_the_task(policy):
  ts, step, state, split = _nan_input_step(policy)
  r = 2
  seen_bad = seen_good = 0
  for _ in range(12):
    new, meas = step(state, split)
    assert int(new.step) == int(state.step) + 1
    sampled_r = int(meas["task_count"][r]) > 0
    if sampled_r:  # the loss of r is NaN: nothing moves, the step and task are named
      seen_bad += 1
      assert int(meas["nonfinite_steps"]) == 1
      assert int(meas["nonfinite_first"]) == int(state.step)
      assert np.flatnonzero(np.asarray(meas["nonfinite_tasks"])).tolist() == [r]
      for part in ("params", "opt_state", "objective_state"):
        _assert_bitwise(getattr(new, part), getattr(state, part))
      assert int(new.nonfinite_skipped) == int(state.nonfinite_skipped) + 1
    else:
      seen_good += 1
      assert int(meas["nonfinite_steps"]) == 0
      assert int(meas["nonfinite_first"]) == np.iinfo(np.int32).max
      assert not np.array_equal(new.params["shared"]["trunk"]["layer_0"]["kernel"],
                                state.params["shared"]["trunk"]["layer_0"]["kernel"])
      assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(new.params))
    state = new
  assert seen_bad and seen_good
  assert int(state.nonfinite_skipped) == seen_bad


def _diverging(**overrides):  # SGD at lr=5 on sines: non-finite after a few dozen steps
  return _small(**{"optim.name": "sgd", "optim.lr": 5.0, "total_steps": 400, **overrides})


def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path)
  with pytest.raises(train.NonFiniteError, match=r"Non-finite value in the (loss of task\(s\) "
                     r"\[.*\]|gradient .*) at training step \d+; the update was not "
                     r"applied") as info:
    train.train_and_evaluate(_diverging(), workdir)
  message = str(info.value)
  bad_step = int(message.split("at training step ")[1].split(";")[0])
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    for row in helpers.metrics_rows(workdir):  # strict JSON, and nothing from the bad step on
      json.dumps(row, allow_nan=False)
      assert row["step"] < bad_step
  if "last good checkpoint is step" in message:
    good = int(message.split("last good checkpoint is step ")[1].split(" ")[0])
    assert good < bad_step
    state = _final_state(workdir, build.build_run(
        _diverging(), build.data_from_config(_diverging())).state)
    assert int(state.step) == good
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))
  else:
    assert "no checkpoint had been saved yet" in message


def test_skip_counts_the_skipped_updates_and_the_run_finishes(tmp_path):
  summary = train.train_and_evaluate(_diverging(on_nonfinite="skip"), str(tmp_path))
  assert summary["nonfinite_skipped"] > 0
  rows = helpers.metrics_rows(str(tmp_path))
  counts = [r["train/nonfinite_skipped"] for r in rows if "train/nonfinite_skipped" in r]
  assert counts == sorted(counts) and counts[-1] == summary["nonfinite_skipped"]
  with open(tmp_path / "summary.json") as f:
    text = f.read()
  json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))


def test_json_outputs_write_null_for_nan_and_say_why(tmp_path):
  path = str(tmp_path / "s.json")
  workdir_lib.write_json(path, {"tasks": {"a": {"mse": float("nan"), "mae": 1.5}},
                                "curve": [1.0, float("inf")]})
  with open(path) as f:
    got = json.loads(f.read(), parse_constant=lambda c: pytest.fail(c))
  assert got["tasks"]["a"] == {"mse": None, "mae": 1.5} and got["curve"] == [1.0, None]
  assert got["nonfinite"] == ["tasks.a.mse (nan)", "curve[1] (inf)"]


def test_an_infinite_learning_rate_is_refused_before_loading(tmp_path):
  with pytest.raises(ValueError, match="config.optim.lr must be a finite number > 0"):
    train.train_and_evaluate(_small(**{"optim.lr": float("inf")}), str(tmp_path))


def test_init_from_a_checkpoint_with_nan_weights_is_refused():
  target = {"shared": {"w": jnp.zeros((2,))}, "tasks": {}}
  source = {"shared": {"w": np.array([1.0, np.nan], np.float32)}, "tasks": {}}
  with pytest.raises(ValueError, match=r"holds NaN/inf in \['shared/w'\]"):
    checkpoint.load_params(target, source)


# ----------------------------------------------------------------------------
# Workdirs.
# ----------------------------------------------------------------------------


def test_an_unwritable_workdir_is_an_error_before_any_data_loads(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  c = _small(**{"data.name": "no_such_dataset"})  # loading it would fail differently
  with pytest.raises(workdir_lib.WorkdirError, match="is not writable"):
    train.train_and_evaluate(c, str(blocker / "run"))


def test_a_second_run_in_a_busy_workdir_is_refused_at_once(tmp_path):
  with workdir_lib.Lock(str(tmp_path)):
    t0 = time.perf_counter()
    with pytest.raises(workdir_lib.WorkdirError, match=r"is in use by another run \(pid "):
      train.train_and_evaluate(_small(), str(tmp_path))
    assert time.perf_counter() - t0 < 30  # refused, not waited for
  train.train_and_evaluate(_small(total_steps=10), str(tmp_path))  # free again


def test_resuming_with_another_config_is_refused_listing_the_keys(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(_small(total_steps=10), workdir)
  with pytest.raises(workdir_lib.WorkdirError,
                     match=r"started with another config: optim.lr: 0.001 -> 0.01; seed: 0 -> 1"):
    train.train_and_evaluate(_small(total_steps=10, seed=1, **{"optim.lr": 1e-2}), workdir)
  with pytest.raises(workdir_lib.WorkdirError, match="holds a different model"):
    train.train_and_evaluate(_small(total_steps=10, **{"model.arch": "shared_bottom"}),
                             workdir)
  # The step budget may change: this resumes and trains on.
  summary = train.train_and_evaluate(_small(total_steps=20), workdir)
  assert summary["resumed_from_step"] == 10 and summary["step"] == 20
  with open(os.path.join(workdir, "config.json")) as f:
    stored = json.load(f)
  assert stored["total_steps"] == 20 and stored["seed"] == 0


def test_a_failed_checkpoint_save_is_one_clear_error_and_keeps_the_previous(tmp_path):
  workdir = str(tmp_path)
  ckpts = os.path.join(workdir, "checkpoints")

  def break_the_disk(step, _):
    if step == 15:  # after the checkpoint at 10: the next save cannot create its directory
      shutil.move(ckpts, ckpts + ".kept")
      with open(ckpts, "w") as f:
        f.write("not a directory")
  with pytest.raises(checkpoint.CheckpointError, match="saving checkpoint step 20 to .* failed"):
    train.train_and_evaluate(_small(total_steps=40), workdir, callbacks=[break_the_disk])
  os.remove(ckpts)
  shutil.move(ckpts + ".kept", ckpts)
  summary = train.train_and_evaluate(_small(total_steps=40), workdir)
  assert summary["resumed_from_step"] == 10 and summary["step"] == 40


def test_metrics_rows_past_the_restored_step_are_dropped(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(_small(total_steps=20), workdir)
  # A crashed run's rows past the checkpoint, and a row cut in half by a kill.
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 30, "train/loss": 1.0}) + "\n" + '{"step": 40, "tra')
  shutil.rmtree(os.path.join(workdir, "checkpoints", "20"))
  summary = train.train_and_evaluate(_small(total_steps=20), workdir)
  assert summary["resumed_from_step"] == 10
  assert [r["step"] for r in helpers.metrics_rows(workdir)] == [10, 20]


def test_resuming_where_steps_per_call_does_not_divide_the_step_is_refused(tmp_path):
  # A checkpoint at step 15 (calls of 5), resumed with calls of 10: the calls
  # would not line up with the steps taken (the loop would run past the end).
  workdir = str(tmp_path)
  train.train_and_evaluate(_small(total_steps=15, log_steps=5, eval_steps=15,
                                  checkpoint_steps=5), workdir)
  with pytest.raises(errors.ConfigError, match=r"at step 15, which steps_per_call=10 does not "
                                              r"divide.*dividing 15"):
    train.train_and_evaluate(_small(total_steps=40, steps_per_call=10, log_steps=10,
                                    eval_steps=20, checkpoint_steps=10), workdir)


def _truncate_largest_file(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(max(os.path.getsize(biggest) // 3, 1))


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_an_unreadable_checkpoint_falls_back_to_the_one_before_with_a_warning(
    damage, tmp_path, caplog):
  workdir = str(tmp_path)
  train.train_and_evaluate(_small(total_steps=20), workdir)
  latest = os.path.join(workdir, "checkpoints", "20")
  if damage == "truncated":
    _truncate_largest_file(latest)
  else:
    shutil.rmtree(latest)
    os.makedirs(latest)
  with caplog.at_level("WARNING", logger="mtljax"):
    summary = train.train_and_evaluate(_small(total_steps=20), workdir)
  assert summary["resumed_from_step"] == 10
  assert any("Checkpoint step 20" in r.getMessage() and "unreadable" in r.getMessage()
             for r in caplog.records)


def test_when_no_checkpoint_is_readable_the_error_says_which_and_what_to_do(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(_small(total_steps=10), workdir)
  _truncate_largest_file(os.path.join(workdir, "checkpoints", "10"))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"no checkpoint in .* is readable: step 10 .*delete the unreadable"):
    train.train_and_evaluate(_small(total_steps=20), workdir)


def test_a_checkpoint_from_before_model_state_restores_with_it_none(tmp_path):
  """A checkpoint written by the train state before its ``model_state`` field
  (eight fields) restores into today's state bitwise, ``model_state`` None,
  without being taken for the dict layout or moved aside."""
  import collections  # pylint: disable=g-import-not-at-top
  before = collections.namedtuple("TrainState", [f for f in steps.TrainState._fields
                                                 if f != "model_state"])
  state = steps.TrainState(jnp.int32(7), {"shared": {"w": jnp.arange(3.0)}, "tasks": {}},
                           {"mu": jnp.full((3,), 0.5)}, {}, jnp.int32(1),
                           rng=jnp.asarray([1, 2], jnp.uint32))
  manager = checkpoint.make_manager(str(tmp_path))
  checkpoint.save(manager, 7, before(*state[:-1]))
  manager.close()
  manager = checkpoint.make_manager(str(tmp_path))
  try:
    restored = checkpoint.restore_latest(manager, jax.tree.map(jnp.zeros_like, state))
  finally:
    manager.close()
  assert isinstance(restored, steps.TrainState) and restored.model_state is None
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  assert os.listdir(tmp_path / "checkpoints") == ["7"]


def test_a_checkpoint_of_the_old_dict_layout_is_refused_in_one_line_saying_what_to_do(
    tmp_path):
  """A workdir whose checkpoint an mtljax before steps.TrainState wrote (the
  state as a dict without its unused fields, saved with orbax as that version
  did): resuming is refused in one line that names the layout and what to do,
  and the checkpoint is left where it is (not moved aside as unreadable)."""
  workdir = str(tmp_path)
  config = _small(total_steps=20)
  state = build.build_run(config, build.data_from_config(config)).state
  old = {k: v for k, v in state._asdict().items() if v is not None}
  assert set(old) == {"step", "params", "opt_state", "objective_state", "nonfinite_skipped",
                      "rng"}
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                  options=ocp.CheckpointManagerOptions(create=True))
  manager.save(10, args=ocp.args.StandardSave(old))
  manager.wait_until_finished()
  manager.close()
  with pytest.raises(checkpoint.CheckpointError) as raised:
    train.train_and_evaluate(config, workdir)
  message = str(raised.value)
  assert "\n" not in message
  assert re.fullmatch(
      r"checkpoint step 10 in \S+ holds the train state as a dict \(the layout of mtljax "
      r"before steps\.TrainState; it lacks \['anchor', 'hparams'\]\): this version does not "
      r"resume it; retrain in a new --workdir, or resume it with the previous mtljax version "
      r"\(fine-tuning from it with config\.init_from still works\)\.", message), message
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["10"]
  # As it says: its parameters still initialise a new run.
  params, step = checkpoint.read_params(workdir)
  assert step == 10
  _assert_bitwise(params, state.params)


# ----------------------------------------------------------------------------
# Determinism.
# ----------------------------------------------------------------------------


def test_same_seed_same_metrics_other_seed_other_metrics(tmp_path):
  a = train.train_and_evaluate(_small(total_steps=20), str(tmp_path / "a"))
  b = train.train_and_evaluate(_small(total_steps=20), str(tmp_path / "b"))
  c = train.train_and_evaluate(_small(total_steps=20, seed=1), str(tmp_path / "c"))
  assert helpers.metrics_rows(str(tmp_path / "a")) == helpers.metrics_rows(str(tmp_path / "b")) and a["tasks"] == b["tasks"]
  assert helpers.metrics_rows(str(tmp_path / "a")) != helpers.metrics_rows(str(tmp_path / "c"))
  assert a["tasks"] != c["tasks"]



def test_a_config_from_before_added_keys_resumes_and_another_value_is_refused(tmp_path):
  """A workdir whose stored config predates a key (``precision``,
  ``dense_convention``, ``data.root``...) resumes with that key at the value
  that does what the old config did; another value is a changed config."""
  from mtljax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  current = {"seed": 0, "precision": "float32", "dense_convention": "exact",
             "data": {"name": "scenes", "root": "", "classes": 0, "label_folder": ""},
             "model": {"arch": "mmoe", "output_stride": 8, "normalization": "batch",
                       "conv_impl": "auto"}}
  old = {"seed": 0, "data": {"name": "scenes"}, "model": {"arch": "mmoe"}}
  with open(tmp_path / workdir_lib.CONFIG_FILE, "w") as f:
    json.dump(old, f)
  workdir_lib.check_config(str(tmp_path), current, write=False)
  for key, value in (("precision", "bfloat16"), ("dense_convention", "mtan")):
    with pytest.raises(workdir_lib.WorkdirError, match=f"{key}: 'float32|{key}: 'exact"):
      workdir_lib.check_config(str(tmp_path), {**current, key: value}, write=False)
  with pytest.raises(workdir_lib.WorkdirError, match="model.normalization: 'batch' -> 'group'"):
    workdir_lib.check_config(str(tmp_path), {**current, "model": {
        **current["model"], "normalization": "group"}}, write=False)
  with pytest.raises(workdir_lib.WorkdirError, match="data.root: '' -> '/data'"):
    workdir_lib.check_config(str(tmp_path), {**current, "data": {**current["data"],
                                                                 "root": "/data"}}, write=False)
