"""Learning-rate schedules by name: ``make_schedule(name, lr, total_steps, ...)``.

* ``constant``: ``lr``.
* ``warmup_cosine``: linear warm-up from 0 to ``lr`` over ``warmup_steps``, then
  cosine decay to ``end_lr_factor * lr`` at ``total_steps``
  (``optax.warmup_cosine_decay_schedule``).
* ``slanted_triangular``: ULMFiT's STLR (Howard & Ruder 2018, eq. 3):
  ``cut = floor(T cut_frac)``, ``p = t / cut`` for ``t < cut`` else
  ``1 - (t - cut) / (cut (1 / cut_frac - 1))``, and
  ``lr_t = lr (1 + p (ratio - 1)) / ratio`` (paper defaults ``cut_frac = 0.1``,
  ``ratio = 32``).

A schedule is a function of an optimizer's update count; under
:mod:`mtljax.optim` rules each parameter group counts its own updates (a group
unfrozen at step s starts its schedule at s).
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "warmup_cosine", "slanted_triangular")


def slanted_triangular(lr: float, total_steps: int, cut_frac: float = 0.1,
                       ratio: float = 32.0) -> Callable:
  if not 0 < cut_frac < 1:
    raise ValueError(f"stlr: cut_frac must be in (0, 1), got {cut_frac}.")
  if not ratio >= 1:
    raise ValueError(f"stlr: ratio must be >= 1, got {ratio}.")
  cut = max(1, int(total_steps * cut_frac))

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    p = jnp.where(t < cut, t / cut, 1.0 - (t - cut) / (cut * (1.0 / cut_frac - 1.0)))
    p = jnp.clip(p, 0.0, 1.0)
    return lr * (1.0 + p * (ratio - 1.0)) / ratio
  return schedule


def make_schedule(name: str, lr: float, total_steps: int, *, warmup_steps: int = 0,
                  end_lr_factor: float = 0.0, cut_frac: float = 0.1,
                  ratio: float = 32.0) -> Callable:
  """A schedule ``count -> learning rate`` by name (see the module docstring)."""
  if name not in SCHEDULES:
    raise ValueError(f"schedule {name!r} is not one of {SCHEDULES}.")
  if name == "constant":
    return optax.constant_schedule(lr)
  if name == "warmup_cosine":
    if not 0 <= warmup_steps < total_steps:
      raise ValueError(f"warmup_steps={warmup_steps} must be in "
                       f"[0, total_steps={total_steps}).")
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps, total_steps, end_value=lr * end_lr_factor)
  return slanted_triangular(lr, total_steps, cut_frac, ratio)
