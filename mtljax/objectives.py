"""Multi-task objectives: how per-task losses and gradients become one update.

The lecture's objective is ``sum_i w_i L_i(theta, D_i)``; in a step it is taken
over the K sampled task slots: ``sum_k w[task_ids[k]] * L_k`` -- a *sum*, not a
mean, so a task's gradient is exactly its own weighted gradient (a single-task
run of the same task sees the same gradient).

Methods (``config.objective.method``):

* ``fixed``: the weighted sum with fixed weights ``config.objective.weights``
  (a mapping task name -> weight; unnamed tasks weigh 1); one backward pass.
* loss weighting, :data:`LOSS_WEIGHTINGS` (each multiplies the fixed weights):

  - ``rlw`` (Lin et al. 2022): every step ``lambda = softmax(z)``, ``z ~ N(0, I_T)``;
    objective ``sum_k w lambda L_k`` (weights sum to 1 over the task set).
  - ``dwa`` (Liu et al. 2019): ``lambda_i = T softmax_i(r_i / tau)`` with
    ``r_i = Lbar_i(n-1) / Lbar_i(n-2)``, the ratio of task i's mean loss over the
    last two *windows* of ``dwa_window_steps`` steps (the paper's epochs);
    ``lambda = 1`` until two windows are complete.
  - ``uncertainty`` (Kendall et al. 2018, in LibMTL's form for every task kind):
    ``sum_k w (L_k / (2 exp(s_t)) + s_t / 2)`` with learnable ``s = log sigma^2``,
    a per-task parameter at ``tasks/uncertainty/log_var`` (so unsampled tasks'
    ``s`` do not move). For fixed L the optimum is ``s = log L``.
  - ``min_max``: the worst sampled task, ``max_k w L_k`` (its subgradient).
  - ``famo`` (Liu et al. 2023, the authors' ``famo.py``): ``z = softmax(xi)``,
    ``D = L - L_min + 1e-8``, objective ``sum_k z log(D_k) / c`` with
    ``c = stop_gradient(sum_k z / D_k)``; the shared gradient is clipped to
    global norm ``famo_max_norm`` (1.0; 0 disables); after the optimizer step
    the losses on the *same batch* give ``delta = log D_before - log D_after``
    and ``xi`` takes an Adam step (lr ``famo_w_lr`` 0.025, L2 decay
    ``famo_gamma`` 0.01 added to the gradient, as torch's Adam does) on
    ``J_softmax(xi)^T delta``. Costs one extra forward pass per step.

* ``gradnorm`` (Chen et al. 2018, Algorithm 1): learnable task weights ``w``
  (init 1); the network trains on ``sum_k w_t L_k``; with
  ``G_i = w_i ||grad_W L_i||`` on the last shared layer ``W``
  (``gradnorm_layer``, a regex over ``shared/...`` paths; default the last
  ``trunk/layer_*/kernel``), ``r_i = Ltilde_i / mean(Ltilde)`` where
  ``Ltilde_i = L_i / L_i(first step task i was sampled)``, the weights take an
  Adam step (``gradnorm_w_lr``) on ``grad_w sum_i |G_i - stop_gradient(mean(G)
  r_i^alpha)|`` (``gradnorm_alpha`` 1.5), only for sampled tasks, and are then
  renormalised to sum to T.
* gradient combination, :data:`mtljax.gradients.GRADIENT_METHODS`
  (``mgda``, ``pcgrad``, ``cagrad``, ``imtl_g``, ``nash_mtl``,
  ``aligned_mtl``): the per-slot gradients of the *shared* parameters,
  ``G [K, ...]`` (row k is the gradient of ``w[task_ids[k]] L_k``), come from one
  vmapped VJP; the method turns them into one direction (see
  :mod:`mtljax.gradients` for each method's scaling). Task-specific parameters
  get their own plain gradients (of the weighted sum).

  ``gram_path`` (``config.objective.gram_path``) picks how the step gets the
  Gram matrix ``G G^T``: ``"jacobian"`` (default) materialises the per-slot
  gradients ``[K, D]`` and combines them (one vmapped backward); ``"accumulate"``
  reduces each parameter's per-slot gradients into ``G G^T`` as the backward
  produces them and never keeps the whole Jacobian (memory ``O(K^2)`` plus one
  layer's ``K`` gradients), then gets the direction ``sum_k beta_k g_k`` from a
  second, ordinary backward of ``sum_k beta_k w L_k`` -- every method here needs
  only ``G G^T``, so both paths give the same update.
* ``mgda_ub`` (Sener & Koltun 2018, MGDA-UB): MGDA's weights from the per-slot
  gradients with respect to the shared representation ``Z`` (the trunk's
  output), which needs every slot to see the same inputs
  (``config.sampling.shared_inputs=True``) and an architecture whose features
  are one task-independent representation followed by task-specific heads
  (``multi_head``); then one backward of ``sum_k beta_k w L_k``.

The pure functions of the gradient matrix are re-exported here:
``mtljax.objectives.NAME(G, ...) -> (d, beta, info)`` for every name in
:data:`GRADIENT_FUNCTIONS` (see :mod:`mtljax.gradients` for the scaling
convention of each).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtljax import gradients
from mtljax.gradients import aligned_mtl  # noqa: F401  (re-exported)
from mtljax.gradients import cagrad  # noqa: F401
from mtljax.gradients import imtl_g  # noqa: F401
from mtljax.gradients import mgda  # noqa: F401
from mtljax.gradients import mgda_ub  # noqa: F401
from mtljax.gradients import nash_mtl  # noqa: F401
from mtljax.gradients import pcgrad  # noqa: F401

LOSS_WEIGHTINGS = ("rlw", "dwa", "uncertainty", "min_max", "famo")
REPRESENTATION_METHODS = ("mgda_ub",)
METHODS = (("fixed",) + LOSS_WEIGHTINGS + ("gradnorm",) + gradients.GRADIENT_METHODS
           + REPRESENTATION_METHODS)
GRADIENT_FUNCTIONS = gradients.GRADIENT_METHODS + REPRESENTATION_METHODS
GRAM_PATHS = ("jacobian", "accumulate")


def check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(f"config.objective.method={method!r} is not one of {METHODS}.")


def weighted_sum(losses: jax.Array, task_ids: jax.Array, weights: jax.Array) -> jax.Array:
  """``sum_k weights[task_ids[k]] * losses[k]`` for ``losses [K]``."""
  return jnp.sum(weights[task_ids] * losses)


def make_gram_weights(method: str, *, cagrad_c: float = 0.5, cagrad_rescale: int = 1,
                      solver_iters: int = 300) -> Callable:
  """``weights(K, rng) -> (beta [K], info)`` for a gradient method, from the
  Gram matrix of the task gradients."""
  if method not in GRADIENT_FUNCTIONS:
    raise ValueError(f"{method!r} is not a gradient method; those are "
                     f"{GRADIENT_FUNCTIONS}.")
  if method == "cagrad" and not 0.0 <= cagrad_c < 1.0:
    raise ValueError(f"config.objective.cagrad_c must be in [0, 1), got {cagrad_c}.")
  table = {
      "mgda": lambda k, r: gradients.mgda_weights(k, iters=solver_iters),
      "mgda_ub": lambda k, r: gradients.mgda_weights(k, iters=solver_iters),
      "pcgrad": gradients.pcgrad_weights,
      "cagrad": lambda k, r: gradients.cagrad_weights(k, c=cagrad_c, rescale=cagrad_rescale,
                                                      iters=solver_iters),
      "imtl_g": lambda k, r: gradients.imtl_g_weights(k),
      "nash_mtl": lambda k, r: gradients.nash_mtl_weights(k),
      "aligned_mtl": lambda k, r: gradients.aligned_mtl_weights(k),
  }
  return table[method]


def make_combiner(method: str, **kwargs) -> Callable:
  """``combine(G, rng) -> (d, beta [K], info)`` for a gradient method."""
  weights = make_gram_weights(method, **kwargs)

  def combine(grads, rng):
    beta, info = weights(gradients.gram(grads), rng)
    return gradients.combine(beta, grads), beta, info
  return combine


# ----------------------------------------------------------------------------
# Loss weighting: objective(losses, task_ids, weights, state, params, rng).
# ----------------------------------------------------------------------------


class LossWeighting(NamedTuple):
  """A loss-weighting method as pure functions.

  init_state() -> state; init_params(num_tasks) -> per-task parameters (a
  dict of ``[T]`` arrays, stored at ``params["tasks"][name]``, or ``{}``);
  objective(losses [K], task_ids [K], weights [T], state, params, rng) ->
  (scalar, lambda [T]); update(state, losses, task_ids, new_losses) -> state,
  where ``new_losses`` are the losses on the same batch after the parameter
  update (computed only when ``needs_new_losses``); ``max_shared_grad_norm`` > 0
  clips the shared gradient's global norm.
  """
  init_state: Callable
  init_params: Callable
  objective: Callable
  update: Callable
  needs_new_losses: bool = False
  max_shared_grad_norm: float = 0.0


def _no_state():
  return {}


def _no_params(num_tasks):
  del num_tasks
  return {}


def _keep(state, losses, task_ids, new_losses=None):
  del losses, task_ids, new_losses
  return state


def rlw_weights(rng: jax.Array, num_tasks: int) -> jax.Array:
  return jax.nn.softmax(jax.random.normal(rng, (num_tasks,)))


def dwa_weights(prev: jax.Array, prev2: jax.Array, windows_done: jax.Array,
                temperature: float) -> jax.Array:
  """``T softmax((prev / prev2) / tau)``, or ones before two full windows."""
  num_tasks = prev.shape[0]
  ratio = prev / jnp.maximum(prev2, 1e-12)
  lam = num_tasks * jax.nn.softmax(ratio / temperature)
  return jnp.where(windows_done >= 2, lam, jnp.ones_like(lam))


def famo_weights_optimizer(w_lr: float, gamma: float) -> optax.GradientTransformation:
  """torch ``Adam(lr, weight_decay=gamma)``: L2 decay added to the gradient."""
  return optax.chain(optax.add_decayed_weights(gamma), optax.adam(w_lr))


def famo_logit_gradient(xi: jax.Array, delta: jax.Array) -> jax.Array:
  """``J_softmax(xi)^T delta``."""
  z = jax.nn.softmax(xi)
  return z * (delta - z @ delta)


def make_loss_weighting(method: str, num_tasks: int, *, dwa_temperature: float = 2.0,
                        dwa_window_steps: int = 100, famo_w_lr: float = 0.025,
                        famo_gamma: float = 0.01, famo_max_norm: float = 1.0,
                        famo_min_losses=None) -> LossWeighting:
  check_method(method)
  if method == "famo":
    min_losses = (jnp.zeros((num_tasks,), jnp.float32) if famo_min_losses is None
                  else jnp.asarray(famo_min_losses, jnp.float32))
    tx_w = famo_weights_optimizer(famo_w_lr, famo_gamma)

    def init():
      xi = jnp.zeros((num_tasks,), jnp.float32)
      return {"xi": xi, "opt": tx_w.init(xi)}

    def famo(l, ids, w, st, p, r):
      z = jax.nn.softmax(st["xi"])[ids] * w[ids]
      d = l - min_losses[ids] + 1e-8
      c = jax.lax.stop_gradient(jnp.sum(z / d))
      return jnp.sum(jnp.log(d) * z / c), jax.nn.softmax(st["xi"])

    def update(st, l, ids, new_losses):
      delta_k = (jnp.log(l - min_losses[ids] + 1e-8)
                 - jnp.log(new_losses - min_losses[ids] + 1e-8))
      delta = jax.ops.segment_sum(jax.lax.stop_gradient(delta_k), ids, num_tasks)
      g = famo_logit_gradient(st["xi"], delta)
      upd, opt = tx_w.update(g, st["opt"], st["xi"])
      return {"xi": optax.apply_updates(st["xi"], upd), "opt": opt}

    return LossWeighting(init, _no_params, famo, update, needs_new_losses=True,
                         max_shared_grad_norm=famo_max_norm)
  if method == "fixed":
    return LossWeighting(
        _no_state, _no_params,
        lambda l, ids, w, st, p, r: (weighted_sum(l, ids, w), jnp.ones((num_tasks,))),
        _keep)
  if method == "rlw":
    def rlw(l, ids, w, st, p, r):
      lam = rlw_weights(r, num_tasks)
      return jnp.sum((w * lam)[ids] * l), lam
    return LossWeighting(_no_state, _no_params, rlw, _keep)
  if method == "min_max":
    def min_max(l, ids, w, st, p, r):
      wl = w[ids] * l
      worst = jnp.argmax(wl)
      return wl[worst], jnp.zeros((num_tasks,)).at[ids[worst]].set(1.0)
    return LossWeighting(_no_state, _no_params, min_max, _keep)
  if method == "uncertainty":
    def uw(l, ids, w, st, p, r):
      s = p["log_var"][ids]
      return jnp.sum(w[ids] * (l * 0.5 * jnp.exp(-s) + 0.5 * s)), 0.5 * jnp.exp(-p["log_var"])
    return LossWeighting(_no_state,
                         lambda t: {"log_var": jnp.zeros((t,), jnp.float32)}, uw, _keep)
  if method == "dwa":
    if not dwa_temperature > 0 or dwa_window_steps < 1:
      raise ValueError("config.objective.dwa_temperature must be > 0 and "
                       "dwa_window_steps >= 1.")

    def init():  # distinct buffers, so the state can be donated
      z = lambda: jnp.zeros((num_tasks,), jnp.float32)
      return {"sum": z(), "count": z(), "prev": z(), "prev2": z(),
              "steps": jnp.zeros((), jnp.int32), "windows": jnp.zeros((), jnp.int32)}

    def dwa(l, ids, w, st, p, r):
      lam = dwa_weights(st["prev"], st["prev2"], st["windows"], dwa_temperature)
      return jnp.sum((w * lam)[ids] * l), lam

    def update(st, l, ids, new_losses=None):
      del new_losses
      total = st["sum"] + jax.ops.segment_sum(jax.lax.stop_gradient(l), ids, num_tasks)
      count = st["count"] + jax.ops.segment_sum(jnp.ones_like(l), ids, num_tasks)
      steps = st["steps"] + 1
      done = steps % dwa_window_steps == 0
      mean = jnp.where(count > 0, total / jnp.maximum(count, 1.0), st["prev"])
      z = jnp.zeros_like(total)
      return {
          "sum": jnp.where(done, z, total), "count": jnp.where(done, z, count),
          "prev": jnp.where(done, mean, st["prev"]),
          "prev2": jnp.where(done, st["prev"], st["prev2"]),
          "steps": steps, "windows": st["windows"] + done.astype(jnp.int32)}
    return LossWeighting(init, _no_params, dwa, update)
  raise ValueError(f"config.objective.method={method!r} is a gradient method, not a "
                   "loss weighting.")


# ----------------------------------------------------------------------------
# GradNorm: weights from per-task gradient norms of one shared layer.
# ----------------------------------------------------------------------------


def gradnorm_init(num_tasks: int, w_lr: float) -> dict:
  w = jnp.ones((num_tasks,), jnp.float32)
  return {"w": w, "opt": optax.adam(w_lr).init(w),
          "initial_loss": jnp.zeros((num_tasks,), jnp.float32),
          "seen": jnp.zeros((num_tasks,), bool)}


def gradnorm_update(state: dict, norms: jax.Array, losses: jax.Array, task_ids: jax.Array,
                    *, alpha: float, w_lr: float) -> tuple[dict, jax.Array]:
  """One GradNorm weight update from the slots' ``||grad_W L_k||`` and losses.

  Returns ``(new_state, L_grad)``.
  """
  num_tasks = state["w"].shape[0]
  first = ~state["seen"][task_ids]
  l0 = state["initial_loss"].at[task_ids].set(
      jnp.where(first, losses, state["initial_loss"][task_ids]))
  seen = state["seen"].at[task_ids].set(True)
  ratio = losses / jnp.maximum(l0[task_ids], 1e-12)        # Ltilde per slot
  r = ratio / jnp.mean(ratio)

  def l_grad(w):
    g = w[task_ids] * norms                                  # G_i per slot
    target = jax.lax.stop_gradient(jnp.mean(g) * r ** alpha)
    return jnp.sum(jnp.abs(g - target))

  value, grad_w = jax.value_and_grad(l_grad)(state["w"])
  upd, opt = optax.adam(w_lr).update(grad_w, state["opt"], state["w"])
  active = jnp.zeros((num_tasks,), bool).at[task_ids].set(True)
  w = jnp.where(active, optax.apply_updates(state["w"], upd), state["w"])
  opt = jax.tree.map(lambda new, old: jnp.where(
      active.reshape((-1,) + (1,) * (new.ndim - 1)) if new.ndim else True, new, old),
      opt, state["opt"])
  w = num_tasks * w / jnp.sum(w)                               # renormalise: sum = T
  return {"w": w, "opt": opt, "initial_loss": l0, "seen": seen}, value
