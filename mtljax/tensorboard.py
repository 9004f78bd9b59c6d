"""TensorBoard event files next to ``metrics.jsonl`` (tensorboardX; no TensorFlow).

Every row of ``metrics.jsonl`` is written as scalars at its ``step``, named by
:func:`scalar_name` (slash-separated: TensorBoard groups by the first part):

* ``train/loss``, ``train/penalty``, ``train/TASK/loss``, ``train/nonfinite_skipped``,
  ``eval/TASK/METRIC``, ``train_eval/TASK/METRIC``, ``grad/solver_failures``,
  ``optim/lr`` or ``optim/lr/rule<i>`` (parameter rule ``i``): as in
  ``metrics.jsonl``;
* ``grad/cos/A/B`` -> ``grad/cosine/A/B``; ``grad/TASK/norm`` -> ``grad/norm/TASK``;
  ``grad/TASK/weight`` (a gradient method's weight) and ``objective/TASK/lambda``
  (a loss weighting's) -> ``objective/weights/TASK``;
* with N seeds: ``KEY/se`` -> ``NAME/se`` and each seed's value ``NAME/seed_S``
  (``S`` the seed; a task a seed did not sample at that step is left out),
  train and eval keys alike (a row's ``per_seed`` has both).

A ``null`` in ``metrics.jsonl`` (a NaN or inf there) is written as NaN. The
config is written once as text (tag ``config``, JSON in a code block).

Resuming: :class:`Board` is opened with ``purge_step = restored step + 1``
(1 for a fresh run), so TensorBoard hides what an interrupted run wrote after
its last checkpoint -- the rows :func:`mtljax.workdir.trim_metrics` drops from
``metrics.jsonl``. Each writer opens its own file (the name carries the time
in nanoseconds); the config text is written by the first.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import time

_RENAMES = (
    (re.compile(r"^grad/cos/(.+)$"), r"grad/cosine/\1"),
    (re.compile(r"^grad/([^/]+)/norm$"), r"grad/norm/\1"),
    (re.compile(r"^grad/([^/]+)/weight$"), r"objective/weights/\1"),
    (re.compile(r"^objective/([^/]+)/lambda$"), r"objective/weights/\1"),
)


def scalar_name(key: str) -> str:
  """The TensorBoard tag of a ``metrics.jsonl`` key (module docstring)."""
  if key.endswith("/se"):
    return scalar_name(key[:-3]) + "/se"
  for pattern, replacement in _RENAMES:
    if pattern.match(key):
      return pattern.sub(replacement, key)
  return key


def row_scalars(row: dict, seeds=()) -> dict[str, float]:
  """``{tag: value}`` of one ``metrics.jsonl`` row (``seeds``: the seed of
  each entry of the row's ``per_seed`` lists)."""
  out = {}
  for key, value in row.items():
    if key == "step":
      continue
    if key == "per_seed":
      for k, values in value.items():
        for seed, v in zip(seeds, values):
          if v is not None:
            out[f"{scalar_name(k)}/seed_{seed}"] = float(v)
    elif value is None:
      out[scalar_name(key)] = math.nan
    elif isinstance(value, (bool, int, float)):
      out[scalar_name(key)] = float(value)
  return out


def config_text(config: dict) -> str:
  """The config as TensorBoard's (Markdown) text: JSON in a code block."""
  return "```\n" + json.dumps(config, indent=2, sort_keys=True, default=str) + "\n```"


def event_files(workdir: str) -> list[str]:
  """The event files in ``workdir`` (sorted, as TensorBoard reads them)."""
  return sorted(glob.glob(os.path.join(glob.escape(workdir), "events.out.tfevents.*")))


class Board:
  """A run's event writer: ``write(row)`` per ``metrics.jsonl`` row (flushed
  at once, like the row), ``close()`` at the end.

  Args:
    workdir: the run's directory (the event files go next to ``metrics.jsonl``).
    config: the run's config (a dict), written as text when ``workdir`` has no
      event file yet.
    purge_step: TensorBoard hides the events earlier files hold at this step
      and later (a resumed run: its restored step + 1).
    seeds: the seed of each entry of a row's ``per_seed`` lists (N > 1 seeds).
  """

  def __init__(self, workdir: str, config: dict, *, purge_step: int, seeds=()):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    first = not event_files(workdir)
    self._writer = SummaryWriter(logdir=workdir, purge_step=int(purge_step), flush_secs=30,
                                 filename_suffix=f".{time.time_ns()}")
    self._seeds = tuple(seeds)
    if first:
      self._writer.add_text("config", config_text(config), global_step=0)
    self._writer.flush()

  def write(self, row: dict) -> None:
    step = int(row["step"])
    for tag, value in row_scalars(row, self._seeds).items():
      self._writer.add_scalar(tag, value, global_step=step)
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()
