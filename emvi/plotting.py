"""Figure helpers shared by the experiments: a non-interactive pyplot, image grids, saving.

matplotlib is imported only when a figure is drawn (``pyplot()``), so importing this module
costs nothing and the library never needs a display.

Example:
  >>> grid = image_grid(np.ones((3, 4)), rows=1, cols=3, background=0.0)
  >>> grid.shape  # three 2x2 images with one-pixel borders between them
  (2, 8)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(images: np.ndarray, rows: int, cols: int, *, background: float = 0.3) -> np.ndarray:
    """Tiles square images (flattened, shape (num, side**2)) into one 2-D array.

    Images fill the grid row by row (at most ``rows * cols`` are shown), separated by
    one-pixel borders of value ``background``.

    Args:
      images: shape (num, side**2), any real values (plotted with a fixed vmin/vmax).
      rows, cols: grid size.
      background: value of the borders and of empty cells.

    Returns:
      Shape (rows * (side + 1) - 1, cols * (side + 1) - 1).

    Raises:
      ValueError: if the images are not square.
    """
    images = np.asarray(images)
    side = round(math.sqrt(images.shape[-1]))
    if side * side != images.shape[-1]:
        raise ValueError(f"images must be flattened squares; got {images.shape[-1]} pixels.")
    step = side + 1
    grid = np.full((rows * step - 1, cols * step - 1), background, dtype=np.float64)
    for i, img in enumerate(images[: rows * cols]):
        r, c = divmod(i, cols)
        grid[r * step : r * step + side, c * step : c * step + side] = img.reshape(side, side)
    return grid


def square_grid(images: np.ndarray, *, background: float = 0.3) -> np.ndarray:
    """:func:`image_grid` with ``ceil(sqrt(num))`` columns and as many rows as needed."""
    num = len(images)
    cols = max(1, math.ceil(math.sqrt(num)))
    return image_grid(images, max(1, math.ceil(num / cols)), cols, background=background)


def save(fig, path: str | Path, *, dpi: int = 120) -> Path:
    """Lays out ``fig`` (``tight_layout``), writes it to ``path`` and closes it."""
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
