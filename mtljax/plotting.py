"""One way to write a figure: ``with figure(path) as (fig, ax): ...``.

matplotlib is imported lazily with the Agg backend (no display needed), and the
figure is laid out, saved and closed when the block ends.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def figure(path: str, ncols: int = 1, figsize=(5, 4)):
  """Yields ``(fig, ax)`` (``ax`` a list when ``ncols > 1``); saves to ``path``."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, ncols, figsize=figsize, squeeze=False)
  try:
    yield fig, (list(axes[0]) if ncols > 1 else axes[0][0])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
  finally:
    plt.close(fig)
