"""The device mesh and shardings (mtljax/sharding.py).

Rules and checks run here on this process's device(s) (an ``AbstractMesh``
stands in for sizes > 1). Runs on a mesh start a process of their own with 8
fake CPU devices (``XLA_FLAGS`` set before jax is imported:
``tests/mesh_worker.py``) and are compared with the same runs on one device
(this process's own, by the same worker code):
the same parameters and metrics within float tolerance (the order of the
batch sums differs across devices), one compilation, and the compiled step's
input/output shardings equal to what the rules ask for.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

import helpers
import mesh_worker
from mtljax import sharding
from mtljax import steps

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKER = os.path.join(_ROOT, "tests", "mesh_worker.py")


# ----------------------------------------------------------------------------
# Rules, in process.
# ----------------------------------------------------------------------------


def _params(num_tasks=8):
  return {"shared": {"trunk": {"layer_0": {"kernel": jnp.zeros((4, 16))}}},
          "tasks": {"heads": {"reg": {"kernel": jnp.zeros((num_tasks, 16, 1)),
                                      "bias": jnp.zeros((num_tasks, 1))}}}}


def test_default_rules_split_task_stacks_only_when_the_task_axis_is_split():
  mesh = AbstractMesh((2, 4, 1), sharding.AXES)
  specs = sharding.param_specs(_params(), sharding.default_rules(mesh), mesh)
  assert specs["shared"]["trunk"]["layer_0"]["kernel"] == P()
  assert specs["tasks"]["heads"]["reg"]["kernel"] == P("task")
  one = AbstractMesh((8, 1, 1), sharding.AXES)
  specs = sharding.param_specs(_params(), sharding.default_rules(one), one)
  assert specs["tasks"]["heads"]["reg"]["kernel"] == P()


def test_rules_from_the_command_line_first_match_wins():
  rules = sharding.parse_rules("^tasks/:task; kernel$:_,data; .*:")
  assert rules == (("^tasks/", P("task")), (" kernel$".strip(), P(None, "data")), (".*", P()))
  mesh = AbstractMesh((2, 4, 1), sharding.AXES)
  specs = sharding.param_specs(_params(), rules, mesh)
  assert specs["tasks"]["heads"]["reg"]["kernel"] == P("task")  # rule 1 before rule 2
  assert specs["shared"]["trunk"]["layer_0"]["kernel"] == P(None, "data")


@pytest.mark.parametrize("spec, message", [
    ("^tasks/:model", "unknown mesh axis 'model'"),
    ("^tasks/", "is not REGEX:AXES"),
    ("([:task", "bad regex"),
])
def test_bad_rules_are_named(spec, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    sharding.parse_rules(spec)


def test_unmatched_parameters_and_unused_rules_are_errors():
  mesh = AbstractMesh((2, 4, 1), sharding.AXES)
  with pytest.raises(ValueError, match=r"no rule matches \['shared/trunk/layer_0/kernel'\]"):
    sharding.param_specs(_params(), sharding.parse_rules("^tasks/:task"), mesh)
  with pytest.raises(ValueError, match=r"rule\(s\) \['\^experts/'\] match no parameter"):
    sharding.param_specs(_params(), sharding.parse_rules("^experts/:task;.*:"), mesh)


def test_a_task_axis_that_does_not_divide_the_task_count_is_an_error():
  mesh = AbstractMesh((2, 4, 1), sharding.AXES)
  with pytest.raises(ValueError, match=r"tasks/heads/reg/\w+ \(6, .*dimension 0 \(6\) is split "
                                       r"along mesh axis 'task' of size 4"):
    sharding.param_specs(_params(6), sharding.default_rules(mesh), mesh)


@pytest.mark.parametrize("data, task, message", [
    (3, 1, r"data=3 x task=1 x seed=1 = 3 devices, but there are 1"),
    (-1, -1, "at most one of data/task/seed may be -1"),
    (0, 1, "^data=0 must be a positive size or -1"),
    (-1, 2, "1 devices cannot be split into task=2"),
])
def test_an_invalid_mesh_is_named(data, task, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(data, task)


def test_optimizer_leaves_mirror_their_parameters():
  assert sharding._mirrors("shared/0/mu/trunk/w", "shared/trunk/w")
  assert sharding._mirrors("tasks/heads/0/nu/reg/kernel", "tasks/heads/reg/kernel")
  assert not sharding._mirrors("tasks/heads/0/nu/reg/bias", "tasks/heads/reg/kernel")
  assert not sharding._mirrors("shared/0/count", "shared/trunk/w")


def test_examples_per_task_must_divide_along_the_data_axis():
  pl = sharding.Placement(AbstractMesh((4, 2, 1), sharding.AXES))
  with pytest.raises(ValueError, match="examples_per_task=6 is split along mesh axis 'data' "
                                       "of size 4"):
    pl.check_batch(6)


def test_seeds_must_fill_the_seed_axis():
  pl = sharding.Placement(AbstractMesh((2, 1, 4), sharding.AXES))
  for n in (1, 6):
    with pytest.raises(ValueError, match=f"^seed=4 splits num_seeds={n} "
                                         "seeds over devices; num_seeds must be a multiple"):
      pl.check_seeds(n)
  pl.check_seeds(8)
  state = steps.TrainState(step=jnp.zeros((8,), jnp.int32),
                           params=jax.tree.map(lambda a: jnp.zeros((8,) + a.shape), _params()),
                           opt_state={"shared": {}, "tasks": {}}, objective_state={},
                           nonfinite_skipped=jnp.zeros((8,), jnp.int32))
  sh = pl.state(state, lead=1, seeds=True)
  assert all(s.spec[0] == "seed" for s in jax.tree.leaves(sh))


def test_one_device_placement_leaves_every_leaf_replicated():
  """On this machine's single device the default mesh is 1 x 1: nothing moves."""
  pl = sharding.Placement(sharding.make_mesh())
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=_params(),
                           opt_state={"shared": {}, "tasks": {}}, objective_state={},
                           nonfinite_skipped=jnp.zeros((), jnp.int32))
  sh = pl.state(state)
  assert all(s.spec == P() for s in jax.tree.leaves(sh))


# ----------------------------------------------------------------------------
# Runs on 8 fake devices against the same runs on one.
# ----------------------------------------------------------------------------

_SINUSOIDS = {  # 8 regression tasks, distinct inputs; 4 tasks sampled per step
    "data.builder_config": "t8_n50_m50_s0", "model.arch": "multi_head",
    "model.hidden": [16, 16], "sampling.tasks_per_step": 4, "sampling.examples_per_task": 8,
    "total_steps": 6, "steps_per_call": 3, "log_steps": 3, "eval_steps": 6,
    "checkpoint_steps": 6, "eval_batch_size": 32}
_MESHES = {"data": (8, 1), "task": (1, 8), "both": (4, 2)}


def _run_worker(tmp_path, name, cases, devices):
  """Runs ``cases`` (tests/mesh_worker.py) on ``devices`` CPU devices: in this
  process when that is 1 (its own device count; no process start and imports to
  pay), else in a process of its own with that many fake devices."""
  out = tmp_path / name
  if devices == 1:
    assert jax.device_count() == 1
    mesh_worker.main(str(out), json.loads(json.dumps(cases)))
    return out
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, _WORKER, str(out), json.dumps(cases)],
                        env=env, cwd=_ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return out


def _case(name, method, mesh, check_shardings=False, **extra):
  return {"name": name, "kind": "train", "config": "sinusoids:quick",
          "check_shardings": check_shardings,
          "overrides": {**_SINUSOIDS, "objective.method": method,
                        "mesh.data": mesh[0], "mesh.task": mesh[1], **extra}}


def _load(out, name):
  with open(out / f"{name}.json") as f:
    result = json.load(f)
  return result, dict(np.load(out / f"{name}.npz"))


def _assert_same_run(ref_out, ref_name, out, name):
  ref, ref_params = _load(ref_out, ref_name)
  got, params = _load(out, name)
  assert got["devices"] == 8 and ref["devices"] == 1
  assert sorted(params) == sorted(ref_params)
  for k in ref_params:
    np.testing.assert_allclose(params[k], ref_params[k], rtol=2e-4, atol=2e-5, err_msg=k)
  assert [sorted(r) for r in got["metrics"]] == [sorted(r) for r in ref["metrics"]]
  for r_got, r_ref in zip(got["metrics"], ref["metrics"]):
    for k, v in r_ref.items():
      if isinstance(v, dict):  # N seeds' per_seed lists
        for kk, vv in v.items():  # None: a task no step of the call sampled
          np.testing.assert_allclose(np.asarray(r_got[k][kk], float), np.asarray(vv, float),
                                     rtol=2e-4, atol=2e-5, err_msg=kk)
      else:
        np.testing.assert_allclose(r_got[k], v, rtol=2e-4, atol=2e-5, err_msg=k)
  assert got["compilations"] == 1


def _assert_compiled_shardings(result, mesh):
  sh = result["shardings"]
  assert sh["mesh"] == {"data": mesh[0], "task": mesh[1], "seed": 1}
  assert sh["in_state"] == sh["want_state"] == sh["out_state"]
  assert sh["in_data"] == sh["want_data"]
  task_split = "P('task',)" if mesh[1] > 1 else "P()"
  for path, spec in sh["in_state"].items():
    if path.startswith(("params/tasks/", "opt_state/tasks/")):
      assert spec == task_split, (path, spec)
    else:
      assert spec == "P()", (path, spec)
  assert sh["in_data"]["x"] == task_split  # one input source per task


def test_a_run_on_a_data_by_task_mesh_equals_the_one_device_run(tmp_path):
  ref = _run_worker(tmp_path, "one", [_case("fixed", "fixed", (1, 1))], devices=1)
  out = _run_worker(tmp_path, "eight", [_case("fixed", "fixed", _MESHES["both"], True)],
                    devices=8)
  _assert_same_run(ref, "fixed", out, "fixed")
  _assert_compiled_shardings(_load(out, "fixed")[0], _MESHES["both"])


# Which method runs on which mesh in the slow test: equal weighting on all
# three, a gradient combination (PCGrad) on data x task and a method with its
# own state updated after the optimizer step (FAMO) on task only.
_METHOD_MESHES = {"fixed": ("data", "task", "both"), "pcgrad": ("both",),
                  "famo": ("task",)}


@pytest.mark.slow
def test_sharded_runs_equal_one_device_for_every_mesh_and_method_kind(tmp_path):
  """Equal weighting, a gradient combination (PCGrad) and a method with state
  of its own updated after the optimizer step (FAMO), on data-only, task-only
  and data x task meshes (``_METHOD_MESHES``); plus a shared-inputs run through
  the one-pass path (multi_digits, MGDA) on data x task."""
  methods = tuple(_METHOD_MESHES)
  digits = {"name": "digits_mgda", "kind": "train", "config": "multi_digits:quick",
            "overrides": {"objective.method": "mgda", "sampling.shared_inputs": True,
                          "sampling.examples_per_task": 16, "total_steps": 4,
                          "steps_per_call": 2, "log_steps": 2, "eval_steps": 4,
                          "checkpoint_steps": 4, "mesh.data": 1, "mesh.task": 1}}
  seeds = _case("seeds", "fixed", (1, 1), **{"num_seeds": 4})
  ref = _run_worker(tmp_path, "one", [_case(m, m, (1, 1)) for m in methods] +
                    [digits, seeds], devices=1)
  digits8 = json.loads(json.dumps(digits))
  digits8["overrides"].update({"mesh.data": 4, "mesh.task": 2})
  # 4 seeds split over a seed axis of 4 (each group of 2 devices runs one seed).
  seeds8 = _case("seeds", "fixed", (2, 1), True, **{"num_seeds": 4, "mesh.seed": 4})
  cases = [_case(f"{m}_{k}", m, _MESHES[k], check_shardings=(m == "fixed"))
           for m, ks in _METHOD_MESHES.items() for k in ks]
  out = _run_worker(tmp_path, "eight", cases + [digits8, seeds8], devices=8)
  _assert_same_run(ref, "seeds", out, "seeds")
  sh = _load(out, "seeds")[0]["shardings"]
  assert sh["mesh"] == {"data": 2, "task": 1, "seed": 4}
  assert sh["in_state"] == sh["want_state"] == sh["out_state"]
  assert all(spec.startswith("P('seed',") for spec in sh["in_state"].values()), sh["in_state"]
  for m, ks in _METHOD_MESHES.items():
    for k in ks:
      _assert_same_run(ref, m, out, f"{m}_{k}")
      if m == "fixed":
        _assert_compiled_shardings(_load(out, f"{m}_{k}")[0], _MESHES[k])
  _assert_same_run(ref, "digits_mgda", out, "digits_mgda")


@pytest.mark.slow
def test_a_run_resumes_on_another_mesh(tmp_path):
  """6 steps on data-only (8, 1), then the same workdir resumed to 12 steps on
  data x task (4, 2): equal to 12 uninterrupted steps on one device (the
  checkpoint is restored into the new mesh's shardings)."""
  base = {**_SINUSOIDS, "total_steps": 12, "checkpoint_steps": 6, "eval_steps": 6}
  ref = _run_worker(tmp_path, "one", [{
      "name": "straight", "kind": "train", "config": "sinusoids:quick",
      "overrides": {**base, "mesh.data": 1, "mesh.task": 1}}], devices=1)
  first = {"name": "first", "workdir": "moved", "kind": "train", "config": "sinusoids:quick",
           "overrides": {**base, "total_steps": 6, "mesh.data": 8, "mesh.task": 1}}
  second = {"name": "second", "workdir": "moved", "kind": "train",
            "config": "sinusoids:quick",
            "overrides": {**base, "mesh.data": 4, "mesh.task": 2}}
  out = _run_worker(tmp_path, "eight", [first, second], devices=8)
  _assert_same_run(ref, "straight", out, "second")
  with open(out / "work" / "moved" / "summary.json") as f:
    summary = json.load(f)
  assert summary["resumed_from_step"] == 6 and summary["mesh"] == {"data": 4, "task": 2, "seed": 1}


@pytest.mark.slow
def test_cross_validation_and_transfer_run_on_the_mesh(tmp_path):
  """Cross-validation's vmapped folds x learning rates, and a fine-tuning
  curve from a pretrained run (transfer_sinusoids), on 8 devices equal the
  one-device results."""
  cv = {"name": "cv", "kind": "cv", "config": "sinusoids:quick",
        "overrides": {**_SINUSOIDS, "cv.folds": 2, "cv.lr": [1e-3, 1e-2], "cv.steps": [3, 6],
                      "objective.method": "famo"}}
  tr = {"name": "transfer", "kind": "transfer", "config": "transfer_sinusoids:quick",
        "overrides": {"data.builder_config": "t8_n50_m50_s0", "total_steps": 8,
                      "steps_per_call": 4, "log_steps": 4, "eval_steps": 8,
                      "checkpoint_steps": 8, "sampling.examples_per_task": 8,
                      "transfer.shots": [8], "transfer.target_tasks": 2,
                      "transfer.batch_mult": 1, "transfer.record_steps": 4,
                      "sampling.tasks_per_step": 4}}

  def with_mesh(case, data, task):
    case = json.loads(json.dumps(case))
    case["overrides"].update({"mesh.data": data, "mesh.task": task})
    return case
  ref = _run_worker(tmp_path, "one", [with_mesh(cv, 1, 1), with_mesh(tr, 1, 1)], devices=1)
  out = _run_worker(tmp_path, "eight", [with_mesh(cv, 4, 2), with_mesh(tr, 8, 1)], devices=8)
  for name, key in (("cv", "scores"), ("transfer", "curve")):
    with open(ref / f"{name}.json") as f:
      want = json.load(f)[key]
    with open(out / f"{name}.json") as f:
      got = json.load(f)[key]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, err_msg=name)


@pytest.mark.slow
def test_invalid_meshes_on_eight_devices_are_named_before_compiling(tmp_path):
  bad = {
      "product": ({"mesh.data": 3, "mesh.task": 2}, r"data=3 x task=2 x seed=1 = 6 devices, but there are 8"),
      "task_count": ({"data.builder_config": "t6_n50_m50_s0", "mesh.data": 2, "mesh.task": 4},
                     r"dimension 0 \(6\) is split along mesh axis 'task' of size 4"),
      "batch": ({"sampling.examples_per_task": 6, "mesh.data": 8, "mesh.task": 1},
                r"examples_per_task=6 is split along mesh axis 'data' of size 8"),
      "axis": ({"mesh.rules": "^tasks/:model;.*:"}, r"unknown mesh axis 'model'"),
  }
  cases = [{"name": k, "kind": "error", "config": "sinusoids:quick",
            "overrides": {**_SINUSOIDS, **o}} for k, (o, _) in bad.items()]
  out = _run_worker(tmp_path, "eight", cases, devices=8)
  import re  # pylint: disable=g-import-not-at-top
  for k, (_, message) in bad.items():
    with open(out / f"{k}.json") as f:
      error = json.load(f)["error"]
    assert error is not None and re.search(message, error), (k, error)


# ----------------------------------------------------------------------------
# Two processes on localhost (jax.distributed, gloo), 4 devices each.
# ----------------------------------------------------------------------------


def _free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


_CLI = ["--config=experiments/configs/sinusoids.py:quick", "--config.model.arch=multi_head",
        "--config.model.hidden=(16,16)", "--config.sampling.examples_per_task=8",
        "--config.total_steps=20", "--config.steps_per_call=5", "--config.log_steps=5",
        "--config.eval_steps=10", "--config.checkpoint_steps=10",
        "--config.eval_batch_size=64", "--config.mesh.data=4", "--config.mesh.task=2",
        "--config.data.pipeline=device"]  # every process holds the whole split


def _env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


@pytest.mark.slow
def test_two_processes_on_a_global_mesh_of_eight_equal_one_process(tmp_path):
  from mtljax import checkpoint  # pylint: disable=g-import-not-at-top
  from mtljax import params as params_lib  # pylint: disable=g-import-not-at-top
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  base = [sys.executable, "-m", "experiments.main", *_CLI]
  proc = subprocess.run(base + [f"--workdir={one}"], cwd=_ROOT, env=_env(8),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  port = _free_port()
  procs = [subprocess.Popen(
      base + [f"--workdir={two}", f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
              f"--process_id={i}"], cwd=_ROOT, env=_env(4), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "step 20/20" in outs[0][1] and "step 20/20" not in outs[1][1]  # process 0 logs
  assert "summary:" in outs[0][0] and "summary:" not in outs[1][0]
  rows_one, rows_two = helpers.metrics_rows(one), helpers.metrics_rows(two)
  assert [r["step"] for r in rows_two] == [5, 10, 15, 20]  # written once, by process 0
  for a, b in zip(rows_two, rows_one):
    assert sorted(a) == sorted(b)
    for k in b:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=2e-5, err_msg=k)
  pa, step_a = checkpoint.read_params(one)
  pb, step_b = checkpoint.read_params(two)
  assert step_a == step_b == 20
  flat_a = dict(params_lib.flatten_with_names(pa))
  for name, leaf in params_lib.flatten_with_names(pb):
    np.testing.assert_allclose(np.asarray(leaf), np.asarray(flat_a[name]), rtol=2e-4,
                               atol=2e-5, err_msg=name)
