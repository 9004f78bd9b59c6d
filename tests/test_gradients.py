"""Gradient-combination methods against float64 references written from the
papers, optimality conditions, two-task closed forms, and property tests."""

import functools
import inspect
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from mtljax import gradients

TS = [2, 3, 5, 8]


@functools.lru_cache(maxsize=None)
def _jitted(name, **hp):
  return jax.jit(functools.partial(getattr(gradients, name), **hp))


def _call(name, *args, **hp):
  """``gradients.<name>(*args, **hp)`` as the train step runs it: compiled, once
  per method, hyper-parameters and shape for the whole module (op-by-op
  execution compiles every operation of the solvers separately)."""
  return _jitted(name, **hp)(*args)


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
  _, a, _ = _call("mgda", jnp.asarray(g, jnp.float32))
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
  d, _, info = _call("pcgrad", jnp.asarray(g, jnp.float32), rng)
  want, projected = _np_pcgrad(g, np.asarray(gradients.pcgrad_orders(rng, t)))
  np.testing.assert_allclose(d, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(info["coefficients"]) @ g, projected, atol=1e-4)


def test_pcgrad_two_conflicting_gradients_become_orthogonal():
  g = np.array([[1.0, 0.2, 0.0], [-0.8, 1.0, 0.3]])
  assert g[0] @ g[1] < 0
  _, _, info = _call("pcgrad", jnp.asarray(g, jnp.float32), jax.random.key(0))
  proj = np.asarray(info["coefficients"]) @ g
  assert abs(proj[0] @ g[1]) < 1e-6 and abs(proj[1] @ g[0]) < 1e-6


def test_pcgrad_projects_onto_itself_as_the_published_loop():
  """Task 0 visits (1, 2, 0): after two projections g_0^PC . g_0 < 0, so the
  published loop (LibMTL's, self included) projects g_0^PC onto g_0's normal
  plane; the library does the same."""
  g = np.array([[0.25, -0.59, -0.58], [1.12, 0.22, 1.37], [-0.94, 1.13, 0.91]])
  gi = g[0].copy()
  for j in (1, 2):
    gi -= min(gi @ g[j], 0.0) / (g[j] @ g[j]) * g[j]
  assert gi @ g[0] < 0  # the self visit conflicts
  seed = next(s for s in range(1000)
              if list(np.asarray(gradients.pcgrad_orders(jax.random.key(s), 3))[0]) == [1, 2, 0])
  rng = jax.random.key(seed)
  d, _, info = _call("pcgrad", jnp.asarray(g, jnp.float32), rng)
  want, projected = _np_pcgrad(g, np.asarray(gradients.pcgrad_orders(rng, 3)))
  np.testing.assert_allclose(d, want, rtol=1e-5, atol=1e-5)
  c = np.asarray(info["coefficients"])
  assert abs(c[0, 0] - 1.0) > 1e-2  # g_0's own coefficient changed: projected onto itself
  np.testing.assert_allclose(c[0] @ g, projected[0], atol=1e-5)
  assert abs(projected[0] @ g[0]) < 1e-9


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


def _cagrad_dual_cases():
  """T = 3 and 8 at c = 0.5 in the fast tier; the rest of the T x c matrix in
  the slow tier (same code path: the exact face enumeration for T <= 10, c
  only scales the ball)."""
  for t in TS:
    for c in (0.2, 0.5, 0.9):
      fast = c == 0.5 and t in (3, 8)
      yield pytest.param(t, c, id=f"{c}-{t}", marks=() if fast else (pytest.mark.slow,))


@pytest.mark.parametrize("t, c", _cagrad_dual_cases())
def test_cagrad_dual_optimal_and_in_the_ball(t, c):
  g = _g(t)
  d_raw, beta, info = _call("cagrad", jnp.asarray(g, jnp.float32), c=c, rescale=0)
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
  d1, _, _ = _call("cagrad", jnp.asarray(g, jnp.float32), c=c, rescale=1)
  np.testing.assert_allclose(d1, d_raw / (1 + c * c), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# CAGrad against an independent float64 solution of the paper's problem
# ---------------------------------------------------------------------------
#
# Liu et al. 2021 (CAGrad), with g0 the mean gradient and rho = c ||g0||:
#   primal  max_d min_i g_i . d   s.t. ||d - g0|| <= rho
#   dual    F* = min_{w in simplex} F(w),  F(w) = g_w . g0 + rho ||g_w||
#   d*      = g0 + rho g_w* / ||g_w*||,    and min_i g_i . d* = F*.
# The references below solve the dual in float64 without the library's solver:
# a fine grid plus golden-section search for T = 2, and for any T an exact
# enumeration of the simplex's faces, each solved in closed form from its KKT
# conditions, certified by the Frank-Wolfe gap. The library has two solvers:
# its own face enumeration in cosine coordinates (T <= exact_up_to, the
# default) and FISTA (exact_up_to=0 here, as beyond exact_up_to); both are
# checked.

CAGRAD_CS = (0.2, 0.5, 0.9)
# (c, rescale) pairs besides rescale=0 at every c (exact solver), and FISTA's
# early stops (at c = 0.5) besides its default 300 iterations at every c: one
# compiled call per task count. Keys: (c, rescale, iters, exact_up_to).
CAGRAD_RESCALED = ((0.2, 2), (0.5, 1), (0.9, 1), (0.9, 2))
CAGRAD_ITERS = {2: (1, 10), 4: (1, 3, 10, 30)}
CAGRAD_SOLVERS = {"exact": 10, "fista": 0}


def _cagrad_dual(g, c):
  """``(F, grad F, a, rho, K)`` of the dual in float64."""
  k = g @ g.T
  t = len(g)
  a = k @ np.full(t, 1.0 / t)  # (K b)_i = g_i . g0
  rho = c * np.linalg.norm(g.mean(0))

  def f(w):
    return w @ a + rho * np.sqrt(max(w @ k @ w, 0.0))

  def grad(w):
    return a + rho * (k @ w) / np.sqrt(w @ k @ w)
  return f, grad, a, rho, k


def _cagrad_dual_grid(g, c, n=20_001):
  """T = 2: w = (x, 1 - x), F convex in x: the best of a fine grid, refined by
  golden-section search on the two cells around it."""
  f = _cagrad_dual(g, c)[0]
  xs = np.linspace(0.0, 1.0, n)
  w = np.stack([xs, 1.0 - xs], 1)
  gw = w @ g
  vals = gw @ g.mean(0) + c * np.linalg.norm(g.mean(0)) * np.linalg.norm(gw, axis=1)
  i = int(np.argmin(vals))
  lo, hi = xs[max(i - 1, 0)], xs[min(i + 1, n - 1)]
  phi = lambda x: f(np.array([x, 1.0 - x]))
  r = (np.sqrt(5.0) - 1.0) / 2.0
  for _ in range(80):
    m1, m2 = hi - r * (hi - lo), lo + r * (hi - lo)
    if phi(m1) <= phi(m2):
      hi = m2
    else:
      lo = m1
  x = (lo + hi) / 2.0
  return np.array([x, 1.0 - x]), phi(x)


def _cagrad_dual_exact(g, c):
  """Any T with linearly independent gradients: on the face with support S,
  stationarity reads ``a_S + rho K_SS w_S / s = nu 1`` with ``s = ||g_w||``, so
  ``w_S = (s / rho) M (nu 1 - a_S)``, ``M = K_SS^{-1}``; ``w^T K w = s^2`` gives
  ``A nu^2 - 2 B nu + C = rho^2`` (``A = 1'M1``, ``B = 1'Ma``, ``C = a'Ma``) and
  ``1'w = 1`` gives ``s = rho / (nu A - B) > 0``. The optimum is the best
  feasible stationary point over all faces."""
  f, grad, a, rho, k = _cagrad_dual(g, c)
  t = len(g)
  best = None
  for r in range(1, t + 1):
    for s in itertools.combinations(range(t), r):
      s = list(s)
      m = np.linalg.inv(k[np.ix_(s, s)])
      one = np.ones(r)
      big_a, big_b, big_c = one @ m @ one, one @ m @ a[s], a[s] @ m @ a[s]
      disc = big_b ** 2 - big_a * (big_c - rho ** 2)
      if disc < 0:
        continue
      for nu in ((big_b + np.sqrt(disc)) / big_a, (big_b - np.sqrt(disc)) / big_a):
        den = nu * big_a - big_b
        if den <= 0:
          continue
        ws = (1.0 / den) * m @ (nu * one - a[s])
        if np.any(ws < -1e-12):
          continue
        w = np.zeros(t)
        w[s] = np.maximum(ws, 0.0)
        w /= w.sum()
        if best is None or f(w) < best[1]:
          best = (w, f(w))
  w, fstar = best
  # Certificate: F is convex, so a zero Frank-Wolfe gap means a global minimum.
  gr = grad(w)
  assert gr @ w - gr.min() <= 1e-9 * np.trace(k), (gr @ w - gr.min(), w)
  return w, fstar


def _cagrad_direction(g, w, c):
  g0 = g.mean(0)
  gw = w @ g
  return g0 + c * np.linalg.norm(g0) * gw / np.linalg.norm(gw)


def _two_directions(d, cos):
  """Unit u and a unit vector at the given cosine to u, in R^d."""
  rng = np.random.default_rng(11)
  u, v = rng.normal(size=(2, d))
  u /= np.linalg.norm(u)
  v -= (v @ u) * u
  v /= np.linalg.norm(v)
  return u, cos * u + np.sqrt(1 - cos * cos) * v


def _cagrad_problems(t):
  """Well-conditioned and hard gradients ``[T, 20]``, with whether the problem
  is well conditioned (the solver must then report convergence)."""
  rng = np.random.default_rng(7 + t)
  u, v = _two_directions(20, -0.99)
  probs = {"conflict": (_g(t), True)}
  g = rng.normal(size=(t, 20))
  g[0] *= 100.0  # norms differ by ~100x
  probs["norms_100x"] = (g, True)
  if t == 2:
    probs["opposite_equal_norms"] = (np.stack([u, v]), True)  # w* = (1/2, 1/2)
    probs["opposite"] = (np.stack([u, 1.05 * v]), False)
  else:
    g = rng.normal(size=(t, 20))
    g[0], g[1] = u * 2.0, v * 2.6  # cosine -0.99, plus t - 2 other tasks
    probs["opposite"] = (g, True)
    probs["orthonormal"] = (np.eye(t, 20), True)  # w* = uniform by symmetry
  return probs


@functools.lru_cache(maxsize=None)
def _cagrad_outputs(t):
  """``{problem: {(c, rescale, iters): (d, beta, info)}}`` from the library, one
  compilation per task count."""
  keys = ([(c, 0, 300, e) for c in CAGRAD_CS for e in (10, 0)]
          + [(c, r, 300, 10) for c, r in CAGRAD_RESCALED]
          + [(0.5, 0, it, 0) for it in CAGRAD_ITERS[t]])
  run = jax.jit(lambda g: {key: gradients.cagrad(g, c=key[0], rescale=key[1], iters=key[2],
                                                 exact_up_to=key[3])
                           for key in keys})
  return {name: jax.tree.map(lambda x: np.asarray(x, np.float64),
                             run(jnp.asarray(g, jnp.float32)))
          for name, (g, _) in _cagrad_problems(t).items()}


def _cagrad_reference(g, c):
  return _cagrad_dual_grid(g, c) if len(g) == 2 else _cagrad_dual_exact(g, c)


@pytest.mark.parametrize("c", CAGRAD_CS)
@pytest.mark.parametrize("name", ["conflict", "norms_100x", "opposite_equal_norms", "opposite"])
def test_cagrad_references_agree_for_two_tasks(name, c):
  # The two float64 references (grid + golden section, exact face enumeration)
  # agree, so either can stand for the optimum.
  g = _cagrad_problems(2)[name][0]
  w_grid, f_grid = _cagrad_dual_grid(g, c)
  w_exact, f_exact = _cagrad_dual_exact(g, c)
  np.testing.assert_allclose(w_grid, w_exact, atol=1e-6)
  np.testing.assert_allclose(f_grid, f_exact, rtol=1e-12, atol=1e-12)
  if name == "opposite_equal_norms":
    np.testing.assert_allclose(w_exact, [0.5, 0.5], atol=1e-9)


def _cagrad_cases():
  return [(t, name) for t in (2, 4) for name in sorted(_cagrad_problems(t))]


@pytest.mark.parametrize("solver", CAGRAD_SOLVERS)
@pytest.mark.parametrize("c", CAGRAD_CS)
@pytest.mark.parametrize("t, name", _cagrad_cases())
def test_cagrad_direction_is_the_papers_closed_form(t, name, c, solver):
  g, well_conditioned = _cagrad_problems(t)[name]
  exact = solver == "exact"
  e = CAGRAD_SOLVERS[solver]
  w_ref, f_ref = _cagrad_reference(g, c)
  d_ref = _cagrad_direction(g, w_ref, c)
  scale = np.trace(g @ g.T) / t
  out = _cagrad_outputs(t)[name]
  # The dual weights are as good as the float64 optimum.
  f = _cagrad_dual(g, c)[0]
  _, _, info = out[(c, 0, 300, e)]
  assert np.all(info["w"] >= -1e-7) and abs(info["w"].sum() - 1) < 1e-5
  assert f(info["w"]) - f_ref <= 1e-6 * scale, (f(info["w"]) - f_ref) / scale
  if well_conditioned or exact:
    assert bool(info["converged"])
  # d = g0 + c ||g0|| g_w / ||g_w||, then / 1, / (1 + c^2), / (1 + c).
  for rescale, divisor in ((0, 1.0), (1, 1 + c * c), (2, 1 + c)):
    if (c, rescale, 300, e) not in out:
      continue
    d, beta, _ = out[(c, rescale, 300, e)]
    want = d_ref / divisor
    cos = d @ want / np.linalg.norm(d) / np.linalg.norm(want)
    assert cos >= 0.9999, (rescale, cos)
    # Two near-opposite gradients, interior optimum (c = 0.5): FISTA stalls
    # at a Frank-Wolfe gap ~1e-4 in float32 (converged=False; more iterations
    # do not help), and d = g0 + rho g_w / ||g_w|| amplifies the error in w by
    # ||g_1 - g_2|| / ||g_w|| ~ 20: ~1e-3 relative error in d. The exact
    # solver, in cosine coordinates, resolves it.
    rel_tol = 1e-4 if well_conditioned or exact else 5e-3
    assert np.linalg.norm(d - want) <= rel_tol * np.linalg.norm(want), (
        rescale, np.linalg.norm(d - want) / np.linalg.norm(want))
    np.testing.assert_allclose(d, beta @ g, rtol=1e-4, atol=1e-5 * np.linalg.norm(want))


@pytest.mark.parametrize("solver", CAGRAD_SOLVERS)
@pytest.mark.parametrize("c", CAGRAD_CS)
@pytest.mark.parametrize("t, name", _cagrad_cases())
def test_cagrad_direction_solves_the_primal(t, name, c, solver):
  # Among d with ||d - g0|| <= c ||g0||, the returned d (rescale=0) maximises
  # min_i g_i . d. It is feasible and reaches the float64 dual optimum F*
  # (strong duality: nothing feasible does better). Exactly, since
  # dF/dw_i = g_i . d(w) and F is 1-homogeneous, min_i g_i . d(w) =
  # F(w) - scale * gap(w) <= F*: the reported Frank-Wolfe gap bounds the
  # shortfall, which is all a point that is not reported converged may miss.
  # No direction sampled on the ball, far from d or near it, does better.
  g, well_conditioned = _cagrad_problems(t)[name]
  _, f_ref = _cagrad_reference(g, c)
  d, _, info = _cagrad_outputs(t)[name][(c, 0, 300, CAGRAD_SOLVERS[solver])]
  g0 = g.mean(0)
  rho = c * np.linalg.norm(g0)
  scale = np.trace(g @ g.T) / t
  assert np.linalg.norm(d - g0) <= rho * (1 + 1e-4)
  worst = np.min(g @ d)
  assert worst <= f_ref + 1e-6 * scale
  slack = info["gap"] * scale + 1e-6 * scale
  assert worst >= f_ref - slack, ((f_ref - worst) / scale, info["gap"])
  if well_conditioned or solver == "exact":
    np.testing.assert_allclose(worst, f_ref, atol=1e-5 * scale)
  rng = np.random.default_rng(0)
  dim = g.shape[1]
  z = rng.normal(size=(3000, dim))
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  radius = rng.uniform(size=(3000, 1)) ** (1 / dim)
  samples = [g0 + rho * z * radius, g0 + rho * z]  # inside and on the sphere
  for eps in (1e-1, 1e-2, 1e-3):  # near d, projected back onto the ball
    s = d + eps * rho * rng.normal(size=(1000, dim)) / np.sqrt(dim)
    off = s - g0
    n = np.linalg.norm(off, axis=1, keepdims=True)
    samples.append(g0 + off * np.minimum(1.0, rho / n))
  samples = np.concatenate(samples)
  assert np.all(np.linalg.norm(samples - g0, axis=1) <= rho * (1 + 1e-9))
  best_sampled = np.max(np.min(samples @ g.T, axis=1))
  assert best_sampled <= f_ref + 1e-9 * scale  # weak duality checks the reference
  assert best_sampled <= worst + slack


@pytest.mark.parametrize("rescale", [-1, 3, 1.5])
def test_cagrad_invalid_rescale_raises(rescale):
  with pytest.raises(ValueError, match="rescale"):
    _call("cagrad", jnp.asarray(_g(2), jnp.float32), c=0.5, rescale=rescale)


@pytest.mark.parametrize("kwargs, match", [
    ({"exact_up_to": -1}, r"cagrad.exact_up_to must be in \[0, 12\]"),
    ({"exact_up_to": 13}, r"cagrad.exact_up_to must be in \[0, 12\]"),
    ({"tol": 1.0}, r"cagrad.tol must be in \[0, 1\)"),
    ({"tol": -1e-3}, r"cagrad.tol must be in \[0, 1\)")])
def test_cagrad_invalid_solver_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _call("cagrad", jnp.asarray(_g(2), jnp.float32), **kwargs)


def test_cagrad_exact_solver_on_a_face_with_a_near_opposite_pair_and_a_100x_row():
  # The inputs on which FISTA can stall in float32 (tests/test_hard_jacobians.py): a
  # near-opposite pair, one row 100x, T = 3. The optimum lies on a face; the
  # exact solver finds it, says converged, and d = beta G matches the float64
  # face enumeration's direction. FISTA on the same input is either as close
  # or says it has not converged.
  rng = np.random.default_rng(3)
  gs = rng.normal(size=(20, 3, 10))
  gs[:, 2] = -0.999 * gs[:, 1] + 0.01 * rng.normal(size=(20, 10))
  gs[:, 0] *= 100.0
  for e in (10, 0):
    run = jax.jit(jax.vmap(lambda g: gradients.cagrad(g, rescale=0, exact_up_to=e)[1:]))
    betas, info = jax.tree.map(np.asarray, run(jnp.asarray(gs, jnp.float32)))
    for g, beta, conv in zip(gs, betas.astype(np.float64), info["converged"]):
      w_ref, _ = _cagrad_dual_exact(g, 0.5)
      d_ref = _cagrad_direction(g, w_ref, 0.5)
      d = beta @ g
      cos = d @ d_ref / np.linalg.norm(d) / np.linalg.norm(d_ref)
      if e:
        assert conv and cos >= 0.9999, cos
      elif conv:
        assert cos >= 0.999, cos


@pytest.mark.parametrize("t, name", _cagrad_cases())
def test_cagrad_converged_means_the_returned_point_is_optimal(t, name):
  # info["gap"] is the Frank-Wolfe gap of the dual scaled by 1 / scale
  # (scale = tr(K) / T): by convexity it bounds the returned point's
  # suboptimality, and "converged" (gap <= 1e-5 (1 + |F|/scale)) may only be
  # reported at a point whose float64 suboptimality is that small. Checked on
  # FISTA's early stops (iters = 1 .. 30), its default 300 iterations and the
  # exact solver (which reports the same gap).
  g = _cagrad_problems(t)[name][0]
  c = 0.5
  _, f_ref = _cagrad_reference(g, c)
  f = _cagrad_dual(g, c)[0]
  scale = np.trace(g @ g.T) / t
  out = _cagrad_outputs(t)[name]
  for key in [(c, 0, it, 0) for it in CAGRAD_ITERS[t] + (300,)] + [(c, 0, 300, 10)]:
    _, _, info = out[key]
    iters = key[2:]
    subopt = (f(info["w"]) - f_ref) / scale
    assert subopt <= info["gap"] + 1e-6, (iters, subopt, info["gap"])
    if info["converged"]:
      assert subopt <= 1e-5 * (1 + abs(f_ref) / scale) + 1e-6, (iters, subopt)


def test_cagrad_one_iteration_is_not_enough_and_says_so():
  # FISTA (exact_up_to=0): from the uniform start, one step does not reach the
  # optimum of these problems (the float64 reference says how far it is):
  # converged is False. The default 300 iterations reach it and say so.
  c = 0.5
  for t, name in [(2, "conflict"), (4, "conflict"), (4, "norms_100x")]:
    g = _cagrad_problems(t)[name][0]
    _, f_ref = _cagrad_reference(g, c)
    f = _cagrad_dual(g, c)[0]
    scale = np.trace(g @ g.T) / t
    one = _cagrad_outputs(t)[name][(c, 0, 1, 0)][2]
    assert (f(one["w"]) - f_ref) / scale > 1e-4, name
    assert not bool(one["converged"]), name
    full = _cagrad_outputs(t)[name][(c, 0, 300, 0)][2]
    assert (f(full["w"]) - f_ref) / scale < 1e-6 and bool(full["converged"]), name


def test_cagrad_converged_after_one_step_when_it_is_optimal():
  # FISTA: converged is about the returned point, not the iteration count. Orthonormal
  # gradients: w* is the uniform start (by symmetry). Two tasks whose norms
  # differ by 100x: w* is the vertex of the small gradient, which one projected
  # step reaches. Either way one iteration returns the optimum and says so.
  g = _cagrad_problems(4)["orthonormal"][0]
  w_ref, _ = _cagrad_dual_exact(g, 0.5)
  np.testing.assert_allclose(w_ref, 0.25, atol=1e-12)
  one = _cagrad_outputs(4)["orthonormal"][(0.5, 0, 1, 0)][2]
  assert bool(one["converged"])
  np.testing.assert_allclose(one["w"], w_ref, atol=1e-6)
  g = _cagrad_problems(2)["norms_100x"][0]
  w_ref, _ = _cagrad_dual_grid(g, 0.5)
  np.testing.assert_allclose(w_ref, [0.0, 1.0], atol=1e-9)
  one = _cagrad_outputs(2)["norms_100x"][(0.5, 0, 1, 0)][2]
  assert bool(one["converged"])
  np.testing.assert_allclose(one["w"], w_ref, atol=1e-6)


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
  d, alpha, info = _call("imtl_g", jnp.asarray(g, jnp.float32))
  np.testing.assert_allclose(alpha, _np_imtl_g(g), rtol=1e-3, atol=1e-4)
  u = g / np.linalg.norm(g, axis=1, keepdims=True)
  proj = u @ np.asarray(d, np.float64)
  np.testing.assert_allclose(proj, proj[0], rtol=1e-3, atol=1e-4)
  assert bool(info["converged"])


@pytest.mark.parametrize("t", TS)
def test_nash_mtl_solves_the_bargaining_system(t):
  g = _g(t, d=max(20, t))
  _, alpha, info = _call("nash_mtl", jnp.asarray(g, jnp.float32))
  alpha = np.asarray(alpha, np.float64)
  assert np.all(alpha > 0)
  np.testing.assert_allclose((g @ g.T) @ alpha, 1 / alpha, rtol=1e-3)
  assert bool(info["converged"])


def test_nash_mtl_and_imtl_g_coincide_in_direction_for_two_tasks():
  for seed in range(5):
    g = _g(2, seed=seed)
    d_n, _, _ = _call("nash_mtl", jnp.asarray(g, jnp.float32))
    d_i, _, _ = _call("imtl_g", jnp.asarray(g, jnp.float32))
    d_n, d_i = np.asarray(d_n, np.float64), np.asarray(d_i, np.float64)
    cos = d_n @ d_i / np.linalg.norm(d_n) / np.linalg.norm(d_i)
    np.testing.assert_allclose(cos, 1.0, atol=1e-5)


def test_nash_mtl_rank_deficient_cases():
  # Parallel gradients, same direction: rank 2 < 3, and a solution exists:
  # a = (1/sqrt(2), 1/(2 sqrt(2)), 1).
  g = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
  _, alpha, info = _call("nash_mtl", jnp.asarray(g, jnp.float32))
  assert bool(info["converged"])
  np.testing.assert_allclose(alpha, [2 ** -0.5, 2 ** -1.5, 1.0], rtol=1e-4)
  # Opposite gradients: g1 + g2 = 0 is a Pareto-stationary point; no solution,
  # and the solver says so without NaN.
  g = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
  _, alpha, info = _call("nash_mtl", jnp.asarray(g, jnp.float32))
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
  d, beta, info = _call("aligned_mtl", jnp.asarray(g, jnp.float32))
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

# Every registered method through the public direction(), as its record says
# (a key for the methods that take one): a new record is picked up here.
METHODS = {
    name: (lambda g, name=name, m=m: gradients.direction(
        name, g, rng=jax.random.key(0) if m.takes_rng else None))
    for name, m in gradients.REGISTRY.items()
}


_JITTED = {name: jax.jit(fn) for name, fn in METHODS.items()}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_pytree_gradients_equal_the_matrix(name):
  g = jnp.asarray(_g(4, d=12), jnp.float32)
  tree = {"a": g[:, :5].reshape(4, 5, 1), "b": {"c": g[:, 5:]}}
  d_mat, beta_mat, _ = _JITTED[name](g)
  d_tree, beta_tree, _ = _JITTED[name](tree)
  np.testing.assert_allclose(beta_tree, beta_mat, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
      np.concatenate([d_tree["a"].reshape(-1), d_tree["b"]["c"]]), d_mat, rtol=1e-4, atol=1e-5)


def _degenerate_cases(t, n=12, d_max=8, seed=0):
  """``n`` float32 ``[t, d_max]`` Jacobians, seeded: the zero Jacobian, then rank ``d`` in 1..d_max
  (the columns past ``d`` zero: the Gram, all a method reads but the rows'
  factor, is that of a ``[t, d]`` Jacobian), scales from 1e-3 to 1e3, up to
  two zero rows, and a duplicated last row in half of them."""
  rng = np.random.default_rng([seed, t])
  out = np.zeros((n, t, d_max))   # case 0 stays all zero: every row vanishes
  for i in range(1, n):
    d = int(rng.integers(1, d_max + 1))
    g = rng.normal(size=(t, d)) * 10.0 ** rng.uniform(-3, 3)
    g[:min(int(rng.integers(0, 3)), t - 1)] = 0.0
    if i % 2:
      g[-1] = g[-2]
    out[i, :, :d] = g
  return out


def _assert_finite_on_degenerate_cases(name, ts, narrow):
  fn = jax.jit(jax.vmap(METHODS[name]))
  need = gradients.REGISTRY[name].rows_needed({})   # Krum: n_byzantine + 3 rows
  batches = [_degenerate_cases(t) for t in ts if t >= need]
  if narrow:
    batches.append(_degenerate_cases(6, d_max=2, seed=1))
  for g in batches:
    d_out, beta, _ = fn(jnp.asarray(g, jnp.float32))
    bad = ~(np.all(np.isfinite(np.asarray(d_out)), axis=1)
            & np.all(np.isfinite(np.asarray(beta)), axis=1))
    assert not bad.any(), (name, g[bad])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_no_nan_on_rank_deficient_and_zero_rows(name):
  """Finite directions and weights on rank-deficient Jacobians with zero and
  duplicated rows (the zero Jacobian included), T = 3 and 6 (12 cases per T,
  vmapped: one compilation per T), and with fewer columns than rows (D = 2 <
  T = 6)."""
  _assert_finite_on_degenerate_cases(name, (3, 6), narrow=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS))
def test_no_nan_on_rank_deficient_and_zero_rows_at_every_small_t(name):
  """The same at T = 2, 4, 5 (the fast test above covers the code path: the
  solvers branch on T only beyond ``exact_up_to``)."""
  _assert_finite_on_degenerate_cases(name, (2, 4, 5), narrow=False)


# ---------------------------------------------------------------------------
# MGDA's exact small-T solver on hard Jacobians.
# ---------------------------------------------------------------------------


def _np_min_norm(g):
  """The min-norm point of the convex hull of the rows of ``g``, in float64, by
  solving the KKT system on every support (least squares: singular supports
  are allowed) and keeping the best feasible one."""
  k = g @ g.T
  t = k.shape[0]
  best = None
  for r in range(1, t + 1):
    for idx in itertools.combinations(range(t), r):
      idx = list(idx)
      a_mat = np.zeros((r + 1, r + 1))
      a_mat[:r, :r] = 2 * k[np.ix_(idx, idx)]
      a_mat[:r, r] = a_mat[r, :r] = 1.0
      rhs = np.zeros(r + 1)
      rhs[r] = 1.0
      sol = np.linalg.lstsq(a_mat, rhs, rcond=None)[0][:r]
      if sol.min() < -1e-12:
        continue
      a = np.zeros(t)
      a[idx] = sol
      if best is None or a @ k @ a < best[0]:
        best = (a @ k @ a, a)
  return best[1]


def _hard_jacobians(seed=0, n=120):
  rng = np.random.default_rng(seed)
  for i in range(n):
    t, p = (2, 3, 4, 5, 8)[i % 5], (10, 50)[i % 2]
    g = rng.normal(size=(t, p))
    kind = i % 4
    if kind in (1, 3):
      g[0] *= 100.0                                         # norms 100x apart
    if kind in (2, 3) and t > 2:
      g[1] = -g[2] * 0.999 + 0.01 * rng.normal(size=p)      # near-opposite pair
    yield g


def test_mgda_matches_the_float64_min_norm_point_on_hard_jacobians():
  """Cosine >= 0.999 to the exact min-norm direction, a common descent
  direction (g_i . d >= 0 up to float32 rounding) whenever that direction is
  not zero, and ``converged`` set. (FISTA alone, the solver before, reached a
  worst cosine of 0.02 on such matrices; it stays as the fallback.)"""
  solve = jax.jit(lambda k: gradients.mgda_weights(k))
  for g in _hard_jacobians():
    a_ref = _np_min_norm(g)
    d_ref = a_ref @ g
    beta, info = solve(jnp.asarray(g @ g.T, jnp.float32))
    d = np.asarray(beta, np.float64) @ g
    scale = np.abs(g).max()
    assert bool(info["converged"])
    if np.linalg.norm(d_ref) < 1e-6 * scale:   # Pareto-stationary: d ~ 0 is right
      assert np.linalg.norm(d) < 1e-3 * scale
      continue
    cos = d @ d_ref / (np.linalg.norm(d) * np.linalg.norm(d_ref))
    assert cos >= 0.999, cos
    # Descent for every task up to the float32 rounding of the Gram matrix the
    # solver reads, |d(K a)_i| ~ eps32 ||g_i|| max_j ||g_j||.
    norms = np.linalg.norm(g, axis=1)
    assert np.all(g @ d >= -1e-5 * norms * norms.max()), (g @ d, norms)


def test_mgda_falls_back_to_the_iterative_solver_above_exact_up_to():
  """With ``exact_up_to`` below T the active-set solver runs: same optimum on an
  easy problem (within its tolerance), ``converged`` from its duality gap."""
  g = np.random.default_rng(3).normal(size=(4, 20))
  k = jnp.asarray(g @ g.T, jnp.float32)
  exact, info_e = gradients.mgda_weights(k)
  iterative, info_i = gradients.mgda_weights(k, exact_up_to=2, iters=2000)
  np.testing.assert_allclose(exact, _np_min_norm(g), atol=2e-4)
  np.testing.assert_allclose(iterative, exact, atol=5e-3)
  assert bool(info_e["converged"]) and bool(info_i["converged"])
  _, info_short = gradients.mgda_weights(k, exact_up_to=2, iters=1)
  assert not bool(info_short["converged"])  # one active-set step is not the optimum


def test_mgda_for_many_tasks_meets_its_kkt_conditions():
  """T = 40 (above the exact solver): Wolfe's active-set algorithm reaches the
  min-norm point -- (K a)_j >= a^T K a for every j, with equality on the
  support -- and says so."""
  g = np.random.default_rng(5).normal(size=(40, 60))
  g[:5] *= 30.0
  k = g @ g.T
  beta, info = jax.jit(lambda k: gradients.mgda_weights(k, iters=3000))(
      jnp.asarray(k, jnp.float32))
  a = np.asarray(beta, np.float64)
  ka, obj = k @ a, a @ k @ a
  assert bool(info["converged"])
  assert abs(a.sum() - 1) < 1e-5 and a.min() >= 0
  assert np.all(ka >= obj - 1e-3 * obj)
  np.testing.assert_allclose(ka[a > 1e-3], obj, rtol=1e-2)


def test_mgda_returns_the_better_of_its_exact_and_iterative_solutions():
  """Near a Pareto-stationary point the exact candidate can miss the gap test
  in float32; then the active-set solver runs and the better of the two is
  returned -- converged if either is, and never worse than either solver alone
  beyond float32 rounding."""
  rng = np.random.default_rng(11)
  exact_fn = jax.jit(lambda k: gradients.min_norm_exact(k / jnp.max(jnp.diag(k)))[0])
  fista_fn = jax.jit(lambda k: gradients.mgda_weights(k, exact_up_to=0)[0])
  both_fn = jax.jit(lambda k: gradients.mgda_weights(k))
  for _ in range(60):
    g = rng.normal(size=(3, 12))
    g[1] = -g[0] * rng.uniform(0.95, 1.05) + 1e-3 * rng.normal(size=12)
    k = np.asarray(g @ g.T, np.float64)
    kj = jnp.asarray(k, jnp.float32)
    f = lambda a: np.asarray(a, np.float64) @ k @ np.asarray(a, np.float64)
    beta, info = both_fn(kj)
    assert f(beta) <= min(f(exact_fn(kj)), f(fista_fn(kj))) + 1e-5 * np.trace(k)
    assert bool(info["converged"]) or not bool(gradients.mgda_weights(kj, exact_up_to=0)[1][
        "converged"])


def test_mgda_uses_the_active_set_point_when_the_exact_solver_finds_no_support(monkeypatch):
  """The branch after ``min_norm_exact`` reports ``found=False`` (forced here:
  no test input reaches it in float32): the active-set solver's point is
  returned, which is the float64 min-norm point, and ``converged`` is its
  own flag. The exact candidate handed back is a vertex far from the optimum,
  so neither it nor a uniform fallback can pass."""
  g = np.random.default_rng(7).normal(size=(4, 9))
  g[0] *= 5.0
  g[1] = -0.8 * g[2] + 0.2 * g[1]
  want = _np_min_norm(g)
  assert np.abs(want - 0.25).max() > 0.1 and want.max() < 0.9

  def no_support(kn, tol=1e-5):  # pylint: disable=unused-argument
    return jnp.zeros((kn.shape[0],), kn.dtype).at[0].set(1.0), jnp.asarray(False)
  monkeypatch.setattr(gradients.solvers, "min_norm_exact", no_support)
  beta, info = gradients.mgda_weights(jnp.asarray(g @ g.T, jnp.float32))
  np.testing.assert_allclose(np.asarray(beta), want, atol=2e-4)
  assert bool(info["converged"])
  # An active set that has not converged (one step) and is worse: the exact
  # candidate (here the optimum) is kept, and converged says the active set's no.
  def optimum_unverified(kn, tol=1e-5):  # pylint: disable=unused-argument
    return jnp.asarray(want, kn.dtype), jnp.asarray(False)
  monkeypatch.setattr(gradients.solvers, "min_norm_exact", optimum_unverified)
  beta, info = gradients.mgda_weights(jnp.asarray(g @ g.T, jnp.float32), iters=1)
  np.testing.assert_allclose(np.asarray(beta), want, atol=1e-6)
  assert not bool(info["converged"])


def test_mgda_exact_up_to_is_bounded():
  with pytest.raises(ValueError, match=r"exact_up_to must be in \[0, 12\]"):
    gradients.mgda_weights(jnp.eye(3), exact_up_to=20)


# ---------------------------------------------------------------------------
# UPGrad, DualProj, ConFIG, FairGrad: optimality conditions and bad input.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("t", TS)
@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_dual_cone_projection_kkt(name, t):
  """With ``reg_eps = 0`` the result lies in the dual cone (``G d >= 0``) and
  ``w`` is the projection's KKT point: ``w >= u``, ``(K w)_i >= 0``, with
  ``(K w)_i = 0`` where ``w_i > u_i`` (Quinton & Rey 2024, Prop. 1)."""
  g = _g(t)
  d, beta, info = _call(name, jnp.asarray(g, jnp.float32), reg_eps=0.0)
  assert bool(info["converged"])
  k = g @ g.T
  norms = np.linalg.norm(g, axis=1)
  assert np.all(g @ np.asarray(d, np.float64) >= -1e-5 * norms * norms.max())
  ws = np.asarray(info["W"], np.float64) if name == "upgrad" else np.asarray(beta)[None]
  us = np.eye(t) / t if name == "upgrad" else np.full((1, t), 1.0 / t)
  for w, u in zip(ws, us):
    kw = k @ w
    assert np.all(w >= u - 1e-6) and np.all(kw >= -1e-5 * np.trace(k))
    free = w > u + 1e-4
    np.testing.assert_allclose(kw[free], 0.0, atol=1e-4 * np.trace(k))


def test_dual_cone_is_the_identity_without_conflict():
  """Gradients with pairwise nonnegative inner products: the mean already lies
  in the dual cone, so DualProj and UPGrad (reg_eps = 0) return the mean."""
  g = np.abs(np.random.default_rng(2).normal(size=(4, 9)))
  for name in ("upgrad", "dualproj"):
    _, beta, _ = _call(name, jnp.asarray(g, jnp.float32), reg_eps=0.0)
    np.testing.assert_allclose(beta, np.full(4, 0.25), atol=1e-6)


@pytest.mark.parametrize("t", TS)
def test_config_equal_cosines_and_projection_length(t):
  g = _g(t, d=max(20, t))
  d, _, _ = _call("config", jnp.asarray(g, jnp.float32))
  d = np.asarray(d, np.float64)
  cos = g @ d / (np.linalg.norm(g, axis=1) * np.linalg.norm(d))
  np.testing.assert_allclose(cos, cos[0], atol=1e-5)
  assert cos[0] > 0
  unit = d / np.linalg.norm(d)
  np.testing.assert_allclose(np.linalg.norm(d), np.sum(g @ unit), rtol=1e-5)


def test_config_two_tasks_bisects_the_angle():
  u, v = _two_directions(6, -0.6)
  g = np.stack([3.0 * u, 0.5 * v])
  d, _, _ = _call("config", jnp.asarray(g, jnp.float32))
  want = (u + v) / np.linalg.norm(u + v)
  np.testing.assert_allclose(np.asarray(d) / np.linalg.norm(d), want, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("t", TS)
def test_fairgrad_solves_its_fixed_point(t, alpha):
  g = _g(t, d=max(20, t))
  _, beta, info = _call("fairgrad", jnp.asarray(g, jnp.float32), alpha=alpha)
  w = np.asarray(info["w"], np.float64)
  assert bool(info["converged"]) and np.all(w > 0)
  np.testing.assert_allclose((g @ g.T) @ w, w ** (-1.0 / alpha), rtol=1e-3)
  np.testing.assert_allclose(beta, t * w, rtol=1e-6)


def test_fairgrad_alpha_one_is_nash_mtl():
  g = _g(4)
  _, beta, _ = _call("fairgrad", jnp.asarray(g, jnp.float32), alpha=1.0)
  _, alpha, _ = _call("nash_mtl", jnp.asarray(g, jnp.float32))
  np.testing.assert_allclose(beta, 4 * np.asarray(alpha), rtol=1e-5)


@pytest.mark.parametrize("call, match", [
    (lambda k: gradients.fairgrad_weights(k, alpha=0.0), r"fairgrad.alpha must be > 0"),
    (lambda k: gradients.upgrad_weights(k, reg_eps=-1.0), r"norm_eps and reg_eps must be >= 0"),
    (lambda k: gradients.dualproj_weights(k, exact_up_to=13), r"dualproj.exact_up_to"),
    (lambda k: gradients.upgrad_weights(k, tol=0.0), r"upgrad.tol must be > 0"),
    (lambda k: gradients.mgda_weights(k, tol=1.0), r"mgda.tol must be in \[0, 1\)"),
    (lambda k: gradients.imtl_g_weights(k, max_cond=1.0), r"imtl_g.max_cond must be > 1"),
    (lambda k: gradients.aligned_mtl_weights(k, resolve=0.0), r"aligned_mtl.resolve"),
    (lambda k: gradients.config_weights(k, max_cond=0.5), r"config.max_cond must be > 1"),
])
def test_bad_hyperparameters_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call(jnp.eye(3))


def test_new_methods_are_registered_everywhere():
  """Registered gradient methods become objectives, config entries and toy methods."""
  from mtljax import objectives, toy
  from experiments.configs import common
  for name in ("upgrad", "dualproj", "config", "fairgrad"):
    assert name in gradients.REGISTRY and name in objectives.methods()
    assert name in toy.toy_methods()
  assert common.base_config().objective.fairgrad.alpha == 2.0
  assert common.base_config().objective.upgrad.reg_eps == 1e-4


@pytest.mark.parametrize("t", [2, 3, 5])
def test_jacobi_eigh_matches_numpy_on_graded_matrices(t):
  """Eigenvalues to relative accuracy on a Gram with one row 100x the others
  and a near-opposite pair."""
  rng = np.random.default_rng(t)
  g = rng.normal(size=(t, 12))
  g[-1] = -0.999 * g[-2] + 0.01 * rng.normal(size=12)
  g[0] *= 100.0
  k = g @ g.T
  lam, v = gradients.jacobi_eigh(jnp.asarray(k, jnp.float32))
  want = np.linalg.eigvalsh(k)
  np.testing.assert_allclose(np.sort(np.asarray(lam, np.float64)), want, rtol=1e-2)
  np.testing.assert_allclose(np.asarray(v) @ np.diag(lam) @ np.asarray(v).T, k,
                             rtol=1e-4, atol=1e-5 * np.abs(k).max())


def test_cosine_factor_is_the_cosine_matrix_factor():
  """``R^T R = C`` (float64 cosines) for a pytree of rows with a zero row (its
  ``C_ii = 1``, as :func:`gradients.cosine_gram`) and fewer columns than rows
  (padded), and the pytree's factor is the concatenated matrix's."""
  rng = np.random.default_rng(3)
  g = rng.normal(size=(5, 7))
  g[2] = 0.0
  g[0] *= 100.0
  tree = {"a": jnp.asarray(g[:, :3].reshape(5, 3, 1), jnp.float32),
          "b": jnp.asarray(g[:, 3:], jnp.float32)}
  r = np.asarray(gradients.cosine_factor(tree), np.float64)
  n = np.linalg.norm(g, axis=1)
  u = g / np.where(n > 0, n, 1.0)[:, None]
  c = u @ u.T
  c[2, 2] = 1.0
  np.testing.assert_allclose(r.T @ r, c, atol=1e-6)
  np.testing.assert_allclose(r.T @ r, np.asarray(gradients.cosine_gram(
      gradients.gram(jnp.asarray(g, jnp.float32)))[0]), atol=1e-5)
  short = rng.normal(size=(4, 2))               # D = 2 < T = 4: rank 2
  rs = np.asarray(gradients.cosine_factor(jnp.asarray(short, jnp.float32)), np.float64)
  us = short / np.linalg.norm(short, axis=1, keepdims=True)
  np.testing.assert_allclose(rs.T @ rs, us @ us.T, atol=1e-6)
  with pytest.raises(ValueError, match=r"factor must be \[M, 3\]"):
    gradients.config_weights(jnp.eye(3), jnp.eye(2))


@pytest.mark.parametrize("kind", ["opposite_100x", "collinear"])
def test_jacobi_factor_eigh_resolves_what_the_gram_cannot(kind):
  """One-sided Jacobi on the factor: every eigenvalue of ``C`` to relative
  accuracy ~``eps sqrt(cond(C))`` (here ``cond(C)`` up to ~1e9, beyond what a
  float32 ``C`` resolves at all), eigenvectors to match."""
  import hard_jacobians  # noqa: PLC0415  (tests/ is on the path)
  for g in hard_jacobians.hard_jacobian_batch(kind, 5, 10, 4, seed=1):
    r = gradients.cosine_factor(jnp.asarray(g, jnp.float32))
    lam, v = gradients.jacobi_factor_eigh(r)
    u32 = np.float32(g).astype(np.float64)
    u32 /= np.linalg.norm(u32, axis=1, keepdims=True)
    want = np.linalg.eigvalsh(u32 @ u32.T)
    cond = want[-1] / want[0]
    got = np.sort(np.asarray(lam, np.float64))
    np.testing.assert_allclose(got, want, rtol=50 * np.finfo(np.float32).eps * np.sqrt(cond))
    lam, v = np.asarray(lam, np.float64), np.asarray(v, np.float64)
    np.testing.assert_allclose(v.T @ v, np.eye(5), atol=1e-5)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_dual_cone_iterative_solver_matches_the_exact_one(name):
  """Above ``exact_up_to`` FISTA on the box QP: the exact solver's weights, and
  ``converged`` only when it got there (not after 2 iterations)."""
  g = _g(5)
  k = jnp.asarray(g @ g.T, jnp.float32)
  fn = getattr(gradients, name + "_weights")
  exact, info_e = fn(k)
  iterative, info_i = fn(k, exact_up_to=0, iters=3000)
  assert bool(info_e["converged"]) and bool(info_i["converged"])
  np.testing.assert_allclose(iterative, exact, rtol=2e-3, atol=1e-4)
  short, info_s = fn(k, exact_up_to=0, iters=2)
  assert not bool(info_s["converged"])
  assert np.max(np.abs(np.asarray(short) - np.asarray(exact))) > 1e-3


def test_records_are_checked_when_built_and_registered():
  """A record's positional arity, key/factor/min-norm combinations and
  hyper-parameter defaults are checked when it is built; its defaults are
  read-only; a name another objective has is refused; the generated public
  functions bind like real signatures."""
  def w1(k, *, eps=1e-3):
    return jnp.ones(k.shape[0]), {}
  with pytest.raises(ValueError, match=r"must take 2 positional argument\(s\) \(K, rng\)"):
    gradients.GramMethod("bad", w1, takes_rng=True)
  with pytest.raises(ValueError, match="not both"):
    gradients.GramMethod("bad", lambda k, r: None, takes_rng=True, takes_factor=True)
  with pytest.raises(ValueError, match="min-norm method .* cannot take one"):
    gradients.GramMethod("bad", lambda k, f: None, takes_factor=True, min_norm=True)
  with pytest.raises(ValueError, match=r"must take 3 positional argument\(s\) "
                                       r"\(K, factor, present\)"):
    gradients.GramMethod("bad", lambda k, f: None, takes_factor=True, takes_present=True)
  with pytest.raises(ValueError, match="min-norm method's absent rows .* cannot also take"):
    gradients.GramMethod("bad", lambda k, p: None, min_norm=True, takes_present=True)
  with pytest.raises(ValueError, match=r"hyper-parameter\(s\) \['eps'\] have no default"):
    gradients.GramMethod("bad", lambda k, *, eps: None)
  with pytest.raises(TypeError):
    gradients.REGISTRY["mgda"].hparams["iters"] = 1  # pytype: disable=unsupported-operands
  with pytest.raises(ValueError, match="'fixed' is the name of another objective"):
    gradients.register(gradients.GramMethod("fixed", w1))
  with pytest.raises(ValueError, match="'mgda' exists"):
    gradients.register(gradients.GramMethod("mgda", w1))
  assert "fixed" not in gradients.REGISTRY
  with pytest.raises(TypeError, match="mgda: .*'rng'"):
    gradients.mgda(jnp.eye(2), rng=jax.random.key(0))
  with pytest.raises(TypeError, match="cagrad: .*'C'"):
    gradients.cagrad(jnp.eye(2), C=0.3)
  assert list(inspect.signature(gradients.mgda_ub).parameters)[0] == "rep_grads"
  g = jnp.asarray([[1.0, 0.0], [0.0, 2.0]])
  d1, _, _ = gradients.pcgrad(g, rng=jax.random.key(1))
  d2, _, _ = gradients.pcgrad(g, jax.random.key(1))
  np.testing.assert_array_equal(d1, d2)
