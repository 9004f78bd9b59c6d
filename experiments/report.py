r"""A comparison of finished runs: a Markdown table and plots.

    python -m experiments.report WORKDIR [WORKDIR ...] [--out=FILE.md]

Each WORKDIR is a run's directory (``summary.json``, ``config.json``,
``metrics.jsonl``). The table has a row per run: the config keys whose values
differ between the runs as columns (dotted, e.g. ``model.arch``; ``-`` where a
run lacks the key), then each task's final test metrics (``TASK/METRIC``,
``mean ± s.e.`` for runs of several seeds), then ``mean/METRIC`` for each
metric two or more tasks have (the mean over the run's tasks with it, ± s.e.
over seeds: :func:`task_mean`), then Δm (%, positive = better than the
single-task baselines; with seeds the mean over seeds of the paired per-seed
Δm ± s.e.) when a run measured it. The keys every run shares are listed under
the table, one a line. The report is written to ``--out`` (default:
``report.md`` in the first WORKDIR's parent directory, next to the runs --
never the current directory, e.g. the repository) and printed, the shared
keys as one line that counts them and names the file;
``--out``'s stem + ``_curves.png`` holds each task's test curves, a panel per
metric and a line per run and task (:func:`mtljax.plotting.plot_run_comparison`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

from mtljax import params as params_lib
from mtljax import plotting


class ReportError(ValueError):
  """A workdir that cannot be reported (what is missing)."""


def load_run(workdir: str) -> dict:
  """``{"summary", "config" (dotted keys), "rows"}`` of a finished run."""
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    raise ReportError(f"{workdir}: no summary.json (not a finished mtljax run).")
  with open(path) as f:
    summary = json.load(f)
  config_path = os.path.join(workdir, "config.json")
  if os.path.exists(config_path):
    with open(config_path) as f:
      config = json.load(f)
  else:
    config = summary.get("config", {})
  tasks = summary.get("tasks")
  if not isinstance(tasks, dict) or not tasks:
    raise ReportError(f"{workdir}: summary.json has no per-task metrics ('tasks').")
  if not all(isinstance(ms, dict) and all(v is None or isinstance(v, (int, float))
                                          for v in ms.values()) for ms in tasks.values()):
    raise ReportError(f"{workdir}: summary.json's 'tasks' are not {{TASK: {{METRIC: value}}}} "
                      "(a multi-run experiment's directory? pass its runs' directories).")
  return {"summary": summary, "config": params_lib.flatten_dict(config, "."),
          "rows": plotting.metrics_rows(workdir)}


def run_names(workdirs) -> list[str]:
  """Each run's name: its directory's name, or the shortest tail of its path
  that tells it from the others."""
  parts = [os.path.normpath(os.path.abspath(w)).split(os.sep) for w in workdirs]
  if len({tuple(p) for p in parts}) < len(parts):
    raise ReportError(f"the same workdir was given twice: {list(workdirs)}.")
  tail = lambda p, d: "/".join(p[-d:])
  names = []
  for i, p in enumerate(parts):
    others = [q for j, q in enumerate(parts) if j != i]
    depth = next(d for d in range(1, len(p) + 1)
                 if all(tail(p, d) != tail(q, d) for q in others))
    names.append(tail(p, depth))
  return names


def _value(v) -> str:
  if isinstance(v, (list, tuple)):
    return "(" + ", ".join(_value(x) for x in v) + ("," if len(v) == 1 else "") + ")"
  if isinstance(v, str):
    return v if v else "''"
  return json.dumps(v)


def _metric(mean, se=None) -> str:
  if mean is None:
    return "nan"
  text = f"{mean:.4f}"
  if se is not None:
    text += f" ± {se:.4f}"
  return text


def _delta_m(dm: dict) -> str:
  """Δm's cell: with several seeds the mean over seeds of the paired per-seed
  Δm (seed s against the baselines' seed s) ± its s.e. -- as the metric cells
  show the mean over seeds -- else the run's Δm; ``nan`` for null."""
  if not dm:
    return "-"
  if "mean_over_seeds" in dm:
    mean, se = dm["mean_over_seeds"], dm.get("se")
    if mean is None:
      return "nan"
    return f"{mean:+.2f}" + (f" ± {se:.2f}" if se is not None else "")
  if "value" not in dm:
    return "-"
  return "nan" if dm["value"] is None else f"{dm['value']:+.2f}"


def task_mean(summary: dict, metric: str) -> tuple[float | None, float | None]:
  """``(mean, s.e.)`` over the run's tasks that have ``metric`` of their final
  value (None: no task has it; NaN if one is null). With several seeds
  (``summary["per_seed"]["tasks"]``) the mean over seeds of each seed's mean
  over tasks, and its s.e. (``std(ddof=1) / sqrt(N)``); else s.e. None."""
  def mean(tasks):
    vals = [ms[metric] for ms in tasks.values() if metric in ms]
    if not vals:
      return None
    return math.nan if any(v is None for v in vals) else float(np.mean(vals))
  seeds = (summary.get("per_seed") or {}).get("tasks") or []
  if len(seeds) < 2:
    return mean(summary["tasks"]), None
  per = [mean(t) for t in seeds]
  if any(v is None for v in per):
    return mean(summary["tasks"]), None
  per = np.array(per, np.float64)
  return float(per.mean()), float(per.std(ddof=1) / np.sqrt(per.size))


def table(runs: dict[str, dict]) -> tuple[str, list[str]]:
  """``(Markdown table, the config keys every run shares)`` (module docstring)."""
  configs = [r["config"] for r in runs.values()]
  keys = list(dict.fromkeys(k for c in configs for k in c))
  differ = sorted(k for k in keys
                  if len({_value(c[k]) if k in c else None for c in configs}) > 1)
  same = sorted(k for k in keys if k not in differ)
  metrics = []
  for r in runs.values():
    for task, ms in r["summary"]["tasks"].items():
      metrics += [(task, m) for m in sorted(ms) if (task, m) not in metrics]
  delta = any(r["summary"].get("delta_m") for r in runs.values())
  shared = [m for m in dict.fromkeys(m for _, m in metrics)  # a metric of 2+ tasks somewhere
            if any(sum(m in ms for ms in r["summary"]["tasks"].values()) > 1
                   for r in runs.values())]
  header = (["run"] + differ + [f"{t}/{m}" for t, m in metrics] + [f"mean/{m}" for m in shared]
            + (["Delta_m %"] if delta else []))
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, r in runs.items():
    s = r["summary"]
    cells = [name] + [_value(r["config"][k]) if k in r["config"] else "-" for k in differ]
    for t, m in metrics:
      if m not in s["tasks"].get(t, {}):
        cells.append("-")
        continue
      se = s.get("tasks_se", {}).get(t, {}).get(m)
      cells.append(_metric(s["tasks"][t][m], se))
    for m in shared:
      mean, se = task_mean(s, m)
      cells.append("-" if mean is None else _metric(None if math.isnan(mean) else mean, se))
    if delta:
      cells.append(_delta_m(s.get("delta_m") or {}))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines), same


def report(workdirs, out: str | None = None) -> tuple[str, str]:
  """``(the Markdown report of workdirs, its text for the terminal)``; the
  report is written to ``out`` (with the curves next to it) when given. The
  report lists the config keys every run shares, one a line; the terminal
  text has one line in their place that counts them and says where they are
  (a run has a hundred or more: one line of them floods a terminal)."""
  if not workdirs:
    raise ReportError("no workdirs given.")
  runs = dict(zip(run_names(workdirs), (load_run(w) for w in workdirs)))
  text, same = table(runs)
  delta = any(r["summary"].get("delta_m") for r in runs.values())
  first = next(iter(runs.values()))["config"]
  parts = ["# mtljax runs", "",
           f"{len(runs)} run(s); config keys that differ are columns, final test metrics "
           "per task (mean ± s.e. over seeds where a run has several), their mean over "
           "tasks (mean/METRIC)"
           + (", Delta_m in % (positive = better than single-task baselines)." if delta
              else "."), "", text, ""]
  if out is not None:
    png = os.path.splitext(out)[0] + "_curves.png"
    plotting.plot_run_comparison({n: r["rows"] for n, r in runs.items()}, png)
    parts += [f"![test curves]({os.path.basename(png)})", ""]
  listing = [f"## Shared by every run ({len(same)} keys)", ""]
  listing += [f"- {k}={_value(first[k])}" for k in same] + [""]
  md = "\n".join(parts + listing)
  where = f"listed in {out}" if out is not None else "not listed: no report file"
  printed = "\n".join(parts + [f"Shared by every run: {len(same)} config keys ({where}).", ""])
  if out is not None:
    with open(out, "w") as f:
      f.write(md)
  return md, printed


def default_out(workdirs) -> str:
  """``report.md`` in the first workdir's parent directory (next to the runs)."""
  return os.path.join(os.path.dirname(os.path.abspath(os.path.normpath(workdirs[0]))),
                      "report.md")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.report",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("workdirs", nargs="+", metavar="WORKDIR")
  parser.add_argument("--out", default=None,
                      help="the Markdown file (default: report.md in the first WORKDIR's "
                           "parent directory); the curves go next to it")
  args = parser.parse_args(argv)
  try:
    print(report(args.workdirs, args.out or default_out(args.workdirs))[1])
  except ReportError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
