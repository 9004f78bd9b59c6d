"""Under ``jax_enable_x64`` every public gradient method and the train step with
every objective run, and change nothing but the precision: the same seed
samples the same batch (the sampling draws have fixed dtypes), a float32 state
steps to the float32 result, and a float64 state steps in float64 (its logged
losses equal float64 losses of the re-derived batch to 1e-12).

The fast tier runs mgda's public function (its active-set loop carried an
integer dtype), the sampling draws, and the step with imtl (state, its own
parameters and their hand-written gradients: the step's dtype casts); the
rest is in the slow tier: the other public methods, and the step with every
other objective (mgda's step is its public function inside the step; dwa,
moco, famo, db_mtl, stch and excess_mtl carried float dtypes in their state:
the casts imtl's case runs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
import test_gradients  # its METHODS: each public function, pcgrad with a key
from mtljax import gradients
from mtljax import objectives
from mtljax import optim
from mtljax import steps
from mtljax.data import sampling
from mtljax.models import multitask

_PROBS = np.full(4, 0.25)
_FAST = ("imtl",)


@pytest.mark.parametrize("name", [
    n if n == "mgda" else pytest.param(n, marks=pytest.mark.slow)
    for n in gradients.REGISTRY])
def test_every_public_gradient_method_runs_in_float64_and_matches_float32(name):
  """Each public method on float64 rows gives float64 weights that agree with
  its float32 result on an easy problem (mgda's exact and active-set solvers
  both: its while-loop state changed integer width under x64; the other
  methods in the slow tier)."""
  g = np.random.default_rng(0).normal(size=(4, 7))
  g[0] *= 10.0
  fn = jax.jit(test_gradients.METHODS[name])
  want = np.asarray(fn(jnp.asarray(g, jnp.float32))[1], np.float64)
  with jax.enable_x64(True):
    d, beta, _ = fn(jnp.asarray(g, jnp.float64))
    assert d.dtype == jnp.float64 and beta.dtype == jnp.float64, name
    np.testing.assert_allclose(np.asarray(beta), want, rtol=2e-3, atol=2e-4)
    if name == "mgda":
      beta, info = jax.jit(lambda k: gradients.mgda_weights(k, exact_up_to=0, iters=2000))(
          jnp.asarray(g @ g.T))
      assert bool(info["converged"]) and beta.dtype == jnp.float64
      np.testing.assert_allclose(np.asarray(beta), want, atol=2e-4)


def test_sampling_draws_the_same_under_x64():
  """Task ids (without and with replacement, from float32 or float64
  probabilities) and per-slot example indices are the same draws with and
  without x64, in int32."""
  key = jax.random.key(3)
  probs = np.array([0.1, 0.2, 0.3, 0.4])
  n = jnp.asarray([50, 7, 1000, 3], jnp.int32)
  stream = jnp.arange(4, dtype=jnp.int32)

  def draws(p):
    ids = sampling.sample_tasks(key, p, 3)
    with_replacement = sampling.sample_tasks(key, p, 6, replace=True)
    idx = sampling.example_indices(key, with_replacement, stream, n, 5)
    shared = sampling.shared_example_indices(key, ids, n, 5)
    return ids, with_replacement, idx, shared
  want = [np.asarray(a) for a in draws(jnp.asarray(probs, jnp.float32))]
  with jax.enable_x64(True):
    for p in (jnp.asarray(probs, jnp.float32), jnp.asarray(probs, jnp.float64)):
      got = draws(p)
      for a, b in zip(got, want):
        assert a.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(a), b)


def _setup(method):
  data = helpers.toy_data()
  model = multitask.make_model("multi_head", data.taskset, data.input_shape, hidden=(8,))
  tx = optim.make_optimizer("adam", lr=0.1)
  obj = objectives.make_objective(method, 4)
  obj = objectives.bind_shared(obj, jax.eval_shape(model.init, jax.random.key(0))["shared"])
  fn = jax.jit(steps.make_train_step(
      model, tx, obj, sampling.make_sampler(data.taskset, _PROBS, 3, 8, shared_inputs=True,
                                            draws=obj.draws),
      weights=np.ones(4), seed=5))
  return data, model, tx, fn


@pytest.mark.parametrize("method", [
    m if m in _FAST else pytest.param(m, marks=pytest.mark.slow) for m in objectives.methods()])
def test_the_step_under_x64_changes_only_the_precision(method):
  """With a float64 state (every objective) and, for the fast tier's case, a
  float32 state under x64 against the float32 step: the float32 state's path
  is the sampling and the step's casts, the same for every objective, so the
  slow cases compile the float64 step only (one program, not three)."""
  data, model, tx, fn = _setup(method)
  if method in _FAST:
    state32 = steps.init_train_state(model, tx, jax.random.key(0), method)
    want, _ = fn(state32, data.train)
    with jax.enable_x64(True):
      got, _ = fn(state32, data.train)           # a float32 state: the float32 step
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):   # the whole state
      assert a.dtype == b.dtype, (a.dtype, b.dtype)
    helpers.assert_trees_close(got.params, want.params, rtol=1e-5, atol=1e-5)
    helpers.assert_trees_close(got.objective_state, want.objective_state, rtol=1e-5,
                               atol=1e-5)
  with jax.enable_x64(True):
    state64 = steps.init_train_state(model, tx, jax.random.key(0), method)
    new64, meas = fn(state64, data.train)
  # A float64 state: float64 parameters, finite, the objective's state in its
  # declared dtypes, and the logged losses are float64 losses of the batch the
  # float32 sampling draws (re-derived with numpy indexing).
  assert all(l.dtype == jnp.float64 for l in jax.tree.leaves(new64.params["shared"]))
  assert all(np.all(np.isfinite(np.asarray(l))) for l in jax.tree.leaves(new64.params))
  for a, b in zip(jax.tree.leaves(new64.objective_state),
                  jax.tree.leaves(state64.objective_state)):
    assert a.dtype == b.dtype
  ids, x, ys, _ = helpers.step_batch(data, _PROBS, seed=5, k=3, b=8, shared_inputs=True)
  draws = objectives.make_objective(method, 4).draws
  if draws > 1:  # MoDo, SDMGrad: three draws a task; Auto-lambda two
    # (their losses: test_double_sampling and test_auto_lambda re-derive the draws)
    np.testing.assert_array_equal(np.asarray(meas["task_count"]),
                                  draws * np.bincount(ids, minlength=4))
    return
  with jax.enable_x64(True):
    losses = [float(helpers.slot_loss(model, state64.params, x.astype(np.float64), ys, ids,
                                      s, True)) for s in range(3)]
  np.testing.assert_allclose(np.asarray(meas["task_loss_sum"]),
                             np.bincount(ids, losses, minlength=4), rtol=1e-12)
