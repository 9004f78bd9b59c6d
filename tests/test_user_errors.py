"""Issue 28: every failure a user can act on is one line and a non-zero exit
(mtljax/errors.py's UserError types, raised at the boundary: build, data
access, checkpoints, the workdir; experiments/main.py's one handler), checks of
config values before any data is read, and the cases that used to end with
exit 0 and a wrong result (every task weight 0, an init_from that loads
nothing, a corrupt checkpoint, a workdir without its config.json).

The command line is run for a few cases, grouped in one test (a process costs
seconds); the rest call the boundary functions and check the error's type
(which picks the exit code) and its message.
"""

import ast
import errno
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from experiments import main as main_lib
from experiments.configs import multi_digits
from mtljax import build
from mtljax import checkpoint
from mtljax import errors
from mtljax import train
from mtljax import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--config=experiments/configs/multi_digits.py:quick", "--config.total_steps=200"]


def _main(*args):
  return subprocess.run([sys.executable, "-m", "experiments.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def _one_line(r) -> str:
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
  return lines[0]


def test_exit_codes_by_type():
  assert errors.ConfigError("x").exit_code == 2
  for kind in (errors.DataError, errors.CheckpointError, errors.WorkdirError, errors.RunError):
    assert issubclass(kind, errors.UserError) and kind("x").exit_code == 1
  # The library's names for them are the same types (one handler catches them all).
  assert checkpoint.CheckpointError is errors.CheckpointError
  assert workdir_lib.WorkdirError is errors.WorkdirError
  assert issubclass(train.NonFiniteError, errors.RunError)
  from mtljax.data import tfds_access  # pylint: disable=g-import-not-at-top
  assert issubclass(tfds_access.DataNotAvailableError, errors.DataError)


def test_the_command_line_gives_one_line_and_the_exit_code_of_its_type(tmp_path, capsys,
                                                                      monkeypatch):
  """The cryptic cases: a missing config file without overrides, a NaN
  weight, an unknown task in the weights and every weight 0 (refused before
  the data set is generated: the fresh data_dir stays empty), and -v shows the
  traceback too. The last two run the real entry point (a process: exit code 2
  with one line; -v with the traceback; nothing generated); the first two call
  what it calls in-process (a process costs seconds): the flags parser that
  ``app.run`` is given, and for the NaN weight the weight flags' gathering,
  the run function main calls and main's one handler."""
  fresh = tmp_path / "data"
  fresh.mkdir()
  w = f"--workdir={tmp_path / 'w'}"
  data_dir = f"--config.data.data_dir={fresh}"
  # A missing config file: parse_flags (app.run's flags_parser) stops first.
  with pytest.raises(SystemExit) as e:
    main_lib.parse_flags(["main.py", "--config=experiments/configs/nosuch.py:quick", w])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert [l for l in err.splitlines() if l.strip()] == [
      "error: --config=experiments/configs/nosuch.py:quick: no such config file "
      "'experiments/configs/nosuch.py' (--list shows the configs)."]
  # A NaN weight: the flag as main's parser gathers it (one dict-valued
  # config flag, its literal applied to the config as config_flags does),
  # main's run function, and main's handler (fail: one line, the exit code).
  gathered = main_lib._gather_weight_flags(  # pylint: disable=protected-access
      ["main.py", *BASE, w, data_dir, "--config.objective.weights.left=nan"])
  assert gathered[-1] == "--config.objective.weights={'left': 'nan'}"
  config = helpers.with_overrides(multi_digits.get_config("quick"), {
      "total_steps": 200, "data.data_dir": str(fresh),
      "objective.weights": ast.literal_eval(gathered[-1].split("=", 1)[1])})
  with pytest.raises(errors.ConfigError) as e:
    train.train_and_evaluate(config, str(tmp_path / "w"))
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # fail() silences it
  with pytest.raises(SystemExit) as ex:
    main_lib.fail(e.value)
  assert ex.value.code == 2
  r = subprocess.CompletedProcess([], ex.value.code, "", capsys.readouterr().err)
  assert _one_line(r) == ("error: config.objective.weights.left must be a finite number >= 0, "
                          "got 'nan'.")
  # The real entry point.
  r = _main(*BASE, w, data_dir, "--config.objective.weights.nosuch=2")
  assert r.returncode == 2
  assert _one_line(r) == ("error: config.objective.weights: unknown task(s) ['nosuch'] for data "
                          "set 'multi_digits'; its tasks are ['left', 'right'].")
  assert not [f for _, _, fs in os.walk(fresh) for f in fs], "data was generated"
  r = _main(*BASE, w, data_dir, "--config.objective.weights.left=0",
            "--config.objective.weights.right=0", "-v", "0")
  assert r.returncode == 2 and "Traceback" in r.stderr  # -v: the traceback, then the line
  assert r.stderr.strip().splitlines()[-1] == (
      "error: config.objective.weights: every task's weight is 0 (['left', 'right']): nothing "
      "would train; give at least one task a weight > 0.")
  assert not [f for _, _, fs in os.walk(fresh) for f in fs], "data was generated"


def test_weight_flags_keep_a_bad_value_for_the_config_check_to_name():
  gathered = main_lib._gather_weight_flags(  # pylint: disable=protected-access
      ["prog", "--config.objective.weights.a=abc", "--config.objective.weights.b=-1",
       "--config.objective.weights.c=nan", "--config.objective.weights.d=inf",
       "--config.objective.weights.e=2"])
  assert gathered == ["prog", "--config.objective.weights={'a': 'abc', 'b': -1.0, 'c': 'nan', "
                              "'d': 'inf', 'e': 2.0}"]
  for value, shown in (("abc", "'abc'"), (-1.0, "-1.0"), ("nan", "'nan'"), (True, "True")):
    config = helpers.small_sinusoids_config(**{"objective.weights": {"sine_00": value}})
    with pytest.raises(errors.ConfigError) as e:
      build.validate_config(config)
    assert str(e.value) == (f"config.objective.weights.sine_00 must be a finite number >= 0, "
                            f"got {shown}.")


def _md(**overrides):
  c = multi_digits.get_config("quick")
  c.data.builder_config = "n2_m10_s0"
  return helpers.with_overrides(c, overrides)


def test_task_weights_are_checked_against_the_spec_before_any_data_is_read(tmp_path):
  fresh = str(tmp_path)
  for weights, message in (
      ({"nosuch": 2.0}, "config.objective.weights: unknown task(s) ['nosuch'] for data set "
                        "'multi_digits'; its tasks are ['left', 'right']."),
      ({"left": 0.0, "right": 0}, "config.objective.weights: every task's weight is 0 "
                                  "(['left', 'right']): nothing would train; give at least one "
                                  "task a weight > 0."),
      ({"right": 0.0}, "config.objective.weights: every task's weight is 0 (['right']): "
                       "nothing would train; give at least one task a weight > 0.")):
    tasks = ("right",) if weights == {"right": 0.0} else ()
    config = _md(**{"objective.weights": weights, "data.data_dir": fresh, "data.tasks": tasks})
    with pytest.raises(errors.ConfigError) as e:
      build.data_from_config(config)
    assert str(e.value) == message
  assert not [f for _, _, fs in os.walk(fresh) for f in fs]  # nothing generated or read


def test_the_library_refuses_all_zero_task_weights():
  from mtljax import tasks  # pylint: disable=g-import-not-at-top
  ts = tasks.TaskSet((tasks.Task("a", "regression"), tasks.Task("b", "regression")))
  with pytest.raises(ValueError, match=r"^Task weights are all 0 for tasks \['a', 'b'\]"):
    tasks.task_weights(ts, {"a": 0.0, "b": 0.0})
  np.testing.assert_array_equal(tasks.task_weights(ts, {"a": 0.0}), [0.0, 1.0])


def test_config_only_checks_come_before_the_data(tmp_path):
  """Values known from the config alone: refused by validate_config (called
  before any data access), with the message the user sees."""
  cases = (
      ({"data.pipeline": "host", "num_seeds": 2},
       "config.num_seeds=2 trains seeds side by side on data held on the device; with the host "
       "pipeline (config.data.pipeline='host') run one seed per job, or set "
       "config.data.pipeline='device'."),
      ({"data.pipeline": "host", "cv.folds": 2},
       "config.cv: cross-validation trains every fold x learning rate as one program over the "
       "train split held on the device; with the host pipeline (config.data.pipeline='host') set "
       "config.data.pipeline='device' or select hyper-parameters on a subset "
       "(config.data.max_train_examples)."),
      ({"objective.method": "cagrad", "objective.cagrad.c": 2.0},
       "config.objective.cagrad.c must be in [0, 1), got 2.0."),
  )
  for overrides, message in cases:
    config = helpers.small_sinusoids_config(**overrides)
    with pytest.raises(errors.ConfigError) as e:
      build.validate_config(config)
    assert str(e.value) == message
  a_file = tmp_path / "data"
  a_file.write_text("not a directory")
  with pytest.raises(errors.ConfigError) as e:
    build.validate_config(helpers.small_sinusoids_config(**{"data.data_dir": str(a_file)}))
  assert str(e.value) == f"config.data.data_dir={str(a_file)!r} is a file, not a directory."


def test_a_data_dir_where_the_data_cannot_be_written_is_a_data_error(tmp_path):
  # Generation needs DATA_DIR/sinusoids to be a directory; here it is a file.
  (tmp_path / "sinusoids").write_text("in the way")
  config = helpers.small_sinusoids_config(**{"data.data_dir": str(tmp_path)})
  with pytest.raises(errors.DataError) as e:
    build.data_from_config(config)
  assert str(e.value).startswith(f"data set 'sinusoids' cannot be prepared or read in "
                                 f"{str(tmp_path)!r} (NotADirectoryError: Not a directory: ")
  assert str(e.value).endswith("): set config.data.data_dir (or $MTLJAX_DATA_DIR) to a "
                               "writable directory.")
  assert e.value.exit_code == 1


def test_a_read_only_data_dir_with_data_to_generate_is_a_data_error(tmp_path):
  """A read-only file system (tmpfs mounted ro; skipped where it cannot be
  mounted): one line naming the directory and the reason."""
  mount = tmp_path / "ro"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)],
                    capture_output=True).returncode:
    pytest.skip("cannot mount a read-only tmpfs here")
  try:
    config = helpers.small_sinusoids_config(**{"data.data_dir": str(mount)})
    with pytest.raises(errors.DataError) as e:
      build.data_from_config(config)
  finally:
    subprocess.run(["umount", str(mount)], check=False)
  assert str(e.value).startswith(f"data set 'sinusoids' cannot be prepared or read in "
                                 f"{str(mount)!r} (")
  assert "Read-only file system" in str(e.value), str(e.value)
  assert "\n" not in str(e.value)


def test_a_task_with_no_labelled_example_is_a_config_error():
  config = _md(**{"data.builder_config": "n2_m10_s0_miss0.9"})
  with pytest.raises(errors.ConfigError) as e:
    build.data_from_config(config)
  assert str(e.value) == ("config.data: Data set 'multi_digits', split 'train': task 'left' has "
                          "no labelled examples (every label is missing).")


def test_the_operating_systems_reason_is_found_under_a_librarys_message():
  try:
    try:
      with open("/dev/full", "w") as f:  # always full
        f.write("x")
    except OSError as e:
      raise RuntimeError("a long message\nfrom a library, cut after its first line") from e
  except RuntimeError as e:
    wrapped = e
  assert wrapped.__cause__.errno == errno.ENOSPC
  assert errors.os_reason(wrapped) == "OSError: No space left on device"
  assert checkpoint._reason(wrapped) == (  # pylint: disable=protected-access
      "RuntimeError: a long message (OSError: No space left on device)")


# ----------------------------------------------------------------------------
# init_from that loads nothing.
# ----------------------------------------------------------------------------


def test_an_init_from_that_loads_nothing_is_refused_unless_allowed(tmp_path):
  source = helpers.small_sinusoids_config()
  data = build.data_from_config(source)
  manager = checkpoint.make_manager(str(tmp_path))
  checkpoint.save(manager, 0, build.build_run(source, data).state)
  manager.close()
  config = helpers.small_sinusoids_config(init_from=str(tmp_path), init_dont_load=".*")
  with pytest.raises(errors.ConfigError) as e:
    build.build_run(config, data)
  assert str(e.value) == (
      f"config.init_from={str(tmp_path)!r} (step 0) loads none of this model's parameters (left "
      "fresh by config.init_dont_load: 6, not in the checkpoint: 0): the run would train from "
      "scratch. Fix config.init_from or config.init_dont_load, or set "
      "config.init_allow_nothing_loaded=True to start so anyway.")
  config.init_allow_nothing_loaded = True
  assert build.build_run(config, data).init_report["loaded"] == []


# ----------------------------------------------------------------------------
# Checkpoints: checksum manifests, verified on restore; the run's identity.
# ----------------------------------------------------------------------------


def _state(value: float):
  return {"step": jnp.asarray(int(value), jnp.int32),
          "w": jnp.full((64, 32), value, jnp.float32) + jnp.arange(32, dtype=jnp.float32)}


def _flip_a_byte(step_dir) -> str:
  """Flips one byte in the middle of the largest file (its size unchanged)."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs
           if f != checkpoint.MANIFEST]
  biggest = max(files, key=os.path.getsize)
  size = os.path.getsize(biggest)
  with open(biggest, "r+b") as f:
    f.seek(size // 2)
    byte = f.read(1)
    f.seek(size // 2)
    f.write(bytes([byte[0] ^ 0xFF]))
  assert os.path.getsize(biggest) == size
  return os.path.relpath(biggest, step_dir)


def test_a_flipped_byte_is_rejected_and_the_step_before_restored_bitwise(tmp_path, caplog):
  manager = checkpoint.make_manager(str(tmp_path))
  for step in (1, 2):
    checkpoint.save(manager, step, _state(float(step)), identity={"seed": step})
  ckpts = os.path.join(str(tmp_path), "checkpoints")
  with open(os.path.join(ckpts, "2", checkpoint.MANIFEST)) as f:
    manifest = json.load(f)
  assert manifest["step"] == 2 and manifest["identity"] == {"seed": 2}
  assert manifest["files"] and all(len(v[1]) == 64 for v in manifest["files"].values())
  assert checkpoint.verify(os.path.join(ckpts, "2")) is None
  flipped = _flip_a_byte(os.path.join(ckpts, "2"))
  assert checkpoint.verify(os.path.join(ckpts, "2")) == (
      f"checksum manifest: the bytes of {flipped} changed since it was written (SHA-256)")
  with caplog.at_level("WARNING", logger="mtljax"):
    restored = checkpoint.restore_latest(manager, _state(0.0))
  manager.close()
  expected = jax.device_get(_state(1.0))
  for key in expected:
    assert np.array_equal(np.asarray(restored[key]), expected[key])
    assert np.asarray(restored[key]).dtype == expected[key].dtype
  assert any(r.getMessage().startswith(f"Checkpoint step 2 in {ckpts}/2 is rejected as "
                                       f"unreadable (checksum manifest: the bytes of {flipped} "
                                       "changed") for r in caplog.records), caplog.text
  assert sorted(os.listdir(ckpts)) == ["1", "2.unreadable"]  # kept aside for a look
  # A fine-tuning source is verified too.
  manager = checkpoint.make_manager(str(tmp_path / "src"))
  checkpoint.save(manager, 5, {"params": _state(5.0)})
  manager.close()
  _flip_a_byte(str(tmp_path / "src" / "checkpoints" / "5"))
  with pytest.raises(ValueError, match=r"checkpoint step 5 is corrupt \(checksum manifest: "):
    checkpoint.read_params(str(tmp_path / "src"))


def test_a_checkpoint_without_a_manifest_is_restored_unverified(tmp_path):
  manager = checkpoint.make_manager(str(tmp_path))
  checkpoint.save(manager, 3, _state(3.0))
  os.remove(os.path.join(str(tmp_path), "checkpoints", "3", checkpoint.MANIFEST))
  restored = checkpoint.restore_latest(manager, _state(0.0))
  manager.close()
  assert np.array_equal(np.asarray(restored["w"]), np.asarray(_state(3.0)["w"]))


def test_a_workdir_without_config_json_still_refuses_a_changed_config(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(helpers.small_sinusoids_config(total_steps=10), workdir)
  stored = checkpoint.read_identity(os.path.join(workdir, "checkpoints"))
  assert stored[0] == 10 and stored[1]["optim"]["lr"] == \
      helpers.small_sinusoids_config().optim.lr
  os.remove(os.path.join(workdir, workdir_lib.CONFIG_FILE))
  changed = helpers.small_sinusoids_config(total_steps=10, **{"optim.lr": 0.5})
  with pytest.raises(errors.WorkdirError) as e:
    train.train_and_evaluate(changed, workdir)
  assert str(e.value).startswith(
      f"workdir {workdir!r} has no config.json, and its checkpoint step 10 was written with "
      f"another config: optim.lr: {stored[1]['optim']['lr']!r} -> 0.5.")
  # The same config resumes (at the end: nothing to train) and config.json is back.
  summary = train.train_and_evaluate(helpers.small_sinusoids_config(total_steps=10), workdir)
  assert summary["resumed_from_step"] == 10
  assert os.path.exists(os.path.join(workdir, workdir_lib.CONFIG_FILE))


@pytest.mark.slow
def test_a_disk_that_fills_while_checkpointing_is_one_line_and_the_rerun_resumes(tmp_path):
  """A 2 MiB file system (tmpfs; skipped where it cannot be mounted) with
  160 KiB free: the second checkpoint fails. One line says the disk is full
  (no tracebacks of Orbax's background writers); after space is freed the
  same command resumes from the first checkpoint and finishes."""
  mount = tmp_path / "small"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                    capture_output=True).returncode:
    pytest.skip("cannot mount a small tmpfs here")
  try:
    fill = mount / "fill"
    fill.write_bytes(b"\0" * (2048 - 160) * 1024)
    command = ["--config=experiments/configs/sinusoids.py:quick", f"--workdir={mount / 'w'}",
               "--config.total_steps=100", "--config.log_steps=10", "--config.eval_steps=100",
               "--config.checkpoint_steps=10", "--config.steps_per_call=5",
               "--config.plots=False", "--config.tensorboard=False"]
    r = _main(*command)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors_shown = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors_shown) == 1 and r.stderr.strip().endswith(errors_shown[0])
    assert errors_shown[0].startswith("error: saving checkpoint step ")
    assert errors_shown[0].endswith("The disk is full: free space and rerun the same command "
                                    "to resume from the previous checkpoint, which is kept.")
    fill.unlink()
    r = _main(*command)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resumed from " in r.stderr
    with open(mount / "w" / "summary.json") as f:
      assert json.load(f)["step"] == 100
  finally:
    subprocess.run(["umount", str(mount)], check=False)


# ----------------------------------------------------------------------------
# Concurrency: two runs preparing one data set into one data_dir.
# ----------------------------------------------------------------------------

_OPEN = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from mtljax.data import tfds_access
_, sources = tfds_access.open_sources("sinusoids", data_dir=sys.argv[1],
                                      builder_config="t3_n20_m10_s5")
print("train", len(sources["train"]), "test", len(sources["test"]))
"""


def test_two_runs_preparing_one_new_data_set_take_turns(tmp_path):
  """While another process holds the data set's lock (this test's), two real
  processes that need it both say they wait; once it is released they
  prepare it in turn (one generates, the other reads it) and both open the
  same records."""
  import fcntl  # pylint: disable=g-import-not-at-top
  from mtljax.data import builders  # pylint: disable=g-import-not-at-top
  from mtljax.data import tfds_access  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / "data")
  version = builders.BUNDLED["sinusoids"].VERSION
  path = tfds_access.lock_path(data_dir, "sinusoids", "t3_n20_m10_s5", version)
  os.makedirs(os.path.dirname(path))
  held = open(path, "a+")
  fcntl.flock(held, fcntl.LOCK_EX)
  logs = [tmp_path / f"run{i}.err" for i in range(2)]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
  procs = [subprocess.Popen([sys.executable, "-c", _OPEN, data_dir], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
           for log in logs]
  try:
    deadline = time.time() + 240
    while time.time() < deadline and not all(
        "is being prepared in" in log.read_text() for log in logs):
      assert all(p.poll() is None for p in procs), [log.read_text() for log in logs]
      time.sleep(0.1)
    waiting = [log.read_text() for log in logs]
    assert all("Data set 'sinusoids' (t3_n20_m10_s5, version " in w and
               "by another run: waiting for it." in w for w in waiting), waiting
    assert all(p.poll() is None for p in procs)  # still waiting
  finally:
    fcntl.flock(held, fcntl.LOCK_UN)
    held.close()
  outs = [p.communicate(timeout=240)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [log.read_text() for log in logs]
  assert [o.splitlines()[-1] for o in outs] == ["train 60 test 30"] * 2
  assert sum("downloaded and prepared" in o for o in outs) == 1  # one generated, one read
  assert not [f for f in os.listdir(os.path.join(data_dir, "sinusoids"))
              if "incomplete" in f]


_BASELINES = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from experiments.configs import common
from mtljax import measure, train
c = common.base_config()
c.data.name, c.data.builder_config = "mmoe_synthetic", "p0.9_n300_m100_s0"
c.model.hidden = (16,)
c.total_steps = c.log_steps = c.eval_steps = c.checkpoint_steps = 20
c.plots = c.tensorboard = False
c.baselines_cache = sys.argv[1]
print(json.dumps(measure.single_task_baseline_summary(c, train.train_and_evaluate)["tasks"]))
"""


def _baselines_config(cache: str):
  from experiments.configs import common  # pylint: disable=g-import-not-at-top
  c = common.base_config()
  c.data.name, c.data.builder_config = "mmoe_synthetic", "p0.9_n300_m100_s0"
  c.model.hidden = (16,)
  c.total_steps = c.log_steps = c.eval_steps = c.checkpoint_steps = 20
  c.plots = c.tensorboard = False
  c.baselines_cache = cache
  return c


@pytest.mark.slow
def test_two_runs_sharing_a_baselines_cache_train_it_once(tmp_path):
  """Two real processes need the same single-task baselines from one cache
  (a sweep) while the entry's lock is held (by this test): both say they
  wait; once released, one trains and the other reads its summary, and
  neither fails on the entry's workdir lock."""
  import fcntl  # pylint: disable=g-import-not-at-top
  from mtljax import measure  # pylint: disable=g-import-not-at-top
  cache = str(tmp_path / "cache")
  config = _baselines_config(cache)
  entry = os.path.join(measure.cache_root(config), measure.cache_key(config))
  os.makedirs(os.path.dirname(entry))
  held = open(f"{entry}.lock", "a+")
  fcntl.flock(held, fcntl.LOCK_EX)
  logs = [tmp_path / f"run{i}.err" for i in range(2)]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
  procs = [subprocess.Popen([sys.executable, "-c", _BASELINES, cache], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
           for log in logs]
  try:
    deadline = time.time() + 240
    while time.time() < deadline and not all(
        "is training the single-task baselines" in log.read_text() for log in logs):
      assert all(p.poll() is None for p in procs), [log.read_text() for log in logs]
      time.sleep(0.1)
    assert all(f"Another run is training the single-task baselines into {entry}: waiting "
               "for it." in log.read_text() for log in logs), [l.read_text() for l in logs]
  finally:
    fcntl.flock(held, fcntl.LOCK_UN)
    held.close()
  outs = [p.communicate(timeout=400)[0] for p in procs]
  errs = [log.read_text() for log in logs]
  assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errs]
  assert sum("Training single-task baselines" in e for e in errs) == 1
  assert sum("Single-task baselines from the cache" in e for e in errs) == 1
  tasks = [json.loads(o.strip().splitlines()[-1]) for o in outs]
  assert tasks[0] == tasks[1] and set(tasks[0]) == {"y1", "y2"}
