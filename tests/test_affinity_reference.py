"""TAG lookahead affinity (Fifty et al. 2021, "Efficiently Identifying Task
Groupings for Multi-Task Learning") against a float64 numpy reference.

The paper's affinity of task i onto task j after one lookahead step on task i,

    Z[i, j] = 1 - L_j(theta - eta g_i) / L_j(theta),

is computed here on a linear model: K tasks, each with its own data
(X_k [B, D], y_k [B]), shared weights theta [D] and squared loss
L_k(theta) = mean((X_k theta - y_k)^2), so g_k = 2/B X_k^T (X_k theta - y_k)
and, with r_j = X_j theta - y_j,

    L_j(theta - eta g_i) = L_j - eta g_i . g_j + eta^2 / B ||X_j g_i||^2,
    Z[i, j] = (eta g_i . g_j - eta^2 / B ||X_j g_i||^2) / L_j.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtljax import affinity

K, B, D = 4, 32, 6
ETAS = (0.01, 0.1)


def _problem(seed=0, bias=False):
  """Task 1 cooperates with task 0 (a close target), task 2 opposes it (the
  opposite target), task 3 is unrelated; the targets have different scales so
  Z is not symmetric. ``bias``: a column of ones (the shared bias) is appended
  to every X_k."""
  rng = np.random.default_rng(seed)
  u = rng.normal(size=D)
  u /= np.linalg.norm(u)
  targets = np.stack([u, u + 0.3 * rng.normal(size=D) / np.sqrt(D), -1.5 * u,
                      2.0 * rng.normal(size=D) / np.sqrt(D)])
  x = rng.normal(size=(K, B, D))
  y = np.einsum("kbd,kd->kb", x, targets) + 0.1 * rng.normal(size=(K, B))
  theta = 0.05 * rng.normal(size=D)
  if bias:
    y = y + np.array([0.5, 0.6, -0.7, 0.0])[:, None]
    x = np.concatenate([x, np.ones((K, B, 1))], axis=2)
    theta = np.append(theta, 0.1)
  return x, y, theta


def _np_losses(x, y, theta):
  return np.mean((x @ theta - y) ** 2, axis=1)  # [K]


def _np_grads(x, y, theta):
  r = x @ theta - y  # [K, B]
  return 2.0 / B * np.einsum("kbd,kb->kd", x, r)  # [K, D]


def _np_affinity(x, y, theta, eta):
  """Z by evaluating the losses after each task's lookahead step."""
  g = _np_grads(x, y, theta)
  base = _np_losses(x, y, theta)
  looked = np.stack([_np_losses(x, y, theta - eta * g[i]) for i in range(K)])  # [i, j]
  return 1.0 - looked / base[None, :]


def _np_affinity_expanded(x, y, theta, eta):
  """Z from the quadratic expansion of the squared loss (module docstring)."""
  g = _np_grads(x, y, theta)
  base = _np_losses(x, y, theta)
  curv = np.einsum("jbd,id->ijb", x, g)  # [i, j, B]: X_j g_i
  return (eta * g @ g.T - eta ** 2 / B * np.sum(curv ** 2, axis=2)) / base[None, :]


def _jax_affinity(x, y, theta, eta):
  """The library on the same problem in float32, with per-slot gradients from
  jax.jacrev of the slot losses (one row per slot)."""
  xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

  def loss_of_slots(shared):
    return jnp.mean((jnp.einsum("kbd,d->kb", xj, shared) - yj) ** 2, axis=1)

  shared = jnp.asarray(theta, jnp.float32)
  slot_grads = jax.jacrev(loss_of_slots)(shared)  # [K, D]
  np.testing.assert_allclose(slot_grads, _np_grads(x, y, theta), rtol=1e-4, atol=1e-5)
  z = affinity.lookahead_affinity(loss_of_slots, shared, slot_grads, eta,
                                 loss_of_slots(shared))
  return np.asarray(z, np.float64)


def _assert_close(z, want):
  np.testing.assert_allclose(z, want, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("eta", ETAS)
def test_affinity_matches_the_float64_definition(eta):
  x, y, theta = _problem()
  want = _np_affinity(x, y, theta, eta)
  np.testing.assert_allclose(want, _np_affinity_expanded(x, y, theta, eta), rtol=1e-10,
                             atol=1e-12)
  # Z[i, j] is i's step seen by j: the reference is far from symmetric, so a
  # transposed result could not pass.
  assert np.max(np.abs(want - want.T)) > 1e-2
  _assert_close(_jax_affinity(x, y, theta, eta), want)


def test_affinity_depends_on_eta_as_the_reference_says():
  # Z = eta A - eta^2 C: not proportional to eta. The library's departure from
  # proportionality between eta = 0.01 and 0.1 is the reference's, -(0.1^2 -
  # 10 * 0.01^2) C, and the first-order term Z / eta -> g_i . g_j / L_j.
  x, y, theta = _problem()
  lo, hi = ETAS
  z_lo, z_hi = _jax_affinity(x, y, theta, lo), _jax_affinity(x, y, theta, hi)
  want_lo, want_hi = _np_affinity(x, y, theta, lo), _np_affinity(x, y, theta, hi)
  departure = want_hi - (hi / lo) * want_lo
  assert np.max(np.abs(departure)) > 0.05 * np.max(np.abs(want_hi))
  np.testing.assert_allclose(z_hi - (hi / lo) * z_lo, departure, rtol=1e-3, atol=2e-5)
  g = _np_grads(x, y, theta)
  first_order = g @ g.T / _np_losses(x, y, theta)[None, :]
  np.testing.assert_allclose(_jax_affinity(x, y, theta, 1e-3) / 1e-3, first_order,
                             rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("eta", ETAS)
def test_affinity_sign_helpful_and_adversarial_pairs(eta):
  x, y, theta = _problem()
  g = _np_grads(x, y, theta)
  want = _np_affinity(x, y, theta, eta)
  z = _jax_affinity(x, y, theta, eta)
  # Tasks 0 and 1 pull theta the same way (g_0 . g_1 > 0): a step on either
  # lowers the other's loss, Z > 0. Tasks 0 and 2 pull opposite ways
  # (g_0 . g_2 < 0): a step on either raises the other's loss, Z < 0.
  assert g[0] @ g[1] > 0 and g[0] @ g[2] < 0
  for i, j in [(0, 1), (1, 0)]:
    assert want[i, j] > 0 and z[i, j] > 0
    assert _np_losses(x, y, theta - eta * g[i])[j] < _np_losses(x, y, theta)[j]
  for i, j in [(0, 2), (2, 0), (1, 2), (2, 1)]:
    assert want[i, j] < 0 and z[i, j] < 0
    assert _np_losses(x, y, theta - eta * g[i])[j] > _np_losses(x, y, theta)[j]
  _assert_close(z, want)


def test_self_affinity_turns_negative_past_the_overshooting_step():
  # Z[i, i] = (eta ||g_i||^2 - eta^2 ||X_i g_i||^2 / B) / L_i is positive for
  # small steps and negative beyond eta_0 = B ||g_i||^2 / ||X_i g_i||^2 (the
  # step overshoots task i's own minimum along -g_i).
  x, y, theta = _problem()
  g = _np_grads(x, y, theta)
  eta0 = B * g[0] @ g[0] / np.sum((x[0] @ g[0]) ** 2)
  for eta, sign in [(0.5 * eta0, 1.0), (1.5 * eta0, -1.0)]:
    want = _np_affinity(x, y, theta, eta)
    z = _jax_affinity(x, y, theta, eta)
    assert sign * want[0, 0] > 0.1 and sign * z[0, 0] > 0.1
    _assert_close(z, want)


def test_affinity_with_shared_parameters_as_a_pytree():
  # Shared {"w": [D], "b": []}: the lookahead steps every leaf by its slot
  # gradient; the reference appends the bias to theta and ones to X.
  x, y, theta = _problem(seed=3, bias=True)
  xj = jnp.asarray(x[..., :D], jnp.float32)
  yj = jnp.asarray(y, jnp.float32)

  def loss_of_slots(shared):
    pred = jnp.einsum("kbd,d->kb", xj, shared["w"]) + shared["b"]
    return jnp.mean((pred - yj) ** 2, axis=1)

  shared = {"w": jnp.asarray(theta[:D], jnp.float32), "b": jnp.asarray(theta[D], jnp.float32)}
  slot_grads = jax.jacrev(loss_of_slots)(shared)  # {"w": [K, D], "b": [K]}
  g = _np_grads(x, y, theta)
  np.testing.assert_allclose(slot_grads["w"], g[:, :D], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(slot_grads["b"], g[:, D], rtol=1e-4, atol=1e-5)
  for eta in ETAS:
    z = affinity.lookahead_affinity(loss_of_slots, shared, slot_grads, eta,
                                   loss_of_slots(shared))
    _assert_close(np.asarray(z, np.float64), _np_affinity(x, y, theta, eta))
