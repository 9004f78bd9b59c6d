"""Hyper-parameters by k-fold cross-validation on the training split.

``cross_validate(config, data)`` splits each input source's *training*
examples into ``config.cv.folds`` folds (tasks that read the same inputs share
the split), and for every point of the grid trains on k-1 folds and validates
on the held-out one:

* ``config.cv.lr`` -- learning rates: trained side by side under ``vmap``
  (an update is linear in the learning rate, :func:`mtljax.optim.update`);
* ``config.cv.steps`` -- step counts: read off along each run (one run to the
  largest count, validated at every candidate);
* ``config.cv.grid`` -- any other settings, ``"KEY=V1,V2;KEY=V1,V2"`` over config
  paths (``optim.frozen_depth``, ``optim.layerwise_decay``, ``l2sp_alpha``, ...):
  their cartesian product, one compiled program each (they change shapes or
  the optimizer's structure);
* the folds: also under ``vmap``, so one program trains ``folds x len(lr)``
  models at once.

The selection score is the mean over tasks of validation ``config.cv.metric``
averaged over folds, in its declared direction
(:data:`mtljax.tasks.METRIC_DIRECTIONS`). Regression labels are re-normalised
per fold with the fold's own training statistics. Selection trains one seed
per fold (``config.seed``: the folds are its repetitions); the final run trains
``config.num_seeds`` seeds.

``select_and_train(config, workdir)`` then trains the chosen setting on the whole
training split and evaluates on the test split once. Selection takes a data
object whose ``test`` is ``None``: the test split cannot be read before the
choice is made (tested with a split that raises on any access).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtljax import build
from mtljax import errors
from mtljax import sharding
from mtljax import steps as steps_lib
from mtljax import tasks as tasks_lib
from mtljax import train
from mtljax import workdir as workdir_lib
from mtljax.data import task_data

logger = logging.getLogger("mtljax")

ConfigError = errors.ConfigError  # what the cross-validation config checks raise


# ----------------------------------------------------------------------------
# Folds.
# ----------------------------------------------------------------------------


def fold_assignment(n: int, k: int, seed: int, source: int) -> np.ndarray:
  """``[n]`` fold id of each example: a seeded permutation dealt round-robin,
  so fold sizes differ by at most one. A source with fewer than ``k`` examples
  is never held out (fold id -1): its tasks train on everything in every fold
  and are not scored (a task needs training data in every fold)."""
  if k < 2:
    raise ConfigError(f"config.cv.folds={k} must be >= 2.")
  if n < k:
    return np.full(n, -1, np.int64)
  perm = np.random.default_rng([seed, source]).permutation(n)
  fold = np.empty(n, np.int64)
  fold[perm] = np.arange(n) % k
  return fold


def _pad(a: np.ndarray, n: int) -> np.ndarray:
  out = np.zeros((n,) + a.shape[1:], a.dtype)
  out[:len(a)] = a
  return out


def make_folds(data: task_data.MultiTaskData, k: int, seed: int = 0) -> list[tuple[dict, dict]]:
  """``[(fold_train, fold_val)] * k`` in the train-split layout of
  :mod:`mtljax.data.task_data`, every fold padded to the same shapes; each split
  also carries its ``label_mean``/``label_std`` ``[T]`` (original units)."""
  tr = jax.device_get(data.train)
  ts = data.taskset
  source, n = np.asarray(tr["source"]), np.asarray(tr["n"])
  num_sources = tr["x"].shape[0]
  sizes = {}
  for t in range(len(ts)):
    s = int(source[t])
    if sizes.setdefault(s, int(n[t])) != int(n[t]):
      raise ValueError(f"cross-validation: tasks reading input source {s} have different "
                       "numbers of examples.")
  folds = {s: fold_assignment(sizes[s], k, seed, s) for s in sizes}
  if all((f < 0).all() for f in folds.values()):
    raise ConfigError(f"config.cv.folds={k}: every task has fewer than {k} training "
                      "examples; nothing can be held out.")
  # Raw labels (undo the train split's normalisation) per task.
  raw = {}
  for t, task in enumerate(ts):
    g, row = task.group, ts.local_index[t]
    y = np.asarray(tr["y"][g][row][:n[t]])
    raw[t] = y * data.label_std[t] + data.label_mean[t] if task.kind == "regression" else y
  idx = {(f, part): {s: np.flatnonzero((folds[s] != f) if part == "train" else
                                       (folds[s] == f)) for s in sizes}
         for f in range(k) for part in ("train", "val")}
  width = {part: max(len(i) for f in range(k) for i in idx[(f, part)].values())
           for part in ("train", "val")}
  out = []
  for f in range(k):
    mean = np.zeros(len(ts), np.float32)
    std = np.ones(len(ts), np.float32)
    for t, task in enumerate(ts):
      if task.kind == "regression":
        y = raw[t][idx[(f, "train")][int(source[t])]]
        y = y[np.isfinite(y)]          # missing labels are NaN (tasks.label_mask)
        if y.size:
          mean[t], std[t] = y.mean(), max(float(y.std()), 1e-6)
    pair = []
    for part in ("train", "val"):
      sel = idx[(f, part)]
      x = np.stack([_pad(tr["x"][s][sel[s]] if s in sel else tr["x"][s][:0], width[part])
                    for s in range(num_sources)])
      ys = {}
      for g, yg in tr["y"].items():
        rows = []
        for t in ts.group_members(g):
          y = raw[t][sel[int(source[t])]]
          if ts.tasks[t].kind == "regression":
            y = (y - mean[t]) / std[t]
          rows.append(_pad(np.asarray(y, np.asarray(yg).dtype), width[part]))
        ys[g] = np.stack(rows)
      pair.append({"x": x, "source": source, "y": ys,
                   "n": np.array([len(sel[int(s)]) for s in source], np.int32),
                   "label_mean": mean, "label_std": std})
    out.append(tuple(pair))
  return out


# ----------------------------------------------------------------------------
# The grid.
# ----------------------------------------------------------------------------


def _parse_value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {"true": True, "false": False}.get(text.lower(), text)


def parse_grid(spec: str) -> list[dict[str, Any]]:
  """``"a.b=1,2;c=x,y"`` -> the cartesian product as ``[{path: value}]``."""
  axes = []
  for part in filter(None, (p.strip() for p in spec.split(";"))):
    key, eq, values = part.partition("=")
    if not eq or not values:
      raise ConfigError(f"config.cv.grid: {part!r} is not KEY=V1,V2,...")
    axes.append([(key.strip(), _parse_value(v.strip())) for v in values.split(",")])
  return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def _with_overrides(config, overrides: dict):
  c = ml_collections.ConfigDict(config.to_dict())
  for path, value in overrides.items():
    parent = c
    parts = path.split(".")
    for p in parts[:-1]:
      if p not in parent:
        raise ConfigError(f"config.cv.grid: {path!r} is not a config field.")
      parent = parent[p]
    if parts[-1] not in parent:
      raise ConfigError(f"config.cv.grid: {path!r} is not a config field.")
    old = parent[parts[-1]]
    parent[parts[-1]] = type(old)(value) if isinstance(old, (int, float)) and not \
        isinstance(old, bool) else value
  return c


def _score(ts: tasks_lib.TaskSet, metrics: dict, metric: str, counts) -> float:
  """Mean of ``metric`` over the tasks that have validation examples."""
  vals = [metrics[t.name][metric] for i, t in enumerate(ts)
          if metric in metrics[t.name] and counts[i] > 0]
  if not vals:
    raise ConfigError(f"config.cv.metric={metric!r}: no task reports it; metrics are "
                      f"{sorted({k for m in metrics.values() for k in m})}.")
  return float(np.mean(vals))


# ----------------------------------------------------------------------------
# Cross-validation.
# ----------------------------------------------------------------------------


def cross_validate(config: ml_collections.ConfigDict, data: task_data.MultiTaskData) -> dict:
  """Scores every grid point on k folds of ``data.train`` (``data.test`` is
  never read; pass it as ``None``). Returns ``{"points": [{"overrides",
  "lr", "steps", "score", "fold_scores"}], "best": {...}, "direction"}``."""
  cv = config.cv
  k = int(cv.folds)
  if data.readers is not None:
    raise ConfigError("config.cv: Cross-validation trains every fold x learning rate as one "
                      "vmapped "
                      "program over the train split held on the device; these data came "
                      "through the host pipeline (too large for the device, or "
                      "config.data.pipeline='host'): set config.data.pipeline='device' or "
                      "select hyper-parameters on a subset (config.data.max_train_examples).")
  if cv.metric not in tasks_lib.METRIC_DIRECTIONS:
    raise ConfigError(f"config.cv.metric={cv.metric!r} is not one of "
                      f"{sorted(tasks_lib.METRIC_DIRECTIONS)}.")
  direction = tasks_lib.METRIC_DIRECTIONS[cv.metric]
  lrs = [float(v) for v in (cv.lr or (config.optim.lr,))]
  if any(not v > 0 for v in lrs):
    raise ConfigError(f"config.cv.lr must be positive, got {lrs}.")
  steps = sorted({int(v) for v in (cv.steps or (config.total_steps,))})
  if steps[0] <= 0:
    raise ConfigError(f"config.cv.steps must be positive, got {steps}.")
  grid = parse_grid(cv.grid)
  folds = make_folds(data, k, cv.seed)
  ts = data.taskset
  stack = lambda trees: jax.tree.map(lambda *a: np.stack(a), *trees)
  if config.get("mesh", None) is not None and config.mesh.get("seed", 1) > 1:
    config = _with_overrides(config, {})  # one seed per fold: the seed axis's devices
    config.mesh.seed, config.mesh.data = 1, -1  # go to `data` for the selection
  placement = build.placement_from_config(config)
  fold_train, fold_val = (stack([f[i] for f in folds]) for i in (0, 1))
  train_sh = placement.data(fold_train, len(ts), lead=1)
  val_sh = placement.data(fold_val, len(ts), lead=1)
  fold_train, fold_val = sharding.place(fold_train, train_sh), sharding.place(fold_val, val_sh)
  points = []
  for overrides in grid:
    c = _with_overrides(config, overrides)
    c.num_seeds = 1  # folds are the repetitions here; the final run trains config.num_seeds
    c.total_steps = steps[-1]
    c.steps_per_call = math.gcd(*steps, int(config.steps_per_call))
    c.log_steps = c.eval_steps = c.checkpoint_steps = c.steps_per_call
    fold0 = dataclasses.replace(data, train=folds[0][0], test=folds[0][1])
    run = build.build_run(c, fold0, placement=placement)
    base_lr = float(c.optim.lr)
    state = run.state._replace(hparams={"lr_scale": jnp.asarray(1.0, jnp.float32)})
    # [F, G] copies of the initial state; lr_scale per column.
    states = jax.tree.map(lambda a: jnp.broadcast_to(a, (k, len(lrs)) + a.shape), state)
    states = states._replace(hparams={"lr_scale": jnp.broadcast_to(
        jnp.asarray([v / base_lr for v in lrs], jnp.float32), (k, len(lrs)))})
    state_sh = placement.state(states, lead=2)
    states = sharding.place(states, state_sh)
    step_fn = sharding.jit_train_step(
        jax.vmap(jax.vmap(run.train_fn, in_axes=(0, None)), in_axes=(0, 0)),
        state_sh, train_sh, placement)
    eval_fn = sharding.jit_eval_step(
        jax.vmap(jax.vmap(run.eval_fn, in_axes=(0, None, 0)), in_axes=(0, 0, 0)),
        state_sh.params, val_sh, placement, state_sh.model_state)
    done = 0
    scores = np.zeros((k, len(lrs), len(steps)))
    for si, target in enumerate(steps):
      while done < target:
        states, _ = step_fn(states, fold_train)
        done += c.steps_per_call
      acc = jax.device_get(eval_fn(states.params, fold_val, states.model_state))
      for f in range(k):
        for g in range(len(lrs)):
          one = jax.tree.map(lambda a: a[f, g], acc)
          scores[f, g, si] = _score(ts, steps_lib.eval_metrics(ts, one), cv.metric,
                                    one["count"])
    for g, lr in enumerate(lrs):
      for si, st in enumerate(steps):
        points.append({"overrides": overrides, "lr": lr, "steps": st,
                       "score": float(scores[:, g, si].mean()),
                       "fold_scores": scores[:, g, si].tolist()})
    logger.info("cv %s: mean validation %s over %d folds, [lr x steps] =\n%s", overrides,
                cv.metric, k, np.array2string(scores.mean(axis=0), precision=4))
  pick = min if direction == "lower" else max
  best = pick(points, key=lambda p: p["score"])
  return {"points": points, "best": best, "metric": cv.metric, "direction": direction,
          "folds": k}


def best_config(config, best: dict) -> ml_collections.ConfigDict:
  """``config`` with the chosen setting (and cross-validation switched off)."""
  c = _with_overrides(config, best["overrides"])
  c.optim.lr = best["lr"]
  c.total_steps = best["steps"]
  for key in ("log_steps", "eval_steps", "checkpoint_steps", "steps_per_call"):
    c[key] = math.gcd(int(c[key]), best["steps"])
  c.eval_steps = c.checkpoint_steps = best["steps"]  # the test split: read once, at the end
  c.cv.folds = 0
  return c


def select_and_train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Cross-validates on the train split, then trains the best setting on the
  whole train split and evaluates it on the test split once. Writes
  ``WORKDIR/cv.json`` and the final run in ``WORKDIR/final``."""
  build.validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  data = build.data_from_config(config)
  selection = cross_validate(config, dataclasses.replace(data, test=None))
  workdir_lib.write_json(os.path.join(workdir, "cv.json"), selection, indent=2)
  logger.info("cv best: %s", selection["best"])
  final = train.train_and_evaluate(best_config(config, selection["best"]),
                                   os.path.join(workdir, "final"))
  summary = {"tasks": final["tasks"], "best": selection["best"],
             "cv_metric": selection["metric"], "cv_direction": selection["direction"],
             "final_run": os.path.join(workdir, "final")}
  workdir_lib.write_json(os.path.join(workdir, "summary.json"), summary, indent=2)
  return {"cv": selection, "final": final}
