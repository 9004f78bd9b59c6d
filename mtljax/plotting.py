"""Figures: one way to write one (``with figure(path) as (fig, ax): ...``), and
a run's own plots from its ``metrics.jsonl`` rows and ``summary.json``.

matplotlib is imported lazily with the Agg backend (no display needed), and the
figure is laid out, saved and closed when the block ends.

:func:`run_plots` writes, in a run's workdir:

* ``curves.png``: per task, the training loss (``train/TASK/loss``) and each
  evaluation metric on the test split (solid) and, with ``config.eval_train``,
  on the train split (dashed), against the step -- for every run; a legend
  in every panel; with N seeds the mean and a band ± its s.e.;
* ``delta_m.png`` (with ``config.baselines``): per metric, the single-task
  baseline and the multi-task value of each task side by side, and each task's
  relative change (%), titled with Δm;
* ``grad_cosine.png`` (gradient methods): the mean over the logged rows of the
  pairwise cosine of the tasks' gradients (``grad/cos/A/B``);
* ``affinity.png`` (``config.tag_lr > 0``): TAG's affinity matrix.

A task has one colour in every panel (:func:`task_colors`: ``tab10`` up to 10
tasks, then 60 from ``tab20``/``tab20b``/``tab20c``, with the legend right of
the panels beyond 10 tasks); a series of at most :data:`MARKERS_UP_TO` points
also gets markers (a single evaluation is otherwise invisible); a null metric
(None in ``summary.json``) is NaN -- not drawn.

Each plotting function returns :func:`drawn` of its figure: the data the
figure holds, read back from its matplotlib objects (tests compare it with the
metrics).
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import numpy as np


@contextlib.contextmanager
def figure(path: str, ncols: int = 1, figsize=(5, 4), tight: bool = True):
  """Yields ``(fig, ax)`` (``ax`` a list when ``ncols > 1``); saves to ``path``
  (``tight=False``: the caller set the margins, which is faster)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, ncols, figsize=figsize, squeeze=False)
  try:
    yield fig, (list(axes[0]) if ncols > 1 else axes[0][0])
    if tight:
      fig.tight_layout()
    fig.savefig(path, dpi=120)
  finally:
    plt.close(fig)


def _visible(line) -> bool:
  """Whether a Line2D draws anything: a marker at a finite point, or a
  segment between two consecutive finite points."""
  x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
  ok = np.isfinite(x) & np.isfinite(y)
  if line.get_marker() not in (None, "", "None", " ") and ok.any():
    return True
  return line.get_linestyle() not in ("None", "", " ") and bool((ok[1:] & ok[:-1]).any())


def drawn(fig) -> dict:
  """``{axis title: {"lines": {label: (x, y)}, "styles": {label: (colour as
  #rrggbb, linestyle, marker)}, "legend": [labels], "legend fontsize": points,
  "bands": {label: (x, low, high)}, "ylabel": text, "bars": {label: heights},
  "image": matrix}}`` of a figure, read from its lines (only those that draw
  something: a single point needs a marker), legends, seed bands
  (:func:`_band`), bar containers and images (the keys an axis has none of
  are left out); a figure-level legend's labels under ``"figure legend"``."""
  from matplotlib import colors  # pylint: disable=g-import-not-at-top
  out = {}
  for i, ax in enumerate(fig.axes):
    if not ax.get_title() and not ax.lines and not ax.containers and not ax.images:
      continue  # a colorbar
    entry = {}
    shown = [l for l in ax.lines if not l.get_label().startswith("_") and _visible(l)]
    if shown:
      entry["lines"] = {l.get_label(): (list(map(float, l.get_xdata())),
                                        list(map(float, l.get_ydata()))) for l in shown}
      entry["styles"] = {l.get_label(): (colors.to_hex(l.get_color()), l.get_linestyle(),
                                         l.get_marker()) for l in shown}
    if ax.get_legend() is not None:
      entry["legend"] = [t.get_text() for t in ax.get_legend().get_texts()]
      entry["legend fontsize"] = ax.get_legend().get_texts()[0].get_fontsize()
    bands = {c.get_label()[len("_band "):]: _band_edges(c) for c in ax.collections
             if c.get_label().startswith("_band ")}
    if bands:
      entry["bands"] = bands
    if ax.get_ylabel():
      entry["ylabel"] = ax.get_ylabel()
    bars = {c.get_label(): [float(p.get_height()) for p in c.patches] for c in ax.containers}
    if bars:
      entry["bars"] = bars
    if ax.images:
      entry["image"] = np.asarray(ax.images[0].get_array().filled(np.nan), np.float64)
    out[ax.get_title() or f"axis {i}"] = entry
  if fig.legends:
    out["figure legend"] = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
  return out


# Series of at most this many points are drawn with markers (one evaluation,
# as quick configs make, is otherwise invisible).
MARKERS_UP_TO = 20


def task_colors(n: int) -> list:
  """``n`` distinct colours: matplotlib's ``tab10`` up to 10, then
  ``tab20`` + ``tab20b`` + ``tab20c`` (60), then samples of ``turbo``."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  if n <= 10:
    return [f"C{i}" for i in range(n)]
  if n <= 60:
    return [matplotlib.colormaps[m](i) for m in ("tab20", "tab20b", "tab20c")
            for i in range(20)][:n]
  return [matplotlib.colormaps["turbo"](i / (n - 1)) for i in range(n)]


def _marker(points, marker="o") -> dict:
  return {"marker": marker, "markersize": 3} if len(points) <= MARKERS_UP_TO else {}


# ----------------------------------------------------------------------------
# Series from metrics.jsonl rows.
# ----------------------------------------------------------------------------


def metrics_rows(workdir: str) -> list[dict]:
  """The rows of ``WORKDIR/metrics.jsonl`` ([] when there is none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
  """``(steps, values)`` of ``key`` over the rows that have a value for it."""
  pts = [(r["step"], float(r[key])) for r in rows if r.get(key) is not None]
  return [s for s, _ in pts], [v for _, v in pts]


def _tasks_and_metrics(rows):
  tasks, metrics = {}, {}
  for r in rows:
    for k in r:
      parts = k.split("/")
      if len(parts) == 3 and parts[0] in ("train", "eval", "train_eval"):
        tasks.setdefault(parts[1], None)
        if parts[0] != "train":
          metrics.setdefault(parts[2], None)
  return list(tasks), list(metrics)


LEGEND_FONTSIZE = 8  # points: every panel's legend and label


def _band(ax, rows: list[dict], key: str, color, label: str) -> None:
  """With N seeds (rows with ``KEY/se``): a shaded band mean ± s.e. around
  ``key``'s line, labelled ``_band LABEL`` (kept out of legends; :func:`drawn`
  reads it back)."""
  pts = [(r["step"], float(r[key]), float(r[f"{key}/se"])) for r in rows
         if r.get(key) is not None and r.get(f"{key}/se") is not None
         and math.isfinite(float(r[f"{key}/se"]))]
  if not pts:
    return
  x, y, se = map(np.asarray, zip(*pts))
  ax.fill_between(x, y - se, y + se, color=color, alpha=0.2, linewidth=0,
                  label=f"_band {label}")


def _band_edges(collection) -> tuple[list[float], list[float], list[float]]:
  """``(x, low, high)`` of a :func:`_band`, from its polygon's vertices."""
  v = np.concatenate([p.vertices for p in collection.get_paths()])
  xs = sorted(set(map(float, v[:, 0])))
  return (xs, [float(v[v[:, 0] == x, 1].min()) for x in xs],
          [float(v[v[:, 0] == x, 1].max()) for x in xs])


def plot_curves(rows: list[dict], path: str, tasks=None) -> dict:
  """``curves.png``: one panel for the training loss and one per evaluation
  metric, a line per task (test solid, train split dashed), each with a
  legend (one legend right of the panels beyond 10 tasks); with N seeds a
  band mean ± s.e. around each line. ``tasks``: their order (default: as they
  first appear in the rows)."""
  found, metrics = _tasks_and_metrics(rows)
  tasks = list(tasks or found)
  panels = ["train/TASK/loss"] + [f"eval/TASK/{m}" for m in metrics]
  width = 4.2 * len(panels)
  with figure(path, ncols=len(panels), figsize=(width, 3.4), tight=False) as (fig, axes):
    fig.subplots_adjust(left=0.6 / width, right=1 - 0.15 / width, bottom=0.15, top=0.9,
                        wspace=0.3)
    axes = axes if isinstance(axes, list) else [axes]
    colors = task_colors(len(tasks))  # a task's colour in every panel
    dashed = False
    for ax, panel in zip(axes, panels):
      for t, color in zip(tasks, colors):
        if panel.startswith("train/"):
          pts = series(rows, f"train/{t}/loss")
          ax.plot(*pts, color=color, label=t, **_marker(pts[0]))
          _band(ax, rows, f"train/{t}/loss", color, t)
          continue
        m = panel.split("/")[-1]
        pts = series(rows, f"eval/{t}/{m}")
        ax.plot(*pts, color=color, label=f"{t} test", **_marker(pts[0]))
        _band(ax, rows, f"eval/{t}/{m}", color, f"{t} test")
        train_eval = series(rows, f"train_eval/{t}/{m}")
        if train_eval[0]:
          dashed = True
          ax.plot(*train_eval, ls="--", color=color, label=f"{t} train",
                  **_marker(train_eval[0], "x"))
          _band(ax, rows, f"train_eval/{t}/{m}", color, f"{t} train")
      ax.set_title(panel)
      ax.set_xlabel("step")
    _task_legend(fig, axes, len(tasks), width)
    if len(panels) > 1:  # dashed lines are promised only where they are drawn
      axes[1].set_ylabel("test (solid), train split (dashed)" if dashed else "test split",
                         fontsize=LEGEND_FONTSIZE)
    return drawn(fig)


def _task_legend(fig, axes, n_tasks: int, width: float) -> None:
  """Up to 10 tasks: a legend in every panel; more: the first panel's labels
  (one per task, its colour in every panel) in one legend right of the
  panels, whose margin grows to fit it."""
  if n_tasks <= 10:
    for ax in axes:
      ax.legend(fontsize=LEGEND_FONTSIZE)
    return
  cols = math.ceil(n_tasks / 20)
  space = 1.4 * cols  # inches
  fig.set_size_inches(width + space, fig.get_size_inches()[1])
  fig.subplots_adjust(left=0.6 / (width + space), right=(width - 0.15) / (width + space))
  fig.legend(*axes[0].get_legend_handles_labels(), loc="center left",
             fontsize=LEGEND_FONTSIZE, ncol=cols,
             bbox_to_anchor=((width - 0.05) / (width + space), 0.5), frameon=False)


def grad_cosine_matrix(rows: list[dict], names) -> np.ndarray:
  """``[T, T]``: the mean over the rows of ``grad/cos/A/B`` (symmetric, 1 on
  the diagonal, NaN for a pair never measured)."""
  names = list(names)
  out = np.full((len(names), len(names)), np.nan)
  np.fill_diagonal(out, 1.0)
  for i, a in enumerate(names):
    for j in range(i + 1, len(names)):
      _, v = series(rows, f"grad/cos/{a}/{names[j]}")
      if v:
        out[i, j] = out[j, i] = float(np.mean(v))
  return out


def plot_matrix(matrix, names, path: str, *, title: str, xlabel: str, ylabel: str,
                limit: float | None = None) -> dict:
  """A heatmap of a ``[T, T]`` task matrix (NaN blank), colours symmetric
  about 0 (``limit``: the colour scale's bound; default the largest |entry|)."""
  matrix = np.asarray(matrix, np.float64)
  size = (2.5 + 0.5 * len(names), 2.0 + 0.5 * len(names))
  with figure(path, figsize=size) as (fig, ax):
    finite = np.abs(matrix[np.isfinite(matrix)])
    lim = limit or (float(finite.max()) if finite.size and finite.max() > 0 else 1.0)
    im = ax.imshow(np.ma.masked_invalid(matrix), cmap="RdBu", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(names)), names, rotation=90)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(im)
    return drawn(fig)


def plot_delta_m(tasks: dict, delta_m: dict, path: str) -> dict:
  """``delta_m.png``: per metric (not loss), bars of each task's single-task
  baseline and multi-task value; a last panel of each task's relative change
  (% , positive = better), titled with Δm. A null (None) value -- e.g. a task
  with no labelled test example -- is NaN: no bar, and ``nan`` in the title.

  Args:
    tasks: the run's final test metrics ``{task: {metric: value}}``.
    delta_m: ``summary["delta_m"]`` (``value``, ``per_task``, ``baselines``).
  """
  nan = lambda v: math.nan if v is None else float(v)  # null in summary.json
  base = delta_m["baselines"]
  metrics = list(dict.fromkeys(m for ms in delta_m["per_task"].values() for m in ms))
  names = list(delta_m["per_task"])
  width = (len(metrics) + 1) * (1.5 + 0.45 * len(names))
  with figure(path, ncols=len(metrics) + 1, figsize=(width, 3.6)) as (fig, axes):
    axes = axes if isinstance(axes, list) else [axes]
    for ax, m in zip(axes, metrics):
      have = [t for t in names if m in delta_m["per_task"][t]]
      x = np.arange(len(have))
      ax.bar(x - 0.2, [nan(base[t].get(m)) for t in have], 0.4, label="single-task")
      ax.bar(x + 0.2, [nan(tasks[t].get(m)) for t in have], 0.4, label="multi-task")
      ax.set_xticks(x, have, rotation=45, ha="right")
      ax.set_title(f"test {m}")
      ax.legend(fontsize=6)
    ax = axes[-1]
    change = [float(np.mean([nan(v) for v in delta_m["per_task"][t].values()]))
              for t in names]
    ax.bar(np.arange(len(names)), change, label="relative change %")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(np.arange(len(names)), names, rotation=45, ha="right")
    ax.set_title(f"Delta_m = {nan(delta_m['value']):+.2f}% (positive = better)")
    return drawn(fig)


def plot_run_comparison(runs: dict[str, list[dict]], path: str) -> dict:
  """Several runs' test curves (``eval/TASK/METRIC``): a panel per metric, a
  line per run and task (label ``RUN TASK``), the colour the task's (in the
  order tasks first appear over the runs), the line style the run's (and,
  beyond 4 runs, a marker per run too). ``runs``: ``{name: rows}``."""
  metrics = list(dict.fromkeys(m for rows in runs.values()
                               for m in _tasks_and_metrics(rows)[1]))
  tasks = list(dict.fromkeys(t for rows in runs.values() for t in _tasks_and_metrics(rows)[0]))
  color = dict(zip(tasks, task_colors(len(tasks))))
  styles, markers = ("-", "--", ":", "-."), "osv^D<>ph*"
  n_panels = max(len(metrics), 1)
  with figure(path, ncols=n_panels, figsize=(4.6 * n_panels, 3.6)) as (fig, axes):
    axes = axes if isinstance(axes, list) else [axes]
    for ax, m in zip(axes, metrics):
      for r, (name, rows) in enumerate(runs.items()):
        for t in _tasks_and_metrics(rows)[0]:
          steps, values = series(rows, f"eval/{t}/{m}")
          if not steps:
            continue
          mark = ({"marker": markers[r % len(markers)], "markersize": 3} if len(runs) > 4
                  else _marker(steps))
          ax.plot(steps, values, label=f"{name} {t}", color=color[t],
                  ls=styles[r % len(styles)], **mark)
      ax.set_title(f"test {m}")
      ax.set_xlabel("step")
      if len(ax.lines) <= 16:
        ax.legend(fontsize=6)
    return drawn(fig)


def normals_rgb(n) -> np.ndarray:
  """Unit normals ``[..., 3]`` as colours in [0, 1] (``(n + 1) / 2``; a
  missing, all-zero normal is mid-grey)."""
  return np.clip((np.asarray(n, np.float64) + 1.0) / 2.0, 0.0, 1.0)


def plot_dense_examples(images, columns: list[tuple[str, str, list]], path: str,
                        num_classes: dict[str, int] | None = None) -> dict:
  """A grid with one row per example: the input, then for each dense task its
  ground truth and its prediction. ``columns``: ``[(title, kind, [per-example
  map])]`` (``segmentation`` class ids with -1 ignored, drawn black;
  ``depth`` ``[H, W]`` with 0 missing, on one colour scale per row;
  ``normals`` ``[H, W, 3]``). Returns :func:`drawn`'s summary."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  num_classes = num_classes or {}
  n = len(images)
  with figure(path, ncols=1 + len(columns), figsize=(1.7 * (1 + len(columns)), 1.5 * n + 0.4)
              ) as (fig, _):
    fig.clear()
    axes = fig.subplots(n, 1 + len(columns), squeeze=False)
    for i in range(n):
      axes[i][0].imshow(np.clip(np.asarray(images[i], np.float64), 0, 1))
      depth_range = [np.asarray(m[i], np.float64) for _, kind, m in columns if kind == "depth"]
      valid = [d[d > 0] for d in depth_range]
      lo = min((v.min() for v in valid if v.size), default=0.0)
      hi = max((v.max() for v in valid if v.size), default=1.0)
      for j, (title, kind, maps) in enumerate(columns, start=1):
        m = np.asarray(maps[i])
        ax = axes[i][j]
        if kind == "segmentation":
          cmap = matplotlib.colormaps["tab20"].resampled(max(num_classes.get(title, 20), 2))
          cmap.set_bad("black")
          ax.imshow(np.ma.masked_less(m, 0), cmap=cmap, vmin=0,
                    vmax=max(num_classes.get(title, 20), 2) - 1, interpolation="nearest")
        elif kind == "depth":
          ax.imshow(np.ma.masked_equal(m.reshape(m.shape[:2]), 0.0), cmap="viridis", vmin=lo,
                    vmax=hi)
        else:
          ax.imshow(normals_rgb(m))
        if i == 0:
          ax.set_title(title, fontsize=7)
    axes[0][0].set_title("input", fontsize=7)
    for row in axes:
      for ax in row:
        ax.set_xticks([])
        ax.set_yticks([])
  return {"rows": n, "columns": ["input"] + [t for t, _, _ in columns]}


def run_plots(workdir: str, rows: list[dict], summary: dict) -> dict[str, dict]:
  """Writes a run's plots (module docstring) into ``workdir``; returns
  ``{file name: drawn(figure)}``."""
  names = list(summary["tasks"])
  out = {"curves.png": plot_curves(rows, os.path.join(workdir, "curves.png"), names)}
  if summary.get("delta_m"):
    out["delta_m.png"] = plot_delta_m(summary["tasks"], summary["delta_m"],
                                      os.path.join(workdir, "delta_m.png"))
  if any(k.startswith("grad/cos/") for r in rows for k in r):
    out["grad_cosine.png"] = plot_matrix(
        grad_cosine_matrix(rows, names), names, os.path.join(workdir, "grad_cosine.png"),
        title="mean gradient cosine", xlabel="task", ylabel="task", limit=1.0)
  if summary.get("affinity"):
    aff = summary["affinity"]
    matrix = [[math.nan if v is None else v for v in row] for row in aff["matrix"]]
    out["affinity.png"] = plot_matrix(
        matrix, aff["tasks"], os.path.join(workdir, "affinity.png"),
        title="TAG affinity", xlabel="target task j", ylabel="source task i (lookahead step)")
  return out
