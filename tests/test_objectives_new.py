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
from mtljax import tracked
from mtljax.models import multitask

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


def _linear_lin(losses, jac) -> jacobians.Linearized:
  """A linearisation with slot losses ``losses [K]`` and per-slot gradients
  ``jac [K, P]`` of a "shared parameter" vector (no task parameters)."""
  l = jnp.asarray(losses, jnp.float32)
  j = jnp.asarray(jac, jnp.float32)
  return jacobians.Linearized(
      losses=l, pullback=lambda c: {"shared": c @ j, "tasks": {}},
      slot_grads=lambda c: (c[:, None] * j, {}), rep_grads=None, rep_pullback=None,
      loss_at=lambda p: l, one_pass=False)


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
  c, rho = tracked.gradvac_coefficients(gradients.gram(jnp.asarray(g, jnp.float32)),
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
    c, _ = tracked.gradvac_coefficients(gradients.gram(jnp.asarray(g, jnp.float32)),
                                        jnp.full((2, 2), phi, jnp.float32),
                                        jnp.asarray([[0, 1], [1, 0]]))
    adj = np.asarray(c, np.float64) @ g
    np.testing.assert_allclose(_cos(adj[0], g[1]), phi, atol=1e-5)
    np.testing.assert_allclose(_cos(adj[1], g[0]), phi, atol=1e-5)
  # Already above the target: untouched.
  c, _ = tracked.gradvac_coefficients(gradients.gram(jnp.asarray(g, jnp.float32)),
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
  got = tracked.graddrop_cotangent({"z": jnp.asarray(dz, jnp.float32)}, key, leak=leak)["z"]
  u = np.asarray(jax.random.uniform(jax.random.split(key, 1)[0], (6, 5)))
  np.testing.assert_allclose(got, _np_graddrop(dz, u, leak), rtol=1e-5, atol=1e-6)


def test_graddrop_keeps_everything_when_all_gradients_agree_in_sign():
  rng = np.random.default_rng(1)
  sign = np.where(rng.normal(size=(4, 7)) > 0, 1.0, -1.0)
  dz = np.abs(rng.normal(size=(3, 4, 7))) * sign[None] * np.array([100., 1., .01])[:, None, None]
  for seed in range(5):
    got = tracked.graddrop_cotangent(jnp.asarray(dz, jnp.float32), jax.random.key(seed))
    np.testing.assert_allclose(got, dz.sum(0), rtol=1e-5)
  # With leak = 1 nothing is ever dropped, whatever the signs.
  mixed = rng.normal(size=(3, 4, 7))
  np.testing.assert_allclose(tracked.graddrop_cotangent(jnp.asarray(mixed, jnp.float32),
                                                        jax.random.key(0), leak=1.0),
                             mixed.sum(0), rtol=1e-5, atol=1e-6)


def test_graddrop_in_the_step_with_leak_one_is_the_weighted_sum_step():
  """The one-pass step: with ``leak=1`` GradDrop back-propagates ``sum_k dZ_k``,
  the weighted-sum gradient; with ``leak=0`` the shared update differs."""
  data = helpers.toy_data()
  model = multitask.make_model("multi_head", data.taskset, data.input_shape, hidden=(8,))
  tx = optim.make_optimizer("sgd", lr=1.0)
  weights = np.array([1.0, 2.0, 0.5, 1.0], np.float32)
  probs = np.full(4, 0.25)

  def run(method, **hp):
    obj = objectives.make_objective(method, 4, **hp)
    fn = steps.make_train_step(model, tx, obj, task_probs=probs, weights=weights,
                               tasks_per_step=3, examples_per_task=16, seed=5,
                               shared_inputs=True)
    state = steps.init_train_state(model, tx, jax.random.key(0), obj)
    return jax.jit(fn)(state, data.train)[0]["params"]

  fixed, leak1, leak0 = run("fixed"), run("graddrop", leak=1.0), run("graddrop")
  helpers.assert_trees_close(leak1, fixed, rtol=1e-5, atol=1e-6)
  helpers.assert_trees_close(leak0["tasks"], fixed["tasks"], rtol=1e-5, atol=1e-6)
  assert not np.allclose(leak0["shared"]["trunk"]["layer_0"]["kernel"],
                         fixed["shared"]["trunk"]["layer_0"]["kernel"])


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
  # IMTL-G's own accuracy is tested in test_gradients.py; here: where it
  # reports convergence, the step's direction is IMTL-G's on the scaled rows.
  if float(res.measurements["solver_failures"]) == 0:
    want = _np_imtl_g(rows) @ rows
    d = np.asarray(res.grads["shared"], np.float64)
    assert _cos(d, want) >= 0.999, _cos(d, want)
    np.testing.assert_allclose(np.linalg.norm(d), np.linalg.norm(want), rtol=1e-2)
  else:
    u = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    assert np.linalg.cond(u @ u.T) > 1e5, kind
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
  assert set(_NEW) <= set(objectives.METHODS)
  # IMTL's are IMTL-G's (one set of defaults).
  assert objectives.hyperparameters("imtl") == gradients.hyperparameters(
      gradients.imtl_g_weights)
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
