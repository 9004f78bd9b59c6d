"""mtljax: supervised multi-task and transfer learning in JAX."""

# First, before any module below can start a JAX backend: XLA_FLAGS that work
# around bugs of the pinned XLA (mtljax/xla_workarounds.py).
from mtljax import xla_workarounds as _xla_workarounds

_xla_workarounds.apply()

# pylint: disable=g-import-not-at-top,wrong-import-position
from mtljax import build
from mtljax import data
from mtljax import gradients
from mtljax import jacobians
from mtljax import models
from mtljax import objectives
from mtljax import optim
from mtljax import params
from mtljax import steps
from mtljax import tasks
from mtljax import train

__version__ = "0.1.0"
