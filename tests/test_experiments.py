"""End to end: the experiment configs, resuming, bad input, the command line."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.configs import mmoe_synthetic
from experiments.configs import multi_digits
from experiments.configs import sinusoids
from experiments.configs import transfer_digits
from experiments.configs import transfer_sinusoids
from mtljax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_multi_digits_beats_chance_by_a_wide_margin(tmp_path):
  summary = train.train_and_evaluate(multi_digits.get_config("quick"), str(tmp_path))
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk["tasks"] == summary["tasks"]
  assert set(summary["tasks"]) == {"left", "right"}
  for task in ("left", "right"):
    assert summary["tasks"][task]["accuracy"] > 0.6  # chance is 0.1
  assert summary["train_step_compilations"] == 1
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [100, 200, 300, 400]
  assert "eval/left/accuracy" in lines[1] and "train/right/loss" in lines[0]
  assert (tmp_path / "checkpoints" / "400").is_dir()


def _small_digits_config():
  c = multi_digits.get_config("quick")
  c.data.builder_config = "n600_m200_s0"
  c.total_steps = 200
  c.log_steps = c.eval_steps = c.checkpoint_steps = 100
  return c


class _Preempted(Exception):
  pass


def _final_params(workdir):
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  state = mngr.restore(mngr.latest_step())
  return mngr.latest_step(), state["params"]


@pytest.mark.slow
def test_interrupted_run_resumes_from_its_checkpoint_and_matches(tmp_path):
  straight, interrupted = str(tmp_path / "a"), str(tmp_path / "b")
  train.train_and_evaluate(_small_digits_config(), straight)

  def preempt(step, _):
    if step == 150:  # after the checkpoint at step 100
      raise _Preempted()
  with pytest.raises(_Preempted):
    train.train_and_evaluate(_small_digits_config(), interrupted, callbacks=[preempt])
  assert os.listdir(os.path.join(interrupted, "checkpoints")) == ["100"]

  summary = train.train_and_evaluate(_small_digits_config(), interrupted)
  assert summary["resumed_from_step"] == 100 and summary["step"] == 200
  assert summary["train_step_compilations"] == 1  # restored state placed like a fresh one
  steps = [json.loads(l)["step"] for l in open(os.path.join(interrupted, "metrics.jsonl"))]
  assert steps == [100, 200]  # the first run logged 100, died at 150; the rerun 200
  step_a, params_a = _final_params(straight)
  step_b, params_b = _final_params(interrupted)
  assert step_a == step_b == 200
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)  # same random streams: same result
  # Running again at the end resumes, trains nothing, and reports the same metrics.
  again = train.train_and_evaluate(_small_digits_config(), interrupted)
  assert again["resumed_from_step"] == 200 and again["tasks"] == summary["tasks"]


@pytest.mark.slow
@pytest.mark.parametrize("module", [mmoe_synthetic, sinusoids])
def test_quick_regression_configs_beat_predicting_the_mean(module, tmp_path):
  summary = train.train_and_evaluate(module.get_config("quick"), str(tmp_path))
  from mtljax.data import loading
  c = module.get_config("quick")
  data = loading.load(c.data.name, builder_config=c.data.builder_config)
  for t, name in enumerate(data.taskset.names):
    # Predicting the train mean gives about the label variance std^2.
    assert summary["tasks"][name]["mse"] < 0.5 * data.label_std[t] ** 2, name


@pytest.mark.parametrize("field, value, match", [
    ("model.arch", "mixture", "config.model.arch='mixture'"),
    ("model.encoder", "vit", "config.model.encoder='vit'"),
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
    ("model.cond_layers", (3,), r"layer\(s\) \[3\] do not exist"),
    ("sampling.tasks_per_step", 3, r"tasks_per_step=3 must be in \[1, 2\]"),
])
def test_bad_config_raises_naming_the_field_before_training(field, value, match, tmp_path):
  c = _small_digits_config()
  c.model.arch = "concat" if field == "model.cond_layers" else c.model.arch
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


def test_command_line_override_typo_fails(tmp_path):
  r = _main("--config.model.archh=concat", workdir=tmp_path)
  assert r.returncode != 0
  assert "archh" in r.stderr


def test_command_line_bad_value_names_the_field(tmp_path):
  r = _main("--config.model.arch=mixture", workdir=tmp_path)
  assert r.returncode != 0
  assert "config.model.arch='mixture'" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dwa", "uncertainty", "famo", "gradnorm", "mgda",
                                    "mgda_ub"])
def test_objective_methods_run_checkpoint_and_resume(method, tmp_path):
  c = _small_digits_config()
  c.model.encoder, c.model.hidden = "mlp", (32,)
  c.objective.method = method
  c.sampling.shared_inputs = method == "mgda_ub"  # left and right label the same images
  c.objective.dwa.window_steps = 20
  first = train.train_and_evaluate(c, str(tmp_path))
  assert all(m["accuracy"] > 0.2 for m in first["tasks"].values())  # chance 0.1
  last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
  key = "grad/cos/left/right" if method.startswith("mgda") else "objective/left/lambda"
  assert np.isfinite(last[key])
  if method == "dwa":  # two windows done: lambda moved away from 1
    assert last["objective/left/lambda"] != 1.0
  again = train.train_and_evaluate(c, str(tmp_path))  # restores objective state too
  assert again["resumed_from_step"] == 200 and again["tasks"] == first["tasks"]
