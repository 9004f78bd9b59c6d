"""The errors a user of the config (the command line, a config file) is shown.

The library's functions raise ``ValueError``s that name their own arguments
(``cagrad.c must be in [0, 1), got 2``): a notebook user calling
``gradients.cagrad_weights`` is told about ``c``, not about a config path.
Where a config becomes objects (:mod:`mtljax.build`, and the experiments that
read their own sections), :func:`config_section` turns those errors into a
:class:`ConfigError` that starts with the config path, and the entry point
(``experiments/main.py``) prints a :class:`ConfigError` as one line and exits
with status 2.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


class ConfigError(ValueError):
  """A config value is wrong; the message starts with ``config.<path>``."""


@contextlib.contextmanager
def config_section(path: str) -> Iterator[None]:
  """Inside, a library ``ValueError`` (not already a :class:`ConfigError`)
  becomes ``ConfigError("config.<path>: <its message>")``, chained to it."""
  try:
    yield
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(f"config.{path}: {e}") from e
