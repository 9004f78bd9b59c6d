"""The exam experiment (see experiments/configs/exam.py)."""

from __future__ import annotations

import logging
import os

import ml_collections
import numpy as np

from experiments import common
from mtljax import build
from mtljax import cv
from mtljax import plotting
from mtljax import train

logger = logging.getLogger("mtljax")
APPROACHES = ("pooled", "independent", "soft")


def approach_config(config, approach: str, seed: int) -> ml_collections.ConfigDict:
  c = common.run_config(config, "exam")
  c.data.builder_config = f"s{seed}"
  c.seed = seed
  if approach == "pooled":
    c.model.arch, c.model.heads = "multi_head", "shared"  # one network, no school id
  elif approach == "independent":
    c.model.arch = "independent"
  else:
    c.model.arch = "soft"
    c.cv.folds = config.exam.cv_folds
    c.cv.grid = "model.soft.lambda_=" + ",".join(f"{v:g}" for v in config.exam.soft_lambdas)
  return c


def held_out_mse(summary: dict, test_counts) -> tuple[float, float]:
  """(mean over schools, pooled over held-out students)."""
  mses = np.array([m["mse"] for m in summary["tasks"].values()])
  counts = np.asarray(test_counts, np.float64)
  keep = counts > 0
  return float(mses[keep].mean()), float((mses * counts).sum() / counts.sum())


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  common.check_names("exam.approaches", config.exam.approaches, APPROACHES)
  results = {a: [] for a in config.exam.approaches}
  by_student = {a: [] for a in config.exam.approaches}
  chosen = []
  for seed in config.exam.seeds:
    # The split depends on the seed only: its per-school test counts, read once.
    test_counts = build.data_from_config(approach_config(config, "pooled", seed)).test["n"]
    for approach in config.exam.approaches:
      c = approach_config(config, approach, seed)
      out_dir = os.path.join(workdir, f"seed{seed}", approach)
      if approach == "soft":
        out = cv.select_and_train(c, out_dir)
        chosen.append(out["cv"]["best"]["overrides"]["model.soft.lambda_"])
        summary = out["final"]
      else:
        summary = train.train_and_evaluate(c, out_dir)
      per_school, per_student = held_out_mse(summary, test_counts)
      results[approach].append(per_school)
      by_student[approach].append(per_student)
      logger.info("seed %d %s: held-out MSE %.4f (mean over schools), %.4f (students)",
                  seed, approach, per_school, per_student)
  summary = {"results": results, "results_pooled_over_students": by_student,
             "soft_lambda_chosen": chosen,
             "metric": "held-out MSE of normexam, per seed (lower is better)",
             "config": config.to_dict()}
  common.write_json(workdir, "summary.json", summary)
  _plot(results, os.path.join(workdir, "exam.png"))
  return summary


def _plot(results, path):
  with plotting.figure(path) as (_, ax):
    names = list(results)
    ax.bar(range(len(names)), [np.mean(results[a]) for a in names], color="lightgray")
    for i, a in enumerate(names):
      ax.scatter([i] * len(results[a]), results[a], color="k", zorder=3)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("held-out MSE (mean over schools)")
