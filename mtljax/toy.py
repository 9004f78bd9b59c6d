"""The two-objective toy problem of CAGrad (Liu et al. 2021), reused by Nash-MTL
(Navon et al. 2022) and FAMO (Liu et al. 2023), and its optimisation runs.

``losses(x, scale)`` is the authors' function of ``x = (x1, x2)`` (the same
expressions as their ``Toy.forward``; ``scale`` multiplies the first loss, 1 in
CAGrad's protocol and 0.1 in Nash-MTL's and FAMO's). Its Pareto set is, as
the authors draw it, the segment ``x2 = -8.3552, x1 in [-7, 7]`` (scaling a
loss does not move it). That is exact at ``x1 = 0`` and an approximation
elsewhere: the true Pareto-stationary ``x2`` drifts by a few hundredths towards
the ends (measured: gradient cosine -0.99979 at (6.5, -8.3552), -0.99997 at
(6.5, -8.4)); :func:`distance_to_pareto_set` measures the distance to that
segment.

``run(method, starts, steps, ...)`` optimises ``x`` from every start at once
(vmap over starts, ``lax.scan`` over steps, one jit) with Adam on the direction
the method computes from the two task gradients -- the method being the same
:class:`mtljax.objectives.Objective` the train step uses, fed the toy's exact
Jacobian (:func:`linearized`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtljax import gradients
from mtljax import jacobians
from mtljax import objectives

LOWER = 0.000005
PARETO_X2 = -8.3552
PARETO_X1 = (-7.0, 7.0)

PROTOCOLS = {
    # Cranial-XIX/CAGrad toy.py: three starts, 100k Adam steps, lr 1e-3.
    "cagrad": dict(starts=((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0)), steps=100_000,
                   scale=1.0, cagrad_rescale=2),
    # AvivNavon/nash-mtl experiments/toy: five starts, 35k steps, first loss x 0.1.
    "nashmtl": dict(starts=((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0)),
                    steps=35_000, scale=0.1, cagrad_rescale=1),
    # Cranial-XIX/FAMO experiments/toy: the same starts, 50k steps, x 0.1.
    # FAMO on the toy: gamma 0 (its run.sh), logit lr 0.025, clip 1.0 (defaults),
    # minimum losses (-21 scale, -21) (its trainer).
    "famo": dict(starts=((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0)),
                 steps=50_000, scale=0.1, cagrad_rescale=1, famo_gamma=0.0),
}

# Methods that take logs or powers of the losses (or scale gradients by them)
# need positive losses; this problem's are negative (down to -20), so they see
# ``L - floor`` with FAMO's floors (:func:`loss_floor`): the same gradients, a
# shifted value. So do the methods with learned per-task loss scales (imtl's
# ``e^s L - s`` and uncertainty's ``e^{-s} L / 2 + s / 2`` have no minimum in
# ``s`` for ``L < 0``); :func:`run` optimises those scales with Adam next to ``x``.
POSITIVE_LOSS_METHODS = ("db_mtl", "stch", "gls", "moco", "imtl", "uncertainty")
def toy_methods() -> tuple[str, ...]:
  """The methods the toy runs: every registered gradient method (read now)
  that takes two rows with its default hyper-parameters (not Krum: it needs
  ``n_byzantine + 3``), and the loss-based and stateful methods that fit a
  two-parameter problem."""
  grams = tuple(name for name, m in gradients.REGISTRY.items() if m.rows_needed({}) <= 2)
  return (("fixed", "rlw", "famo") + grams + ("gradvac", "excess_mtl", "modo", "sdmgrad")
          + POSITIVE_LOSS_METHODS)


def loss_floor(scale: float = 1.0) -> tuple[float, float]:
  """Lower bounds of the two losses (FAMO's ``min_losses``: every loss is above
  ``-20 scale`` and ``-20``)."""
  return (-21.0 * scale, -21.0)


def clamp_min(x: jax.Array, low: float) -> jax.Array:
  """``max(x, low)`` with PyTorch's ``clamp(min=low)`` gradient: the full
  gradient (1) where ``x >= low``, the kink included. (``jnp.maximum`` splits
  a tie, giving 1/2 at ``x == low``, so the toy's gates ``max(tanh(+-x2/2), 0)``
  would have half the authors' slope on ``x2 = 0``, e.g. at the start (0, 0).)"""
  return jnp.where(x >= low, x, jnp.asarray(low, x.dtype))


def losses(x: jax.Array, scale: float = 1.0) -> jax.Array:
  """``[2]`` losses at ``x [2]`` (the authors' ``torch.clamp`` gradients at the
  kinks, see :func:`clamp_min`)."""
  x1, x2 = x[0], x[1]
  f1 = jnp.log(clamp_min(jnp.abs(0.5 * (-x1 - 7) - jnp.tanh(-x2)), LOWER)) + 6
  f2 = jnp.log(clamp_min(jnp.abs(0.5 * (-x1 + 3) + jnp.tanh(-x2) + 2), LOWER)) + 6
  c1 = clamp_min(jnp.tanh(x2 * 0.5), 0)
  f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  c2 = clamp_min(jnp.tanh(-x2 * 0.5), 0)
  f1 = (f1 * c1 + f1_sq * c2) * scale
  f2 = f2 * c1 + f2_sq * c2
  return jnp.stack([f1, f2])


def objective(method: str, scale: float = 1.0, *, cagrad_c: float = 0.5,
              cagrad_rescale: int = 1, famo_gamma: float = 0.01) -> objectives.Objective:
  """The registry's objective for the toy: the same code as in training.

  ``fixed`` is linear scalarisation with equal weights (the sum of the
  gradients: Adam makes it the authors' mean-gradient run up to its epsilon);
  FAMO uses the loss floors ``(-21 scale, -21)`` of the authors' trainer.
  """
  if method not in toy_methods():
    raise ValueError(f"toy_pareto: method {method!r} is not one of {toy_methods()}.")
  hp = {}
  if method == "cagrad":
    hp = {"c": cagrad_c, "rescale": cagrad_rescale}
  elif method == "famo":
    hp = {"gamma": famo_gamma, "min_losses": loss_floor(scale)}
  return objectives.bind_shared(objectives.make_objective(method, 2, **hp),
                                jax.ShapeDtypeStruct((2,), jnp.float32))


def linearized(x: jax.Array, scale: float, shift=(0.0, 0.0),
               draws: int = 1) -> jacobians.Linearized:
  """The toy's two losses at ``x``, minus ``shift``, as a
  :class:`mtljax.jacobians.Linearized` (``x`` is the "shared parameter"; the
  exact ``[2, 2]`` Jacobian). ``draws``: the slots of that many independent
  draws of the two tasks (MoDo, SDMGrad: :attr:`mtljax.objectives.Objective.draws`);
  the toy is deterministic, so every draw is the same exact Jacobian (their
  double sampling is then the deterministic method)."""
  shift = jnp.asarray(shift, jnp.float32)
  l = jnp.tile(losses(x, scale) - shift, draws)
  g = jnp.tile(jax.jacrev(lambda x: losses(x, scale))(x), (draws, 1))   # [D 2 slots, 2]
  return jacobians.Linearized(
      losses=l, pullback=lambda c: {"shared": c @ g, "tasks": {}},
      slot_grads=lambda c: (c[:, None] * g, {}), rep_grads=None, rep_pullback=None,
      loss_at=lambda p: jnp.tile(losses(p["shared"], scale) - shift, draws), one_pass=False)


def run(method: str, starts, steps: int, *, scale: float = 1.0, lr: float = 1e-3,
        record_every: int = 100, seed: int = 0, cagrad_c: float = 0.5,
        cagrad_rescale: int = 1, famo_gamma: float = 0.01) -> dict:
  """Adam from every start; returns numpy ``{"path": [S, steps/record_every + 1, 2],
  "final": [S, 2], "final_losses": [S, 2], "solver_failures": [S]}``.

  A method's own per-task parameters (``Objective.init_params``: imtl's and
  uncertainty's log-scales) are optimised by the same Adam, jointly with ``x``
  (as the train step does with ``params["tasks"][method]``); their final values
  are returned as ``"method_params"`` (``{name: [S, 2]}``, empty for the others).
  """
  if steps % record_every:
    raise ValueError(f"toy_pareto: steps={steps} must be a multiple of "
                     f"record_every={record_every}.")
  tx = optax.adam(lr)
  obj = objective(method, scale, cagrad_c=cagrad_c, cagrad_rescale=cagrad_rescale,
                  famo_gamma=famo_gamma)
  ids, ones = jnp.tile(jnp.arange(2), obj.draws), jnp.ones((2,), jnp.float32)
  shift = loss_floor(scale) if method in POSITIVE_LOSS_METHODS else (0.0, 0.0)

  def one_start(x0, key):
    def step(carry, i):
      (x, own), opt_state, fails, mstate = carry
      lin = linearized(x, scale, shift, obj.draws)
      res = obj.gradients(lin, objectives.Inputs(ids, ones, mstate, own,
                                                 jax.random.fold_in(key, i)))
      grads = (res.grads["shared"], res.grads["tasks"].get(method, {}) if own else {})
      upd, opt_state = tx.update(grads, opt_state, (x, own))
      x_new, own = optax.apply_updates((x, own), upd)
      new_losses = lin.loss_at({"shared": x_new}) if obj.needs_new_losses else None
      mstate = obj.after_update(res.state, lin.losses, ids, new_losses)
      failed = res.measurements.get("solver_failures", jnp.zeros(()))
      return ((x_new, own), opt_state, fails + failed.astype(jnp.int32), mstate), None

    def chunk(carry, c):
      carry, _ = jax.lax.scan(step, carry, c * record_every + jnp.arange(record_every))
      return carry, carry[0][0]

    opt = (x0, obj.init_params())
    init = (opt, tx.init(opt), jnp.zeros((), jnp.int32), obj.init_state())
    ((x, own), _, fails, _), path = jax.lax.scan(chunk, init, jnp.arange(steps // record_every))
    return jnp.concatenate([x0[None], path]), x, losses(x, scale), fails, own

  x0 = jnp.asarray(starts, jnp.float32)
  keys = jax.random.split(jax.random.key(seed), x0.shape[0])
  path, final, final_losses, fails, own = jax.jit(jax.vmap(one_start))(x0, keys)
  return {"path": np.asarray(path), "final": np.asarray(final),
          "final_losses": np.asarray(final_losses), "solver_failures": np.asarray(fails),
          "method_params": {k: np.asarray(v) for k, v in own.items()}}


def distance_to_pareto_set(x: np.ndarray) -> np.ndarray:
  """Euclidean distance of points ``[..., 2]`` to the Pareto segment."""
  x = np.asarray(x, np.float64)
  x1 = np.clip(x[..., 0], *PARETO_X1)
  return np.hypot(x[..., 0] - x1, x[..., 1] - PARETO_X2)
