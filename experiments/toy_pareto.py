"""Runs the Pareto toy for a config (see experiments/configs/toy_pareto.py)."""

import logging
import os
import time

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from experiments import common
from mtljax import plotting
from mtljax import toy

logger = logging.getLogger("mtljax")


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  t = config.toy
  results, summary = {}, {"protocol": t.protocol, "steps": t.steps, "methods": {}}
  for method in t.methods:
    t0 = time.perf_counter()
    r = toy.run(method, t.starts, t.steps, scale=t.scale, lr=t.lr,
                record_every=t.record_every, seed=config.seed, cagrad_c=t.cagrad_c,
                cagrad_rescale=t.cagrad_rescale, famo_gamma=t.famo_gamma)
    dist = toy.distance_to_pareto_set(r["final"])
    results[method] = [
        {"start": list(map(float, s)), "path": r["path"][i].tolist(),
         "final": r["final"][i].tolist(), "final_losses": r["final_losses"][i].tolist()}
        for i, s in enumerate(t.starts)]
    summary["methods"][method] = {
        "distance_to_pareto_set": dist.tolist(),
        "mean_distance_to_pareto_set": float(dist.mean()),
        "solver_failures": r["solver_failures"].tolist(),
        "seconds": time.perf_counter() - t0}
    logger.info("%-12s mean distance to the Pareto set %.3f, solver failures %s (%.1fs)",
                method, dist.mean(), r["solver_failures"].tolist(),
                time.perf_counter() - t0)
  common.write_json(workdir, "trajectories.json", results)
  common.write_json(workdir, "summary.json", summary)
  plot(results, t.scale, os.path.join(workdir, "toy_pareto.png"))
  return summary


def plot(results: dict, scale: float, path: str) -> None:
  """Trajectories over the contours of the mean loss with the Pareto set, and the
  final points in loss space with the Pareto front."""
  import jax  # pylint: disable=g-import-not-at-top
  n = 200
  grid = np.linspace(-10, 10, n)
  xx, yy = np.meshgrid(grid, grid)
  pts = np.stack([xx.ravel(), yy.ravel()], 1)
  f = np.asarray(jax.vmap(lambda x: toy.losses(x, scale))(pts)).reshape(n, n, 2)
  front_x = np.stack([np.linspace(*toy.PARETO_X1, 200), np.full(200, toy.PARETO_X2)], 1)
  front_f = np.asarray(jax.vmap(lambda x: toy.losses(x, scale))(front_x))
  colors = plotting.task_colors(len(results))
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 6.5))
  a1.contour(xx, yy, f.mean(axis=2), levels=25, cmap="viridis", linewidths=0.8)
  a1.plot(front_x[:, 0], front_x[:, 1], color="gray", linewidth=6, alpha=0.6,
          label="Pareto set")
  a2.plot(front_f[:, 0], front_f[:, 1], color="gray", linewidth=4, alpha=0.6,
          label="Pareto front")
  for k, (method, runs) in enumerate(results.items()):
    for i, r in enumerate(runs):
      p = np.asarray(r["path"])
      a1.plot(p[:, 0], p[:, 1], color=colors[k], linewidth=1.2,
              label=method if i == 0 else None)
      a1.plot(*r["final"], "o", color=colors[k], markersize=4)
      a2.plot(*r["final_losses"], "o", color=colors[k], markersize=6,
              label=method if i == 0 else None)
    for r in runs:
      a1.plot(*r["start"], "k^", markersize=8)
  a1.set(xlim=(-10, 10), ylim=(-10, 10), xlabel="x1", ylabel="x2",
         title="trajectories over mean-loss contours")
  a2.set(xlabel=f"L1 (x{scale:g})", ylabel="L2", title="final losses")
  a1.legend(fontsize=8, loc="upper center", ncol=3)
  a2.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
