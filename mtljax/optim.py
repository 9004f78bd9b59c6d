"""Optimizers (optax) and the per-task update rule.

``make_optimizer`` builds one optax ``GradientTransformation`` from explicit
arguments (``*_from_config`` in the loop reads the config).

The update of a multi-task parameter tree (:func:`init_state`, :func:`update`):

* ``shared`` gets one optimizer state, updated every step;
* each stacked subtree of ``tasks`` (a model's ``task_rows``) gets
  ``vmap(tx.init)``: one independent optimizer state *per task row*, including
  Adam's step count. A row whose task was not sampled this step keeps its
  parameters and its whole optimizer state bitwise unchanged; a sampled row is
  updated by its own state. So a task's head behaves exactly as if trained by
  its own Adam on the steps its task was sampled (Adam's bias correction counts
  that task's updates) -- the fix for "Adam keeps moving heads of tasks that
  were not sampled".

One consequence, by design: transformations that look across leaves (global
norm clipping) see the shared tree and each task row separately.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtljax import params as params_lib

OPTIMIZERS = ("adam", "adamw", "sgd")


def make_optimizer(name: str = "adam", *, lr: float = 1e-3, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                   momentum: float = 0.0) -> optax.GradientTransformation:
  if name not in OPTIMIZERS:
    raise ValueError(f"config.optim.name={name!r} is not one of {OPTIMIZERS}.")
  if not lr > 0:
    raise ValueError(f"config.optim.lr must be > 0, got {lr}.")
  if name == "adam":
    return optax.adam(lr, b1=b1, b2=b2, eps=eps)
  if name == "adamw":
    return optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  return optax.sgd(lr, momentum=momentum or None)


def _check_rows(params, task_rows):
  covered = set(task_rows)
  for name, _ in params_lib.flatten_with_names(params["tasks"]):
    if not any(name == c or name.startswith(c + "/") for c in covered):
      raise ValueError(f"per-task parameter tasks/{name} is in no task stack "
                       f"{sorted(covered)}.")


def _nested_set(tree: dict, path: str, value):
  parts = path.split("/")
  node = tree
  for p in parts[:-1]:
    node = node.setdefault(p, {})
  node[parts[-1]] = value


def init_state(tx: optax.GradientTransformation, params, task_rows) -> dict:
  """``{"shared": state, "tasks": {stack path (nested): vmapped state}}``."""
  _check_rows(params, task_rows)
  tasks_state = {}
  for name in task_rows:
    _nested_set(tasks_state, name, jax.vmap(tx.init)(
        params_lib.get_path(params["tasks"], name)))
  return {"shared": tx.init(params["shared"]), "tasks": tasks_state}


def _select_rows(mask, new, old):
  def sel(a, b):
    return jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
  return jax.tree.map(sel, new, old)


def update(tx: optax.GradientTransformation, grads, opt_state, params, task_rows,
           active: jax.Array):
  """One optimizer step; rows of tasks with ``active[t] == False`` don't move.

  Args:
    active: ``[T]`` bool, the tasks sampled in this step.

  Returns:
    (new_params, new_opt_state)
  """
  upd, shared_state = tx.update(grads["shared"], opt_state["shared"], params["shared"])
  new_params = {"shared": optax.apply_updates(params["shared"], upd),
                "tasks": params["tasks"]}
  new_tasks_state = {}
  for name, rows in task_rows.items():
    p = params_lib.get_path(params["tasks"], name)
    g = params_lib.get_path(grads["tasks"], name)
    s = params_lib.get_path(opt_state["tasks"], name)
    u, s_new = jax.vmap(tx.update)(g, s, p)
    mask = active[jnp.asarray(rows)]
    p_new = _select_rows(mask, optax.apply_updates(p, u), p)
    new_params["tasks"] = params_lib.set_path(new_params["tasks"], name, p_new)
    _nested_set(new_tasks_state, name, _select_rows(mask, s_new, s))
  return new_params, {"shared": shared_state, "tasks": new_tasks_state}
