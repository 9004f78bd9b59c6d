"""Per-task losses and gradients from one linearisation (mtljax/jacobians.py)
against K separate ``jax.grad`` calls, one per slot, for every architecture,
on shared and on per-slot inputs, with static and traced slot layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from mtljax import jacobians
from mtljax import tasks
from mtljax.models import multitask

_KW = dict(hidden=(8, 6), num_experts=3, tower=(5,), cond_layers=(0,))


def _noisy_params(model, seed=0):
  """Initial parameters plus noise, so gates and stitch units are not at their
  symmetric initial values. The noise is numpy's (float32 standard normal,
  times 0.3): an eager jax draw compiles a program per leaf shape. (The init
  stays op by op: its ops' programs are shared across architectures, where a
  jitted init per architecture compiles more.)"""
  p = model.init(jax.random.key(seed))
  rng = np.random.default_rng(seed + 100)
  return jax.tree.map(
      lambda a: jnp.asarray(np.asarray(a) + np.float32(0.3) * rng.standard_normal(
          a.shape, np.float32)), p)


def _setup(arch, shared_inputs, k, heads="auto", seed=0):
  data = helpers.toy_data()
  model = multitask.make_model(arch, data.taskset, data.input_shape,
                               **helpers.arch_kwargs(arch, heads=heads, **_KW))
  params = _noisy_params(model, seed)
  probs = np.full(4, 0.25)
  ids, x, ys, _ = helpers.step_batch(data, probs, seed=seed + 3, k=k, b=6,
                                     shared_inputs=shared_inputs)
  return model, params, ids, x, ys


def _state(model, seed=0):
  """The model's state (None without): ltb's sampler past its warm-up, so a
  drawn architecture routes the columns (every forward of the step must read
  the same draw)."""
  if not model.stateful:
    return None
  state = model.init_state(jax.random.key(seed))
  state["shared"]["branch"]["count"] = jnp.asarray(10 ** 4, jnp.int32)
  return state


# (arch, heads): every architecture, and multi_head with shared heads (pooled).
_ARCHS = [(a, "auto") for a in multitask.archs()] + [("multi_head", "shared")]
# (shared inputs, K, static slot layout): one pass or per slot, K = T or K < T.
_LAYOUTS = [(True, 4, True), (True, 3, False), (False, 4, True), (False, 3, False)]
# The fast tier: every path once -- one pass (static, traced), per slot on shared
# inputs without a task-independent part, per slot on distinct inputs.
_FAST = {("multi_head", "auto", True, 4, True), ("mmoe", "auto", True, 3, False),
         ("concat", "auto", True, 4, True), ("cross_stitch", "auto", False, 3, False),
         ("independent", "auto", False, 4, True), ("ltb", "auto", False, 3, False)}


# Two layouts (shared inputs with the static layout, distinct inputs with
# traced ids) for the expert architectures added later, which share mmoe's code
# paths, and for those with no task-independent part (always per slot: shared
# or distinct inputs take the same path; the fast tier's cross_stitch and
# independent cases keep the other two layouts in view).
_TWO_LAYOUTS = {"cgc", "ple", "dselect_k", "mtan", "ltb",
                "concat", "additive", "multiplicative", "soft", "cross_stitch", "independent"}


def _slot_cases():
  for arch, heads in _ARCHS:
    for layout in _LAYOUTS:
      if (arch in _TWO_LAYOUTS and layout not in (_LAYOUTS[0], _LAYOUTS[3])
          and (arch, heads) + layout not in _FAST):
        continue
      marks = () if (arch, heads) + layout in _FAST else (pytest.mark.slow,)
      yield pytest.param(arch, heads, *layout, marks=marks,
                         id=f"{arch}-{heads}-{'shared' if layout[0] else 'slots'}-k{layout[1]}"
                            f"-{'static' if layout[2] else 'traced'}")


@pytest.mark.parametrize("arch, heads, shared_inputs, k, static", _slot_cases())
def test_slot_gradients_equal_one_grad_per_slot(arch, heads, shared_inputs, k, static):
  model, params, ids, x, ys = _setup(arch, shared_inputs, k, heads)
  ids_in = np.asarray(ids, np.int32) if static else jnp.asarray(ids, jnp.int32)
  batch = jacobians.Batch(jnp.asarray(x), {g: jnp.asarray(y) for g, y in ys.items()},
                          ids_in, shared_inputs)
  c = jnp.asarray([0.5, 2.0, 1.0, 1.5][:k])
  ref_losses, ref = helpers.per_task_grads(model, params, x, ys, ids, shared_inputs,
                                           state=_state(model))
  # The weighted sum of the reference gradients in numpy (no eager jnp op).
  weighted = [jax.tree.map(lambda a, w=w: w * np.asarray(a, np.float32), g)
              for w, g in zip(np.asarray(c), ref)]
  want_sum = jax.tree.map(lambda *a: sum(a), *weighted)

  # The batch is closed over, not an argument: jit would trace static ids.
  # Both linearisations in one program (one compilation).
  both = jax.jit(lambda p: {n: _outputs(model, p, batch, n, c) for n in ("sum", "slots")})(params)
  for needs in ("sum", "slots"):
    lin = both[needs]
    assert bool(lin["one_pass"]) == (shared_inputs and model.encode is not None)
    np.testing.assert_allclose(lin["losses"], ref_losses, rtol=1e-5, atol=1e-6)
    helpers.assert_trees_close(lin["pullback"], want_sum)
    if needs == "slots":
      # Row k of G is c_k grad_sh L_k; the task gradients are those of the sum.
      helpers.assert_trees_close(lin["G"], jax.tree.map(lambda *a: np.stack(a),
                                                        *[g["shared"] for g in weighted]))
      helpers.assert_trees_close(lin["g_tasks"], want_sum["tasks"])


def _outputs(model, params, batch, needs, c):
  from mtljax import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  static = isinstance(batch.task_ids, np.ndarray)
  assert (tasks_lib.static_group_slices(model.taskset, batch.task_ids) is not None) == (
      static and list(batch.task_ids) == list(model.taskset.grouped_order))
  lin = jacobians.linearize(model, params, batch, needs=needs, model_state=_state(model))
  out = {"losses": lin.losses, "pullback": lin.pullback(c),
         "one_pass": jnp.asarray(lin.one_pass)}
  if needs == "slots":
    out["G"], out["g_tasks"] = lin.slot_grads(c)
  return out


def _rep_grads_reference(model, params, x, ys, ids, c):
  """One ``jax.grad`` per slot of ``c_k L_k`` w.r.t. ``Z = encode(theta^sh, x)``."""
  ts = model.taskset
  z = model.encode(params["shared"], jnp.asarray(x))
  out = []
  for s, t in enumerate(ids):
    def loss_of_z(z, s=s, t=t):
      o = model.decode(params["tasks"], z, jnp.asarray(x), jnp.array([t]))
      g = ts.tasks[t].group
      return c[s] * jnp.mean(tasks.example_loss(ts.tasks[t], o[g][0], ys[g][s]))
    out.append(jax.grad(loss_of_z)(z))
  return out


@pytest.mark.parametrize("arch, heads", [
    pytest.param(a, h, marks=() if (a, h) == ("mmoe", "auto") else (pytest.mark.slow,))
    for a, h in _ARCHS if a in ("multi_head", "mmoe", "omoe", "shared_bottom")])
def test_representation_gradients_are_each_slots_gradient_of_the_encoding(arch, heads):
  """``rep_grads(c)[k] = c_k dL_k/dZ`` at ``Z = encode(theta^sh, x)``, and
  ``rep_pullback`` is the trunk's VJP: ``sum_k`` of them is the shared gradient."""
  model, params, ids, x, ys = _setup(arch, True, 3, heads)
  batch = helpers.batch(jnp.asarray(ids, jnp.int32), x, ys, True)
  c = jnp.asarray([0.5, 2.0, 1.0])
  reference = jax.jit(lambda p: _rep_grads_reference(model, p, x, ys, ids, c))

  @jax.jit
  def library(params):
    lin = jacobians.linearize(model, params, batch, needs="representation")
    dz = lin.rep_grads(c)[0]
    return dz, lin.rep_pullback(jax.tree.map(lambda a: a.sum(axis=0), dz)), lin.pullback(c)

  want = reference(params)
  dz, pulled, pullback = library(params)
  for s in range(len(ids)):
    helpers.assert_trees_close(jax.tree.map(lambda a, s=s: a[s], dz), want[s])
  helpers.assert_trees_close(pulled, pullback["shared"])


def test_selected_leaves_only():
  model, params, ids, x, ys = _setup("multi_head", False, 3)
  batch = helpers.batch(jnp.asarray(ids, jnp.int32), x, ys, False)
  g = jax.jit(lambda p: jacobians.linearize(  # one program, not op by op
      model, p, batch, needs="slots", slot_leaves=["trunk/layer_1/kernel"]).slot_grads(
          jnp.ones(3))[0])(params)
  names = [n for n, _ in jax.tree_util.tree_flatten_with_path(g)[0]]
  assert len(names) == 1
  assert g["trunk"]["layer_1"]["kernel"].shape == (3, 8, 6)
  _, ref = helpers.per_task_grads(model, params, x, ys, ids, False)
  np.testing.assert_allclose(g["trunk"]["layer_1"]["kernel"],
                             np.stack([r["shared"]["trunk"]["layer_1"]["kernel"] for r in ref]),
                             rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match=r"no shared parameter\(s\) \['trunk/nope'\]"):
    jacobians.linearize(model, params, batch, needs="slots", slot_leaves=["trunk/nope"])


@pytest.mark.slow
@pytest.mark.parametrize("slot_backwards", ["map", "vmap"])
def test_sequential_and_batched_trunk_backwards_agree(slot_backwards):
  model, params, ids, x, ys = _setup("mmoe", True, 4)
  batch = helpers.batch(np.asarray(ids, np.int32), x, ys, True)
  # One compiled program (the batch, static ids, closed over), as the step runs it.
  got = jax.jit(lambda p: jacobians.linearize(
      model, p, batch, needs="slots", slot_backwards=slot_backwards).slot_grads(jnp.ones(4))[0])(
          params)
  _, ref = helpers.per_task_grads(model, params, x, ys, ids, True)
  helpers.assert_trees_close(got, jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]),
                                               *[g["shared"] for g in ref]))


def test_path_misuse_is_a_clear_error():
  model, params, ids, x, ys = _setup("concat", True, 3)
  batch = helpers.batch(jnp.asarray(ids, jnp.int32), x, ys, True)
  with pytest.raises(ValueError, match="arch 'concat' .* does not have one"):
    jacobians.linearize(model, params, batch, needs="representation")
  with pytest.raises(ValueError, match="one-trunk-pass step needs"):
    jacobians.linearize(model, params, batch, one_pass=True)
  with pytest.raises(ValueError, match="slot_backwards='loop' is not one of"):
    jacobians.linearize(model, params, batch, slot_backwards="loop")


@pytest.mark.parametrize("static", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["static-k4", "traced-k3"])
def test_factored_representation_gram_equals_the_gram_of_each_slots_gradient(static):
  """Linear heads: ``<dZ_i, dZ_j>`` from the outputs' cotangents and the kernels
  (never forming ``dZ``) equals a float64 Gram of ``K`` separate ``jax.grad``
  calls w.r.t. ``Z``; ``rep_heads`` is what ``decode`` computes; archs without
  linear heads get the Gram of the materialised gradients."""
  k = 4 if static else 3
  model, params, ids, x, ys = _setup("multi_head", True, k)
  ts = model.taskset
  ids_in = np.asarray(ids, np.int32) if static else jnp.asarray(ids, jnp.int32)
  batch = jacobians.Batch(jnp.asarray(x), {g: jnp.asarray(y) for g, y in ys.items()},
                          ids_in, True)
  c = jnp.asarray([0.5, 2.0, 1.0, 1.5][:k])

  @jax.jit
  def library(params):  # the batch (static ids) is closed over
    z = model.encode(params["shared"], jnp.asarray(x))
    kernels = model.rep_heads(params["tasks"], ids_in)
    outs = model.decode(params["tasks"], z, jnp.asarray(x), ids_in)
    douts = jax.vjp(lambda o: tasks.slot_losses(ts, o, batch.ys, ids_in), outs)[1](c)[0]
    direct = jacobians.factored_gram(douts, kernels, tasks.static_group_slices(ts, ids_in))
    lin = jacobians.linearize(model, params, batch, needs="representation")
    return z, kernels, outs, direct, lin.rep_gram(c), lin.rep_grads(c)[1]

  z, kernels, outs, direct, (gram, g_tasks), g_tasks_ref = library(params)
  # rep_heads: slot k's outputs of its own group are z @ W + b.
  for s, t in enumerate(ids):
    g = ts.tasks[t].group
    row = ts.local_index[t]
    want = np.asarray(z) @ np.asarray(kernels[g][s]) + np.asarray(
        params["tasks"]["heads"][g]["bias"][row])
    np.testing.assert_allclose(outs[g][s], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(kernels[g][s], params["tasks"]["heads"][g]["kernel"][row])
  reference = jax.jit(lambda p: _rep_grads_reference(model, p, x, ys, ids, c))
  dz_ref = [np.asarray(g, np.float64).ravel() for g in reference(params)]
  want_gram = np.stack(dz_ref) @ np.stack(dz_ref).T
  for got in (direct, gram):
    np.testing.assert_allclose(got, want_gram, rtol=2e-5, atol=1e-7 * np.abs(want_gram).max())
  helpers.assert_trees_close(g_tasks, g_tasks_ref)
  # mmoe has no linear-head factorisation: the Gram of its materialised dZ.
  model, params, ids, x, ys = _setup("mmoe", True, 3)
  assert model.rep_heads is None
  batch = helpers.batch(jnp.asarray(ids, jnp.int32), x, ys, True)

  @jax.jit
  def fallback(params):
    lin = jacobians.linearize(model, params, batch, needs="representation")
    return lin.rep_grads(c[:3])[0], lin.rep_gram(c[:3])[0]
  dz, gram = fallback(params)
  flat = np.concatenate([np.asarray(a, np.float64).reshape(3, -1)
                         for a in jax.tree.leaves(dz)], axis=1)
  np.testing.assert_allclose(gram, flat @ flat.T, rtol=2e-5,
                             atol=1e-7 * np.abs(flat @ flat.T).max())
