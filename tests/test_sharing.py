"""Issue 4's sharing schemes: soft sharing, cross-stitch, MMoE / OMoE /
shared-bottom -- their limits and identities, and the soft penalty in float64."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtljax import optim
from mtljax import params as params_lib
from mtljax import steps
from mtljax.data import sampling
from mtljax.data import task_data
from mtljax.models import multitask

import helpers


def _data():
  return task_data.build_task_data("toy", *helpers.shared_input_data())


def _train(arch, num_steps, tx=None, **kwargs):
  data = _data()
  model = multitask.make_model(arch, data.taskset, data.input_shape, hidden=(16, 8),
                               **kwargs)
  tx = tx or optim.make_optimizer("adam", lr=1e-2)
  fn = jax.jit(steps.make_train_step(
      model, tx, "fixed", sampling.make_sampler(
          data.taskset, sampling.task_probabilities("uniform", data.num_train), 4, 16),
      weights=np.ones(4), seed=3))
  state = steps.init_train_state(model, tx, jax.random.key(0))
  first = state
  for _ in range(num_steps):
    state, _ = fn(state, data.train)
  return model, first, state


def _named(tree):
  return dict(params_lib.flatten_with_names(tree))


def _spread(trunk):
  """Largest std over the task axis of a kernel, relative to its mean magnitude
  (biases start at zero in every copy)."""
  return max(float(np.std(a, axis=0).max() / (np.abs(a).mean() + 1e-12))
             for n, a in _named(trunk).items() if n.endswith("kernel"))


def test_soft_with_zero_lambda_trains_exactly_like_independent():
  model, _, soft = _train("soft", 10, lambda_=0.0)
  assert model.penalty is not None  # the penalty path runs; lambda = 0 must add nothing
  _, _, indep = _train("independent", 10)
  for (n, a), (_, b) in zip(_named(soft.params).items(), _named(indep.params).items()):
    assert a.tobytes() == b.tobytes(), n


def test_soft_with_large_lambda_makes_the_copies_agree():
  # SGD with 2 lr lambda T = 1: each step averages the copies before their own
  # task step, so they differ only by one step's task gradients.
  lr, t = 0.05, 4
  _, first, soft = _train("soft", 30, tx=optax.sgd(lr), lambda_=1 / (2 * lr * t))
  _, _, indep = _train("independent", 30, tx=optax.sgd(lr))
  assert _spread(first.params["tasks"]["trunk"]) > 0.3  # different initial copies
  assert _spread(indep.params["tasks"]["trunk"]) > 0.3
  assert _spread(soft.params["tasks"]["trunk"]) < 0.05


@pytest.mark.parametrize("norm", ["squared", "l2"])
def test_soft_penalty_and_gradient_match_float64(norm):
  data = _data()
  lam = 0.37
  model = multitask.make_model("soft", data.taskset, data.input_shape, hidden=(6, 5),
                               lambda_=lam, norm=norm, layers="layer_1")
  params = model.init(jax.random.key(1))
  value, grad = jax.value_and_grad(model.penalty)(params)
  cols = params["tasks"]["trunk"]
  vec = np.concatenate([np.asarray(l, np.float64).reshape(4, -1)
                        for l in jax.tree.leaves(cols["layer_1"])], axis=1)
  want, want_grad = 0.0, np.zeros_like(vec)
  for i, j in itertools.combinations(range(4), 2):
    diff = vec[i] - vec[j]
    if norm == "squared":
      want += lam * diff @ diff
      want_grad[i] += 2 * lam * diff
      want_grad[j] -= 2 * lam * diff
    else:
      d = np.linalg.norm(diff)
      want += lam * d
      want_grad[i] += lam * diff / d
      want_grad[j] -= lam * diff / d
  np.testing.assert_allclose(value, want, rtol=1e-5)
  got = np.concatenate([np.asarray(l).reshape(4, -1)
                        for l in jax.tree.leaves(grad["tasks"]["trunk"]["layer_1"])], axis=1)
  np.testing.assert_allclose(got, want_grad, rtol=1e-4, atol=1e-6)
  # Layers outside soft.layers get no penalty gradient.
  assert all(float(jnp.abs(l).max()) == 0.0
             for l in jax.tree.leaves(grad["tasks"]["trunk"]["layer_0"]))


def test_cross_stitch_with_identity_mixing_equals_independent_networks():
  data = _data()
  x = jnp.asarray(data.train["x"][0][:24].reshape(4, 6, 5))
  ids = jnp.array([2, 0, 3, 1])
  cs = multitask.make_model("cross_stitch", data.taskset, data.input_shape, hidden=(16, 8),
                            init_diagonal=1.0)
  ind = multitask.make_model("independent", data.taskset, data.input_shape, hidden=(16, 8))
  p_cs, p_ind = cs.init(jax.random.key(0)), ind.init(jax.random.key(0))
  for name, leaf in _named(p_ind["tasks"]).items():  # the same columns and heads
    np.testing.assert_array_equal(_named(p_cs["tasks"])[name], leaf)
  out_cs = jax.jit(cs.apply)(p_cs, x, ids)  # jitted: one program, not one per op
  for g, out in jax.jit(ind.apply)(p_ind, x, ids).items():
    np.testing.assert_allclose(out_cs[g], out, rtol=1e-6, atol=1e-7)
  # Training with the stitch units frozen (an optimizer rule) is independent training.
  tx = optim.make_ruled_optimizer("adam", optim.parse_rules("shared/stitch/:frozen;.*:"),
                                  lr=1e-2, total_steps=10)
  _, _, s_cs = _train("cross_stitch", 8, tx=tx, init_diagonal=1.0)
  _, _, s_ind = _train("independent", 8)
  for name, leaf in _named(s_ind.params["tasks"]).items():
    np.testing.assert_allclose(_named(s_cs.params["tasks"])[name], leaf, rtol=1e-5,
                               atol=1e-6)


def test_cross_stitch_mixes_columns_at_its_initialisation():
  data = _data()
  cs = multitask.make_model("cross_stitch", data.taskset, data.input_shape, hidden=(8,))
  p = cs.init(jax.random.key(0))
  alpha = np.asarray(p["shared"]["stitch"]["layer_0"])
  np.testing.assert_allclose(np.diag(alpha), 0.9)
  np.testing.assert_allclose(alpha.sum(axis=1), 1.0, rtol=1e-6)
  # Task 0's outputs now depend on task 1's column.
  x = jnp.asarray(data.train["x"][0][:6].reshape(1, 6, 5))
  f0 = cs.apply(p, x, jnp.array([0]))["regression1"]
  p2 = jax.tree.map(lambda a: a, p)
  p2["tasks"]["trunk"]["layer_0"]["bias"] = p["tasks"]["trunk"]["layer_0"]["bias"].at[1].add(1.0)
  assert not np.allclose(cs.apply(p2, x, jnp.array([0]))["regression1"], f0)


def test_mmoe_with_one_expert_equals_shared_bottom():
  data = _data()
  x = jnp.asarray(data.train["x"][0][:24].reshape(4, 6, 5))
  ids = jnp.array([1, 3, 0, 2])
  mm = multitask.make_model("mmoe", data.taskset, data.input_shape, hidden=(16,),
                            num_experts=1, tower=(8,))
  sb = multitask.make_model("shared_bottom", data.taskset, data.input_shape, hidden=(16,),
                            tower=(8,))
  p_mm = mm.init(jax.random.key(0))
  rng = np.random.default_rng(5)  # numpy: an eager jax.random draw compiles per shape
  p_mm["tasks"]["gates"] = jax.tree.map(  # any gate: a softmax over one expert is 1
      lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32), p_mm["tasks"]["gates"])
  p_sb = sb.init(jax.random.key(0))
  p_sb["shared"]["trunk"] = jax.tree.map(lambda a: a[0], p_mm["shared"]["experts"])
  for name, leaf in _named(p_sb["tasks"]).items():  # same towers and heads
    np.testing.assert_array_equal(_named(p_mm["tasks"])[name], leaf)
  out_mm, out_sb = jax.jit(mm.apply)(p_mm, x, ids), jax.jit(sb.apply)(p_sb, x, ids)
  for g in out_sb:
    np.testing.assert_allclose(out_mm[g], out_sb[g], rtol=1e-6, atol=1e-7)


def test_omoe_gates_are_shared_and_mmoe_gates_are_per_task():
  """OMoE's gated mixture is task-independent (its ``encode`` output, one
  ``[B, F]``); MMoE's encoding is the experts ``[E, B, F]`` and each task's own
  gate mixes them (changing task 1's gate moves task 1's outputs only)."""
  data = _data()
  x = jnp.asarray(data.train["x"][0][:6])
  ids = jnp.arange(4)
  models, params = {}, {}
  for arch in ("mmoe", "omoe"):
    m = multitask.make_model(arch, data.taskset, data.input_shape, hidden=(8,),
                             num_experts=3, tower=())
    p = m.init(jax.random.key(0))
    key = ("tasks", "gates") if arch == "mmoe" else ("shared", "gate")
    rng = np.random.default_rng(7)  # numpy: an eager jax.random draw compiles per shape
    p[key[0]][key[1]] = jax.tree.map(
        lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32), p[key[0]][key[1]])
    models[arch], params[arch] = m, p
  assert models["omoe"].encode(params["omoe"]["shared"], x).shape == (6, 8)
  assert models["mmoe"].encode(params["mmoe"]["shared"], x).shape == (3, 6, 8)
  m, p = models["mmoe"], params["mmoe"]
  out = m.decode(p["tasks"], m.encode(p["shared"], x), x, ids)
  p2 = jax.tree.map(lambda a: a, p)
  p2["tasks"]["gates"]["bias"] = p["tasks"]["gates"]["bias"].at[1, 0].add(2.0)
  out2 = m.decode(p2["tasks"], m.encode(p2["shared"], x), x, ids)
  assert np.allclose(out["regression1"][0], out2["regression1"][0])   # task 0: unchanged
  assert not np.allclose(out["classification3"][1], out2["classification3"][1])  # task 1


@pytest.mark.parametrize("kwargs, match", [
    ({"arch": "soft", "norm": "l1"}, "^soft.norm='l1' is not one of"),
    ({"arch": "soft", "layers": "conv_9"}, "^soft.layers='conv_9' matches no trunk"),
    ({"arch": "soft", "layers": "("}, r"^soft.layers='\(': missing \)"),
    ({"arch": "soft", "lambda_": -0.1}, r"^soft.lambda_ must be >= 0, got -0.1"),
    ({"arch": "mmoe", "num_experts": 0}, "^mmoe.num_experts must be >= 1, got 0"),
    ({"arch": "cross_stitch", "init_diagonal": 1.5},
     r"^cross_stitch.init_diagonal must be in \[0, 1\]"),
])
def test_bad_sharing_settings_raise(kwargs, match):
  data = _data()
  arch = kwargs.pop("arch")
  with pytest.raises(ValueError, match=match):
    multitask.make_model(arch, data.taskset, data.input_shape, hidden=(8,), **kwargs)
