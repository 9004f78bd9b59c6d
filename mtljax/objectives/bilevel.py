"""Bilevel task weighting: Auto-lambda, MOML (:func:`moml`) and FORUM
(:func:`forum`).

Auto-lambda (Liu, Davison & Johns, "Auto-Lambda: Disentangling Dynamic
Task Relationships", TMLR 2022): task weights learned by the meta-gradient of
a held-out loss through one look-ahead step of the model.

Per step, with the task weights ``lambda [T]`` (state, init ``0.1``):

1. the look-ahead (the paper's eq. 3, the authors' ``virtual_step``)::

     theta'(lambda) = theta - alpha grad_theta sum_i lambda_i L_i(theta; train batch)

2. the meta-gradient of the primary tasks' loss on a second, independent
   batch (the authors' "validation" batch)::

     g_lambda = d/d lambda  sum_{i in primary} L_i(theta'(lambda); meta batch)

   and ``lambda`` takes one Adam step on it (the authors' meta optimizer);
3. the model takes the optimizer's step on ``sum_i lambda_i L_i(theta; train
   batch)`` with the *updated* weights (the authors' trainer).

Where the meta batch comes from: the authors' trainers draw it from a second
loader over the **training set** with its own shuffling ("a copy of
train_loader with different data order, used for Auto-Lambda meta-update",
``trainer_dense.py``, ``trainer_cifar.py``), not from a validation split. So
Auto-lambda reads two independent mini-batches of the step's tasks
(:attr:`mtljax.objectives.Objective.draws` = 2,
:func:`mtljax.data.sampling.sample_draws`): draw 1 (slots ``0 .. K - 1``) is
the train batch, draw 2 (slots ``K .. 2K - 1``) the meta batch.

The meta-gradient, two ways (``meta_grad``):

* ``"exact"``: reverse-mode autodiff of ``lambda -> L_meta(theta'(lambda))``
  through the look-ahead step. ``theta'`` is formed from the step's own
  linearisation (``lin.pullback``, linear in the slot weights), so JAX
  differentiates the inner gradient by transposing that pullback: one
  forward and backward at ``theta'`` plus one forward-mode pass through the
  train batch's linearisation. For the one plain-SGD look-ahead step this is
  ``-alpha <grad L_meta(theta'), grad L_i(theta)>`` exactly (the mixed second
  derivative ``d^2 (sum_j lambda_j L_j) / d theta d lambda_i`` is
  ``grad L_i``).
* ``"finite_difference"``: the authors' ``compute_hessian``: ``d = grad
  L_meta(theta')``, ``eps = 0.01 / |d|``, ``g_lambda = -alpha (L_i(theta +
  eps d) - L_i(theta - eps d)) / (2 eps)`` on the train batch (what the paper
  ran; two more forwards of the train batch instead of the transposed pass).

The look-ahead step: the authors step by the model optimizer's current
learning rate with its SGD momentum buffer and weight decay added
(``weight - alpha (m + grad + wd weight)``); neither term depends on
``lambda``. An objective here does not see the optimizer, so the look-ahead
is the paper's eq. 3, plain SGD with its own rate ``alpha``
(``lookahead_lr``, default 0.1 = the authors' SGD rate at the start of their
cosine schedule).

Task sampling (beyond the paper, whose every step has every task): a task's
weight and its Adam moments move only in steps whose train batch has a
labelled slot of it and whose meta batch has one of a primary task (each
task counts its own Adam steps), so with every task in every step the
update is torch's Adam exactly. The meta loss reads the primary tasks in
the meta batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtljax import jacobians
from mtljax.gradients import min_norm
from mtljax.objectives import gram
from mtljax.objectives.base import Inputs, Objective, Result, check_hparam
from mtljax.objectives.double_sampling import draw_means

DRAWS = 2  # the train batch and the meta batch
META_GRADS = ("exact", "finite_difference")
ADAM_BETAS = (0.9, 0.999)   # torch.optim.Adam's defaults (the authors' meta optimizer)
ADAM_EPS = 1e-8
FD_SCALE = 0.01             # the authors' eps = 0.01 / |d|


def adam_step(lam: jax.Array, m: jax.Array, v: jax.Array, count: jax.Array, g: jax.Array,
              active: jax.Array, lr: float):
  """torch's Adam (no weight decay, bias-corrected) on the ``active``
  entries, each with its own step ``count``; the others are unchanged."""
  b1, b2 = ADAM_BETAS
  c = count + active.astype(count.dtype)
  m_new = b1 * m + (1 - b1) * g
  v_new = b2 * v + (1 - b2) * g * g
  t = jnp.maximum(c, 1).astype(lam.dtype)
  step = lr * (m_new / (1 - b1 ** t)) / (jnp.sqrt(v_new / (1 - b2 ** t)) + ADAM_EPS)
  return (jnp.where(active, lam - step, lam), jnp.where(active, m_new, m),
          jnp.where(active, v_new, v), c)


def slot_coefficients(task_weights: jax.Array, m: jax.Array, w_slots: jax.Array) -> jax.Array:
  """``[K]``: slot k's coefficient in ``sum_i task_weights_i L_i``, ``L_i`` the
  mean of task i's valid slots of one draw (``m [T, K]`` from
  :func:`draw_means`), times the slot's fixed weight ``w_slots [K]``."""
  return w_slots * (task_weights @ m)


def meta_gradient(lin: jacobians.Linearized, pullback, lam: jax.Array, c_train_of,
                  c_meta: jax.Array, n: int, *, alpha: float, meta_grad: str) -> jax.Array:
  """``[T]``: ``d/d lambda sum_k c_meta[k] L_{n+k}(theta'(lambda))`` (module
  docstring), ``theta'(lambda) = theta - alpha pullback(c_train_of(lambda))``:
  ``pullback`` the train draw's (slots ``0 .. n - 1``) VJP at ``theta =
  lin.params``, ``c_train_of(lambda) [n]`` its slot weights, ``c_meta [n]``
  the meta draw's (slots ``n .. 2n - 1``)."""
  theta = lin.params
  meta_slots, train_slots = slice(n, 2 * n), slice(0, n)

  def lookahead(l):
    g = pullback(c_train_of(l))
    return jax.tree.map(lambda p, d: p - alpha * d.astype(p.dtype), theta, g)

  def meta_loss(p):
    return jnp.sum(c_meta * lin.loss_at(p, meta_slots))

  if meta_grad == "exact":
    return jax.grad(lambda l: meta_loss(lookahead(l)))(lam)
  # The authors' finite difference: d = grad L_meta(theta'), then the
  # directional derivative of each task's train loss along d, centred.
  d = jax.grad(meta_loss)(lookahead(lam))
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(d)))
  eps = FD_SCALE / jnp.where(norm > 0, norm, 1.0)

  def train_losses(sign):
    p = jax.tree.map(lambda a, b: a + sign * eps * b.astype(a.dtype), theta, d)
    # d/d lambda of sum_i lambda_i L_i at p: the slot losses mapped to tasks
    return jax.grad(lambda l: jnp.sum(c_train_of(l) * lin.loss_at(p, train_slots)))(lam)

  return -alpha * (train_losses(1.0) - train_losses(-1.0)) / (2.0 * eps)


def auto_lambda(num_tasks: int, *, init: float = 0.1, lr: float = 1e-4,
                lookahead_lr: float = 0.1, primary: tuple = (),
                meta_grad: str = "exact") -> Objective:
  """Auto-lambda (Liu, Davison & Johns, TMLR 2022; module docstring): state
  ``lambda [T]`` (init ``init``, the authors' ``autol_init = 0.1``) and its
  Adam moments; two independent draws per step (the train and the meta
  batch, both from the training data as in the authors' trainers).

  Args:
    init: every task weight's initial value (``--autol_init``, 0.1).
    lr: the weights' Adam rate (``--autol_lr``: 1e-4 in the authors' dense
      trainer, 3e-4 in their CIFAR-100 one).
    lookahead_lr: ``alpha`` of the look-ahead step ``theta' = theta - alpha
      grad sum_i lambda_i L_i`` (the authors: the model optimizer's current
      rate, 0.1 at the start of their cosine schedule).
    primary: the task indices (the run's task order) whose meta-batch loss
      drives the weights (the authors' ``--task``); ``()``, every task: the
      multi-task setting (their ``all``, the default); a subset: the
      auxiliary-learning setting.
    meta_grad: ``"exact"`` (autodiff through the look-ahead) or
      ``"finite_difference"`` (the authors' central difference).
  """
  check_hparam("auto_lambda", lr > 0 and lookahead_lr > 0,
               f"lr and lookahead_lr must be > 0, got {lr}, {lookahead_lr}")
  if meta_grad not in META_GRADS:
    raise ValueError(f"auto_lambda: meta_grad={meta_grad!r} is not one of {META_GRADS}.")
  idx = tuple(primary) if isinstance(primary, (tuple, list)) else (primary,)
  bad = [i for i in idx if isinstance(i, bool) or not isinstance(i, int)
         or not 0 <= i < num_tasks]
  if bad or len(set(idx)) != len(idx):
    raise ValueError(f"auto_lambda: primary must be () (every task) or distinct task "
                     f"indices in [0, {num_tasks}), got {primary!r}.")
  prim = (jnp.ones((num_tasks,), jnp.float32) if not idx else
          jnp.zeros((num_tasks,), jnp.float32).at[jnp.asarray(idx)].set(1.0))

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    if lin.params is None:
      raise ValueError("auto_lambda: the linearisation carries no parameters "
                       "(Linearized.params) to take the look-ahead step from.")
    ids = inp.task_ids
    n = ids.shape[0] // DRAWS
    w = inp.weights[ids]
    m, active = draw_means(ids, w > 0, num_tasks, DRAWS)
    dtype = lin.losses.dtype
    m = m.astype(dtype)
    # The train draw's own linearisation: the step's (lin.pullback) spans both
    # draws, and a backward with zero weights on the meta draw's slots would
    # still run through its examples. This forward of the n train slots costs
    # half of the step's; the look-ahead, its transpose (the exact
    # meta-gradient) and the model's gradient all pull back through it.
    _, vjp_train = jax.vjp(lambda p: lin.loss_at(p, slice(0, n)), lin.params)

    def pullback(c):
      return vjp_train(c.astype(dtype))[0]

    def c_train_of(l):
      return slot_coefficients(l.astype(dtype), m[0], w[:n].astype(dtype))

    c_meta = slot_coefficients(prim.astype(dtype), m[1], w[n:].astype(dtype))
    st = inp.state
    lam = st["lambda"]
    g_lam = meta_gradient(lin, pullback, lam.astype(dtype), c_train_of, c_meta, n,
                          alpha=lookahead_lr, meta_grad=meta_grad).astype(lam.dtype)
    # A weight moves when its task is in the train draw and some primary
    # task is in the meta draw (else there is no meta loss to follow).
    moves = active[0] & jnp.any(active[1] & (prim > 0))
    lam_new, mom, vel, count = adam_step(lam, st["m"], st["v"], st["count"], g_lam, moves, lr)
    c = c_train_of(lam_new)
    meas = {"objective_lambda_sum": lam_new,
            "objective_meta_grad_sum": jnp.where(moves, g_lam, 0.0)}
    return Result(jnp.sum(c * lin.losses[:n]), pullback(c),
                  {"lambda": lam_new, "m": mom, "v": vel, "count": count}, meas)

  def init_state():
    # Separate buffers for m and v: a donated state may not hold one array twice.
    return {"lambda": jnp.full((num_tasks,), init, jnp.float32),
            "m": jnp.zeros((num_tasks,), jnp.float32), "v": jnp.zeros((num_tasks,), jnp.float32),
            "count": jnp.zeros((num_tasks,), jnp.int32)}

  return Objective("auto_lambda", "sum", grads_fn, init_state=init_state,
                   hparams={"init": init, "lr": lr, "lookahead_lr": lookahead_lr,
                            "primary": primary, "meta_grad": meta_grad}, draws=DRAWS)


# ---------------------------------------------------------------------------
# MOML (Ye, Zhu, Zhang, Lin, Zhang et al., "Multi-Objective Meta Learning",
# NeurIPS 2021), as LibMTL's trainer runs it (``bacth_forward_MOML``).
# ---------------------------------------------------------------------------

MOML_DRAWS = 3            # the inner (lower-level) batch, the outer (upper-level) batch, the model's
MOML_NORMALIZERS = ("l2", "loss", "loss+", "none")   # LibMTL's MGDA normalisers (MOML uses l2)


def moml_hypergradient(pullback, theta, loss_at_meta, alpha: jax.Array, c_train_of,
                       m_meta: jax.Array, w_meta: jax.Array, *, inner_lr: float) -> jax.Array:
  """``H [T, T]``: ``H[t, j] = d F_t(theta'(alpha)) / d alpha_j``, exactly.

  ``theta'(alpha) = theta - inner_lr pullback(c_train_of(alpha))`` (one SGD
  step of the lower level, ``pullback`` the inner draw's VJP at ``theta``,
  ``c_train_of(alpha)`` its slot weights, linear in ``softmax(alpha)``);
  ``F_t(p) = (m_meta @ (w_meta * loss_at_meta(p)))_t``, task t's mean loss on
  the outer draw (times its fixed weight; 0 for a task without a slot there).
  ``jax.jacrev`` of that map: T vector-Jacobian products (vmapped), each a
  backward of the outer draw at ``theta'`` and the transpose of the inner
  draw's pullback -- for one SGD step exactly LibMTL's ``-inner_lr g_F_t
  g_f^T J_softmax(alpha)`` (the mixed second derivative of the weighted inner
  loss is ``g_f^T J_softmax``: no second derivative of the model enters)."""

  def upper(a):
    g = pullback(c_train_of(a))
    p = jax.tree.map(lambda x, d: x - inner_lr * d.astype(x.dtype), theta, g)
    return m_meta @ (w_meta * loss_at_meta(p))

  return jax.jacrev(upper)(alpha)


def normalize_rows(h: jax.Array, losses: jax.Array, how: str) -> jax.Array:
  """LibMTL's ``MGDA._gradient_normalizers``: each row of ``h`` divided by its
  l2 norm (``"l2"``), its objective's loss (``"loss"``), both (``"loss+"``) or
  nothing; a divisor of 0 (a zero row, an absent objective) leaves the row as
  it is (LibMTL would divide by 0)."""
  norm = jnp.sqrt(jnp.sum(h * h, axis=1))
  div = {"l2": norm, "loss": losses, "loss+": losses * norm,
         "none": jnp.ones_like(norm)}[how]
  return h / jnp.where(div > 0, div, 1.0)[:, None]


def _draws_of(lin: jacobians.Linearized, inp: Inputs, num_tasks: int, draws: int,
              name: str):
  """``(task_ids, n, dtype, w, M, active)`` of a step of ``draws`` draws of
  ``n`` slots each: the slots' weights ``w`` and :func:`draw_means`' ``M``
  in the losses' dtype. Raises unless the linearisation carries the
  parameters a look-ahead steps from."""
  if lin.params is None:
    raise ValueError(f"{name}: the linearisation carries no parameters "
                     "(Linearized.params) to take the look-ahead step from.")
  ids = inp.task_ids
  dtype = lin.losses.dtype
  w = inp.weights[ids].astype(dtype)
  m, active = draw_means(ids, w > 0, num_tasks, draws)
  return ids, ids.shape[0] // draws, dtype, w, m.astype(dtype), active


def moml(num_tasks: int, *, lr: float = 1e-3, inner_lr: float = 0.1,
         normalize: str = "l2") -> Objective:
  """MOML (Ye et al., NeurIPS 2021) in the multi-task setting as LibMTL runs
  it: the upper-level variables are task-weight logits ``alpha [T]`` (state,
  init ``1/T``; the model trains on ``sum_i softmax(alpha)_i w_i L_i``), the
  lower level one SGD step of the model on the inner batch, the upper level
  the T tasks' losses on the outer batch, each a separate objective.

  Per step (three independent draws of the step's tasks,
  :attr:`Objective.draws` = 3: the inner batch in slots ``0 .. K - 1``, the
  outer in ``K .. 2K - 1``, the model's in ``2K .. 3K - 1``; LibMTL's inner
  and outer batches are half-size draws of the training loader, its model
  batch a full-size one; here all three have the run's batch size):

  1. ``H [T, T]``, the exact hypergradient of each upper objective through
     the look-ahead ``theta' = theta - inner_lr grad_theta sum_i
     softmax(alpha)_i w_i L_i(theta; inner)`` (:func:`moml_hypergradient`);
  2. MGDA on its rows: normalised (``normalize``, LibMTL's ``'l2'``), the
     min-norm point of their convex hull (:func:`mtljax.gradients.min_norm.
     mgda_weights`, exact; LibMTL runs Frank-Wolfe to 1e-5) over the tasks
     present in the outer draw, ``g_alpha = beta @ H_normalised``;
  3. ``alpha`` takes one torch-Adam step (``lr``, LibMTL's ``outer_lr``) on it;
  4. the model takes the optimizer's step on ``sum_i softmax(alpha')_i w_i
     L_i(theta; model batch)`` with the updated weights.

  Task sampling (beyond the paper and LibMTL, whose steps hold every task):
  the softmax runs over all T logits (an absent task's weight multiplies no
  loss); the upper objectives are the tasks with a labelled slot in the
  outer draw; ``alpha`` moves (every entry: the softmax couples them) when
  the outer draw has one and the inner draw any, else it and its Adam state
  stay. With every task every step this is LibMTL's update.

  Args:
    lr: Adam rate of ``alpha`` (LibMTL ``--outer_lr``, 1e-3).
    inner_lr: the look-ahead SGD rate (LibMTL ``--inner_lr``, 0.1; LibMTL
      supports ``inner_step = 1`` only for MOML, as here).
    normalize: the hypergradients' normaliser before the min-norm solve, one
      of ``"l2"`` (LibMTL's), ``"loss"``, ``"loss+"``, ``"none"``.
  """
  check_hparam("moml", lr > 0 and inner_lr > 0,
               f"lr and inner_lr must be > 0, got {lr}, {inner_lr}")
  if normalize not in MOML_NORMALIZERS:
    raise ValueError(f"moml: normalize={normalize!r} is not one of {MOML_NORMALIZERS}.")
  solve = gram.without_absent_slots(lambda k, rng: min_norm.mgda_weights(k))

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    ids, n, dtype, w, m, active = _draws_of(lin, inp, num_tasks, MOML_DRAWS, "moml")
    inner, outer, model = slice(0, n), slice(n, 2 * n), slice(2 * n, 3 * n)
    # The inner and the model draws' own VJPs (one forward of n slots each):
    # a pullback of the step's 3n-slot linearisation with zero weights
    # elsewhere would run backward through every draw's examples.
    _, vjp_inner = jax.vjp(lambda p: lin.loss_at(p, inner), lin.params)
    _, vjp_model = jax.vjp(lambda p: lin.loss_at(p, model), lin.params)

    def c_train_of(a):
      return slot_coefficients(jax.nn.softmax(a), m[0], w[inner])

    st = inp.state
    alpha = st["alpha"].astype(dtype)
    h = moml_hypergradient(lambda c: vjp_inner(c)[0], lin.params,
                           lambda p: lin.loss_at(p, outer), alpha, c_train_of, m[1], w[outer],
                           inner_lr=inner_lr)
    present = active[1]
    upper_losses = m[1] @ (w[outer] * lin.losses[outer])
    hn = normalize_rows(h, upper_losses, normalize)
    beta, _ = solve(hn @ hn.T, inp.rng, present)
    g_alpha = (beta @ hn).astype(st["alpha"].dtype)
    moves = jnp.any(present) & jnp.any(active[0])
    a_new, mom, vel, count = adam_step(st["alpha"], st["m"], st["v"], st["count"], g_alpha,
                                       jnp.full((num_tasks,), moves), lr)
    c = slot_coefficients(jax.nn.softmax(a_new.astype(dtype)), m[2], w[model])
    meas = {"objective_lambda_sum": jax.nn.softmax(a_new),
            "objective_meta_grad_sum": jnp.where(moves, g_alpha, 0.0)}
    return Result(jnp.sum(c * lin.losses[model]), vjp_model(c)[0],
                  {"alpha": a_new, "m": mom, "v": vel, "count": count}, meas)

  def init_state():
    return {"alpha": jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32),
            "m": jnp.zeros((num_tasks,), jnp.float32), "v": jnp.zeros((num_tasks,), jnp.float32),
            "count": jnp.zeros((num_tasks,), jnp.int32)}

  return Objective("moml", "sum", grads_fn, init_state=init_state,
                   hparams={"lr": lr, "inner_lr": inner_lr, "normalize": normalize},
                   draws=MOML_DRAWS)


# ---------------------------------------------------------------------------
# FORUM (Ye, Lin, Zhang et al., "A First-Order Multi-Gradient Algorithm for
# Multi-Objective Bi-Level Optimization", ECAI 2024), as LibMTL's trainer
# runs it (``bacth_forward_FORUM``).
# ---------------------------------------------------------------------------

FORUM_DRAWS = 2          # the inner (lower-level) batch and the outer (upper-level) batch
FORUM_LOSS_CAP = 1e5     # LibMTL stops the inner loop when the inner loss exceeds it


def _tree_dot(a, b) -> jax.Array:
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def forum_qp(kff: jax.Array, k: jax.Array, kqq: jax.Array, pi: jax.Array, c: jax.Array,
             present: jax.Array):
  """LibMTL's FORUM subproblem, exactly: over ``w = (s [T], u)``,

    min  w^T K w - c u   s.t.  sum s = 1, s >= 0, u >= 0, u >= pi . s,

  ``K = [[kff, k], [k^T, kqq]]`` (the Gram matrix of the unit outer gradients
  and ``g_q``); ``s_t = 0`` for the tasks not ``present``. A convex QP in
  ``T + 1`` variables, solved by enumerating the active sets: each
  (zero set of ``s``) x (``u`` free / ``u = 0`` / ``u = pi . s``) is one
  equality-constrained KKT system (all solved at once); the optimum is the
  feasible candidate of least objective (it is one of them, and every other
  feasible point costs at least as much). Returns ``(s, u, found)``."""
  t = kff.shape[0]
  dtype = kff.dtype
  kk = jnp.block([[kff, k[:, None]], [k[None, :], kqq[None, None]]])
  p = 2.0 * kk
  q = jnp.zeros((t + 1,), dtype).at[t].set(-c)
  # Constraint rows over z = (s, u): sum s = 1; s_i >= 0; u >= 0; u - pi.s >= 0.
  a = jnp.concatenate([
      jnp.concatenate([jnp.ones((1, t), dtype), jnp.zeros((1, 1), dtype)], axis=1),
      jnp.eye(t, t + 1, dtype=dtype),
      jnp.zeros((1, t + 1), dtype).at[0, t].set(1.0),
      jnp.concatenate([-pi[None, :], jnp.ones((1, 1), dtype)], axis=1)])
  b = jnp.zeros((t + 3,), dtype).at[0].set(1.0)
  zero_sets = ((jnp.arange(2 ** t)[:, None] >> jnp.arange(t)[None, :]) & 1).astype(bool)
  zero_sets = jnp.repeat(zero_sets, 3, axis=0)
  modes = jnp.tile(jnp.arange(3), 2 ** t)     # 0: u free, 1: u = 0, 2: u = pi . s
  active = jnp.concatenate([jnp.ones((zero_sets.shape[0], 1), bool), zero_sets,
                            (modes == 1)[:, None], (modes == 2)[:, None]], axis=1)
  n = t + 1

  def candidate(act):
    rows = jnp.where(act[:, None], a, 0.0)
    m = jnp.block([[p, a.T], [rows, jnp.diag(jnp.where(act, 0.0, 1.0)).astype(dtype)]])
    rhs = jnp.concatenate([-q, jnp.where(act, b, 0.0)])
    return jnp.linalg.solve(m, rhs)[:n]

  z = jax.vmap(candidate)(active)
  s, u = z[:, :t], z[:, t]
  scale = jnp.maximum(jnp.max(jnp.abs(z), axis=1), 1.0)
  tol = 1e-6 if dtype == jnp.float64 else 1e-4
  # Feasible: every constraint, the active ones as equalities (a singular
  # system's solution may not meet them).
  slack = z @ a.T - b                                               # [C, T + 3]
  ok = (jnp.all(jnp.isfinite(z), axis=1)
        & jnp.all(jnp.where(active, jnp.abs(slack), 0.0) <= tol * scale[:, None], axis=1)
        & jnp.all(slack[:, 1:] >= -tol * scale[:, None], axis=1)
        & jnp.all(zero_sets | present[None, :], axis=1))
  obj = jnp.einsum("ci,ij,cj->c", z, kk, z) - c * u
  best = jnp.argmin(jnp.where(ok, obj, jnp.inf))
  s_best = jnp.where(present, jnp.maximum(s[best], 0.0), 0.0)
  return s_best, jnp.maximum(u[best], 0.0), jnp.any(ok)


def forum(num_tasks: int, *, lr: float = 1e-3, inner_lr: float = 0.1, inner_steps: int = 5,
          phi: float = 0.1, ema_period: int = 1) -> Objective:
  """FORUM (Ye et al., ECAI 2024) in the multi-task setting as LibMTL runs
  it: the upper-level variables are softmax task-weight logits ``alpha``
  (state, init ``1/T``), the lower level ``f(alpha, omega) = sum_i
  softmax(alpha)_i w_i L_i(omega; inner batch)``, the upper objectives the
  T tasks' losses ``F_t(omega; outer batch)``. First order: the bilevel
  problem becomes ``min F(omega)`` s.t. ``q(alpha, omega) = f(alpha, omega)
  - f(alpha, omega^K) <= 0`` (``omega^K`` after ``inner_steps`` SGD steps on
  ``f(alpha, .)``, a stand-in for the value function), and each step moves
  ``(alpha, omega)`` along ``sum_t lambda_t g_F_t / |g_F_t| + nu g_q``.

  Per step (two independent draws, :attr:`Objective.draws` = 2: the inner
  batch in slots ``0 .. K - 1``, the outer in ``K .. 2K - 1``):

  1. ``g_f = (d_alpha f, d_omega f)`` at ``(alpha, omega)``; ``omega^K`` by
     ``inner_steps`` SGD steps (``inner_lr``; stopped early where the inner
     loss exceeds 1e5, as LibMTL); ``g_q = g_f - (d_alpha f(alpha,
     omega^K), 0)``;
  2. the outer per-task gradients ``g_F_t`` (unit norm);
     ``pi_t = phi - <g_q, g_F_t> / (|g_q|^2 + 1e-8)``;
  3. ``(s, u)`` from LibMTL's QP (:func:`forum_qp`);
  4. ``lambda <- lambda + mu (s - lambda)``, ``mu = (e + 1)^(-3/4)`` with
     ``e`` the LibMTL epoch: this objective's step count over
     ``ema_period`` (LibMTL counts epochs: set ``ema_period`` to the steps
     of one; 1, a per-step schedule); ``nu = max(lambda . pi, 0)``;
  5. ``alpha`` takes an Adam step (``lr``) on ``nu (d_alpha f(alpha, omega)
     - d_alpha f(alpha, omega^K))``, the model the run's optimizer step on
     ``sum_t lambda_t g_F_t / |g_F_t| + nu d_omega f``.

  Task sampling (beyond the paper and LibMTL): tasks without a labelled
  slot in the outer draw are no objectives (``s_t = 0``, their ``pi_t``
  unused); ``lambda`` and ``alpha`` move only in steps with an objective.

  Args:
    lr: Adam rate of ``alpha`` (``--outer_lr``, 1e-3).
    inner_lr: the inner SGD rate (``--inner_lr``, 0.1).
    inner_steps: inner SGD steps for ``omega^K`` (``--inner_step``, 5).
    phi: ``--FORUM_phi`` (0.1).
    ema_period: steps per LibMTL epoch for ``mu``'s clock (module text).
  """
  check_hparam("forum", lr > 0 and inner_lr > 0 and phi > 0,
               f"lr, inner_lr and phi must be > 0, got {lr}, {inner_lr}, {phi}")
  check_hparam("forum", isinstance(inner_steps, int) and inner_steps >= 1,
               f"inner_steps must be an integer >= 1, got {inner_steps!r}")
  check_hparam("forum", isinstance(ema_period, int) and ema_period >= 1,
               f"ema_period must be an integer >= 1, got {ema_period!r}")
  check_hparam("forum", num_tasks <= 10,
               f"the QP solver enumerates 3 * 2^T active sets: at most 10 tasks, got "
               f"{num_tasks}")

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    ids, n, dtype, w, m, active = _draws_of(lin, inp, num_tasks, FORUM_DRAWS, "forum")
    inner, outer = slice(0, n), slice(n, 2 * n)
    st = inp.state
    alpha = st["alpha"].astype(dtype)

    def c_of(a):
      return slot_coefficients(jax.nn.softmax(a), m[0], w[inner])

    def f_alpha(slot_losses):  # d_alpha of sum_k c_k(alpha) L_k, L fixed
      return jax.grad(lambda a: jnp.sum(c_of(a) * slot_losses))(alpha)

    c = c_of(alpha)
    _, vjp_inner = jax.vjp(lambda p: lin.loss_at(p, inner), lin.params)
    gf_omega = vjp_inner(c)[0]
    gf_alpha = f_alpha(lin.losses[inner])

    def inner_step(_, carry):
      p, stopped = carry
      val, g = jax.value_and_grad(lambda p: jnp.sum(c * lin.loss_at(p, inner)))(p)
      stopped = stopped | (val > FORUM_LOSS_CAP)
      p = jax.tree.map(lambda x, d: jnp.where(stopped, x, x - inner_lr * d.astype(x.dtype)),
                       p, g)
      return p, stopped

    omega_k, _ = jax.lax.fori_loop(0, inner_steps, inner_step,
                                   (lin.params, jnp.zeros((), bool)))
    gq_alpha = gf_alpha - f_alpha(lin.loss_at(omega_k, inner))

    _, vjp_outer = jax.vjp(lambda p: lin.loss_at(p, outer), lin.params)
    gF = jax.vmap(lambda r: vjp_outer(r)[0])(m[1] * w[outer][None, :])   # [T, ...]
    leaves = [x.reshape(num_tasks, -1) for x in jax.tree.leaves(gF)]
    raw = sum(x @ x.T for x in leaves)                                   # [T, T]
    norms = jnp.sqrt(jnp.maximum(jnp.diag(raw), 0.0))
    inv = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
    kff = raw * inv[:, None] * inv[None, :]
    gf_flat = [x.reshape(-1) for x in jax.tree.leaves(gf_omega)]
    k = sum(x @ y for x, y in zip(leaves, gf_flat)) * inv
    kqq = jnp.sum(gq_alpha * gq_alpha) + _tree_dot(gf_omega, gf_omega)
    pi = phi - k / (kqq + 1e-8)
    present = active[1]
    s, _, found = forum_qp(kff, k, kqq, pi, phi * (kqq + 1e-8), present)

    moves = jnp.any(present)
    epoch = (st["steps"] // ema_period).astype(dtype)
    mu = (epoch + 1.0) ** -0.75
    lam = st["lambda"].astype(dtype)
    lam_new = jnp.where(moves, lam + mu * (s - lam), lam)
    nu = jnp.maximum(jnp.sum(jnp.where(present, lam_new * pi, 0.0)), 0.0)
    coef = jnp.where(present, lam_new, 0.0) * inv
    direction = jax.tree.map(
        lambda g, d: jnp.tensordot(coef.astype(g.dtype), g, axes=1) + nu.astype(d.dtype) * d,
        gF, gf_omega)
    g_alpha = (nu * gq_alpha).astype(st["alpha"].dtype)
    a_new, mom, vel, count = adam_step(st["alpha"], st["m"], st["v"], st["count"], g_alpha,
                                       jnp.full((num_tasks,), moves), lr)
    meas = {"objective_lambda_sum": lam_new.astype(jnp.float32),
            "objective_meta_grad_sum": jnp.where(moves, g_alpha, 0.0),
            "objective_qp_failures": jnp.where(moves & ~found, 1.0, 0.0)}
    total = jnp.sum(m[1] @ (w[outer] * lin.losses[outer]))
    return Result(total, direction,
                  {"alpha": a_new, "m": mom, "v": vel, "count": count,
                   "lambda": lam_new.astype(st["lambda"].dtype),
                   "steps": st["steps"] + moves.astype(st["steps"].dtype)}, meas)

  def init_state():
    return {"alpha": jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32),
            "m": jnp.zeros((num_tasks,), jnp.float32), "v": jnp.zeros((num_tasks,), jnp.float32),
            "count": jnp.zeros((num_tasks,), jnp.int32),
            "lambda": jnp.zeros((num_tasks,), jnp.float32), "steps": jnp.zeros((), jnp.int32)}

  return Objective("forum", "sum", grads_fn, init_state=init_state,
                   hparams={"lr": lr, "inner_lr": inner_lr, "inner_steps": inner_steps,
                            "phi": phi, "ema_period": ema_period}, draws=FORUM_DRAWS)
