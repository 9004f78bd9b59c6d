"""Gradient methods inside the train step: the shared update is the method's
direction over independently computed per-task gradients; task-specific
parameters get their plain gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtljax import gradients
from mtljax import objectives
from mtljax import optim
from mtljax import tasks
from mtljax import train
from mtljax.data import loading
from mtljax.data import sampling
from mtljax.models import multitask

import test_train  # the toy data builders


@pytest.mark.parametrize("method", sorted(gradients.GRADIENT_METHODS))
def test_step_applies_the_method_to_per_task_gradients(method):
  data = loading.build_task_data("toy", *test_train._shared_input_data())
  ts = data.taskset
  model = multitask.make_model("multi_head", ts, data.input_shape, hidden=(8,))
  tx = optim.make_optimizer("sgd", lr=1.0)  # update = -gradient
  probs = sampling.task_probabilities("uniform", data.num_train)
  weights = np.array([1.0, 2.0, 0.5, 1.0], np.float32)
  fn = train.make_train_step(model, tx, task_probs=probs, weights=weights,
                             tasks_per_step=3, examples_per_task=16, seed=5,
                             objective=method)
  state = train.init_train_state(model, tx, jax.random.key(0))
  new, meas = jax.jit(fn)(state, data.train)

  # The reference: reproduce the step's samples, then one jax.grad per task.
  rng = jax.random.fold_in(jax.random.key(5), 0)
  r_tasks, r_examples, r_method = jax.random.split(rng, 3)
  task_ids = sampling.sample_tasks(r_tasks, jnp.asarray(probs, jnp.float32), 3)
  idx = sampling.example_indices(r_examples, task_ids, jnp.asarray(ts.stream_ids),
                                 jnp.asarray(data.train["n"]), 16)
  x, ys = sampling.gather_batch(data.train, {"local_index": jnp.asarray(ts.local_index)},
                                task_ids, idx)
  p = state["params"]
  rows = []
  for k in range(3):
    g = jax.grad(lambda p: weights[task_ids[k]] *
                 train.slot_losses(model, p, x, ys, task_ids)[k])(p)
    rows.append(g)
  g_shared = jax.tree.map(lambda *r: jnp.stack(r), *[r["shared"] for r in rows])
  d, beta, _ = objectives.make_combiner(method)(g_shared, r_method)
  want = jax.tree.map(lambda a, b: a - b, p["shared"], d)
  for a, b in zip(jax.tree.leaves(new["params"]["shared"]), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Task-specific parameters: the plain gradient of the weighted sum.
  plain = jax.tree.map(lambda *r: sum(r), *[r["tasks"] for r in rows])
  want_tasks = jax.tree.map(lambda a, g: a - g, p["tasks"], plain)
  for a, b in zip(jax.tree.leaves(new["params"]["tasks"]), jax.tree.leaves(want_tasks)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Measurements: per-task weights are the method's beta, placed by task id.
  np.testing.assert_allclose(
      meas["grad_weight_sum"],
      np.bincount(np.asarray(task_ids), np.asarray(beta), minlength=len(ts)), atol=1e-5)
  norms = np.asarray(meas["grad_norm_sum"])[np.asarray(task_ids)]
  flat = np.concatenate([l.reshape(3, -1) for l in jax.tree.leaves(g_shared)], 1)
  np.testing.assert_allclose(norms, np.linalg.norm(flat, axis=1), rtol=1e-4)


def test_cagrad_c_out_of_range_raises():
  with pytest.raises(ValueError, match=r"cagrad_c must be in \[0, 1\)"):
    objectives.make_combiner("cagrad", cagrad_c=1.5)
