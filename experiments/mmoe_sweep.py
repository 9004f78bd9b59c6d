"""The MMoE correlation sweep (see experiments/configs/mmoe_sweep.py)."""

from __future__ import annotations

import logging
import os

import ml_collections
import numpy as np

from experiments import common
from mtljax import plotting
from mtljax import train

logger = logging.getLogger("mtljax")
MODELS = ("shared_bottom", "omoe", "mmoe", "independent")


def model_config(config, model: str, p: float, data_seed: int) -> ml_collections.ConfigDict:
  """One (p, data set, model) run: ``config.num_seeds`` initialisation seeds
  ``config.seed, ...`` as one vmapped program on the data set ``data_seed``."""
  s = config.sweep
  c = common.run_config(config, "sweep")
  c.data.builder_config = f"p{p:g}_n{s.num_train}_m{s.num_test}_s{data_seed}"
  c.model.arch = model
  c.model.hidden = {"shared_bottom": s.bottom_hidden, "independent": s.independent_hidden
                    }.get(model, s.expert_hidden)
  return c


def _per_seed_mse(out) -> list[dict]:
  """``[{task: test MSE}]``, one per initialisation seed."""
  seeds = out["per_seed"]["tasks"] if "per_seed" in out else [out["tasks"]]
  return [{t: m["mse"] for t, m in tasks.items()} for tasks in seeds]


def run(config, workdir: str) -> dict:
  """For each p, data set and model: ``config.num_seeds`` seeds in one program.
  ``sweep.json``: ``{p: {model: [test MSE (mean of the two tasks) per run]}}``,
  runs ordered data set by data set, seed by seed."""
  os.makedirs(workdir, exist_ok=True)
  common.check_names("sweep.models", config.sweep.models, MODELS)
  sweep, per_task, table = {}, {}, {}
  for p in config.sweep.correlations:
    key = f"{p:g}"
    sweep[key] = {m: [] for m in config.sweep.models}
    per_task[key] = {m: [] for m in config.sweep.models}
    table[key] = {m: {"by_data_seed": {}} for m in config.sweep.models}
    for data_seed in config.sweep.data_seeds:
      for model in config.sweep.models:
        out = train.train_and_evaluate(
            model_config(config, model, p, data_seed),
            os.path.join(workdir, f"p{key}", f"data{data_seed}", model))
        runs = _per_seed_mse(out)
        means = [float(np.mean(list(r.values()))) for r in runs]
        sweep[key][model].extend(means)
        per_task[key][model].extend(runs)
        table[key][model]["by_data_seed"][str(data_seed)] = train.mean_se(means)
        logger.info("p=%s data %d %s: test MSE %.4f +- %.4f over %d seeds", key, data_seed,
                    model, *train.mean_se(means), len(means))
    for model in config.sweep.models:
      table[key][model]["all"] = train.mean_se(sweep[key][model])
  common.write_json(workdir, "sweep.json", sweep)
  summary = {"sweep": sweep, "per_task": per_task, "mean_se": table,
             "data_seeds": list(config.sweep.data_seeds), "num_seeds": config.num_seeds,
             "metric": "test MSE, original units (lower is better); mean_se: "
                       "[mean, standard error] over runs",
             "config": config.to_dict()}
  common.write_json(workdir, "summary.json", summary)
  _plot(sweep, os.path.join(workdir, "mmoe_sweep.png"))
  return summary


def _plot(sweep, path):
  ps = sorted(sweep, key=float, reverse=True)
  with plotting.figure(path) as (_, ax):
    for model in next(iter(sweep.values())):
      stats = [train.mean_se(sweep[p][model]) for p in ps]
      ax.errorbar([float(p) for p in ps], [m for m, _ in stats],
                  yerr=[0.0 if np.isnan(e) else e for _, e in stats], marker="o", capsize=3,
                  label=model)
    ax.set_xlabel("task correlation p")
    ax.set_ylabel("test MSE (mean of the two tasks), mean +- s.e. over runs")
    ax.invert_xaxis()
    ax.legend()
