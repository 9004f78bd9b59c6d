"""End to end: the experiment configs, resuming, bad input, the command line."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import helpers
from experiments.configs import mmoe_synthetic
from experiments.configs import multi_digits
from experiments.configs import sinusoids
from experiments.configs import transfer_digits
from experiments.configs import transfer_sinusoids
from mtljax import build
from mtljax import checkpoint
from mtljax import objectives
from mtljax import optim
from mtljax import steps
from mtljax import train
from mtljax.data import loading
from mtljax.data import sampling
from mtljax.models import multitask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _eval_entries(row):
  return {k: v for k, v in row.items() if k.startswith("eval/")}


def _as_eval_entries(metrics):
  return {f"eval/{t}/{m}": v for t, ms in metrics.items() for m, v in ms.items()}


def _fresh_state(config):
  """A fresh train state of ``config``'s run: the structure checkpoints restore into."""
  return build.build_run(config, build.data_from_config(config)).state


def _restore(workdir, like, step=None):
  """The checkpoint of ``step`` (default: the latest) in ``workdir`` restored
  into the structure of ``like``."""
  manager = checkpoint.make_manager(str(workdir))
  if step is None:
    state = checkpoint.restore_latest(manager, like)
  else:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  manager.close()
  return state


def _assert_bitwise_equal(a, b):
  """Same tree structure and, leaf by leaf, the same dtype, shape and bits."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  flat_a, _ = jax.tree_util.tree_flatten_with_path(a)
  for (path, x), y in zip(flat_a, jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    where = jax.tree_util.keystr(path)
    assert (x.dtype, x.shape) == (y.dtype, y.shape), where
    assert np.array_equal(x, y), where


@pytest.mark.slow
def test_quick_multi_digits_beats_chance_by_a_wide_margin(tmp_path):
  summary = train.train_and_evaluate(multi_digits.get_config("quick"), str(tmp_path))
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk["tasks"] == summary["tasks"]
  assert set(summary["tasks"]) == {"left", "right"}
  # An end-to-end learning smoke test: the trained accuracy has no known value
  # to compare with (it depends on the platform's float rounding over 400
  # steps), so a wide margin over chance (0.1) is the check.
  for task in ("left", "right"):
    assert summary["tasks"][task]["accuracy"] > 0.6
  assert summary["train_step_compilations"] == 1
  lines = helpers.metrics_rows(tmp_path)
  assert [l["step"] for l in lines] == [100, 200, 300, 400]
  assert "eval/left/accuracy" in lines[1] and "train/right/loss" in lines[0]
  assert _eval_entries(lines[-1]) == _as_eval_entries(summary["tasks"])  # the same numbers
  assert (tmp_path / "checkpoints" / "400").is_dir()


def _small_digits_config():
  c = multi_digits.get_config("quick")
  c.data.builder_config = "n600_m200_s0"
  c.total_steps = 200
  c.log_steps = c.eval_steps = c.checkpoint_steps = 100
  c.plots = False  # a run's figures are tests/test_report.py's; about 1 s a run here
  return c


class _Preempted(Exception):
  pass


@pytest.mark.slow
def test_interrupted_run_resumes_from_its_checkpoint_and_matches(tmp_path):
  """In process (tests/test_faults.py kills the command line): a run stopped
  after the checkpoint at step 20 and rerun equals an uninterrupted run."""
  config = lambda: _objective_config("fixed")  # MLP, 60 steps, checkpoints at 20, 40, 60
  straight, interrupted = str(tmp_path / "a"), str(tmp_path / "b")
  train.train_and_evaluate(config(), straight)

  def preempt(step, _):
    if step == 30:  # after the checkpoint at step 20
      raise _Preempted()
  with pytest.raises(_Preempted):
    train.train_and_evaluate(config(), interrupted, callbacks=[preempt])
  assert os.listdir(os.path.join(interrupted, "checkpoints")) == ["20"]

  summary = train.train_and_evaluate(config(), interrupted)
  assert summary["resumed_from_step"] == 20 and summary["step"] == 60
  assert summary["train_step_compilations"] == 1  # restored state placed like a fresh one
  # The first run logged 10 and 20 and died at 30; the rerun logged 30..60. Same
  # random streams: every logged number and the whole final state are the same bits.
  assert [r["step"] for r in helpers.metrics_rows(interrupted)] == [10, 20, 30, 40, 50, 60]
  assert helpers.metrics_rows(interrupted) == helpers.metrics_rows(straight)
  fresh = _fresh_state(config())
  final_a, final_b = _restore(straight, fresh), _restore(interrupted, fresh)
  assert int(final_a.step) == 60
  _assert_bitwise_equal(final_b, final_a)  # params, Adam moments and counts, step
  # Running again at the end resumes, trains nothing, and reports the same metrics.
  again = train.train_and_evaluate(config(), interrupted)
  assert again["resumed_from_step"] == 60 and again["tasks"] == summary["tasks"]


def _objective_config(method):
  """A small MLP run with a checkpoint at step 20 of 60 (10 steps per call)."""
  c = _small_digits_config()
  c.model.encoder, c.model.hidden = "mlp", (32,)
  c.objective.method = method
  # DWA windows end at steps 7 and 14 (two done: lambda != 1 from step 15) and
  # the checkpoint at 20 falls mid-window (its running sums are part of it).
  c.objective.dwa.window_steps = 7
  # SDMGrad's w with the authors' inner step (lr 10) lands on a vertex of the
  # simplex from any warm start, so the control below (its state reset) would
  # end the same; small inner steps make the carried w matter.
  c.objective.sdmgrad.w_lr = 0.01
  c.total_steps, c.steps_per_call = 60, 10
  c.log_steps, c.checkpoint_steps, c.eval_steps = 10, 20, 30
  return c


def _own_state(state, method):
  """The objective's own state: its ``objective_state`` and per-task parameters
  (uncertainty weighting keeps ``log sigma^2`` as parameters)."""
  return {"objective_state": state.objective_state,
          "params": state.params["tasks"].get(method, {})}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["famo", "gradnorm", "dwa", "uncertainty", "modo",
                                    "sdmgrad", "auto_lambda", "moml", "forum"])
def test_resuming_restores_the_objective_state_and_matches_an_uninterrupted_run(method,
                                                                                tmp_path):
  c = _objective_config(method)
  straight, interrupted, reset = (str(tmp_path / d) for d in ("a", "b", "c"))
  summary_a = train.train_and_evaluate(c, straight)

  def preempt(step, _):
    if step == 30:  # after the checkpoint at 20, before step 30 is logged
      raise _Preempted()
  with pytest.raises(_Preempted):
    train.train_and_evaluate(c, interrupted, callbacks=[preempt])
  fresh = _fresh_state(c)
  at_20 = _restore(interrupted, fresh)
  assert int(at_20.step) == 20
  # Every leaf of the objective's own state has moved from its initial value by
  # step 20, and steps 21..60 read it: a resume that dropped or garbled it
  # could not give the uninterrupted run's bits (checked below by resetting it).
  own_at_20, own_fresh = _own_state(at_20, method), _own_state(fresh, method)
  assert jax.tree.leaves(own_at_20)
  for a, b in zip(jax.tree.leaves(own_at_20), jax.tree.leaves(own_fresh)):
    assert not np.array_equal(a, b)

  summary_b = train.train_and_evaluate(c, interrupted)
  assert summary_b["resumed_from_step"] == 20 and summary_b["step"] == 60
  assert summary_b["train_step_compilations"] == 1
  rows = helpers.metrics_rows(straight)
  assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
  assert helpers.metrics_rows(interrupted) == rows  # 10, 20 before the interruption; 30..60 after
  assert summary_b["tasks"] == summary_a["tasks"]
  final_a, final_b = _restore(straight, fresh), _restore(interrupted, fresh)
  assert int(final_a.step) == 60
  _assert_bitwise_equal(final_b, final_a)  # params, opt_state, objective_state, step

  # The control: the same checkpoint with the objective's own state reset to its
  # initial value resumes to a different result.
  tampered = at_20._replace(
      objective_state=fresh.objective_state,
      params={"shared": at_20.params["shared"],
              "tasks": {**at_20.params["tasks"],
                        **({method: fresh.params["tasks"][method]}
                           if method in fresh.params["tasks"] else {})}})
  manager = checkpoint.make_manager(reset)
  checkpoint.save(manager, 20, tampered)
  manager.close()
  train.train_and_evaluate(c, reset)
  final_c = _restore(reset, fresh)
  assert not np.array_equal(final_c.params["shared"]["trunk"]["layer_0"]["kernel"],
                            final_a.params["shared"]["trunk"]["layer_0"]["kernel"])


def _objective_state_after_updates(objective, method, num_tasks, rng):
  """The objective's state after 7 updates on K = 2 of T tasks with random
  losses, through its own update rule (no compiled train step: this is fast)."""
  state = objective.init_state()
  for _ in range(7):
    ids = jnp.asarray(rng.choice(num_tasks, 2, replace=False), jnp.int32)
    losses = jnp.asarray(rng.uniform(0.5, 2.0, 2), jnp.float32)
    if method == "gradnorm":  # its weights move inside the step, from the slots' norms
      norms = jnp.asarray(rng.uniform(0.5, 2.0, 2), jnp.float32)
      state, _ = objectives.gradnorm_update(state, norms, losses, ids,
                                            alpha=objective.hparams["alpha"],
                                            w_lr=objective.hparams["w_lr"])
    else:
      state = objective.after_update(state, losses, ids, 0.9 * losses)
  return state


@pytest.mark.parametrize("method", ["dwa", "famo", "gradnorm"])
def test_checkpoint_round_trips_a_trained_objective_state_bitwise(method, tmp_path):
  """The fast check of what the slow resume tests rely on: every leaf of a
  train state (parameters, Adam moments and counts, DWA's int32 counters and
  window sums, FAMO's logits and their Adam state, GradNorm's weights, first
  losses and bool 'seen' flags) comes back from disk with its dtype and bits."""
  data = helpers.toy_data()
  num_tasks = len(data.taskset)
  model = multitask.make_model("multi_head", data.taskset, data.input_shape, hidden=(8,))
  tx = optim.make_optimizer("adam", lr=1e-2)
  hparams = {"dwa": {"window_steps": 2}, "famo": {}, "gradnorm": {}}[method]
  objective = objectives.make_objective(method, num_tasks, **hparams)
  # A fresh state's structure (the restore target) without compiling the init:
  # zeros, and the objective's initial state.
  shapes = jax.eval_shape(lambda r: steps.init_train_state(model, tx, r, objective),
                          jax.random.key(0))
  fresh = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)._replace(
      objective_state=objective.init_state())
  rng = np.random.default_rng(0)

  def scramble(leaf):  # arbitrary bits of the leaf's dtype and shape
    if leaf.dtype == jnp.bool_:
      return jnp.asarray(rng.random(leaf.shape) < 0.5)
    if jnp.issubdtype(leaf.dtype, jnp.integer):
      return jnp.asarray(rng.integers(1, 1000, leaf.shape), leaf.dtype)
    return jnp.asarray(rng.normal(size=leaf.shape), leaf.dtype)
  trained = steps.TrainState(
      step=jnp.asarray(7, jnp.int32), nonfinite_skipped=jnp.asarray(3, jnp.int32),
      params=jax.tree.map(scramble, fresh.params),
      opt_state=jax.tree.map(scramble, fresh.opt_state),
      objective_state=_objective_state_after_updates(objective, method, num_tasks, rng))
  for a, b in zip(jax.tree.leaves(trained.objective_state),
                  jax.tree.leaves(fresh.objective_state)):
    assert not np.array_equal(a, b)  # every leaf moved: restoring ``fresh`` would fail
  manager = checkpoint.make_manager(str(tmp_path))
  checkpoint.save(manager, 7, trained)
  manager.close()
  _assert_bitwise_equal(_restore(tmp_path, fresh), trained)


@pytest.mark.slow
@pytest.mark.parametrize("module", [mmoe_synthetic, sinusoids])
def test_quick_regression_configs_beat_predicting_the_mean(module, tmp_path):
  c = module.get_config("quick")
  summary = train.train_and_evaluate(c, str(tmp_path))
  assert _eval_entries(helpers.metrics_rows(tmp_path)[-1]) == _as_eval_entries(summary["tasks"])
  data = loading.load(c.data.name, builder_config=c.data.builder_config)
  ts = data.taskset
  for t, name in enumerate(ts.names):
    # The test MSE of predicting the train mean, exactly: labels are stored
    # standardised by the train mean and std, so that prediction is 0 there.
    n = int(data.test["n"][t])
    y = np.asarray(data.test["y"][ts.tasks[t].group][ts.local_index[t], :n], np.float64)
    mean_predictor_mse = float(data.label_std[t]) ** 2 * np.mean(y ** 2)
    # An end-to-end learning smoke test: the trained MSE has no known value (it
    # depends on float rounding over hundreds of steps), so the check is a
    # margin over that baseline.
    assert summary["tasks"][name]["mse"] < 0.5 * mean_predictor_mse, name


@pytest.mark.parametrize("field, value, match", [
    ("model.arch", "mixture", "config.model.arch='mixture'"),
    ("model.encoder", "swin", "config.model: encoder='swin' is not one of"),
    ("model.num_experts", 4, r"config.model: unknown key\(s\) \['num_experts'\]"),
    ("model.mmoe.experts", 4, r"config.model.mmoe: unknown hyper-parameter\(s\) \['experts'\]"),
    ("sampling.task_sampler", "greedy", "config.sampling.task_sampler='greedy'"),
    ("optim.name", "lion", "config.optim.name='lion'"),
    ("objective.method", "magic", "config.objective.method='magic'"),
    ("objective.gram_path", "lazy", "config.objective.gram_path='lazy'"),
    ("objective.slot_backwards", "loop", "config.objective.slot_backwards='loop'"),
    ("objective.dwa_window_steps", 20, r"unknown key\(s\) \['dwa_window_steps'\]"),
    ("objective.cagrad.C", 0.3, r"unknown hyper-parameter\(s\) \['C'\]"),
    ("data.tasks", ("left", "middle"), r"unknown task\(s\) \['middle'\]"),
    ("data.name", "", "config.data.name is empty"),
    ("sampling.examples_per_task", 0, "examples_per_task must be a positive integer"),
    ("model.concat.cond_layers", (3,),
     r"config.model: concat.cond_layers=\(3,\): layer\(s\) \[3\] do not exist"),
    ("sampling.tasks_per_step", 3, r"tasks_per_step=3 must be in \[1, 2\]"),
])
def test_bad_config_raises_naming_the_field_before_training(field, value, match, tmp_path):
  c = _small_digits_config()
  c.model.arch = "concat" if field == "model.concat.cond_layers" else c.model.arch
  *parents, key = field.split(".")
  node = c
  for part in parents:
    node = node[part]
  node[key] = value
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(c, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()  # nothing was built or compiled


def test_shared_inputs_on_tasks_with_their_own_inputs_raises_before_training(tmp_path):
  c = sinusoids.get_config("quick")
  c.sampling.shared_inputs = True
  with pytest.raises(ValueError, match="shared_inputs=True needs every task to label"):
    train.train_and_evaluate(c, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_configs_reject_unknown_variants():
  for module in (multi_digits, mmoe_synthetic, sinusoids, transfer_digits,
                 transfer_sinusoids):
    with pytest.raises(ValueError, match="unknown variant 'fast'"):
      module.get_config("fast")


def _main(*args, workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "experiments.main",
       "--config=experiments/configs/multi_digits.py:quick", f"--workdir={workdir}", *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_command_line_override_typo_fails(tmp_path):
  r = _main("--config.model.archh=concat", workdir=tmp_path)
  assert r.returncode != 0
  assert "archh" in r.stderr


@pytest.mark.slow
def test_command_line_bad_value_names_the_field(tmp_path):
  r = _main("--config.model.arch=mixture", workdir=tmp_path)
  assert r.returncode != 0
  assert "config.model.arch='mixture'" in r.stderr


def _softmax(z):
  e = np.exp(z - np.max(z))
  return e / np.sum(e)


def _logged_lambda(method, state, config):
  """A loss weighting's lambda [T] in a step that starts from ``state``, by the
  methods' definitions (float64 numpy)."""
  st = {k: np.asarray(v, np.float64) for k, v in state.objective_state.items()
        if not isinstance(v, (dict, tuple))}
  if method == "dwa":  # T softmax((L_prev / L_prev2) / temperature)
    return len(st["prev"]) * _softmax(st["prev"] / st["prev2"] /
                                      config.objective.dwa.temperature)
  if method == "famo":  # softmax of the logits xi
    return _softmax(st["xi"])
  if method == "uncertainty":  # the coefficient 1 / (2 sigma^2) of each loss
    return 0.5 * np.exp(-np.asarray(state.params["tasks"]["uncertainty"]["log_var"],
                                    np.float64))
  assert method == "gradnorm"  # the weights w
  return st["w"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dwa", "uncertainty", "famo", "gradnorm", "mgda",
                                    "mgda_ub"])
def test_objective_methods_log_their_state_and_resume_to_the_same_metrics(method, tmp_path):
  c = _small_digits_config()
  c.model.encoder, c.model.hidden = "mlp", (32,)
  c.objective.method = method
  c.sampling.shared_inputs = method == "mgda_ub"  # left and right label the same images
  c.objective.dwa.window_steps = 20  # windows end at 20 and 40: lambda moves from 41
  # One step per call and a checkpoint of step 59: the train numbers logged at
  # step 60 are those of one step, taken from the state in that checkpoint.
  c.total_steps, c.log_steps, c.eval_steps, c.checkpoint_steps = 60, 30, 30, 59
  workdir = str(tmp_path)
  first = train.train_and_evaluate(c, workdir)
  assert first["step"] == 60 and first["train_step_compilations"] == 1
  assert json.loads((tmp_path / "summary.json").read_text())["tasks"] == first["tasks"]
  rows = helpers.metrics_rows(workdir)
  assert [r["step"] for r in rows] == [30, 60]
  last = rows[-1]
  assert _eval_entries(last) == _as_eval_entries(first["tasks"])  # exactly the summary's

  # The last step by definition: its batch re-derived from the documented random
  # streams, each task's loss from the model alone, at the state of step 59.
  data = build.data_from_config(c)
  run = build.build_run(c, data)
  before = _restore(workdir, run.state, step=59)
  assert int(before.step) == 59
  names = data.taskset.names
  probs = sampling.task_probabilities("uniform", data.num_train)
  ids, x, ys, _ = helpers.step_batch(data, probs, seed=c.seed, step=59, k=len(names),
                                     b=c.sampling.examples_per_task,
                                     shared_inputs=c.sampling.shared_inputs)
  model_params = {"shared": before.params["shared"],
                  "tasks": {k: v for k, v in before.params["tasks"].items() if k != method}}
  losses, grads = helpers.per_task_grads(run.model, model_params, x, ys, ids,
                                         c.sampling.shared_inputs)
  for slot, t in enumerate(ids):
    np.testing.assert_allclose(last[f"train/{names[t]}/loss"], losses[slot], rtol=1e-5)

  if method in ("mgda", "mgda_ub"):
    norm = np.array([last[f"grad/{t}/norm"] for t in names])
    beta = np.array([last[f"grad/{t}/weight"] for t in names])
    cos = last[f"grad/cos/{names[0]}/{names[1]}"]
    if method == "mgda":  # norms and cosine of the shared-parameter gradients
      flat = np.stack([np.concatenate([np.ravel(l) for l in jax.tree.leaves(g["shared"])])
                       for g in grads]).astype(np.float64)
      np.testing.assert_allclose(norm, np.linalg.norm(flat, axis=1), rtol=1e-4)
      np.testing.assert_allclose(cos, flat[0] @ flat[1] / np.prod(np.linalg.norm(flat, axis=1)),
                                 atol=1e-5)
    # beta is MGDA's min-norm point of the logged Gram matrix. Two tasks have a
    # closed form; a converged solve has a duality gap <= tol (1 + f), which
    # bounds f(beta) - min f for this convex f (on K / (trace K / 2), as solved).
    assert last["grad/solver_failures"] == 0.0
    k = np.array([[norm[0] ** 2, cos * norm[0] * norm[1]],
                  [cos * norm[0] * norm[1], norm[1] ** 2]])
    k /= np.trace(k) / 2
    a = np.clip((k[1, 1] - k[0, 1]) / (k[0, 0] + k[1, 1] - 2 * k[0, 1]), 0.0, 1.0)
    best = np.array([a, 1.0 - a])
    assert abs(beta.sum() - 1.0) < 1e-6
    assert beta @ k @ beta - best @ k @ best <= 1e-5 * (1 + beta @ k @ beta) + 1e-6
    assert abs(cos) < 0.5  # well conditioned (f's curvature 2 |g_1 - g_2|^2 is not small):
    np.testing.assert_allclose(beta, best, atol=1e-4)  # so beta itself is close too
  else:  # the mean lambda of a one-step call: lambda of the state it started from
    logged = np.array([last[f"objective/{t}/lambda"] for t in names])
    want = _logged_lambda(method, before, c)
    np.testing.assert_allclose(logged, want, rtol=1e-6)
    initial = (np.ones(len(names)) if method == "dwa"  # before two windows
               else _logged_lambda(method, run.state, c))
    assert not np.allclose(want, initial, rtol=1e-3, atol=0)  # the state has moved
    if method == "dwa":
      assert int(before.objective_state["windows"]) == 2  # DWA's formula, not its ones
    if method == "gradnorm":
      assert np.array_equal(logged, np.asarray(before.objective_state["w"]))  # exactly

  again = train.train_and_evaluate(c, workdir)  # restores objective state too
  assert again["resumed_from_step"] == 60 and again["step"] == 60
  assert again["tasks"] == first["tasks"]  # the restored parameters: the same numbers
  assert helpers.metrics_rows(workdir) == rows  # nothing trained, nothing logged
