"""What the spatial transformer does, as a picture: input images beside their warped versions.

The figure follows the PyTorch STN tutorial: a grid of input images on the left, the same grid
after the transformer on the right. This module needs numpy and pillow only (no torch), so both
``stn-train --visualize`` and the torch-free runtime (``stn-infer --visualize``) use it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .fileio import atomic_path

BACKGROUND = (255, 255, 255)
TILE_BORDER = (200, 200, 200)
TEXT = (20, 20, 20)


def _as_rgb_tiles(images: np.ndarray, name: str) -> np.ndarray:
    """N×H×W, N×H×W×1 or N×H×W×3 uint8 → N×H×W×3 uint8."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 pixels, got {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"{name} must be N×H×W×C with C in (1, 3), got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr


def tile_grid(images: np.ndarray, columns: int, *, zoom: int = 1, gap: int = 2) -> np.ndarray:
    """Lay N×H×W×3 images out row by row, ``columns`` per row, scaled by ``zoom`` (nearest)."""
    n, h, w, _ = images.shape
    if zoom > 1:
        images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
        h, w = h * zoom, w * zoom
    rows = math.ceil(n / columns)
    grid = np.empty((rows * (h + gap) + gap, columns * (w + gap) + gap, 3), np.uint8)
    grid[:] = TILE_BORDER
    for i in range(n):
        r, c = divmod(i, columns)
        top, left = gap + r * (h + gap), gap + c * (w + gap)
        grid[top : top + h, left : left + w] = images[i]
    return grid


def warp_figure(
    inputs: np.ndarray,
    warped: np.ndarray,
    *,
    columns: int | None = None,
    zoom: int | None = None,
    titles: tuple[str, str] = ("Input images", "Transformed images"),
    labels: list[str] | None = None,
) -> Image.Image:
    """The input|warped figure as a PIL image.

    ``inputs`` and ``warped`` are N×H×W×C uint8 (C = 1 or 3) of the same shape; ``labels``
    (optional, one per image) are printed under the figure in grid order.
    """
    a = _as_rgb_tiles(inputs, "inputs")
    b = _as_rgb_tiles(warped, "warped")
    if a.shape != b.shape:
        raise ValueError(f"inputs {a.shape} and warped {b.shape} differ in shape")
    if len(a) == 0:
        raise ValueError("no images to draw")
    n, h, w, _ = a.shape
    columns = columns or max(1, min(8, math.ceil(math.sqrt(n))))
    zoom = zoom or max(1, 96 // max(h, w))
    left, right = tile_grid(a, columns, zoom=zoom), tile_grid(b, columns, zoom=zoom)

    margin, header = 12, 22
    footer = 0
    lines: list[str] = []
    if labels is not None:
        rows = math.ceil(n / columns)
        lines = [" ".join(str(x) for x in labels[r * columns : (r + 1) * columns]) for r in range(rows)]
        footer = 14 * len(lines) + 6
    width = 3 * margin + left.shape[1] + right.shape[1]
    height = header + left.shape[0] + margin + footer
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    canvas.paste(Image.fromarray(left), (margin, header))
    canvas.paste(Image.fromarray(right), (2 * margin + left.shape[1], header))
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, 5), titles[0], fill=TEXT)
    draw.text((2 * margin + left.shape[1], 5), titles[1], fill=TEXT)
    for i, line in enumerate(lines):
        draw.text((margin, header + left.shape[0] + 4 + 14 * i), line, fill=TEXT)
    return canvas


def save_warp_grid(
    inputs: np.ndarray,
    warped: np.ndarray,
    path: str | os.PathLike[str],
    **figure_options,
) -> Path:
    """Write :func:`warp_figure` as a PNG at ``path`` (atomically); returns the path."""
    path = Path(path)
    figure = warp_figure(inputs, warped, **figure_options)
    with atomic_path(path) as tmp:
        figure.save(tmp, format="PNG")
    return path
