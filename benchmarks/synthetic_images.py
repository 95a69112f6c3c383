"""Deterministic synthetic image sets for the stn-infer benchmarks (numpy + Pillow only).

* :func:`photo_like`: a natural-looking picture — a smooth colour field, soft-edged shapes
  (ellipses, rectangles, polygons), a mid-frequency texture and fine grain — so a JPEG encoder
  spends its bits the way it does on a photograph (flat-noise or flat-colour images compress
  very differently and decode at different speeds).
* :func:`write_photos` / :func:`write_pngs`: directories of such files, 100 per sub-directory,
  written once (a directory that already holds enough files is reused).
* :func:`write_digits_split`: the digits test split upscaled to a given size and written as
  JPEG, one folder per class (the accuracy rule of issue 13).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """One photo-like RGB image, a pure function of (width, height, seed)."""
    rng = np.random.default_rng(seed)
    # A smooth background: a few random colours blown up bicubically (sky, walls, ground).
    gh, gw = int(rng.integers(2, 5)), int(rng.integers(3, 6))
    grid = rng.integers(0, 256, (gh, gw, 3), dtype=np.uint8)
    image = Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)
    # Objects: shapes of random colours and sizes, drawn at half size and scaled up (soft edges).
    hw, hh = max(1, width // 2), max(1, height // 2)
    layer = image.resize((hw, hh), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(layer)
    scale = min(hw, hh)
    for _ in range(int(rng.integers(6, 14))):
        cx, cy = rng.uniform(0, hw), rng.uniform(0, hh)
        r = rng.uniform(0.05, 0.35) * scale
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        box = [cx - r, cy - r * rng.uniform(0.4, 1.0), cx + r, cy + r * rng.uniform(0.4, 1.0)]
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            pts = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.sort(rng.uniform(0, 2 * np.pi, 5))]
            draw.polygon(pts, fill=colour)
    image = Image.blend(image, layer.resize((width, height), Image.Resampling.BILINEAR), 0.85)
    # Texture (mid frequencies) and sensor-like grain (high frequencies), one grey layer around 128.
    th, tw = max(2, height // 8), max(2, width // 8)
    texture = Image.fromarray(rng.integers(0, 256, (th, tw), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    noise = np.asarray(texture, dtype=np.uint8) // 6 + rng.integers(107, 120, (height, width), dtype=np.uint8)
    grey = Image.fromarray(noise, "L")
    return ImageChops.add(image, Image.merge("RGB", (grey, grey, grey)), scale=1.0, offset=-128)


def _count(directory: Path, ext: str) -> int:
    return sum(1 for _ in directory.rglob(f"*{ext}")) if directory.exists() else 0


def write_photos(directory: Path, count: int, width: int, height: int, *, quality: int = 90, seed: int = 0) -> int:
    """``count`` photo-like JPEGs (quality ``quality``) in sub-directories of 100; returns how many were written."""
    if _count(directory, ".jpg") >= count:
        return 0
    for i in range(count):
        sub = directory / f"{i // 100:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        photo_like(width, height, seed * 1_000_003 + i).save(sub / f"{i:06d}.jpg", quality=quality)
    return count


def write_pngs(directory: Path, count: int, size: int = 32, *, seed: int = 0) -> int:
    """``count`` smooth-ish random ``size``×``size`` RGB PNGs, 100 per sub-directory, the
    sub-directories grouped 100 to a ``part<k>`` directory: ``part0`` alone holds the first
    10,000 files, so one tree serves runs of 10,000 and of 100,000 files."""
    if _count(directory, ".png") >= count:
        return 0
    rng = np.random.default_rng(seed)
    for i in range(count):
        sub = directory / f"part{i // 10_000}" / f"{(i // 100) % 100:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        # Smooth-ish content (not pure noise) so PNG compression behaves like real small images.
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((size, size), Image.Resampling.BILINEAR).save(sub / f"{i:06d}.png")
    return count
