"""Checkpoints (Orbax): the train state in DIR/checkpoints.

Resume order used by the loop: the workdir's latest checkpoint, else a fresh
state (initialised from ``config.init_from`` when set: :func:`load_params`).
A checkpoint holds a :class:`mtljax.steps.TrainState` field by field, a None
field as an empty entry, so every field is on disk. Checkpoints of mtljax
before ``TrainState`` hold a dict without the unused fields (the *dict
layout*); resuming one is refused with what to do (:func:`restore_latest`). A
fine-tuning run reads only ``params`` from another run's checkpoint, of
either layout, and never its data.

Every checkpoint gets a manifest once Orbax has committed it
(``DIR/checkpoints/STEP/mtljax_manifest.json``: each file's size and SHA-256,
and the run's identity, its config): a restore verifies the files first and
treats a checkpoint whose bytes changed like an unreadable one (the one before
is restored, and the warning says which step was rejected and why). A
checkpoint without a manifest (written by an older mtljax, or a run killed
between the commit and the manifest) is restored unverified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mtljax import errors
from mtljax import params as params_lib

logger = logging.getLogger("mtljax")


def make_manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  path = os.path.abspath(os.path.join(workdir, "checkpoints"))
  return ocp.CheckpointManager(
      path, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


CheckpointError = errors.CheckpointError  # a checkpoint that cannot be written or read


MANIFEST = "mtljax_manifest.json"


def _digests(step_dir: str) -> dict:
  """``{relative path: [size, sha256]}`` of every file under ``step_dir`` but
  the manifest."""
  out = {}
  for d, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(d, name)
      rel = os.path.relpath(path, step_dir)
      if rel == MANIFEST or rel.startswith(MANIFEST + ".tmp"):
        continue
      h = hashlib.sha256()
      with open(path, "rb") as f:
        for block in iter(lambda f=f: f.read(1 << 20), b""):
          h.update(block)
      out[rel] = [os.path.getsize(path), h.hexdigest()]
  return dict(sorted(out.items()))


def write_manifest(step_dir: str, step: int, identity: dict | None = None) -> None:
  """Writes ``step_dir``'s manifest (atomically: temp file, fsync, rename):
  each file's size and SHA-256, and ``identity`` (the run's config) when given."""
  record = {"step": int(step), "files": _digests(step_dir)}
  if identity is not None:
    record["identity"] = identity
  tmp = os.path.join(step_dir, f"{MANIFEST}.tmp-{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump(record, f, default=str)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify(step_dir: str) -> str | None:
  """Why ``step_dir``'s files do not match its manifest (a file missing, of
  another size or with other bytes), or None: they match, or there is no
  manifest (the checkpoint is then used unverified)."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"its manifest {path} is unreadable ({type(e).__name__})"
  found = _digests(step_dir)
  for rel, (size, digest) in files.items():
    if rel not in found:
      return f"checksum manifest: {rel} is missing"
    if found[rel][0] != size:
      return f"checksum manifest: {rel} has {found[rel][0]} bytes, {size} when written"
    if found[rel][1] != digest:
      return f"checksum manifest: the bytes of {rel} changed since it was written (SHA-256)"
  return None


def read_identity(directory: str) -> tuple[int, dict] | None:
  """``(step, identity)`` of the latest checkpoint in ``directory`` (a
  workdir's ``checkpoints/``) whose manifest holds the run's identity, or None."""
  if not os.path.isdir(directory):
    return None
  for step in sorted((int(d) for d in os.listdir(directory) if d.isdigit()), reverse=True):
    try:
      with open(os.path.join(directory, str(step), MANIFEST)) as f:
        identity = json.load(f).get("identity")
    except (OSError, ValueError, AttributeError):
      continue
    if identity is not None:
      return step, identity
  return None


def save(manager: ocp.CheckpointManager, step: int, state, identity: dict | None = None
         ) -> None:
  """Saves and waits, then writes the step's manifest (process 0; ``identity``:
  the run's config, compared on resume); a failed save is one clear error
  (Orbax writes into a temporary directory and renames it when complete, so
  the previous checkpoint stays the latest readable one)."""
  try:
    _quiet_closed_loop_callbacks()
    manager.save(step, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()
    if jax.process_index() == 0:
      write_manifest(os.path.join(str(manager.directory), str(step)), step, identity)
  except Exception as e:  # pylint: disable=broad-except
    full = f"{e} {errors.os_reason(e)}"
    full_disk = "No space" in full or "RESOURCE_EXHAUSTED" in full
    what = (" The disk is full: free space and rerun the same command to resume from the "
            "previous checkpoint, which is kept." if full_disk
            else " The previous checkpoint is kept.")
    raise CheckpointError(f"saving checkpoint step {step} to {manager.directory} failed: "
                          f"{_reason(e)}.{what}") from e


def _closed_loop(value) -> bool:
  return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


def _quiet_closed_loop_callbacks() -> None:
  """When a write fails, TensorStore's completions keep calling into Orbax's
  closed event loop, during the save and after it has returned; each is an
  unraisable "Event loop is closed" with a traceback on stderr. From the first
  save on, those go to the log at DEBUG (a ``sys.unraisablehook`` in front of
  the one before, which gets every other unraisable error): the save's own
  failure is the error raised."""
  old = sys.unraisablehook
  if getattr(old, "_mtljax_filter", False):
    return

  def hook(unraisable):
    if _closed_loop(unraisable.exc_value):
      logger.debug("A checkpoint writer's callback found Orbax's event loop closed (after a "
                   "failed write).")
    else:
      old(unraisable)
  hook._mtljax_filter = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0][:300] if text else type(e).__name__


def _reason(e: BaseException) -> str:
  """``e``'s type and first line, and the operating system's reason when an
  ``OSError`` caused it (``No space left on device``), which Orbax's own
  message may bury past its first line."""
  head = f"{type(e).__name__}: {_first_line(e)}"
  why = errors.os_reason(e)
  return head if not why or why in head else f"{head} ({why})"


def restore_latest(manager: ocp.CheckpointManager, like):
  """The latest readable checkpoint restored into the structure/shardings of
  ``like``, or None when the directory has none. An unreadable checkpoint
  (truncated file, empty step directory, files that fail the checksums of its
  manifest: :func:`verify`) is skipped with a warning naming it and why,
  falling back to the one before; when none is readable the error says which
  and what to do. A train state ``like`` (a named tuple) refuses a checkpoint
  of the dict layout at once, with a :class:`CheckpointError` saying so and
  what to do (the checkpoint is left where it is)."""
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  fields = getattr(type(like), "_fields", ())
  problems, bad = [], []
  for step in steps:
    # A failed restore can leave a manager's item handlers set wrongly (an
    # empty step directory): read with a throwaway manager, save with ``manager``.
    where = os.path.join(str(manager.directory), str(step))
    corrupt = verify(where)
    if corrupt:
      problems.append(f"step {step} ({where}): {corrupt}")
      logger.warning("Checkpoint step %d in %s is rejected as unreadable (%s); trying the one "
                     "before.", step, where, corrupt)
      bad.append(where)
      continue
    reader = ocp.CheckpointManager(manager.directory)
    try:
      saved = _saved_keys(manager.directory, step) if fields else None
      old = _old_layout(saved, manager.directory, step, like)
      # Fields the train state gained later, None in this run, absent from the
      # checkpoint: restored as None (a checkpoint of the version before them).
      later = [f for f in LATER_FIELDS if f in fields and getattr(like, f) is None and
               saved is not None and f not in saved]
      target = ({f: getattr(abstract, f) for f in fields if f not in later} if later
                else abstract)
      restored = None if old else reader.restore(step, args=ocp.args.StandardRestore(target))
      if later and restored is not None:
        restored = type(like)(**restored, **{f: None for f in later})
    except Exception as e:  # pylint: disable=broad-except
      problems.append(f"step {step} ({where}): {type(e).__name__}: {_first_line(e)}")
      logger.warning("Checkpoint step %d in %s is unreadable (%s); trying the one before.",
                     step, where, _first_line(e))
      bad.append(where)
      continue
    finally:
      reader.close()
    if old:
      raise CheckpointError(old)
    if bad and jax.process_index() == 0:  # kept for a look, out of the way of new saves
      for where in bad:
        os.replace(where, f"{where}.unreadable")
        logger.warning("Moved the unreadable checkpoint to %s.unreadable.", where)
      manager.reload()
    return restored
  raise CheckpointError(
      f"no checkpoint in {manager.directory} is readable: " + "; ".join(problems) +
      ". A file may be truncated, or the workdir holds a different model than this config "
      "builds: delete the unreadable step directories to start over from the last good "
      "one, or choose a new --workdir.")


# Fields steps.TrainState gained after its first layout: a checkpoint written
# before one of them resumes a run that does not use it (the field None).
LATER_FIELDS = ("model_state",)


def _saved_keys(directory, step: int):
  """The top-level keys of checkpoint ``step``'s tree (None when not a dict)."""
  reader = ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())
  try:
    saved = reader.item_metadata(step).tree
  finally:
    reader.close()
  return set(saved) if isinstance(saved, dict) else None


def _old_layout(saved, directory, step: int, like) -> str | None:
  """What to do, when ``like`` is a train state (a named tuple: every field is
  saved, None ones as empty entries) and checkpoint ``step`` (top-level keys
  ``saved``) holds the dict layout of mtljax before it (some of those fields
  missing, besides :data:`LATER_FIELDS` that ``like`` leaves None); else None."""
  fields = getattr(type(like), "_fields", None)
  if fields is None or saved is None:
    return None
  fields = {f for f in fields if f not in LATER_FIELDS or getattr(like, f) is not None}
  if not {"step", "params"} <= saved < fields:
    return None
  return (f"checkpoint step {step} in {directory} holds the train state as a dict (the layout "
          f"of mtljax before steps.TrainState; it lacks {sorted(set(fields) - set(saved))}): "
          "this version does not resume it; retrain in a new --workdir, or resume it with the "
          "previous mtljax version (fine-tuning from it with config.init_from still works).")


# ----------------------------------------------------------------------------
# Initialising a new run from another run's parameters (fine-tuning).
# ----------------------------------------------------------------------------


def _checkpoint_dir(path: str) -> str:
  path = os.path.abspath(path)
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def read_params(path: str, step: int | None = None) -> tuple[dict, int]:
  """The parameter tree saved by a run (its workdir or its ``checkpoints/``
  directory), latest step unless ``step``; returns ``(params, step)``."""
  tree, step = read_tree(path, step)
  if "params" not in tree:
    raise ValueError(f"path={path!r}: checkpoint step {step} holds no 'params'.")
  return tree["params"], step


def read_tree(path: str, step: int | None = None) -> tuple[dict, int]:
  """The whole train state saved by a run, as a dict of its fields
  (``params``, ``model_state``, ...), latest step unless ``step``; returns
  ``(tree, step)``."""
  directory = _checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"path={path!r}: no such directory.")
  manager = ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())
  step = manager.latest_step() if step is None else step
  if step is None:
    manager.close()
    raise FileNotFoundError(f"path={path!r}: no checkpoint in {directory}.")
  corrupt = verify(os.path.join(directory, str(step)))
  if corrupt:
    manager.close()
    raise ValueError(f"path={path!r}: checkpoint step {step} is corrupt ({corrupt}); choose "
                     "another checkpoint.")
  # Onto this process's first device, whatever mesh the source was saved from
  # (pretrained on 8 devices, fine-tuned on 1): the run places it afterwards.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        manager.item_metadata(step).tree)
  restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  manager.close()
  if not isinstance(restored, dict):
    raise ValueError(f"path={path!r}: checkpoint step {step} holds no train state.")
  return restored, int(step)


def load_params(target, source, dont_load: Sequence[str] = ()) -> tuple[dict, dict]:
  """``target`` with every parameter found in ``source`` (by slash path)
  copied in, except those matching a ``dont_load`` regex (``re.search``).

  A per-task stack ``tasks/P`` ``[T, ...]`` absent from the source is loaded
  from a source ``shared/P`` by copying it into every row (reported in
  ``broadcast`` too): a pooled or multi-head model initialises an independent
  one.

  Returns ``(params, report)``; ``report`` has ``loaded``, ``fresh_dont_load``
  (left at their fresh values because a pattern matched), ``fresh_missing``
  (not in the source) and ``unused`` (source paths the target lacks), lists of
  paths. A loaded path whose shape differs raises ``ValueError`` listing every
  mismatch (add a ``dont_load`` pattern to re-initialise them instead).
  """
  patterns = [re.compile(p) for p in dont_load]
  src = dict(params_lib.flatten_with_names(source))
  report = {"loaded": [], "broadcast": [], "fresh_dont_load": [], "fresh_missing": [],
            "unused": []}
  mismatched = []
  values = {}
  for name, leaf in params_lib.flatten_with_names(target):
    if any(p.search(name) for p in patterns):
      report["fresh_dont_load"].append(name)
    elif name not in src and name.startswith("tasks/") and \
        "shared/" + name[len("tasks/"):] in src and \
        tuple(leaf.shape[1:]) == tuple(np.shape(src["shared/" + name[len("tasks/"):]])):
      # A shared parameter initialises every task's copy (e.g. an independent
      # or soft-shared model from a pooled one).
      one = np.asarray(src["shared/" + name[len("tasks/"):]])
      values[name] = np.broadcast_to(one, tuple(leaf.shape))
      report["loaded"].append(name)
      report["broadcast"].append(name)
    elif name not in src:
      report["fresh_missing"].append(name)
    elif tuple(np.shape(src[name])) != tuple(leaf.shape):
      mismatched.append(f"{name}: checkpoint {tuple(np.shape(src[name]))}, "
                        f"model {tuple(leaf.shape)}")
    else:
      values[name] = src[name]
      report["loaded"].append(name)
  nonfinite = [n for n, v in values.items() if not np.all(np.isfinite(np.asarray(v)))]
  if nonfinite:
    raise ValueError(f"the source checkpoint holds NaN/inf in "
                     f"{nonfinite[:5]}{' ...' if len(nonfinite) > 5 else ''} (a diverged run?); "
                     "choose another checkpoint.")
  if mismatched:
    raise ValueError("shape mismatch for " + "; ".join(mismatched) +
                     ". Add a dont_load pattern to re-initialise them.")
  used = set(values) | {"shared/" + n[len("tasks/"):] for n in report["broadcast"]}
  report["unused"] = sorted(set(src) - used - set(report["fresh_dont_load"]))

  def pick(name, leaf):
    return jnp.asarray(values[name], leaf.dtype) if name in values else leaf
  return params_lib.tree_map_with_names(pick, target), report


def loaded_mask(params, report) -> dict:
  """A tree of Python bools: True where the parameter was loaded."""
  loaded = set(report["loaded"])
  return params_lib.tree_map_with_names(lambda n, _: n in loaded, params)
