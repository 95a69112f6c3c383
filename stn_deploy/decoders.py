"""One image file → the model's uint8 pixels, by the fastest path that gives the right answer.

Every file goes through :func:`decode_file`. It reads the file once (refusing anything that is
not a regular file), looks at the first bytes, and takes a fast path for the two formats that
matter for throughput:

* **PNG** — `pyspng` (libspng) when it is installed; the pixels are the ones Pillow decodes (PNG
  is lossless; checked once per process against Pillow, and by the tests). Only plain 8-bit
  grey/RGB/RGBA files whose chunks Pillow reads the same way take it (see
  :func:`png_header`); palette, 16-bit, APNG, EXIF-carrying and odd files go to Pillow.
* **JPEG** — `simplejpeg` (libjpeg-turbo) when installed, else Pillow. Pillow parses the header
  either way (size, mode, EXIF orientation: the same acceptance as the reference path).
  ``exact`` decodes at full size: the same pixels as Pillow (same libjpeg-turbo output, checked
  once per process). ``fast`` decodes at 1/2, 1/4 or 1/8 scale in the DCT domain, never below
  ``JPEG_DRAFT_GAP`` (5) × the model's size, exactly as Pillow's ``draft`` picks the scale, then
  resizes as :class:`~stn_deploy.preprocessing.Preprocessing` says. A grayscale model gets the
  luma plane without colour conversion.

Anything else, and anything unusual or failing on a fast path, is decoded by
:func:`stn_deploy.images.decode` (Pillow): the reference path training uses, with its guards
(size limit before decoding, non-regular files) and its error texts. The fast paths therefore
only ever produce successes; every error row comes from the reference path.

The optional libraries are imported on first use. ``DecodeSpec(libraries=False)`` (or the
environment variable ``STN_DEPLOY_DECODERS=pillow``) keeps to Pillow, which every install has.
``benchmarks/DECODE.md`` has the measurements behind these choices.
"""

from __future__ import annotations

import io
import math
import os
import struct
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

from .decode_warnings import capture as capture_warnings
from .fileio import read_regular_file
from .images import DEFAULT_MAX_PIXELS, ORIENTATION, SWAPS_AXES, DecodeResult, decode, decode_bytes
from .preprocessing import Preprocessing

DECODE_MODES = ("auto", "fast", "exact")
KINDS = ("jpeg", "png", "other")
# --decode auto, per input kind. JPEG: the reduced-scale decode met the accuracy rule (top-1
# agreement >= 99.5% with the full decode, accuracy within 0.2 points, digits test split at 4x
# and 16x the model's size; benchmarks/DECODE.md). PNG and the rest have one decode: fast and
# exact give the same pixels.
AUTO_MODES = {"jpeg": "fast", "png": "exact", "other": "exact"}
# The reduced JPEG is at least this many times the model's size before the final resize. At 5
# the accuracy rule held at every size measured (3x to 60x the model's size, square, 4:3 and
# 16:9, fp32 and int8). At 4 it failed with the fp32 digits model at 16x and 32x (decoded at 1/4
# and 1/8 to exactly 4x: 3 and 4 of 1,456 digits lost, 0.21 and 0.27 points), and at 2 and 3 at
# most sizes: the DCT scaling's box filter, composed with the resize, blurs more than the resize
# alone (benchmarks/DECODE.md).
JPEG_DRAFT_GAP = 5

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # the EXIF orientation → transposition table of PIL.ImageOps.exif_transpose


def file_kind(head: bytes) -> str:
    """``jpeg``, ``png`` or ``other``, from a file's first bytes (never from its name)."""
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(JPEG_SIGNATURE):
        return "jpeg"
    return "other"


@dataclass(frozen=True)
class DecodeSpec:
    """How a run decodes: the model's preprocessing, ``--decode``, the pixel limit, and whether
    the optional decoder libraries may be used. Picklable (it travels to decode processes)."""

    preprocessing: Preprocessing
    mode: str = "auto"
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    libraries: bool = True
    jpeg_gap: float = JPEG_DRAFT_GAP

    def __post_init__(self) -> None:
        if self.mode not in DECODE_MODES:
            raise ValueError(f"decode mode must be one of {', '.join(DECODE_MODES)}, got {self.mode!r}")
        if self.jpeg_gap < 1:
            raise ValueError(f"jpeg_gap must be >= 1, got {self.jpeg_gap}")
        if os.environ.get("STN_DEPLOY_DECODERS", "").lower() == "pillow":
            object.__setattr__(self, "libraries", False)

    def mode_for(self, kind: str) -> str:
        """``fast`` or ``exact`` for an input kind (``jpeg``, ``png``, ``other``)."""
        return AUTO_MODES[kind] if self.mode == "auto" else self.mode

    def draft_size(self) -> tuple[int, int]:
        """(width, height) the reduced-scale JPEG decode must not go below."""
        h, w = self.preprocessing.image_size
        return (math.ceil(w * self.jpeg_gap), math.ceil(h * self.jpeg_gap))

    def describe(self) -> dict[str, Any]:
        """For ``--json``: the mode asked for, what each input kind gets, the libraries in use."""
        return {
            "mode": self.mode,
            "by_kind": {kind: self.mode_for(kind) for kind in KINDS},
            "jpeg_min_scale_vs_model": self.jpeg_gap,
            "libraries": {
                "simplejpeg": _version(_simplejpeg()) if self.libraries else None,
                "pyspng": _version(_pyspng()) if self.libraries else None,
                "pillow": Image.__version__,
            },
        }


def _version(module: ModuleType | None) -> str | None:
    return None if module is None else str(getattr(module, "__version__", "?"))


# -- the optional libraries: imported on first use, each checked once against Pillow ------------
@cache
def _simplejpeg() -> ModuleType | None:
    try:
        import simplejpeg  # optional (extra "fast-decode"): JPEG with DCT scaling, 10-15% faster than Pillow
    except ImportError:
        return None
    return simplejpeg if _simplejpeg_matches_pillow(simplejpeg) else None


@cache
def _pyspng() -> ModuleType | None:
    try:
        import pyspng  # optional (extra "fast-decode"): libspng decodes a small PNG ~3x faster than Pillow
    except ImportError:
        return None
    return pyspng if _pyspng_matches_pillow(pyspng) else None


def _probe_pixels() -> np.ndarray:
    """47x37 RGB: smooth colour ramps plus a deterministic hash pattern (detail at every scale)."""
    y, x = np.mgrid[0:37, 0:47]
    detail = (x * 7919 + y * 104729 + x * y * 31) % 61
    return np.stack([(x * 5 + detail) % 256, (y * 6 + 2 * detail) % 256, (x * y + 3 * detail) % 256], axis=-1).astype(
        np.uint8
    )


def _simplejpeg_matches_pillow(simplejpeg: ModuleType) -> bool:
    """The same libjpeg-turbo output as Pillow's (4:2:0 chroma, full and 1/2..1/8 scale, RGB and luma)?
    If a future build differed by even one level, ``exact`` would not be exact: then Pillow decodes."""
    buf = io.BytesIO()
    Image.fromarray(_probe_pixels()).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    try:
        for scale in (1, 2, 8):
            for mode in ("RGB", "L"):
                with Image.open(io.BytesIO(data)) as im:
                    w, h = im.size
                    im.draft(mode, (w // scale, h // scale))
                    ref = np.asarray(im.convert(mode) if im.mode != mode else im)
                got = simplejpeg.decode_jpeg(
                    data,
                    colorspace="RGB" if mode == "RGB" else "GRAY",
                    min_width=-(-w // scale),
                    min_height=-(-h // scale),
                )
                if got.reshape(ref.shape).tobytes() != ref.tobytes():
                    return False
    except Exception:  # noqa: BLE001 - a broken build is simply not used
        return False
    return True


def _pyspng_matches_pillow(pyspng: ModuleType) -> bool:
    """pyspng decodes a known PNG (each colour type the fast path takes, all five row filters) to
    its pixels? Built here with zlib, so the check costs no Pillow plugin in a PNG-only run."""
    pixels = _probe_pixels()
    try:
        for mode, arr in (("RGB", pixels), ("L", pixels[..., 0]), ("RGBA", np.dstack([pixels, pixels[..., 1:2]]))):
            if pyspng.load(_png_bytes(arr), mode).reshape(arr.shape).tobytes() != arr.tobytes():
                return False
    except Exception:  # noqa: BLE001
        return False
    return True


def _png_bytes(arr: np.ndarray) -> bytes:
    """A PNG of 8-bit ``arr`` (HW, HWC with 3 or 4 channels), rows filtered None/Sub/Up/Average/Paeth in turn."""
    h, w = arr.shape[:2]
    bpp = 1 if arr.ndim == 2 else arr.shape[2]
    rows = arr.reshape(h, w * bpp).astype(np.int32)
    raw = bytearray()
    for y in range(h):
        cur, up = rows[y], rows[y - 1] if y else np.zeros_like(rows[0])
        left = np.concatenate([np.zeros(bpp, np.int32), cur[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), up[:-bpp]])
        kind = y % 5
        if kind == 0:
            pred = np.zeros_like(cur)
        elif kind == 1:
            pred = left
        elif kind == 2:
            pred = up
        elif kind == 3:
            pred = (left + up) // 2
        else:
            p = left + up - upleft
            pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        raw.append(kind)
        raw += ((cur - pred) % 256).astype(np.uint8).tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    colour = {1: 0, 3: 2, 4: 6}[bpp]
    return (
        PNG_SIGNATURE
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(bytes(raw)))
        + chunk(b"IEND", b"")
    )


# -- one file -------------------------------------------------------------------------------------
def decode_file(path: Path, spec: DecodeSpec, out: np.ndarray) -> DecodeResult:
    """Decode ``path`` into ``out`` (uint8, ``(H, W, C)`` of the model's size) and say how.

    Returns a :class:`~stn_deploy.images.DecodeResult` without ``array`` (the pixels are in
    ``out``, written only on success), with ``error`` (the reference path's text), the decoder's
    ``warnings`` and ``decoder``: which path produced the pixels.
    """
    caught: list[str] = []
    with capture_warnings(caught):
        decoder, error, warnings = decode_into(path, spec, out, caught)
    return DecodeResult(path, error=error, warnings=warnings, decoder=decoder)


def decode_into(path: Path, spec: DecodeSpec, out: np.ndarray, caught: list[str]) -> tuple[str, str | None, list[str]]:
    """:func:`decode_file` for a caller that captures warnings itself (one capture block for a
    whole chunk of files: ``caught`` is its list, emptied here). Returns (decoder, error, warnings)."""
    kind = "other"
    try:
        data = read_regular_file(path)  # None for anything but a regular file; b"" when empty
        kind = file_kind(data[:8]) if data else "other"
        how = _decode_bytes(kind, data, spec, out) if data else None
    except Exception:  # noqa: BLE001 - anything unusual: the reference path decides, and words the error
        how = None
    if how is not None:
        warnings = caught[:]
        caught.clear()
        return how, None, warnings
    caught.clear()  # an abandoned fast attempt's warnings: the reference path repeats them
    # The reference path.
    draft = None
    if spec.mode_for("jpeg") == "fast":
        draft = ("L" if spec.preprocessing.channel_order == "L" else "RGB", spec.draft_size())
    result = decode(path, spec.preprocessing, max_pixels=spec.max_pixels, draft=draft)
    if result.array is not None:
        out[...] = result.array.reshape(out.shape)
    return f"{kind}:pillow" + (" fast" if kind == "jpeg" and draft is not None else ""), result.error, result.warnings


def decode_data(data: bytes, name: str, spec: DecodeSpec, out: np.ndarray) -> DecodeResult:
    """:func:`decode_file` for a file whose bytes were read elsewhere (an object-store file read in
    a Ray task): the same fast paths, the same reference path and error texts; ``name`` labels it."""
    caught: list[str] = []
    kind = file_kind(data[:8]) if data else "other"
    with capture_warnings(caught):
        try:
            how = _decode_bytes(kind, data, spec, out) if data else None
        except Exception:  # noqa: BLE001 - anything unusual: the reference path decides, and words the error
            how = None
        if how is not None:
            return DecodeResult(Path(name), warnings=caught[:], decoder=how)
        caught.clear()
    draft = None
    if spec.mode_for("jpeg") == "fast":
        draft = ("L" if spec.preprocessing.channel_order == "L" else "RGB", spec.draft_size())
    result = decode_bytes(data, name, spec.preprocessing, max_pixels=spec.max_pixels, draft=draft)
    if result.array is not None:
        out[...] = result.array.reshape(out.shape)
        result.array = None
    result.decoder = f"{kind}:pillow" + (" fast" if kind == "jpeg" and draft is not None else "")
    return result


def _decode_bytes(kind: str, data: bytes, spec: DecodeSpec, out: np.ndarray) -> str | None:
    if kind == "png":
        return _png(data, spec, out)
    if kind == "jpeg":
        return _jpeg(data, spec, out)
    return None


def _too_big(width: int, height: int, spec: DecodeSpec) -> bool:
    """Over --max-pixels, or over twice PIL's own limit: the reference path refuses it, in its words."""
    pixels = width * height
    pil_limit = Image.MAX_IMAGE_PIXELS
    return (spec.max_pixels is not None and pixels > spec.max_pixels) or (
        pil_limit is not None and pixels > 2 * pil_limit
    )


def _finish(
    arr: np.ndarray, mode: str, pre: Preprocessing, out: np.ndarray, transpose: Image.Transpose | None = None
) -> None:
    """Decoded pixels in PIL ``mode`` → convert, orient and resize exactly as the reference path does."""
    h, w = pre.image_size
    if transpose is None and mode == pre.channel_order and arr.shape[:2] == (h, w):
        out[...] = arr.reshape(out.shape)  # already the model's size and mode: nothing to compute
        return
    image = Image.fromarray(arr, mode)
    if transpose is not None:
        image = image.transpose(transpose)
    out[...] = pre.to_uint8(image).reshape(out.shape)


# -- PNG ------------------------------------------------------------------------------------------
_PNG_MODES = {0: "L", 2: "RGB", 6: "RGBA"}  # 8-bit colour types Pillow opens in these modes (libspng cannot output LA)
# Ancillary chunks that change nothing Pillow does with the pixels (it ignores gamma, chromaticity,
# sRGB intent, resolution, time, background and significant bits when converting), with the
# length Pillow's own parser needs where it parses them (shorter would fail in Pillow).
_PNG_HARMLESS = {b"gAMA": 4, b"cHRM": 0, b"sRGB": 1, b"pHYs": 9, b"tEXt": 0, b"tIME": 0, b"bKGD": 0, b"sBIT": 0}
# tEXt keywords Pillow reads an orientation from (ImageOps.exif_transpose): such files go to Pillow.
_PNG_EXIF_TEXT = (b"Raw profile type exif\0", b"XML:com.adobe.xmp\0")


def png_header(data: bytes) -> tuple[int, int, str] | None:
    """(width, height, PIL mode) when the fast PNG path gives exactly Pillow's pixels, else None.

    Accepted: one IHDR (8-bit grey, RGB or RGBA; standard compression and filter; interlaced
    or not), consecutive IDATs, IEND, and only the harmless ancillary chunks above, every chunk's
    CRC intact. Palette, 16-bit and sub-byte depths, grey+alpha, tRNS, iCCP, compressed text,
    EXIF (eXIf, or a text chunk carrying it) and animation chunks all go to Pillow. (A file
    crafted with correct CRCs around a zlib stream whose own checksum is wrong would decode here
    and be refused by Pillow; any damage in storage or transfer breaks a CRC first.)
    """
    if len(data) < 45 or data[12:16] != b"IHDR" or struct.unpack_from(">I", data, 8)[0] != 13:
        return None
    width, height, depth, colour, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    if depth != 8 or colour not in _PNG_MODES or compression or filtering or interlace > 1 or not width or not height:
        return None
    if zlib.crc32(data[12:29]) != struct.unpack_from(">I", data, 29)[0]:
        return None
    pos, end, state = 33, len(data), "header"  # header → data (in IDATs) → after
    while True:
        if pos + 12 > end:
            return None  # truncated before IEND
        length, ctype = struct.unpack_from(">I4s", data, pos)
        nxt = pos + 12 + length
        if nxt > end:
            return None
        if ctype == b"IDAT":
            if state == "after":
                return None  # image data split by another chunk
            state = "data"
        elif ctype == b"IEND":
            return (width, height, _PNG_MODES[colour]) if state != "header" else None
        else:
            if state == "data":
                state = "after"
            need = _PNG_HARMLESS.get(ctype)
            if need is None or length < need:
                return None
            if ctype == b"tEXt" and data.startswith(_PNG_EXIF_TEXT, pos + 8):
                return None
        # Every CRC intact, the image data's too. Pillow checks the zlib stream's own checksum
        # (adler32) and refuses a damaged stream; libspng, as pyspng sets it up, does not. A
        # damaged IDAT fails its CRC here, and Pillow gives its verdict.
        if (
            zlib.crc32(memoryview(data)[pos + 4 : pos + 8 + length])
            != struct.unpack_from(">I", data, pos + 8 + length)[0]
        ):
            return None
        pos = nxt


def _png(data: bytes, spec: DecodeSpec, out: np.ndarray) -> str | None:
    spng = _pyspng() if spec.libraries else None
    header = png_header(data) if spng is not None else None
    if header is None:
        return None
    width, height, mode = header
    if _too_big(width, height, spec):
        return None
    arr = spng.load(data, mode)
    if arr.shape[:2] != (height, width):
        return None
    _finish(arr, mode, spec.preprocessing, out)
    return "png:pyspng"


# -- JPEG -----------------------------------------------------------------------------------------
def jpeg_scale(width: int, height: int, want: tuple[int, int]) -> int:
    """The DCT scale denominator (1, 2, 4 or 8) Pillow's ``draft`` picks for ``want`` = (w, h):
    the largest that keeps the decoded image at least ``want`` in both directions."""
    room = min(width // max(1, want[0]), height // max(1, want[1]))
    return next((s for s in (8, 4, 2) if room >= s), 1)


def _jpeg(data: bytes, spec: DecodeSpec, out: np.ndarray) -> str | None:
    sj = _simplejpeg() if spec.libraries else None
    if sj is None:
        return None
    # Pillow's parser reads the header: the same files accepted, the same size, mode and EXIF.
    with Image.open(io.BytesIO(data)) as im:
        if im.format != "JPEG" or im.mode not in ("L", "RGB"):
            return None  # CMYK/YCCK, MPO and friends: the reference path
        width, height, mode = im.width, im.height, im.mode
        orientation = im.getexif().get(ORIENTATION, 1)
    if _too_big(width, height, spec):
        return None
    fast = spec.mode_for("jpeg") == "fast"
    scale = 1
    if fast:
        want = spec.draft_size()
        if orientation in SWAPS_AXES:
            want = (want[1], want[0])
        scale = jpeg_scale(width, height, want)
        if scale > 1 and spec.preprocessing.channel_order == "L":
            mode = "L"  # the luma plane straight from the decoder (what Pillow's draft("L") gives)
    arr = sj.decode_jpeg(
        data,
        colorspace="GRAY" if mode == "L" else "RGB",
        min_width=-(-width // scale),
        min_height=-(-height // scale),
    )
    if arr.shape[:2] != (-(-height // scale), -(-width // scale)):
        return None
    _finish(arr[..., 0] if mode == "L" else arr, mode, spec.preprocessing, out, _TRANSPOSE.get(orientation))
    return f"jpeg:simplejpeg 1/{scale}" if scale > 1 else "jpeg:simplejpeg"
