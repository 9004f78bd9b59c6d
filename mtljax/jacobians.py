"""Per-task losses and their gradients from one linearisation of the batch.

Depending on its objective method (:mod:`mtljax.objectives`), a step needs one of

* the gradient of a weighted sum of the slots' losses, ``sum_k c_k L_k``
  (equal weighting and every loss weighting, with ``c = d objective / d L``);
* the per-slot gradients of the shared parameters, ``G [K, ...]`` with row
  ``c_k grad_sh L_k`` (gradient-combination methods; GradNorm on one layer; TAG);
* the per-slot gradients of the shared representation, ``dZ [K, ...]`` (MGDA-UB).

:func:`linearize` runs the model forward **once** on the batch and returns a
:class:`Linearized` whose functions produce each of these with backward passes
only -- never one forward per task. Two paths:

* **One trunk pass** (:attr:`Batch.shared`: every slot reads the same ``B``
  examples, and the model has a task-independent part, ``model.encode``)::

      Z, J_enc^T = vjp(encode, theta^sh)          # the trunk, once, on B examples
      L [K]      = slot_losses(decode(theta^tasks, [Z] * K, x, ids))

  The weighted-sum gradient is one backward through the per-task part and one
  through the trunk. Per-slot gradients: every slot's ``dZ_k = c_k dL_k/dZ``
  (``[K, ...]``) is a ``vmap`` over slots of one slot's gradient with respect
  to the one, unbatched Z, and the per-slot shared gradients are
  ``G_k = J_enc^T dZ_k``: K trunk backwards through the one trunk
  linearisation. (Reading one Z without per-slot copies is what makes the
  weighted-sum path fast: on XLA:CPU the heads' backward through ``[K, B, F]``
  copies costs 3-8x more.)
* **Per slot** (distinct examples per slot, or no task-independent part):
  ``model.apply`` on ``x [K, B, ...]``, one VJP for the weighted sum and the
  task parameters. Per-slot shared gradients are ``vmap`` over slots of one
  slot's gradient with the shared weights unbatched: the vmapped forward is the
  forward of the ``K B`` examples (run a second time, besides the VJP's), and
  each slot's backward touches only its own examples -- O(K B) work, like one backward of the summed loss (a
  vmapped VJP of all slots' losses would cost O(K^2 B), and per-slot copies of
  the weights would hold ``K`` times the parameters and run batched matmuls).

Both paths give the same losses and gradients (tested against K separate
``jax.grad`` calls, and the one-pass step against the per-slot step).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from mtljax import gradients
from mtljax import params as params_lib
from mtljax import tasks as tasks_lib
from mtljax.models import multitask

# What an objective asks the step to linearise (Objective.needs).
NEEDS = ("sum", "slots", "representation")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("x", "ys", "task_ids"), meta_fields=("shared",))
@dataclasses.dataclass(frozen=True)
class Batch:
  """One step's examples: ``x [K, B, ...]`` (per slot) or ``[B, ...]`` (shared by
  every slot, ``shared=True``, static), labels ``ys {group: [K, B]}``, and
  ``task_ids [K]``."""
  x: jax.Array
  ys: dict
  task_ids: jax.Array
  shared: bool


class Linearized(NamedTuple):
  """The slots' losses at the current parameters and ways to differentiate them.

  Attributes:
    losses: ``[K]``, each slot's mean loss.
    pullback: ``c [K] -> {"shared", "tasks"}``, the gradient of ``sum_k c_k L_k``.
    slot_grads: ``c [K] -> (G, task_grads)``: ``G`` is the shared tree with
      ``[K, ...]`` leaves (row k is ``c_k grad L_k``; leaves not selected by
      ``slot_leaves`` are None), ``task_grads`` the per-task parameters'
      gradient of ``sum_k c_k L_k``. None when not linearised for it.
    rep_grads: ``c [K] -> (dZ, task_grads)``, ``dZ`` the representation's tree
      with ``[K, ...]`` leaves (one-pass path only, else None).
    rep_pullback: ``dZ -> shared grads`` for a representation cotangent without
      slot axis (one-pass path only, else None).
    slot_gram: ``c [K] -> (G G^T [K, K], task_grads)`` without holding ``G``:
      each parameter's ``[K, ...]`` slot gradients are reduced into the Gram
      matrix as one batched backward produces them (the memory-light path).
    rep_gram: ``c [K] -> (dZ dZ^T [K, K], task_grads)``, the Gram matrix of the
      per-slot representation gradients (one-pass path only, else None);
      without forming ``dZ`` when the model's per-task part is linear heads
      (:attr:`mtljax.models.multitask.Model.rep_heads`) and that is cheaper.
    loss_at: ``(params, slots=None) -> [K]``, the slots' losses on the same
      batch (forward only; a model with state runs in train mode on the state
      given to :func:`linearize`, its updates dropped). ``slots``, a static
      ``slice``: only those slots' losses (on the per-slot path only their
      examples are run; Auto-lambda's look-ahead reads one draw's slots).
    one_pass: whether the trunk ran once for every slot.
    model_state: a model with state (:attr:`mtljax.models.multitask.Model.init_state`):
      the state after this forward in train mode (batch-norm running averages
      updated once, from the one forward the losses come from -- never by the
      per-slot backwards); None for a model without.
    params: the parameters linearised at (``{"shared", "tasks"}``), for
      objectives that step away from them (Auto-lambda's look-ahead step).
  """
  losses: jax.Array
  pullback: Callable
  slot_grads: Callable | None
  rep_grads: Callable | None
  rep_pullback: Callable | None
  loss_at: Callable
  one_pass: bool
  slot_gram: Callable | None = None
  rep_gram: Callable | None = None
  model_state: Any = None
  params: Any = None


SLOT_BACKWARDS = ("auto", "map", "vmap")


def sequential_backwards(slot_backwards: str = "auto") -> bool:
  """Whether the one-pass path runs its K trunk backwards as a loop
  (``lax.map``, ``"map"``) rather than one batched backward (``vmap``).

  ``"auto"``: a loop on CPU, where XLA runs the batched weight-gradient products
  of a vmapped backward about 1.5-2x slower than K plain ones
  (experiments/bench_objectives.py, BUILD_NOTES.md), and ``vmap`` on
  accelerators, where the batched products fill the device.
  """
  if slot_backwards not in SLOT_BACKWARDS:
    raise ValueError(f"slot_backwards={slot_backwards!r} is not one of "
                     f"{SLOT_BACKWARDS}.")
  if slot_backwards == "auto":
    return jax.default_backend() == "cpu"
  return slot_backwards == "map"


def can_run_once(model: multitask.Model, batch: Batch) -> bool:
  """Whether the one-trunk-pass path applies to this model and batch."""
  return batch.shared and model.encode is not None


def linearize(model: multitask.Model, params: dict, batch: Batch, *, needs: str = "sum",
              slot_leaves: Sequence[str] | None = None, one_pass: bool | None = None,
              slot_backwards: str = "auto", model_state=None) -> Linearized:
  """Linearises the slots' losses at ``params`` (module docstring).

  Args:
    needs: ``"sum"`` (only ``pullback``), ``"slots"`` (also per-slot shared
      gradients) or ``"representation"`` (per-slot representation gradients;
      needs the one-pass path).
    slot_leaves: with ``needs="slots"``, the slash paths (relative to
      ``shared/``) of the leaves ``G`` holds (None: every shared leaf).
    one_pass: force the path (None: one pass whenever :func:`can_run_once`).
    slot_backwards: how the one-pass path runs its K trunk backwards
      (:func:`sequential_backwards`).
    model_state: the model's state (a model with ``init_state``; None
      without): the forward runs in train mode and ``Linearized.model_state``
      is the updated state. On the per-slot path a shared trunk's batch
      statistics are each slot's own (slot k's loss reads only its own
      examples, so the per-slot gradients stay separable); the model
      averages the slots' updates.
  """
  sequential_backwards(slot_backwards)  # a bad name fails before tracing
  if needs not in NEEDS:
    raise ValueError(f"linearize: needs={needs!r} is not one of {NEEDS}.")
  possible = can_run_once(model, batch)
  one_pass = possible if one_pass is None else one_pass
  if one_pass and not possible:
    raise ValueError(f"the one-trunk-pass step needs every slot to read the same examples "
                     f"(Batch.shared=True) and an architecture with a "
                     f"task-independent part; arch {model.arch!r} with shared inputs "
                     f"{batch.shared} has none.")
  if needs == "representation" and not one_pass:
    raise ValueError(
        f"gradients with respect to the shared representation need every slot to read "
        f"the same examples (Batch.shared=True) and an architecture "
        f"whose task-independent part ends in a representation; arch {model.arch!r} "
        f"(shared inputs: {batch.shared}) does not have one.")
  select = _leaf_selector(params["shared"], slot_leaves)
  if one_pass:
    return _one_pass(model, params, batch, select, needs, slot_backwards, model_state)
  return _per_slot(model, params, batch, select if needs == "slots" else None, model_state)


def _leaf_selector(shared, names: Sequence[str] | None):
  """A tree of bools like ``shared``: the leaves named (all when None)."""
  if names is not None:
    unknown = sorted(set(names) - {n for n, _ in params_lib.flatten_with_names(shared)})
    if unknown:
      raise ValueError(f"slot_leaves: no shared parameter(s) {unknown}.")
  return params_lib.tree_map_with_names(lambda n, _: names is None or n in names, shared)


def _one_pass(model, params, batch: Batch, select, needs: str,
              slot_backwards: str, model_state) -> Linearized:
  ts, x, ys, ids = model.taskset, batch.x, batch.ys, batch.task_ids
  sh_state, task_state = (None, None) if model_state is None else (
      model_state["shared"], model_state["tasks"])

  def encode(sh):                               # (rep, new shared state)
    return multitask.encoder(model, sh, x, sh_state, train=True)

  def decode(task_params, rep, slot_ids):       # (outs, new per-task state)
    return multitask.decoder(model, task_params, rep, x, slot_ids, task_state, train=True)

  def head_losses(rep, task_params):            # every slot reads the one rep
    return tasks_lib.slot_losses(ts, decode(task_params, rep, ids)[0], ys, ids)

  def slot_head_loss(r, task_params, t, yk):    # one slot's loss from the rep
    outs = decode(task_params, r, t[None])[0]
    return tasks_lib.slot_losses(ts, outs, jax.tree.map(lambda a: a[None], yk), t[None])[0]

  rep, enc_vjp, new_sh_state = jax.vjp(encode, params["shared"], has_aux=True)
  outs, decode_vjp, new_task_state = jax.vjp(lambda r, tp: decode(tp, r, ids), rep,
                                             params["tasks"], has_aux=True)
  losses, loss_vjp = jax.vjp(lambda o: tasks_lib.slot_losses(ts, o, ys, ids), outs)
  new_state = None if model_state is None else {"shared": new_sh_state,
                                                "tasks": new_task_state}

  def head_vjp(c):                              # (dZ of sum_k c_k L_k, task grads)
    return decode_vjp(loss_vjp(c)[0])

  def rep_pullback(dz):
    return enc_vjp(dz)[0]

  def pullback(c):
    dz, g_tasks = head_vjp(c.astype(losses.dtype))
    return {"shared": rep_pullback(dz), "tasks": g_tasks}

  rep_grads = slot_grads = slot_gram = rep_gram = None
  if needs != "sum":
    def rep_grads(c):
      # vmap over slots of one slot's gradient w.r.t. the unbatched rep: the
      # per-task part runs on the one rep (no [K, ...] copies), each slot's
      # backward gives its own dZ_k; task parameters from the weighted sum.
      c = c.astype(losses.dtype)
      dz = jax.vmap(jax.grad(lambda r, t, yk, ck: ck * slot_head_loss(r, params["tasks"], t,
                                                                       yk)),
                    in_axes=(None, 0, 0, 0))(rep, jnp.asarray(ids), ys, c)
      return dz, head_vjp(c)[1]

    def slot_grads(c, batched=False):
      dz, g_tasks = rep_grads(c)
      # K trunk backwards through the one linearisation.
      if sequential_backwards(slot_backwards) and not batched:
        g = jax.lax.map(rep_pullback, dz)
      else:
        g = jax.vmap(rep_pullback)(dz)
      return jax.tree.map(lambda s, a: a if s else None, select, g), g_tasks

    def slot_gram(c):
      g, g_tasks = slot_grads(c, batched=True)
      return gradients.gram(g), g_tasks

    def rep_gram(c):
      c = c.astype(losses.dtype)
      if model.rep_heads is not None and _factored_is_cheaper(ts, outs, rep, ids):
        # dZ_k = dout_k W_k^T: the Gram from the outputs' cotangents and the
        # kernels, never forming the [K, B, F] representation gradients.
        douts = loss_vjp(c)[0]                  # row k: c_k dL_k/dout_k (others zero)
        k = factored_gram(douts, model.rep_heads(params["tasks"], ids),
                          tasks_lib.static_group_slices(ts, ids))
        return k, decode_vjp(douts)[1]
      dz, g_tasks = rep_grads(c)
      return gradients.gram(dz), g_tasks

  def loss_at(p, slots: slice | None = None):  # the trunk is shared: run every slot
    l = head_losses(encode(p["shared"])[0], p["tasks"])
    return l if slots is None else l[slots]

  return Linearized(losses, pullback, slot_grads, rep_grads, rep_pullback, loss_at, True,
                    slot_gram, rep_gram, new_state, params)


def factored_gram(douts: dict, kernels: dict, slices: dict | None) -> jax.Array:
  """``[K, K]`` Gram matrix of ``dZ_k = sum_g douts[g][k] @ kernels[g][k]^T``.

  ``douts {group: [K, B, O_g]}``, ``kernels {group: [K, F, O_g]}``:
  ``<dZ_i, dZ_j> = sum_{o,p} (dout_i^T dout_j)_{op} (W_i^T W_j)_{op}``, summed over
  group pairs, in ``O(K^2 (B + F) O_g O_h)`` instead of ``O(K^2 B F)``. With a
  static slot layout (``slices``, :func:`mtljax.tasks.static_group_slices`)
  each group's block uses its own slots only.
  """
  k = next(iter(douts.values())).shape[0]
  parts = [(g, (slices or {}).get(g, slice(0, k))) for g in douts]
  parts = [(g, sl) for g, sl in parts if sl.stop > sl.start]
  gram = jnp.zeros((k, k), jnp.float32)
  for g, sg in parts:
    for h, sh in parts:
      p = jnp.einsum("ibo,jbp->ijop", douts[g][sg], douts[h][sh])
      q = jnp.einsum("ifo,jfp->ijop", kernels[g][sg], kernels[h][sh])
      gram = gram.at[sg, sh].add(jnp.sum(p * q, axis=(2, 3)))
  return gram


def _factored_is_cheaper(taskset, outs: dict, rep, ids) -> bool:
  """Whether :func:`factored_gram` costs fewer multiply-adds than the Gram of
  materialised ``[K, B, F]`` representation gradients."""
  k, b = ids.shape[0], rep.shape[0]
  f = rep.shape[-1] if rep.ndim == 2 else None
  if f is None:
    return False
  slices = tasks_lib.static_group_slices(taskset, ids)
  sizes = {g: ((slices[g].stop - slices[g].start) if slices else k, o.shape[-1])
           for g, o in outs.items()}
  factored = sum(kg * kh * og * oh for kg, og in sizes.values() for kh, oh in sizes.values())
  return factored * (b + f) < k * k * b * f


def _per_slot(model, params, batch: Batch, select, model_state) -> Linearized:
  ts, ys, ids = model.taskset, batch.ys, batch.task_ids
  k = ids.shape[0]
  x = jnp.broadcast_to(batch.x, (k,) + batch.x.shape) if batch.shared else batch.x

  def losses_and_state(p):
    outs, new_state = multitask.forward(model, p, x, ids, model_state, train=True)
    return tasks_lib.slot_losses(ts, outs, ys, ids), new_state

  def loss_at(p, slots: slice | None = None):
    if slots is None:
      return losses_and_state(p)[0]
    sub_ids, sub_ys = ids[slots], jax.tree.map(lambda a: a[slots], ys)
    outs, _ = multitask.forward(model, p, x[slots], sub_ids, model_state, train=True)
    return tasks_lib.slot_losses(ts, outs, sub_ys, sub_ids)

  losses, vjp, new_state = jax.vjp(losses_and_state, params, has_aux=True)
  if select is None:  # one backward of the weighted sum
    return Linearized(losses, lambda c: vjp(c.astype(losses.dtype))[0], None, None, None,
                      loss_at, False, model_state=new_state, params=params)

  # Per-slot shared gradients: vmap over slots of one slot's gradient with the
  # shared weights unbatched -- the vmapped forward is the forward of the K B
  # examples once (one big matmul per layer, no per-slot weight copies), and
  # each slot's backward touches only its own B examples.
  chosen = jax.tree.map(lambda s, a: a if s else None, select, params["shared"])

  def one_slot(xk, yk, t, ck):
    def f(sel):
      sh = jax.tree.map(lambda s, a, b: b if s else a, select, params["shared"], sel,
                        is_leaf=lambda a: a is None)
      outs = multitask.forward(model, {"shared": sh, "tasks": params["tasks"]}, xk[None],
                               t[None], model_state, train=True)[0]
      return ck * tasks_lib.slot_losses(ts, outs, jax.tree.map(lambda a: a[None], yk),
                                        t[None])[0]
    return jax.grad(f)(chosen)

  def slot_grads(c):
    c = c.astype(losses.dtype)
    g = jax.vmap(one_slot)(x, ys, ids, c)
    return g, vjp(c)[0]["tasks"]

  def pullback(c):
    return vjp(c.astype(losses.dtype))[0]

  def slot_gram(c):
    g, g_tasks = slot_grads(c)
    return gradients.gram(g), g_tasks

  return Linearized(losses, pullback, slot_grads, None, None, loss_at, False, slot_gram,
                    model_state=new_state, params=params)
