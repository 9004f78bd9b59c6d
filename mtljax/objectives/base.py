"""The objective interface: :class:`Objective`, what it sees in a step
(:class:`Inputs`) and what it returns (:class:`Result`), and binding a state
shaped like the shared parameters (:func:`bind_shared`)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp



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


def no_state() -> dict:
  return {}


def keep_state(state, losses, task_ids, new_losses):
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
    min_slots: the fewest task slots per step the method takes (Krum's
      ``n_byzantine + 3``, the trimmed mean's ``2 trim_number + 1``); the
      train step checks ``sampling.tasks_per_step`` against it before tracing.
    draws: independent mini-batches of the step's tasks the method reads per
      step (1; MoDo and SDMGrad: 3, double sampling). With ``D > 1`` the step
      draws them (:func:`mtljax.data.sampling.sample_draws`; the sampler is
      made with ``draws=D``) and linearises them as one batch of ``D K``
      slots, draw d in slots ``d K .. (d + 1) K - 1``: ``lin.losses [D K]``,
      ``inputs.task_ids [D K]`` (the K tasks repeated per draw).
  """
  name: str
  needs: str
  gradients: Callable
  init_state: Callable = no_state
  init_params: Callable = no_state
  after_update: Callable = keep_state
  needs_new_losses: bool = False
  slot_leaves: Callable | None = None
  hparams: dict = dataclasses.field(default_factory=dict)
  init_shared_state: Callable | None = None
  min_slots: int = 1
  draws: int = 1


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


def unbound_state(name: str) -> Callable:
  def init():
    raise ValueError(
        f"objective {name!r} keeps per-task gradients shaped like the shared parameters "
        f"in its state: bind it first, objectives.bind_shared(objective, params['shared']) "
        f"(or their jax.eval_shape).")
  return init

def check_hparam(name: str, ok: bool, what: str) -> None:
  if not ok:
    raise ValueError(f"{name}: {what}.")
