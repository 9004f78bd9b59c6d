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
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterable, Iterator


class ConfigError(ValueError):
  """A config value is wrong; the message starts with ``config.<path>``."""


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
