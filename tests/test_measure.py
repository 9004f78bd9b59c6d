"""Measuring transfer: Δm on a hand-made table, cached single-task baselines,
TAG lookahead affinity on identical and opposite tasks, task grouping."""

import itertools
import json

import jax
import ml_collections
import numpy as np
import optax
import pytest

from experiments.configs import common
from mtljax import measure
from mtljax import steps
from mtljax import tasks
from mtljax import train
from mtljax import workdir
from mtljax.data import sampling
from mtljax.data import specs
from mtljax.data import task_data
from mtljax.models import multitask


def test_delta_m_on_a_hand_made_table_with_a_lower_is_better_metric():
  metrics = {"a": {"loss": 0.1, "accuracy": 0.9},
             "b": {"loss": 0.5, "mse": 2.0, "mae": 1.0}}
  base = {"a": {"loss": 9.0, "accuracy": 0.8},
          "b": {"loss": 9.0, "mse": 2.5, "mae": 0.8}}
  dm, per_task = measure.delta_m(metrics, base)
  # a: accuracy up 12.5% (better); b: mse down 20% (better), mae up 25% (worse).
  assert per_task["a"] == pytest.approx({"accuracy": 12.5})
  assert per_task["b"] == pytest.approx({"mse": 20.0, "mae": -25.0})
  assert dm == pytest.approx((12.5 + (20.0 - 25.0) / 2) / 2)
  with pytest.raises(ValueError, match="no baseline for task 'c'"):
    measure.delta_m({"c": {"accuracy": 1.0}}, base)


def _small_config(tmp_path):
  c = common.base_config()
  c.data.name = "mmoe_synthetic"
  c.data.builder_config = "p0.9_n300_m100_s0"
  c.model.hidden = (16,)
  c.total_steps = c.log_steps = c.eval_steps = c.checkpoint_steps = 50
  c.baselines_cache = str(tmp_path / "cache")
  c.plots = False  # a run's figures are tests/test_report.py's; about 1 s a run here
  return c


@pytest.mark.slow
def test_baselines_are_trained_once_then_cached_and_delta_m_reported(tmp_path):
  c = _small_config(tmp_path)
  c.baselines = True
  c.eval_train = True
  calls = []

  def counting_train(config, workdir):
    calls.append(config.model.arch)
    return train.train_and_evaluate(config, workdir)
  base = measure.single_task_baselines(c, counting_train)
  again = measure.single_task_baselines(c, counting_train)
  assert calls == ["independent"] and again == base
  # Another budget is another cache entry.
  c2 = _small_config(tmp_path)
  # 100 steps in calls of 50, as the first budget's: its train and eval steps
  # are the programs compiled for that one (25 would be calls of 25: two more).
  c2.total_steps = c2.log_steps = c2.eval_steps = c2.checkpoint_steps = 100
  c2.steps_per_call = 50
  measure.single_task_baselines(c2, counting_train)
  assert len(calls) == 2
  out = train.train_and_evaluate(c, str(tmp_path / "run"))
  # Delta_m from its definition (both tasks regression: mse and mae, lower is
  # better; loss excluded), in float64 from the two runs' own summaries.
  terms = {t: {m: -100.0 * (out["tasks"][t][m] - base[t][m]) / base[t][m]
               for m in ("mse", "mae")} for t in ("y1", "y2")}
  want = np.mean([np.mean(list(v.values())) for v in terms.values()])
  assert out["delta_m"]["value"] == pytest.approx(want, rel=1e-9)
  for task, per_metric in terms.items():
    assert out["delta_m"]["per_task"][task] == pytest.approx(per_metric, rel=1e-9)
  assert "positive = better" in out["delta_m"]["convention"]
  assert set(out["train_metrics"]) == {"y1", "y2"}  # eval_train: the train split too
  last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
  assert "train_eval/y1/mse" in last and "eval/y1/mse" in last


def _two_tasks(sign):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 4)).astype(np.float32)
  y = (x @ np.array([1.0, -2.0, 0.5, 3.0])).astype(np.float32)
  spec = specs.DataSpec("x", (specs.TaskColumn(tasks.Task("a", "regression"), "a"),
                              specs.TaskColumn(tasks.Task("b", "regression"), "b")))
  split = {"x": x, "a": y, "b": sign * y}
  return task_data.build_task_data("pair", spec, {"train": split, "test": split})


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_tag_affinity_identical_tasks_positive_symmetric_opposite_negative(sign):
  data = _two_tasks(sign)
  # One shared network and head, one batch for both: identical tasks are the same
  # function of the same examples.
  model = multitask.make_model("multi_head", data.taskset, data.input_shape, hidden=(8,),
                               heads="shared")
  tx = optax.sgd(1e-3)
  fn = jax.jit(steps.make_train_step(
      model, tx, "fixed", sampling.make_sampler(data.taskset, np.full(2, 0.5), 2, 32,
                                                shared_inputs=True),
      weights=np.ones(2), tag_lr=0.05, steps_per_call=5))
  state = steps.init_train_state(model, tx, jax.random.key(0))
  state, meas = fn(state, data.train)
  z = np.asarray(meas["tag_sum"]) / np.asarray(meas["tag_count"])
  if sign > 0:
    assert z[0, 1] > 0 and z[1, 0] > 0
    np.testing.assert_allclose(z[0, 1], z[1, 0], rtol=1e-6)
    np.testing.assert_allclose(z[0, 1], z[0, 0], rtol=1e-6)
  else:
    assert z[0, 1] < 0 and z[1, 0] < 0
    assert z[0, 0] > 0 and z[1, 1] > 0


def test_tag_needs_shared_parameters():
  data = _two_tasks(1.0)
  model = multitask.make_model("independent", data.taskset, data.input_shape, hidden=(8,))
  with pytest.raises(ValueError, match="arch 'independent' has no shared parameters"):
    steps.make_train_step(model, optax.sgd(1e-3), "fixed",
                          sampling.make_sampler(model.taskset, np.full(2, 0.5), 2, 4),
                          weights=np.ones(2), tag_lr=0.1)


@pytest.mark.parametrize("path, value, same", [
    ("model.hidden", (32,), False), ("model.encoder", "cnn", False),
    ("data.builder_config", "p0.5_n300_m100_s0", False), ("optim.lr", 0.5, False),
    ("optim.name", "sgd", False), ("seed", 3, False), ("total_steps", 75, False),
    ("sampling.examples_per_task", 8, False), ("data.normalize_labels", False, False),
    ("eval_batch_size", 7, False),
    # What the baselines do not depend on: reporting, and what they override.
    ("log_steps", 10, True), ("eval_steps", 25, True), ("checkpoint_steps", 25, True),
    ("steps_per_call", 5, True), ("model.arch", "mmoe", True),
    ("objective.method", "mgda", True), ("objective.cagrad.c", 0.3, True),
    ("sampling.tasks_per_step", 1, True), ("baselines_cache", "/elsewhere", True),
    ("tag_lr", 0.1, True)])
def test_baseline_cache_key_covers_every_field_that_changes_the_result(path, value, same,
                                                                      tmp_path):
  c = _small_config(tmp_path)
  key = measure.cache_key(c)
  node = c
  *parents, leaf = path.split(".")
  for part in parents:
    node = node[part]
  node[leaf] = value
  assert (measure.cache_key(c) == key) == same, path


def test_a_setting_added_later_keeps_the_cache_key_at_its_old_behaviour(tmp_path):
  """A config that lacks a key added later (``workdir.ADDED_KEYS``: what the
  configs had before it) and one that holds it at the value that does what
  the old config did share their cached baselines; any other value is
  another entry."""
  c = _small_config(tmp_path)
  key = measure.cache_key(c)
  old = c.to_dict()
  checked = 0
  for dotted, default in workdir.ADDED_KEYS.items():
    *parents, leaf = dotted.split(".")
    node = old
    for part in parents:
      node = node[part]
    if leaf not in node:
      continue
    assert workdir.normal(node[leaf]) == workdir.normal(default), dotted  # base config: default
    del node[leaf]
    checked += 1
  assert checked >= 10  # the base config holds most of them
  assert measure.cache_key(ml_collections.ConfigDict(old)) == key
  c.model.output_stride = 16
  assert measure.cache_key(c) != key
  c.model.output_stride = 8
  c.data.augment_scales = (1.0, 1.25)
  assert measure.cache_key(c) != key


def test_group_tasks_finds_the_affine_blocks():
  z = np.full((5, 5), -0.2)
  for block in ([0, 2], [1, 3, 4]):
    for i in block:
      for j in block:
        z[i, j] = 0.5
  out = measure.group_tasks(z, 2, list("abcde"))
  assert sorted(map(sorted, out["groups"])) == [["a", "c"], ["b", "d", "e"]]
  assert measure.group_tasks(z, 1)["groups"] == [[0, 1, 2, 3, 4]]
  big = np.kron(np.eye(3), np.ones((4, 4))) - 0.5  # 12 tasks: the greedy path
  groups = measure.group_tasks(big, 3)["groups"]
  assert sorted(map(sorted, groups)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def _np_best_grouping(z, k):
  """Brute force over every labelling of the tasks with exactly ``k`` used
  labels (float64): the partitions maximising ``sum_g sum_{i != j in g}
  Z[i, j]`` (every ordered pair, the paper's total within-group affinity), as
  ``(score, [sorted groups, sorted])``, all ties listed."""
  t = z.shape[0]
  best, found = -np.inf, set()
  for labels in itertools.product(range(k), repeat=t):
    if len(set(labels)) != k:
      continue
    s = sum(z[i, j] for i in range(t) for j in range(t) if i != j and labels[i] == labels[j])
    part = tuple(sorted(tuple(i for i in range(t) if labels[i] == g) for g in range(k)))
    if s > best + 1e-12:
      best, found = s, {part}
    elif abs(s - best) <= 1e-12:
      found.add(part)
  return best, sorted(found)


def test_group_tasks_on_asymmetric_affinities_counts_both_directions():
  """TAG's affinity is not symmetric (``Z[i, j]``: i's step on j's loss). The
  grouping scores a pair by ``Z[i, j] + Z[j, i]``: here 0 helps 1 a lot but
  1 hurts 0 almost as much (net 0.1), while 0 and 2 help each other mildly
  (net 0.6); likewise 2 -> 3 and 1 <-> 3. The best 2-grouping is {0, 2},
  {1, 3} (score 1.2), where one direction only (the upper triangle) would
  pick {0, 1}, {2, 3}. Checked against a float64 brute force over every
  partition, on this case and on random asymmetric matrices; and on 12 tasks
  (the greedy path), where the true pairs {i, i + 6} (0.3 each way) must be
  merged before the one-sided decoys {2m, 2m + 1} (1.0 and -0.9)."""
  z = np.full((4, 4), -0.5)
  np.fill_diagonal(z, 0.0)
  z[0, 1], z[1, 0] = 1.0, -0.9
  z[2, 3], z[3, 2] = 1.0, -0.9
  z[0, 2] = z[2, 0] = z[1, 3] = z[3, 1] = 0.3
  score, (want,) = _np_best_grouping(z, 2)
  assert want == ((0, 2), (1, 3)) and np.isclose(score, 1.2)
  _, (one_sided,) = _np_best_grouping(np.triu(z), 2)   # what the upper triangle alone picks
  assert one_sided == ((0, 1), (2, 3))
  out = measure.group_tasks(z, 2, list("abcd"))
  assert sorted(map(sorted, out["groups"])) == [["a", "c"], ["b", "d"]]
  np.testing.assert_allclose(out["score"], 1.2, rtol=1e-12)
  rng = np.random.default_rng(3)
  for t, k in ((5, 2), (6, 3), (6, 2)):
    for _ in range(3):
      z = rng.normal(size=(t, t))
      score, found = _np_best_grouping(z, k)
      out = measure.group_tasks(z, k)
      assert tuple(sorted(tuple(sorted(g)) for g in out["groups"])) in found
      np.testing.assert_allclose(out["score"], score, rtol=1e-10)
  big = np.full((12, 12), -0.5)
  for i in range(6):
    big[i, i + 6] = big[i + 6, i] = 0.3
    big[2 * i, 2 * i + 1], big[2 * i + 1, 2 * i] = 1.0, -0.9
  groups = measure.group_tasks(big, 6)["groups"]
  assert sorted(map(sorted, groups)) == [[i, i + 6] for i in range(6)]
