"""k-fold cross-validation: folds, the vmapped grid against plain runs, and
the test split never read during selection."""

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest

from experiments.configs import common
from mtljax import build
from mtljax import cv
from mtljax import steps
from mtljax import train
from mtljax.data import task_data

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
  return task_data.build_task_data("toy", *helpers.shared_input_data(n_train=40))


class _Forbidden:
  """A split that fails on any access."""

  def __getitem__(self, key):
    raise AssertionError(f"the test split was read ({key!r})")

  def __getattr__(self, name):
    raise AssertionError(f"the test split was read (.{name})")


@functools.lru_cache(maxsize=None)
def _plain_runs(lr: float, total: int, frozen_depth: int = 0) -> dict:
  """The reference for a grid point: each fold of ``_data()`` (3 folds, cv seed
  0) trained on its own by ``build.build_run``'s step function -- ``lr`` in the
  optimizer itself, no vmap, no ``lr_scale`` -- for ``total`` steps (10 per
  call; the config's ``total_steps`` is ``total``). Returns ``{steps: [{task:
  metrics} of fold 0, 1, 2]}`` on each fold's validation part after every call.

  The run is built once (on fold 0) and its step applied to each fold's split:
  what it reads of the data at build time -- task list, shapes (every fold is
  padded to the same widths), uniform task probabilities -- is the same for
  every fold."""
  data = _data()
  folds = cv.make_folds(data, 3, seed=0)
  ref = _config()
  ref.optim.lr = lr
  ref.optim.frozen_depth = frozen_depth
  ref.total_steps = total
  assert ref.sampling.task_sampler == "uniform"
  run = build.build_run(ref, dataclasses.replace(data, train=folds[0][0], test=folds[0][1]))
  step, evaluate = jax.jit(run.train_fn), jax.jit(run.eval_fn)
  out = {done: [] for done in range(10, total + 1, 10)}
  for fold_train, fold_val in folds:
    state = run.state
    for done in out:
      state, _ = step(state, fold_train)
      assert int(state.step) == done
      out[done].append(steps.eval_metrics(data.taskset, evaluate(state.params, fold_val)))
  return out


def _mean(metrics: dict, name: str) -> float:
  """Mean over the tasks that report ``name`` (the selection score's definition)."""
  return float(np.mean([m[name] for m in metrics.values() if name in m]))


def _point(out, lr, steps_):
  (p,) = [p for p in out["points"] if p["lr"] == lr and p["steps"] == steps_]
  return p


def _unique_extreme(points, direction: str) -> dict:
  """The best point by its score, ``direction`` written out here (not read from
  the library); asserts it is strictly better than every other point, so the
  choice is unambiguous."""
  scores = np.array([p["score"] for p in points], np.float64)
  i = int(np.argmin(scores) if direction == "lower" else np.argmax(scores))
  others = np.delete(scores, i)
  assert np.all(others > scores[i]) if direction == "lower" else np.all(others < scores[i])
  return points[i]


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


@pytest.mark.slow
def test_vmapped_grid_point_equals_a_plain_run_on_that_fold():
  c = _config()
  c.cv.lr = (1e-3, 3e-2)
  c.cv.steps = (10, 20)
  data = _data()
  out = cv.cross_validate(c, dataclasses.replace(data, test=_Forbidden()))
  assert len(out["points"]) == 4 and out["direction"] == "lower"
  # lr 3e-2 (the vmapped column with lr_scale 30) at 20 steps and at the
  # intermediate count 10 read along the same run, vs plain runs on each fold
  # with lr 3e-2 in the optimizer itself; lr 1e-3 at the intermediate count vs
  # separate 10-step runs (total_steps=10).
  for lr, st, ref in ((3e-2, 10, _plain_runs(3e-2, 20)), (3e-2, 20, _plain_runs(3e-2, 20)),
                      (1e-3, 10, _plain_runs(1e-3, 10))):
    want = [_mean(m, "loss") for m in ref[st]]
    np.testing.assert_allclose(_point(out, lr, st)["fold_scores"], want, rtol=2e-4)
    np.testing.assert_allclose(_point(out, lr, st)["score"], np.mean(want), rtol=2e-4)
  # Every point's score is its fold mean; the best is the unique minimum.
  for p in out["points"]:
    np.testing.assert_allclose(p["score"], np.mean(p["fold_scores"]), rtol=1e-12)
  assert out["best"] == _unique_extreme(out["points"], "lower")


@pytest.mark.slow
def test_higher_is_better_metric_picks_the_maximum_lower_the_minimum():
  """accuracy (higher is better) -> the grid's maximum; mse (lower) -> its
  minimum. On this grid the maximum and the minimum are different points, so
  a wrong direction would choose another point. The scores themselves are the
  metric of a plain run: accuracy averaged over the three classification tasks,
  mse of the one regression task (original units)."""
  c = _config()
  # Two learning rates, as in the other 2-lr tests here and the fast tier's
  # test_choice_...: the folds x rates program is the same (the rates are data,
  # lr_scale), so it is compiled once; 1e-4 (barely moves) and 3e-2 (trains)
  # keep the grid's maximum and minimum far apart.
  c.cv.lr = (1e-4, 3e-2)
  c.cv.steps = (10, 20)
  data = dataclasses.replace(_data(), test=None)
  ref = _plain_runs(3e-2, 20)[20]
  for metric, direction, tasks in (("accuracy", "higher", ("c", "b", "c2")),
                                   ("mse", "lower", ("r",))):
    c.cv.metric = metric
    out = cv.cross_validate(c, data)
    assert out["metric"] == metric and out["direction"] == direction
    best = _unique_extreme(out["points"], direction)
    assert out["best"] == best
    scores = [p["score"] for p in out["points"]]
    assert max(scores) - min(scores) > 0.05  # the opposite direction picks another point
    want = [np.mean([fold[t][metric] for t in tasks]) for fold in ref]
    np.testing.assert_allclose(_point(out, 3e-2, 20)["fold_scores"], want, rtol=2e-4)


@pytest.mark.slow
def test_static_grid_compiles_per_value_and_names_bad_fields():
  c = _config()
  c.cv.grid = "optim.frozen_depth=0,1"
  out = cv.cross_validate(c, dataclasses.replace(_data(), test=None))
  depths = [p["overrides"]["optim.frozen_depth"] for p in out["points"]]
  assert depths == [0, 1]
  # Each grid value is a plain run with that setting in the config, fold by fold
  # (frozen_depth=1 trains a different model than 0, so an override that was
  # dropped would not match).
  for p, depth in zip(out["points"], depths):
    want = [_mean(m, "loss") for m in _plain_runs(1e-3, 20, depth)[20]]
    np.testing.assert_allclose(p["fold_scores"], want, rtol=2e-4)
  assert abs(out["points"][0]["score"] - out["points"][1]["score"]) > 1e-3
  assert cv.parse_grid("a.b=1,2;c=x") == [{"a.b": 1, "c": "x"}, {"a.b": 2, "c": "x"}]
  c.cv.grid = "optim.depth=1"
  with pytest.raises(ValueError, match="'optim.depth' is not a config field"):
    cv.cross_validate(c, dataclasses.replace(_data(), test=None))
  c.cv.grid, c.cv.folds = "", 50
  with pytest.raises(ValueError, match="every task has fewer than 50 training examples"):
    cv.cross_validate(c, dataclasses.replace(_data(), test=None))


@pytest.mark.slow
def test_select_and_train_trains_the_cv_argmin_after_choosing(tmp_path, monkeypatch):
  c = _config()
  c.data.name = "mmoe_synthetic"
  c.data.builder_config = "p0.9_n300_m100_s0"
  c.cv.lr = (1e-3, 1e-2)
  c.cv.steps = (10, 20)
  c.cv.grid = "optim.b1=0.9,0.5"
  c.plots = False  # the final run's figures are tests/test_report.py's
  order = []
  real_cv, real_train = cv.cross_validate, train.train_and_evaluate

  def spy_cv(config, data):  # records the order; the real function runs
    assert data.test is None
    order.append("cv")
    return real_cv(config, data)

  def spy_train(config, workdir):
    order.append("final")
    return real_train(config, workdir)
  monkeypatch.setattr(cv, "cross_validate", spy_cv)
  monkeypatch.setattr(cv.train, "train_and_evaluate", spy_train)
  out = cv.select_and_train(c, str(tmp_path))
  assert order == ["cv", "final"]
  # The chosen point, recomputed from cv.json: the unique minimum of the mean
  # validation loss over the 2 x 2 x 2 grid of (overrides, lr, steps).
  selection = json.loads((tmp_path / "cv.json").read_text())
  assert selection["metric"] == "loss" and len(selection["points"]) == 8
  keys = {(p["overrides"]["optim.b1"], p["lr"], p["steps"]) for p in selection["points"]}
  assert keys == {(b1, lr, st) for b1 in (0.9, 0.5) for lr in (1e-3, 1e-2) for st in (10, 20)}
  for p in selection["points"]:
    np.testing.assert_allclose(p["score"], np.mean(p["fold_scores"]), rtol=1e-12)
  best = _unique_extreme(selection["points"], "lower")
  top = json.loads((tmp_path / "summary.json").read_text())
  assert top["best"] == best == out["cv"]["best"]
  # The final run trained exactly that setting: its own summary and log.
  final = json.loads((tmp_path / "final" / "summary.json").read_text())
  assert final["config"]["optim"]["lr"] == best["lr"]
  assert final["config"]["optim"]["b1"] == best["overrides"]["optim.b1"]
  assert final["config"]["total_steps"] == final["step"] == best["steps"]
  assert final["config"]["cv"]["folds"] == 0
  log = [json.loads(line) for line in
         (tmp_path / "final" / "metrics.jsonl").read_text().splitlines()]
  assert max(r["step"] for r in log) == best["steps"]
  assert top["tasks"] == final["tasks"] == out["final"]["tasks"]
  assert set(final["tasks"]) == {"y1", "y2"}


@pytest.mark.slow
def test_tasks_too_small_to_split_train_in_every_fold_and_are_not_scored():
  data = task_data.build_task_data("fam", *helpers.family_data([2, 12, 9], [3, 3, 3]))
  folds = cv.make_folds(data, 3, seed=0)
  for fold_train, fold_val in folds:
    assert fold_train["n"][0] == 2 and fold_val["n"][0] == 0  # never held out
  assert sorted(int(f[1]["n"][1]) for f in folds) == [4, 4, 4]
  c = _config()
  c.data.name = "fam"
  out = cv.cross_validate(c, dataclasses.replace(data, test=None))
  assert np.all(np.isfinite(out["points"][0]["fold_scores"]))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mgda", "famo"])
def test_vmapped_folds_and_rates_with_a_gradient_or_stateful_objective(method):
  """Cross-validation vmaps the train step over folds and learning rates; with
  MGDA (a solver with a data-dependent branch) and FAMO (state updated after
  the optimizer step) a grid point still equals a plain run on each fold."""
  c = _config()
  c.objective.method = method
  c.cv.lr = (1e-3, 3e-2)
  c.cv.steps = (10,)
  data = _data()
  out = cv.cross_validate(c, dataclasses.replace(data, test=_Forbidden()))
  folds = cv.make_folds(data, 3, seed=0)
  ref = _config()
  ref.objective.method = method
  ref.optim.lr = 3e-2
  ref.total_steps = 10
  run = build.build_run(ref, dataclasses.replace(data, train=folds[0][0], test=folds[0][1]))
  step, evaluate = jax.jit(run.train_fn), jax.jit(run.eval_fn)
  want = []
  for fold_train, fold_val in folds:
    state, _ = step(run.state, fold_train)
    want.append(_mean(steps.eval_metrics(data.taskset, evaluate(state.params, fold_val)),
                      "loss"))
  np.testing.assert_allclose(_point(out, 3e-2, 10)["fold_scores"], want, rtol=2e-4)


def test_fold_statistics_skip_missing_regression_labels():
  """Regression labels missing in the train split (``<label>_mask`` False): each
  fold's mean and std are those of its labelled training labels (float64
  numpy), and missing labels stay missing in both halves."""
  spec, arrays = helpers.shared_input_data(n_train=40)
  mask = np.ones(40, bool)
  mask[::3] = False
  arrays["train"]["y_mask"] = mask
  data = task_data.build_task_data("toy", spec, arrays)
  r = data.taskset.index("r")
  folds = cv.make_folds(data, 3, seed=1)
  raw = np.asarray(arrays["train"]["y"], np.float64)
  labelled = dict(zip(raw[mask].round(4), np.ones(int(mask.sum()))))
  for fold_train, fold_val in folds:
    n = fold_train["n"][0]
    y = fold_train["y"]["regression1"][0][:n]
    assert np.isfinite(fold_train["label_mean"][r]) and np.isfinite(fold_train["label_std"][r])
    back = y * fold_train["label_std"][r] + fold_train["label_mean"][r]
    seen = back[np.isfinite(back)]
    assert 0 < seen.size < n                       # some of the fold's labels are missing
    assert all(v in labelled for v in np.asarray(seen, np.float64).round(4))
    np.testing.assert_allclose([fold_train["label_mean"][r], fold_train["label_std"][r]],
                               [seen.mean(), seen.std()], rtol=1e-5)
    val = fold_val["y"]["regression1"][0][:fold_val["n"][0]]
    assert np.isnan(val).any() and np.isfinite(val).any()


def test_choice_is_the_argmax_of_a_higher_is_better_metric_and_argmin_of_a_lower():
  """The fast tier's check of the selection's direction: two learning rates
  (1e-4 barely moves from the initialisation in 10 steps, 3e-2 trains) give
  clearly different mean validation scores; with accuracy (higher is better,
  written out here, not read from the library) the chosen point is the
  scores' unique arg-max, with mse (lower) their unique arg-min, so choosing
  in the wrong direction picks the other point. (The scores themselves
  against plain runs: the slow tier's tests above.)"""
  c = _config()
  c.cv.lr = (1e-4, 3e-2)
  c.cv.steps = (10,)
  data = dataclasses.replace(_data(), test=None)
  for metric, direction in (("accuracy", "higher"), ("mse", "lower")):
    c.cv.metric = metric
    out = cv.cross_validate(c, data)
    assert out["metric"] == metric and out["direction"] == direction
    scores = [p["score"] for p in out["points"]]
    assert len(scores) == 2 and max(scores) - min(scores) > 0.05, scores
    assert out["best"] == _unique_extreme(out["points"], direction), (metric, scores)
