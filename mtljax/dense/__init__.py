"""Dense prediction: the per-pixel task kinds ``segmentation``, ``depth`` and
``normals`` (issue 25) -- their losses and masks (:mod:`mtljax.dense.losses`)
and their metrics, exact over a whole split (:mod:`mtljax.dense.metrics`).

Self-contained: nothing here imports the task system or the train step; the
integration plugs these functions into :mod:`mtljax.tasks`' scheme (a
per-entry loss and a validity mask, then a masked mean) and merges
:data:`~mtljax.dense.metrics.DENSE_METRIC_DIRECTIONS` into
:data:`mtljax.tasks.METRIC_DIRECTIONS`.
"""

from mtljax.dense.losses import DENSE_KINDS
from mtljax.dense.losses import batch_loss
from mtljax.dense.losses import check_targets
from mtljax.dense.losses import masked_pixel_mean
from mtljax.dense.losses import pixel_loss
from mtljax.dense.losses import pixel_mask
from mtljax.dense.metrics import CONVENTIONS
from mtljax.dense.metrics import DENSE_METRIC_DIRECTIONS
from mtljax.dense.metrics import METRIC_NAMES

__all__ = ["CONVENTIONS", "DENSE_KINDS", "DENSE_METRIC_DIRECTIONS", "METRIC_NAMES", "batch_loss",
           "check_targets", "masked_pixel_mean", "pixel_loss", "pixel_mask"]
