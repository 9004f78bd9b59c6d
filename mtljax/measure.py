"""Measuring transfer between tasks: single-task baselines, Δm, task affinity.

**Single-task baselines** (:func:`single_task_baselines`): one ``independent``
run of the same data, encoder, widths, optimizer, examples per task and number
of steps, with every task in every step -- which is exactly T separate
single-task trainings (tested in ``tests/test_train.py``), compiled once,
trained by the function the caller passes (the loop's ``train_and_evaluate``:
this module imports no training code). Each task's model gets
``total_steps`` updates. Results are cached by a hash of the whole baseline
config except the fields that only change reporting (:func:`cache_key`), under
``config.baselines_cache`` (default ``$MTLJAX_CACHE_DIR`` or
``~/.cache/mtljax``)``/baselines/<hash>/``. Runs sharing the cache (a sweep)
take turns per entry (a file lock, ``<hash>.lock``): one trains, the others
wait for it and read its summary.

**Δm** (:func:`delta_m`, Maninis et al. 2019; the form LibMTL reports)::

    Δm% = 100 / T  sum_t  1/|M_t|  sum_{m in M_t}  s_m (M_{t,m} - B_{t,m}) / B_{t,m}

with ``s_m = +1`` for a higher-is-better metric and ``-1`` for a lower-is-better
one (:data:`mtljax.tasks.METRIC_DIRECTIONS`), over each task's metrics except
the normalised ``loss``. **Positive Δm means better than the single-task
baselines**; the per-task terms are reported with the same sign convention.

**Task affinity by lookahead** (TAG, Fifty et al. 2021) is computed inside the
train step when ``config.tag_lr > 0`` (:func:`mtljax.affinity.lookahead_affinity`:
the step imports that module, not this one): for the sampled slots,
``Z_{i->j} = 1 - L_j(theta^sh - eta g_i) / L_j(theta^sh)`` with ``g_i`` slot i's
gradient of the shared parameters and ``L_j`` slot j's loss on its own batch;
averaged over steps per task pair. :func:`group_tasks` then partitions the
tasks into k groups maximising the summed within-group affinity.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
from typing import Callable

import jax
import ml_collections
import numpy as np

from mtljax import tasks as tasks_lib
from mtljax import workdir as workdir_lib

logger = logging.getLogger("mtljax")

DELTA_M_CONVENTION = ("Delta_m% = 100/T sum_t mean_m s_m (M - B)/B over each task's "
                      "metrics except loss, s_m = +1 if higher is better else -1: "
                      "positive = better than the single-task baselines")


def delta_m(metrics: dict, baseline: dict,
            directions: dict[str, str] | None = None,
            average: str = "per_task") -> tuple[float, dict]:
  """``(Δm%, {task: {metric: signed relative change %}})`` (module docstring).

  ``average`` says how the signed relative changes
  ``d_{t,m} = 100 s_m (M_{t,m} - B_{t,m}) / |B_{t,m}|`` become one number:

  * ``"per_task"`` (default; LibMTL's ``count_improvement``, Maninis et al.):
    ``Δm = 1/T sum_t 1/|M_t| sum_m d_{t,m}``: each task weighs ``1/T``,
    whatever its number of metrics.
  * ``"per_metric"`` (Nash-MTL's ``delta_fn``, ``experiments/nyuv2/utils.py``):
    ``Δm = 1/sum_t |M_t| sum_t sum_m d_{t,m}``: every metric weighs
    the same, so on NYUv2 (2 segmentation, 2 depth, 5 normals metrics) the
    normals carry 5/9. Nash-MTL's code reports the opposite sign (its
    ``(-1)^SIGN`` flips the higher-is-better metrics: positive = worse there,
    lower is better in its tables); here positive is better under both.

  The per-task terms returned are the ``d_{t,m}`` under either.
  """
  if average not in ("per_task", "per_metric"):
    raise ValueError(f"delta_m: average must be 'per_task' or 'per_metric', got {average!r}.")
  directions = directions or tasks_lib.METRIC_DIRECTIONS
  if not metrics:
    raise ValueError("delta_m: no tasks.")
  per_task, terms = {}, []
  for task, ms in metrics.items():
    if task not in baseline:
      raise ValueError(f"delta_m: no baseline for task {task!r}.")
    names = [m for m in ms if m != "loss"]
    if not names:
      raise ValueError(f"delta_m: task {task!r} has no metric besides loss.")
    per_task[task] = {}
    for m in names:
      if m not in directions:
        raise ValueError(f"delta_m: metric {m!r} of task {task!r} declares no direction.")
      b = baseline[task][m]
      if b == 0:
        raise ValueError(f"delta_m: baseline {m} of task {task!r} is 0; relative change "
                         "undefined.")
      sign = 1.0 if directions[m] == "higher" else -1.0
      per_task[task][m] = 100.0 * sign * (ms[m] - b) / abs(b)
    if average == "per_task":
      terms.append(np.mean(list(per_task[task].values())))
    else:
      terms.extend(per_task[task].values())
  return float(np.mean(terms)), per_task


# ----------------------------------------------------------------------------
# Single-task baselines.
# ----------------------------------------------------------------------------


# Config fields that change how a run is reported or scheduled, never what it
# learns: left out of the baselines' cache key.
_NOT_RESULTS = ("log_steps", "eval_steps", "checkpoint_steps", "steps_per_call",
                "baselines_cache", "experiment", "tensorboard", "plots")


def baseline_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The single-task baselines' run: ``independent``, every task every step,
  equal weights, no objective method, no penalties, no transfer."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.arch = "independent"
  c.model.heads = "auto"
  c.sampling.tasks_per_step = 0
  c.sampling.task_sampler = "uniform"
  c.sampling.replace = False
  c.sampling.shared_inputs = False
  c.objective.method = "fixed"
  c.objective.weights = ml_collections.ConfigDict()
  c.init_from = ""
  c.init_dont_load = ""
  c.l2sp_alpha = c.l2sp_beta = 0.0
  for key in ("baselines", "tag_lr", "eval_train"):
    if key in c:
      c[key] = type(c[key])(0)
  if "cv" in c:
    c.cv.folds = 0
  return c


def cache_key(config) -> str:
  """A hash of everything in the baselines' config that can change their
  result (every field but :data:`_NOT_RESULTS`, and the objective's settings,
  which the baselines ignore). A key added to the configs later
  (:data:`mtljax.workdir.ADDED_KEYS`) at the value that does what a config
  without it did is left out, so adding a setting keeps the cached baselines
  of every config that does not use it."""
  c = baseline_config(config).to_dict()
  for key in _NOT_RESULTS:
    c.pop(key, None)
  for dotted, default in workdir_lib.ADDED_KEYS.items():
    *parents, leaf = dotted.split(".")
    node = c
    for part in parents:
      node = node.get(part) if isinstance(node, dict) else None
    if (isinstance(node, dict) and leaf in node
        and workdir_lib.normal(node[leaf]) == workdir_lib.normal(default)):
      del node[leaf]
  c["objective"] = {"method": "fixed"}
  blob = json.dumps(c, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_root(config) -> str:
  root = config.get("baselines_cache", "") or os.environ.get("MTLJAX_CACHE_DIR") or \
      os.path.join(os.path.expanduser("~"), ".cache", "mtljax")
  return os.path.join(root, "baselines")


def single_task_baseline_summary(config, train_fn: Callable) -> dict:
  """The single-task baselines' run summary (``tasks``, and ``per_seed`` with
  ``config.num_seeds`` > 1: the same seeds as the multi-task run), trained once
  with ``train_fn(config, workdir) -> summary``
  (:func:`mtljax.train.train_and_evaluate`) and then read from the cache
  (keyed by :func:`cache_key`)."""
  workdir = os.path.join(cache_root(config), cache_key(config))
  summary = _cached(workdir, config.total_steps)
  if summary is not None:
    return summary
  with _turn(workdir):  # another run sharing the cache may be training them
    summary = _cached(workdir, config.total_steps)
    if summary is not None:
      return summary
    logger.info("Training single-task baselines (independent, %d steps) into %s.",
                config.total_steps, workdir)
    return train_fn(baseline_config(config), workdir)


def _cached(workdir: str, total_steps: int) -> dict | None:
  """The cached summary in ``workdir`` when it ran ``total_steps``, else None."""
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    summary = json.load(f)
  if summary.get("step") != total_steps:
    return None
  logger.info("Single-task baselines from the cache %s.", workdir)
  return summary


@contextlib.contextmanager
def _turn(workdir: str):
  """This run's turn at a cache entry: ``fcntl.flock`` on ``WORKDIR.lock``
  (the kernel drops it when the holder dies; the next run then resumes the
  entry's checkpoints). A run that finds it taken says so and waits. With
  several processes (one run across hosts) there is no lock: its processes
  train together, and a lock taken by one would keep the others waiting in
  its collectives."""
  if jax.process_count() > 1:
    yield
    return
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  with open(f"{workdir}.lock", "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      logger.warning("Another run is training the single-task baselines into %s: waiting for "
                     "it.", workdir)
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def single_task_baselines(config, train_fn: Callable) -> dict:
  """``{task: {metric: value}}`` of the single-task baselines (the mean over
  seeds): :func:`single_task_baseline_summary`'s ``tasks``."""
  return single_task_baseline_summary(config, train_fn)["tasks"]


# ----------------------------------------------------------------------------
# Task affinity (TAG).
# ----------------------------------------------------------------------------


def group_tasks(affinity: np.ndarray, k: int, names=None) -> dict:
  """The partition of the tasks into ``k`` non-empty groups maximising the
  summed within-group affinity ``sum_g sum_{i != j in g} Z[i, j]`` (exhaustive
  for up to 10 tasks, greedy agglomeration beyond)."""
  z = np.asarray(affinity, np.float64)
  t = z.shape[0]
  if not 1 <= k <= t:
    raise ValueError(f"group_tasks: k={k} must be in [1, {t}].")
  names = list(names) if names is not None else list(range(t))
  sym = z + z.T

  def score(labels):
    return sum(sym[i, j] for i in range(t) for j in range(i + 1, t)
               if labels[i] == labels[j])

  best = None
  if t <= 10:
    # Restricted growth strings enumerate every partition into exactly k blocks.
    def partitions(i, labels, used):
      if i == t:
        if used == k:
          yield tuple(labels)
        return
      for b in range(min(used + 1, k)):
        if t - i - 1 < k - max(used, b + 1):
          continue
        labels.append(b)
        yield from partitions(i + 1, labels, max(used, b + 1))
        labels.pop()
    for labels in partitions(0, [], 0):
      s = score(labels)
      if best is None or s > best[0]:
        best = (s, labels)
  else:
    groups = [[i] for i in range(t)]
    while len(groups) > k:
      a, b = max(itertools.combinations(range(len(groups)), 2),
                 key=lambda ab: sum(sym[i, j] for i in groups[ab[0]] for j in groups[ab[1]]))
      groups[a] += groups.pop(b)
    labels = [0] * t
    for gi, g in enumerate(groups):
      for i in g:
        labels[i] = gi
    best = (score(labels), tuple(labels))
  groups = [[names[i] for i in range(t) if best[1][i] == g] for g in range(k)]
  return {"groups": groups, "score": float(best[0])}
