"""Pieces every multi-run experiment shares: a run's config from the
experiment's, name checks, and writing JSON outputs."""

from __future__ import annotations

import os
from typing import Iterable

import ml_collections

from mtljax import errors
from mtljax import workdir as workdir_lib


def run_config(config: ml_collections.ConfigDict, section: str) -> ml_collections.ConfigDict:
  """A copy of an experiment config without its ``experiment`` key and its own
  ``section`` (e.g. ``transfer``): an ordinary single-run config."""
  c = ml_collections.ConfigDict(config.to_dict())
  del c[section], c["experiment"]
  return c


def check_names(field: str, names: Iterable[str], known: Iterable[str]) -> None:
  unknown = sorted(set(names) - set(known))
  if unknown:
    raise errors.ConfigError(f"config.{field}: unknown {unknown}; known are {tuple(known)}.")


def write_json(workdir: str, name: str, obj) -> None:
  """Strict JSON (NaN written as null and named): :func:`mtljax.workdir.write_json`."""
  workdir_lib.write_json(os.path.join(workdir, name), obj, indent=2)
