"""Models: encoders and multi-task architectures (the only place importing flax)."""

from mtljax.models import encoders
from mtljax.models import multitask
from mtljax.models.multitask import (ENCODERS, HEADS, Architecture, Model, Trunk, archs,
                                     make_model, register)
