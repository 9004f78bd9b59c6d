"""Auto-lambda (Liu, Davison & Johns, TMLR 2022): the meta-gradient against
central finite differences of ``lambda -> L_meta(theta'(lambda))`` in float64
(and the authors' finite-difference option against it); two train steps
against a float64 reference written from the paper's equations (per-slot
``jax.grad`` of the re-derived batches, torch's Adam in numpy); the per-task
Adam with task sampling against numpy; the bad inputs, refused before
tracing; the catalog."""

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

D = bilevel.DRAWS
WEIGHTS = np.array([1.0, 2.0, 0.5, 1.0])


# ---------------------------------------------------------------------------
# float64 references.
# ---------------------------------------------------------------------------


def _task_means(ids, slot_values, num_tasks):
  """``[T]`` jnp: the mean of each task's slot values (0 for a task without)."""
  onehot = jax.nn.one_hot(jnp.asarray(ids), num_tasks, dtype=slot_values.dtype)
  return (onehot.T @ slot_values) / jnp.maximum(onehot.sum(axis=0), 1.0)


def _reference_fns(model, ids, weights, alpha):
  """The paper's equations on one step's two draws (``ids`` the ``2K``
  slots), by definition: ``L_i^d(theta)`` each task's mean slot loss of draw
  d (the model run per slot), ``theta'(lambda) = theta - alpha grad_theta
  sum_i w_i lambda_i L_i^1(theta)``, ``f(lambda) = sum_{i in primary} w_i
  L_i^2(theta'(lambda))``. Returns jitted ``f(theta, lam, primary, x, ys)``
  and ``grad_train(theta, lam, x, ys)``."""
  k = len(ids) // D
  num_tasks = len(model.taskset)
  w = jnp.asarray(weights)

  def draw_losses(p, d, x, ys):
    sl = [helpers.slot_loss(model, p, x, ys, ids, s, False) for s in range(d * k, (d + 1) * k)]
    return _task_means(ids[d * k:(d + 1) * k], jnp.stack(sl), num_tasks)

  def train_obj(p, lam, x, ys):
    return jnp.sum(w * lam * draw_losses(p, 0, x, ys))

  def f(theta, lam, primary, x, ys):
    g = jax.grad(train_obj)(theta, lam, x, ys)
    theta2 = jax.tree.map(lambda a, b: a - alpha * b, theta, g)
    return jnp.sum(w * primary * draw_losses(theta2, 1, x, ys))

  return jax.jit(f), jax.jit(jax.grad(train_obj))


def _np_adam(lam, m, v, count, g, active, lr, betas=(0.9, 0.999), eps=1e-8):
  """torch.optim.Adam (bias-corrected) on the active entries, per-entry step counts."""
  lam, m, v, count = (np.array(a, np.float64) for a in (lam, m, v, count))
  for i in np.nonzero(active)[0]:
    count[i] += 1
    m[i] = betas[0] * m[i] + (1 - betas[0]) * g[i]
    v[i] = betas[1] * v[i] + (1 - betas[1]) * g[i] ** 2
    mh, vh = m[i] / (1 - betas[0] ** count[i]), v[i] / (1 - betas[1] ** count[i])
    lam[i] -= lr * mh / (np.sqrt(vh) + eps)
  return lam, m, v, count


def _two_draw_batch(data, sampler, seed, step):
  """The step's batch (``steps.sample_batch`` with the step's keys: the
  draws' keys themselves are checked in tests/test_double_sampling.py)."""
  r_tasks, r_examples, _ = sampling.step_keys(jax.random.key(seed), step)
  b = steps.sample_batch(sampler, jax.tree.map(jnp.asarray, data.train), r_tasks, r_examples)
  return (np.asarray(b.task_ids), np.asarray(b.x),
          {g: np.asarray(y) for g, y in b.ys.items()})


# ---------------------------------------------------------------------------
# The meta-gradient.
# ---------------------------------------------------------------------------


def test_the_meta_gradient_matches_central_finite_differences_in_float64():
  """Under x64, on a 4-task MLP and a two-draw batch with unequal fixed
  weights: the objective's exact meta-gradient equals the central finite
  difference of ``lambda -> L_meta(theta'(lambda))`` (written by definition,
  h = 1e-5) to 1e-6 relative, for every task primary and for primary tasks
  {1, 3}; the authors' finite-difference option to 5% of the largest entry."""
  with jax.enable_x64(True):
    data = helpers.toy_data()
    model = multitask.make_model("multi_head", data.taskset, data.input_shape, hidden=(8,))
    sampler = sampling.make_sampler(data.taskset, np.full(4, 0.25), 4, 8, draws=D)
    ids, x, ys = _two_draw_batch(data, sampler, seed=3, step=0)
    x = x.astype(np.float64)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                          model.init(jax.random.key(1)))
    alpha = 0.3
    lam = jnp.asarray([0.1, 0.4, 0.25, 0.7], jnp.float64)
    batch = helpers.batch(ids, x, ys, False)
    prims = {(): np.ones(4), (1, 3): np.array([0.0, 1.0, 0.0, 1.0])}
    objs = {(p, mg): objectives.make_objective("auto_lambda", 4, primary=p, lookahead_lr=alpha,
                                               meta_grad=mg)
            for p in prims for mg in bilevel.META_GRADS}

    @jax.jit
    def meta_grads(params):
      lin = jacobians.linearize(model, params, batch, needs="sum")
      state = {"lambda": lam, "m": jnp.zeros(4), "v": jnp.zeros(4),
               "count": jnp.zeros(4, jnp.int32)}
      out = {}
      for key, o in objs.items():
        res = o.gradients(lin, objectives.Inputs(jnp.asarray(ids), jnp.asarray(WEIGHTS), state,
                                                 {}, jax.random.key(0)))
        out[key] = res.measurements["objective_meta_grad_sum"]
      return out

    got = meta_grads(params)
    h = 1e-5
    f, _ = _reference_fns(model, ids, WEIGHTS, alpha)
    for p, prim in prims.items():
      fd = np.array([(float(f(params, lam + h * e, prim, x, ys))
                      - float(f(params, lam - h * e, prim, x, ys))) / (2 * h)
                     for e in np.eye(4)])
      assert np.abs(fd).max() > 1e-4  # a signal to compare
      exact = np.asarray(got[(p, "exact")])
      np.testing.assert_allclose(exact, fd, rtol=1e-6, atol=1e-9 * np.abs(fd).max(),
                                 err_msg=str(p))
      # The authors' step is 0.01 long in parameter space, not small on this
      # 8-unit ReLU MLP: off by up to 3% of the largest entry (measured).
      np.testing.assert_allclose(np.asarray(got[(p, "finite_difference")]), exact, rtol=0,
                                 atol=0.05 * np.abs(exact).max(), err_msg=str(p))
    # Only the primary tasks' meta loss: task 0 and 2 are not in it, yet
    # their weights get a meta-gradient (their train gradients move theta').
    assert np.all(np.asarray(got[((1, 3), "exact")]) != 0)
    assert not np.allclose(got[((1, 3), "exact")], got[((), "exact")])


def _quadratic_linearization(a, b):
  """Slot losses ``L_k(theta) = 1/2 |A_k theta - b_k|^2`` (``a [2K, P, P]``,
  ``b [2K, P]``) of a shared vector ``theta`` as a ``Linearized`` at
  ``theta = 0`` (its ``loss_at`` takes the static slot slice)."""
  aj, bj = jnp.asarray(a), jnp.asarray(b)

  def loss_at(p, slots=slice(None)):
    r = jnp.einsum("kij,j->ki", aj[slots], p["shared"]) - bj[slots]
    return 0.5 * jnp.sum(r * r, axis=1)

  theta = {"shared": jnp.zeros(a.shape[-1], aj.dtype), "tasks": {}}
  losses, vjp = jax.vjp(loss_at, theta)
  return jacobians.Linearized(losses=losses, pullback=lambda c: vjp(c)[0], slot_grads=None,
                              rep_grads=None, rep_pullback=None, loss_at=loss_at,
                              one_pass=False, params=theta)


def test_task_sampling_follows_the_closed_form_restricted_update():
  """Quadratic slot losses (x64), T = 5 tasks, K = 3 slots a draw: the train
  draw holds task 1 twice (averaged), task 3 with fixed weight 0 (left out),
  the meta draw tasks 0, 1, 4, primary {1, 2, 4}. The meta-gradient is the
  closed form ``-alpha <grad L_meta(theta'), grad L_i(theta)>`` (numpy), only
  task 1 (in the train draw, weight > 0) moves, by torch's first Adam step;
  the model's gradient is ``sum_i w_i lambda'_i grad L_i`` of the train
  draw; a meta draw without a primary task moves nothing."""
  rng = np.random.default_rng(4)
  p = 3
  a = rng.normal(size=(6, p, p))
  b = rng.normal(size=(6, p))
  ids = np.array([1, 1, 3, 0, 1, 4], np.int32)
  w_task = np.array([1.0, 2.0, 1.0, 0.0, 0.5])
  lam0 = np.array([0.1, 0.3, 0.2, 0.4, 0.5])
  alpha, lr = 0.2, 0.01
  prim = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
  obj = objectives.make_objective("auto_lambda", 5, primary=(1, 2, 4), lookahead_lr=alpha,
                                  lr=lr)

  @jax.jit
  def run(a, b, ids):
    lin = _quadratic_linearization(a, b)
    state = {"lambda": jnp.asarray(lam0), "m": jnp.zeros(5), "v": jnp.zeros(5),
             "count": jnp.zeros(5, jnp.int32)}
    return obj.gradients(lin, objectives.Inputs(ids, jnp.asarray(w_task), state, {},
                                                jax.random.key(0)))

  with jax.enable_x64(True):
    res = run(a, b, jnp.asarray(ids))
    no_primary = run(a, b, jnp.asarray(np.array([1, 1, 3, 0, 3, 3], np.int32)))

  # numpy: grad L_k(0) = -A_k^T b_k; per-task train gradient = mean over its slots.
  g_slot = np.stack([-a[k].T @ b[k] for k in range(6)])
  g_train = np.zeros((5, p))
  g_train[1] = (g_slot[0] + g_slot[1]) / 2
  g_train[3] = g_slot[2]
  step = sum(w_task[i] * lam0[i] * g_train[i] for i in range(5))
  theta2 = -alpha * step
  d = sum(prim[t] * w_task[t] * a[k].T @ (a[k] @ theta2 - b[k])
          for k, t in zip(range(3, 6), ids[3:]))
  meta = -alpha * (w_task * (g_train @ d))
  moves = np.array([False, True, False, False, False])  # task 3's weight is 0
  np.testing.assert_allclose(np.asarray(res.measurements["objective_meta_grad_sum"]),
                             np.where(moves, meta, 0.0), rtol=1e-10, atol=1e-12)
  lam1, _, _, count = _np_adam(lam0, np.zeros(5), np.zeros(5), np.zeros(5), meta, moves, lr)
  np.testing.assert_allclose(np.asarray(res.state["lambda"]), lam1, rtol=1e-12)
  np.testing.assert_array_equal(np.asarray(res.state["count"]), count)
  np.testing.assert_allclose(np.asarray(res.grads["shared"]),
                             sum(w_task[i] * lam1[i] * g_train[i] for i in range(5)),
                             rtol=1e-10)
  np.testing.assert_array_equal(np.asarray(no_primary.state["lambda"]), lam0)
  np.testing.assert_array_equal(np.asarray(no_primary.state["count"]), np.zeros(5))


# ---------------------------------------------------------------------------
# Train steps.
# ---------------------------------------------------------------------------


def test_two_train_steps_follow_the_papers_equations():
  """Two steps (K = T = 4, SGD lr 0.5, unequal weights, Adam rate 0.05 on
  lambda so it moves) of each meta-gradient in one program against a float64
  reference of the paper's update: ``g_lambda`` by x64 autodiff through the
  look-ahead on the re-derived batches, torch's Adam in numpy, then the model
  along ``grad sum_i w_i lambda'_i L_i^1`` with the updated weights."""
  data = helpers.toy_data()
  model = multitask.make_model("multi_head", data.taskset, data.input_shape, hidden=(8,))
  tx = optim.make_optimizer("sgd", lr=0.5)
  sampler = sampling.make_sampler(data.taskset, np.full(4, 0.25), 4, 16, draws=D)
  hp = dict(lr=0.05, lookahead_lr=0.2, init=0.3)
  objs = [objectives.make_objective("auto_lambda", 4, meta_grad=mg, **hp)
          for mg in bilevel.META_GRADS]
  fns = [steps.make_train_step(model, tx, o, sampler, weights=WEIGHTS.astype(np.float32),
                               seed=7) for o in objs]
  states = [steps.init_train_state(model, tx, jax.random.key(0), o) for o in objs]
  run = jax.jit(lambda sts, tr: [f(s, tr) for f, s in zip(fns, sts)])
  one = run(states, data.train)
  two = run([s for s, _ in one], data.train)

  with jax.enable_x64(True):
    theta = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), states[0].params)
    lam, m, v, count = np.full(4, 0.3), np.zeros(4), np.zeros(4), np.zeros(4)
    fns = {}
    for step in range(2):
      ids, x, ys = _two_draw_batch(data, sampler, seed=7, step=step)
      x = x.astype(np.float64)
      if tuple(ids) not in fns:
        f, grad_train = _reference_fns(model, ids, WEIGHTS, hp["lookahead_lr"])
        fns[tuple(ids)] = jax.jit(jax.grad(f, argnums=1)), grad_train
      meta, grad_train = fns[tuple(ids)]
      g = np.asarray(meta(theta, jnp.asarray(lam), jnp.ones(4), x, ys))
      lam, m, v, count = _np_adam(lam, m, v, count, g, np.ones(4, bool), hp["lr"])
      upd = grad_train(theta, jnp.asarray(lam), x, ys)
      theta = jax.tree.map(lambda a, b: a - 0.5 * b, theta, upd)
    theta = jax.tree.map(np.asarray, theta)

  for (new, meas), mg in zip(two, bilevel.META_GRADS):
    tol = 1e-3 if mg == "exact" else 3e-3
    np.testing.assert_allclose(np.asarray(new.objective_state["lambda"]), lam, rtol=tol,
                               err_msg=mg)
    np.testing.assert_allclose(np.asarray(new.objective_state["m"]), m, rtol=tol,
                               atol=1e-3 * np.abs(m).max(), err_msg=mg)
    np.testing.assert_array_equal(np.asarray(new.objective_state["count"]), count)
    helpers.assert_trees_close(new.params, theta, rtol=1e-3, atol=1e-4)
    assert np.all(lam != 0.3)
    np.testing.assert_array_equal(np.asarray(meas["task_count"]), np.full(4, 2.0))


def test_adam_on_sampled_tasks_matches_per_task_torch_adam():
  """``adam_step`` over 6 steps with changing active sets (a task first
  active at step 3, one never) against numpy's torch Adam with per-task
  step counts: inactive tasks keep their weight and moments."""
  rng = np.random.default_rng(0)
  actives = [np.array(a, bool) for a in ([1, 1, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0],
                                          [1, 1, 1, 0], [0, 0, 1, 0], [1, 1, 1, 0])]
  grads = rng.normal(size=(6, 4))
  step = jax.jit(lambda s, g, a: bilevel.adam_step(*s, g, a, 0.01))
  st = (jnp.full(4, 0.1), jnp.zeros(4), jnp.zeros(4), jnp.zeros(4, jnp.int32))
  ref = (np.full(4, 0.1), np.zeros(4), np.zeros(4), np.zeros(4))
  for g, a in zip(grads, actives):
    st = step(st, jnp.asarray(g, jnp.float32), jnp.asarray(a))
    ref = _np_adam(*ref, g, a, 0.01)
  for got, want in zip(st, ref):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
  assert float(st[0][3]) == np.float32(0.1) and int(st[3][3]) == 0


@pytest.mark.slow
def test_auto_lambda_trains_a_small_run():
  """300 steps (Adam 1e-2, the paper's defaults) on the 4-task toy data:
  every task's train loss falls below 80% of the first 50 steps' mean and the
  total below half, and every weight has grown from its 0.1 start (with the
  meta batch from the training data, more weight on any task lowers the
  meta loss early in training: the meta-gradients are negative)."""
  data = helpers.toy_data()
  model = multitask.make_model("multi_head", data.taskset, data.input_shape, hidden=(16,))
  tx = optim.make_optimizer("adam", lr=1e-2)
  obj = objectives.make_objective("auto_lambda", 4)
  sampler = sampling.make_sampler(data.taskset, np.full(4, 0.25), 4, 16, draws=D)
  fn = jax.jit(steps.make_train_step(model, tx, obj, sampler, weights=np.ones(4), seed=5,
                                     steps_per_call=50))
  state = steps.init_train_state(model, tx, jax.random.key(0), obj)
  losses = []
  for _ in range(6):
    state, meas = fn(state, data.train)
    losses.append(np.asarray(meas["task_loss_sum"]) / np.asarray(meas["task_count"]))
  assert np.all(losses[-1] < 0.8 * losses[0]), losses
  assert losses[-1].sum() < 0.5 * losses[0].sum(), losses
  assert np.all(np.asarray(state.objective_state["lambda"]) > 0.1)
  assert np.all(np.isfinite(np.asarray(state.objective_state["lambda"])))


# ---------------------------------------------------------------------------
# Bad inputs, before tracing; the catalog.
# ---------------------------------------------------------------------------


def test_bad_hyper_parameters_are_refused():
  """(A one-draw sampler given to auto_lambda: test_double_sampling's
  ``test_bad_inputs_are_refused_before_tracing``.)"""
  for hp, msg in (({"lr": 0.0}, r"auto_lambda: lr and lookahead_lr must be > 0"),
                  ({"lookahead_lr": -1.0}, r"lookahead_lr must be > 0"),
                  ({"meta_grad": "second_order"}, r"meta_grad='second_order' is not one of"),
                  ({"primary": (4,)}, r"primary must be \(\) \(every task\) or distinct task "
                                      r"indices in \[0, 4\), got \(4,\)"),
                  ({"primary": (1, 1)}, r"got \(1, 1\)"),
                  ({"primary": ("depth",)}, r"got \('depth',\)")):
    with pytest.raises(ValueError, match=msg):
      objectives.make_objective("auto_lambda", 4, **hp)


def test_auto_lambda_is_listed_configured_and_benchmarked():
  from experiments import bench_common  # pylint: disable=g-import-not-at-top
  from experiments import bench_objectives  # pylint: disable=g-import-not-at-top
  from experiments.configs import common  # pylint: disable=g-import-not-at-top
  c = common.base_config()
  assert c.objective.auto_lambda.to_dict() == {"init": 0.1, "lr": 1e-4, "lookahead_lr": 0.1,
                                               "primary": (), "meta_grad": "exact"}
  obj = objectives.make_objective("auto_lambda", 3)
  assert obj.draws == 2 and obj.needs == "sum"
  listed = bench_objectives._METHODS.default  # pylint: disable=protected-access
  assert {"auto_lambda+shared", "auto_lambda#meta_grad=finite_difference+shared"} <= set(listed)
  assert bench_common.method_hparams("auto_lambda#meta_grad=finite_difference") == (
      "auto_lambda", {"meta_grad": "finite_difference"})
