"""Per-run plots and ``python -m experiments.report``: the figures hold the
run's own metrics (read back from their matplotlib objects), the PNGs a run
writes are those figures, and the report's table is exact on hand-made
workdirs."""

import json
import os

import matplotlib.image
import numpy as np
import pytest

import helpers
from experiments import report
from mtljax import plotting
from mtljax import train

# ----------------------------------------------------------------------------
# Per-run plots.
# ----------------------------------------------------------------------------

ROWS = [
    {"step": 10, "train/loss": 2.0, "train/a/loss": 1.5, "train/b/loss": 0.5,
     "grad/cos/a/b": 0.5},
    {"step": 20, "train/loss": 1.0, "train/a/loss": 0.75, "eval/a/accuracy": 0.5,
     "eval/b/accuracy": 0.25, "train_eval/a/accuracy": 0.625, "grad/cos/a/b": -0.25,
     "grad/cos/a/c": 0.125},
    {"step": 30, "train/loss": 0.5, "train/a/loss": 0.25, "train/b/loss": 0.25,
     "eval/a/accuracy": 0.75, "eval/b/accuracy": None, "train_eval/a/accuracy": 0.875},
]


def test_curves_hold_each_tasks_train_loss_and_test_and_train_metrics(tmp_path):
  got = plotting.plot_curves(ROWS, str(tmp_path / "c.png"), ["a", "b"])
  assert os.path.getsize(tmp_path / "c.png") > 0
  assert got["train/TASK/loss"]["lines"] == {"a": ([10, 20, 30], [1.5, 0.75, 0.25]),
                                             "b": ([10, 30], [0.5, 0.25])}
  assert got["eval/TASK/accuracy"]["lines"] == {
      "a test": ([20, 30], [0.5, 0.75]), "a train": ([20, 30], [0.625, 0.875]),
      "b test": ([20], [0.25])}  # a null (NaN) value is not drawn


def test_every_curves_panel_has_a_readable_legend_and_promises_only_what_is_drawn(tmp_path):
  got = plotting.plot_curves(ROWS, str(tmp_path / "c.png"), ["a", "b"])
  assert got["train/TASK/loss"]["legend"] == ["a", "b"]
  assert got["eval/TASK/accuracy"]["legend"] == ["a test", "a train", "b test"]
  assert all(got[p]["legend fontsize"] >= 8 for p in ("train/TASK/loss", "eval/TASK/accuracy"))
  assert got["eval/TASK/accuracy"]["ylabel"] == "test (solid), train split (dashed)"
  # Without eval_train (no train_eval keys) there is no dashed line to promise.
  test_only = [{k: v for k, v in r.items() if not k.startswith("train_eval/")} for r in ROWS]
  got = plotting.plot_curves(test_only, str(tmp_path / "t.png"), ["a", "b"])
  assert not any(s[1] == "--" for s in got["eval/TASK/accuracy"]["styles"].values())
  assert got["eval/TASK/accuracy"]["ylabel"] == "test split"


def test_with_seeds_each_curve_has_a_band_of_one_standard_error(tmp_path):
  rows = [{"step": 10, "train/a/loss": 1.0, "train/a/loss/se": 0.25, "eval/a/accuracy": 0.5,
           "eval/a/accuracy/se": 0.125},
          {"step": 20, "train/a/loss": 0.5, "train/a/loss/se": 0.125, "eval/a/accuracy": 0.75,
           "eval/a/accuracy/se": 0.0625, "train_eval/a/accuracy": 0.875,
           "train_eval/a/accuracy/se": 0.03125}]
  got = plotting.plot_curves(rows, str(tmp_path / "c.png"))
  assert got["train/TASK/loss"]["bands"] == {"a": ([10, 20], [0.75, 0.375], [1.25, 0.625])}
  assert got["eval/TASK/accuracy"]["bands"] == {
      "a test": ([10, 20], [0.375, 0.6875], [0.625, 0.8125]),
      "a train": ([20], [0.84375], [0.90625])}
  assert got["eval/TASK/accuracy"]["legend"] == ["a test", "a train"]  # bands: no entries
  assert "bands" not in plotting.plot_curves(ROWS, str(tmp_path / "one.png"))["train/TASK/loss"]


def test_grad_cosine_heatmap_is_the_mean_over_rows(tmp_path):
  names = ["a", "b", "c"]
  want = np.array([[1.0, (0.5 - 0.25) / 2, 0.125], [(0.5 - 0.25) / 2, 1.0, np.nan],
                   [0.125, np.nan, 1.0]])
  np.testing.assert_array_equal(plotting.grad_cosine_matrix(ROWS, names), want)
  got = plotting.plot_matrix(plotting.grad_cosine_matrix(ROWS, names), names,
                             str(tmp_path / "g.png"), title="cos", xlabel="", ylabel="")
  np.testing.assert_array_equal(got["cos"]["image"], want)


def test_delta_m_bars_are_the_baselines_the_run_and_each_tasks_change(tmp_path):
  tasks = {"a": {"accuracy": 0.9, "loss": 0.3}, "b": {"mse": 2.0, "mae": 1.0, "loss": 0.5}}
  delta_m = {"value": 7.5, "baselines": {"a": {"accuracy": 0.8}, "b": {"mse": 2.5, "mae": 1.0}},
             "per_task": {"a": {"accuracy": 12.5}, "b": {"mse": 20.0, "mae": 0.0}}}
  got = plotting.plot_delta_m(tasks, delta_m, str(tmp_path / "d.png"))
  assert got["test accuracy"]["bars"] == {"single-task": [0.8], "multi-task": [0.9]}
  assert got["test mse"]["bars"] == {"single-task": [2.5], "multi-task": [2.0]}
  assert got["test mae"]["bars"] == {"single-task": [1.0], "multi-task": [1.0]}
  assert got["Delta_m = +7.50% (positive = better)"]["bars"] == {
      "relative change %": [12.5, 10.0]}  # each task's mean over its metrics


def test_a_null_metric_or_delta_m_is_nan_not_a_crash(tmp_path):
  # A task with no labelled test example: its metric, its change and Delta_m are
  # null in summary.json (NaN); the run's last step, run_plots, must not fail.
  tasks = {"a": {"accuracy": None, "loss": 0.3}, "b": {"accuracy": 0.5, "loss": 0.5}}
  delta_m = {"value": None, "baselines": {"a": {"accuracy": 0.8}, "b": {"accuracy": None}},
             "per_task": {"a": {"accuracy": None}, "b": {"accuracy": 25.0}}}
  got = plotting.run_plots(str(tmp_path), ROWS, {"tasks": tasks, "delta_m": delta_m})
  bars = got["delta_m.png"]
  np.testing.assert_array_equal(bars["test accuracy"]["bars"]["single-task"], [0.8, np.nan])
  np.testing.assert_array_equal(bars["test accuracy"]["bars"]["multi-task"], [np.nan, 0.5])
  np.testing.assert_array_equal(
      bars["Delta_m = +nan% (positive = better)"]["bars"]["relative change %"], [np.nan, 25.0])
  assert os.path.getsize(tmp_path / "delta_m.png") > 0


def test_a_single_evaluation_is_drawn_with_a_marker(tmp_path):
  # Quick configs evaluate once: a one-point line without a marker draws nothing.
  rows = [{"step": 10, "train/a/loss": 1.0}, {"step": 20, "train/a/loss": 0.5,
                                                "eval/a/accuracy": 0.75}]
  got = plotting.plot_curves(rows, str(tmp_path / "c.png"))
  assert got["eval/TASK/accuracy"]["lines"] == {"a test": ([20], [0.75])}
  assert got["eval/TASK/accuracy"]["styles"]["a test"][2] == "o"
  long = [{"step": s, "eval/a/accuracy": 0.5} for s in range(1, plotting.MARKERS_UP_TO + 2)]
  got = plotting.plot_curves(long, str(tmp_path / "l.png"))
  assert got["eval/TASK/accuracy"]["styles"]["a test"][2] == "None"  # a long curve: a line
  with plotting.figure(str(tmp_path / "x.png")) as (fig, ax):  # drawn() leaves out what
    ax.plot([1], [2.0], label="invisible")                     # draws nothing
    ax.plot([1, 2], [2.0, 3.0], label="line")
    assert list(plotting.drawn(fig)["axis 0"]["lines"]) == ["line"]


def test_forty_tasks_get_forty_colours_and_a_legend(tmp_path):
  names = [f"t{i:02d}" for i in range(40)]  # CelebA's 40 attributes
  rows = [{"step": s, **{f"train/{t}/loss": 1.0 / s for t in names},
           **{f"eval/{t}/accuracy": 0.5 + i / 100 for i, t in enumerate(names)}}
          for s in (10, 20)]
  got = plotting.plot_curves(rows, str(tmp_path / "c.png"), names)
  styles = got["train/TASK/loss"]["styles"]
  colours = [styles[t][0] for t in names]
  assert len(set(colours)) == 40
  assert [got["eval/TASK/accuracy"]["styles"][f"{t} test"][0] for t in names] == colours
  assert got["figure legend"] == names  # outside the panels, one entry per task
  assert "legend" not in got["train/TASK/loss"]


def _image(path):
  return matplotlib.image.imread(str(path))


@pytest.mark.slow
def test_a_run_writes_its_plots_from_its_own_metrics(tmp_path):
  config = helpers.small_sinusoids_config(**{
      "objective.method": "pcgrad", "eval_train": True, "tag_lr": 0.1, "baselines": True,
      "baselines_cache": str(tmp_path / "cache"), "tensorboard": False})
  workdir = tmp_path / "run"
  summary = train.train_and_evaluate(config, str(workdir))
  rows = helpers.metrics_rows(workdir)
  names = sorted(f for f in os.listdir(workdir) if f.endswith(".png"))
  assert names == ["affinity.png", "curves.png", "delta_m.png", "grad_cosine.png"]
  again = tmp_path / "again"
  again.mkdir()
  got = plotting.run_plots(str(again), rows, summary)
  for name in names:  # the run's PNGs are these figures, pixel for pixel
    np.testing.assert_array_equal(_image(workdir / name), _image(again / name), err_msg=name)
  curves = got["curves.png"]
  for task in summary["tasks"]:
    steps = [r["step"] for r in rows if f"eval/{task}/mse" in r]
    assert curves["eval/TASK/mse"]["lines"][f"{task} test"] == (
        steps, [r[f"eval/{task}/mse"] for r in rows if f"eval/{task}/mse" in r])
    assert curves["eval/TASK/mse"]["lines"][f"{task} train"][1] == [
        r[f"train_eval/{task}/mse"] for r in rows if f"train_eval/{task}/mse" in r]
  affinity = np.array([[np.nan if v is None else v for v in row]
                       for row in summary["affinity"]["matrix"]])
  np.testing.assert_array_equal(got["affinity.png"]["TAG affinity"]["image"], affinity)
  base = summary["delta_m"]["baselines"]
  assert got["delta_m.png"]["test mse"]["bars"] == {
      "single-task": [base[t]["mse"] for t in summary["tasks"]],
      "multi-task": [summary["tasks"][t]["mse"] for t in summary["tasks"]]}


# ----------------------------------------------------------------------------
# The report across runs.
# ----------------------------------------------------------------------------


def _workdir(path, config, tasks, rows, **summary):
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(path, "summary.json"), "w") as f:
    json.dump({"tasks": tasks, **summary}, f)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def _three_runs(tmp_path):
  base = {"seed": 0, "model": {"arch": "concat", "hidden": [16, 16]},
          "objective": {"method": "fixed"}, "total_steps": 100}
  rows = lambda a, b: [{"step": 50, "eval/left/accuracy": a, "eval/right/accuracy": b},
                       {"step": 100, "eval/left/accuracy": a + 0.1,
                        "eval/right/accuracy": b + 0.1}]
  x, y, z = tmp_path / "x" / "run", tmp_path / "y" / "run", tmp_path / "z"
  _workdir(x, base, {"left": {"accuracy": 0.9, "loss": 0.25},
                     "right": {"accuracy": 0.8, "loss": 0.5}}, rows(0.8, 0.7),
           delta_m={"value": 1.5})
  _workdir(y, {**base, "model": {"arch": "mmoe", "hidden": [16, 16]}, "num_seeds": 3},
           {"left": {"accuracy": 0.875, "loss": 0.3}, "right": {"accuracy": 0.75, "loss": 0.6}},
           rows(0.7, 0.6), tasks_se={"left": {"accuracy": 0.01, "loss": 0.02},
                                     "right": {"accuracy": 0.03, "loss": 0.04}})
  _workdir(z, {**base, "objective": {"method": "cagrad"}, "total_steps": 200},
           {"left": {"accuracy": 0.5, "loss": None}}, rows(0.4, 0.3),
           delta_m={"value": -2.25})
  return [str(x), str(y), str(z)]


EXPECTED = """\
| run | model.arch | num_seeds | objective.method | total_steps | left/accuracy | left/loss | right/accuracy | right/loss | mean/accuracy | mean/loss | Delta_m % |
|---|---|---|---|---|---|---|---|---|---|---|---|
| x/run | concat | - | fixed | 100 | 0.9000 | 0.2500 | 0.8000 | 0.5000 | 0.8500 | 0.3750 | +1.50 |
| y/run | mmoe | 3 | fixed | 100 | 0.8750 ± 0.0100 | 0.3000 ± 0.0200 | 0.7500 ± 0.0300 | 0.6000 ± 0.0400 | 0.8125 | 0.4500 | - |
| z | concat | - | cagrad | 200 | 0.5000 | nan | - | - | 0.5000 | nan | -2.25 |"""


def test_the_table_has_differing_keys_as_columns_and_final_metrics(tmp_path):
  dirs = _three_runs(tmp_path)
  runs = dict(zip(report.run_names(dirs), map(report.load_run, dirs)))
  text, same = report.table(runs)
  assert text == EXPECTED
  assert same == ["model.hidden", "seed"]


def test_the_command_writes_and_prints_the_report_and_its_curves(tmp_path, capsys):
  dirs = _three_runs(tmp_path)
  out = tmp_path / "out" / "cmp.md"
  out.parent.mkdir()
  assert report.main([*dirs, f"--out={out}"]) == 0
  printed = capsys.readouterr().out
  md = out.read_text()
  assert EXPECTED in md and "![test curves](cmp_curves.png)" in md
  # The file lists the shared keys, one a line; the terminal has one line that
  # counts them and names the file, else it is the file.
  listing = "## Shared by every run (2 keys)\n\n- model.hidden=(16, 16)\n- seed=0\n"
  assert md.endswith(listing)
  assert printed == (md[:-len(listing)]
                     + f"Shared by every run: 2 config keys (listed in {out}).\n\n")
  # The curves are the runs' metrics: the same figure drawn here, pixel for pixel.
  rows = {n: helpers.metrics_rows(d) for n, d in zip(("x/run", "y/run", "z"), dirs)}
  got = plotting.plot_run_comparison(rows, str(tmp_path / "again.png"))
  np.testing.assert_array_equal(_image(out.parent / "cmp_curves.png"),
                                _image(tmp_path / "again.png"))
  assert got["test accuracy"]["lines"]["y/run right"] == ([50, 100], [0.6, 0.7])
  assert len(got["test accuracy"]["lines"]) == 6


def test_report_curves_colour_by_task_and_style_by_run(tmp_path):
  dirs = _three_runs(tmp_path)
  rows = {n: helpers.metrics_rows(d) for n, d in zip(("x/run", "y/run", "z"), dirs)}
  styles = plotting.plot_run_comparison(rows, str(tmp_path / "c.png"))["test accuracy"]["styles"]
  colour = {t: {styles[f"{r} {t}"][0] for r in rows} for t in ("left", "right")}
  assert all(len(c) == 1 for c in colour.values())  # a task: one colour in every run
  assert colour["left"] != colour["right"]
  style = {r: {styles[f"{r} {t}"][1] for t in ("left", "right")} for r in rows}
  assert all(len(s) == 1 for s in style.values())  # a run: one line style
  assert len({s.pop() for s in style.values()}) == 3


def test_delta_m_with_seeds_is_the_mean_over_seeds_and_its_se(tmp_path):
  # summary["delta_m"] of a num_seeds=2 run with baselines (mtljax.train):
  # "value" is Delta_m of the mean metrics; "mean_over_seeds" and "se" are over
  # the paired per-seed values, which the metric cells (mean ± s.e.) match.
  dm = {"value": 1.0, "per_seed": [2.0, 5.0], "mean_over_seeds": 3.5, "se": 1.5,
        "per_task": {"a": {"accuracy": 1.0}}, "baselines": {"a": {"accuracy": 0.5}}}
  _workdir(tmp_path / "seeds", {"num_seeds": 2}, {"a": {"accuracy": 0.6}}, [],
           tasks_se={"a": {"accuracy": 0.1}}, delta_m=dm)
  _workdir(tmp_path / "one", {"num_seeds": 1}, {"a": {"accuracy": 0.6}}, [],
           delta_m={**dm, "value": None, "per_seed": None, "mean_over_seeds": None})
  _workdir(tmp_path / "plain", {"num_seeds": 1}, {"a": {"accuracy": 0.6}}, [],
           delta_m={"value": -0.5})
  dirs = [str(tmp_path / d) for d in ("seeds", "one", "plain")]
  text, _ = report.table(dict(zip(report.run_names(dirs), map(report.load_run, dirs))))
  assert [line.split(" | ")[-1] for line in text.splitlines()[2:]] == [
      "+3.50 ± 1.50 |", "nan |", "-0.50 |"]


def test_the_mean_over_tasks_with_seeds_is_over_each_seeds_mean(tmp_path):
  per_seed = [{"a": {"accuracy": 0.6}, "b": {"accuracy": 0.8}},  # seed means 0.7, 0.85
              {"a": {"accuracy": 0.7}, "b": {"accuracy": 1.0}}]
  _workdir(tmp_path / "s", {}, {"a": {"accuracy": 0.65}, "b": {"accuracy": 0.9}}, [],
           per_seed={"seeds": [0, 1], "tasks": per_seed},
           tasks_se={"a": {"accuracy": 0.05}, "b": {"accuracy": 0.1}})
  summary = report.load_run(str(tmp_path / "s"))["summary"]
  mean, se = report.task_mean(summary, "accuracy")
  np.testing.assert_allclose([mean, se], [0.775, np.std([0.7, 0.85], ddof=1) / np.sqrt(2)],
                             rtol=1e-12)
  assert report.task_mean(summary, "mse") == (None, None)
  text, _ = report.table({"s": report.load_run(str(tmp_path / "s"))})
  assert text.splitlines()[0] == "| run | a/accuracy | b/accuracy | mean/accuracy |"
  assert text.splitlines()[2].endswith("| 0.7750 ± 0.0750 |")


def test_the_report_goes_next_to_the_runs_by_default(tmp_path, monkeypatch, capsys):
  dirs = _three_runs(tmp_path)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)  # e.g. the repository: nothing is written there
  assert report.main(dirs) == 0
  assert os.listdir(cwd) == []
  out = tmp_path / "x" / "report.md"  # the first workdir's parent
  assert f"(listed in {out})" in capsys.readouterr().out
  assert "- seed=0" in out.read_text()
  assert os.path.exists(tmp_path / "x" / "report_curves.png")


def test_the_header_mentions_delta_m_only_with_its_column(tmp_path, capsys):
  dirs = _three_runs(tmp_path)
  assert report.main([*dirs, f"--out={tmp_path / 'with.md'}"]) == 0
  without = [dirs[1]]  # the one run without delta_m
  assert report.main([*without, f"--out={tmp_path / 'without.md'}"]) == 0
  heads = [(tmp_path / f).read_text().splitlines()[2] for f in ("with.md", "without.md")]
  assert heads[0].endswith(", Delta_m in % (positive = better than single-task baselines).")
  assert "Delta_m" in (tmp_path / "with.md").read_text().splitlines()[4]  # the table's header
  assert heads[1] == ("1 run(s); config keys that differ are columns, final test metrics per "
                      "task (mean ± s.e. over seeds where a run has several), their mean over "
                      "tasks (mean/METRIC).")
  assert "Delta_m" not in (tmp_path / "without.md").read_text()
  capsys.readouterr()


def test_a_workdir_without_a_summary_is_one_line(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  assert report.main([str(tmp_path / "empty"), f"--out={tmp_path / 'r.md'}"]) == 2
  assert capsys.readouterr().err == (f"error: {tmp_path / 'empty'}: no summary.json "
                                     "(not a finished mtljax run).\n")


def test_a_multi_run_experiments_directory_is_one_line(tmp_path, capsys):
  _workdir(tmp_path / "archs", {}, {"concat": {"left": {"accuracy": 0.9}}}, [])
  assert report.main([str(tmp_path / "archs"), f"--out={tmp_path / 'r.md'}"]) == 2
  assert "summary.json's 'tasks' are not {TASK: {METRIC: value}}" in capsys.readouterr().err
