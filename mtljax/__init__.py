"""mtljax: supervised multi-task and transfer learning in JAX."""

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
