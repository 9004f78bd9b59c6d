"""A run's working directory: checks before anything loads, one run at a time,
the config it was started with, and JSON that other tools can read.

* :func:`check_writable` writes and removes a probe file, so an unwritable
  or full workdir is a clear error before any data is loaded.
* :class:`Lock` (``fcntl.flock`` on ``WORKDIR/.lock``) refuses a second run in
  the same workdir at once; the kernel releases it when the process dies
  (SIGKILL included), so a killed run never leaves a stale lock.
* :func:`check_config` stores the config at the first run
  (``WORKDIR/config.json``; the checkpoints keep it too, so a deleted
  ``config.json`` does not let a changed config resume) and refuses a resume
  whose config differs, listing
  the keys, apart from :data:`RESUMABLE_KEYS` (step budget, intervals,
  evaluation chunking, where data and caches live, the mesh, which outputs are
  written).
* :func:`trim_metrics` drops ``metrics.jsonl`` rows past the restored step
  (written after the last checkpoint by a killed or crashed run).
* :func:`json_safe` turns non-finite floats into ``null`` and names them
  (``"nonfinite": [keys]``); everything is written with ``allow_nan=False``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os

import numpy as np

from mtljax import errors
from mtljax import params as params_lib

# Config keys a resumed run may change (prefixes match subtrees).
RESUMABLE_KEYS = ("total_steps", "steps_per_call", "log_steps", "eval_steps",
                  "checkpoint_steps", "eval_batch_size", "data.data_dir", "baselines",
                  "baselines_cache", "mesh", "on_nonfinite", "data.pipeline",
                  "data.device_budget_mb", "data.workers", "data.prefetch",
                  "tensorboard", "plots")

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"


WorkdirError = errors.WorkdirError  # a workdir that cannot be used as asked


def check_writable(workdir: str) -> None:
  """Creates ``workdir`` and writes/fsyncs/removes a probe file (64 KiB)."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".probe-{os.getpid()}")
    with open(probe, "wb") as f:
      f.write(b"\0" * 65536)
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as e:
    why = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
    raise WorkdirError(f"workdir {workdir!r} is not writable ({why}); choose another "
                       "--workdir or free space. Nothing was loaded.") from None


class Lock:
  """An exclusive, non-blocking lock on ``WORKDIR/.lock`` for a run's lifetime."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self._f = None

  def __enter__(self):
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      f.close()
      raise WorkdirError(f"workdir {os.path.dirname(self.path)!r} is in use by another run "
                         f"({holder}); wait for it or choose another --workdir.") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}")
    f.flush()
    self._f = f
    return self

  def __exit__(self, *exc):
    if self._f is not None:
      self._f.seek(0)
      self._f.truncate()
      fcntl.flock(self._f, fcntl.LOCK_UN)
      self._f.close()
      self._f = None


def remove_if_unused(workdir: str) -> bool:
  """Removes ``workdir`` if it holds nothing but its lock file (a run refused
  before it wrote anything: no empty workdir is left behind); call it with
  the :class:`Lock` held. True if removed."""
  try:
    if os.listdir(workdir) not in ([], [".lock"]):
      return False
    if os.path.exists(os.path.join(workdir, ".lock")):
      os.remove(os.path.join(workdir, ".lock"))
    os.rmdir(workdir)  # (fails, and is left, if another run wrote into it meanwhile)
  except OSError:
    return False
  return True


# Config keys added after workdirs were written, with the value that does what
# a config without them did: a stored config that lacks one reads as having
# that value (so a run from before resumes), any other value still differs.
ADDED_KEYS = {"precision": "float32", "dense_convention": "exact", "data.root": "",
              "data.classes": 0, "data.label_folder": "", "model.output_stride": 8,
              "model.normalization": "batch", "model.conv_impl": "auto", "data.augment": "",
              "data.augment_scales": [1.0, 1.2, 1.5], "model.patch_size": 4,
              "model.vit_width": 64, "model.vit_depth": 4, "model.vit_heads": 4,
              "model.vit_mlp_dim": 128, "model.vit_eps": 1e-12}


def _resumable(key: str) -> bool:
  return any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS)


def normal(value):
  """JSON round trip (tuples become lists) for comparing configs."""
  return json.loads(json.dumps(value, default=str))


def check_config(workdir: str, config: dict, write: bool = True,
                 stored_with_checkpoints: tuple[int, dict] | None = None) -> None:
  """Stores ``config`` in the workdir at the first run; on a later run
  refuses one that differs outside :data:`RESUMABLE_KEYS`. ``write=False``
  (processes other than 0) only compares. ``stored_with_checkpoints``:
  ``(step, config)`` kept with the latest checkpoint
  (:func:`mtljax.checkpoint.read_identity`), compared when ``config.json`` is
  gone (a workdir with checkpoints and no ``config.json`` is still a resume)."""
  path = os.path.join(workdir, CONFIG_FILE)
  current = normal(config)
  source = f"workdir {workdir!r} was started with another config"
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
  elif stored_with_checkpoints is not None:
    step, stored = stored_with_checkpoints
    stored = normal(stored)
    source = (f"workdir {workdir!r} has no {CONFIG_FILE}, and its checkpoint step {step} was "
              "written with another config")
  else:
    if write:
      write_json(path, current)
    return
  a, b = params_lib.flatten_dict(stored, "."), params_lib.flatten_dict(current, ".")
  a = {**{k: v for k, v in ADDED_KEYS.items() if k in b}, **a}  # a config from before them
  differ = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>")
                  and not _resumable(k))
  if differ:
    shown = "; ".join(f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
                      for k in differ[:8])
    more = f" (and {len(differ) - 8} more)" if len(differ) > 8 else ""
    model = [k for k in differ if k.startswith(("model.", "objective.method", "data."))]
    what = " The workdir holds a different model or data." if model else ""
    raise WorkdirError(
        f"{source}: {shown}{more}.{what} "
        f"Resume with the same config (only {', '.join(RESUMABLE_KEYS)} may change) or "
        "choose a new --workdir.")
  if write:
    write_json(path, current)  # the resumable keys as now


def trim_metrics(workdir: str, step: int) -> int:
  """Drops ``metrics.jsonl`` rows with ``step`` > ``step`` (and unreadable
  lines: a row cut by a kill). Returns how many were dropped."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
        keep = int(row["step"]) <= step
      except (ValueError, KeyError, TypeError):
        keep = False
      if keep:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += 1
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return dropped


def json_safe(obj, _path: str = "", _bad: list | None = None):
  """``obj`` with NaN/inf floats replaced by None; a dict at the top level
  gets ``"nonfinite": [paths]`` naming them (JSON has no NaN)."""
  top = _bad is None
  bad = [] if top else _bad
  if isinstance(obj, dict):
    out = {k: json_safe(v, f"{_path}{k}" if not _path else f"{_path}.{k}", bad)
           for k, v in obj.items()}
  elif isinstance(obj, (list, tuple)):
    out = [json_safe(v, f"{_path}[{i}]", bad) for i, v in enumerate(obj)]
  elif isinstance(obj, (float, np.floating)) and not math.isfinite(float(obj)):
    bad.append(f"{_path} ({float(obj)})")
    out = None
  elif isinstance(obj, np.generic):
    out = obj.item()
  else:
    out = obj
  if top and bad and isinstance(out, dict):
    out["nonfinite"] = bad  # these values were NaN/inf, written as null
  return out


def write_json(path: str, obj, **kwargs) -> None:
  """Atomically (temp file + rename), strict JSON (no NaN)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(json_safe(obj), f, allow_nan=False, default=str, **kwargs)
  os.replace(tmp, path)


def append_jsonl(path: str, record: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(json_safe(record), allow_nan=False, default=str) + "\n")
    f.flush()
