"""Auto-lambda (Liu, Davison & Johns, "Auto-Lambda: Disentangling Dynamic
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
