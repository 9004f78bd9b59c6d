"""MOML (Ye et al., NeurIPS 2021, as LibMTL runs it): the exact
hypergradient against central finite differences of ``alpha ->
F_t(theta'(alpha))`` in float64; one objective step on quadratic losses
(hard inputs: gradient norms 100x apart, task sampling, an absent
objective) against the closed form with a numpy min-norm solver; one train
step against a float64 reference written from the paper's equations (per-slot
``jax.grad`` of the re-derived batches); the bad inputs, refused before
tracing; the catalog."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from mtljax import jacobians
from mtljax import objectives
from mtljax import optim
from mtljax import steps
from mtljax.data import sampling
from mtljax.models import multitask
from mtljax.objectives import bilevel

D = bilevel.MOML_DRAWS
WEIGHTS = np.array([1.0, 2.0, 0.5, 1.0])


# ---------------------------------------------------------------------------
# float64 references.
# ---------------------------------------------------------------------------


def _np_softmax(a):
  e = np.exp(a - a.max())
  return e / e.sum()


def _np_min_norm(k, present):
  """``argmin_{a in simplex over present} a^T K a`` by enumerating supports
  (float64 numpy): the candidate of each support from its KKT system,
  kept if feasible and optimal (``(K a)_j >= a^T K a`` for every present j);
  the best kept one. 0 on the absent entries."""
  idx = np.nonzero(present)[0]
  best, best_val = None, np.inf
  for r in range(1, len(idx) + 1):
    for s in itertools.combinations(idx, r):
      s = list(s)
      m = np.zeros((r + 1, r + 1))
      m[:r, :r] = 2 * k[np.ix_(s, s)]
      m[:r, r] = m[r, :r] = 1.0
      rhs = np.zeros(r + 1)
      rhs[r] = 1.0
      sol = np.linalg.lstsq(m, rhs, rcond=None)[0][:r]
      if np.any(sol < -1e-12) or abs(sol.sum() - 1) > 1e-9:
        continue
      a = np.zeros(len(k))
      a[s] = np.maximum(sol, 0.0)
      val = a @ k @ a
      if np.all((k @ a)[idx] >= val - 1e-9 * max(1.0, val)) and val < best_val - 1e-15:
        best, best_val = a, val
  return best


def _np_adam(a, m, v, t, g, lr, betas=(0.9, 0.999), eps=1e-8):
  """torch.optim.Adam's step ``t`` (1-based), bias-corrected, no decay."""
  m = betas[0] * m + (1 - betas[0]) * g
  v = betas[1] * v + (1 - betas[1]) * g * g
  mh, vh = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
  return a - lr * mh / (np.sqrt(vh) + eps), m, v


def _np_moml_alpha(h, upper_losses, present, alpha, lr, normalize):
  """MGDA on the hypergradient rows (LibMTL's normalisers), then Adam's first step."""
  norm = np.linalg.norm(h, axis=1)
  div = {"l2": norm, "none": np.ones_like(norm), "loss": upper_losses,
         "loss+": upper_losses * norm}[normalize]
  hn = h / np.where(div > 0, div, 1.0)[:, None]
  beta = _np_min_norm(hn @ hn.T, present)
  g = beta @ hn
  a1, m1, _ = _np_adam(alpha, 0.0, 0.0, 1, g, lr)
  return g, beta, a1, m1


def _task_means(ids, slot_values, num_tasks):
  onehot = jax.nn.one_hot(jnp.asarray(ids), num_tasks, dtype=slot_values.dtype)
  return (onehot.T @ slot_values) / jnp.maximum(onehot.sum(axis=0), 1.0)


def _reference_fns(model, ids, weights, inner_lr):
  """The paper's equations on one step's three draws, by definition (the
  model run per slot): ``L_i^d(theta)`` each task's mean slot loss of draw
  d, ``theta'(alpha) = theta - inner_lr grad_theta sum_i softmax(alpha)_i w_i
  L_i^1(theta)``, ``F(alpha) = w * L^2(theta'(alpha))`` ``[T]``. Returns
  jitted ``F(theta, alpha, x, ys)`` and ``grad_model(theta, alpha, x, ys)``
  (of ``sum_i softmax(alpha)_i w_i L_i^3``) and ``upper(theta, x, ys)``
  (``w * L^2(theta)``)."""
  k = len(ids) // D
  num_tasks = len(model.taskset)
  w = jnp.asarray(weights)

  def draw_losses(p, d, x, ys):
    sl = [helpers.slot_loss(model, p, x, ys, ids, s, False) for s in range(d * k, (d + 1) * k)]
    return _task_means(ids[d * k:(d + 1) * k], jnp.stack(sl), num_tasks)

  def weighted(p, a, d, x, ys):
    return jnp.sum(jax.nn.softmax(a) * w * draw_losses(p, d, x, ys))

  def f(theta, a, x, ys):
    g = jax.grad(weighted)(theta, a, 0, x, ys)
    theta2 = jax.tree.map(lambda p, b: p - inner_lr * b, theta, g)
    return w * draw_losses(theta2, 1, x, ys)

  return (jax.jit(f), jax.jit(lambda th, a, x, ys: jax.grad(weighted)(th, a, 2, x, ys)),
          jax.jit(lambda th, x, ys: w * draw_losses(th, 1, x, ys)))


def _three_draw_batch(data, sampler, seed, step):
  r_tasks, r_examples, _ = sampling.step_keys(jax.random.key(seed), step)
  b = steps.sample_batch(sampler, jax.tree.map(jnp.asarray, data.train), r_tasks, r_examples)
  return (np.asarray(b.task_ids), np.asarray(b.x),
          {g: np.asarray(y) for g, y in b.ys.items()})


# ---------------------------------------------------------------------------
# The hypergradient.
# ---------------------------------------------------------------------------


def test_the_hypergradient_matches_central_finite_differences_in_float64():
  """Under x64, on a 4-task MLP and a three-draw batch with unequal fixed
  weights and non-uniform logits: every entry of ``H[t, j] = d F_t / d
  alpha_j`` (through the look-ahead on the inner draw, F on the outer draw)
  equals the central finite difference (h = 1e-5) of the map written by
  definition, to 1e-6 relative."""
  with jax.enable_x64(True):
    data = helpers.toy_data()
    model = multitask.make_model("multi_head", data.taskset, data.input_shape, hidden=(8,))
    sampler = sampling.make_sampler(data.taskset, np.full(4, 0.25), 4, 8, draws=D)
    ids, x, ys = _three_draw_batch(data, sampler, seed=3, step=0)
    x = x.astype(np.float64)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.init(jax.random.key(1)))
    inner_lr = 0.3
    alpha = jnp.asarray([0.1, -0.4, 0.25, 0.7], jnp.float64)
    batch = helpers.batch(ids, x, ys, False)
    n = len(ids) // D
    w = WEIGHTS[ids]

    @jax.jit
    def hyper(params):
      lin = jacobians.linearize(model, params, batch, needs="sum")
      m, _ = bilevel.draw_means(jnp.asarray(ids), jnp.asarray(w) > 0, 4, D)
      _, vjp = jax.vjp(lambda p: lin.loss_at(p, slice(0, n)), lin.params)
      return bilevel.moml_hypergradient(
          lambda c: vjp(c)[0], lin.params, lambda p: lin.loss_at(p, slice(n, 2 * n)), alpha,
          lambda a: bilevel.slot_coefficients(jax.nn.softmax(a), m[0], jnp.asarray(w[:n])),
          m[1], jnp.asarray(w[n:2 * n]), inner_lr=inner_lr)

    got = np.asarray(hyper(params))
    f, _, _ = _reference_fns(model, ids, WEIGHTS, inner_lr)
    h = 1e-5
    fd = np.stack([(np.asarray(f(params, alpha + h * e, x, ys))
                    - np.asarray(f(params, alpha - h * e, x, ys))) / (2 * h)
                   for e in np.eye(4)], axis=1)
  assert np.abs(fd).max() > 1e-4  # a signal to compare
  np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-8 * np.abs(fd).max())
  # Every column sums to zero in alpha's direction (1, 1, 1, 1): the softmax
  # is invariant to a common shift, so is every F_t.
  np.testing.assert_allclose(got.sum(axis=1), 0.0, atol=1e-9 * np.abs(got).max())


# ---------------------------------------------------------------------------
# One objective step on quadratic losses: the closed form.
# ---------------------------------------------------------------------------


def _quadratic_linearization(a, b):
  """Slot losses ``L_k(theta) = 1/2 |A_k theta - b_k|^2`` of a shared vector,
  linearised at ``theta = 0``."""
  aj, bj = jnp.asarray(a), jnp.asarray(b)

  def loss_at(p, slots=slice(None)):
    r = jnp.einsum("kij,j->ki", aj[slots], p["shared"]) - bj[slots]
    return 0.5 * jnp.sum(r * r, axis=1)

  theta = {"shared": jnp.zeros(a.shape[-1], aj.dtype), "tasks": {}}
  losses, vjp = jax.vjp(loss_at, theta)
  return jacobians.Linearized(losses=losses, pullback=lambda c: vjp(c)[0], slot_grads=None,
                              rep_grads=None, rep_pullback=None, loss_at=loss_at,
                              one_pass=False, params=theta)


def test_one_step_follows_the_closed_form_on_hard_inputs():
  """Quadratic slot losses (x64), T = 5, K = 4 a draw: the inner draw holds
  task 1 twice (averaged), task 3 of fixed weight 0 (left out) and task 2;
  the outer draw tasks 0, 1, 4 and 3 (weight 0: no objective; task 4's slot
  scaled 10x: its hypergradient row 80-700x the others'); the model draw tasks 2, 0, 1, 4. Against numpy: ``H = -inner_lr g_F (w g_f)^T J_softmax``
  (LibMTL's formula), MGDA by support enumeration over the present
  objectives {0, 1, 4} with each normaliser, torch's first Adam step on
  every logit, the model's gradient ``sum_i softmax(alpha')_i w_i g_i`` of
  the model draw. An outer draw whose only task has weight 0 moves nothing."""
  rng = np.random.default_rng(24)  # min-norm point on an edge, away from 0
  p = 3
  a = rng.normal(size=(12, p, p))
  b = rng.normal(size=(12, p))
  a[6] *= 10.0
  b[6] *= 10.0
  ids = np.array([1, 1, 3, 2, 0, 1, 4, 3, 2, 0, 1, 4], np.int32)
  w_task = np.array([1.0, 2.0, 1.0, 0.0, 0.5])
  alpha0 = np.array([0.2, -0.1, 0.3, 0.0, 0.5])
  inner_lr, lr = 0.2, 0.01
  objs = {nm: objectives.make_objective("moml", 5, inner_lr=inner_lr, lr=lr, normalize=nm)
          for nm in bilevel.MOML_NORMALIZERS}

  @jax.jit
  def run(a, b, ids):
    lin = _quadratic_linearization(a, b)
    state = {"alpha": jnp.asarray(alpha0), "m": jnp.zeros(5), "v": jnp.zeros(5),
             "count": jnp.zeros(5, jnp.int32)}
    return {nm: o.gradients(lin, objectives.Inputs(ids, jnp.asarray(w_task), state, {},
                                                   jax.random.key(0)))
            for nm, o in objs.items()}

  with jax.enable_x64(True):
    res = run(a, b, jnp.asarray(ids))
    no_upper = run(a, b, jnp.asarray(np.array([1, 1, 3, 2, 3, 3, 3, 3, 2, 0, 1, 4], np.int32)))

  g_slot = np.stack([-a[k].T @ b[k] for k in range(12)])  # grad L_k(0)

  def per_task(draw):
    g, cnt = np.zeros((5, p)), np.zeros(5)
    for k in range(4 * draw, 4 * draw + 4):
      if w_task[ids[k]] > 0:
        g[ids[k]] += g_slot[k]
        cnt[ids[k]] += 1
    return g / np.maximum(cnt, 1)[:, None], cnt > 0

  g_inner, _ = per_task(0)
  s = _np_softmax(alpha0)
  theta2 = -inner_lr * (s * w_task) @ g_inner
  g_outer, cnt = np.zeros((5, p)), np.zeros(5)
  loss_outer = np.zeros(5)
  for k in range(4, 8):
    t = ids[k]
    if w_task[t] == 0:
      continue
    r = a[k] @ theta2 - b[k]
    g_outer[t] += w_task[t] * a[k].T @ r
    loss_outer[t] += w_task[t] * 0.5 * r @ r
    cnt[t] += 1
  g_outer /= np.maximum(cnt, 1)[:, None]
  loss_outer /= np.maximum(cnt, 1)
  js = np.diag(s) - np.outer(s, s)
  h = -inner_lr * g_outer @ (w_task[:, None] * g_inner).T @ js
  present = cnt > 0
  g_model, _ = per_task(2)
  # The losses "loss" divides by are at theta (= 0 here: lin.losses), not theta'.
  loss_at0 = np.zeros(5)
  for k in range(4, 8):
    if w_task[ids[k]] == 0:
      continue
    loss_at0[ids[k]] += w_task[ids[k]] * 0.5 * b[k] @ b[k] / cnt[ids[k]]
  for nm in bilevel.MOML_NORMALIZERS:
    g, beta, a1, m1 = _np_moml_alpha(h, loss_at0, present, alpha0, lr, nm)
    assert np.all(beta[~present] == 0) and np.sum(beta > 1e-6) == 2, (nm, beta)
    assert np.linalg.norm(g) > 1e-3, nm
    got = res[nm]
    np.testing.assert_allclose(np.asarray(got.measurements["objective_meta_grad_sum"]), g,
                               rtol=1e-7, atol=1e-10 * np.abs(g).max(), err_msg=nm)
    np.testing.assert_allclose(np.asarray(got.state["alpha"]), a1, rtol=1e-9, err_msg=nm)
    np.testing.assert_allclose(np.asarray(got.state["m"]), m1, rtol=1e-7, err_msg=nm)
    np.testing.assert_array_equal(np.asarray(got.state["count"]), np.ones(5))
    np.testing.assert_allclose(np.asarray(got.grads["shared"]),
                               (_np_softmax(a1) * w_task) @ g_model, rtol=1e-9, err_msg=nm)
  # The hard case is hard: the l2-normalised and the raw solves differ.
  assert not np.allclose(res["l2"].state["alpha"], res["none"].state["alpha"])
  for nm in bilevel.MOML_NORMALIZERS:
    np.testing.assert_array_equal(np.asarray(no_upper[nm].state["alpha"]), alpha0)
    np.testing.assert_array_equal(np.asarray(no_upper[nm].state["count"]), np.zeros(5))


# ---------------------------------------------------------------------------
# A train step.
# ---------------------------------------------------------------------------


def test_a_train_step_follows_the_papers_equations():
  """One step (K = T = 4, SGD lr 0.5, unequal weights, Adam rate 0.05 on
  alpha so it moves) against a float64 reference of the paper's update on
  the re-derived batches: ``H`` by x64 forward-mode autodiff of the
  definition, MGDA in numpy (support enumeration) on its l2-normalised rows,
  torch's Adam in numpy, then the model along ``grad sum_i softmax(alpha')_i
  w_i L_i`` of the third draw."""
  data = helpers.toy_data()
  model = multitask.make_model("multi_head", data.taskset, data.input_shape, hidden=(8,))
  tx = optim.make_optimizer("sgd", lr=0.5)
  sampler = sampling.make_sampler(data.taskset, np.full(4, 0.25), 4, 16, draws=D)
  obj = objectives.make_objective("moml", 4, lr=0.05, inner_lr=0.2)
  fn = jax.jit(steps.make_train_step(model, tx, obj, sampler,
                                     weights=WEIGHTS.astype(np.float32), seed=10))
  state = steps.init_train_state(model, tx, jax.random.key(0), obj)
  new, meas = fn(state, data.train)

  with jax.enable_x64(True):
    theta = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state.params)
    ids, x, ys = _three_draw_batch(data, sampler, seed=10, step=0)
    x = x.astype(np.float64)
    f, grad_model, upper = _reference_fns(model, ids, WEIGHTS, 0.2)
    alpha = np.full(4, 0.25)
    h = np.asarray(jax.jacfwd(f, argnums=1)(theta, jnp.asarray(alpha), x, ys))
    present = np.isin(np.arange(4), ids[len(ids) // D:2 * len(ids) // D])
    g, _, a1, m1 = _np_moml_alpha(h, np.asarray(upper(theta, x, ys)), present, alpha, 0.05,
                                  "l2")
    upd = grad_model(theta, jnp.asarray(a1), x, ys)
    theta = jax.tree.map(lambda p, g: np.asarray(p - 0.5 * g), theta, upd)

  np.testing.assert_allclose(np.asarray(new.objective_state["alpha"]), a1, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(new.objective_state["m"]), m1, rtol=1e-3,
                             atol=1e-3 * np.abs(m1).max())
  helpers.assert_trees_close(new.params, theta, rtol=1e-3, atol=1e-5)
  # Seed 10: the min-norm point is away from 0 (|g| = 0.33). At seeds 7, 9,
  # 14 the origin is in the hull of the four normalised rows, g is 0 up to
  # rounding, and Adam's first step (g / |g|) turns float32 noise into a
  # full-rate move: the comparison would be noise against noise.
  assert np.linalg.norm(g) > 0.1
  np.testing.assert_array_equal(np.asarray(meas["task_count"]), np.full(4, 3.0))


@pytest.mark.slow
def test_moml_trains_a_small_run():
  """300 steps (Adam 1e-2; alpha's rate 0.05 so it moves visibly) on the
  4-task toy data: every task's train loss falls below 90% of the first 50
  steps' mean, the total below half; the weights leave uniform and stay
  finite. (Task 3, the slowest, ends at 81%: MGDA over the hypergradients
  moves its weight from 0.25 to under 0.1 within 200 steps.)"""
  data = helpers.toy_data()
  model = multitask.make_model("multi_head", data.taskset, data.input_shape, hidden=(16,))
  tx = optim.make_optimizer("adam", lr=1e-2)
  obj = objectives.make_objective("moml", 4, lr=0.05)
  sampler = sampling.make_sampler(data.taskset, np.full(4, 0.25), 4, 16, draws=D)
  fn = jax.jit(steps.make_train_step(model, tx, obj, sampler, weights=np.ones(4), seed=5,
                                     steps_per_call=50))
  state = steps.init_train_state(model, tx, jax.random.key(0), obj)
  losses = []
  for _ in range(6):
    state, meas = fn(state, data.train)
    losses.append(np.asarray(meas["task_loss_sum"]) / np.asarray(meas["task_count"]))
  assert np.all(losses[-1] < 0.9 * losses[0]), losses
  assert losses[-1].sum() < 0.5 * losses[0].sum(), losses
  alpha = np.asarray(state.objective_state["alpha"])
  assert np.all(np.isfinite(alpha)) and np.ptp(alpha) > 0.1


# ---------------------------------------------------------------------------
# Bad inputs, before tracing; the catalog.
# ---------------------------------------------------------------------------


def test_bad_inputs_are_refused_before_tracing():
  data = helpers.toy_data()
  model = multitask.make_model("multi_head", data.taskset, data.input_shape, hidden=(8,))
  tx = optim.make_optimizer("sgd", lr=1.0)
  two = sampling.make_sampler(data.taskset, np.full(4, 0.25), 4, 8, draws=2)
  with pytest.raises(ValueError, match=r"objective.method='moml' reads 3 independent "
                                       r"mini-batch\(es\) .* draws=3\)"):
    steps.make_train_step(model, tx, "moml", two, weights=np.ones(4))
  for hp, msg in (({"lr": 0.0}, r"moml: lr and inner_lr must be > 0, got 0.0, 0.1"),
                  ({"inner_lr": -1.0}, r"inner_lr must be > 0"),
                  ({"normalize": "l1"}, r"moml: normalize='l1' is not one of")):
    with pytest.raises(ValueError, match=msg):
      objectives.make_objective("moml", 4, **hp)


def test_moml_is_listed_configured_and_benchmarked():
  import io  # pylint: disable=g-import-not-at-top
  from experiments import bench_objectives  # pylint: disable=g-import-not-at-top
  from experiments import main  # pylint: disable=g-import-not-at-top
  from experiments.configs import common  # pylint: disable=g-import-not-at-top
  c = common.base_config()
  assert c.objective.moml.to_dict() == {"lr": 1e-3, "inner_lr": 0.1, "normalize": "l2"}
  obj = objectives.make_objective("moml", 3)
  assert obj.draws == 3 and obj.needs == "sum"
  np.testing.assert_allclose(np.asarray(obj.init_state()["alpha"]), np.full(3, 1 / 3))
  assert "moml+shared" in bench_objectives._METHODS.default  # pylint: disable=protected-access
  out = io.StringIO()
  main.print_catalog(out)
  assert "moml" in out.getvalue()
