"""Tasks: losses against float64 numpy, task groups, weights, bad input."""

import jax.numpy as jnp
import numpy as np
import pytest

from mtljax import tasks


def _np_logsumexp(a):
  m = a.max(-1, keepdims=True)
  return (m + np.log(np.exp(a - m).sum(-1, keepdims=True)))[..., 0]


def test_classification_loss_matches_float64_cross_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 7, 5)) * 3
  y = rng.integers(0, 5, (3, 7))
  t = tasks.Task("a", "classification", 5)
  got = np.asarray(tasks.example_loss(t, jnp.asarray(logits, jnp.float32), jnp.asarray(y)))
  want = _np_logsumexp(logits) - np.take_along_axis(logits, y[..., None], -1)[..., 0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_binary_loss_matches_float64_log_loss():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(50,)) * 4
  y = rng.integers(0, 2, 50)
  t = tasks.Task("b", "binary")
  got = np.asarray(tasks.example_loss(t, jnp.asarray(z[:, None], jnp.float32), jnp.asarray(y)))
  p = 1 / (1 + np.exp(-z))
  want = -(y * np.log(p) + (1 - y) * np.log(1 - p))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_regression_metrics_are_in_original_units():
  t = tasks.Task("r", "regression")
  pred_norm = jnp.array([[0.5], [-1.0]])
  y_norm = jnp.array([0.0, 1.0])
  mean, std = 10.0, 3.0
  m = tasks.example_metrics(t, pred_norm, y_norm, jnp.float32(mean), jnp.float32(std))
  pred = np.array([0.5, -1.0]) * std + mean
  y = np.array([0.0, 1.0]) * std + mean
  np.testing.assert_allclose(m["mse"], (pred - y) ** 2, rtol=1e-6)
  np.testing.assert_allclose(m["mae"], np.abs(pred - y), rtol=1e-6)
  np.testing.assert_allclose(m["loss"], (np.array([0.5, -1.0]) - [0, 1]) ** 2, rtol=1e-6)


def test_groups_and_local_index():
  ts = tasks.TaskSet((tasks.Task("a", "classification", 10), tasks.Task("r", "regression"),
                      tasks.Task("b", "classification", 10), tasks.Task("c", "classification", 3)))
  assert ts.groups == ("classification10", "regression1", "classification3")
  np.testing.assert_array_equal(ts.group_members("classification10"), [0, 2])
  np.testing.assert_array_equal(ts.group_of_task, [0, 1, 0, 2])
  np.testing.assert_array_equal(ts.local_index, [0, 0, 1, 0])
  sub = ts.subset(["b", "r"])
  assert sub.names == ("b", "r") and sub.stream_ids == (2, 1)


@pytest.mark.parametrize("make, match", [
    (lambda: tasks.TaskSet(()), "empty"),
    (lambda: tasks.TaskSet((tasks.Task("a", "regression"),) * 2), "duplicate"),
    (lambda: tasks.Task("a", "ranking"), "unknown kind 'ranking'"),
    (lambda: tasks.Task("a", "classification", 1), "num_classes >= 2"),
    (lambda: tasks.Task("a/b", "regression"), "must not contain '/'"),
])
def test_bad_tasks_raise_clear_errors(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_task_weights():
  ts = tasks.TaskSet((tasks.Task("a", "regression"), tasks.Task("b", "regression")))
  np.testing.assert_array_equal(tasks.task_weights(ts, {"b": 2.0}), [1.0, 2.0])
  np.testing.assert_array_equal(tasks.task_weights(ts, [0.5, 3]), [0.5, 3.0])
  with pytest.raises(KeyError, match="Unknown task 'c'"):
    tasks.task_weights(ts, {"c": 1.0})
  with pytest.raises(ValueError, match="3 values for 2 tasks"):
    tasks.task_weights(ts, [1, 2, 3])
  with pytest.raises(ValueError, match="finite and >= 0"):
    tasks.task_weights(ts, {"a": float("nan")})
