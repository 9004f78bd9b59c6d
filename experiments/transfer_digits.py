"""The transfer_digits experiment (see experiments/configs/transfer_digits.py)."""

from __future__ import annotations

import dataclasses
import logging
import os

import ml_collections

from experiments import common
from mtljax import build
from mtljax import checkpoint
from mtljax import cv
from mtljax import plotting
from mtljax import train
from mtljax import transfer

logger = logging.getLogger("mtljax")


def shots_key(shots: int) -> str:
  return str(shots) if shots else "all"


def finetune_config(config, shots: int) -> ml_collections.ConfigDict:
  """The target task's run: digits ``target_classes`` with ``shots`` per class."""
  t = config.transfer
  c = common.run_config(config, "transfer")
  c.data.name = "digits"
  c.data.builder_config = (f"c{t.target_classes}_k{shots}_s{t.shots_seed}" if shots
                           else f"c{t.target_classes}") + ("_canvas" if t.canvas else "")
  c.total_steps = t.finetune_steps
  for key in ("log_steps", "eval_steps", "checkpoint_steps", "steps_per_call"):
    c[key] = min(c[key], t.finetune_steps)
  c.eval_steps = c.checkpoint_steps = t.finetune_steps
  return c


def run_strategy(base, strategy: str, source: str, workdir: str, probe_steps: int,
                 head_lr_mult: float = 1.0, l2sp=None) -> dict:
  """One strategy's fine-tuning run(s); returns the final summary (``l2sp``:
  ``(alpha, beta)`` for the ``l2sp`` strategy)."""
  if strategy == "scratch":
    c = transfer.apply_strategy(base, "scratch", source=source)
    return train.train_and_evaluate(c, workdir)
  if strategy == "lp_ft":
    probe_dir = os.path.join(workdir, "probe")
    probe, ft = transfer.lp_ft_stages(base, source=source, probe_workdir=probe_dir,
                                      probe_steps=probe_steps, head_lr_mult=head_lr_mult)
    train.train_and_evaluate(probe, probe_dir)
    return train.train_and_evaluate(ft, os.path.join(workdir, "finetune"))
  c = transfer.apply_strategy(base, strategy, source=source, head_lr_mult=head_lr_mult)
  if strategy == "l2sp" and l2sp is not None:
    c.l2sp_alpha, c.l2sp_beta = l2sp
  return train.train_and_evaluate(c, workdir)


def choose_l2sp(base, source: str, t) -> dict:
  """L2-SP's ``alpha``, ``beta`` by ``t.l2sp_cv_folds``-fold cross-validation
  over ``t.l2sp_cv_grid`` on the target's train images (validation loss after
  the fine-tuning budget); the test images are not read."""
  c = transfer.l2sp_cv_config(
      transfer.apply_strategy(base, "l2sp", source=source, head_lr_mult=t.head_lr_mult),
      folds=t.l2sp_cv_folds, grid=t.l2sp_cv_grid, metric="loss")
  data = build.data_from_config(c)
  sel = cv.cross_validate(c, dataclasses.replace(data, test=None))
  best = {"l2sp_alpha": c.l2sp_alpha, "l2sp_beta": c.l2sp_beta, **sel["best"]["overrides"]}
  return {"alpha": float(best["l2sp_alpha"]), "beta": float(best["l2sp_beta"]),
          "points": [{**p["overrides"], "score": p["score"]} for p in sel["points"]]}


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  t = config.transfer
  common.check_names("transfer.strategies", t.strategies, transfer.STRATEGIES)
  pre_config = common.run_config(config, "transfer")
  pre_dir = os.path.join(workdir, "pretrain")
  pre = train.train_and_evaluate(pre_config, pre_dir)
  logger.info("pretrained on %s/%s: %s", config.data.name, config.data.builder_config,
              pre["tasks"])
  source, _ = checkpoint.read_params(pre_dir)
  results = {s: {} for s in t.strategies}
  distance = {s: {} for s in t.strategies if s != "scratch"}
  l2sp_cv = {}
  for shots in t.shots:
    base = finetune_config(config, shots)
    key = shots_key(shots)
    chosen = None
    if "l2sp" in t.strategies and t.l2sp_cv_folds:
      base.optim.lr = t.finetune_lr
      l2sp_cv[key] = choose_l2sp(base, pre_dir, t)
      chosen = (l2sp_cv[key]["alpha"], l2sp_cv[key]["beta"])
      logger.info("shots %s: L2-SP by %d-fold CV: alpha %g, beta %g", key, t.l2sp_cv_folds,
                  *chosen)
    for strategy in t.strategies:
      # Training from scratch keeps pretraining's learning rate; fine-tuning uses
      # the smaller one.
      base.optim.lr = config.optim.lr if strategy == "scratch" else t.finetune_lr
      run_dir = os.path.join(workdir, f"shots_{key}", strategy)
      out = run_strategy(base, strategy, pre_dir, run_dir, t.probe_steps, t.head_lr_mult,
                         chosen)
      acc = out["tasks"]["digit"]["accuracy"]
      results[strategy][key] = acc
      if strategy != "scratch":
        final, _ = checkpoint.read_params(
            os.path.join(run_dir, "finetune") if strategy == "lp_ft" else run_dir)
        distance[strategy][key] = transfer.body_distance(final, source)
      logger.info("shots %s, %s: test accuracy %.4f", key, strategy, acc)
  summary = {"results": results, "metric": "test accuracy on digits "
             f"{t.target_classes} (higher is better)", "source": t.source,
             "distance": distance, "l2sp_cv": l2sp_cv,
             "pretrain": pre["tasks"], "config": config.to_dict()}
  common.write_json(workdir, "summary.json", summary)
  _plot(results, os.path.join(workdir, "transfer_digits.png"))
  return summary


def _plot(results: dict, path: str) -> None:
  with plotting.figure(path, figsize=(6, 4)) as (_, ax):
    for strategy, by_shots in results.items():
      keys = list(by_shots)
      ax.plot(range(len(keys)), [by_shots[k] for k in keys], marker="o", label=strategy)
      ax.set_xticks(range(len(keys)), keys)
    ax.set_xlabel("train images per class")
    ax.set_ylabel("test accuracy (digits 5-9)")
    ax.legend(fontsize=7)
