"""The transfer_digits experiment (see experiments/configs/transfer_digits.py)."""

from __future__ import annotations

import logging
import os

import ml_collections

from experiments import common
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
                 head_lr_mult: float = 1.0) -> dict:
  """One strategy's fine-tuning run(s); returns the final summary."""
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
  return train.train_and_evaluate(c, workdir)


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  t = config.transfer
  common.check_names("transfer.strategies", t.strategies, transfer.STRATEGIES)
  pre_config = common.run_config(config, "transfer")
  pre_dir = os.path.join(workdir, "pretrain")
  pre = train.train_and_evaluate(pre_config, pre_dir)
  logger.info("pretrained on %s/%s: %s", config.data.name, config.data.builder_config,
              pre["tasks"])
  results = {s: {} for s in t.strategies}
  for shots in t.shots:
    base = finetune_config(config, shots)
    for strategy in t.strategies:
      # Training from scratch keeps pretraining's learning rate; fine-tuning uses
      # the smaller one.
      base.optim.lr = config.optim.lr if strategy == "scratch" else t.finetune_lr
      out = run_strategy(base, strategy, pre_dir,
                         os.path.join(workdir, f"shots_{shots_key(shots)}", strategy),
                         t.probe_steps, t.head_lr_mult)
      acc = out["tasks"]["digit"]["accuracy"]
      results[strategy][shots_key(shots)] = acc
      logger.info("shots %s, %s: test accuracy %.4f", shots_key(shots), strategy, acc)
  summary = {"results": results, "metric": "test accuracy on digits "
             f"{t.target_classes} (higher is better)", "source": t.source,
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
