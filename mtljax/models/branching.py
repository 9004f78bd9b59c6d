"""Learning to Branch (Guo, Lee & Ulbricht, ICML 2020), in LibMTL's form: the
branching distribution, its Gumbel-softmax sampler and temperature schedule,
and the architecture's hyper-parameters. The architecture ``ltb`` itself (one
network column per task, the columns routed between layers) is built by
:func:`mtljax.models.per_task_trunks.ltb` on the small encoders and by
:func:`mtljax.models.backbone_models.resnet_ltb` on the ResNets.

**What is routed.** There are T columns (one network per task, as
``independent``). Before every trunk layer but the first, child column ``t``
reads one parent column of the layer before: its input is ``sum_s a[t, s]
h_s`` with ``a = alpha[layer] [T, T]`` (child x parent) a one-hot row drawn
from ``softmax(logits[t])``. The branch logits are shared parameters
(``shared/branch/<layer>``, ``[T, T]``, initialised to ones: uniform), trained
by the run's optimizer with every other parameter (LibMTL: one optimizer),
so the gradient methods see them as shared parameters. On the small encoders
the branch points follow every trunk layer but the last
(``shared/branch/<layer>`` is named after the layer whose outputs it routes);
on a ResNet they follow ``stem``, ``layer1``, ``layer2`` and ``layer3``
(LibMTL's ``alpha[1..4]``: every stage after the per-task stem).

**Sampling** (LibMTL's ``F.gumbel_softmax(alpha, dim=-1, tau=tau, hard=True)``):
``y_soft = softmax((logits + g) / tau)`` with Gumbel noise ``g``; ``hard``
(default) returns the straight-through one-hot ``y_hard - sg(y_soft) + y_soft``
(forward: ``onehot(argmax(logits + g))``, whose law is ``softmax(logits)``
whatever ``tau``; gradient: ``y_soft``'s), ``hard=False`` returns ``y_soft``.
One draw per training forward, shared by every example and every slot of the
step (independent per layer and per child).

**Schedule**, counted in steps: ``epoch = floor(count / epoch_steps)``,
``tau = tau0 / sqrt(epoch + 1)``; while ``epoch < warmup_epochs`` every child
reads the sum of all its parents (LibMTL's ``alpha = ones``; ``warmup_mix=
"mean"`` gives their mean) and the logits get no gradient. LibMTL's schedule
over ``E`` epochs is ``tau0 = E / 20``, ``warmup_epochs = ceil(E / 100)`` and
``epoch_steps`` = the steps of one epoch; the defaults are its NYUv2 run's
(``E = 200``: ``tau0 = 10``, 2 warm-up epochs).

**The sampler's state.** The draw needs a key and the schedule a clock, and
a model's ``apply`` gets neither: both live in the model state
(:attr:`mtljax.models.multitask.Model.init_state`), ``{"shared": {"branch":
{"key": the key's data (``jax.random.key_data``), "count": int32 []}}}`` (plus a ResNet's batch
statistics). ``key`` is fixed at init (a stream of the model's init key);
``count`` counts the training forwards whose state the step kept, and the
draw of forward ``count`` is keyed by ``fold_in(key, count)``. So every
forward of one step (the losses', each slot's gradient's) reads the same
architecture, a step that a non-finite loss skips redraws the same one, and
a resumed run draws what the uninterrupted run would have (the state is
checkpointed).

**Starting from a checkpoint** (``config.init_from``): the logits load like
any parameter, the sampler never (:data:`SAMPLER_STATE`): the run draws
its own stream and starts its own clock, warm-up included.

**Evaluation** (``train=False``) is deterministic: the warm-up sum while
warming up, else each child's most probable parent, ``onehot(argmax
logits)`` -- the paper's final tree. LibMTL's ``forward`` does not look at
``self.training`` and samples a fresh architecture for every test batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtljax.models import parts as parts_lib

WARMUP_MIXES = ("sum", "mean")
# The sampler's paths in the model state: never loaded by ``init_from``
# (mtljax.build), so a fine-tuned run has its own key and clock.
SAMPLER_STATE = r"^shared/branch/(key|count)$"
# The sampler key's stream below the model's init key (the parameters' draws
# split that key; this folds in a constant no split reaches).
_SAMPLER_STREAM = 0x1B7B


@dataclasses.dataclass(frozen=True)
class LTBHParams:
  """``ltb`` (``config.model.ltb.*``); the module docstring has the schedule.

  Attributes:
    tau0: the Gumbel-softmax temperature of the first epoch, > 0 (LibMTL:
      ``epochs / 20``).
    epoch_steps: steps per epoch of the schedule, >= 1.
    warmup_epochs: epochs in which every child reads all its parents, >= 0
      (LibMTL: ``ceil(epochs / 100)``).
    hard: the straight-through one-hot sample (LibMTL's ``hard=True``);
      False: the relaxed ``softmax((logits + g) / tau)``.
    warmup_mix: ``"sum"`` (LibMTL's all-ones ``alpha``) or ``"mean"`` of the
      parents during warm-up; :data:`WARMUP_MIXES`.
  """
  tau0: float = 10.0
  epoch_steps: int = 100
  warmup_epochs: int = 2
  hard: bool = True
  warmup_mix: str = "sum"

  def checked(self, arch: str, trunk: parts_lib.Trunk) -> LTBHParams:
    tau0 = parts_lib.finite_number(f"{arch}.tau0", self.tau0)
    if tau0 <= 0:
      raise ValueError(f"{arch}.tau0 must be > 0, got {self.tau0}.")
    epoch_steps = parts_lib.at_least(f"{arch}.epoch_steps", self.epoch_steps, 1)
    warmup = parts_lib.at_least(f"{arch}.warmup_epochs", self.warmup_epochs, 0)
    if not isinstance(self.hard, (bool, np.bool_)):
      raise ValueError(f"{arch}.hard must be True or False, got {self.hard!r}.")
    parts_lib.one_of(f"{arch}.warmup_mix", self.warmup_mix, WARMUP_MIXES)
    if trunk.encoder not in parts_lib.BACKBONES and len(trunk.layer_names) < 2:
      raise ValueError(f"{arch} routes the columns between trunk layers and needs at least "
                       f"two; encoder={trunk.encoder!r} has {list(trunk.layer_names)} (give "
                       "hidden, or channels, more layers).")
    return dataclasses.replace(self, tau0=tau0, epoch_steps=epoch_steps,
                               warmup_epochs=warmup, hard=bool(self.hard))


def logits_init(num_tasks: int, names) -> dict:
  """The branch logits at init: ``{name: ones [T, T]}`` (LibMTL's; uniform)."""
  return {n: jnp.ones((num_tasks, num_tasks), jnp.float32) for n in names}


def sampler_init(rng) -> dict:
  """The sampler's state at init: ``{"key": key data, "count": int32 0}``."""
  key = jax.random.fold_in(rng, _SAMPLER_STREAM)
  return {"key": jax.random.key_data(key), "count": jnp.zeros((), jnp.int32)}


def epoch(count, hp: LTBHParams):
  """The schedule's epoch of forward ``count``: ``floor(count / epoch_steps)``."""
  return jnp.asarray(count, jnp.int32) // hp.epoch_steps


def temperature(count, hp: LTBHParams):
  """``tau0 / sqrt(epoch + 1)`` (LibMTL's ``epochs/20 / sqrt(epoch+1)``)."""
  return hp.tau0 / jnp.sqrt(epoch(count, hp).astype(jnp.float32) + 1.0)


def warming_up(count, hp: LTBHParams):
  """Whether forward ``count`` is in the warm-up (``epoch < warmup_epochs``)."""
  return epoch(count, hp) < hp.warmup_epochs


def gumbel_softmax(logits, gumbel, tau, hard: bool):
  """``softmax((logits + gumbel) / tau)`` over the last axis; with ``hard`` the
  straight-through one-hot of ``argmax(logits + gumbel)`` (forward; the
  argmax of the perturbed logits, not of the softmax, whose entries can
  round to ties at a high temperature) with the softmax's gradient."""
  y_soft = jax.nn.softmax((logits + gumbel) / tau, axis=-1)
  if not hard:
    return y_soft
  y_hard = jax.nn.one_hot(jnp.argmax(logits + gumbel, axis=-1), logits.shape[-1],
                          dtype=y_soft.dtype)
  return y_hard - jax.lax.stop_gradient(y_soft) + y_soft


def draw_key(sampler: dict):
  """The key of forward ``sampler["count"]``: ``fold_in(key, count)``."""
  return jax.random.fold_in(jax.random.wrap_key_data(sampler["key"]), sampler["count"])


def routing(logits: dict, sampler: dict, hp: LTBHParams, train: bool
            ) -> tuple[dict[str, Any], dict]:
  """This forward's routing ``{name: [T, T]}`` (child x parent, float32) and
  the sampler's new state (module docstring): in train mode a Gumbel-softmax
  draw per layer (layer ``i`` in sorted-name order keyed by
  ``fold_in(draw_key, i)``) and ``count + 1``; in eval mode the most probable
  parents and the state unchanged; the warm-up mix in either while warming
  up. The logits are read in float32 whatever their dtype (under bf16 mixed
  precision the draw's law stays ``softmax(logits)``); the caller casts the
  routing to its activations' dtype."""
  count = sampler["count"]
  warm = warming_up(count, hp)
  out = {}
  for i, name in enumerate(sorted(logits)):
    lg = logits[name].astype(jnp.float32)
    mix = jnp.ones_like(lg) / (lg.shape[-1] if hp.warmup_mix == "mean" else 1.0)
    if train:
      g = jax.random.gumbel(jax.random.fold_in(draw_key(sampler), i), lg.shape, lg.dtype)
      y = gumbel_softmax(lg, g, temperature(count, hp), hp.hard)
    else:
      y = jax.nn.one_hot(jnp.argmax(lg, axis=-1), lg.shape[-1], dtype=lg.dtype)
    out[name] = jnp.where(warm, mix, y)
  new = {"key": sampler["key"], "count": count + 1} if train else sampler
  return out, new
