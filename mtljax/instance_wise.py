"""Instance-wise risk minimisation (IWRM): every example's loss is an objective.

Quinton & Rey (2024, "Jacobian descent for multi-objective optimization",
section 5; TorchJD's IWRM example) train one model on the vector of per-example
losses ``[L_1, ..., L_B]`` instead of their mean: the update is
``d = sum_i beta_i grad L_i`` with ``beta`` from an aggregator of the
per-example Jacobian ``J [B, D]`` -- UPGrad by default, which never conflicts
with any example (``J d >= 0``). Averaging the losses is the special case
``beta_i = 1 / B``.

This is the gradient methods' own path with rows that are examples, not tasks:
the Jacobian is a pytree with a leading example axis, its Gram matrix, weights
and direction come from :func:`mtljax.gradients.direction` with any registered
:class:`~mtljax.gradients.GramMethod`. The per-example gradients are a ``vmap``
over examples of one example's gradient with the parameters unbatched (the
forward of the ``B`` examples runs as one batch; each backward touches its own
example), all inside one ``jit``.

The loss function is ``loss_fn(params, batch) -> [B]`` per-example losses for
any pytree ``batch`` whose leaves have a leading example axis;
:func:`model_example_losses` builds it for one task of a
:class:`mtljax.models.multitask.Model`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from mtljax import gradients
from mtljax import tasks as tasks_lib
from mtljax.models import multitask


def example_jacobian(loss_fn: Callable, params, batch) -> tuple[jax.Array, object]:
  """``(losses [B], J)``: the per-example losses and their gradients, ``J`` a
  pytree like ``params`` with a leading ``[B]`` axis (row i: ``grad L_i``)."""
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("example_jacobian: the batch has no arrays.")
  b = leaves[0].shape[0]
  if any(leaf.shape[:1] != (b,) for leaf in leaves):
    raise ValueError(f"example_jacobian: every batch leaf needs the example axis first "
                     f"({b}), got shapes {[leaf.shape for leaf in leaves]}.")

  def one(example):
    def loss(p):
      out = loss_fn(p, jax.tree.map(lambda a: a[None], example))
      return out[0]
    return jax.value_and_grad(loss)(params)
  return jax.vmap(one)(batch)


def direction(loss_fn: Callable, params, batch, *, method: str = "upgrad",
              rng: jax.Array | None = None, **hparams):
  """``(d, info)``: the IWRM update direction (a pytree like ``params``) and
  ``info`` = ``{"losses" [B], "weights" [B], **the method's info}``."""
  losses, jac = example_jacobian(loss_fn, params, batch)
  d, beta, info = gradients.direction(method, jac, rng=rng, **hparams)
  return d, {"losses": losses, "weights": beta, **info}


def make_step(loss_fn: Callable, tx: optax.GradientTransformation, *,
              method: str = "upgrad", **hparams) -> Callable:
  """``step(params, opt_state, batch, rng=None) -> (params, opt_state, info)``
  (not jitted): one optimizer step on the IWRM direction (a descent direction:
  it goes to ``tx`` as the gradient). ``method`` and ``hparams`` (names and
  values) are checked here, before anything is traced."""
  m = gradients.get(method)
  m.bind(**hparams)  # checks the names and values (one trace on a 2 x 2 problem)

  def step(params, opt_state, batch, rng=None):
    if m.takes_rng and rng is None:
      raise ValueError(f"IWRM with {method} needs a random key: pass rng.")
    d, info = direction(loss_fn, params, batch, method=method, rng=rng, **hparams)
    updates, opt_state = tx.update(d, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, info
  return step


def model_example_losses(model: multitask.Model, task: str) -> Callable:
  """``loss_fn(params, (x [B, ...], y [B])) -> [B]``: each example's training
  loss (:func:`mtljax.tasks.example_loss`) for task ``task`` of ``model``, the
  model run on the ``B`` examples as one slot. Regression labels are the
  normalised ones the data layout holds. An unlabelled example
  (:func:`mtljax.tasks.missing_label`) has loss 0 and a zero gradient row,
  which UPGrad ignores (its preference weight ``1 / B`` still counts it)."""
  ts = model.taskset
  if task not in ts.names:
    raise ValueError(f"model_example_losses: task {task!r} is not one of {ts.names}.")
  if model.stateful:
    raise ValueError(f"model_example_losses: arch {model.arch!r} has model state (batch "
                     "norm, whose batch statistics couple the examples' losses, or ltb's "
                     "branch sampler); per-example losses need a model without state (e.g. "
                     "normalization='group', not ltb).")
  tid = ts.names.index(task)
  t = ts.tasks[tid]

  def loss_fn(params, batch):
    x, y = batch
    out = model.apply(params, x[None], jnp.asarray([tid], jnp.int32))[t.group][0]
    return jnp.where(tasks_lib.label_mask(t, y), tasks_lib.example_loss(t, out, y), 0.0)
  return loss_fn
