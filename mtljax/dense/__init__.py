"""Dense prediction: the per-pixel task kinds ``segmentation``, ``depth`` and
``normals`` (issue 25) -- their losses and masks (:mod:`mtljax.dense.losses`)
and their metrics, exact over a whole split (:mod:`mtljax.dense.metrics`).

Self-contained: nothing here imports the task system or the train step. How
the integration plugs it into :mod:`mtljax.tasks`' scheme (a per-entry loss
and a validity mask, then a masked mean per slot)::

    # a slot group of a dense kind: outs [K, B, H, W, C], ys [K, B, H, W(, c)]
    per_pixel = losses.pixel_loss(kind, outs, ys)           # [K, B, H, W]
    mask = losses.pixel_mask(kind, ys)                      # [K, B, H, W]
    slot_loss = losses.masked_pixel_mean(per_pixel, mask, example_mask)  # [K]
    # (= losses.batch_loss(kind, outs, ys, example_mask); example_mask [K, B]
    #  marks labelled examples: missing examples and missing pixels combine)

    # evaluation, per task (vmap over a task or seed axis as needed):
    sums = metrics.zero_sums(kind, num_classes, convention)
    for batch: sums = metrics.add(sums, metrics.batch_sums(kind, out, y, valid, convention))
    values = metrics.finalize(kind, sums, convention)       # {metric: float}

Metric names per kind are :data:`~mtljax.dense.metrics.METRIC_NAMES`; merge
:data:`~mtljax.dense.metrics.DENSE_METRIC_DIRECTIONS` into
:data:`mtljax.tasks.METRIC_DIRECTIONS` (no name is shared), and use
:func:`mtljax.measure.delta_m` with ``average="per_metric"`` for Nash-MTL's
Δm over all 9 NYUv2 metrics. :func:`~mtljax.dense.losses.check_targets` is the
host-side check of labels a data reader calls (one line naming the file).
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
