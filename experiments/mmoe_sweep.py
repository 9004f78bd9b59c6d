"""The MMoE correlation sweep with the paper's protocol (see
experiments/configs/mmoe_sweep.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Callable

import jax
import ml_collections
import numpy as np

from experiments import common
from mtljax import build
from mtljax import cv as cv_lib
from mtljax import errors
from mtljax import params as params_lib
from mtljax import plotting
from mtljax import tasks as tasks_lib
from mtljax import train
from mtljax import workdir as workdir_lib
from mtljax.data import builders
from mtljax.data import generators

logger = logging.getLogger("mtljax")
MODELS = ("shared_bottom", "omoe", "mmoe", "independent", "cgc", "ple", "dselect_k", "mtan")
GAPS = (("shared_bottom", "mmoe"), ("omoe", "mmoe"), ("cgc", "mmoe"), ("ple", "mmoe"),
        ("dselect_k", "mmoe"), ("mtan", "mmoe"))
# Width-matched models: the layer widths as a function of the one width H searched
# (and of MMoE's towers, config.model.mmoe.tower: the independent networks' depth).
_SHAPES = {"shared_bottom": lambda h, tower: (h,),
           "independent": lambda h, tower: (h,) + tuple(tower),
           "cgc": lambda h, tower: (h,), "ple": lambda h, tower: (h,),
           "dselect_k": lambda h, tower: (h,), "mtan": lambda h, tower: (h,)}
_DIM = builders.MmoeSyntheticConfig(name="p1").dim  # the generator's input dimension
_TASKS = tasks_lib.TaskSet((tasks_lib.Task("y1", "regression"),
                            tasks_lib.Task("y2", "regression")))


def parameter_count(config, model: str, hidden) -> int:
  """Parameters of ``model`` with these hidden widths on the sweep's inputs
  (every other model setting from ``config.model``)."""
  c = ml_collections.ConfigDict({"model": config.model.to_dict()})
  c.model.arch, c.model.encoder, c.model.hidden = model, "mlp", tuple(hidden)
  m = build.model_from_config(c, _TASKS, (_DIM,))
  return params_lib.count(jax.eval_shape(m.init, jax.random.key(0)))


def model_sizes(config) -> dict:
  """``{model: {"hidden", "parameters"}}``: MMoE and OMoE with the configured
  experts; the shared bottom's width, the independent networks' first width
  (``100 -> H -> 8 -> 1`` per task, the towers' depth), the expert width of
  CGC / PLE / DSelect-k (their expert counts from ``config.model``) and MTAN's
  trunk width chosen so their parameter count is the closest to MMoE's
  (``sweep.match_parameters``; else the fixed widths)."""
  s = config.sweep
  out = {m: {"hidden": list(s.expert_hidden)} for m in ("mmoe", "omoe")}
  target = parameter_count(config, "mmoe", s.expert_hidden)
  shapes = {m: lambda h, f=f: f(h, config.model.mmoe.tower) for m, f in _SHAPES.items()}
  fixed = {"shared_bottom": s.bottom_hidden, "independent": s.independent_hidden,
           "cgc": s.expert_hidden, "ple": s.expert_hidden, "dselect_k": s.expert_hidden,
           "mtan": s.bottom_hidden}
  for m, shape in shapes.items():
    if s.match_parameters:
      best, count = _matched_width(lambda h: parameter_count(config, m, shape(h)), target)
      out[m] = {"hidden": list(shape(best)), "parameters": count}
    else:
      out[m] = {"hidden": list(fixed[m])}
  for m in out:
    out[m].setdefault("parameters", parameter_count(config, m, out[m]["hidden"]))
  return out


def _matched_width(count: Callable[[int], int], target: int, max_width: int = 4096
                   ) -> tuple[int, int]:
  """``(h, count(h))`` with ``count(h)`` closest to ``target`` over ``1 <= h <=
  max_width`` (the smaller ``h`` on a tie). Every layer of these models has
  ``in * out + out`` parameters and the width enters at most two consecutive
  layers, so ``count`` is a quadratic in ``h``: it is read at h = 1, 2, 3 and
  the quadratic's exact integer values are searched (three model traces
  instead of a bisection's twelve). The chosen width is traced once more, and
  a count that is not the quadratic's is an error, not a silent fallback."""
  f1, f2, f3 = count(1), count(2), count(3)
  a2 = f3 - 2 * f2 + f1                         # 2a
  if a2 % 2:
    raise ValueError(f"parameter counts {f1}, {f2}, {f3} at widths 1-3 are not a quadratic "
                     "with integer coefficients")
  a = a2 // 2
  b = f2 - f1 - 3 * a
  c = f1 - a - b
  h = np.arange(1, max_width + 1, dtype=np.int64)
  best = int(h[np.argmin(np.abs(a * h * h + b * h + c - target))])
  got = count(best)
  if got != a * best * best + b * best + c:
    raise ValueError(f"parameter count at width {best} is {got}, not the quadratic's "
                     f"{a * best * best + b * best + c}: the width enters the model "
                     "other than through two consecutive layers")
  return best, got


def model_config(config, model: str, p: float, data_seed: int, hidden,
                 lr: float | None = None) -> ml_collections.ConfigDict:
  """One (p, data set, model) run: ``config.num_seeds`` initialisation seeds
  ``config.seed, ...`` as one vmapped program on data set ``data_seed``."""
  s = config.sweep
  c = common.run_config(config, "sweep")
  sines = f"_a{s.sines_seed}" if s.sines_seed >= 0 else ""
  c.data.builder_config = f"p{p:g}_n{s.num_train}_m{s.num_test}_s{data_seed}{sines}"
  c.model.arch = model
  c.model.hidden = tuple(hidden)
  if lr is not None:
    c.optim.lr = lr
  return c


def choose_lr(config, model: str, p: float, hidden) -> dict:
  """The learning rate of ``sweep.lrs`` with the lowest validation MSE,
  cross-validated (``sweep.cv_folds`` folds of the first data set's train
  split, one seed per fold; :mod:`mtljax.cv`)."""
  c = model_config(config, model, p, config.sweep.data_seeds[0], hidden)
  c.cv.folds = config.sweep.cv_folds
  c.cv.lr = tuple(config.sweep.lrs)
  c.cv.steps = (config.total_steps,)
  c.cv.metric = "mse"
  data = build.data_from_config(c)
  sel = cv_lib.cross_validate(c, dataclasses.replace(data, test=None))
  scores = {str(pt["lr"]): pt["score"] for pt in sel["points"]}
  return {"lr": sel["best"]["lr"], "validation_mse": scores}


def _curves(run_dir: str, num_seeds: int) -> tuple[list[int], np.ndarray]:
  """Steps and training loss ``[seeds, steps]`` from a run's metrics.jsonl."""
  with open(os.path.join(run_dir, workdir_lib.METRICS_FILE)) as f:
    rows = [json.loads(line) for line in f]
  rows = [r for r in rows if "train/loss" in r]
  per = [r["per_seed"]["train/loss"] if num_seeds > 1 else [r["train/loss"]] for r in rows]
  return [r["step"] for r in rows], np.asarray(per, np.float64).T


def _test_mse(out) -> list[float]:
  """Test MSE (mean of the two tasks, original units) per initialisation seed."""
  seeds = out["per_seed"]["tasks"] if "per_seed" in out else [out["tasks"]]
  return [float(np.mean([m["mse"] for m in tasks.values()])) for tasks in seeds]


def paired_gap(a, b) -> list[float]:
  """``[mean, standard error]`` of ``a - b`` over paired repetitions."""
  return list(train.mean_se(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


def run(config, workdir: str) -> dict:
  """For each p and model: a learning rate by cross-validation, then
  ``len(sweep.data_seeds) x num_seeds`` repetitions (data set d, init seed s;
  the same pairs for every model). Writes ``sweep.json``, ``summary.json``,
  ``mmoe_sweep.png``."""
  s = config.sweep
  os.makedirs(workdir, exist_ok=True)
  common.check_names("sweep.models", s.models, MODELS)
  if not s.data_seeds:
    raise errors.ConfigError("config.sweep.data_seeds is empty.")
  sizes = model_sizes(config)
  for m in s.models:
    logger.info("%s: hidden %s, %d parameters", m, sizes[m]["hidden"], sizes[m]["parameters"])
  sweep, lrs, gaps = {}, {}, {}
  for p in s.correlations:
    key = str(float(p))
    sweep[key], lrs[key] = {}, {}
    for model in s.models:
      hidden = sizes[model]["hidden"]
      lrs[key][model] = (choose_lr(config, model, p, hidden) if len(s.lrs) > 1
                         else {"lr": float(s.lrs[0]), "validation_mse": {}})
      lr = lrs[key][model]["lr"]
      finals, tests, curves, steps = [], [], [], None
      for data_seed in s.data_seeds:
        run_dir = os.path.join(workdir, f"p{key}", f"data{data_seed}", model)
        out = train.train_and_evaluate(model_config(config, model, p, data_seed, hidden, lr),
                                       run_dir)
        steps, curve = _curves(run_dir, config.num_seeds)
        curves.append(curve)
        finals.extend(curve[:, -1].tolist())
        tests.extend(_test_mse(out))
      mean, se = zip(*(train.mean_se(col) for col in np.concatenate(curves).T))
      sweep[key][model] = {"train_loss_final": finals,
                           "train_loss_curve": {"steps": steps, "mean": list(mean),
                                                "se": list(se)},
                           "test_mse": tests}
      logger.info("p=%s %s (lr %g): final train loss %.4f +- %.4f, test MSE %.4f +- %.4f "
                  "over %d repetitions", key, model, lr, *train.mean_se(finals),
                  *train.mean_se(tests), len(tests))
    gaps[key] = {f"{a} - {b}": {
        metric: paired_gap(sweep[key][a][metric], sweep[key][b][metric])
        for metric in ("train_loss_final", "test_mse")}
                 for a, b in GAPS if a in sweep[key] and b in sweep[key]}
  common.write_json(workdir, "sweep.json", sweep)
  alpha, beta = (generators.mmoe_sines(s.sines_seed) if s.sines_seed >= 0 else (None, None))
  summary = {
      "sweep": sweep, "paired_gaps": gaps, "learning_rates": lrs, "sizes": sizes,
      "repetitions": len(s.data_seeds) * config.num_seeds,
      "data_seeds": list(s.data_seeds), "num_seeds": config.num_seeds,
      "sines": {"seed": s.sines_seed,
                "alpha": None if alpha is None else alpha.tolist(),
                "beta": None if beta is None else beta.tolist()},
      "metrics": "train_loss: the training objective (sum of the two tasks' MSE on "
                 "per-task standardised labels), mean over each logged call; test_mse: "
                 "mean of the two tasks' test MSE in original units; paired_gaps: "
                 "[mean, standard error] of the difference over repetitions paired on "
                 "data set and initialisation seed",
      "config": config.to_dict()}
  common.write_json(workdir, "summary.json", summary)
  _plot(sweep, os.path.join(workdir, "mmoe_sweep.png"))
  return summary


def _plot(sweep, path):
  ps = sorted(sweep, key=float, reverse=True)
  with plotting.figure(path, ncols=len(ps), figsize=(3.2 * len(ps), 3.4)) as (_, axes):
    axes = axes if isinstance(axes, list) else [axes]
    for ax, p in zip(axes, ps):
      for model, res in sweep[p].items():
        c = res["train_loss_curve"]
        mean, se = np.asarray(c["mean"]), np.nan_to_num(np.asarray(c["se"]))
        (line,) = ax.plot(c["steps"], mean, label=model)
        ax.fill_between(c["steps"], mean - se, mean + se, color=line.get_color(), alpha=0.25)
      ax.set_title(f"correlation {p}")
      ax.set_xlabel("training step")
      ax.set_yscale("log")  # the first steps' loss is 30x the last
    axes[0].set_ylabel("training loss, mean +- s.e.")
    axes[0].legend(fontsize="small")
