"""Every architecture vs single-task baselines (experiments/configs/multi_digits_archs.py)."""

from __future__ import annotations

import json
import logging
import os


from experiments import common
from mtljax import measure
from mtljax import plotting
from mtljax import train
from mtljax.models import multitask

logger = logging.getLogger("mtljax")


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  common.check_names("archs", config.archs, multitask.archs())
  out = {"delta_m": {}, "per_task": {}, "tasks": {}, "train_metrics": {}, "curves": {}}
  for arch in config.archs:
    c = common.run_config(config, "archs")
    c.model.arch = arch
    run_dir = os.path.join(workdir, arch)
    summary = train.train_and_evaluate(c, run_dir)
    out["delta_m"][arch] = summary["delta_m"]["value"]
    out["per_task"][arch] = summary["delta_m"]["per_task"]
    out["tasks"][arch] = summary["tasks"]
    out["train_metrics"][arch] = summary["train_metrics"]
    out["curves"][arch] = _curves(os.path.join(run_dir, "metrics.jsonl"))
    out["baselines"] = summary["delta_m"]["baselines"]
    logger.info("%s: Delta_m %+.2f%%", arch, out["delta_m"][arch])
  out["convention"] = measure.DELTA_M_CONVENTION
  out["config"] = config.to_dict()
  common.write_json(workdir, "summary.json", out)
  _plot(out, os.path.join(workdir, "archs.png"))
  return out


def _curves(path):
  """{task: {"step": [...], "train": [...], "test": [...]}} of accuracy."""
  curves = {}
  with open(path) as f:
    for line in f:
      rec = json.loads(line)
      for key, value in rec.items():
        if key.startswith("eval/") and key.endswith("/accuracy"):
          task = key.split("/")[1]
          c = curves.setdefault(task, {"step": [], "train": [], "test": []})
          c["step"].append(rec["step"])
          c["test"].append(value)
          c["train"].append(rec.get(f"train_eval/{task}/accuracy"))
  return curves


def _plot(out, path):
  archs = list(out["delta_m"])
  with plotting.figure(path, ncols=2, figsize=(12, 4)) as (_, axes):
    _draw(out, archs, axes)


def _draw(out, archs, axes):
  axes[0].bar(range(len(archs)), [out["delta_m"][a] for a in archs])
  axes[0].axhline(0, color="k", lw=0.5)
  axes[0].set_xticks(range(len(archs)), archs, rotation=45, ha="right")
  axes[0].set_ylabel("Delta_m % vs single-task (positive = better)")
  for a in archs:
    for task, c in out["curves"][a].items():
      line, = axes[1].plot(c["step"], c["test"], label=f"{a}/{task} test")
      axes[1].plot(c["step"], c["train"], ls="--", color=line.get_color())
  axes[1].set_xlabel("step")
  axes[1].set_ylabel("accuracy (solid test, dashed train)")
  axes[1].legend(fontsize=5, ncol=2)
