"""Bilevel task weighting: Auto-lambda and MOML.

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
    if lin.params is None:
      raise ValueError("moml: the linearisation carries no parameters "
                       "(Linearized.params) to take the look-ahead step from.")
    ids = inp.task_ids
    n = ids.shape[0] // MOML_DRAWS
    dtype = lin.losses.dtype
    w = inp.weights[ids].astype(dtype)
    m, active = draw_means(ids, w > 0, num_tasks, MOML_DRAWS)
    m = m.astype(dtype)
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
