"""Multi-task objectives: how per-task losses (and gradients) become one update.

The lecture's objective is ``sum_i w_i L_i(theta, D_i)``; in a step it is taken
over the K sampled task slots: ``sum_k w[task_ids[k]] * L_k`` -- a *sum*, not a
mean, so a task's gradient is exactly its own weighted gradient (a single-task
run of the same task sees the same gradient).

**The interface.** Every method is an :class:`Objective`: what it needs the step
to linearise (``needs``: the weighted-sum gradient, per-slot shared gradients,
or per-slot representation gradients; :mod:`mtljax.jacobians`), a pure
``gradients(lin, inputs) -> Result`` (the value, the update's gradient, the new
state, measurements), an ``after_update`` hook (run after the optimizer step),
and its state and per-task parameters, whose keys are fixed by ``init_state`` /
``init_params``. :func:`make_objective` is the one place a method is chosen
by name; :data:`REGISTRY` maps names to factories whose keyword-only
parameters are the method's hyper-parameters (:func:`hyperparameters`, exposed
as ``config.objective.NAME.PARAM``).

Methods (``config.objective.method``):

* ``fixed``: the weighted sum with fixed weights ``config.objective.weights``
  (a mapping task name -> weight; unnamed tasks weigh 1); one backward pass.
* loss weightings, :data:`LOSS_WEIGHTINGS` (each multiplies the fixed weights;
  the shared gradient is the pullback of ``d objective / d L``):

  - ``rlw`` (Lin et al. 2022): every step ``lambda = softmax(z)``, ``z ~ N(0, I_T)``;
    objective ``sum_k w lambda L_k`` (weights sum to 1 over the task set).
  - ``dwa`` (Liu et al. 2019): ``lambda_i = T softmax_i(r_i / tau)`` with
    ``r_i = Lbar_i(n-1) / Lbar_i(n-2)``, the ratio of task i's mean loss over the
    last two *windows* of ``window_steps`` steps (the paper's epochs);
    ``lambda = 1`` until two windows are complete. With task sampling, a task
    absent from a window keeps its previous mean, and a task not yet sampled
    before the window two back has ratio 1.
  - ``uncertainty`` (Kendall et al. 2018, in LibMTL's form for every task kind):
    ``sum_k w (L_k / (2 exp(s_t)) + s_t / 2)`` with learnable ``s = log sigma^2``,
    a per-task parameter at ``tasks/uncertainty/log_var`` (so unsampled tasks'
    ``s`` do not move). For fixed L the optimum is ``s = log L``.
  - ``min_max``: the worst sampled task, ``max_k w L_k`` (its subgradient).
  - ``famo`` (Liu et al. 2023, the authors' ``famo.py``): ``z = softmax(xi)``,
    ``D = L - L_min + 1e-8``, objective ``sum_k z log(D_k) / c`` with
    ``c = stop_gradient(sum_k z / D_k)``; the shared gradient is clipped to
    global norm ``max_norm`` (1.0; 0 disables); after the optimizer step
    the losses on the *same batch* give ``delta = log D_before - log D_after``
    and ``xi`` takes an Adam step (lr ``w_lr`` 0.025, L2 decay ``gamma`` 0.01
    added to the gradient, as torch's Adam does) on ``J_softmax(xi)^T delta``.
    Costs one extra forward pass per step.

* ``gradnorm`` (Chen et al. 2018, Algorithm 1): learnable task weights ``w``
  (init 1); the network trains on ``sum_k w_t L_k``; with
  ``G_i = w_i ||grad_W L_i||`` on the last shared layer ``W`` matching
  ``layer`` (a regex over ``shared/...``-relative paths; default the last
  dense kernel of the trunk or of the experts, ``experts/level_L/layer_J/kernel``
  for cgc), ``r_i = Ltilde_i / mean(Ltilde)`` where
  ``Ltilde_i = L_i / L_i(first step task i was sampled)``, the weights take an
  Adam step (``w_lr``) on ``grad_w sum_i |G_i - stop_gradient(mean(G) r_i^alpha)|``
  (``alpha`` 1.5), only for sampled tasks (one Adam state per task), and are
  then renormalised to sum to T.
* gradient combination, :data:`mtljax.gradients.GRADIENT_METHODS`
  (``mgda``, ``pcgrad``, ``cagrad``, ``imtl_g``, ``nash_mtl``,
  ``aligned_mtl``, ``upgrad``, ``dualproj``, ``config`` (ConFIG), ``fairgrad``):
  the per-slot gradients of the *shared* parameters,
  ``G [K, ...]`` (row k is the gradient of ``w[task_ids[k]] L_k``), come from the
  step's one linearisation; the method turns their Gram matrix into weights
  ``beta`` and the direction is ``sum_k beta_k g_k`` (see :mod:`mtljax.gradients`
  for each method's scaling). Task-specific parameters get their own plain
  gradients (of the weighted sum).

  ``gram_path`` picks how the direction is formed: ``"jacobian"`` (default)
  combines the per-slot gradients ``[K, D]``; ``"accumulate"`` uses them only to
  reduce ``G G^T`` (each parameter's per-slot gradients are freed as the
  backward produces them), then gets the direction from one more backward of
  ``sum_k beta_k w L_k`` through the same linearisation -- every method here
  needs only ``G G^T``, so both paths give the same update in exact
  arithmetic. In float32 the spectral methods (``imtl_g``, ``config``,
  ``aligned_mtl``) resolve more on the Jacobian path: there they decompose
  the rows' triangular factor (:func:`mtljax.gradients.cosine_factor`,
  condition ``sqrt(cond(C))``) rather than the Gram matrix, and so stay exact
  on nearly opposite or nearly collinear gradients where ``accumulate`` flags
  ``converged=False``.
* ``mgda_ub`` (Sener & Koltun 2018, MGDA-UB): MGDA's weights from the per-slot
  gradients with respect to the shared representation ``Z`` (the output of the
  model's task-independent part), which needs every slot to see the same inputs
  (``config.sampling.shared_inputs=True``) and an architecture with a
  task-independent part (:attr:`mtljax.models.multitask.Model.encode`); then
  one backward of ``sum_k beta_k w L_k`` through the trunk.
* stateful and gradient-transforming methods (the arithmetic in
  :mod:`mtljax.tracked`; each factory's docstring gives the recipe):
  ``gradvac`` (Wang et al. 2021: target cosines per task pair by EMA, state
  ``targets [T, T]``), ``graddrop`` (Chen et al. 2020: sign-purity dropout of
  the representation gradients; needs shared inputs like ``mgda_ub``),
  ``db_mtl`` (Lin et al. 2023), ``moco`` (Fernando et al. 2023) and
  ``excess_mtl`` (He et al. 2024), whose state holds per-task gradients
  ``[T, ...shared]`` (:func:`bind_shared`), ``imtl`` (Liu et al. 2021: IMTL-L's
  learned scales at ``tasks/imtl/log_scale`` with IMTL-G), and the
  scalarisations ``gls`` (Chennupati et al. 2019, geometric mean) and ``stch``
  (Lin et al. 2024, smooth Tchebycheff with a warm-up for the nadir).

**State shaped like the parameters.** An objective whose state holds per-task
gradients declares ``init_shared_state(shared) -> dict`` instead of
``init_state``; :func:`bind_shared` fixes its shapes from the shared
parameters (a no-op for every other method), after which its state's keys and
shapes are fixed like any other's and the step checks them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtljax import gradients
from mtljax import jacobians
from mtljax import params as params_lib
from mtljax import tracked

GRAM_PATHS = ("jacobian", "accumulate")


class Inputs(NamedTuple):
  """What an objective sees in a step besides the linearisation."""
  task_ids: jax.Array   # [K]
  weights: jax.Array    # [T], the fixed task weights w
  state: dict           # the objective's state (keys fixed by init_state)
  params: dict          # its own per-task parameters ({} if none)
  rng: jax.Array


class Result(NamedTuple):
  """An objective's output in a step."""
  total: jax.Array      # the objective's value (scalar)
  grads: dict           # {"shared", "tasks"}: what the optimizer receives
  state: dict           # the objective state going into the optimizer step
  measurements: dict    # fixed keys; summed over the steps of a call


def _empty() -> dict:
  return {}


def _keep(state, losses, task_ids, new_losses):
  del losses, task_ids, new_losses
  return state


@dataclasses.dataclass(frozen=True)
class Objective:
  """One multi-task objective method (module docstring).

  Attributes:
    name: the method's name (also where its per-task parameters live:
      ``params["tasks"][name]``).
    needs: what the step linearises, one of :data:`mtljax.jacobians.NEEDS`.
    gradients: ``gradients(lin: Linearized, inputs: Inputs) -> Result``.
    init_state: ``() -> dict``, the objective's state (fixed keys).
    init_params: ``() -> dict`` of ``[T]`` leaves, its per-task parameters.
    after_update: ``(state, losses [K], task_ids [K], new_losses [K] | None) ->
      state``, after the optimizer step.
    needs_new_losses: the step computes the slots' losses at the updated
      parameters for ``after_update`` (one more forward).
    slot_leaves: with ``needs="slots"``, ``shared_names -> selected names``
      (None: every shared leaf).
    hparams: the hyper-parameters it was built with (for logs).
    init_shared_state: for methods whose state holds per-task gradients
      (``[T, ...]`` like every shared parameter: DB-MTL, ExcessMTL, MoCo),
      ``shared -> dict``; :func:`bind_shared` turns it into ``init_state``
      (until then ``init_state`` raises). None for every other method.
  """
  name: str
  needs: str
  gradients: Callable
  init_state: Callable = _empty
  init_params: Callable = _empty
  after_update: Callable = _keep
  needs_new_losses: bool = False
  slot_leaves: Callable | None = None
  hparams: dict = dataclasses.field(default_factory=dict)
  init_shared_state: Callable | None = None


def bind_shared(objective: Objective, shared) -> Objective:
  """``objective`` with its state's shapes fixed by the shared parameters
  ``shared`` (arrays or ``jax.ShapeDtypeStruct``; only shapes are read).

  A no-op for methods without per-task gradient state, so callers may bind
  every objective; idempotent.
  """
  if objective.init_shared_state is None:
    return objective
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.float32), shared)
  return dataclasses.replace(objective, init_shared_state=None,
                             init_state=functools.partial(objective.init_shared_state, shapes))


def _unbound(name: str) -> Callable:
  def init():
    raise ValueError(
        f"objective {name!r} keeps per-task gradients shaped like the shared parameters "
        f"in its state: bind it first, objectives.bind_shared(objective, params['shared']) "
        f"(or their jax.eval_shape).")
  return init


# ----------------------------------------------------------------------------
# Family 1: loss weightings (the gradient is the pullback of d objective / d L).
# ----------------------------------------------------------------------------


def loss_weighting(name: str, scalarize: Callable, *, init_state: Callable = _empty,
                   init_params: Callable = _empty, after_update: Callable = _keep,
                   needs_new_losses: bool = False, max_shared_grad_norm: float = 0.0,
                   hparams: dict | None = None, log_lambda: bool = True) -> Objective:
  """An :class:`Objective` from ``scalarize(losses [K], inputs) -> (value,
  lambda [T])``, differentiable in the losses and in ``inputs.params``."""

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    def value(losses, own):
      return scalarize(losses, inp._replace(params=own))
    (total, lam), (c, g_own) = jax.value_and_grad(value, argnums=(0, 1), has_aux=True)(
        lin.losses, inp.params)
    grads = lin.pullback(c)
    if g_own:
      grads = {"shared": grads["shared"], "tasks": {**grads["tasks"], name: g_own}}
    if max_shared_grad_norm > 0:
      shared, _ = optax.clip_by_global_norm(max_shared_grad_norm).update(
          grads["shared"], optax.EmptyState())
      grads = {"shared": shared, "tasks": grads["tasks"]}
    meas = {"objective_lambda_sum": lam} if log_lambda else {}
    return Result(total, grads, inp.state, meas)

  return Objective(name, "sum", grads_fn, init_state, init_params, after_update,
                   needs_new_losses, None, dict(hparams or {}))


def weighted_sum(losses: jax.Array, task_ids: jax.Array, weights: jax.Array) -> jax.Array:
  """``sum_k weights[task_ids[k]] * losses[k]`` for ``losses [K]``."""
  return jnp.sum(weights[task_ids] * losses)


def fixed(num_tasks: int) -> Objective:
  """Equal (or fixed, ``config.objective.weights``) weighting."""
  return loss_weighting("fixed", lambda l, inp: (weighted_sum(l, inp.task_ids, inp.weights),
                                                 jnp.ones((num_tasks,))), log_lambda=False)


def rlw_weights(rng: jax.Array, num_tasks: int) -> jax.Array:
  """``softmax(z)``, ``z ~ N(0, I_T)``."""
  return jax.nn.softmax(jax.random.normal(rng, (num_tasks,), jnp.float32))


def rlw(num_tasks: int) -> Objective:
  """Random loss weighting (Lin et al. 2022)."""
  def scalarize(l, inp):
    lam = rlw_weights(inp.rng, num_tasks)
    return jnp.sum((inp.weights * lam)[inp.task_ids] * l), lam
  return loss_weighting("rlw", scalarize)


def min_max(num_tasks: int) -> Objective:
  """The worst sampled task's weighted loss."""
  def scalarize(l, inp):
    wl = inp.weights[inp.task_ids] * l
    worst = jnp.argmax(wl)
    return wl[worst], jnp.zeros((num_tasks,)).at[inp.task_ids[worst]].set(1.0)
  return loss_weighting("min_max", scalarize)


def uncertainty(num_tasks: int) -> Objective:
  """Uncertainty weighting (Kendall et al. 2018) with ``s = log sigma^2`` per task."""
  def scalarize(l, inp):
    s = inp.params["log_var"]
    return (jnp.sum(inp.weights[inp.task_ids] * (l * 0.5 * jnp.exp(-s[inp.task_ids])
                                                 + 0.5 * s[inp.task_ids])),
            0.5 * jnp.exp(-s))
  return loss_weighting("uncertainty", scalarize,
                        init_params=lambda: {"log_var": jnp.zeros((num_tasks,), jnp.float32)})


def dwa_weights(prev: jax.Array, prev2: jax.Array, windows_done: jax.Array,
                temperature: float) -> jax.Array:
  """``T softmax((prev / prev2) / tau)``, or ones before two full windows.

  With task sampling a task may have no loss yet in the window two back
  (``prev2 == 0``: losses are positive); its ratio is then 1 (neutral), not 0.
  """
  num_tasks = prev.shape[0]
  ratio = jnp.where(prev2 > 0, prev / jnp.where(prev2 > 0, prev2, 1.0), 1.0)
  lam = num_tasks * jax.nn.softmax(ratio / temperature)
  return jnp.where(windows_done >= 2, lam, jnp.ones_like(lam))


def dwa(num_tasks: int, *, temperature: float = 2.0, window_steps: int = 100) -> Objective:
  """Dynamic weight average (Liu et al. 2019) over windows of ``window_steps``."""
  if not temperature > 0 or window_steps < 1:
    raise ValueError("config.objective.dwa.temperature must be > 0 and "
                     "config.objective.dwa.window_steps >= 1.")

  def init():  # distinct buffers, so the state can be donated
    z = lambda: jnp.zeros((num_tasks,), jnp.float32)
    return {"sum": z(), "count": z(), "prev": z(), "prev2": z(),
            "steps": jnp.zeros((), jnp.int32), "windows": jnp.zeros((), jnp.int32)}

  def scalarize(l, inp):
    st = inp.state
    lam = dwa_weights(st["prev"], st["prev2"], st["windows"], temperature)
    return jnp.sum((inp.weights * lam)[inp.task_ids] * l), lam

  def update(st, l, ids, new_losses=None):
    del new_losses
    # A slot whose loss is exactly 0 has no labelled example (tasks.masked_mean;
    # losses are positive otherwise): it is not part of its task's window mean.
    present = (l > 0).astype(l.dtype)
    total = st["sum"] + jax.ops.segment_sum(jax.lax.stop_gradient(l), ids, num_tasks)
    count = st["count"] + jax.ops.segment_sum(present, ids, num_tasks)
    steps = st["steps"] + 1
    done = steps % window_steps == 0
    mean = jnp.where(count > 0, total / jnp.maximum(count, 1.0), st["prev"])
    z = jnp.zeros_like(total)
    return {"sum": jnp.where(done, z, total), "count": jnp.where(done, z, count),
            "prev": jnp.where(done, mean, st["prev"]),
            "prev2": jnp.where(done, st["prev"], st["prev2"]),
            "steps": steps, "windows": st["windows"] + done.astype(jnp.int32)}
  return loss_weighting("dwa", scalarize, init_state=init, after_update=update,
                        hparams={"temperature": temperature, "window_steps": window_steps})


def famo_weights_optimizer(w_lr: float, gamma: float) -> optax.GradientTransformation:
  """torch ``Adam(lr, weight_decay=gamma)``: L2 decay added to the gradient."""
  return optax.chain(optax.add_decayed_weights(gamma), optax.adam(w_lr))


def famo_logit_gradient(xi: jax.Array, delta: jax.Array) -> jax.Array:
  """``J_softmax(xi)^T delta``."""
  z = jax.nn.softmax(xi)
  return z * (delta - z @ delta)


def famo(num_tasks: int, *, w_lr: float = 0.025, gamma: float = 0.01, max_norm: float = 1.0,
         min_losses: tuple = ()) -> Objective:
  """FAMO (Liu et al. 2023); ``min_losses``: per-task loss lower bounds (default 0)."""
  if not w_lr > 0 or gamma < 0 or max_norm < 0:
    raise ValueError(f"config.objective.famo: w_lr must be > 0, gamma >= 0 and "
                     f"max_norm >= 0 (0 = no clipping), got {w_lr}, {gamma}, {max_norm}.")
  if min_losses and len(min_losses) != num_tasks:
    raise ValueError(f"config.objective.famo.min_losses has {len(min_losses)} values for "
                     f"{num_tasks} tasks.")
  floor = (jnp.asarray(min_losses, jnp.float32) if min_losses
           else jnp.zeros((num_tasks,), jnp.float32))
  tx_w = famo_weights_optimizer(w_lr, gamma)

  def init():
    xi = jnp.zeros((num_tasks,), jnp.float32)
    return {"xi": xi, "opt": tx_w.init(xi)}

  def scalarize(l, inp):
    ids = inp.task_ids
    z = jax.nn.softmax(inp.state["xi"])[ids] * inp.weights[ids]
    d = l - floor[ids] + 1e-8
    c = jax.lax.stop_gradient(jnp.sum(z / d))
    return jnp.sum(jnp.log(d) * z / c), jax.nn.softmax(inp.state["xi"])

  def update(st, l, ids, new_losses):
    delta_k = jnp.log(l - floor[ids] + 1e-8) - jnp.log(new_losses - floor[ids] + 1e-8)
    delta = jax.ops.segment_sum(jax.lax.stop_gradient(delta_k), ids, num_tasks)
    upd, opt = tx_w.update(famo_logit_gradient(st["xi"], delta), st["opt"], st["xi"])
    return {"xi": optax.apply_updates(st["xi"], upd), "opt": opt}
  return loss_weighting("famo", scalarize, init_state=init, after_update=update,
                        needs_new_losses=True, max_shared_grad_norm=max_norm,
                        hparams={"w_lr": w_lr, "gamma": gamma, "max_norm": max_norm})


# ----------------------------------------------------------------------------
# Family 2: gradient combination from the Gram matrix of per-slot gradients.
# ----------------------------------------------------------------------------


def gram_measurements(k: jax.Array, beta: jax.Array, info: dict, task_ids: jax.Array,
                      num_tasks: int) -> dict:
  """Per-task gradient norms and method weights, task-pair cosine sums and
  counts, and solver failures, placed by task id."""
  norms = jnp.sqrt(jnp.maximum(jnp.diag(k), 0.0))
  cos = k / jnp.maximum(norms[:, None] * norms[None, :], 1e-30)
  pair = (task_ids[:, None], task_ids[None, :])
  return {
      "grad_norm_sum": jax.ops.segment_sum(norms, task_ids, num_tasks),
      "grad_weight_sum": jax.ops.segment_sum(beta, task_ids, num_tasks),
      "grad_cos_sum": jnp.zeros((num_tasks, num_tasks)).at[pair].add(cos),
      "grad_pair_count": jnp.zeros((num_tasks, num_tasks)).at[pair].add(1.0),
      "solver_failures": (1.0 - info["converged"].astype(jnp.float32)
                          if "converged" in info else jnp.zeros(())),
  }


def _bind_weights(weights_fn: Callable, hp: dict) -> Callable:
  """``weights(K, rng, factor=None) -> (beta, info)``, hyper-parameters bound and
  checked; ``factor`` (:func:`mtljax.gradients.cosine_factor` of the rows) is
  passed on to the methods that take one."""
  rng_arg = gradients.uses_rng(weights_fn)
  factor_arg = gradients.uses_factor(weights_fn)

  def weights(k, rng, factor=None):
    if rng_arg:
      return weights_fn(k, rng, **hp)
    return weights_fn(k, factor, **hp) if factor_arg else weights_fn(k, **hp)
  weights.uses_factor = factor_arg
  # Trace once on a small problem: bad hyper-parameters fail here, not in jit.
  jax.eval_shape(weights, jnp.eye(2), jax.random.key(0))
  return weights


# Min-norm methods, whose hull would contain an absent slot's zero row.
MIN_NORM_METHODS = ("mgda", "mgda_ub")


def without_absent_slots(weights: Callable) -> Callable:
  """``weights(K, rng)`` of a min-norm method (MGDA) solved on the *present*
  slots only, ``present [K]`` = fixed weight > 0 (a slot with no labelled
  example gets weight 0 for its step, as does a task of config weight 0).

  An absent slot's row is zero, so the min-norm point of the hull would be 0
  and the shared parameters would not move. Giving the absent slots a large
  diagonal ``M`` (orthogonal to everything) makes the minimiser
  ``((1 - t) b, t)`` with ``b`` exactly the min-norm point of the present rows
  and ``t = |b|^2 / (|b|^2 + M)``; the absent weights are then set to 0 and the
  present ones rescaled by ``1 / (1 - t)``: MGDA on the present slots.
  """
  def fn(k, rng, present, factor=None):  # min-norm methods read K only
    big = 1e6 * jnp.maximum(jnp.max(jnp.diag(k)), 1e-30)
    beta, info = weights(k + jnp.diag(jnp.where(present, 0.0, big)), rng)
    kept = jnp.where(present, beta, 0.0)
    total = jnp.sum(kept)
    scale = jnp.where((total > 0) & jnp.any(present), jnp.sum(beta) / jnp.maximum(total, 1e-30),
                      1.0)
    return kept * scale, info
  return fn


def gram_combiner(name: str, num_tasks: int, weights_fn: Callable, *,
                  gram_path: str = "jacobian", **hp) -> Objective:
  """A gradient-combination method from ``weights_fn(K, [rng,] **hp)``."""
  if gram_path not in GRAM_PATHS:
    raise ValueError(f"config.objective.gram_path={gram_path!r} is not one of {GRAM_PATHS}.")
  bound = _bind_weights(weights_fn, hp)
  if name in MIN_NORM_METHODS:
    present_weights = without_absent_slots(bound)
  else:
    present_weights = lambda k, rng, present, factor=None: bound(k, rng, factor)  # noqa: E731

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    w = inp.weights[inp.task_ids]
    weights = functools.partial(present_weights, present=w > 0)
    if gram_path == "jacobian":
      g, g_tasks = lin.slot_grads(w)                # rows w_k grad L_k: [K, ...]
      k = gradients.gram(g)
      # The spectral methods decompose the rows' factor, not K (cond sqrt(K)'s).
      factor = gradients.cosine_factor(g) if bound.uses_factor else None
      beta, info = weights(k, inp.rng, factor=factor)
      shared = gradients.combine(beta, g)
    else:  # G G^T without holding G, then one more backward for the direction
      k, g_tasks = lin.slot_gram(w)
      beta, info = weights(k, inp.rng)
      shared = lin.pullback(beta * w)["shared"]
    return Result(jnp.sum(w * lin.losses), {"shared": shared, "tasks": g_tasks}, inp.state,
                  gram_measurements(k, beta, info, inp.task_ids, num_tasks))

  return Objective(name, "slots", grads_fn, hparams={**hp, "gram_path": gram_path})


def mgda_ub(num_tasks: int, *, iters: int = 300, tol: float = 1e-5,
            exact_up_to: int = 10) -> Objective:
  """MGDA-UB: MGDA on the per-slot gradients of the shared representation."""
  hp = {"iters": iters, "tol": tol, "exact_up_to": exact_up_to}
  weights = without_absent_slots(_bind_weights(gradients.mgda_weights, hp))

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    w = inp.weights[inp.task_ids]
    k, g_tasks = lin.rep_gram(w)                    # Gram of grad_Z (w_k L_k), [K, K]
    beta, info = weights(k, inp.rng, w > 0)
    # sum_k beta_k grad_Z (w_k L_k) back through the trunk: one backward of
    # sum_k beta_k w_k L_k through the one linearisation.
    shared = lin.pullback(beta * w)["shared"]
    return Result(jnp.sum(w * lin.losses), {"shared": shared, "tasks": g_tasks}, inp.state,
                  gram_measurements(k, beta, info, inp.task_ids, num_tasks))

  return Objective("mgda_ub", "representation", grads_fn, hparams=hp)


# ----------------------------------------------------------------------------
# Family 3: GradNorm (weights from per-task gradient norms of one shared layer).
# ----------------------------------------------------------------------------


def gradnorm_init(num_tasks: int, w_lr: float) -> dict:
  """GradNorm's state: task weights ``w [T]`` (init 1), one Adam state per task
  (so a task's bias correction counts its own updates, as for the heads), each
  task's first loss and whether it was seen."""
  w = jnp.ones((num_tasks,), jnp.float32)
  return {"w": w, "opt": jax.vmap(optax.adam(w_lr).init)(w),
          "initial_loss": jnp.zeros((num_tasks,), jnp.float32),
          "seen": jnp.zeros((num_tasks,), bool)}


def gradnorm_update(state: dict, norms: jax.Array, losses: jax.Array, task_ids: jax.Array,
                    *, alpha: float, w_lr: float) -> tuple[dict, jax.Array]:
  """One GradNorm weight update from the slots' ``||grad_W w L_k||`` and losses.

  Only sampled tasks' weights (and Adam states) move; then ``w`` is
  renormalised to sum to T. A slot whose loss is exactly 0 has no labelled
  example (:func:`mtljax.tasks.masked_mean`; losses are positive otherwise)
  and is left out: it neither sets its task's first loss nor enters the means
  nor moves its weight. Returns ``(new_state, L_grad)``.
  """
  num_tasks = state["w"].shape[0]
  present = losses > 0
  pf = present.astype(losses.dtype)

  def mean(v):                                               # over present slots
    return jnp.sum(v * pf) / jnp.maximum(jnp.sum(pf), 1.0)
  first = ~state["seen"][task_ids] & present
  l0 = state["initial_loss"].at[task_ids].set(
      jnp.where(first, losses, state["initial_loss"][task_ids]).astype(
          state["initial_loss"].dtype))
  seen = state["seen"].at[task_ids].max(present)
  ratio = jnp.where(present, losses / jnp.maximum(l0[task_ids], 1e-12), 0.0)  # Ltilde
  r = ratio / jnp.maximum(mean(ratio), 1e-12)

  def l_grad(w):
    g = w[task_ids] * norms                                  # G_i per slot
    target = jax.lax.stop_gradient(mean(g) * r ** alpha)
    return jnp.sum(jnp.abs(g - target) * pf)

  value, grad_w = jax.value_and_grad(l_grad)(state["w"])
  upd, opt = jax.vmap(optax.adam(w_lr).update)(grad_w, state["opt"], state["w"])
  active = jnp.zeros((num_tasks,), bool).at[task_ids].max(present)
  w = jnp.where(active, optax.apply_updates(state["w"], upd), state["w"])
  opt = jax.tree.map(lambda new, old: jnp.where(
      active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old), opt, state["opt"])
  w = num_tasks * w / jnp.sum(w)                               # renormalise: sum = T
  return {"w": w, "opt": opt, "initial_loss": l0, "seen": seen}, value


def _natural(name: str) -> list:
  """Sort key reading the digits in a path as numbers (``layer_10`` > ``layer_9``)."""
  return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def gradnorm(num_tasks: int, *, alpha: float = 1.5, w_lr: float = 0.025,
             layer: str = r"(trunk|experts)/(level_\d+/)?layer_\d+/kernel$") -> Objective:
  """GradNorm (Chen et al. 2018, Algorithm 1) on the last shared leaf matching
  ``layer`` (a regex over paths relative to ``shared/``)."""
  if not w_lr > 0 or alpha < 0:
    raise ValueError(f"config.objective.gradnorm: w_lr must be > 0 and alpha >= 0, got "
                     f"{w_lr}, {alpha}.")
  try:
    rx = re.compile(layer)
  except re.error as e:
    raise ValueError(f"config.objective.gradnorm.layer={layer!r}: {e}.") from None

  def pick(names):
    found = sorted((n for n in names if rx.search(n)), key=_natural)
    if not found:
      raise ValueError(f"config.objective.gradnorm.layer={layer!r} matches no shared "
                       f"parameter; shared parameters are {list(names)}.")
    return found[-1:]  # the last shared layer matching (layer_10 after layer_9)

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    ids, w = inp.task_ids, inp.weights[inp.task_ids]
    g, _ = lin.slot_grads(w)                           # rows w_k grad L_k (some leaves)
    named = dict(params_lib.flatten_with_names(g))
    g_layer = named[pick(list(named))[0]]              # [K, ...] on W
    norms = jnp.sqrt(jnp.sum(jnp.square(g_layer.reshape(g_layer.shape[0], -1)), axis=1))
    w_gn = inp.state["w"]
    grads = lin.pullback(w * w_gn[ids])
    new_state, l_grad = gradnorm_update(inp.state, norms, jax.lax.stop_gradient(lin.losses),
                                        ids, alpha=alpha, w_lr=w_lr)
    return Result(jnp.sum(w * w_gn[ids] * lin.losses), grads, new_state,
                  {"objective_lambda_sum": w_gn, "gradnorm_loss": l_grad})

  return Objective("gradnorm", "slots", grads_fn,
                   init_state=lambda: gradnorm_init(num_tasks, w_lr), slot_leaves=pick,
                   hparams={"alpha": alpha, "w_lr": w_lr, "layer": layer})


# ----------------------------------------------------------------------------
# Family 4: methods that keep state across steps or transform the per-task
# gradients themselves (arithmetic in mtljax.tracked).
# ----------------------------------------------------------------------------


def _check(name: str, ok: bool, what: str) -> None:
  if not ok:
    raise ValueError(f"config.objective.{name}: {what}.")


def _slot_result(lin, inp, num_tasks, k, beta, shared, g_tasks, state, extra=None,
                 info=None, total=None) -> Result:
  """A gradient method's :class:`Result` with the Gram measurements of ``k``
  and per-slot weights ``beta``."""
  w = inp.weights[inp.task_ids]
  meas = gram_measurements(k, beta, info or {}, inp.task_ids, num_tasks)
  return Result(jnp.sum(w * lin.losses) if total is None else total,
                {"shared": shared, "tasks": g_tasks}, state, {**meas, **(extra or {})})


def gradvac(num_tasks: int, *, beta: float = 0.01) -> Objective:
  """Gradient Vaccine (Wang et al. 2021): each slot's gradient is moved towards
  the target cosine ``phi`` with every other slot's (visited in a random order,
  :func:`mtljax.tracked.gradvac_coefficients`); ``d`` is the sum of the adjusted
  gradients; the targets ``phi [T, T]`` (state ``targets``, placed by task id,
  init 0) track the met cosines by an EMA with rate ``beta`` (the paper's 1e-2;
  LibMTL's default is 0.5). One target per task pair (the paper's whole-model
  granularity)."""
  _check("gradvac", 0 < beta <= 1, f"beta must be in (0, 1], got {beta}")

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    ids = inp.task_ids
    g, g_tasks = lin.slot_grads(inp.weights[ids])
    k = gradients.gram(g)
    phi = inp.state["targets"][ids[:, None], ids[None, :]]
    c, rho = tracked.gradvac_coefficients(k, phi, gradients.pcgrad_orders(inp.rng, ids.shape[0]))
    coef = c.sum(axis=0)
    state = {"targets": tracked.gradvac_targets(inp.state["targets"], rho, ids,
                                                inp.weights[ids] > 0, beta)}
    return _slot_result(lin, inp, num_tasks, k, coef, gradients.combine(coef, g), g_tasks,
                        state)

  return Objective("gradvac", "slots", grads_fn,
                   init_state=lambda: {"targets": jnp.zeros((num_tasks, num_tasks), jnp.float32)},
                   hparams={"beta": beta})


def graddrop(num_tasks: int, *, leak: float = 0.0) -> Objective:
  """Gradient sign dropout (Chen et al. 2020) on the shared representation:
  the per-slot ``dZ`` are masked by sign purity per element of ``Z``, batch
  included (Algorithm 1 as written; not LibMTL's batch-separated form, whose
  purity is of ``sum_b sign(Z) dZ`` per feature;
  :func:`mtljax.tracked.graddrop_cotangent`, uniform draws from the step's
  key) and their sum is back-propagated once through the trunk; ``leak`` in
  [0, 1] (the paper's and LibMTL's 0) keeps that fraction of a dropped gradient.
  Needs shared inputs and an architecture with a task-independent part."""
  _check("graddrop", 0 <= leak <= 1, f"leak must be in [0, 1], got {leak}")

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    dz, g_tasks = lin.rep_grads(inp.weights[inp.task_ids])      # [K, ...]
    shared = lin.rep_pullback(tracked.graddrop_cotangent(dz, inp.rng, leak=leak))
    k = gradients.gram(dz)
    return _slot_result(lin, inp, num_tasks, k, jnp.ones_like(lin.losses), shared,
                        g_tasks, inp.state)

  return Objective("graddrop", "representation", grads_fn, hparams={"leak": leak})


def db_mtl(num_tasks: int, *, beta: float = 0.9, beta_sigma: float = 0.0) -> Objective:
  """Dual-balancing MTL (Lin et al. 2023; LibMTL's ``DB_MTL``): per-slot
  gradients of ``w_k log(L_k + 1e-8)``; each task's EMA
  ``m_t <- g_t + beta / n_t^beta_sigma (m_t - g_t)`` (``n_t`` the times task t
  was sampled; state ``grads [T, ...shared]``); ``d = sum_t alpha_t m_t`` over the
  sampled tasks with ``alpha_t = max_s ||m_s|| / ||m_t||``. Task parameters get
  the gradient of ``sum_k w_k log L_k``. Bind with :func:`bind_shared`."""
  _check("db_mtl", 0 <= beta < 1 and beta_sigma >= 0,
         f"beta must be in [0, 1) and beta_sigma >= 0, got {beta}, {beta_sigma}")

  def init(shared):
    return {"grads": tracked.zeros_rows(num_tasks, shared),
            "count": jnp.zeros((num_tasks,), jnp.float32)}

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    ids, w = inp.task_ids, inp.weights[inp.task_ids]
    g, g_tasks = lin.slot_grads(w / (lin.losses + 1e-8))          # w_k grad log L_k
    rows, active = tracked.task_mean_rows(g, ids, num_tasks, w > 0)
    count = inp.state["count"] + active
    keep = tracked.decayed(beta, beta_sigma, count)
    buf = tracked.track(inp.state["grads"], rows, 1.0 - keep, active)
    alpha = tracked.db_mtl_weights(buf, active)
    total = jnp.sum(w * jnp.log(lin.losses + 1e-8))
    return _slot_result(lin, inp, num_tasks, gradients.gram(g), alpha[ids],
                        gradients.combine(alpha, buf), g_tasks,
                        {"grads": buf, "count": count}, total=total)

  return Objective("db_mtl", "slots", grads_fn, init_state=_unbound("db_mtl"),
                   init_shared_state=init, hparams={"beta": beta, "beta_sigma": beta_sigma})


def moco(num_tasks: int, *, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1,
         gamma_sigma: float = 0.5, rho: float = 0.0, simplex: str = "project") -> Objective:
  """MoCo (Fernando et al. 2023; LibMTL's ``MoCo``, from the authors' code):
  rows ``g_k / ||g_k|| * w_k L_k``; tracked estimates
  ``y_t <- y_t - beta / n_t^beta_sigma (y_t - g_t)`` (state ``y [T, ...shared]``);
  ``lambda <- Pi(lambda - gamma / n^gamma_sigma (Y Y^T + rho I) lambda)`` with
  ``Pi`` the projection onto the simplex (``simplex="project"``, the paper) or
  a softmax (``"softmax"``, LibMTL); ``d = Y^T lambda`` over the tasks sampled
  with weight > 0 at least once (an unsampled task's estimate is its last; a
  task never active -- zero weight, never sampled or never labelled -- has no
  estimate and is left out of ``lambda`` (weight 0 in state ``lambda``;
  :func:`mtljax.tracked.moco_lambda`), so with weights ``[1, 1, 0]`` MoCo is
  the 2-task MoCo; a task first active later enters the step with ``1 / T``
  and the others' weights, renormalised). Bind with :func:`bind_shared`."""
  _check("moco", beta > 0 and gamma > 0 and beta_sigma >= 0 and gamma_sigma >= 0 and rho >= 0,
         f"beta, gamma must be > 0 and beta_sigma, gamma_sigma, rho >= 0, got {beta}, "
         f"{gamma}, {beta_sigma}, {gamma_sigma}, {rho}")
  _check("moco", simplex in ("project", "softmax"),
         f"simplex={simplex!r} is not one of ('project', 'softmax')")

  def init(shared):
    return {"y": tracked.zeros_rows(num_tasks, shared),
            "lambda": jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32),
            "count": jnp.zeros((num_tasks,), jnp.float32), "steps": jnp.zeros((), jnp.float32)}

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    ids, w, st = inp.task_ids, inp.weights[inp.task_ids], inp.state
    g, g_tasks = lin.slot_grads(w)
    k = gradients.gram(g)
    norms = jnp.sqrt(jnp.maximum(jnp.diag(k), 0.0))
    rows, active = tracked.task_mean_rows(
        tracked.scale_rows(w * lin.losses / (norms + 1e-8), g), ids, num_tasks, w > 0)
    count, steps = st["count"] + active, st["steps"] + 1.0
    y = tracked.track(st["y"], rows, tracked.decayed(beta, beta_sigma, count), active)
    known = count > 0
    entering = known & (st["count"] == 0)        # joins with the initial 1 / T
    lam = tracked.moco_lambda(jnp.where(entering, 1.0 / num_tasks, st["lambda"]),
                              gradients.gram(y), tracked.decayed(gamma, gamma_sigma, steps),
                              known, rho=rho, simplex=simplex)
    state = {"y": y, "lambda": lam, "count": count, "steps": steps}
    return _slot_result(lin, inp, num_tasks, k, lam[ids], gradients.combine(lam, y),
                        g_tasks, state, {"objective_lambda_sum": lam})

  return Objective("moco", "slots", grads_fn, init_state=_unbound("moco"),
                   init_shared_state=init,
                   hparams={"beta": beta, "beta_sigma": beta_sigma, "gamma": gamma,
                            "gamma_sigma": gamma_sigma, "rho": rho, "simplex": simplex})


def excess_mtl(num_tasks: int, *, step_size: float = 1e-2) -> Objective:
  """ExcessMTL (He et al. 2024, the authors' ``ExcessMTL.py``): per task the
  running sum of squared gradients ``S_t`` (state ``grad_sq_sum [T, ...shared]``),
  the excess-risk estimate ``r_t = g_t^T diag(1 / sqrt(S_t)) g_t``
  (:func:`mtljax.tracked.excess_risks`), relative to the task's first
  ``r_t^0``; the loss weights take the exponentiated-gradient step
  ``lambda_t <- lambda_t exp(step_size r_t / r_t^0)`` (sampled tasks, from
  the sampling after their first with ``r_t > 0`` -- a zero gradient gives no
  reference; then ``sum lambda = T``) and the objective is
  ``sum_k lambda_t w_k L_k`` with the updated weights. Bind with
  :func:`bind_shared`."""
  _check("excess_mtl", step_size > 0, f"step_size must be > 0, got {step_size}")

  def init(shared):
    return {"grad_sq_sum": tracked.zeros_rows(num_tasks, shared),
            "initial_risk": jnp.zeros((num_tasks,), jnp.float32),
            "seen": jnp.zeros((num_tasks,), bool),
            "loss_weights": jnp.ones((num_tasks,), jnp.float32)}

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    ids, w, st = inp.task_ids, inp.weights[inp.task_ids], inp.state
    g, _ = lin.slot_grads(w)
    rows, active = tracked.task_mean_rows(g, ids, num_tasks, w > 0)
    sq = tracked.where_rows(active, jax.tree.map(lambda s, r: s + r * r, st["grad_sq_sum"],
                                                 rows), st["grad_sq_sum"])
    risk = tracked.excess_risks(sq, rows)
    first = active & (risk > 0) & ~st["seen"]      # a zero first risk is no reference
    initial = jnp.where(first, risk, st["initial_risk"])
    lam = tracked.excess_weights(st["loss_weights"], risk, initial, active & st["seen"],
                                 step_size)
    state = {"grad_sq_sum": sq, "initial_risk": initial, "seen": st["seen"] | first,
             "loss_weights": lam}
    coef = lam[ids]
    return _slot_result(lin, inp, num_tasks, gradients.gram(g), coef,
                        gradients.combine(coef, g), lin.pullback(w * coef)["tasks"], state,
                        {"objective_lambda_sum": lam},
                        total=jnp.sum(w * coef * lin.losses))

  return Objective("excess_mtl", "slots", grads_fn, init_state=_unbound("excess_mtl"),
                   init_shared_state=init, hparams={"step_size": step_size})


def imtl(num_tasks: int, *, eps: float = 1e-12, max_cond: float = 1e6) -> Objective:
  """IMTL (Liu et al. 2021) in full: IMTL-L's learned scales ``s`` (a per-task
  parameter at ``tasks/imtl/log_scale``, init 0) turn each loss into
  ``e^s L - s`` (the scales' gradient ``e^s w L - w``); IMTL-G's weights
  (:func:`mtljax.gradients.imtl_g_weights`, with its ``eps`` and ``max_cond``)
  combine the per-slot gradients of the scaled losses ``w_k e^{s_t} grad L_k``;
  task parameters get the gradient of ``sum_k w_k e^{s_t} L_k``."""
  hp = {"eps": eps, "max_cond": max_cond}
  weights = _bind_weights(gradients.imtl_g_weights, hp)

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    ids, w = inp.task_ids, inp.weights[inp.task_ids]
    s = inp.params["log_scale"]
    scale = jnp.exp(s[ids])
    g, g_tasks = lin.slot_grads(w * scale)
    k = gradients.gram(g)
    alpha, info = weights(k, inp.rng, gradients.cosine_factor(g))
    g_s = jax.ops.segment_sum(w * (scale * lin.losses - 1.0), ids, num_tasks)
    return _slot_result(lin, inp, num_tasks, k, alpha, gradients.combine(alpha, g),
                        {**g_tasks, "imtl": {"log_scale": g_s}}, inp.state,
                        {"objective_lambda_sum": jnp.exp(s)}, info=info,
                        total=jnp.sum(w * (scale * lin.losses - s[ids])))

  return Objective("imtl", "slots", grads_fn,
                   init_params=lambda: {"log_scale": jnp.zeros((num_tasks,), jnp.float32)},
                   hparams=dict(hp))


def gls(num_tasks: int) -> Objective:
  """Geometric loss strategy (Chennupati et al. 2019): ``prod_k L_k^(w_k / K)``
  over the K sampled slots of weight > 0 (the geometric mean of the sampled,
  labelled tasks' losses for unit weights; LibMTL's ``prod(L)^(1/T)`` when
  every task is sampled); its gradient is ``(G / K) sum_k w_k grad L_k / L_k``."""
  def scalarize(l, inp):
    w = inp.weights[inp.task_ids]
    value = tracked.gls_value(l, w)
    lam = jax.ops.segment_sum(   # d value / d L_k; 0 for a slot of weight 0 (maybe L = 0)
        jax.lax.stop_gradient(value) * w / (tracked.live_count(w) * jnp.where(w > 0, l, 1.0)),
        inp.task_ids, num_tasks)
    return value, lam
  return loss_weighting("gls", scalarize)


def stch(num_tasks: int, *, mu: float = 1.0, warmup_steps: int = 400,
         nadir_steps: int = 100) -> Objective:
  """Smooth Tchebycheff scalarisation (Lin et al. 2024, the authors' STCH_MTL
  code): for ``warmup_steps`` steps the objective is ``sum_k w_k log L_k``;
  over the next ``nadir_steps`` steps (the authors: 4 warm-up epochs, then one
  epoch averaged; here one "epoch" = 100 steps) each task's mean loss over its
  slots of weight > 0 is the nadir ``z_t`` (a task without one keeps
  collecting until it has one); once every task of weight > 0 has a nadir,
  ``K mu logsumexp_k(w_k log(L_k / z_t) / mu)`` over the K slots of weight > 0
  (0 if there is none; :func:`mtljax.tracked.stch_value`: the authors'
  value plus ``K max_k w_k log(L_k / z_t)``, their max-shift added back, so
  it ``-> K max_k`` as ``mu -> 0``; the gradient is theirs).
  The nadir statistics are updated in the step (state ``loss_sum``, ``count``
  per task, ``steps``)."""
  _check("stch", mu > 0 and warmup_steps >= 0 and nadir_steps >= 1,
         f"mu must be > 0, warmup_steps >= 0 and nadir_steps >= 1, got {mu}, "
         f"{warmup_steps}, {nadir_steps}")

  def init():
    return {"loss_sum": jnp.zeros((num_tasks,), jnp.float32),
            "count": jnp.zeros((num_tasks,), jnp.float32), "steps": jnp.zeros((), jnp.int32)}

  def scalarize(l, inp):
    st, ids, w = inp.state, inp.task_ids, inp.weights[inp.task_ids]
    has = st["count"] > 0
    ready = (st["steps"] >= warmup_steps + nadir_steps) & jnp.all(has | (inp.weights <= 0))
    nadir = jnp.where(has, st["loss_sum"] / jnp.maximum(st["count"], 1.0), 1.0)[ids]

    def smooth(l):
      x = jax.lax.stop_gradient(tracked.stch_terms(l, nadir, w))
      return (tracked.stch_value(l, nadir, w, mu=mu),
              tracked.live_count(w) * tracked.stch_softmax(x, mu))

    def logs(l):
      return jnp.sum(w * jnp.log(jnp.where(w > 0, l, 1.0) + 1e-20)), (w > 0).astype(l.dtype)

    value, lam = jax.lax.cond(ready, smooth, logs, l)
    return value, jax.ops.segment_sum(lam, ids, num_tasks)

  def update(st, l, ids, w):
    steps = st["steps"]
    collect = (steps >= warmup_steps) & ((steps < warmup_steps + nadir_steps)
                                         | (st["count"] == 0))
    live = (w > 0).astype(l.dtype)                     # weight 0: unlabelled or not trained
    seen = jax.ops.segment_sum(live, ids, num_tasks)
    total = jax.ops.segment_sum(live * jax.lax.stop_gradient(l), ids, num_tasks)
    return {"loss_sum": jnp.where(collect, st["loss_sum"] + total, st["loss_sum"]),
            "count": jnp.where(collect, st["count"] + seen, st["count"]),
            "steps": steps + 1}

  base = loss_weighting("stch", scalarize, init_state=init,
                        hparams={"mu": mu, "warmup_steps": warmup_steps,
                                 "nadir_steps": nadir_steps})

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    res = base.gradients(lin, inp)
    return res._replace(state=update(inp.state, lin.losses, inp.task_ids,
                                     inp.weights[inp.task_ids]))

  return dataclasses.replace(base, gradients=grads_fn)


# ----------------------------------------------------------------------------
# The registry: the one place a method is chosen by name.
# ----------------------------------------------------------------------------

LOSS_WEIGHTINGS = ("rlw", "dwa", "uncertainty", "min_max", "famo", "gls", "stch")
REPRESENTATION_METHODS = ("mgda_ub", "graddrop")



def _gram_factory(name: str) -> Callable[..., Objective]:
  def factory(num_tasks: int, **kwargs) -> Objective:
    return gram_combiner(name, num_tasks, gradients.GRAM_METHODS[name], **kwargs)
  return factory


REGISTRY: dict[str, Callable[..., Objective]] = {
    "fixed": fixed, "rlw": rlw, "dwa": dwa, "uncertainty": uncertainty,
    "min_max": min_max, "famo": famo, "gradnorm": gradnorm,
    **{name: _gram_factory(name) for name in gradients.GRAM_METHODS},
    "mgda_ub": mgda_ub, "gradvac": gradvac, "graddrop": graddrop, "db_mtl": db_mtl,
    "stch": stch, "gls": gls, "imtl": imtl, "excess_mtl": excess_mtl, "moco": moco,
}
METHODS = tuple(REGISTRY)


def check_method(method: str) -> None:
  if method not in REGISTRY:
    raise ValueError(f"config.objective.method={method!r} is not one of {METHODS}.")


def hyperparameters(method: str) -> dict:
  """``{name: default}`` of a method's hyper-parameters."""
  check_method(method)
  if method in gradients.GRAM_METHODS:
    return gradients.hyperparameters(gradients.GRAM_METHODS[method])
  return {p.name: p.default for p in inspect.signature(REGISTRY[method]).parameters.values()
          if p.kind == inspect.Parameter.KEYWORD_ONLY}


def check_hyperparameters(method: str, hparams: dict) -> None:
  """Raises on a hyper-parameter name ``method`` does not take."""
  check_method(method)
  known = hyperparameters(method)
  unknown = sorted(set(hparams) - set(known))
  if unknown:
    raise ValueError(f"config.objective.{method}: unknown hyper-parameter(s) {unknown}; "
                     f"{method!r} takes {sorted(known) or 'none'}.")


def make_objective(method: str, num_tasks: int, *, gram_path: str = "jacobian",
                   **hparams) -> Objective:
  """The :class:`Objective` named ``method`` for ``num_tasks`` tasks.

  ``hparams`` are the method's hyper-parameters (:func:`hyperparameters`;
  unknown names raise); ``gram_path`` applies to the gradient-combination
  methods only.
  """
  check_hyperparameters(method, hparams)
  if method in gradients.GRAM_METHODS:
    return REGISTRY[method](num_tasks, gram_path=gram_path, **hparams)
  if gram_path != "jacobian":
    raise ValueError(
        f"config.objective.gram_path={gram_path!r} applies to the gradient methods "
        f"{gradients.GRADIENT_METHODS}, whose per-task parameter gradients it accumulates; "
        f"method {method!r} does not use it (mgda_ub never forms the parameter Jacobian). "
        "Leave gram_path='jacobian'.")
  return REGISTRY[method](num_tasks, **hparams)
