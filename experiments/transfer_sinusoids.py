"""The transfer_sinusoids experiment (see experiments/configs/transfer_sinusoids.py)."""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import ml_collections
import numpy as np

from experiments import common
from mtljax import build
from mtljax import checkpoint
from mtljax import cv
from mtljax import optim
from mtljax import plotting
from mtljax import sharding
from mtljax import steps as steps_lib
from mtljax import train
from mtljax import transfer

logger = logging.getLogger("mtljax")


def target_config(config, k: int) -> ml_collections.ConfigDict:
  t = config.transfer
  c = common.run_config(config, "transfer")
  c.data.builder_config = f"t{t.target_tasks}_n{k}_m100_s{t.target_seed}"
  c.model.arch, c.model.heads = "independent", "per_task"
  c.sampling.tasks_per_step = 0  # every new task, every step
  c.sampling.examples_per_task = t.batch_mult * k
  c.optim.lr = t.finetune_lr
  c.total_steps = t.record_steps
  c.steps_per_call = c.log_steps = c.eval_steps = c.checkpoint_steps = 1
  return c


def mse_curve(config, data, steps: int, init_state=None) -> tuple[list[float], dict]:
  """Test MSE (mean over tasks) on ``data`` before and after each of ``steps``
  steps, and the final state. ``init_state(run) -> state`` replaces the run's
  initial state."""
  if data.readers is not None:
    raise ValueError("transfer_sinusoids records curves on data held on the device: set "
                     "config.data.pipeline='device'.")
  run = build.build_run(config, data)
  state = run.state if init_state is None else init_state(run)
  pl, n = run.placement, len(data.taskset)
  train_sh, test_sh = pl.data(data.train, n), pl.data(data.test, n)
  state = sharding.place(state, run.state_shardings)
  step = sharding.jit_train_step(run.train_fn, run.state_shardings, train_sh, pl)
  evaluate = sharding.jit_eval_step(run.eval_fn, run.state_shardings.params, test_sh, pl,
                                    run.state_shardings.model_state)
  train_data, test_data = sharding.place(data.train, train_sh), sharding.place(data.test, test_sh)
  curve = []
  for i in range(steps + 1):
    metrics = steps_lib.eval_metrics(data.taskset, evaluate(state.params, test_data,
                                                            state.model_state))
    curve.append(float(np.mean([m["mse"] for m in metrics.values()])))
    if i < steps:
      state, _ = step(state, train_data)
  return curve, state


def choose_l2sp(base, data, source: str, t) -> dict:
  """L2-SP's ``alpha``, ``beta`` by ``t.l2sp_cv_folds``-fold cross-validation
  over ``t.l2sp_cv_grid`` on the new tasks' train points (validation MSE after
  the fine-tuning budget); the test points are not read."""
  c = transfer.l2sp_cv_config(transfer.apply_strategy(base, "l2sp", source=source),
                              folds=t.l2sp_cv_folds, grid=t.l2sp_cv_grid, metric="mse")
  sel = cv.cross_validate(c, dataclasses.replace(data, test=None))
  best = {"l2sp_alpha": c.l2sp_alpha, "l2sp_beta": c.l2sp_beta, **sel["best"]["overrides"]}
  return {"alpha": float(best["l2sp_alpha"]), "beta": float(best["l2sp_beta"]),
          "points": [{**p["overrides"], "score": p["score"]} for p in sel["points"]]}


def strategy_curve(base, data, strategy: str, source: str, probe_steps: int,
                   l2sp=None) -> tuple[list, dict]:
  """The strategy's test-MSE curve and final state (``l2sp``: ``(alpha, beta)``
  for the ``l2sp`` strategy)."""
  steps = base.total_steps
  if strategy == "lp_ft":  # probe for probe_steps, then fine-tune everything: one curve
    probe = transfer.apply_strategy(base, "lp_ft", source=source)
    head, probe_state = mse_curve(probe, data, probe_steps)
    ft = transfer.apply_strategy(base, "full_ft", source=source)
    params = probe_state.params

    def from_probe(run):  # the probed head and body, fresh optimizer state
      return run.state._replace(
          params=params,
          opt_state=optim.init_state(run.tx, params,
                                     steps_lib.task_rows(run.model, run.objective)))
    tail, state = mse_curve(ft, data, steps - probe_steps, from_probe)
    return head + tail[1:], state
  c = transfer.apply_strategy(base, strategy, source=source,
                              unfreeze_every=max(1, steps // 4))
  if strategy == "l2sp" and l2sp is not None:
    c.l2sp_alpha, c.l2sp_beta = l2sp
  return mse_curve(c, data, steps)


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  t = config.transfer
  common.check_names("transfer.strategies", t.strategies, transfer.STRATEGIES)
  if not 0 < t.probe_steps < t.record_steps:
    raise ValueError("config.transfer.probe_steps must be in (0, record_steps).")
  pre_config = common.run_config(config, "transfer")
  pre_dir = os.path.join(workdir, "pretrain")
  pre = train.train_and_evaluate(pre_config, pre_dir)
  source, _ = checkpoint.read_params(pre_dir)
  results, distance, l2sp_cv = {}, {}, {}
  for k in t.shots:
    base = target_config(config, k)
    data = build.data_from_config(base)  # the new tasks, shared by every strategy
    results[str(k)], distance[str(k)] = {}, {}
    chosen = None
    if "l2sp" in t.strategies and t.l2sp_cv_folds:
      l2sp_cv[str(k)] = choose_l2sp(base, data, pre_dir, t)
      chosen = (l2sp_cv[str(k)]["alpha"], l2sp_cv[str(k)]["beta"])
      logger.info("K=%d L2-SP by %d-fold CV: alpha %g, beta %g", k, t.l2sp_cv_folds, *chosen)
    for strategy in t.strategies:
      b = ml_collections.ConfigDict(base.to_dict())
      if strategy == "scratch":
        b.optim.lr = config.optim.lr * 10  # from scratch: no reason to be gentle
      curve, state = strategy_curve(b, data, strategy, pre_dir, t.probe_steps, chosen)
      results[str(k)][strategy] = curve
      if strategy != "scratch":
        distance[str(k)][strategy] = transfer.body_distance(
            jax.device_get(state.params), source)
      logger.info("K=%d %s: test MSE %.3f -> %.3f after %d steps", k, strategy, curve[0],
                  curve[-1], len(curve) - 1)
  summary = {"results": results,
             "metric": "test MSE over the new tasks, original units (lower is better), "
                       "after 0, 1, ... fine-tuning steps",
             "distance": distance, "l2sp_cv": l2sp_cv,
             "pretrain": {"mean_mse": float(np.mean([m["mse"] for m in pre["tasks"].values()]))},
             "config": config.to_dict()}
  common.write_json(workdir, "summary.json", summary)
  _plot(results, os.path.join(workdir, "transfer_sinusoids.png"))
  return summary


def _plot(results: dict, path: str) -> None:
  n = len(results)
  with plotting.figure(path, ncols=n, figsize=(5 * n, 4)) as (_, axes):
    axes = axes if n > 1 else [axes]
    for ax, (k, by_strategy) in zip(axes, results.items()):
      for strategy, curve in by_strategy.items():
        ax.plot(range(len(curve)), curve, marker=".", label=strategy)
      ax.set_title(f"K = {k}")
      ax.set_xlabel("fine-tuning steps")
      ax.set_ylabel("query MSE")
      ax.set_yscale("log")
    axes[0].legend(fontsize=7)
