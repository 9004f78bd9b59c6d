"""Data: bundled TFDS builders, catalog loading, task and example sampling."""

from mtljax.data import builders  # registers the bundled builders with TFDS
from mtljax.data import generators
from mtljax.data import loading
from mtljax.data import sampling
from mtljax.data.loading import DataNotAvailableError, MultiTaskData, load
