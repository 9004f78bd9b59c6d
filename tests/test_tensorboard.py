"""TensorBoard event files: read back with TensorBoard's own EventAccumulator,
every scalar at every step equals metrics.jsonl -- also after a run that was
interrupted past its last checkpoint and resumed (no step twice) -- and the
learning rate per parameter group equals its schedule's closed form."""

import json
import math
import os

import ml_collections
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

import helpers
from mtljax import build
from mtljax import tensorboard
from mtljax import train


def _events(workdir):
  """``({tag: [(step, value)]}, [config texts])`` as TensorBoard reads the dir."""
  acc = event_accumulator.EventAccumulator(
      str(workdir), size_guidance={event_accumulator.SCALARS: 0,
                                   event_accumulator.TENSORS: 0})
  acc.Reload()
  scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
             for tag in acc.Tags()["scalars"]}
  texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("config/text_summary")]
  return scalars, texts


def _expected(rows, seeds=()):
  """``{tag: [(step, float32 value)]}`` from metrics.jsonl rows: each number
  (a null as NaN) under its key's name, each seed's value under ``/seed_S``."""
  want = {}
  for r in rows:
    for key, value in r.items():
      if key == "per_seed":
        for k, values in value.items():
          for seed, v in zip(seeds, values):
            if v is not None:  # a task that seed did not sample
              want.setdefault(f"{tensorboard.scalar_name(k)}/seed_{seed}", []).append(
                  (r["step"], np.float32(v)))
      elif key not in ("step", "nonfinite"):  # nonfinite: the names of the nulls
        want.setdefault(tensorboard.scalar_name(key), []).append(
            (r["step"], np.float32(np.nan if value is None else value)))
  return want


def test_scalar_names_follow_the_documented_scheme():
  row = {"step": 30, "train/loss": 1.5, "train/a/loss": 0.5, "eval/a/accuracy": 0.75,
         "train_eval/a/accuracy": 0.8, "grad/cos/a/b": -0.25, "grad/a/norm": 3.0,
         "grad/a/weight": 0.4, "objective/b/lambda": 1.25, "grad/solver_failures": 0.0,
         "optim/lr/rule0": 5e-4, "train/loss/se": 0.1, "grad/cos/a/b/se": 0.05,
         "train/b/loss": None, "nonfinite": ["train/b/loss (nan)"],
         "per_seed": {"train/loss": [1.4, 1.6], "grad/a/weight": [None, 0.4]}}
  got = tensorboard.row_scalars(row, seeds=(7, 8))
  want = {"train/loss": 1.5, "train/a/loss": 0.5, "eval/a/accuracy": 0.75,
          "train_eval/a/accuracy": 0.8, "grad/cosine/a/b": -0.25, "grad/norm/a": 3.0,
          "objective/weights/a": 0.4, "objective/weights/b": 1.25,
          "grad/solver_failures": 0.0, "optim/lr/rule0": 5e-4, "train/loss/se": 0.1,
          "grad/cosine/a/b/se": 0.05, "train/b/loss": math.nan,
          "train/loss/seed_7": 1.4, "train/loss/seed_8": 1.6, "objective/weights/a/seed_8": 0.4}
  assert got.keys() == want.keys()
  for k, v in want.items():
    assert got[k] == v or (math.isnan(v) and math.isnan(got[k])), k


class _Stop(Exception):
  pass


def _config():
  # PCGrad logs gradient cosines and weights; two parameter groups with a
  # warm-up + cosine schedule give two learning-rate curves with known values.
  return helpers.small_sinusoids_config(**{
      "objective.method": "pcgrad", "optim.lr": 1e-2, "optim.schedule": "warmup_cosine",
      "optim.warmup_steps": 10, "optim.rules": "^tasks/:lr_mult=0.5;.*:",
      "checkpoint_steps": 20, "plots": False})  # figures: tests/test_report.py


@pytest.mark.slow
def test_events_equal_metrics_jsonl_after_an_interrupted_run_resumes(tmp_path):
  workdir = str(tmp_path)

  def stop(step, _):
    if step == 35:  # rows 10, 20, 30 written; the last checkpoint is step 20
      raise _Stop()
  with pytest.raises(_Stop):
    train.train_and_evaluate(_config(), workdir, callbacks=[stop])
  first, _ = _events(workdir)
  assert [s for s, _ in first["train/loss"]] == [10, 20, 30]
  summary = train.train_and_evaluate(_config(), workdir)
  assert summary["resumed_from_step"] == 20
  assert len(tensorboard.event_files(workdir)) == 2  # one file per run, both read

  scalars, texts = _events(workdir)
  rows = helpers.metrics_rows(workdir)
  assert [r["step"] for r in rows] == [10, 20, 30, 40]
  want = _expected(rows)
  assert set(scalars) == set(want)
  for tag, points in want.items():  # every step once (step 30 of the first run purged)
    np.testing.assert_array_equal(np.array(scalars[tag], np.float64),
                                  np.array(points, np.float64), err_msg=tag)
  for prefix in ("grad/cosine/", "objective/weights/", "grad/norm/", "eval/", "train/sine_"):
    assert any(t.startswith(prefix) for t in scalars), prefix

  # The learning rates: warm-up to lr over 10 updates, cosine to 0 at 40 (the
  # update that ends at step s is number s - 1), halved on the per-task rule.
  lr, warm, total = 1e-2, 10, 40
  for s, value in scalars["optim/lr/rule1"]:
    c = s - 1
    closed = lr * c / warm if c < warm else lr * 0.5 * (1 + math.cos(math.pi * (c - warm) /
                                                                     (total - warm)))
    np.testing.assert_allclose(value, closed, rtol=1e-5, err_msg=str(s))
    np.testing.assert_allclose(dict(scalars["optim/lr/rule0"])[s], 0.5 * closed, rtol=1e-5)

  # The config, once, as text: the workdir's config.json.
  assert len(texts) == 1
  body = texts[0].strip().removeprefix("```").removesuffix("```")
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.loads(body) == json.load(f)


def test_no_event_files_when_turned_off(tmp_path):
  config = helpers.small_sinusoids_config(tensorboard=False, plots=False, total_steps=10,
                                          log_steps=10, eval_steps=10, checkpoint_steps=10)
  train.train_and_evaluate(config, str(tmp_path))
  assert tensorboard.event_files(str(tmp_path)) == []
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".png")]
  assert os.path.exists(tmp_path / "metrics.jsonl")


def test_a_non_boolean_switch_is_a_config_error():
  config = ml_collections.ConfigDict({**helpers.small_sinusoids_config().to_dict(),
                                      "tensorboard": "no"})
  with pytest.raises(ValueError, match=r"config.tensorboard must be True or False, got 'no'"):
    build.validate_config(config)


@pytest.mark.slow
def test_seeds_are_written_as_mean_se_and_one_curve_per_seed(tmp_path):
  config = helpers.small_sinusoids_config(num_seeds=2, seed=3, total_steps=20, plots=False)
  train.train_and_evaluate(config, str(tmp_path))
  scalars, _ = _events(tmp_path)
  want = _expected(helpers.metrics_rows(tmp_path), seeds=(3, 4))
  assert {"train/loss/seed_3", "train/loss/seed_4", "train/loss/se"} <= set(want)
  assert set(scalars) == set(want)
  # Eval tags have their seeds too, whose mean is the eval tag's value.
  evals = [k for k in scalars if k.startswith("eval/") and k.count("/") == 2]
  assert evals
  for k in evals:
    np.testing.assert_allclose(
        scalars[k], np.mean([scalars[f"{k}/seed_3"], scalars[f"{k}/seed_4"]], axis=0),
        rtol=1e-5, err_msg=k)
  for tag, points in want.items():
    np.testing.assert_array_equal(np.array(scalars[tag], np.float64),
                                  np.array(points, np.float64), err_msg=tag)


def test_a_config_refused_while_building_leaves_no_config_behind(tmp_path):
  # The first command is refused while the data are built; the corrected one
  # in the same workdir must run (it used to meet the refused config.json:
  # "was started with another config: sampling.tasks_per_step: 9 -> 4").
  small = dict(tensorboard=False, plots=False, total_steps=10, log_steps=10, eval_steps=10,
               checkpoint_steps=10)
  bad = helpers.small_sinusoids_config(**small, **{"sampling.tasks_per_step": 9})
  with pytest.raises(ValueError, match=r"config.sampling.tasks_per_step=9 must be in \[1, "):
    train.train_and_evaluate(bad, str(tmp_path))
  assert not os.path.exists(tmp_path / "config.json")
  good = helpers.small_sinusoids_config(**small)
  summary = train.train_and_evaluate(good, str(tmp_path))
  assert summary["step"] == 10 and summary["resumed_from_step"] is None
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["sampling"]["tasks_per_step"] == good.sampling.tasks_per_step == 4


def _sgd_rates(config, tx, params, steps):
  """``[{leaf path: lr}]`` per update: what SGD (no momentum) applied to a
  leaf, ``-update / gradient`` with gradient 1 (frozen leaves: 0)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mtljax import optim  # pylint: disable=g-import-not-at-top
  from mtljax import params as params_lib  # pylint: disable=g-import-not-at-top
  tx = tx.transform("shared") if isinstance(tx, optim.RuledOptimizer) else tx
  state, grads, out = tx.init(params), jax.tree.map(jnp.ones_like, params), []
  update = jax.jit(tx.update)
  for _ in range(steps):
    updates, state = update(grads, state, params)
    out.append({n: -float(np.asarray(u, np.float64).ravel()[0])
                for n, u in params_lib.flatten_with_names(updates)})
  return out


@pytest.mark.parametrize("schedule,rules", [
    ("warmup_cosine", ""), ("slanted_triangular", ""),
    ("warmup_cosine", "enc:lr_mult=0.5,unfreeze_at=7;frozen_part:frozen;.*:schedule=constant")])
def test_the_logged_learning_rate_is_the_one_the_optimizer_applied(schedule, rules):
  config = helpers.small_sinusoids_config(**{
      "optim.name": "sgd", "optim.momentum": 0.0, "optim.lr": 0.1, "optim.schedule": schedule,
      "optim.warmup_steps": 6, "optim.rules": rules, "total_steps": 30})
  tx, lr_schedules = build.optimizer_from_config(config, groups=(), param_names=())
  params = {"enc": {"w": np.zeros(2, np.float32)}, "frozen_part": {"w": np.zeros(2, np.float32)},
            "head": {"w": np.zeros(3, np.float32)}}
  applied = _sgd_rates(config, tx, params, 30)
  lr_at = train.learning_rates(config, lr_schedules)
  for step in range(1, 31):  # the row at `step` follows update number step - 1
    logged, got = lr_at(step), applied[step - 1]
    if not rules:
      assert set(logged) == {"optim/lr"}
      for leaf in got.values():
        np.testing.assert_allclose(logged["optim/lr"], leaf, rtol=1e-5, err_msg=str(step))
      continue
    assert set(logged) == {"optim/lr/rule0", "optim/lr/rule1", "optim/lr/rule2"}
    for key, leaf in (("rule0", "enc/w"), ("rule1", "frozen_part/w"), ("rule2", "head/w")):
      np.testing.assert_allclose(logged[f"optim/lr/{key}"], got[leaf], rtol=1e-5,
                                 atol=1e-12, err_msg=f"{step} {key}")
  if rules:  # the rules really differ: halved and delayed, frozen, constant
    assert applied[6]["enc/w"] == 0.0 and applied[8]["enc/w"] > 0.0  # warm-up from 0 at 7
    assert all(a["frozen_part/w"] == 0.0 for a in applied)
    assert all(a["head/w"] == pytest.approx(0.1) for a in applied)
