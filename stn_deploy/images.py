"""Image files on disk → model input arrays: discovery, safe decoding, batching (no torch).

Files are chosen by extension (:data:`IMAGE_EXTENSIONS`); whether one really is an image is
decided by decoding it, and a file that fails becomes a per-file :class:`DecodeResult` with the
error, never an exception that stops a run. Conversion (grayscale, RGBA, palette, 16-bit),
resizing and normalization are :class:`~stn_deploy.preprocessing.Preprocessing`'s job, the one
definition shared with training.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .decode_warnings import capture as capture_warnings
from .errors import ImageError, one_line
from .preprocessing import Preprocessing

# PNG, JPEG, BMP, WebP, TIFF, GIF (first frame), Netpbm PPM/PGM. Training (imagefolder:) and
# stn-infer read the same set, so a folder a model was trained on can be classified as it is.
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
)
DEFAULT_MAX_PIXELS = 50_000_000  # 50 MP: decompression-bomb guard, per file
ORIENTATION = 0x0112  # the EXIF Orientation tag
SWAPS_AXES = frozenset({5, 6, 7, 8})  # orientations that transpose width and height
_log = logging.getLogger(__name__)


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
        raise ImageDirectoryError(f"{root}: no image files{extra} (looked for {', '.join(sorted(exts))}, recursively)")
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return ImageListing(root=root, files=files, skipped=skipped)


def _is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return False


def _raise_walk_error(exc: OSError) -> None:
    raise ImageDirectoryError(f"{exc.filename}: {exc.strerror or exc}")


def open_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft: tuple[str, tuple[int, int]] | None = None,
    warnings_out: list[str] | None = None,
) -> Image.Image:
    """Open and fully decode one image file (first frame of an animation), checking its size first.

    The header is read before any pixel is decoded, so an oversized image (a decompression bomb)
    is refused without allocating it. Every failure is an :class:`ImageError` ``"path: problem"``.
    PIL's own limit (``Image.MAX_IMAGE_PIXELS``, which ``stn-infer`` sets to ``--max-pixels``) is
    a second line: above twice it, ``Image.open`` itself refuses.

    The image comes upright: an EXIF (or XMP) orientation tag is applied and removed, as a
    viewer shows the picture. ``draft=(mode, (width, height))`` lets a JPEG decode at 1/2, 1/4 or
    1/8 scale in the DCT domain, no smaller than that size once upright (PIL's ``draft``; other
    formats ignore it). Warnings the decoder raises are appended to ``warnings_out``, or logged
    (``stn_deploy.images``, level INFO) when it is None; they never reach stderr by themselves.
    """
    # -- issue 13: EXIF orientation, draft (reduced-scale JPEG) and captured warnings ------------
    path = Path(path)
    return _with_warnings(
        lambda: _open_image(path, str(path), max_pixels, draft, is_empty=lambda: _is_empty(path)), path, warnings_out
    )


def open_image_bytes(
    data: bytes,
    name: str,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft: tuple[str, tuple[int, int]] | None = None,
    warnings_out: list[str] | None = None,
) -> Image.Image:
    """:func:`open_image` for an image held in memory (an upload, an object-store file read
    elsewhere): the same decoder, guards and orientation; errors are ``"name: problem"``."""
    return _with_warnings(
        lambda: _open_image(io.BytesIO(data), name, max_pixels, draft, is_empty=lambda: not data), name, warnings_out
    )


def _with_warnings(opener: Callable[[], Image.Image], label: object, warnings_out: list[str] | None) -> Image.Image:
    with capture_warnings() as caught:
        image = opener()
    if caught:
        if warnings_out is not None:
            warnings_out.extend(caught)
        else:
            for text in caught:
                _log.info("%s: %s", label, text)
    return image


def _open_image(
    source: Path | io.BytesIO,
    label: str,
    max_pixels: int | None,
    draft: tuple[str, tuple[int, int]] | None,
    *,
    is_empty: Callable[[], bool],
) -> Image.Image:
    """The decoder and its guards for a path or an in-memory file; every error names ``label``."""
    try:
        if isinstance(source, Path) and not stat.S_ISREG(source.stat().st_mode):
            raise ImageError(f"{label}: not a regular file")  # a named pipe would block the decoder forever
        image = Image.open(source)
        try:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageError(
                    f"{label}: {width}x{height} = {width * height:,} pixels exceeds the limit of "
                    f"{max_pixels:,} (possible decompression bomb; raise --max-pixels to allow it)"
                )
            if draft is not None and image.format == "JPEG":
                mode, (w, h) = draft
                if image.getexif().get(ORIENTATION, 1) in SWAPS_AXES:
                    w, h = h, w  # the draft is taken before the rotation
                if min(width // w, height // h) >= 2:  # it can reduce (else: the full decode, unchanged)
                    image.draft(mode, (w, h))
            image.load()  # a freshly opened animation (GIF, APNG, multi-page TIFF) is on its first frame
            _exif_transpose(image)
        except BaseException:
            image.close()
            raise
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{label}: refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        if is_empty():
            raise ImageError(f"{label}: empty file (0 bytes)") from None
        raise ImageError(f"{label}: not an image PIL can decode (unknown or corrupt format)") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        if isinstance(exc, OSError) and exc.filename is not None:  # could not open the file at all
            raise ImageError(f"{label}: {exc.strerror or exc}") from None
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise ImageError(f"{label}: cannot decode ({msg})") from None
    return image


def _exif_transpose(image: Image.Image) -> None:
    """Apply the orientation tag in place; unreadable EXIF is a warning, not a lost image."""
    try:
        if image.getexif().get(ORIENTATION, 1) == 1:  # getexif also reads XMP's, as exif_transpose does
            return
        from PIL import ImageOps  # lazy: only an image with an orientation needs it (start-up of stn-infer)

        ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:  # noqa: BLE001 - Pillow's EXIF parser on hostile metadata
        warnings.warn(f"EXIF orientation ignored ({one_line(exc, 200)})", UserWarning, stacklevel=2)


@dataclass
class DecodeResult:
    """One file's model input (``array``, float32 CHW) or the error that stopped it."""

    path: Path
    array: np.ndarray | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)  # the decoder's warnings (issue 13)
    decoder: str = "pillow"  # which decode path produced it (stn_deploy.decoders)

    @property
    def ok(self) -> bool:
        return self.error is None


def decode(
    path: Path,
    preprocessing: Preprocessing,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft: tuple[str, tuple[int, int]] | None = None,
) -> DecodeResult:
    """Decode and preprocess one file; failures are returned, not raised (``draft``: see :func:`open_image`)."""
    return _decode(
        path,
        str(path),
        lambda caught: open_image(path, max_pixels=max_pixels, draft=draft, warnings_out=caught),
        preprocessing,
    )


def decode_bytes(
    data: bytes,
    name: str | os.PathLike[str],
    preprocessing: Preprocessing,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft: tuple[str, tuple[int, int]] | None = None,
) -> DecodeResult:
    """:func:`decode` for a file whose bytes were read elsewhere (an upload to stn-serve, an
    object-store file read in a Ray task): the same decoder, guards, pixels and error texts.
    ``name`` only labels the file (a path or a URI)."""
    label = str(name)
    return _decode(
        Path(label),
        label,
        lambda caught: open_image_bytes(data, label, max_pixels=max_pixels, draft=draft, warnings_out=caught),
        preprocessing,
    )


def _decode(
    path: Path, label: str, opener: Callable[[list[str]], Image.Image], preprocessing: Preprocessing
) -> DecodeResult:
    caught: list[str] = []
    try:
        with capture_warnings(caught), opener(caught) as image:
            pixels = preprocessing.to_uint8(image)  # convert() may warn too (palette transparency)
    except ImageError as exc:
        # The row already names the file: keep only the problem.
        return DecodeResult(path, error=str(exc).removeprefix(f"{label}: "), warnings=caught)
    except Exception as exc:  # noqa: BLE001 - a decoder bug on one hostile file must not stop the run
        return DecodeResult(path, error=f"cannot decode ({one_line(exc, 200)})", warnings=caught)
    return DecodeResult(path, array=pixels, warnings=caught)


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
