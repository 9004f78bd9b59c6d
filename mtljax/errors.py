"""The errors a user of the config (the command line, a config file) is shown.

The library's functions raise ``ValueError``s that name their own arguments
(``cagrad.c must be in [0, 1), got 2``): a notebook user calling
``gradients.cagrad_weights`` is told about ``c``, not about a config path.
Where a config becomes objects (:mod:`mtljax.build`, and the experiments that
read their own sections), :func:`config_section` turns those errors into a
:class:`ConfigError` that starts with the config path (a message that starts
with the name of one of the section's keys reads as that key's path:
``config.objective.cagrad.c must be ...``), and the entry point
(``experiments/main.py``) prints a :class:`ConfigError` as one line and exits
with status 2.

Every error a user can act on is a :class:`UserError`, raised where the run
meets the outside (build, data access, checkpoints, the workdir) with a
message that says what to do, and carrying its exit status
(:attr:`UserError.exit_code`): :class:`ConfigError` (2), :class:`DataError`,
:class:`CheckpointError`, :class:`WorkdirError` and :class:`RunError` (1).
The entry point has one handler: it prints ``error: <message>`` as one line
and exits with the error's status (a traceback only with ``-v``); any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterable, Iterator


class UserError(Exception):
  """An error the user can act on: its message is one line saying what is
  wrong and what to do; ``exit_code`` is the process's exit status."""
  exit_code = 1


class ConfigError(UserError, ValueError):
  """A config value is wrong; the message starts with ``config.<path>``."""
  exit_code = 2


class DataError(UserError, RuntimeError):
  """The data cannot be read or prepared where the config says (an
  unwritable or missing data directory, a data set not prepared here)."""


class CheckpointError(UserError, RuntimeError):
  """A checkpoint that cannot be written or read (with what to do)."""


class WorkdirError(UserError, RuntimeError):
  """A workdir that cannot be used as asked (with what to do about it)."""


class RunError(UserError, RuntimeError):
  """A run that stopped on its own terms (a non-finite loss), saying why."""


def os_reason(e: BaseException) -> str:
  """What an ``OSError`` in ``e`` or its causes says (``No space left on
  device: '/path'``; the disk full named as such), else ``e``'s first line."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.strerror:
      where = f": {e.filename!r}" if e.filename else ""
      return f"{type(e).__name__}: {e.strerror}{where}"
    e = e.__cause__ or e.__context__
  return ""


def in_section(path: str, message: str, keys: Iterable[str] = ()) -> str:
  """``message`` placed under ``config.<path>``: a message that starts with
  one of the section's ``keys`` (``lr must be > 0``, ``mgda.tol ...``,
  ``rules[...]``) reads as that key's path (``config.optim.lr must be > 0``);
  any other as ``config.<path>: <message>`` (``path`` "": the top level)."""
  where = f"config.{path}" if path else "config"
  head = re.match(r"[A-Za-z_]\w*", message)
  if head and head.group(0) in set(keys):
    return f"{where}.{message}"
  return f"{where}: {message}"


@contextlib.contextmanager
def config_section(path: str, keys: Iterable[str] = (),
                   catch: tuple[type[Exception], ...] = (ValueError,)) -> Iterator[None]:
  """Inside, a library ``ValueError`` (not already a :class:`ConfigError`)
  becomes a :class:`ConfigError` with its message under ``config.<path>``
  (:func:`in_section`; ``keys``: the section's keys), with its traceback and
  cause (a library error raised ``from None`` stays one line). ``catch``: the
  library error types to convert (a missing checkpoint directory is a
  ``FileNotFoundError``)."""
  try:
    yield
  except ConfigError:
    raise
  except catch as e:  # its traceback, and its own cause (None: suppressed)
    raise ConfigError(in_section(path, str(e), keys)).with_traceback(
        e.__traceback__) from e.__cause__
