"""The compiled train step and eval step."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from mtljax import optim
from mtljax import steps
from mtljax import tasks
from mtljax.data import sampling
from mtljax.data import task_data
from mtljax.models import multitask


def _setup(data, arch="multi_head", k=None, replace=False, steps_per_call=1, weights=None,
           lr=1e-2):
  ts = data.taskset
  model = multitask.make_model(arch, ts, data.input_shape, hidden=(16, 8))
  tx = optim.make_optimizer("adam", lr=lr)
  sampler = sampling.make_sampler(ts, sampling.task_probabilities("uniform", data.num_train),
                                  k or len(ts), 16, replace)
  fn = steps.make_train_step(model, tx, "fixed", sampler, weights=tasks.task_weights(ts, weights),
                             steps_per_call=steps_per_call, seed=7)
  state = steps.init_train_state(model, tx, jax.random.key(0))
  return model, fn, state


def test_unsampled_tasks_heads_and_optimizer_state_are_bitwise_unchanged():
  data = task_data.build_task_data("toy", *helpers.shared_input_data())
  model, fn, state = _setup(data, k=1)  # one of four tasks per step
  step = jax.jit(fn)
  data_dev = jax.device_put(data.train)
  times_sampled = np.zeros(4, int)
  for _ in range(12):
    new, meas = step(state, data_dev)
    sampled = np.asarray(meas["task_count"]) > 0
    assert sampled.sum() == 1
    times_sampled += sampled
    for stack, rows in model.task_rows.items():
      for part in ("params", "opt_state"):
        old_leaves = jax.tree.leaves(_get(getattr(state, part)["tasks"], stack))
        new_leaves = jax.tree.leaves(_get(getattr(new, part)["tasks"], stack))
        assert old_leaves
        for o, n in zip(old_leaves, new_leaves):
          o, n = np.asarray(o), np.asarray(n)
          for r, t in enumerate(rows):
            if not sampled[t]:
              assert np.array_equal(o[r], n[r]), (part, stack, t)  # bitwise
    # The sampled head moved; the shared trunk moves every step.
    t = int(np.flatnonzero(sampled)[0])
    g = data.taskset.tasks[t].group
    r = int(data.taskset.local_index[t])
    assert not np.array_equal(state.params["tasks"]["heads"][g]["kernel"][r],
                              new.params["tasks"]["heads"][g]["kernel"][r])
    assert not np.array_equal(state.params["shared"]["trunk"]["layer_0"]["kernel"],
                              new.params["shared"]["trunk"]["layer_0"]["kernel"])
    state = new
  # Each head's Adam step count is the number of steps its task was sampled.
  for g in data.taskset.groups:
    counts = np.asarray(state.opt_state["tasks"]["heads"][g][0].count)
    np.testing.assert_array_equal(counts, times_sampled[data.taskset.group_members(g)])
  assert times_sampled.min() > 0


def _get(tree, path):
  for p in path.split("/"):
    tree = tree[p]
  return tree


@pytest.mark.parametrize("name", ["r", "b", pytest.param("c", marks=pytest.mark.slow),
                                  pytest.param("c2", marks=pytest.mark.slow)])
def test_independent_equals_single_task_trainings(name):
  """``independent`` with T tasks, every task every step, equals a single-task
  run of each task (its stream id keeps its initial values and examples):
  what the single-task baselines rely on."""
  spec, arrays = helpers.shared_input_data()
  full = task_data.build_task_data("toy", spec, arrays)
  # 20 steps as 20 calls of a one-step program (cheaper to compile than a
  # 5-step scan; the scan path is test_train_step_traces_once's).
  _, fn, state = _setup(full, arch="independent")
  step = jax.jit(fn)
  d = jax.device_put(full.train)
  for _ in range(20):
    state, _ = step(state, d)
  t = full.taskset.index(name)
  single = task_data.build_task_data("toy", spec, arrays, task_names=(name,))
  _, fn1, s1 = _setup(single, arch="independent")
  s0 = s1
  step1 = jax.jit(fn1)
  d1 = jax.device_put(single.train)
  for _ in range(20):
    s1, _ = step1(s1, d1)
  g = full.taskset.tasks[t].group
  r = int(full.taskset.local_index[t])
  pairs = [(jax.tree.map(lambda a: a[t], state.params["tasks"]["trunk"]),
            jax.tree.map(lambda a: a[0], s1.params["tasks"]["trunk"])),
           (jax.tree.map(lambda a: a[r], state.params["tasks"]["heads"][g]),
            jax.tree.map(lambda a: a[0], s1.params["tasks"]["heads"][g]))]
  for multi, alone in pairs:
    chex.assert_trees_all_close(multi, alone, rtol=1e-5, atol=1e-6)
  # ... and training really moved the parameters.
  assert not np.allclose(s0.params["tasks"]["trunk"]["layer_0"]["kernel"],
                         s1.params["tasks"]["trunk"]["layer_0"]["kernel"])


def test_train_step_traces_once():
  data = task_data.build_task_data("toy", *helpers.shared_input_data())
  _, fn, state = _setup(data, k=2, steps_per_call=3)
  step = jax.jit(chex.assert_max_traces(fn, n=1), donate_argnums=(0,))
  d = jax.device_put(data.train)
  state = jax.device_put(state)
  for _ in range(4):
    state, _ = step(state, d)
  assert int(state.step) == 12
  assert step._cache_size() == 1  # pylint: disable=protected-access


def test_zero_weight_task_does_not_move():
  data = task_data.build_task_data("toy", *helpers.shared_input_data())
  _, fn, state = _setup(data, arch="independent", weights={"c": 0.0}, steps_per_call=5)
  new, _ = jax.jit(fn)(state, jax.device_put(data.train))
  before, after = state.params["tasks"]["trunk"], new.params["tasks"]["trunk"]
  c = data.taskset.index("c")
  for o, n in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    assert np.array_equal(o[c], n[c])
    assert not np.array_equal(o[c - 1], n[c - 1])


def test_objective_is_the_weighted_sum_of_slot_losses():
  data = task_data.build_task_data("toy", *helpers.shared_input_data())
  model, fn, state = _setup(data, k=4, steps_per_call=1, weights=[0.5, 2.0, 1.0, 3.0])
  _, meas = jax.jit(fn)(state, jax.device_put(data.train))
  per_task = np.asarray(meas["task_loss_sum"])  # each task once (K = T)
  np.testing.assert_allclose(float(meas["loss"]), per_task @ [0.5, 2.0, 1.0, 3.0],
                             rtol=1e-5)


def test_eval_step_matches_numpy_over_unequal_task_sizes():
  spec, arrays = helpers.family_data([20, 35, 9], [13, 31, 5])
  data = task_data.build_task_data("fam", spec, arrays)
  model, _, state = _setup(data, arch="concat")
  n_pad = data.test["x"].shape[1]
  ev = jax.jit(steps.make_eval_step(model, label_mean=data.label_mean,
                                    label_std=data.label_std, num_examples=n_pad,
                                    batch_size=7))  # 5 chunks, the last one partial
  got = steps.eval_metrics(data.taskset, ev(state.params, jax.device_put(data.test)))
  for t, name in enumerate(data.taskset.names):
    n = int(data.test["n"][t])
    x = data.test["x"][data.test["source"][t], :n][None]
    out = np.asarray(model.apply(state.params, jnp.asarray(x),
                                 jnp.array([t]))["regression1"])[0, :, 0].astype(np.float64)
    pred = out * data.label_std[t] + data.label_mean[t]
    y_raw = arrays["test"]["y"][arrays["test"]["task"] == t].astype(np.float64)
    np.testing.assert_allclose(got[name]["mse"], np.mean((pred - y_raw) ** 2), rtol=1e-4)
    np.testing.assert_allclose(got[name]["mae"], np.mean(np.abs(pred - y_raw)), rtol=1e-4)


def test_k_larger_than_t_without_replacement_raises():
  data = task_data.build_task_data("toy", *helpers.shared_input_data())
  with pytest.raises(ValueError, match=r"tasks_per_step=5 must be in \[1, 4\]"):
    _setup(data, k=5)


def test_step_inputs_of_the_wrong_length_or_state_of_the_wrong_shape_raise():
  data = task_data.build_task_data("toy", *helpers.shared_input_data())
  model = multitask.make_model("multi_head", data.taskset, data.input_shape, hidden=(8,))
  tx = optim.make_optimizer("adam", lr=1e-2)
  sampler = sampling.make_sampler(data.taskset, np.full(4, 0.25), 2, 4)
  with pytest.raises(ValueError, match=r"task_probs must have one entry per task \(4\)"):
    steps.make_train_step(model, tx, "fixed", sampler._replace(probs=np.full(3, 1 / 3)),
                          weights=np.ones(4))
  other = tasks.TaskSet(data.taskset.tasks[::-1])
  with pytest.raises(ValueError, match=r"sampler was made for another task set"):
    steps.make_train_step(model, tx, "fixed", sampling.make_sampler(other, np.full(4, 0.25), 2, 4),
                          weights=np.ones(4))
  with pytest.raises(TypeError, match=r"sampler must be a mtljax.data.sampling.Sampler"):
    steps.make_train_step(model, tx, "fixed", np.full(4, 0.25), weights=np.ones(4))
  with pytest.raises(ValueError, match=r"weights must have one entry per task \(4\)"):
    steps.make_train_step(model, tx, "fixed", sampler, weights=np.ones(3))
  fn = steps.make_train_step(model, tx, "gradnorm", sampler, weights=np.ones(4))
  state = steps.init_train_state(model, tx, jax.random.key(0), "gradnorm")
  # A GradNorm state saved before its Adam state became per task: one scalar count.
  old = jax.tree.map(lambda a: a[0] if a.ndim else a, state.objective_state["opt"])
  state = state._replace(objective_state={**state.objective_state, "opt": old})
  with pytest.raises(ValueError, match="not initialised for objective 'gradnorm'"):
    fn(state, data.train)


def test_gradient_record_logs_lambda_and_gradients_when_an_objective_measures_both():
  """moco, imtl and excess_mtl measure a lambda per task and the per-slot
  gradients' norms, weights and cosines: the log row has both (it returned
  after the lambdas), each the call's sum over its count, by hand."""
  from mtljax import train  # pylint: disable=g-import-not-at-top
  ts = tasks.TaskSet((tasks.Task("a", "regression"), tasks.Task("b", "binary"),
                      tasks.Task("c", "regression")))
  meas = {"objective_lambda_sum": np.array([0.9, 0.6, 1.5]),
          "task_count": np.array([3.0, 0.0, 2.0]),
          "grad_norm_sum": np.array([6.0, 0.0, 1.0]),
          "grad_weight_sum": np.array([1.5, 0.0, 0.5]),
          "grad_cos_sum": np.array([[3.0, 0.0, -0.8], [0.0, 0.0, 0.0], [-0.8, 0.0, 2.0]]),
          "grad_pair_count": np.array([[3.0, 0.0, 2.0], [0.0, 0.0, 0.0], [2.0, 0.0, 2.0]]),
          "solver_failures": np.array([0.0, 1.0, 1.0])}
  rec = train.gradient_record(ts, meas, steps_per_call=3)
  assert rec == pytest.approx({
      "objective/a/lambda": 0.3, "objective/b/lambda": 0.2, "objective/c/lambda": 0.5,
      "grad/solver_failures": 2.0, "grad/a/norm": 2.0, "grad/a/weight": 0.5,
      "grad/c/norm": 0.5, "grad/c/weight": 0.25, "grad/cos/a/c": -0.4})
  del meas["grad_norm_sum"]   # a loss weighting: the lambdas only
  assert set(train.gradient_record(ts, meas, 3)) == {
      "objective/a/lambda", "objective/b/lambda", "objective/c/lambda"}
