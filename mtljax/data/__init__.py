"""Data: bundled TFDS builders, catalog loading, task and example sampling."""

from mtljax.data import builders  # registers the bundled builders with TFDS
from mtljax.data import generators
from mtljax.data import loading
from mtljax.data import sampling
from mtljax.data import specs
from mtljax.data import task_data
from mtljax.data import tfds_access
from mtljax.data.loading import load
from mtljax.data.task_data import MultiTaskData
from mtljax.data.tfds_access import DataNotAvailableError
