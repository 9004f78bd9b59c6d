"""Gradient-combination methods against float64 references written from the
papers, optimality conditions, two-task closed forms, and property tests."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from mtljax import gradients

TS = [2, 3, 5, 8]


def _g(t, d=20, seed=0, conflict=True):
  rng = np.random.default_rng(seed + 100 * t)
  g = rng.normal(size=(t, d))
  if conflict:  # make some pairs conflict strongly
    g[1] = -0.7 * g[0] + 0.3 * g[1]
  return g


# ---------------------------------------------------------------------------
# MGDA
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("t", TS)
def test_mgda_satisfies_kkt_on_the_simplex(t):
  g = _g(t)
  d, a, info = jax.jit(gradients.mgda)(jnp.asarray(g, jnp.float32))
  a = np.asarray(a, np.float64)
  k = g @ g.T
  assert np.all(a >= -1e-7) and abs(a.sum() - 1) < 1e-5
  ka, obj = k @ a, a @ k @ a
  # KKT: (K a)_i >= a^T K a for all i, with equality on the support.
  scale = np.trace(k) / t
  assert np.all(ka >= obj - 1e-4 * scale)
  np.testing.assert_allclose(ka[a > 1e-3], obj, atol=1e-4 * scale)
  np.testing.assert_allclose(d, a @ g, rtol=1e-4, atol=1e-4)
  assert bool(info["converged"])


def test_mgda_two_task_closed_form():
  g = _g(2)
  g1, g2 = g
  alpha = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0, 1)
  _, a, _ = gradients.mgda(jnp.asarray(g, jnp.float32))
  np.testing.assert_allclose(a, [alpha, 1 - alpha], atol=1e-5)


# ---------------------------------------------------------------------------
# PCGrad
# ---------------------------------------------------------------------------


def _np_pcgrad(g, orders):
  out = []
  for i in range(len(g)):
    gi = g[i].copy()
    for j in orders[i]:
      dot = gi @ g[j]
      if dot < 0:
        gi -= dot / (g[j] @ g[j]) * g[j]
    out.append(gi)
  return np.sum(out, 0), np.array(out)


@pytest.mark.parametrize("t", TS)
def test_pcgrad_matches_float64_reference(t):
  g = _g(t)
  rng = jax.random.key(t)
  d, _, info = gradients.pcgrad(jnp.asarray(g, jnp.float32), rng)
  want, projected = _np_pcgrad(g, np.asarray(gradients.pcgrad_orders(rng, t)))
  np.testing.assert_allclose(d, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(info["coefficients"]) @ g, projected, atol=1e-4)


def test_pcgrad_two_conflicting_gradients_become_orthogonal():
  g = np.array([[1.0, 0.2, 0.0], [-0.8, 1.0, 0.3]])
  assert g[0] @ g[1] < 0
  _, _, info = gradients.pcgrad(jnp.asarray(g, jnp.float32), jax.random.key(0))
  proj = np.asarray(info["coefficients"]) @ g
  assert abs(proj[0] @ g[1]) < 1e-6 and abs(proj[1] @ g[0]) < 1e-6


# ---------------------------------------------------------------------------
# CAGrad
# ---------------------------------------------------------------------------


def _np_cagrad(g, c):
  """The official code's dual solved by scipy SLSQP in float64."""
  t = len(g)
  k = g @ g.T
  b = np.ones(t) / t
  g0n = np.sqrt(b @ k @ b)
  obj = lambda w: w @ k @ b + c * g0n * np.sqrt(w @ k @ w + 1e-12)
  res = optimize.minimize(obj, b, bounds=[(0, 1)] * t,
                          constraints={"type": "eq", "fun": lambda w: 1 - w.sum()},
                          method="SLSQP", options={"ftol": 1e-14, "maxiter": 1000})
  return res.x, obj


@pytest.mark.parametrize("t", TS)
@pytest.mark.parametrize("c", [0.2, 0.5, 0.9])
def test_cagrad_dual_optimal_and_in_the_ball(t, c):
  g = _g(t)
  d_raw, beta, info = gradients.cagrad(jnp.asarray(g, jnp.float32), c=c, rescale=0)
  w_ref, obj = _np_cagrad(g, c)
  w = np.asarray(info["w"], np.float64)
  assert np.all(w >= -1e-7) and abs(w.sum() - 1) < 1e-5
  # Dual optimality: our w is as good as the float64 reference solver's.
  assert obj(w) <= obj(w_ref) + 1e-4 * abs(obj(w_ref)) + 1e-6
  g0 = g.mean(0)
  d_raw = np.asarray(d_raw, np.float64)
  # The primal constraint ||d - g0|| <= c ||g0||, tight at the optimum.
  np.testing.assert_allclose(np.linalg.norm(d_raw - g0), c * np.linalg.norm(g0), rtol=1e-3)
  # The official rescaling divides by 1 + c^2.
  d1, _, _ = gradients.cagrad(jnp.asarray(g, jnp.float32), c=c, rescale=1)
  np.testing.assert_allclose(d1, d_raw / (1 + c * c), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# IMTL-G, Nash-MTL, Aligned-MTL
# ---------------------------------------------------------------------------


def _np_imtl_g(g):
  u = g / np.linalg.norm(g, axis=1, keepdims=True)
  dd = g[0] - g[1:]
  uu = u[0] - u[1:]
  alpha = g[0] @ uu.T @ np.linalg.inv(dd @ uu.T)
  return np.concatenate([[1 - alpha.sum()], alpha])


@pytest.mark.parametrize("t", TS)
def test_imtl_g_matches_reference_and_equalises_projections(t):
  g = _g(t)
  d, alpha, info = gradients.imtl_g(jnp.asarray(g, jnp.float32))
  np.testing.assert_allclose(alpha, _np_imtl_g(g), rtol=1e-3, atol=1e-4)
  u = g / np.linalg.norm(g, axis=1, keepdims=True)
  proj = u @ np.asarray(d, np.float64)
  np.testing.assert_allclose(proj, proj[0], rtol=1e-3, atol=1e-4)
  assert bool(info["converged"])


@pytest.mark.parametrize("t", TS)
def test_nash_mtl_solves_the_bargaining_system(t):
  g = _g(t, d=max(20, t))
  _, alpha, info = gradients.nash_mtl(jnp.asarray(g, jnp.float32))
  alpha = np.asarray(alpha, np.float64)
  assert np.all(alpha > 0)
  np.testing.assert_allclose((g @ g.T) @ alpha, 1 / alpha, rtol=1e-3)
  assert bool(info["converged"])


def test_nash_mtl_and_imtl_g_coincide_in_direction_for_two_tasks():
  for seed in range(5):
    g = _g(2, seed=seed)
    d_n, _, _ = gradients.nash_mtl(jnp.asarray(g, jnp.float32))
    d_i, _, _ = gradients.imtl_g(jnp.asarray(g, jnp.float32))
    d_n, d_i = np.asarray(d_n, np.float64), np.asarray(d_i, np.float64)
    cos = d_n @ d_i / np.linalg.norm(d_n) / np.linalg.norm(d_i)
    np.testing.assert_allclose(cos, 1.0, atol=1e-5)


def test_nash_mtl_rank_deficient_cases():
  # Parallel gradients, same direction: rank 2 < 3, and a solution exists:
  # a = (1/sqrt(2), 1/(2 sqrt(2)), 1).
  g = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
  _, alpha, info = gradients.nash_mtl(jnp.asarray(g, jnp.float32))
  assert bool(info["converged"])
  np.testing.assert_allclose(alpha, [2 ** -0.5, 2 ** -1.5, 1.0], rtol=1e-4)
  # Opposite gradients: g1 + g2 = 0 is a Pareto-stationary point; no solution,
  # and the solver says so without NaN.
  g = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
  _, alpha, info = gradients.nash_mtl(jnp.asarray(g, jnp.float32))
  assert not bool(info["converged"])
  assert np.all(np.isfinite(alpha))


def _np_aligned(g):
  k = g @ g.T
  lam, v = np.linalg.eigh(k)
  keep = lam > lam.max() * len(k) * np.finfo(np.float32).eps
  lam, v = lam[keep], v[:, keep]
  b = np.sqrt(lam.min()) * (v / np.sqrt(lam)) @ v.T
  return b


@pytest.mark.parametrize("t", TS)
def test_aligned_mtl_components_orthogonal_equal_norm(t):
  g = _g(t)
  d, beta, info = gradients.aligned_mtl(jnp.asarray(g, jnp.float32))
  b_ref = _np_aligned(g)
  np.testing.assert_allclose(info["B"], b_ref, rtol=1e-3, atol=1e-4)
  aligned = b_ref @ g
  gram_aligned = aligned @ aligned.T
  sigma_min2 = np.linalg.eigvalsh(g @ g.T).min()
  np.testing.assert_allclose(gram_aligned, sigma_min2 * np.eye(t), atol=1e-6 * np.trace(g @ g.T))
  np.testing.assert_allclose(d, b_ref.sum(0) @ g, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------
# Pytrees and properties
# ---------------------------------------------------------------------------

METHODS = {
    "mgda": lambda g: gradients.mgda(g),
    "pcgrad": lambda g: gradients.pcgrad(g, jax.random.key(0)),
    "cagrad": lambda g: gradients.cagrad(g),
    "imtl_g": lambda g: gradients.imtl_g(g),
    "nash_mtl": lambda g: gradients.nash_mtl(g),
    "aligned_mtl": lambda g: gradients.aligned_mtl(g),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_pytree_gradients_equal_the_matrix(name):
  g = jnp.asarray(_g(4, d=12), jnp.float32)
  tree = {"a": g[:, :5].reshape(4, 5, 1), "b": {"c": g[:, 5:]}}
  d_mat, beta_mat, _ = METHODS[name](g)
  d_tree, beta_tree, _ = METHODS[name](tree)
  np.testing.assert_allclose(beta_tree, beta_mat, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
      np.concatenate([d_tree["a"].reshape(-1), d_tree["b"]["c"]]), d_mat, rtol=1e-4, atol=1e-5)


_JITTED = {name: jax.jit(fn) for name, fn in METHODS.items()}


@hypothesis.settings(max_examples=15, deadline=None, derandomize=True)
@hypothesis.given(
    t=st.integers(2, 6), d=st.integers(1, 8), seed=st.integers(0, 10_000),
    zero_rows=st.integers(0, 2), duplicate=st.booleans())
@pytest.mark.parametrize("name", sorted(METHODS))
def test_no_nan_on_rank_deficient_and_zero_rows(name, t, d, seed, zero_rows, duplicate):
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(t, d)) * 10.0 ** rng.uniform(-3, 3)
  g[:min(zero_rows, t - 1)] = 0.0
  if duplicate:
    g[-1] = g[-2]
  d_out, beta, _ = _JITTED[name](jnp.asarray(g, jnp.float32))
  assert np.all(np.isfinite(np.asarray(d_out))), (name, g)
  assert np.all(np.isfinite(np.asarray(beta))), (name, g)
