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


def model_config(config, model: str, p: float, seed: int) -> ml_collections.ConfigDict:
  s = config.sweep
  c = common.run_config(config, "sweep")
  c.data.builder_config = f"p{p:g}_n{s.num_train}_m{s.num_test}_s{seed}"
  c.seed = seed
  c.model.arch = model
  c.model.hidden = {"shared_bottom": s.bottom_hidden, "independent": s.independent_hidden
                    }.get(model, s.expert_hidden)
  return c


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  common.check_names("sweep.models", config.sweep.models, MODELS)
  sweep, per_task = {}, {}
  for p in config.sweep.correlations:
    key = f"{p:g}"
    sweep[key] = {m: [] for m in config.sweep.models}
    per_task[key] = {m: [] for m in config.sweep.models}
    for seed in config.sweep.seeds:
      for model in config.sweep.models:
        out = train.train_and_evaluate(model_config(config, model, p, seed),
                                       os.path.join(workdir, f"p{key}", f"seed{seed}", model))
        mses = {t: m["mse"] for t, m in out["tasks"].items()}
        sweep[key][model].append(float(np.mean(list(mses.values()))))
        per_task[key][model].append(mses)
        logger.info("p=%s seed %d %s: test MSE %s", key, seed, model, mses)
  common.write_json(workdir, "sweep.json", sweep)
  summary = {"sweep": sweep, "per_task": per_task,
             "metric": "test MSE, original units (lower is better)",
             "config": config.to_dict()}
  common.write_json(workdir, "summary.json", summary)
  _plot(sweep, os.path.join(workdir, "mmoe_sweep.png"))
  return summary


def _plot(sweep, path):
  ps = sorted(sweep, key=float, reverse=True)
  with plotting.figure(path) as (_, ax):
    for model in next(iter(sweep.values())):
      mean = [np.mean(sweep[p][model]) for p in ps]
      spread = [np.std(sweep[p][model]) for p in ps]
      ax.errorbar([float(p) for p in ps], mean, yerr=spread, marker="o", capsize=3,
                  label=model)
    ax.set_xlabel("task correlation p")
    ax.set_ylabel("test MSE (mean of the two tasks)")
    ax.invert_xaxis()
    ax.legend()
