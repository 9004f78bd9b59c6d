"""Stochastic methods with double sampling: MoDo (Chen et al. 2023) and
SDMGrad (Xiao, Ban & Ji 2023) -- their arithmetic (pure, jittable functions
of a Gram matrix) and their objectives.

Both solve for task weights from the product of two *independent*
stochastic Jacobians, ``J_1 J_2^T``, whose expectation is ``J J^T`` (the
product of one batch's Jacobian with itself is a biased estimate of it), and
move the model along a third, independent batch's Jacobian times those
weights. The step gives them three independent mini-batches of its K tasks
(:attr:`mtljax.objectives.Objective.draws` = 3,
:func:`mtljax.data.sampling.sample_draws`), linearised as one batch of 3K
slots: draw d in slots ``d K .. (d + 1) K - 1``. Draws 1 and 2 (slots
``0 .. 2K - 1``) drive the weights, draw 3 the model step.

Task sampling (beyond both papers, whose every step has every task): the
weights ``lambda [T]`` are state on the simplex. A step updates only the
tasks ``S`` it sampled (with a labelled slot in every draw): their weights
are renormalised to the simplex of ``S`` (uniform over ``S`` if they sum to
0), updated there, used for the direction, and stored scaled back to the
mass ``S`` held, so the others keep theirs and the whole stays on the
simplex. With every task in every step, ``S`` is all of them, the mass is 1,
and the update is the paper's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtljax import gradients
from mtljax import jacobians
from mtljax.objectives import gram
from mtljax.objectives.base import Inputs, Objective, Result, check_hparam

DRAWS = 3  # two for the weights' update, one for the model step


def draw_means(task_ids: jax.Array, valid: jax.Array, num_tasks: int, draws: int):
  """``(M [D, T, K], active [D, T])``: ``M[d] @ G_d`` is the mean of draw d's
  valid slot rows per task (duplicate slots of a task, from sampling with
  replacement, are averaged), ``active[d, t]`` whether task t has one.
  ``task_ids [D K]``, ``valid [D K]`` (draw d in slots ``d K .. (d+1) K - 1``)."""
  ids = task_ids.reshape(draws, -1)
  ok = valid.reshape(draws, -1).astype(jnp.float32)
  onehot = jax.nn.one_hot(ids, num_tasks, dtype=jnp.float32) * ok[..., None]   # [D, K, T]
  count = onehot.sum(axis=1)                                                  # [D, T]
  m = jnp.swapaxes(onehot, 1, 2) / jnp.maximum(count, 1.0)[..., None]
  return m, count > 0


def cross_gram(k: jax.Array, m: jax.Array, a: int, b: int) -> jax.Array:
  """``[T, T]``: ``R_a R_b^T`` for the per-task mean rows ``R_d = M_d G_d``
  of draws a and b, from the Gram matrix ``k [D K, D K]`` of every slot."""
  n = m.shape[-1]
  return m[a] @ k[a * n:(a + 1) * n, b * n:(b + 1) * n] @ m[b].T


def restrict(lam: jax.Array, active: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(v, mass)``: ``lam`` on the ``active`` tasks renormalised to sum 1
  (uniform over them when their mass is 0), 0 elsewhere; ``mass`` theirs."""
  base = jnp.where(active, lam, 0.0)
  mass = jnp.sum(base)
  uniform = active / jnp.maximum(jnp.sum(active), 1)
  return jnp.where(mass > 0, base / jnp.where(mass > 0, mass, 1.0), uniform), mass


def project_active(v: jax.Array, active: jax.Array) -> jax.Array:
  """The Euclidean projection of ``v`` restricted to the ``active`` tasks
  onto their simplex (0 elsewhere). Inactive entries are set below every
  active one minus 1, which is below the projection's threshold (the largest
  active entry minus 1, at least), so they stay out of its support."""
  some = jnp.any(active)
  low = jnp.where(some, jnp.min(jnp.where(active, v, jnp.inf)) - 1.0, 0.0)
  return jnp.where(active, gradients.project_simplex(jnp.where(active, v, low)), 0.0)


def modo_lambda(v: jax.Array, c12: jax.Array, active: jax.Array, *, gamma: float,
                rho: float) -> jax.Array:
  """MoDo's weight update (Chen et al. 2023, Algorithm 1, with the
  regularisation ``rho``): ``lambda <- Pi(lambda - gamma (J_1 J_2^T lambda +
  rho lambda))``, ``c12 = J_1 J_2^T [T, T]`` from two independent draws,
  ``Pi`` the projection onto the simplex of the ``active`` tasks."""
  c = jnp.where(active[:, None] & active[None, :], c12, 0.0)
  return project_active(v - gamma * (c @ v + rho * v), active)


def sdmgrad_w(v: jax.Array, c12: jax.Array, active: jax.Array, *, lamda: float, niter: int,
              lr: float, momentum: float) -> jax.Array:
  """SDMGrad's inner solve for ``w`` (Xiao et al. 2023, Algorithm 1; the
  authors' ``sdmgrad``): ``niter`` steps of projected SGD with heavy-ball
  momentum (torch's ``SGD``, a fresh buffer every outer step) on
  ``1/2 |G w + lamda g_0|^2`` with the doubly sampled gradient
  ``G_1^T G_2 w + lamda G_1^T g_{0,2}`` (``c12 = G_1 G_2^T``, ``g_{0,2}`` the
  mean of draw 2's rows: ``G_1 g_{0,2} = mean_j c12[:, j]``), the Gram
  matrix divided by ``scale^2 + 1e-8``, ``scale`` the mean of
  ``sqrt(max(diag c12, 0))`` (the authors' normalisation, with LibMTL's
  clamp: a cross-draw diagonal can be negative), on the ``active`` tasks."""
  both = active[:, None] & active[None, :]
  c = jnp.where(both, c12, 0.0)
  n = jnp.maximum(jnp.sum(active), 1)
  scale = jnp.sum(jnp.where(active, jnp.sqrt(jnp.maximum(jnp.diag(c), 0.0)), 0.0)) / n
  c = c / (scale * scale + 1e-8)
  cg = jnp.sum(c, axis=1) / n                        # G_1 g_{0,2}, normalised

  def body(i, carry):
    w, buf = carry
    grad = c @ w + lamda * cg
    buf = jnp.where(i == 0, grad, momentum * buf + grad)
    return project_active(w - lr * buf, active), buf

  w, _ = jax.lax.fori_loop(0, niter, body, (v, jnp.zeros_like(v)))
  return w


def _direction(lin: jacobians.Linearized, inp: Inputs, num_tasks: int, coef: jax.Array,
               m: jax.Array, k: jax.Array, g, state: dict, lam_logged: jax.Array) -> Result:
  """The model step from draw 3: slot weights ``coef[t] M_3`` on its slots
  (0 on draws 1 and 2), task parameters from draw 3's weighted sum."""
  n = m.shape[-1]
  w = inp.weights[inp.task_ids]
  beta3 = coef @ m[DRAWS - 1]                                  # [K]
  beta = jnp.concatenate([jnp.zeros(((DRAWS - 1) * n,), beta3.dtype), beta3])
  third = jnp.arange(DRAWS * n) >= (DRAWS - 1) * n
  g_tasks = lin.pullback(jnp.where(third, w, 0.0))["tasks"]
  ids3 = inp.task_ids[(DRAWS - 1) * n:]
  meas = gram.gram_measurements(k[(DRAWS - 1) * n:, (DRAWS - 1) * n:], beta3, {}, ids3,
                                num_tasks)
  return Result(jnp.sum(jnp.where(third, w * lin.losses, 0.0)),
                {"shared": gradients.combine(beta, g), "tasks": g_tasks}, state,
                {**meas, "objective_lambda_sum": lam_logged})


def _draws_of_step(lin, inp: Inputs, num_tasks: int):
  """The slots' gradients, their Gram matrix, the draws' averaging matrices,
  the tasks ``S`` of the step and ``J_1 J_2^T``."""
  ids, w = inp.task_ids, inp.weights[inp.task_ids]
  g, _ = lin.slot_grads(w)
  k = gradients.gram(g)
  m, active = draw_means(ids, w > 0, num_tasks, DRAWS)
  step_tasks = jnp.all(active, axis=0)
  return g, k, m, step_tasks, cross_gram(k, m, 0, 1)


def modo(num_tasks: int, *, gamma: float = 1e-3, rho: float = 0.1) -> Objective:
  """MoDo, multi-objective gradient with double sampling (Chen, Fernando,
  Ying & Chen 2023, Algorithm 1): three independent mini-batches per step;
  ``lambda <- Pi_simplex(lambda - gamma (J_1 J_2^T lambda + rho lambda))``
  from the first two (:func:`modo_lambda`; state ``lambda [T]``, init
  ``1 / T``), then the shared parameters move along ``J_3^T lambda`` (the
  *updated* weights, the third batch); task parameters get draw 3's
  weighted-sum gradient. Rows are ``w_k grad L_k``. Defaults: LibMTL's
  ``MoDo_gamma = 1e-3``, ``MoDo_rho = 0.1`` (the authors' fork of LibMTL:
  ``gamma = 0.1``). See the module docstring for task sampling."""
  check_hparam("modo", gamma > 0 and rho >= 0,
               f"gamma must be > 0 and rho >= 0, got {gamma}, {rho}")

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    g, k, m, step_tasks, c12 = _draws_of_step(lin, inp, num_tasks)
    v, mass = restrict(inp.state["lambda"], step_tasks)
    v = modo_lambda(v, c12.astype(v.dtype), step_tasks, gamma=gamma, rho=rho)
    lam = jnp.where(step_tasks, mass * v, inp.state["lambda"])
    return _direction(lin, inp, num_tasks, v, m, k, g, {"lambda": lam}, lam)

  return Objective("modo", "slots", grads_fn,
                   init_state=lambda: {"lambda": jnp.full((num_tasks,), 1.0 / num_tasks,
                                                          jnp.float32)},
                   hparams={"gamma": gamma, "rho": rho}, draws=DRAWS)


def sdmgrad(num_tasks: int, *, lamda: float = 0.3, niter: int = 20, w_lr: float = 10.0,
            w_momentum: float = 0.5) -> Objective:
  """SDMGrad, stochastic direction-oriented multi-objective gradient descent
  (Xiao, Ban & Ji, NeurIPS 2023, Algorithm 1): three independent
  mini-batches per step; ``w`` (state ``w [T]``, init ``1 / T``, warm-started
  across steps) takes ``niter`` projected SGD steps on
  ``1/2 |G w + lamda g_0|^2`` with doubly sampled gradients from the first two
  (:func:`sdmgrad_w`), then the shared parameters move along
  ``(G_3 w + lamda g_{0,3}) / (1 + lamda)``, ``g_0`` the mean of the rows
  (``lamda = 0``: stochastic MGDA; ``lamda -> inf``: the mean gradient).
  Task parameters get draw 3's weighted-sum gradient. Defaults are the
  authors' (``run.sh``'s ``lamda = 0.3``, ``niter = 20``; ``SGD(lr=10,
  momentum=0.5)``; LibMTL uses ``lr = 5``)."""
  check_hparam("sdmgrad", lamda >= 0 and w_lr > 0 and 0 <= w_momentum < 1,
               f"lamda must be >= 0, w_lr > 0 and w_momentum in [0, 1), got {lamda}, "
               f"{w_lr}, {w_momentum}")
  if isinstance(niter, bool) or not isinstance(niter, int) or niter < 1:
    raise ValueError(f"sdmgrad: niter must be an integer >= 1, got {niter!r}.")

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    g, k, m, step_tasks, c12 = _draws_of_step(lin, inp, num_tasks)
    v, mass = restrict(inp.state["w"], step_tasks)
    v = sdmgrad_w(v, c12.astype(v.dtype), step_tasks, lamda=lamda, niter=niter, lr=w_lr,
                  momentum=w_momentum)
    n = jnp.maximum(jnp.sum(step_tasks), 1)
    coef = jnp.where(step_tasks, (v + lamda / n) / (1.0 + lamda), 0.0)
    w_new = jnp.where(step_tasks, mass * v, inp.state["w"])
    return _direction(lin, inp, num_tasks, coef, m, k, g, {"w": w_new}, w_new)

  return Objective("sdmgrad", "slots", grads_fn,
                   init_state=lambda: {"w": jnp.full((num_tasks,), 1.0 / num_tasks,
                                                     jnp.float32)},
                   hparams={"lamda": lamda, "niter": niter, "w_lr": w_lr,
                            "w_momentum": w_momentum}, draws=DRAWS)
