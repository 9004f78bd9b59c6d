"""FORUM (Ye et al., ECAI 2024, as LibMTL runs it): its QP against scipy's
SLSQP in float64 (hard cases: the linear constraint tight, an absent task,
nearly collinear outer gradients); one objective step on quadratic losses
against a float64 numpy reference of LibMTL's equations (the inner SGD
steps, g_q, the unit outer gradients, pi, the QP, the EMA at a later epoch,
nu, the direction, Adam); a small run (slow); the bad inputs; the catalog."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

import helpers
from mtljax import jacobians
from mtljax import objectives
from mtljax import optim
from mtljax import steps
from mtljax.data import sampling
from mtljax.models import multitask
from mtljax.objectives import bilevel


def _scipy_qp(kk, pi, c, present):
  """LibMTL's QP (``min w^T K w - c u``, ``sum s = 1``, ``s, u >= 0``, ``u >=
  pi . s``, absent ``s_t = 0``) by SLSQP in float64 from several starts."""
  t = len(pi)
  cons = [{"type": "eq", "fun": lambda z: np.sum(z[:t]) - 1.0},
          {"type": "ineq", "fun": lambda z: z[t] - pi @ z[:t]}]
  bounds = [(0.0, None if p else 0.0) for p in present] + [(0.0, None)]
  best = None
  for start in range(4):
    s0 = np.where(present, 1.0, 0.0) + 0.1 * start * np.arange(t) * present
    s0 /= s0.sum()
    z0 = np.append(s0, max(pi @ s0, 0.0) + 0.1)
    r = optimize.minimize(lambda z: z @ kk @ z - c * z[t], z0, jac=lambda z: 2 * kk @ z
                          - c * np.eye(t + 1)[t], bounds=bounds, constraints=cons,
                          method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000})
    if best is None or r.fun < best.fun:
      best = r
  return best.x[:t], best.x[t], best.fun


def _qp_case(rng, t, d, *, collinear=False, scale_q=1.0, phi=0.1):
  g = rng.normal(size=(t, d))
  if collinear:
    g[1] = g[0] + 1e-3 * rng.normal(size=d)
  g /= np.linalg.norm(g, axis=1, keepdims=True)
  gq = scale_q * rng.normal(size=d)
  kk = np.block([[g @ g.T, (g @ gq)[:, None]], [(g @ gq)[None, :], np.array([[gq @ gq]])]])
  pi = phi - (g @ gq) / (gq @ gq + 1e-8)
  return kk, pi, phi * (gq @ gq + 1e-8)


def test_the_qp_matches_scipy_in_float64():
  rng = np.random.default_rng(0)
  cases = [(_qp_case(rng, 4, 9), np.ones(4, bool)),
           (_qp_case(rng, 4, 9, scale_q=0.05), np.ones(4, bool)),
           (_qp_case(rng, 4, 9, scale_q=20.0), np.ones(4, bool)),
           (_qp_case(rng, 4, 9, collinear=True), np.ones(4, bool)),
           (_qp_case(rng, 5, 9), np.array([1, 0, 1, 1, 0], bool)),
           (_qp_case(rng, 3, 2, phi=1.0), np.ones(3, bool))]
  solve = jax.jit(lambda kk, pi, c, pr: bilevel.forum_qp(kk[:-1, :-1], kk[:-1, -1], kk[-1, -1],
                                                          pi, c, pr))
  tight = 0
  with jax.enable_x64(True):
    for i, ((kk, pi, c), present) in enumerate(cases):
      s, u, found = (np.asarray(a) for a in solve(kk, pi, c, present))
      s_ref, u_ref, f_ref = _scipy_qp(kk, pi, c, present)
      z = np.append(s, u)
      assert found, i
      # feasible, and no worse than SLSQP (which it may beat in its last digits)
      assert abs(s.sum() - 1) < 1e-9 and np.all(s >= 0) and u >= pi @ s - 1e-9, i
      assert np.all(s[~present] == 0), i
      f = z @ kk @ z - c * u
      assert f <= f_ref + 1e-9 * max(1.0, abs(f_ref)), (i, f, f_ref)
      np.testing.assert_allclose(z, np.append(s_ref, u_ref), atol=1e-5, err_msg=str(i))
      tight += abs(u - pi @ s) < 1e-9 and u > 1e-9
  assert tight >= 1  # the linear constraint is active in at least one case


def _quadratic_linearization(a, b):
  aj, bj = jnp.asarray(a), jnp.asarray(b)

  def loss_at(p, slots=slice(None)):
    r = jnp.einsum("kij,j->ki", aj[slots], p["shared"]) - bj[slots]
    return 0.5 * jnp.sum(r * r, axis=1)

  theta = {"shared": jnp.asarray(np.linspace(-0.3, 0.4, a.shape[-1])), "tasks": {}}
  losses, vjp = jax.vjp(loss_at, theta)
  return jacobians.Linearized(losses=losses, pullback=lambda c: vjp(c)[0], slot_grads=None,
                              rep_grads=None, rep_pullback=None, loss_at=loss_at,
                              one_pass=False, params=theta)


def _np_softmax(a):
  e = np.exp(a - a.max())
  return e / e.sum()


def test_one_step_follows_libmtls_equations_on_quadratic_losses():
  """x64, T = 4, K = 4 a draw, theta of 6 entries: the inner draw holds task
  1 twice (averaged), task 3 of weight 0 and task 2; the outer draw tasks 0,
  1, 2 (task 3 absent: no objective; task 2's slot scaled 10x). The state
  starts at step 6 with ``ema_period`` 3 (LibMTL epoch 2, ``mu = 3^(-3/4)``)
  and a nonzero ``lambda``. Against numpy of LibMTL's ``bacth_forward_FORUM``
  (5 inner SGD steps on the quadratic, the QP by SLSQP): lambda, nu through
  the direction, alpha's Adam step, to 1e-6."""
  rng = np.random.default_rng(1)
  p, t = 6, 4
  a = rng.normal(size=(8, p, p)) / np.sqrt(p)
  b = rng.normal(size=(8, p))
  a[6] *= 10.0
  b[6] *= 10.0
  ids = np.array([1, 1, 3, 2, 0, 1, 2, 3], np.int32)
  w_task = np.array([1.0, 2.0, 1.5, 0.0])
  alpha0 = np.array([0.3, -0.2, 0.1, 0.0])
  lam0 = np.array([0.2, 0.5, 0.3, 0.0])
  hp = dict(lr=0.01, inner_lr=0.1, inner_steps=5, phi=0.1, ema_period=3)
  obj = objectives.make_objective("forum", t, **hp)

  @jax.jit
  def run(a, b, ids):
    lin = _quadratic_linearization(a, b)
    state = {"alpha": jnp.asarray(alpha0), "m": jnp.zeros(t), "v": jnp.zeros(t),
             "count": jnp.zeros(t, jnp.int32), "lambda": jnp.asarray(lam0),
             "steps": jnp.asarray(6, jnp.int32)}
    return obj.gradients(lin, objectives.Inputs(ids, jnp.asarray(w_task), state, {},
                                                jax.random.key(0)))

  with jax.enable_x64(True):
    res = run(a, b, jnp.asarray(ids))

  theta = np.linspace(-0.3, 0.4, p)
  s_a = _np_softmax(alpha0)
  js = np.diag(s_a) - np.outer(s_a, s_a)

  def task_means(values, draw):
    out, cnt = np.zeros((t,) + values.shape[1:]), np.zeros(t)
    for k in range(4 * draw, 4 * draw + 4):
      if w_task[ids[k]] > 0:
        out[ids[k]] += w_task[ids[k]] * values[k]
        cnt[ids[k]] += 1
    return out / np.maximum(cnt, 1).reshape((t,) + (1,) * (values.ndim - 1)), cnt > 0

  def slot_losses(th):
    r = np.einsum("kij,j->ki", a, th) - b
    return 0.5 * np.sum(r * r, axis=1)

  def slot_grads(th):
    return np.einsum("kji,kj->ki", a, np.einsum("kij,j->ki", a, th) - b)

  def f_omega(th):  # d_omega f for fixed alpha
    return s_a @ task_means(slot_grads(th), 0)[0]

  gf_alpha = js @ task_means(slot_losses(theta), 0)[0]
  gf_omega = f_omega(theta)
  th_k = theta.copy()
  for _ in range(5):
    th_k = th_k - 0.1 * f_omega(th_k)
  gq = np.concatenate([gf_alpha - js @ task_means(slot_losses(th_k), 0)[0], gf_omega])
  g_outer, present = task_means(slot_grads(theta), 1)
  norms = np.linalg.norm(g_outer, axis=1)
  gF = np.where(present[:, None], g_outer / np.where(norms > 0, norms, 1)[:, None], 0.0)
  gF_full = np.concatenate([np.zeros((t, t)), gF], axis=1)
  pi = 0.1 - gF_full @ gq / (gq @ gq + 1e-8)
  amat = np.concatenate([gF_full, gq[None]], axis=0)
  s, u, _ = _scipy_qp(amat @ amat.T, pi, 0.1 * (gq @ gq + 1e-8), present)
  mu = 3.0 ** -0.75                       # epoch 6 // 3 = 2
  lam = lam0 + mu * (s - lam0)
  nu = max(np.sum(np.where(present, lam * pi, 0.0)), 0.0)
  g_final = np.where(present, lam, 0.0) @ gF_full + nu * gq
  g_alpha = g_final[:t]
  m1 = 0.1 * g_alpha
  v1 = 0.001 * g_alpha ** 2
  a1 = alpha0 - 0.01 * (m1 / 0.1) / (np.sqrt(v1 / 0.001) + 1e-8)

  assert nu > 0 and np.sum(s > 1e-6) >= 2  # both parts of the direction matter
  np.testing.assert_allclose(np.asarray(res.state["lambda"]), lam, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(np.asarray(res.grads["shared"]), g_final[t:], rtol=1e-6,
                             atol=1e-9)
  np.testing.assert_allclose(np.asarray(res.measurements["objective_meta_grad_sum"]), g_alpha,
                             rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(np.asarray(res.state["alpha"]), a1, rtol=1e-6)
  assert int(res.state["steps"]) == 7
  assert float(res.measurements["objective_qp_failures"]) == 0.0


@pytest.mark.slow
def test_forum_trains_a_small_run():
  """300 steps (Adam 1e-2, the defaults) on the 4-task toy data: every
  task's train loss falls below 80% of the first 50 steps' mean, the total
  below half; no QP failure; lambda on the simplex."""
  data = helpers.toy_data()
  model = multitask.make_model("multi_head", data.taskset, data.input_shape, hidden=(16,))
  tx = optim.make_optimizer("adam", lr=1e-2)
  obj = objectives.make_objective("forum", 4)
  sampler = sampling.make_sampler(data.taskset, np.full(4, 0.25), 4, 16, draws=2)
  fn = jax.jit(steps.make_train_step(model, tx, obj, sampler, weights=np.ones(4), seed=5,
                                     steps_per_call=50))
  state = steps.init_train_state(model, tx, jax.random.key(0), obj)
  losses, fails = [], 0.0
  for _ in range(6):
    state, meas = fn(state, data.train)
    losses.append(np.asarray(meas["task_loss_sum"]) / np.asarray(meas["task_count"]))
    fails += float(meas["objective_qp_failures"])
  assert np.all(losses[-1] < 0.8 * losses[0]), losses
  assert losses[-1].sum() < 0.5 * losses[0].sum(), losses
  assert fails == 0.0
  lam = np.asarray(state.objective_state["lambda"])
  assert abs(lam.sum() - 1) < 1e-4 and np.all(lam >= 0)


def test_bad_inputs_are_refused_before_tracing():
  data = helpers.toy_data()
  model = multitask.make_model("multi_head", data.taskset, data.input_shape, hidden=(8,))
  tx = optim.make_optimizer("sgd", lr=1.0)
  three = sampling.make_sampler(data.taskset, np.full(4, 0.25), 4, 8, draws=3)
  with pytest.raises(ValueError, match=r"objective.method='forum' reads 2 independent "
                                       r"mini-batch\(es\) .* draws=2\)"):
    steps.make_train_step(model, tx, "forum", three, weights=np.ones(4))
  for hp, msg in (({"phi": 0.0}, r"forum: lr, inner_lr and phi must be > 0"),
                  ({"inner_steps": 0}, r"inner_steps must be an integer >= 1, got 0"),
                  ({"ema_period": 2.5}, r"ema_period must be an integer >= 1, got 2.5")):
    with pytest.raises(ValueError, match=msg):
      objectives.make_objective("forum", 4, **hp)
  with pytest.raises(ValueError, match=r"at most 10 tasks, got 11"):
    objectives.make_objective("forum", 11)


def test_forum_is_listed_configured_and_benchmarked():
  import io  # pylint: disable=g-import-not-at-top
  from experiments import bench_objectives  # pylint: disable=g-import-not-at-top
  from experiments import main  # pylint: disable=g-import-not-at-top
  from experiments.configs import common  # pylint: disable=g-import-not-at-top
  c = common.base_config()
  assert c.objective.forum.to_dict() == {"lr": 1e-3, "inner_lr": 0.1, "inner_steps": 5,
                                         "phi": 0.1, "ema_period": 1}
  obj = objectives.make_objective("forum", 3)
  assert obj.draws == 2 and obj.needs == "sum"
  assert "forum+shared" in bench_objectives._METHODS.default  # pylint: disable=protected-access
  out = io.StringIO()
  main.print_catalog(out)
  assert "forum" in out.getvalue()
