"""The stateful and gradient-transforming objectives (issue 12: GradVac,
GradDrop, DB-MTL, STCH, GLS, IMTL, ExcessMTL, MoCo) against float64 numpy
re-implementations written from the papers' equations (and the authors' code
where the paper leaves a choice), on hard Jacobians (rows of very different
norms, near-opposite rows), over several steps with task sampling; plus each
method's own property."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from mtljax import gradients
from mtljax import jacobians
from mtljax import objectives
from mtljax import optim
from mtljax import steps
from mtljax.data import sampling
from mtljax.models import multitask
from mtljax.objectives import stateful

import hard_jacobians

# (seed, T, kind): every kind of the shared generator at T = 2, 3, 5.
_CASES = [(s, t, kind) for s, (kind, t) in enumerate(
    (kind, t) for kind in hard_jacobians.KINDS for t in (2, 3, 5))]


def _jac(seed, t, kind, p=10):
  """One hard ``[T, P]`` float64 Jacobian (tests/hard_jacobians.py)."""
  return hard_jacobians.hard_jacobian_batch(kind, t, p, 1, seed)[0]


def _cos(a, b):
  a, b = np.ravel(a), np.ravel(b)
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


_linear_lin = helpers.linear_linearization


def _run(obj, seq, weights, shared_dim):
  """Runs ``obj.gradients`` (+ ``after_update``) over ``seq`` of
  ``(task_ids, losses, jac)``; returns the shared gradients and the states."""
  obj = objectives.bind_shared(obj, jax.ShapeDtypeStruct((shared_dim,), jnp.float32))
  state, own = obj.init_state(), obj.init_params()
  fn = jax.jit(lambda lin_args, st, own, key: obj.gradients(
      _linear_lin(*lin_args[1:]), objectives.Inputs(lin_args[0], jnp.asarray(weights),
                                                   st, own, key)))
  out = []
  for n, (ids, l, jac) in enumerate(seq):
    res = fn((jnp.asarray(ids), l, jac), state, own, jax.random.key(n))
    state = obj.after_update(res.state, jnp.asarray(l, jnp.float32), jnp.asarray(ids), None)
    out.append((np.asarray(res.grads["shared"], np.float64), res, state))
  return out


# ---------------------------------------------------------------------------
# GradVac.
# ---------------------------------------------------------------------------


def _np_gradvac(g, phi, orders):
  """Wang et al. 2021, Algorithm 1 / eq. 3 on the gradient vectors (float64)."""
  g = np.asarray(g, np.float64)
  out, rho = g.copy(), np.eye(len(g))
  for i in range(len(g)):
    for j in orders[i]:
      if j == i:
        continue
      r = out[i] @ g[j] / (np.linalg.norm(out[i]) * np.linalg.norm(g[j]) + 1e-8)
      rho[i, j] = r
      p = phi[i, j]
      if r < p:
        out[i] = out[i] + g[j] * np.linalg.norm(out[i]) * (
            p * np.sqrt(1 - r * r) - r * np.sqrt(1 - p * p)) / (
                np.linalg.norm(g[j]) * np.sqrt(1 - p * p))
  return out, rho


@pytest.mark.parametrize("seed, t, kind", _CASES)
def test_gradvac_coefficients_match_the_paper_on_hard_jacobians(seed, t, kind):
  g = _jac(seed, t, kind)
  rng = np.random.default_rng(seed)
  phi = rng.uniform(-0.5, 0.6, size=(t, t))
  orders = np.stack([rng.permutation(t) for _ in range(t)])
  c, rho = stateful.gradvac_coefficients(gradients.gram(jnp.asarray(g, jnp.float32)),
                                        jnp.asarray(phi, jnp.float32), jnp.asarray(orders))
  want, want_rho = _np_gradvac(g, phi, orders)
  got = np.asarray(c, np.float64) @ g
  for i in range(t):
    assert _cos(got[i], want[i]) >= 0.999, (i, _cos(got[i], want[i]))
    np.testing.assert_allclose(np.linalg.norm(got[i]), np.linalg.norm(want[i]), rtol=2e-3)
  # The cosines met after a near-cancelling adjustment (g_i' = g_i + w g_j with
  # g_j ~ -g_i) inherit the float32 Gram's rounding: ~1e-4 absolute.
  np.testing.assert_allclose(rho, want_rho, atol=1e-3)


def test_gradvac_reaches_the_target_cosine_for_a_pair():
  """After the adjustment ``cos(g_1', g_2) = phi`` exactly (norms 100x apart)."""
  g = np.array([[100.0, 0.0, 0.0], [-0.6, 0.8, 0.0]])
  for phi in (0.0, 0.3, 0.9):
    c, _ = stateful.gradvac_coefficients(gradients.gram(jnp.asarray(g, jnp.float32)),
                                        jnp.full((2, 2), phi, jnp.float32),
                                        jnp.asarray([[0, 1], [1, 0]]))
    adj = np.asarray(c, np.float64) @ g
    np.testing.assert_allclose(_cos(adj[0], g[1]), phi, atol=1e-5)
    np.testing.assert_allclose(_cos(adj[1], g[0]), phi, atol=1e-5)
  # Already above the target: untouched.
  c, _ = stateful.gradvac_coefficients(gradients.gram(jnp.asarray(g, jnp.float32)),
                                      jnp.full((2, 2), -0.9, jnp.float32),
                                      jnp.asarray([[0, 1], [1, 0]]))
  np.testing.assert_allclose(c, np.eye(2), atol=1e-7)


def test_gradvac_step_and_target_ema_with_task_sampling():
  """Three steps over sampled slots: the direction is the sum of the adjusted
  gradients, and each sampled ordered task pair's target moves by
  ``(1 - beta) phi + beta rho`` (the others stay)."""
  t, beta = 4, 0.3
  weights = np.array([1.0, 2.0, 0.5, 1.0], np.float32)
  seq = [([0, 1, 2], [1.0, 0.5, 2.0], _jac(1, 3, "opposite_100x")),
         ([3, 1, 0], [0.7, 0.4, 1.2], _jac(2, 3, "opposite")),
         ([2, 1, 3], [0.3, 0.9, 1.1], _jac(3, 3, "norms_100x"))]
  out = _run(objectives.make_objective("gradvac", t, beta=beta), seq, weights, 10)
  phi = np.zeros((t, t))
  for n, ((ids, _, jac), (d, res, state)) in enumerate(zip(seq, out)):
    rows = weights[ids][:, None] * jac
    orders = np.asarray(gradients.pcgrad_orders(jax.random.key(n), 3))
    adj, rho = _np_gradvac(rows, phi[np.ix_(ids, ids)], orders)
    assert _cos(d, adj.sum(0)) >= 0.999
    np.testing.assert_allclose(np.linalg.norm(d), np.linalg.norm(adj.sum(0)), rtol=2e-3)
    for a in range(3):
      for b in range(3):
        if a != b:
          phi[ids[a], ids[b]] = (1 - beta) * phi[ids[a], ids[b]] + beta * rho[a, b]
    np.testing.assert_allclose(state["targets"], phi, atol=2e-4)
  assert np.all(np.asarray(out[0][2]["targets"])[3] == 0)  # task 3 unsampled at step 0


# ---------------------------------------------------------------------------
# GradDrop.
# ---------------------------------------------------------------------------


def _np_graddrop(dz, u, leak):
  """Chen et al. 2020, Algorithm 1 (float64), with the given uniform draws."""
  dz = np.asarray(dz, np.float64)
  p = 0.5 * (1 + dz.sum(0) / (np.abs(dz).sum(0) + 1e-7))
  m = ((p > u)[None] & (dz > 0)) | ((p < u)[None] & (dz < 0))
  return (dz * (leak + (1 - leak) * m)).sum(0)


@pytest.mark.parametrize("leak", [0.0, 0.3])
def test_graddrop_matches_algorithm_1(leak):
  rng = np.random.default_rng(0)
  dz = rng.normal(size=(3, 6, 5)) * np.array([100.0, 1.0, 0.01])[:, None, None]
  dz[1, :3] = -dz[0, :3] * 0.5       # conflicting coordinates
  key = jax.random.key(7)
  got = stateful.graddrop_cotangent({"z": jnp.asarray(dz, jnp.float32)}, key, leak=leak)["z"]
  u = np.asarray(jax.random.uniform(jax.random.split(key, 1)[0], (6, 5)))
  np.testing.assert_allclose(got, _np_graddrop(dz, u, leak), rtol=1e-5, atol=1e-6)


def test_graddrop_keeps_everything_when_all_gradients_agree_in_sign():
  rng = np.random.default_rng(1)
  sign = np.where(rng.normal(size=(4, 7)) > 0, 1.0, -1.0)
  dz = np.abs(rng.normal(size=(3, 4, 7))) * sign[None] * np.array([100., 1., .01])[:, None, None]
  for seed in range(5):
    got = stateful.graddrop_cotangent(jnp.asarray(dz, jnp.float32), jax.random.key(seed))
    np.testing.assert_allclose(got, dz.sum(0), rtol=1e-5)
  # With leak = 1 nothing is ever dropped, whatever the signs.
  mixed = rng.normal(size=(3, 4, 7))
  np.testing.assert_allclose(stateful.graddrop_cotangent(jnp.asarray(mixed, jnp.float32),
                                                        jax.random.key(0), leak=1.0),
                             mixed.sum(0), rtol=1e-5, atol=1e-6)


def test_graddrop_in_the_step_with_leak_one_is_the_weighted_sum_step():
  """The one-pass step: with ``leak=1`` GradDrop back-propagates ``sum_k dZ_k``,
  the weighted-sum gradient."""
  data = helpers.toy_data()
  model = multitask.make_model("multi_head", data.taskset, data.input_shape, hidden=(8,))
  tx = optim.make_optimizer("sgd", lr=1.0)
  weights = np.array([1.0, 2.0, 0.5, 1.0], np.float32)
  probs = np.full(4, 0.25)

  def run(method, **hp):
    obj = objectives.make_objective(method, 4, **hp)
    fn = steps.make_train_step(
        model, tx, obj, sampling.make_sampler(data.taskset, probs, 3, 16, shared_inputs=True),
        weights=weights, seed=5)
    state = steps.init_train_state(model, tx, jax.random.key(0), obj)
    return jax.jit(fn)(state, data.train)[0].params

  helpers.assert_trees_close(run("graddrop", leak=1.0), run("fixed"), rtol=1e-5, atol=1e-6)
  # leak = 0: test_graddrop_step_drops_the_cotangent_of_algorithm_1.


# ---------------------------------------------------------------------------
# DB-MTL, MoCo, ExcessMTL: tracked per-task gradients over steps.
# ---------------------------------------------------------------------------

_WEIGHTS = np.array([1.0, 2.0, 0.5], np.float32)
_SEQ = [([0, 1, 2], [1.0, 0.5, 2.0], _jac(1, 3, "opposite_100x")),
        ([2, 0], [0.7, 1.2], _jac(2, 2, "opposite")),
        ([1, 2, 0], [0.3, 0.9, 1.1], _jac(3, 3, "norms_100x")),
        ([0, 1, 2], [0.2, 0.8, 1.5], _jac(4, 3, "opposite"))]


@pytest.mark.parametrize("beta, sigma", [(0.9, 0.0), (0.5, 0.5)])
def test_db_mtl_matches_libmtl_over_steps_with_sampling(beta, sigma):
  out = _run(objectives.make_objective("db_mtl", 3, beta=beta, beta_sigma=sigma), _SEQ,
             _WEIGHTS, 10)
  buf, n = np.zeros((3, 10)), np.zeros(3)
  for (ids, l, jac), (d, res, state) in zip(_SEQ, out):
    g = _WEIGHTS[ids][:, None] * jac / (np.asarray(l)[:, None] + 1e-8)
    for k, t in enumerate(ids):
      n[t] += 1
      buf[t] = g[k] + beta / n[t] ** sigma * (buf[t] - g[k])
    norms = np.linalg.norm(buf[ids], axis=1)
    want = sum(norms.max() / (norms[k] + 1e-8) * buf[t] for k, t in enumerate(ids))
    np.testing.assert_allclose(d, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    np.testing.assert_allclose(state["grads"], buf, rtol=1e-4, atol=1e-6 * np.abs(buf).max())
    # Every sampled task's scaled tracked gradient has the largest norm.
    alpha = np.asarray(res.measurements["grad_weight_sum"])[ids]
    np.testing.assert_allclose(alpha * norms, norms.max(), rtol=1e-4)
    np.testing.assert_allclose(res.total, np.sum(_WEIGHTS[ids] * np.log(l)), rtol=1e-5)


def _np_project_simplex(v):
  u = np.sort(v)[::-1]
  css = np.cumsum(u)
  rho = np.nonzero(u - (css - 1) / np.arange(1, len(v) + 1) > 0)[0][-1]
  return np.maximum(v - (css[rho] - 1) / (rho + 1), 0)


@pytest.mark.parametrize("simplex, rho", [("project", 0.0), ("softmax", 0.1)])
def test_moco_matches_the_paper_and_libmtl_over_steps(simplex, rho):
  hp = dict(beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=rho, simplex=simplex)
  out = _run(objectives.make_objective("moco", 3, **hp), _SEQ, _WEIGHTS, 10)
  y, lam, n = np.zeros((3, 10)), np.full(3, 1 / 3), np.zeros(3)
  for step, ((ids, l, jac), (d, res, state)) in enumerate(zip(_SEQ, out), start=1):
    rows = _WEIGHTS[ids][:, None] * jac
    g = rows / (np.linalg.norm(rows, axis=1, keepdims=True) + 1e-8) * (
        _WEIGHTS[ids] * np.asarray(l))[:, None]
    for k, t in enumerate(ids):
      n[t] += 1
      y[t] = y[t] - 0.5 / n[t] ** 0.5 * (y[t] - g[k])
    step_ = lam - 0.1 / step ** 0.5 * (y @ y.T + rho * np.eye(3)) @ lam
    lam = (_np_project_simplex(step_) if simplex == "project"
           else np.exp(step_) / np.exp(step_).sum())
    np.testing.assert_allclose(state["lambda"], lam, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(d, y.T @ lam, rtol=1e-4, atol=1e-5 * np.abs(y).max())


def test_excess_mtl_matches_the_authors_code_over_steps():
  eta = 0.05
  out = _run(objectives.make_objective("excess_mtl", 3, step_size=eta), _SEQ, _WEIGHTS, 10)
  s, w, r0, seen = np.zeros((3, 10)), np.ones(3), np.zeros(3), np.zeros(3, bool)
  for (ids, l, jac), (d, res, state) in zip(_SEQ, out):
    rows = _WEIGHTS[ids][:, None] * jac
    for k, t in enumerate(ids):
      s[t] += rows[k] ** 2
      risk = rows[k] @ (rows[k] / np.sqrt(s[t] + 1e-7))
      if not seen[t]:
        r0[t], seen[t] = risk, True
      else:
        w[t] *= np.exp(eta * risk / r0[t])
    w = 3 * w / w.sum()
    np.testing.assert_allclose(state["loss_weights"], w, rtol=1e-4)
    np.testing.assert_allclose(d, (w[ids][:, None] * rows).sum(0), rtol=1e-4,
                               atol=1e-6 * np.abs(rows).max())
    np.testing.assert_allclose(res.total, np.sum(w[ids] * _WEIGHTS[ids] * l), rtol=1e-5)
  assert not np.allclose(w, 1.0)


def test_gradient_state_needs_binding_and_binding_fixes_its_keys():
  obj = objectives.make_objective("db_mtl", 3)
  with pytest.raises(ValueError, match="objective 'db_mtl' keeps per-task gradients"):
    obj.init_state()
  shared = {"a": jnp.zeros((2, 3)), "b": jnp.zeros((4,))}
  bound = objectives.bind_shared(obj, shared)
  assert objectives.bind_shared(bound, shared) is bound
  assert objectives.bind_shared(objectives.make_objective("gls", 3), shared).init_shared_state \
      is None
  st = bound.init_state()
  assert st["grads"]["a"].shape == (3, 2, 3) and st["grads"]["b"].shape == (3, 4)


# ---------------------------------------------------------------------------
# IMTL (IMTL-L + IMTL-G).
# ---------------------------------------------------------------------------


def _np_imtl_g(g):
  u = g / np.linalg.norm(g, axis=1, keepdims=True)
  d, uu = g[0] - g[1:], u[0] - u[1:]
  a = g[0] @ uu.T @ np.linalg.inv(d @ uu.T)
  return np.concatenate([[1 - a.sum()], a])


@pytest.mark.parametrize("seed, t, kind", _CASES)
def test_imtl_combines_imtl_g_on_scaled_losses_and_learns_the_scales(seed, t, kind):
  jac = _jac(seed, t, kind)
  rng = np.random.default_rng(seed)
  l = rng.uniform(0.2, 2.0, size=t)
  s = rng.normal(size=t) * 0.5
  ids = np.arange(t)
  w = np.ones(t, np.float32)
  obj = objectives.make_objective("imtl", t)
  res = obj.gradients(_linear_lin(l, jac), objectives.Inputs(
      jnp.asarray(ids), jnp.asarray(w), {}, {"log_scale": jnp.asarray(s, jnp.float32)},
      jax.random.key(0)))
  rows = np.exp(s)[:, None] * jac
  u = rows / np.linalg.norm(rows, axis=1, keepdims=True)
  d = np.asarray(res.grads["shared"], np.float64)
  converged = float(res.measurements["solver_failures"]) == 0
  # The flag means cond(C) < max_cond (1e6) for the cosine matrix C (float64 here;
  # every case is a factor >= 2 away from the threshold): False on the three
  # collinear cases only, where float32 cannot resolve IMTL-G (at T = 5 its
  # direction is opposite to the float64 one).
  assert converged == (np.linalg.cond(u @ u.T) < 1e6), (kind, t)
  # Every case: d = alpha G with IMTL-G's normalisation sum alpha = 1.
  alpha = np.asarray(res.measurements["grad_weight_sum"], np.float64)
  np.testing.assert_allclose(alpha.sum(), 1.0, rtol=1e-5)
  np.testing.assert_allclose(d, alpha @ rows, rtol=1e-4, atol=1e-5 * np.abs(rows).max())
  if converged:
    # IMTL-G's optimality condition: equal projections of d on every unit
    # gradient (wrong directions -- the plain sum, one task's gradient -- are
    # >= 4e-2 off here; IMTL-G <= 1e-4), and the float64 closed form.
    p = u @ d
    assert np.ptp(p) <= 1e-3 * np.linalg.norm(d), (kind, t, np.ptp(p) / np.linalg.norm(d))
    want = _np_imtl_g(rows) @ rows
    assert _cos(d, want) >= 0.999, _cos(d, want)
    np.testing.assert_allclose(np.linalg.norm(d), np.linalg.norm(want), rtol=1e-2)
  # IMTL-L: d/ds (e^s L - s) = e^s L - 1, and the scale optimum is s = -log L.
  np.testing.assert_allclose(res.grads["tasks"]["imtl"]["log_scale"], np.exp(s) * l - 1,
                             rtol=1e-5)
  np.testing.assert_allclose(res.total, np.sum(np.exp(s) * l - s), rtol=1e-5)


# ---------------------------------------------------------------------------
# Loss scalarisations: GLS and STCH.
# ---------------------------------------------------------------------------


def test_gls_is_the_geometric_mean_and_its_gradient():
  l = np.array([0.01, 1.0, 30.0])        # losses 3000x apart
  ids, w = [2, 0, 1], np.ones(3)
  obj = objectives.make_objective("gls", 3)
  res = obj.gradients(helpers.identity_linearization(l), objectives.Inputs(
      jnp.asarray(ids), jnp.asarray(w, jnp.float32), {}, {}, jax.random.key(0)))
  geo = np.prod(l) ** (1 / 3)
  np.testing.assert_allclose(res.total, geo, rtol=1e-5)
  # grad G = (1/T) sum_i (G / L_i) grad L_i: the coefficient of grad L_i is G / (T L_i).
  np.testing.assert_allclose(res.grads["shared"], geo / (3 * l), rtol=1e-5)


def _stch_steps(obj, seq):
  state = obj.init_state()
  out = []
  for n, (ids, l) in enumerate(seq):
    res = obj.gradients(helpers.identity_linearization(l), objectives.Inputs(
        jnp.asarray(ids), jnp.ones(3, jnp.float32), state, {}, jax.random.key(n)))
    state = obj.after_update(res.state, jnp.asarray(l, jnp.float32), jnp.asarray(ids), None)
    out.append((np.asarray(res.grads["shared"], np.float64), res, state))
  return out


def test_stch_warm_up_nadir_and_smooth_max():
  """Warm-up: gradient of sum log L; the nadir is each task's mean loss over
  the next steps (task 2, unsampled there, until it is seen); then
  ``K mu logsumexp(log(L/z) / mu)`` and its gradient."""
  rng = np.random.default_rng(0)
  seq = [([0, 1], rng.uniform(0.5, 2, 2)) for _ in range(2)]            # warm-up
  seq += [([0, 1], rng.uniform(0.5, 2, 2)) for _ in range(3)]           # nadir, task 2 absent
  seq += [([2, 0], rng.uniform(0.5, 2, 2))]                             # task 2 seen
  seq += [([1, 2], rng.uniform(0.5, 2, 2)) for _ in range(2)]           # STCH
  mu = 0.5
  out = _stch_steps(objectives.make_objective("stch", 3, mu=mu, warmup_steps=2,
                                              nadir_steps=3), seq)
  for n in range(6):
    np.testing.assert_allclose(out[n][0], 1 / seq[n][1], rtol=1e-5)
  nadir = np.array([np.mean([seq[n][1][0] for n in range(2, 5)]),
                    np.mean([seq[n][1][1] for n in range(2, 5)]), seq[5][1][0]])
  np.testing.assert_allclose(out[-1][2]["loss_sum"] / out[-1][2]["count"], nadir, rtol=1e-5)
  for n in (6, 7):
    ids, l = seq[n]
    x = np.log(l / nadir[ids])
    p = np.exp(x / mu) / np.exp(x / mu).sum()
    np.testing.assert_allclose(out[n][1].total, 2 * mu * np.log(np.exp(x / mu).sum()),
                               rtol=1e-5)
    np.testing.assert_allclose(out[n][0], 2 * p / l, rtol=1e-4)


def test_stch_tends_to_the_tchebycheff_max_as_mu_vanishes():
  """Value within ``K mu log K`` of ``K max_k log(L_k / z_k)``; the gradient
  tends to the worst task's, the others' weights bounded by
  ``exp(-gap / mu)`` (gap: the margin of the max)."""
  l = np.array([1.0, 1.3, 0.7])
  seq = [([0, 1, 2], np.ones(3))] + [([0, 1, 2], l)]   # nadir 1 after one step
  x = np.log(l)
  gap = x.max() - np.sort(x)[-2]
  for mu in (1e-1, 1e-2, 1e-3):
    out = _stch_steps(objectives.make_objective("stch", 3, mu=mu, warmup_steps=0,
                                                nadir_steps=1), seq)
    g, res, _ = out[-1]
    assert -1e-6 <= float(res.total) - 3 * x.max() <= 3 * mu * np.log(3) + 1e-6
    np.testing.assert_allclose(g * l / 3, [0, 1, 0], atol=2 * np.exp(-gap / mu) + 1e-5)


# ---------------------------------------------------------------------------
# Config and bad hyper-parameters.
# ---------------------------------------------------------------------------

_NEW = ("gradvac", "graddrop", "db_mtl", "stch", "gls", "imtl", "excess_mtl", "moco")


def test_new_methods_hyperparameters_reach_the_objective_from_the_config():
  from experiments.configs import common  # pylint: disable=g-import-not-at-top
  from mtljax import build  # pylint: disable=g-import-not-at-top
  c = common.base_config()
  assert set(_NEW) <= set(objectives.methods())
  # IMTL's are IMTL-G's (one set of defaults).
  assert objectives.hyperparameters("imtl") == gradients.REGISTRY["imtl_g"].hparams
  changed = {"gradvac": ("beta", 0.2), "graddrop": ("leak", 0.4), "db_mtl": ("beta", 0.5),
             "stch": ("mu", 0.3), "imtl": ("max_cond", 1e4), "excess_mtl": ("step_size", 0.1),
             "moco": ("rho", 0.2)}
  for method, (name, value) in changed.items():
    cfg = c.copy_and_resolve_references()
    cfg.objective.method = method
    cfg.objective[method][name] = value
    obj = build.objective_from_config(cfg, 3)
    assert obj.name == method and obj.hparams[name] == value, (method, obj.hparams)


@pytest.mark.parametrize("method, hp, match", [
    ("gradvac", {"beta": 0.0}, r"gradvac: beta must be in \(0, 1\]"),
    ("graddrop", {"leak": 1.5}, r"graddrop: leak must be in \[0, 1\]"),
    ("db_mtl", {"beta": 1.0}, r"db_mtl: beta must be in \[0, 1\)"),
    ("stch", {"nadir_steps": 0}, "stch: mu must be > 0, warmup_steps >= 0 and nadir_steps"),
    ("moco", {"simplex": "sphere"}, "moco: simplex='sphere' is not one of"),
    ("excess_mtl", {"step_size": -1.0}, "excess_mtl: step_size must be > 0"),
    ("imtl", {"epsilon": 1.0}, r"unknown hyper-parameter\(s\) \['epsilon'\]"),
])
def test_bad_hyperparameters_are_clear_errors(method, hp, match):
  with pytest.raises(ValueError, match=match):
    objectives.make_objective(method, 3, **hp)


# ---------------------------------------------------------------------------
# After review: weight-0 slots, task-parameter gradients, never-active tasks,
# degenerate first risks, non-unit weights.
# ---------------------------------------------------------------------------


def _lin_heads(losses, jac, heads, ids, num_tasks) -> jacobians.Linearized:
  """:func:`_linear_lin` plus a task parameter ``tasks/head [T, H]``: slot k's
  loss has gradient ``heads[k]`` in row ``ids[k]`` (0 elsewhere)."""
  l = jnp.asarray(losses, jnp.float32)
  j, h = jnp.asarray(jac, jnp.float32), jnp.asarray(heads, jnp.float32)
  seg = jnp.asarray(ids)

  def task(c):
    return {"head": jax.ops.segment_sum(c[:, None] * h, seg, num_tasks)}
  return jacobians.Linearized(
      losses=l, pullback=lambda c: {"shared": c @ j, "tasks": task(c)},
      slot_grads=lambda c: (c[:, None] * j, task(c)), rep_grads=None, rep_pullback=None,
      loss_at=lambda p: l, one_pass=False)


def _np_heads(coef, heads, ids, num_tasks):
  out = np.zeros((num_tasks, np.shape(heads)[1]))
  for k, t in enumerate(ids):
    out[t] += coef[k] * np.asarray(heads[k], np.float64)
  return out


def _finite(tree) -> bool:
  return all(bool(np.all(np.isfinite(np.asarray(a, np.float64)))) for a in jax.tree.leaves(tree))


def _np_excess(seq, weights, eta, num_tasks):
  """The authors' ExcessMTL (float64) per sampled slot of weight > 0, a task's
  reference risk its first one > 0: ``[(loss_weights, r0, seen)]`` per step."""
  p = np.shape(seq[0][2])[1]
  s, lam = np.zeros((num_tasks, p)), np.ones(num_tasks)
  r0, seen, out = np.zeros(num_tasks), np.zeros(num_tasks, bool), []
  for ids, _, jac in seq:
    for k, t in enumerate(ids):
      if weights[t] <= 0:
        continue
      row = weights[t] * np.asarray(jac[k], np.float64)
      s[t] += row ** 2
      risk = row @ (row / np.sqrt(s[t] + 1e-7))
      if seen[t]:
        lam[t] *= np.exp(eta * risk / r0[t])
      elif risk > 0:
        r0[t], seen[t] = risk, True
    lam = num_tasks * lam / lam.sum()
    out.append((lam.copy(), r0.copy(), seen.copy()))
  return out


def test_head_gradients_of_the_tracked_methods_by_hand():
  """Task parameters: DB-MTL gets the gradient of ``sum w log L``, IMTL of
  ``sum w e^s L`` (plus the scales'), MoCo of ``sum w L``, ExcessMTL of
  ``sum lambda_t w L`` with the step's updated loss weights."""
  t, ids = 4, [2, 0, 3]
  weights = np.array([1.5, 1.0, 0.5, 2.0], np.float32)
  rng = np.random.default_rng(3)
  seq = [(ids, [0.4, 1.7, 0.9], _jac(2, 3, "opposite_100x")),
         (ids, [0.3, 1.2, 1.1], _jac(3, 3, "norms_100x"))]
  heads = rng.normal(size=(3, 6)) * np.array([100.0, 1.0, 0.01])[:, None]
  w = weights[ids]
  s = np.array([0.3, -0.2, 0.5, -0.7])
  eta = 0.5
  lam = _np_excess(seq, weights, eta, t)[-1][0]
  l = np.asarray(seq[-1][1])
  want = {"db_mtl": w / (l + 1e-8), "imtl": w * np.exp(s[ids]), "moco": w,
          "excess_mtl": lam[ids] * w}
  for method, coef in want.items():
    obj = objectives.bind_shared(objectives.make_objective(
        method, t, **({"step_size": eta} if method == "excess_mtl" else {})),
        jax.ShapeDtypeStruct((10,), jnp.float32))
    state = obj.init_state()
    own = {"log_scale": jnp.asarray(s, jnp.float32)} if method == "imtl" else {}
    for n, (i, ln, jac) in enumerate(seq):
      res = obj.gradients(_lin_heads(ln, jac, heads, i, t), objectives.Inputs(
          jnp.asarray(i), jnp.asarray(weights), state, own, jax.random.key(n)))
      state = res.state
    np.testing.assert_allclose(res.grads["tasks"]["head"], _np_heads(coef, heads, ids, t),
                               rtol=1e-5, atol=1e-9, err_msg=method)
    if method == "imtl":
      np.testing.assert_allclose(res.grads["tasks"]["imtl"]["log_scale"],
                                 _np_heads(w * (np.exp(s[ids]) * l - 1), np.ones((3, 1)),
                                           ids, t)[:, 0], rtol=1e-5, atol=1e-7)


def test_excess_mtl_zero_first_risk_is_no_reference():
  """A task whose first gradient is 0 (risk 0) is not fixed at ``r0 = 0``
  (then ``r / r0`` would be ``r / 1``): its reference is its first risk > 0."""
  eta = 0.5
  weights = np.ones(2, np.float32)
  jac0 = _jac(5, 2, "norms_100x")
  jac0[0] = 0.0
  seq = [([0, 1], [1.0, 0.5], jac0), ([0, 1], [0.8, 0.4], _jac(6, 2, "opposite")),
         ([1, 0], [0.7, 0.3], _jac(7, 2, "opposite_100x")),
         ([0, 1], [0.6, 0.2], _jac(8, 2, "gaussian"))]
  out = _run(objectives.make_objective("excess_mtl", 2, step_size=eta), seq, weights, 10)
  ref = _np_excess(seq, weights, eta, 2)
  assert not out[0][2]["seen"][0] and float(out[0][2]["initial_risk"][0]) == 0.0
  for (_, res, state), (lam, r0, seen) in zip(out, ref):
    np.testing.assert_array_equal(state["seen"], seen)
    np.testing.assert_allclose(state["initial_risk"], r0, rtol=1e-5)
    np.testing.assert_allclose(state["loss_weights"], lam, rtol=1e-5)
  # Task 0's reference is step 1's risk, S = g^2 then (step 0's gradient was 0).
  row = np.asarray(seq[1][2][0], np.float64)
  np.testing.assert_allclose(out[1][2]["initial_risk"][0],
                             np.sum(row * row / np.sqrt(row * row + 1e-7)), rtol=1e-5)


def _np_moco(seq, weights, simplex, rho, num_tasks, hp=(0.5, 0.5, 0.1, 0.5)):
  """MoCo (the paper, float64) with every task sampled from step 1:
  ``[(d, lambda)]`` per step."""
  beta, beta_sigma, gamma, gamma_sigma = hp
  p = np.shape(seq[0][2])[1]
  y, lam, n, out = np.zeros((num_tasks, p)), np.full(num_tasks, 1 / num_tasks), \
      np.zeros(num_tasks), []
  for step, (ids, l, jac) in enumerate(seq, start=1):
    rows = weights[ids][:, None] * np.asarray(jac, np.float64)
    g = rows / (np.linalg.norm(rows, axis=1, keepdims=True) + 1e-8) * (
        weights[ids] * np.asarray(l))[:, None]
    for k, t in enumerate(ids):
      n[t] += 1
      y[t] = y[t] - beta / n[t] ** beta_sigma * (y[t] - g[k])
    v = lam - gamma / step ** gamma_sigma * (y @ y.T + rho * np.eye(num_tasks)) @ lam
    lam = _np_project_simplex(v) if simplex == "project" else np.exp(v) / np.exp(v).sum()
    out.append((y.T @ lam, lam.copy()))
  return out


@pytest.mark.parametrize("simplex, rho", [("project", 0.0), ("softmax", 0.1)])
def test_moco_never_active_task_is_left_out(simplex, rho):
  """A task never active (config weight 0, or never sampled with K < T) has
  no estimate: MoCo is then exactly the 2-task MoCo on the active tasks (a
  zero row ``y_t = 0`` would pull lambda onto it and shrink ``d``)."""
  rng = np.random.default_rng(11)
  two = [([0, 1], rng.uniform(0.3, 2.0, 2), rng.normal(size=(2, 10)) + 3.0)
         for _ in range(30)]
  ref = _np_moco(two, np.ones(2), simplex, rho, 2)
  obj = objectives.make_objective("moco", 3, simplex=simplex, rho=rho)
  # Weights [1, 1, 0], all three slots sampled (task 2's gradient is real).
  zero_w = [([0, 1, 2], np.append(l, 1.5), np.vstack([j, rng.normal(size=(1, 10))]))
            for _, l, j in two]
  # K = 2 < T = 3: task 2 never sampled.
  unsampled = [(ids[::-1], l[::-1], j[::-1]) if n % 2 else (ids, l, j)
               for n, (ids, l, j) in enumerate(two)]
  for seq, weights in ((zero_w, np.array([1.0, 1.0, 0.0], np.float32)),
                       (unsampled, np.ones(3, np.float32))):
    out = _run(obj, seq, weights, 10)
    for (d, res, state), (want_d, want_lam) in zip(out, ref):
      np.testing.assert_allclose(d, want_d, rtol=1e-4, atol=1e-5 * np.abs(want_d).max())
      lam = np.asarray(res.measurements["objective_lambda_sum"])
      np.testing.assert_allclose(lam[:2], want_lam, rtol=1e-4, atol=1e-6)
      assert lam[2] == 0.0 and float(state["lambda"][2]) == 0.0
      assert float(state["count"][2]) == 0.0
      assert np.all(np.asarray(state["y"])[2] == 0)
    # Not shrunk: the review measured ||d|| 0.033 vs 1.09 with lambda on task 2.
    np.testing.assert_allclose(np.linalg.norm(out[-1][0]), np.linalg.norm(ref[-1][0]),
                               rtol=1e-4)


def test_moco_task_entering_later_joins_with_its_initial_weight():
  """K < T: a task first sampled at step 3 enters the simplex step with
  ``1 / T`` and the others' weights, renormalised to sum 1 (float64); until
  then its weight is 0."""
  t, weights = 3, np.array([1.0, 2.0, 0.5], np.float32)
  rng = np.random.default_rng(12)
  seq = [([0, 1], rng.uniform(0.3, 2, 2), _jac(n, 2, "opposite_100x")) for n in range(3)]
  seq += [([2, 0], rng.uniform(0.3, 2, 2), _jac(5, 2, "norms_100x")),
          ([1, 2], rng.uniform(0.3, 2, 2), _jac(6, 2, "opposite"))]
  out = _run(objectives.make_objective("moco", t), seq, weights, 10)
  y, lam, n = np.zeros((t, 10)), np.full(t, 1 / t), np.zeros(t)
  for step, ((ids, l, jac), (d, res, state)) in enumerate(zip(seq, out), start=1):
    rows = weights[ids][:, None] * jac
    g = rows / (np.linalg.norm(rows, axis=1, keepdims=True) + 1e-8) * (
        weights[ids] * np.asarray(l))[:, None]
    before = n > 0
    for k, task in enumerate(ids):
      n[task] += 1
      y[task] = y[task] - 0.5 / n[task] ** 0.5 * (y[task] - g[k])
    on = n > 0
    lam[on & ~before] = 1 / t                          # entering (before: weight 0)
    base = lam[on] / lam[on].sum()
    new = _np_project_simplex(base - 0.1 / step ** 0.5 * (y[on] @ y[on].T) @ base)
    lam[:] = 0.0
    lam[on] = new
    np.testing.assert_allclose(d, y[on].T @ new, rtol=1e-4, atol=1e-5 * np.abs(y).max())
    np.testing.assert_allclose(np.asarray(res.measurements["objective_lambda_sum"])[on], new,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state["lambda"], lam, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ids, l, weights", [
    ([2, 0, 2], [0.05, 3.0, 0.4], [1.5, 1.0, 0.5, 2.0]),     # K < T, a task twice
    ([0, 1, 2], [0.5, 1.5, 0.0], [1.0, 2.0, 0.0]),           # weight 0, loss 0 (unlabelled)
])
def test_gls_non_unit_weights_sampling_and_weight_zero(ids, l, weights):
  """``G = prod_k L_k^(w_k / K)``; ``dG / dL_k = G w_k / (K L_k)`` (0 for a
  slot of weight 0 even at L = 0), summed per task in the lambda measurement."""
  l64, w = np.asarray(l, np.float64), np.asarray(weights, np.float64)[ids]
  obj = objectives.make_objective("gls", len(weights))
  res = obj.gradients(helpers.identity_linearization(l), objectives.Inputs(
      jnp.asarray(ids), jnp.asarray(weights, jnp.float32), {}, {}, jax.random.key(0)))
  live = w > 0
  kl = live.sum()                                  # the slots of weight > 0
  geo = np.prod(l64[live] ** (w[live] / kl))
  coef = np.where(live, geo * w / (kl * np.where(live, l64, 1.0)), 0.0)
  np.testing.assert_allclose(res.total, geo, rtol=1e-5)
  np.testing.assert_allclose(res.grads["shared"], coef, rtol=1e-5)
  np.testing.assert_allclose(res.measurements["objective_lambda_sum"],
                             _np_heads(coef, np.ones((len(ids), 1)), ids, len(weights))[:, 0],
                             rtol=1e-5)
  # Finite differences of the value in each live loss.
  for k in np.nonzero(live)[0]:
    up, dn = l64.copy(), l64.copy()
    up[k] *= 1 + 1e-6
    dn[k] *= 1 - 1e-6
    fd = (np.prod(up[live] ** (w[live] / kl)) - np.prod(dn[live] ** (w[live] / kl))
          ) / (2e-6 * l64[k])
    np.testing.assert_allclose(coef[k], fd, rtol=1e-5)


def _stch_weighted(obj, seq):
  """``_stch_steps`` with per-step task weights ``[T]`` (steps' ``present``)."""
  state, out = obj.init_state(), []
  for n, (ids, l, w) in enumerate(seq):
    res = obj.gradients(helpers.identity_linearization(l), objectives.Inputs(
        jnp.asarray(ids), jnp.asarray(w, jnp.float32), state, {}, jax.random.key(n)))
    state = obj.after_update(res.state, jnp.asarray(l, jnp.float32), jnp.asarray(ids), None)
    out.append((np.asarray(res.grads["shared"], np.float64), res, state))
  return out


def test_stch_non_unit_weights_and_weight_zero_slots():
  """Weights ``[2, 0.5, 0]``: task 2 (weight 0, losses > 0) never enters the
  nadir nor the value, and STCH still starts without it; a slot unlabelled in
  the nadir window (weight 0, loss 0) is not counted; after warm-up
  ``K mu logsumexp(w log(L/z) / mu)`` over the live slots (float64), its
  gradient ``K p_k w_k / L_k``; a step with every slot of weight 0 is 0."""
  w = np.array([2.0, 0.5, 0.0])
  unl = np.array([2.0, 0.0, 0.0])                   # task 1 unlabelled in that step
  ids = [0, 1, 2]
  seq = [(ids, np.array([1.0, 2.0, 3.0]), w),        # warm-up
         (ids, np.array([0.8, 1.6, 2.5]), w),        # nadir window
         (ids, np.array([0.6, 0.0, 2.0]), unl),      # nadir window, task 1 unlabelled
         (ids, np.array([0.5, 1.8, 1.0]), w),        # STCH
         ([1, 0, 2], np.array([2.2, 0.3, 4.0]), w),  # STCH
         (ids, np.array([0.7, 0.0, 0.0]), np.zeros(3))]  # every slot weight 0
  mu = 0.3
  out = _stch_weighted(objectives.make_objective("stch", 3, mu=mu, warmup_steps=1,
                                                 nadir_steps=2), seq)
  nadir = np.array([(0.8 + 0.6) / 2, 1.6, np.nan])
  st = out[2][2]
  np.testing.assert_allclose(np.asarray(st["count"]), [2, 1, 0])
  np.testing.assert_allclose(np.asarray(st["loss_sum"])[:2] / [2, 1], nadir[:2], rtol=1e-6)
  assert float(st["loss_sum"][2]) == 0.0
  for n in (0, 1, 2):                                # warm-up: sum w log L
    live = seq[n][2][seq[n][0]] > 0
    np.testing.assert_allclose(out[n][0], np.where(live, seq[n][2][seq[n][0]] / np.where(
        live, seq[n][1], 1.0), 0.0), rtol=1e-5)
  for n in (3, 4):
    i, l, ww = seq[n]
    wk = ww[i]
    live = wk > 0
    x = wk[live] * np.log(l[live] / nadir[np.asarray(i)[live]])
    p = np.exp(x / mu) / np.exp(x / mu).sum()
    np.testing.assert_allclose(out[n][1].total, 2 * mu * np.log(np.exp(x / mu).sum()),
                               rtol=1e-5)                     # K = 2 slots of weight > 0
    grad = np.zeros(3)
    grad[live] = 2 * p * wk[live] / l[live]
    np.testing.assert_allclose(out[n][0], grad, rtol=1e-4, atol=1e-7)
    slot_lam = np.zeros(3)
    slot_lam[live] = 2 * p
    lam = _np_heads(slot_lam, np.ones((3, 1)), i, 3)[:, 0]
    np.testing.assert_allclose(out[n][1].measurements["objective_lambda_sum"], lam, rtol=1e-5)
  _, res, st = out[5]
  assert float(res.total) == 0.0 and np.all(out[5][0] == 0)
  assert _finite(res.measurements) and _finite(st)


# Slots 2 and 3 of weight 0: task 2 a zero task weight (loss and gradient
# real), task 3 unlabelled (loss 0, gradient 0).
_W0 = np.array([1.0, 2.0, 0.0, 0.0], np.float32)
_SEQ0 = [([0, 1, 2, 3], [0.8, 1.3, 0.9, 0.0], np.vstack([_jac(n, 3, kind), np.zeros((1, 10))]))
         for n, kind in enumerate(("opposite_100x", "norms_100x", "opposite"))]
# Per method: the state entries whose rows (tasks 2, 3) must stay at init.
_UNTOUCHED = {"gradvac": ("targets",), "db_mtl": ("grads", "count"),
              "moco": ("y", "count"),
              "excess_mtl": ("grad_sq_sum", "initial_risk", "seen"),
              "stch": ("loss_sum", "count"), "imtl": (), "gls": ()}


@pytest.mark.parametrize("method", sorted(_UNTOUCHED))
def test_weight_zero_slots_leave_no_trace(method):
  """Every new method with slots of weight 0: finite value, gradients, state
  and measurements; the weight-0 tasks' state rows at their initial values;
  and where the method has a float64 reference on the live slots, the same
  direction as without those slots."""
  hp = {"stch": {"warmup_steps": 1, "nadir_steps": 1}}.get(method, {})
  obj = objectives.make_objective(method, 4, **hp)
  out = _run(obj, _SEQ0, _W0, 10)
  init = objectives.bind_shared(obj, jax.ShapeDtypeStruct((10,), jnp.float32)).init_state()
  for d, res, state in out:
    assert np.all(np.isfinite(d)) and np.isfinite(float(res.total)), method
    assert _finite(res.measurements) and _finite(state), method
    for key in _UNTOUCHED[method]:
      np.testing.assert_array_equal(np.asarray(state[key])[2:], np.asarray(init[key])[2:],
                                    err_msg=f"{method} {key}")
      if key == "targets":
        np.testing.assert_array_equal(np.asarray(state[key])[:, 2:], 0.0)
  live = [([0, 1], l[:2], j[:2]) for _, l, j in _SEQ0]
  if method in ("db_mtl", "moco", "imtl", "stch", "gls"):   # T-independent given the live slots
    ref = _run(objectives.make_objective(method, 2, **hp), live, _W0[:2], 10)
    for (d, res, _), (want, res2, _) in zip(out, ref):
      np.testing.assert_allclose(d, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(),
                                 err_msg=method)
      np.testing.assert_allclose(res.total, res2.total, rtol=1e-5, err_msg=method)
  if method == "excess_mtl":
    for (d, _, state), (lam, _, _), (ids, _, jac) in zip(
        out, _np_excess(_SEQ0, _W0, 1e-2, 4), _SEQ0):
      np.testing.assert_allclose(state["loss_weights"], lam, rtol=1e-5)
      want = ((lam * _W0)[ids][:, None] * jac).sum(0)
      np.testing.assert_allclose(d, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
  if method == "moco":                                # weight 0 off the active tasks
    assert np.all(np.asarray(out[-1][2]["lambda"])[2:] == 0)
  if method == "gradvac":                             # the live pair's targets move
    assert np.all(np.asarray(out[-1][2]["targets"])[[0, 1], [1, 0]] != 0)


def test_graddrop_several_representation_leaves_and_a_weight_zero_slot():
  """A representation of two leaves (one uniform draw per leaf, keys split
  from the step's key in leaf order): each leaf dropped by Algorithm 1 on its
  own (float64); a slot of weight 0 has ``dZ = 0`` and changes nothing."""
  rng = np.random.default_rng(4)
  scale = np.array([100.0, 1.0, 0.01])
  dz = {"a": rng.normal(size=(3, 4, 3)) * scale[:, None, None],
        "b": rng.normal(size=(3, 5)) * scale[:, None]}
  dz["b"][1] = -0.9 * dz["b"][0] / 100.0
  weights = np.array([1.0, 2.0, 0.0], np.float32)
  lin = jacobians.Linearized(
      losses=jnp.array([0.5, 1.0, 0.0]), pullback=None, slot_grads=None,
      rep_grads=lambda c: (jax.tree.map(lambda a: c.reshape((-1,) + (1,) * (a.ndim - 1))
                                        * jnp.asarray(a, jnp.float32), dz), {}),
      rep_pullback=lambda z: z, loss_at=None, one_pass=True)
  key = jax.random.key(9)
  for leak in (0.0, 0.3):
    res = objectives.make_objective("graddrop", 3, leak=leak).gradients(
        lin, objectives.Inputs(jnp.arange(3), jnp.asarray(weights), {}, {}, key))
    ka, kb = jax.random.split(key, 2)
    for name, k in (("a", ka), ("b", kb)):
      u = np.asarray(jax.random.uniform(k, dz[name].shape[1:]), np.float64)
      rows = dz[name] * weights.reshape((3,) + (1,) * (dz[name].ndim - 1))
      want = _np_graddrop(rows, u, leak)
      np.testing.assert_allclose(want, _np_graddrop(rows[:2], u, leak), rtol=1e-12)
      np.testing.assert_allclose(res.grads["shared"][name], want, rtol=1e-5,
                                 atol=1e-6 * np.abs(want).max())
      assert _finite(res.measurements)


def test_graddrop_step_drops_the_cotangent_of_algorithm_1():
  """The train step (one pass, shared inputs, SGD lr 1, leak 0): the shared
  update is the trunk's pullback of Algorithm 1's dropped cotangent (float64
  masks from the step's uniform draws on the step's ``dZ``); the heads get
  their plain weighted gradients."""
  data = helpers.toy_data()
  model = multitask.make_model("multi_head", data.taskset, data.input_shape, hidden=(8,))
  tx = optim.make_optimizer("sgd", lr=1.0)
  weights = np.array([1.0, 2.0, 0.5, 1.0], np.float32)
  probs = np.full(4, 0.25)
  obj = objectives.make_objective("graddrop", 4)
  fn = steps.make_train_step(
      model, tx, obj, sampling.make_sampler(data.taskset, probs, 3, 16, shared_inputs=True),
      weights=weights, seed=5)
  state = steps.init_train_state(model, tx, jax.random.key(0), obj)
  new = jax.jit(fn)(state, data.train)[0].params
  ids, x, ys, r_method = helpers.step_batch(data, probs, seed=5, step=0, k=3, b=16,
                                            shared_inputs=True)
  bt = helpers.batch(ids, x, ys, True)

  def lin_at(params):
    return jacobians.linearize(model, params, bt, needs="representation", one_pass=True)
  # The reference's two passes each jitted (one program each, not one eager
  # program per op).
  dz, g_tasks = jax.jit(lambda p: lin_at(p).rep_grads(jnp.asarray(weights[ids])))(
      state.params)
  leaves, treedef = jax.tree.flatten(dz)
  keys = jax.random.split(r_method, len(leaves))
  cot = [np.float32(_np_graddrop(np.asarray(g, np.float64),
                                 np.asarray(jax.random.uniform(k, g.shape[1:])), 0.0))
         for k, g in zip(keys, leaves)]
  # Something is dropped: the cotangent is not the plain sum.
  assert not np.allclose(cot[0], np.asarray(leaves[0]).sum(0), rtol=1e-3)
  want = jax.jit(lambda p, c: lin_at(p).rep_pullback(c))(
      state.params, jax.tree.unflatten(treedef, [jnp.asarray(c) for c in cot]))
  helpers.assert_trees_close(new["shared"], jax.tree.map(lambda p, g: p - g,
                                                         state.params["shared"], want),
                             rtol=1e-5, atol=1e-6)
  helpers.assert_trees_close(new["tasks"], jax.tree.map(lambda p, g: p - g,
                                                        state.params["tasks"], g_tasks),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["config", "aligned_mtl", "imtl_g", "imtl"])
def test_spectral_methods_decompose_the_rows_factor_on_the_jacobian_path(method):
  """On the Jacobian path the spectral methods see the rows' factor
  (``gradients.cosine_factor``): on nearly collinear rows (and, for ConFIG, a
  near-opposite pair among 8 tasks), where a float32 Gram cannot resolve
  ``C``, the step's direction is the float64 reference's (ConFIG, Aligned-MTL),
  while ``gram_path="accumulate"`` (the Gram only) flags the same inputs.
  IMTL-G's normalisation is beyond float32 on collinear rows either way: it
  is right where not flagged (here: the 100x near-opposite rows). (imtl,
  IMTL-G with IMTL-L's scales at 0 here, has the Jacobian path only.)"""
  import test_hard_jacobians as th  # noqa: PLC0415
  ref = {"config": th.ref_config, "aligned_mtl": th.ref_aligned}.get(method, th.ref_imtl_g)
  kinds = {"config": (("collinear", 5), ("opposite", 8)), "aligned_mtl": (("collinear", 5),)
           }.get(method, (("collinear", 5), ("opposite_100x", 8)))
  exact = 0
  for kind, t in kinds:
    for g in hard_jacobians.hard_jacobian_batch(kind, t, 10, 4, seed=7):
      out = {}
      for path in ("jacobian",) + (("accumulate",) if method != "imtl" else ()):
        obj = objectives.make_objective(method, t, gram_path=path)
        lin = _linear_lin(np.ones(t), g)._replace(
            slot_gram=lambda c, g=g: (gradients.gram(c[:, None] * jnp.asarray(g, jnp.float32)),
                                      {}))
        own = obj.init_params()
        res = obj.gradients(lin, objectives.Inputs(jnp.arange(t), jnp.ones((t,)), obj.init_state(),
                                                   own, jax.random.key(0)))
        out[path] = (np.asarray(res.grads["shared"], np.float64),
                     float(res.measurements["solver_failures"].sum()))
      d, fails = out["jacobian"]
      want = ref(g)
      if method in ("config", "aligned_mtl"):
        assert fails == 0 and _cos(d, want) >= 0.999, (kind, _cos(d, want))
        np.testing.assert_allclose(np.linalg.norm(d), np.linalg.norm(want), rtol=1e-2)
      elif fails == 0:   # IMTL-G: converged only when right
        assert _cos(d, want) >= 0.999
        np.testing.assert_allclose(np.linalg.norm(d), np.linalg.norm(want), rtol=1e-2)
      exact += fails == 0
      if method in ("config", "aligned_mtl"):   # the Gram cannot resolve these
        assert out["accumulate"][1] > 0, (method, kind)
  assert exact >= 1


def test_gradvac_targets_average_a_task_sampled_twice():
  """Task ids ``[0, 2, 0, 1]`` with slot 3 invalid: task 0 fills two slots, so
  the ordered task pairs (0, 2), (2, 0) and (0, 0) each come from two slot
  pairs, and their target moves by ``(1 - beta) phi + beta mean(rho)`` once,
  with the two cosines averaged (not summed, not applied twice); (0, 0) is
  the cosine between task 0's two slots. The invalid slot's task 1 and every
  pair never sampled keep their targets. Against a float64 numpy EMA written
  from the rule."""
  rng = np.random.default_rng(5)
  t, beta = 3, 0.3
  ids, valid = np.array([0, 2, 0, 1]), np.array([True, True, True, False])
  phi0 = rng.uniform(-0.5, 0.5, (t, t))
  rho = rng.uniform(-0.9, 0.9, (4, 4))
  np.fill_diagonal(rho, 1.0)
  got = np.asarray(stateful.gradvac_targets(
      jnp.asarray(phi0, jnp.float32), jnp.asarray(rho, jnp.float32), jnp.asarray(ids),
      jnp.asarray(valid), beta), np.float64)
  cosines = {}                                  # ordered task pair -> its slot pairs' cosines
  for a in range(4):
    for b in range(4):
      if a != b and valid[a] and valid[b]:
        cosines.setdefault((ids[a], ids[b]), []).append(rho[a, b])
  assert sorted(cosines) == [(0, 0), (0, 2), (2, 0)]
  assert all(len(c) == 2 for c in cosines.values())
  want = phi0.copy()
  for (i, j), c in cosines.items():
    want[i, j] = (1 - beta) * phi0[i, j] + beta * np.mean(c)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(got[1], np.float32(phi0[1]))       # task 1: invalid slot only
  np.testing.assert_array_equal(got[:, 1], np.float32(phi0[:, 1]))


def _np_simplex_by_bisection(v, iters=200):
  """The Euclidean projection onto the simplex as ``max(v - tau, 0)`` with
  ``sum max(v - tau, 0) = 1``, tau found by bisection (float64): the KKT
  conditions, not the sort-based algorithm."""
  lo, hi = np.min(v) - 1.0, np.max(v)
  for _ in range(iters):
    tau = 0.5 * (lo + hi)
    lo, hi = (tau, hi) if np.maximum(v - tau, 0).sum() > 1 else (lo, tau)
  return np.maximum(v - 0.5 * (lo + hi), 0)


@pytest.mark.parametrize("simplex", ["project", "softmax"])
def test_moco_lambda_regulariser_at_a_large_rho_from_non_uniform_weights(simplex):
  """MoCo's weight step ``lambda <- Pi(lambda - gamma (Y Y^T + rho I) lambda)``
  at rho = 2 from non-uniform weights (from uniform ones ``rho I lambda`` is
  a constant shift, which neither the projection nor the softmax sees), with
  task 3 inactive (``y_3 = 0``: left out, the rest renormalised to sum 1,
  weight 0). Against float64 numpy: the projection by bisection on its
  threshold, or the softmax over the active tasks; the regulariser moves the
  answer by far more than the tolerance (checked against rho = 0 and -2)."""
  rng = np.random.default_rng(2)
  y = rng.normal(size=(4, 6)) * np.array([[0.6], [0.3], [0.5], [0.0]])
  lam = np.array([0.5, 0.25, 0.1, 0.15])
  active = np.array([True, True, True, False])
  gamma, rho = 0.2, 2.0

  def want(rho):
    base = lam[:3] / lam[:3].sum()
    v = base - gamma * (y[:3] @ y[:3].T + rho * np.eye(3)) @ base
    new = _np_simplex_by_bisection(v) if simplex == "project" else np.exp(v) / np.exp(v).sum()
    return np.append(new, 0.0)
  got = np.asarray(stateful.moco_lambda(
      jnp.asarray(lam, jnp.float32), jnp.asarray(y @ y.T, jnp.float32), jnp.asarray(gamma),
      jnp.asarray(active), rho=rho, simplex=simplex), np.float64)
  expected = want(rho)
  np.testing.assert_allclose(expected.sum(), 1.0, rtol=1e-12)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
  for other in (0.0, -rho):                     # the case is sensitive to rho and its sign
    assert np.abs(want(other) - expected).max() > 0.02
