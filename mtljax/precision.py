"""Mixed precision: compute in bfloat16, everything else in float32 (issue 27).

``config.precision``:

* ``"float32"`` (the default): the model as built;
* ``"bfloat16"``: :func:`mixed` wraps the model so that its forward pass
  runs in bfloat16 -- the parameters (float32, as initialised, optimised and
  checkpointed) and the inputs are cast to bfloat16 where they enter the
  model, and its outputs are cast back to float32 where they leave it.

This is the recipe of big_vision and the flax examples -- float32 parameters
(flax's ``param_dtype``), a bfloat16 compute dtype (flax's ``dtype``, under
which every layer casts its parameters and inputs to the compute dtype), casts
at the boundary -- applied once around the model instead of per layer, so
every architecture gets it without a ``dtype`` field in each module. Nothing
else changes type:

* the losses are computed from the float32 outputs (softmax cross-entropy,
  squared error in float32);
* gradients are float32: the transpose of a cast to bfloat16 is a cast back,
  so the gradient of a float32 parameter is float32, accumulated as such --
  per-task gradients, the Gram matrix ``G G^T`` of the per-task gradients, every
  gradient method's solver (:mod:`mtljax.gradients`) and the optimizer see
  float32; so do the representation gradients of the one-pass path (``encode``'s
  output is cast back to float32 before the per-task part reads it);
* optimizer and objective states, the train state and checkpoints are float32;
  a model's batch statistics are computed and kept in float32 (batch norm
  normalises in float32 at least and casts back).

Bfloat16 has float32's exponent range, so there is no loss scaling (optax's
``MultiSteps`` / dynamic loss scaling exist for float16). Its 8-bit mantissa
(relative rounding 2^-9 = 0.2 %) is what the tests' tolerances account for.

Interface: ``mixed(model, precision) -> Model`` (``"float32"``: the model
itself); :data:`PRECISIONS`; :func:`compute_dtype`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

PRECISIONS = ("float32", "bfloat16")


def compute_dtype(precision: str):
  """The dtype the model computes in."""
  if precision not in PRECISIONS:
    raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}.")
  return jnp.dtype(precision)


def cast_floats(tree, dtype):
  """``tree`` with its floating-point leaves cast to ``dtype`` (integer and
  boolean leaves -- token ids, masks -- as they are)."""
  def one(a):
    return a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a
  return jax.tree.map(one, tree)


def mixed(model, precision: str):
  """``model`` computing in ``precision`` with float32 parameters, inputs of
  any float type and float32 outputs (module docstring). ``init``,
  ``penalty`` (on the float32 parameters) and ``rep_heads`` (the float32
  head kernels the step's Gram matrix is formed with) are unchanged."""
  dtype = compute_dtype(precision)
  if dtype == jnp.float32:
    return model
  down = lambda tree: cast_floats(tree, dtype)  # noqa: E731
  up = lambda tree: cast_floats(tree, jnp.float32)  # noqa: E731
  inner = model

  def out(result):  # a model with state returns (outputs, new_state): the state as it is
    return (up(result[0]), result[1]) if inner.stateful else up(result)

  def apply(params, x, task_ids, **state):
    return out(inner.apply(down(params), down(x), task_ids, **state))

  def encode(shared, x, **state):
    return out(inner.encode(down(shared), down(x), **state))

  def decode(task_params, rep, x, task_ids, **state):
    return out(inner.decode(down(task_params), down(rep), down(x), task_ids, **state))
  if inner.encode is None:
    return dataclasses.replace(model, apply=apply)
  return dataclasses.replace(model, apply=apply, encode=encode, decode=decode)
