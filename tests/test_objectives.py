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


def _first_step_batch(data, probs, *, seed, k, b, shared_inputs=False):
  """The task ids, inputs, labels and method rng of a train step's step 0,
  re-derived from the documented random streams."""
  ts = data.taskset
  rng = jax.random.fold_in(jax.random.key(seed), 0)
  r_tasks, r_examples, r_method = jax.random.split(rng, 3)
  task_ids = sampling.sample_tasks(r_tasks, jnp.asarray(probs, jnp.float32), k)
  if shared_inputs:
    idx = jnp.broadcast_to(jax.random.randint(r_examples, (b,), 0, data.train["n"][0]),
                           (k, b))
  else:
    idx = sampling.example_indices(r_examples, task_ids, jnp.asarray(ts.stream_ids),
                                   jnp.asarray(data.train["n"]), b)
  x, ys = sampling.gather_batch(data.train, {"local_index": jnp.asarray(ts.local_index)},
                                task_ids, idx)
  return task_ids, x, ys, r_method


# Every method on the default path; the accumulate path (the same Gram matrix by
# another route) on one method per solver family: simplex, random order, Newton.
_CASES = ([(m, "jacobian") for m in sorted(gradients.GRADIENT_METHODS)] +
          [(m, "accumulate") for m in ("mgda", "pcgrad", "nash_mtl")])


@pytest.mark.parametrize("method, gram_path", _CASES)
def test_step_applies_the_method_to_per_task_gradients(method, gram_path):
  data = loading.build_task_data("toy", *test_train._shared_input_data())
  ts = data.taskset
  model = multitask.make_model("multi_head", ts, data.input_shape, hidden=(8,))
  tx = optim.make_optimizer("sgd", lr=1.0)  # update = -gradient
  probs = sampling.task_probabilities("uniform", data.num_train)
  weights = np.array([1.0, 2.0, 0.5, 1.0], np.float32)
  fn = train.make_train_step(model, tx, task_probs=probs, weights=weights,
                             tasks_per_step=3, examples_per_task=16, seed=5,
                             objective=method, objective_kwargs={"gram_path": gram_path})
  state = train.init_train_state(model, tx, jax.random.key(0))
  new, meas = jax.jit(fn)(state, data.train)

  # The reference: reproduce the step's samples, then one jax.grad per task.
  task_ids, x, ys, r_method = _first_step_batch(data, probs, seed=5, k=3, b=16)
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


def test_mgda_ub_weights_are_min_norm_on_representation_gradients():
  """MGDA-UB (Sener & Koltun 2018, sec. 3.3): beta solves the min-norm problem
  over the task gradients w.r.t. the shared representation Z of the one batch
  every slot sees; the shared update is grad of sum_k beta_k w_k L_k."""
  data = loading.build_task_data("toy", *test_train._shared_input_data())
  ts = data.taskset
  model = multitask.make_model("multi_head", ts, data.input_shape, hidden=(8,))
  tx = optim.make_optimizer("sgd", lr=1.0)
  probs = sampling.task_probabilities("uniform", data.num_train)
  weights = np.array([1.0, 2.0, 0.5, 1.0], np.float32)
  fn = train.make_train_step(model, tx, task_probs=probs, weights=weights,
                             tasks_per_step=4, examples_per_task=16, seed=5,
                             objective="mgda_ub", shared_inputs=True)
  state = train.init_train_state(model, tx, jax.random.key(0))
  new, meas = jax.jit(fn)(state, data.train)

  task_ids, x, ys, _ = _first_step_batch(data, probs, seed=5, k=4, b=16,
                                         shared_inputs=True)
  np.testing.assert_array_equal(x[0], x[3])  # one batch for every slot
  p = state["params"]
  z = model.features(p, x[:1], task_ids[:1])[0]  # [B, F]
  rows = []  # one jax.grad per task w.r.t. Z, in a plain loop
  for k in range(4):
    def loss_k(z, k=k):
      outs = model.heads(p, jnp.broadcast_to(z, (4,) + z.shape), task_ids)
      return weights[task_ids[k]] * train.output_losses(ts, outs, ys, task_ids)[k]
    rows.append(np.asarray(jax.grad(loss_k)(z), np.float64).ravel())
  g = np.stack(rows)
  gram = g @ g.T
  beta = np.asarray(meas["grad_weight_sum"], np.float64)[np.asarray(task_ids)]
  # KKT of min_{beta in simplex} beta^T K beta: (K beta)_j >= beta^T K beta for
  # every j, with equality on the support.
  assert abs(beta.sum() - 1) < 1e-5 and beta.min() > -1e-7
  kb, obj = gram @ beta, beta @ gram @ beta
  assert np.all(kb >= obj - 1e-4 * np.abs(gram).max())
  np.testing.assert_allclose(kb[beta > 1e-3], obj, rtol=1e-3, atol=1e-5)
  # Shared parameters: the gradient of the beta-weighted sum (one backward).
  want_sh = jax.grad(lambda sh: jnp.sum(
      jnp.asarray(beta, jnp.float32) * weights[task_ids] * train.slot_losses(
          model, {"shared": sh, "tasks": p["tasks"]}, x, ys, task_ids)))(p["shared"])
  for a, b, g0 in zip(jax.tree.leaves(new["params"]["shared"]),
                      jax.tree.leaves(p["shared"]), jax.tree.leaves(want_sh)):
    np.testing.assert_allclose(a, b - g0, rtol=1e-4, atol=2e-5)
  # Task-specific parameters: the plain gradient of the weighted sum.
  want_tp = jax.grad(lambda tp: jnp.sum(weights[task_ids] * train.slot_losses(
      model, {"shared": p["shared"], "tasks": tp}, x, ys, task_ids)))(p["tasks"])
  for a, b, g0 in zip(jax.tree.leaves(new["params"]["tasks"]),
                      jax.tree.leaves(p["tasks"]), jax.tree.leaves(want_tp)):
    np.testing.assert_allclose(a, b - g0, rtol=1e-4, atol=1e-5)
  # The conflict logs are those of the representation gradients.
  norms = np.asarray(meas["grad_norm_sum"])[np.asarray(task_ids)]
  np.testing.assert_allclose(norms, np.linalg.norm(g, axis=1), rtol=1e-4)


def test_mgda_ub_pure_function_is_mgda_on_representation_gradients():
  gz = jax.random.normal(jax.random.key(0), (3, 16, 5))  # [T, B, F]
  d, beta, _ = objectives.mgda_ub(gz)
  _, beta_flat, _ = objectives.mgda(gz.reshape(3, -1))
  np.testing.assert_allclose(beta, beta_flat, rtol=1e-6)
  np.testing.assert_allclose(d, jnp.tensordot(beta, gz, axes=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch, method, kwargs, shared, match", [
    ("multi_head", "mgda_ub", {}, False, "set config.sampling.shared_inputs=True"),
    ("concat", "mgda_ub", {}, True, "arch 'concat' does not have one"),
    ("multi_head", "fixed", {"gram_path": "accumulate"}, False,
     "gram_path='accumulate' applies to the gradient methods"),
    ("multi_head", "mgda_ub", {"gram_path": "accumulate"}, True, "mgda_ub never forms"),
    ("multi_head", "mgda", {"gram_path": "lazy"}, False, "gram_path='lazy' is not one of"),
])
def test_gradient_path_misuse_is_a_clear_error(arch, method, kwargs, shared, match):
  data = loading.build_task_data("toy", *test_train._shared_input_data())
  model = multitask.make_model(arch, data.taskset, data.input_shape, hidden=(8,))
  with pytest.raises(ValueError, match=match):
    train.make_train_step(model, optim.make_optimizer("sgd", lr=1.0),
                          task_probs=np.full(4, 0.25), weights=np.ones(4), tasks_per_step=2,
                          examples_per_task=4, objective=method, objective_kwargs=kwargs,
                          shared_inputs=shared)


def _compiled_scratch_bytes(depth, method, gram_path, k=4, b=8, width=256):
  data = loading.build_task_data("toy", *test_train._shared_input_data())
  model = multitask.make_model("multi_head", data.taskset, data.input_shape,
                               hidden=(width,) * depth)
  tx = optim.make_optimizer("sgd", lr=0.1)
  state = train.init_train_state(model, tx, jax.random.key(0))
  fn = train.make_train_step(model, tx, task_probs=np.full(4, 0.25), weights=np.ones(4),
                             tasks_per_step=k, examples_per_task=b, objective=method,
                             objective_kwargs={"gram_path": gram_path})
  stats = jax.jit(fn).lower(state, data.train).compile().memory_analysis()
  if stats is None:
    pytest.skip("this backend reports no compiled memory statistics")
  return stats.temp_size_in_bytes


def test_accumulated_gram_path_never_holds_the_per_task_jacobian():
  """Compiled scratch memory as the shared trunk deepens by 4 layers of
  256 x 256: "jacobian" grows by the K slot gradients of every added layer,
  "accumulate" by at most a fraction of one layer's (activations only)."""
  k, layer_bytes = 4, 4 * 4 * 256 * 256  # K slot gradients of one kernel
  growth = {path: _compiled_scratch_bytes(6, "mgda", path) -
            _compiled_scratch_bytes(2, "mgda", path) for path in ("jacobian", "accumulate")}
  assert growth["jacobian"] >= 4 * 0.8 * layer_bytes, growth
  assert growth["accumulate"] <= 4 * 0.25 * layer_bytes, growth


def test_cagrad_c_out_of_range_raises():
  with pytest.raises(ValueError, match=r"cagrad_c must be in \[0, 1\)"):
    objectives.make_combiner("cagrad", cagrad_c=1.5)


# ---------------------------------------------------------------------------
# Loss weighting
# ---------------------------------------------------------------------------


def _run(method, steps, k=4, weights=None, **kwargs):
  data = loading.build_task_data("toy", *test_train._shared_input_data())
  ts = data.taskset
  model = multitask.make_model("multi_head", ts, data.input_shape, hidden=(8,))
  tx = optim.make_optimizer("adam", lr=1e-2)
  fn = train.make_train_step(
      model, tx, task_probs=sampling.task_probabilities("uniform", data.num_train),
      weights=tasks.task_weights(ts, weights), tasks_per_step=k, examples_per_task=16,
      objective=method, objective_kwargs=kwargs)
  state = train.init_train_state(model, tx, jax.random.key(0), method, kwargs)
  step = jax.jit(fn)
  history = []
  for _ in range(steps):
    new, meas = step(state, data.train)
    history.append((state, meas))
    state = new
  return state, history


def test_rlw_weights_are_a_softmax_of_standard_normals():
  lam = np.asarray(jax.vmap(lambda r: objectives.rlw_weights(r, 4))(
      jax.random.split(jax.random.key(0), 20_000)))
  np.testing.assert_allclose(lam.sum(axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(lam.mean(axis=0), 0.25, atol=0.005)  # exchangeable
  z = np.log(lam)  # log-softmax of N(0, I): differences are N(0, 2)
  np.testing.assert_allclose(np.var(z[:, 0] - z[:, 1]), 2.0, rtol=0.05)
  # In the step, the objective is sum_k w lambda L_k with that lambda.
  _, hist = _run("rlw", 1)
  _, meas = hist[0]
  rng = jax.random.split(jax.random.fold_in(jax.random.key(0), 0), 3)[2]
  want = objectives.rlw_weights(rng, 4)
  np.testing.assert_allclose(meas["objective_lambda_sum"], want, rtol=1e-6)
  np.testing.assert_allclose(meas["loss"], float(want @ np.asarray(meas["task_loss_sum"])),
                             rtol=1e-5)


def test_dwa_weights_follow_the_paper_formula():
  # Feed known losses: windows of 2 steps, 3 tasks, temperature 2.
  lw = objectives.make_loss_weighting("dwa", 3, dwa_temperature=2.0, dwa_window_steps=2)
  st = lw.init_state()
  ids = jnp.array([0, 1, 2])
  w = jnp.ones(3)
  seq = [[4.0, 2.0, 1.0], [2.0, 2.0, 1.0], [1.0, 3.0, 1.0], [1.0, 1.0, 1.0],
         [0.5, 1.0, 2.0]]
  for i, l in enumerate(seq):
    _, lam = lw.objective(jnp.array(l), ids, w, st, {}, None)
    if i < 4:  # fewer than two complete windows so far
      np.testing.assert_allclose(lam, 1.0)
    st = lw.update(st, jnp.array(l), ids)
  # Window means: n-2 = (3, 2, 1), n-1 = (1, 2, 1).
  r = np.array([1 / 3, 1.0, 1.0])
  want = 3 * np.exp(r / 2) / np.exp(r / 2).sum()
  _, lam = lw.objective(jnp.array(seq[-1]), ids, w, st, {}, None)
  np.testing.assert_allclose(lam, want, rtol=1e-6)


def test_uncertainty_weighting_optimum_is_log_loss():
  lw = objectives.make_loss_weighting("uncertainty", 3)
  losses = jnp.array([0.3, 2.0, 5.0])
  ids = jnp.arange(3)

  def f(s):
    return lw.objective(losses, ids, jnp.ones(3), {}, {"log_var": s}, None)[0]
  s_star = jnp.log(losses)
  np.testing.assert_allclose(jax.grad(f)(s_star), 0.0, atol=1e-6)  # stationary
  # ... and a minimum: moving s either way increases the objective.
  for delta in (-0.1, 0.1):
    assert f(s_star + delta) > f(s_star)


def test_uncertainty_log_var_is_a_per_task_parameter_frozen_when_unsampled():
  state, hist = _run("uncertainty", 6, k=1)
  s_hist = [np.asarray(h[0]["params"]["tasks"]["uncertainty"]["log_var"]) for h in hist]
  s_hist.append(np.asarray(state["params"]["tasks"]["uncertainty"]["log_var"]))
  for i, (_, meas) in enumerate(hist):
    sampled = np.asarray(meas["task_count"]) > 0
    assert np.array_equal(s_hist[i][~sampled], s_hist[i + 1][~sampled])
    assert not np.array_equal(s_hist[i][sampled], s_hist[i + 1][sampled])


def test_min_max_gradient_is_the_worst_tasks_gradient():
  lw = objectives.make_loss_weighting("min_max", 3)
  w = jnp.array([1.0, 2.0, 1.0])
  ids = jnp.array([2, 0, 1])
  g = jax.grad(lambda l: lw.objective(l, ids, w, {}, {}, None)[0])(jnp.array([1.0, 0.4, 0.7]))
  # w * L = (1.0, 0.4, 1.4): the third slot (task 1, weight 2) is the worst.
  np.testing.assert_allclose(g, [0.0, 0.0, 2.0])


def _small_step(arch, objective, **kwargs):
  data = loading.build_task_data("toy", *test_train._shared_input_data())
  model = multitask.make_model(arch, data.taskset, data.input_shape, hidden=(8,))
  tx = optim.make_optimizer("adam", lr=1e-2)
  fn = train.make_train_step(model, tx, task_probs=np.full(4, 0.25), weights=np.ones(4),
                             tasks_per_step=2, examples_per_task=4, objective=objective,
                             objective_kwargs=kwargs)
  return data, model, tx, fn


def test_state_initialised_for_another_objective_is_a_clear_error():
  data, model, tx, fn = _small_step("multi_head", "dwa")
  state = train.init_train_state(model, tx, jax.random.key(0))  # "fixed"
  with pytest.raises(ValueError, match="not initialised for objective 'dwa'"):
    fn(state, data.train)


def test_unknown_objective_kwargs_raise_instead_of_being_ignored():
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['cagrad_C'\]"):
    _small_step("multi_head", "cagrad", cagrad_C=0.3)


def test_famo_objective_gradient_weights_sum_to_one():
  lw = objectives.make_loss_weighting("famo", 3)
  st = lw.init_state()
  st["xi"] = jnp.array([0.3, -0.2, 0.5])
  losses = jnp.array([0.5, 2.0, 1.2])
  ids = jnp.arange(3)
  g = jax.grad(lambda l: lw.objective(l, ids, jnp.ones(3), st, {}, None)[0])(losses)
  z = np.exp([0.3, -0.2, 0.5]); z /= z.sum()
  d = np.array([0.5, 2.0, 1.2]) + 1e-8
  want = z / d / np.sum(z / d)  # d/dL_i of sum z log D / c, c held fixed
  np.testing.assert_allclose(g, want, rtol=1e-5)
  np.testing.assert_allclose(np.sum(g), 1.0, rtol=1e-5)


def test_famo_update_matches_the_authors_rule_in_float64():
  lr, gamma, b1, b2, eps = 0.025, 0.01, 0.9, 0.999, 1e-8
  lw = objectives.make_loss_weighting("famo", 3, famo_w_lr=lr, famo_gamma=gamma)
  st = lw.init_state()
  ids = jnp.arange(3)
  xi = np.zeros(3); m = np.zeros(3); v = np.zeros(3)
  rng = np.random.default_rng(0)
  for t in range(1, 6):
    before = rng.uniform(0.5, 2.0, 3)
    after = before * rng.uniform(0.7, 1.1, 3)
    st = lw.update(st, jnp.asarray(before, jnp.float32), ids, jnp.asarray(after, jnp.float32))
    delta = np.log(before + 1e-8) - np.log(after + 1e-8)
    z = np.exp(xi) / np.exp(xi).sum()
    g = (np.diag(z) - np.outer(z, z)) @ delta + gamma * xi  # softmax VJP + L2 decay
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    xi = xi - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    np.testing.assert_allclose(st["xi"], xi, rtol=1e-4, atol=1e-6)


def test_gradient_method_without_shared_parameters_is_a_clear_error():
  data, model, tx, fn = _small_step("independent", "mgda")
  state = train.init_train_state(model, tx, jax.random.key(0), "mgda")
  with pytest.raises(ValueError, match="arch 'independent' has none"):
    fn(state, data.train)


def _np_adam(x, g, m, v, t, lr, b1=0.9, b2=0.999, eps=1e-8):
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g * g
  return x - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps), m, v


def test_gradnorm_update_matches_algorithm_1_in_float64():
  alpha, lr = 1.5, 0.025
  st = objectives.gradnorm_init(3, lr)
  ids = jnp.arange(3)
  w, m, v = np.ones(3), np.zeros(3), np.zeros(3)
  l0 = None
  rng = np.random.default_rng(1)
  for t in range(1, 5):
    norms = rng.uniform(0.5, 3.0, 3)
    losses = rng.uniform(0.2, 2.0, 3)
    st, _ = objectives.gradnorm_update(st, jnp.asarray(norms, jnp.float32),
                                       jnp.asarray(losses, jnp.float32), ids,
                                       alpha=alpha, w_lr=lr)
    l0 = losses if l0 is None else l0
    ratio = losses / l0
    r = ratio / ratio.mean()
    g_i = w * norms
    target = g_i.mean() * r ** alpha
    grad = np.sign(g_i - target) * norms
    w, m, v = _np_adam(w, grad, m, v, t, lr)
    w = 3 * w / w.sum()
    np.testing.assert_allclose(st["w"], w, rtol=1e-5)
    np.testing.assert_allclose(st["initial_loss"], l0, rtol=1e-6)


def test_gradnorm_step_uses_gradient_norms_of_the_last_shared_layer():
  data = loading.build_task_data("toy", *test_train._shared_input_data())
  ts = data.taskset
  model = multitask.make_model("multi_head", ts, data.input_shape, hidden=(8, 6))
  tx = optim.make_optimizer("adam", lr=1e-2)
  probs = sampling.task_probabilities("uniform", data.num_train)
  fn = train.make_train_step(model, tx, task_probs=probs, weights=np.ones(4),
                             tasks_per_step=3, examples_per_task=16, seed=3,
                             objective="gradnorm")
  state = train.init_train_state(model, tx, jax.random.key(0), "gradnorm")
  new, meas = jax.jit(fn)(state, data.train)
  # Reference: the step's samples, then one jax.grad per slot w.r.t. layer_1's kernel.
  task_ids, x, ys, _ = _first_step_batch(data, probs, seed=3, k=3, b=16)
  p = state["params"]
  norms, losses = [], []
  for k in range(3):
    g = jax.grad(lambda p: train.slot_losses(model, p, x, ys, task_ids)[k])(p)
    norms.append(np.linalg.norm(g["shared"]["trunk"]["layer_1"]["kernel"]))
    losses.append(float(train.slot_losses(model, p, x, ys, task_ids)[k]))
  want, _ = objectives.gradnorm_update(
      state["objective_state"], jnp.asarray(norms, jnp.float32),
      jnp.asarray(losses, jnp.float32), task_ids, alpha=1.5, w_lr=0.025)
  np.testing.assert_allclose(new["objective_state"]["w"], want["w"], rtol=1e-5)
