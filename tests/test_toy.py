"""The Pareto toy: the authors' losses, the experiment's outputs, and the
papers' qualitative result under the CAGrad protocol."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import toy_pareto
from experiments.configs import toy_pareto as toy_config
from mtljax import toy


def _np_losses(x1, x2, scale):
  """float64 re-implementation of CAGrad's Toy.forward (and Nash-MTL's scale)."""
  lower = 0.000005
  f1 = np.log(np.maximum(np.abs(0.5 * (-x1 - 7) - np.tanh(-x2)), lower)) + 6
  f2 = np.log(np.maximum(np.abs(0.5 * (-x1 + 3) + np.tanh(-x2) + 2), lower)) + 6
  c1 = np.maximum(np.tanh(x2 * 0.5), 0)
  f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  c2 = np.maximum(np.tanh(-x2 * 0.5), 0)
  return np.stack([(f1 * c1 + f1_sq * c2) * scale, f2 * c1 + f2_sq * c2], -1)


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_losses_match_the_authors_function(scale):
  pts = np.random.default_rng(0).uniform(-10, 10, (500, 2))
  got = np.asarray(jax.vmap(lambda x: toy.losses(x, scale))(pts.astype(np.float32)))
  np.testing.assert_allclose(got, _np_losses(pts[:, 0], pts[:, 1], scale),
                             rtol=1e-4, atol=1e-4)


def _np_grads(x1, x2, scale, tie=1.0):
  """float64 hand derivative ``[2 losses, 2 coords]`` of :func:`_np_losses`.

  ``tie`` is the slope of ``clamp(., min)`` where its input equals the bound:
  1 is PyTorch's ``clamp`` (the published code's gradient), 1/2 what
  ``jnp.maximum`` would give. It only matters at x2 = 0 (the gates) and on
  ``|.| = LOWER`` (measure zero)."""
  lower = 0.000005
  sech2 = lambda z: 1.0 / np.cosh(z) ** 2
  def gate(z):  # d clamp(z, 0) / dz
    return np.where(z > 0, 1.0, np.where(z == 0, tie, 0.0))
  def log_clamped_abs(a, da):  # (log(max(|a|, lower)) + 6, its gradient)
    m = np.maximum(np.abs(a), lower)
    slope = np.where(np.abs(a) > lower, 1.0, np.where(np.abs(a) == lower, tie, 0.0))
    return np.log(m) + 6, slope * np.sign(a) / m * da
  a1 = 0.5 * (-x1 - 7) - np.tanh(-x2)
  a2 = 0.5 * (-x1 + 3) + np.tanh(-x2) + 2
  f1, df1 = log_clamped_abs(a1, np.array([-0.5, sech2(x2)]))
  f2, df2 = log_clamped_abs(a2, np.array([-0.5, -sech2(x2)]))
  t = np.tanh(x2 * 0.5)
  c1, dc1 = max(t, 0.0), np.array([0.0, gate(t) * 0.5 * sech2(x2 * 0.5)])
  c2, dc2 = max(-t, 0.0), np.array([0.0, -gate(-t) * 0.5 * sech2(x2 * 0.5)])
  s1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  s2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  ds1 = np.array([-0.2 * (-x1 + 7), -0.02 * (-x2 - 8)])
  ds2 = np.array([-0.2 * (-x1 - 7), -0.02 * (-x2 - 8)])
  g1 = (df1 * c1 + f1 * dc1 + ds1 * c2 + s1 * dc2) * scale
  g2 = df2 * c1 + f2 * dc1 + ds2 * c2 + s2 * dc2
  return np.stack([g1, g2])


def test_hand_gradient_matches_finite_differences_off_the_kink():
  # Validates the reference itself where the function is smooth.
  rng = np.random.default_rng(1)
  for x1, x2 in rng.uniform(-9, 9, (20, 2)):
    h = 1e-6
    fd = np.stack([(_np_losses(x1 + h, x2, 0.1) - _np_losses(x1 - h, x2, 0.1)) / (2 * h),
                   (_np_losses(x1, x2 + h, 0.1) - _np_losses(x1, x2 - h, 0.1)) / (2 * h)], -1)
    np.testing.assert_allclose(_np_grads(x1, x2, 0.1), fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_gradient_on_the_gate_kink_is_pytorchs_clamp(scale):
  """At x2 = 0 both gates ``clamp(tanh(+-x2/2), 0)`` sit on their kink; the
  published code's ``torch.clamp`` passes the full slope there (1/2 each way),
  ``jnp.maximum`` would pass half. Away from the kink the two agree."""
  for x1 in (0.0, -3.0, 5.0):
    got = np.asarray(jax.jacrev(lambda x: toy.losses(x, scale))(
        np.array([x1, 0.0], np.float32)), np.float64)
    want = _np_grads(x1, 0.0, scale)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    half = _np_grads(x1, 0.0, scale, tie=0.5)  # what jnp.maximum would give
    np.testing.assert_allclose(want[:, 1], 2 * half[:, 1], rtol=1e-12)
    assert np.all(np.abs(want[:, 1]) > 0.5)
  for x1, x2 in ((0.0, 1e-3), (0.0, -1e-3), (2.0, -4.0)):
    got = np.asarray(jax.jacrev(toy.losses)(np.array([x1, x2], np.float32)), np.float64)
    np.testing.assert_allclose(got, _np_grads(x1, x2, 1.0), rtol=1e-4, atol=1e-4)


def _np_adam_sum(x0, steps, scale, lr=1e-3, tie=1.0):
  """float64 Adam (optax defaults) on the sum of the two gradients."""
  x, m, v, path = np.array(x0, np.float64), np.zeros(2), np.zeros(2), [np.array(x0)]
  for t in range(1, steps + 1):
    g = _np_grads(x[0], x[1], scale, tie).sum(0)
    m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
    x = x - lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    path.append(x)
  return np.stack(path)


def test_trajectory_from_the_origin_follows_the_published_gradient():
  # Nash-MTL's and FAMO's start (0, 0) lies on the kink: the first gradient
  # enters Adam's moments, so the whole path depends on the convention.
  r = toy.run("fixed", [(0.0, 0.0)], 40, scale=0.1, record_every=1)
  want = _np_adam_sum((0.0, 0.0), 40, 0.1)
  np.testing.assert_allclose(r["path"][0], want, rtol=0, atol=2e-6)
  other = _np_adam_sum((0.0, 0.0), 40, 0.1, tie=0.5)
  assert np.max(np.abs(want - other)) > 1e-4


def _cos(x):
  g = np.asarray(jax.jacrev(toy.losses)(np.array(x, np.float32)), np.float64)
  return g[0] @ g[1] / np.linalg.norm(g[0]) / np.linalg.norm(g[1])


def test_pareto_segment_is_where_the_gradients_oppose():
  # On the authors' segment the gradients are (nearly) antiparallel: Pareto
  # stationarity, exact at x1 = 0; off the segment they are not.
  np.testing.assert_allclose(_cos([0.0, toy.PARETO_X2]), -1.0, atol=1e-8)
  for x1 in (-6.0, -2.0, 3.0, 6.5):
    assert _cos([x1, toy.PARETO_X2]) < -0.9995, x1
  for x in ([0.0, 0.0], [-5.0, 3.0], [8.0, -8.3552]):
    assert _cos(x) > -0.99, x


@pytest.mark.slow
def test_quick_run_writes_the_documented_outputs(tmp_path):
  c = toy_config.get_config("protocol=famo,quick")
  c.toy.methods = ("fixed", "famo", "mgda", "nash_mtl")
  summary = toy_pareto.run(c, str(tmp_path))
  traj = json.loads((tmp_path / "trajectories.json").read_text())
  assert set(traj) == {"fixed", "famo", "mgda", "nash_mtl"}
  for runs in traj.values():
    assert [r["start"] for r in runs] == [list(s) for s in toy.PROTOCOLS["famo"]["starts"]]
    for r in runs:
      assert set(r) == {"start", "path", "final", "final_losses"}
      assert len(r["path"]) == 5_000 // 50 + 1 and r["path"][0] == r["start"]
      assert r["path"][-1] == r["final"]
      np.testing.assert_allclose(
          r["final_losses"], _np_losses(*np.array(r["final"], np.float64), 0.1)[:],
          rtol=1e-3, atol=1e-3)
  png = (tmp_path / "toy_pareto.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
  assert set(summary["methods"]) == set(traj)


def test_bad_toy_config():
  with pytest.raises(ValueError, match="protocol='sgd'"):
    toy_config.get_config("protocol=sgd")
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['fast'\]"):
    toy_config.get_config("fast")


@pytest.mark.slow
def test_cagrad_protocol_reproduces_the_papers_picture():
  """100k Adam steps from CAGrad's three starts: linear scalarisation stalls in
  a valley away from the Pareto set from the outer starts; gradient methods
  reach the Pareto set; CAGrad ends at its centre, the average-loss minimiser."""
  p = toy.PROTOCOLS["cagrad"]
  fixed = toy.run("fixed", p["starts"], p["steps"], record_every=1000)
  d = toy.distance_to_pareto_set(fixed["final"])
  assert d[0] > 5 and d[2] > 5
  for method in ("pcgrad", "imtl_g", "aligned_mtl", "cagrad"):
    r = toy.run(method, p["starts"], p["steps"], record_every=1000,
                cagrad_rescale=p["cagrad_rescale"])
    assert np.all(toy.distance_to_pareto_set(r["final"]) < 0.1), method
    if method == "cagrad":
      np.testing.assert_allclose(r["final"][:, 0], 0.0, atol=0.05)


@pytest.mark.slow
def test_famo_protocol_famo_reaches_the_pareto_set_linear_scalarisation_does_not():
  p = toy.PROTOCOLS["famo"]
  famo = toy.run("famo", p["starts"], p["steps"], scale=p["scale"], record_every=1000,
                 famo_gamma=p["famo_gamma"])
  assert np.all(toy.distance_to_pareto_set(famo["final"]) < 0.05)
  fixed = toy.run("fixed", p["starts"], p["steps"], scale=p["scale"], record_every=1000)
  assert np.max(toy.distance_to_pareto_set(fixed["final"])) > 2.0


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_the_positive_loss_methods_see_losses_above_the_floor(scale):
  """db_mtl, stch, gls and moco take logs of (or scale by) the losses: on the
  toy they see ``L - loss_floor``, which is positive over the whole plotted
  square (a 201 x 201 grid, plus the kinks at x2 = 0), with the gradients of L."""
  grid = np.linspace(-10, 10, 201)
  pts = np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2)
  pts = np.concatenate([pts, np.stack([grid, np.zeros_like(grid)], 1)])
  floor = np.asarray(toy.loss_floor(scale))
  f = np.asarray(jax.vmap(lambda x: toy.losses(x, scale))(jnp.asarray(pts, jnp.float32)))
  assert (f - floor).min() > 0.05  # the minima are -20 scale and -20
  x = jnp.asarray([1.5, -2.0])
  plain, shifted = toy.linearized(x, scale), toy.linearized(x, scale, toy.loss_floor(scale))
  np.testing.assert_allclose(shifted.losses, plain.losses - floor, rtol=1e-6)
  c = jnp.asarray([0.3, 1.7])
  np.testing.assert_array_equal(shifted.pullback(c)["shared"], plain.pullback(c)["shared"])
  assert set(toy.POSITIVE_LOSS_METHODS) <= set(toy.toy_methods())


@pytest.mark.slow
@pytest.mark.parametrize("method,name,balance", [
    ("imtl", "log_scale", lambda s, l: np.exp(s) * l),          # d/ds (e^s L - s) = 0
    ("uncertainty", "log_var", lambda s, l: np.exp(-s) * l),    # d/ds (e^-s L + s) / 2 = 0
])
def test_learned_loss_scales_reach_their_stationary_point(method, name, balance):
  """imtl's and uncertainty's per-task scales are optimised with ``x`` by the
  same Adam (as ``params["tasks"][method]`` in training): once ``x`` has
  settled (the protocol's 35k steps), each scale sits where its own gradient
  vanishes --
  ``e^s (L - floor) = 1`` for IMTL-L, ``e^{-s} (L - floor) = 1`` for
  uncertainty weighting -- at the losses the run ends on."""
  p = toy.PROTOCOLS["nashmtl"]
  r = toy.run(method, p["starts"], p["steps"], scale=p["scale"], record_every=1000)
  s = r["method_params"][name]
  assert s.shape == (len(p["starts"]), 2) and np.all(np.abs(s).max(axis=1) > 0.5)  # moved
  lf = r["final_losses"].astype(np.float64) - np.asarray(toy.loss_floor(p["scale"]))
  np.testing.assert_allclose(balance(s.astype(np.float64), lf), 1.0, atol=0.01)
