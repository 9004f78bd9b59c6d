"""Checkpoints (Orbax): the train state as a dict of arrays in DIR/checkpoints.

Resume order used by the loop: the workdir's latest checkpoint, else a fresh
state. A checkpoint holds ``{"step", "params", "opt_state"}``.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def make_manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  path = os.path.abspath(os.path.join(workdir, "checkpoints"))
  return ocp.CheckpointManager(
      path, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(manager: ocp.CheckpointManager, step: int, state) -> None:
  manager.save(step, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()


def restore_latest(manager: ocp.CheckpointManager, like):
  """The latest checkpoint restored into the structure/shardings of ``like``,
  or None when the directory has none."""
  step = manager.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))
