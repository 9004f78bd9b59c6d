"""Instance-wise risk minimisation: per-example rows through the gradient methods.

The update on a small tanh network is checked against a float64 numpy
re-computation from the definition (per-example gradients by hand-written
back-propagation, UPGrad's dual-cone projections by NNLS), on examples whose
gradients differ 100-fold in norm and include a nearly opposite pair; UPGrad's
defining property (no example's loss increases to first order) on the
library's own rows; the model helper's rows against separate ``jax.grad``
calls per example; and bad input before tracing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtljax import instance_wise
from mtljax import tasks as tasks_lib
from mtljax.models import multitask
import test_hard_jacobians  # its float64 UPGrad reference (NNLS)


def _mlp_loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return (h @ params["w2"] + params["b2"] - y) ** 2


def _np_rows(params, x, y):
  """``[B, D]`` float64 per-example gradients of ``(f(x) - y)^2`` by hand,
  concatenated in the order w1, b1, w2, b2."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  rows = []
  for xi, yi in zip(np.asarray(x, np.float64), np.asarray(y, np.float64)):
    h = np.tanh(xi @ p["w1"] + p["b1"])
    r = 2.0 * (h @ p["w2"] + p["b2"] - yi)             # dL/df
    dz = r * p["w2"] * (1.0 - h * h)                    # dL/d(pre-activation)
    rows.append(np.concatenate([np.outer(xi, dz).ravel(), dz, r * h, [r]]))
  return np.array(rows)


def _np_losses(p, x, y):
  return (np.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"] - y) ** 2


def _hard_batch(b=6):
  """``b`` examples: residuals from 0.02 to 2 (gradient norms ~100x apart), and
  examples 0 and 1 at nearly the same input with opposite residuals."""
  rng = np.random.default_rng(3)
  params = {"w1": rng.normal(size=(3, 4)) * 0.7, "b1": rng.normal(size=4) * 0.1,
            "w2": rng.normal(size=4), "b2": np.zeros(())}
  x = rng.normal(size=(b, 3))
  x[1] = x[0] + 1e-2 * rng.normal(size=3)
  f = np.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]
  residual = np.resize([1.0, -0.9, 2.0, 0.02, -0.5, 0.3], b)
  y = f - residual
  as32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  return jax.tree.map(as32, params), (as32(x), as32(y)), (params, x, y)


@pytest.mark.parametrize("b", [6, 16])  # exact dual-cone solver; 16 > 10: FISTA
def test_upgrad_direction_matches_the_float64_reference_on_hard_rows(b):
  params, batch, (p64, x64, y64) = _hard_batch(b)
  d, info = jax.jit(lambda p, b: instance_wise.direction(_mlp_loss, p, b))(params, batch)
  rows = _np_rows(p64, x64, y64)
  norms = np.linalg.norm(rows, axis=1)
  assert norms.max() / norms.min() > 50
  cos01 = rows[0] @ rows[1] / (norms[0] * norms[1])
  assert cos01 < -0.99                                   # nearly opposite
  want = test_hard_jacobians.ref_upgrad(rows)
  got = np.concatenate([np.ravel(d[k]) for k in ("w1", "b1", "w2", "b2")])
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.linalg.norm(want))
  np.testing.assert_allclose(info["losses"], _np_losses(p64, x64, y64), rtol=1e-4)
  assert bool(info["converged"])
  # UPGrad's defining property, exact without its regulariser: no example
  # conflicts with the update (J d >= 0; to float32 rounding on the exact
  # solver, to FISTA's tolerance -- cosines above -1e-3 -- on the iterative one).
  d0, _ = jax.jit(lambda p, b: instance_wise.direction(_mlp_loss, p, b, reg_eps=0.0))(
      params, batch)
  got0 = np.concatenate([np.ravel(d0[k]) for k in ("w1", "b1", "w2", "b2")])
  slack = 1e-5 if b <= 10 else 1e-3
  assert np.all(rows @ got0 >= -slack * norms * np.linalg.norm(got0))
  # The mean of the rows (plain ERM) does conflict here: IWRM changes the step.
  assert np.min(rows @ rows.mean(0)) < 0


def test_model_rows_equal_one_grad_per_example_and_the_step_trains():
  ts = tasks_lib.TaskSet((tasks_lib.Task("r", "regression"),))
  model = multitask.make_model("multi_head", ts, (5,), hidden=(8,))
  params = model.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
  y = jnp.asarray(x[:, 0] - 0.5 * x[:, 1], jnp.float32)
  loss_fn = instance_wise.model_example_losses(model, "r")
  losses, jac = jax.jit(lambda p: instance_wise.example_jacobian(loss_fn, p, (x, y)))(params)
  for i in (0, 5):
    want = jax.grad(lambda p, i=i: loss_fn(p, (x[i:i + 1], y[i:i + 1]))[0])(params)
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda j, i=i: j[i], jac)),
                    jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The mean of the rows' losses is the step's slot loss of the same batch.
  outs = model.apply(params, x[None], jnp.zeros((1,), jnp.int32))
  slot = tasks_lib.slot_losses(ts, outs, {"regression1": y[None]}, jnp.zeros((1,), jnp.int32))
  np.testing.assert_allclose(np.mean(losses), slot[0], rtol=1e-5)
  tx = optax.sgd(0.05)
  step = jax.jit(instance_wise.make_step(loss_fn, tx))
  opt = tx.init(params)
  first = float(np.mean(losses))
  for _ in range(60):
    params, opt, info = step(params, opt, (x, y))
  assert float(np.mean(info["losses"])) < 0.5 * first
  # An unlabelled example (NaN regression label) is a zero row.
  y_missing = y.at[3].set(jnp.nan)
  losses, jac = instance_wise.example_jacobian(loss_fn, params, (x, y_missing))
  assert float(losses[3]) == 0.0 and np.all(np.isfinite(losses))
  assert all(float(jnp.abs(leaf[3]).max()) == 0.0 for leaf in jax.tree.leaves(jac))


def test_bad_input_is_named_before_tracing():
  with pytest.raises(ValueError, match="Unknown gradient method 'nosuch'"):
    instance_wise.make_step(_mlp_loss, optax.sgd(0.1), method="nosuch")
  with pytest.raises(ValueError, match=r"upgrad: unknown hyper-parameter\(s\) \['c'\]"):
    instance_wise.make_step(_mlp_loss, optax.sgd(0.1), c=0.5)
  with pytest.raises(ValueError, match="upgrad.exact_up_to must be in"):
    instance_wise.make_step(_mlp_loss, optax.sgd(0.1), exact_up_to=20)
  ts = tasks_lib.TaskSet((tasks_lib.Task("r", "regression"),))
  model = multitask.make_model("multi_head", ts, (5,), hidden=(8,))
  with pytest.raises(ValueError, match="task 'q' is not one of"):
    instance_wise.model_example_losses(model, "q")
  with pytest.raises(ValueError, match="example axis first"):
    instance_wise.example_jacobian(_mlp_loss, {}, (jnp.zeros((3, 2)), jnp.zeros((4,))))
