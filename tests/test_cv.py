"""k-fold cross-validation: folds, the vmapped grid against plain runs, and
the test split never read during selection."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from experiments.configs import common
from mtljax import build
from mtljax import cv
from mtljax import steps
from mtljax import train
from mtljax.data import loading

import helpers


def _config():
  c = common.base_config()
  c.data.name = "toy"
  c.model.hidden = (16,)
  c.sampling.examples_per_task = 8
  c.total_steps = 20
  c.steps_per_call = 10
  c.log_steps = c.eval_steps = c.checkpoint_steps = 20
  c.cv.folds = 3
  return c


def _data():
  return loading.build_task_data("toy", *helpers.shared_input_data(n_train=40))


class _Forbidden:
  """A split that fails on any access."""

  def __getitem__(self, key):
    raise AssertionError(f"the test split was read ({key!r})")

  def __getattr__(self, name):
    raise AssertionError(f"the test split was read (.{name})")


def test_folds_partition_the_train_split_and_renormalise_per_fold():
  data = _data()
  folds = cv.make_folds(data, 3, seed=1)
  r = data.taskset.index("r")
  raw = data.train["y"]["regression1"][0][:40] * data.label_std[r] + data.label_mean[r]
  seen = []
  for fold_train, fold_val in folds:
    assert fold_train["n"].tolist() == [fold_train["n"][0]] * 4
    assert fold_train["n"][0] + fold_val["n"][0] == 40
    assert fold_val["n"][0] in (13, 14)
    # Regression labels: standardised with the fold's own training statistics.
    y = fold_train["y"]["regression1"][0][:fold_train["n"][0]]
    np.testing.assert_allclose([y.mean(), y.std()], [0.0, 1.0], atol=1e-5)
    val = fold_val["y"]["regression1"][0][:fold_val["n"][0]]
    seen.append(val * fold_val["label_std"][r] + fold_val["label_mean"][r])
  np.testing.assert_allclose(np.sort(np.concatenate(seen)), np.sort(raw), rtol=1e-5)


def test_vmapped_grid_point_equals_a_plain_run_on_that_fold():
  c = _config()
  c.cv.lr = (1e-3, 3e-2)
  c.cv.steps = (10, 20)
  data = _data()
  out = cv.cross_validate(c, dataclasses.replace(data, test=_Forbidden()))
  assert len(out["points"]) == 4 and out["direction"] == "lower"
  point = next(p for p in out["points"] if p["lr"] == 3e-2 and p["steps"] == 20)
  # The reference: fold 1 alone, lr 3e-2 in the optimizer itself, 20 plain steps.
  fold_train, fold_val = cv.make_folds(data, 3, seed=0)[1]
  ref = _config()
  ref.optim.lr = 3e-2
  run = build.build_run(ref, dataclasses.replace(data, train=fold_train, test=fold_val))
  step = jax.jit(run.train_fn)
  state = run.state
  for _ in range(2):
    state, _ = step(state, fold_train)
  metrics = steps.eval_metrics(data.taskset, jax.jit(run.eval_fn)(state["params"], fold_val))
  want = np.mean([m["loss"] for m in metrics.values()])
  np.testing.assert_allclose(point["fold_scores"][1], want, rtol=2e-4)
  assert out["best"]["score"] == min(p["score"] for p in out["points"])


def test_static_grid_compiles_per_value_and_names_bad_fields():
  c = _config()
  c.cv.grid = "optim.frozen_depth=0,1"
  out = cv.cross_validate(c, dataclasses.replace(_data(), test=None))
  depths = [p["overrides"]["optim.frozen_depth"] for p in out["points"]]
  assert depths == [0, 1]
  assert out["points"][0]["score"] != out["points"][1]["score"]
  assert cv.parse_grid("a.b=1,2;c=x") == [{"a.b": 1, "c": "x"}, {"a.b": 2, "c": "x"}]
  c.cv.grid = "optim.depth=1"
  with pytest.raises(ValueError, match="'optim.depth' is not a config field"):
    cv.cross_validate(c, dataclasses.replace(_data(), test=None))
  c.cv.grid, c.cv.folds = "", 50
  with pytest.raises(ValueError, match="every task has fewer than 50 training examples"):
    cv.cross_validate(c, dataclasses.replace(_data(), test=None))


def test_select_and_train_reads_the_test_split_only_after_choosing(tmp_path, monkeypatch):
  c = _config()
  c.data.name = "mmoe_synthetic"
  c.data.builder_config = "p0.9_n300_m100_s0"
  c.cv.lr = (1e-3, 1e-2)
  order = []
  real_cv, real_train = cv.cross_validate, train.train_and_evaluate

  def spy_cv(config, data):
    assert data.test is None
    order.append("cv")
    return real_cv(config, data)

  def spy_train(config, workdir):
    order.append("final")
    assert config.optim.lr in (1e-3, 1e-2) and config.cv.folds == 0
    return real_train(config, workdir)
  monkeypatch.setattr(cv, "cross_validate", spy_cv)
  monkeypatch.setattr(cv.train, "train_and_evaluate", spy_train)
  out = cv.select_and_train(c, str(tmp_path))
  assert order == ["cv", "final"]
  assert (tmp_path / "cv.json").exists()
  top = json.loads((tmp_path / "summary.json").read_text())
  assert top["tasks"] == out["final"]["tasks"] and top["best"] == out["cv"]["best"]
  assert set(out["final"]["tasks"]) == {"y1", "y2"}


def test_tasks_too_small_to_split_train_in_every_fold_and_are_not_scored():
  data = loading.build_task_data("fam", *helpers.family_data([2, 12, 9], [3, 3, 3]))
  folds = cv.make_folds(data, 3, seed=0)
  for fold_train, fold_val in folds:
    assert fold_train["n"][0] == 2 and fold_val["n"][0] == 0  # never held out
  assert sorted(int(f[1]["n"][1]) for f in folds) == [4, 4, 4]
  c = _config()
  c.data.name = "fam"
  out = cv.cross_validate(c, dataclasses.replace(data, test=None))
  assert np.all(np.isfinite(out["points"][0]["fold_scores"]))
