"""Image files on disk → model input arrays: discovery, safe decoding, batching (no torch).

Files are chosen by extension (:data:`IMAGE_EXTENSIONS`); whether one really is an image is
decided by decoding it, and a file that fails becomes a per-file :class:`DecodeResult` with the
error, never an exception that stops a run. Conversion (grayscale, RGBA, palette, 16-bit),
resizing and normalization are :class:`~stn_deploy.preprocessing.Preprocessing`'s job, the one
definition shared with training.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageError, one_line
from .preprocessing import Preprocessing

# PNG, JPEG, BMP, WebP, TIFF, GIF (first frame), Netpbm PPM/PGM. Training (imagefolder:) and
# stn-infer read the same set, so a folder a model was trained on can be classified as it is.
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
)
DEFAULT_MAX_PIXELS = 50_000_000  # 50 MP: decompression-bomb guard, per file


class ImageDirectoryError(ImageError):
    """The input directory is missing, not a directory, or holds no image files."""

    exit_code = 2


@dataclass(frozen=True)
class ImageListing:
    """The image files under a root, in a stable (sorted) order."""

    root: Path
    files: list[Path]
    skipped: int  # files present whose extension is not an image extension


def find_images(root: str | os.PathLike[str], *, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> ImageListing:
    """Every image file under ``root`` (recursively; hidden files and directories are skipped).

    ``root`` may also be a single image file. A missing path, or a directory without image files,
    raises :class:`ImageDirectoryError`.
    """
    root = Path(root)
    exts = {e.lower() for e in extensions}
    if not root.exists():
        raise ImageDirectoryError(f"{root}: no such file or directory")
    if root.is_file():
        if root.suffix.lower() not in exts:
            raise ImageDirectoryError(f"{root}: not an image file (extensions: {', '.join(sorted(exts))})")
        return ImageListing(root=root.parent, files=[root], skipped=0)
    if not root.is_dir():
        raise ImageDirectoryError(f"{root}: not a directory")
    files: list[Path] = []
    skipped = 0
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise_walk_error):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in exts:
                files.append(Path(dirpath, name))
            else:
                skipped += 1
    if not files:
        extra = f" ({skipped} other files)" if skipped else ""
        raise ImageDirectoryError(
            f"{root}: no image files{extra} (looked for {', '.join(sorted(exts))}, recursively)"
        )
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return ImageListing(root=root, files=files, skipped=skipped)


def _is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return False


def _raise_walk_error(exc: OSError) -> None:
    raise ImageDirectoryError(f"{exc.filename}: {exc.strerror or exc}")


def open_image(path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode one image file (first frame of an animation), checking its size first.

    The header is read before any pixel is decoded, so an oversized image (a decompression bomb)
    is refused without allocating it. Every failure is an :class:`ImageError` ``"path: problem"``.
    PIL's own limit (``Image.MAX_IMAGE_PIXELS``, which ``stn-infer`` sets to ``--max-pixels``) is
    a second line: above twice it, ``Image.open`` itself refuses.
    """
    path = Path(path)
    return _open_checked(path, str(path), max_pixels, is_empty=lambda: _is_empty(path))


def _open_checked(
    source: Path | BinaryIO, name: str, max_pixels: int | None, *, is_empty: Callable[[], bool]
) -> Image.Image:
    """:func:`open_image` on a file (``source`` a Path) or on its bytes already read (a file
    object); the same checks and messages, each beginning with ``name``."""
    try:
        if isinstance(source, Path) and not stat.S_ISREG(source.stat().st_mode):
            raise ImageError(f"{name}: not a regular file")  # a named pipe would block the decoder forever
        image = Image.open(source)
        try:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageError(
                    f"{name}: {width}x{height} = {width * height:,} pixels exceeds the limit of "
                    f"{max_pixels:,} (possible decompression bomb; raise --max-pixels to allow it)"
                )
            image.load()  # a freshly opened animation (GIF, APNG, multi-page TIFF) is on its first frame
        except BaseException:
            image.close()
            raise
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        if is_empty():
            raise ImageError(f"{name}: empty file (0 bytes)") from None
        raise ImageError(f"{name}: not an image PIL can decode (unknown or corrupt format)") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        if isinstance(exc, OSError) and exc.filename is not None:  # could not open the file at all
            raise ImageError(f"{name}: {exc.strerror or exc}") from None
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise ImageError(f"{name}: cannot decode ({msg})") from None
    return image


@dataclass
class DecodeResult:
    """One file's model input (``array``, float32 CHW) or the error that stopped it."""

    path: Path
    array: np.ndarray | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def decode(path: Path, preprocessing: Preprocessing, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> DecodeResult:
    """Decode and preprocess one file; failures are returned, not raised."""
    return _decode(Path(path), str(path), lambda: open_image(path, max_pixels=max_pixels), preprocessing)


# -- decoding bytes already read (stn-infer --engine ray) ----------------------------------------
def decode_bytes(
    data: bytes, path: str | os.PathLike[str], preprocessing: Preprocessing, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> DecodeResult:
    """:func:`decode` for a file whose bytes were read elsewhere (``stn-infer --engine ray`` reads
    files in Ray tasks, from object stores too): the same checks, pixels and error texts.

    ``path`` only names the file (in the result, and in messages before the prefix is cut)."""
    name = str(path)
    return _decode(
        Path(path), name, lambda: _open_checked(io.BytesIO(data), name, max_pixels, is_empty=lambda: not data), preprocessing
    )
# -- end decode_bytes ----------------------------------------------------------------------------


def _decode(path: Path, name: str, opener: Callable[[], Image.Image], preprocessing: Preprocessing) -> DecodeResult:
    try:
        with opener() as image:
            pixels = preprocessing.to_uint8(image)
    except ImageError as exc:
        # The row already names the file: keep only the problem.
        msg = str(exc)
        prefix = f"{name}: "
        return DecodeResult(path, error=msg.removeprefix(prefix))
    except Exception as exc:  # noqa: BLE001 - a decoder bug on one hostile file must not stop the run
        return DecodeResult(path, error=f"cannot decode ({one_line(exc, 200)})")
    return DecodeResult(path, array=pixels)


@dataclass
class DecodedBatch:
    """A batch of files: the model input for those that decoded, and every file's result."""

    results: list[DecodeResult]
    inputs: np.ndarray  # [n_ok, C, H, W] float32, in the order of the ok results

    @property
    def ok_indices(self) -> list[int]:
        return [i for i, r in enumerate(self.results) if r.ok]


def decode_batch(
    paths: Sequence[Path], preprocessing: Preprocessing, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> DecodedBatch:
    """Decode ``paths`` and normalize the ones that succeeded as one [n, C, H, W] array.

    Normalization runs once on the stacked uint8 batch (vectorized), with the same
    :meth:`Preprocessing.normalize` a single image uses.
    """
    results = [decode(p, preprocessing, max_pixels=max_pixels) for p in paths]
    ok = [r.array for r in results if r.ok]
    if ok:
        inputs = preprocessing.normalize(np.stack(ok))
    else:
        inputs = np.zeros((0, *preprocessing.input_shape), dtype=np.float32)
    for r in results:
        r.array = None  # the uint8 pixels are no longer needed; the batch holds the input
    return DecodedBatch(results=results, inputs=inputs)
