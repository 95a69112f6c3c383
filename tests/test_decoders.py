"""The fast decode paths against the reference (Pillow) path, on real files written to disk.

The contract: in ``exact`` mode every path gives the reference path's pixels; every error comes
from the reference path with its text; ``fast`` differs only for JPEGs at least 8 times the
model's size; EXIF orientation is applied everywhere; decoder warnings land in the result.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings

import numpy as np
import pytest
from PIL import Image

from stn_deploy import decoders
from stn_deploy.decode_warnings import capture
from stn_deploy.decoders import DecodeSpec, decode_file, jpeg_scale, png_header
from stn_deploy.images import decode, open_image
from stn_deploy.preprocessing import Preprocessing

RGB = Preprocessing(image_size=(32, 32), mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3), channel_order="RGB")
GRAY = Preprocessing(image_size=(28, 28), mean=(0.5,), std=(0.25,), channel_order="L")
needs_spng = pytest.mark.skipif(decoders._pyspng() is None, reason="pyspng (extra fast-decode) is not installed")
needs_simplejpeg = pytest.mark.skipif(
    decoders._simplejpeg() is None, reason="simplejpeg (extra fast-decode) is not installed"
)


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour plus noise: JPEG-like content with detail at every scale."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    noisy = np.asarray(base, dtype=np.int16) + rng.integers(-25, 26, (h, w, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _decode(path, pre=RGB, **kw):
    pre_shape = (*pre.image_size, pre.channels)
    out = np.full(pre_shape, 7, dtype=np.uint8)
    result = decode_file(path, DecodeSpec(pre, **kw), out)
    return result, out


def _reference(path, pre=RGB, **kw):
    ref = decode(path, pre, **kw)
    return ref, (None if ref.array is None else ref.array.reshape(*pre.image_size, pre.channels))


def _exif(orientation: int, *extra: tuple[int, int, int, int]) -> bytes:
    """A little-endian TIFF/EXIF block with an Orientation tag (and any extra IFD entries)."""
    entries = [(0x0112, 3, 1, orientation), *extra]
    body = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    for tag, typ, count, value in entries:
        body += struct.pack("<HHII", tag, typ, count, value)
    return b"Exif\x00\x00" + body + b"\x00\x00\x00\x00"


# -- PNG ------------------------------------------------------------------------------------------
@needs_spng
@pytest.mark.parametrize("pre", [RGB, GRAY], ids=["rgb-model", "gray-model"])
def test_png_fast_path_gives_pillows_pixels_for_every_8bit_colour_type(tmp_path, pre):
    pixels = _photo(40, 50)
    images = {
        "rgb.png": (Image.fromarray(pixels), {}),
        "gray.png": (Image.fromarray(pixels[..., 1]), {}),
        "rgba.png": (Image.fromarray(np.dstack([pixels, pixels[..., :1]]), "RGBA"), {}),
        "dpi-and-text.png": (Image.fromarray(pixels), {"dpi": (72, 72), "pnginfo": _text_chunk("Comment", "hello")}),
        "model-size.png": (Image.fromarray(pixels[:32, :32]), {}),
    }
    for name, (image, kw) in images.items():
        path = tmp_path / name
        image.save(path, **kw)
        result, got = _decode(path, pre, mode="exact")
        ref, want = _reference(path, pre)
        assert result.ok and ref.ok, name
        assert result.decoder == "png:pyspng", (name, result.decoder)
        np.testing.assert_array_equal(got, want, err_msg=name)


def _text_chunk(key: str, value: str):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(key, value)
    return info


def test_png_files_the_fast_path_cannot_take_are_decoded_by_pillow(tmp_path):
    pixels = _photo(20, 24)
    files = {
        "palette.png": Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE),
        "gray16.png": Image.fromarray(pixels[..., 0].astype(np.uint16) * 257),
        "one-bit.png": Image.fromarray(pixels[..., 0] > 128),
        "gray-alpha.png": Image.fromarray(np.dstack([pixels[..., 0], pixels[..., 2]]), "LA"),
    }
    for name, image in files.items():
        image.save(tmp_path / name)
    rotated = Image.fromarray(pixels)
    rotated.save(tmp_path / "exif.png", exif=_exif(6)[6:])
    for path in sorted(tmp_path.iterdir()):
        assert png_header(path.read_bytes()) is None, path.name
        result, got = _decode(path, mode="exact")
        want = _reference(path)[1]
        assert result.ok and result.decoder == "png:pillow", (path.name, result.decoder)
        np.testing.assert_array_equal(got, want, err_msg=path.name)


# -- JPEG -----------------------------------------------------------------------------------------
@needs_simplejpeg
def test_exact_jpeg_decode_is_pillows_full_decode(tmp_path):
    pixels = _photo(150, 200)
    Image.fromarray(pixels).save(tmp_path / "rgb.jpg", quality=90)
    Image.fromarray(pixels).save(tmp_path / "progressive.jpg", quality=85, progressive=True)
    Image.fromarray(pixels).save(tmp_path / "444.jpg", quality=95, subsampling=0)
    Image.fromarray(pixels[..., 0]).save(tmp_path / "gray.jpg", quality=90)
    for pre in (RGB, GRAY):
        for path in sorted(tmp_path.iterdir()):
            result, got = _decode(path, pre, mode="exact")
            want = _reference(path, pre)[1]
            assert result.decoder == "jpeg:simplejpeg", (path.name, result.decoder)
            np.testing.assert_array_equal(got, want, err_msg=f"{path.name} {pre.channel_order}")


@needs_simplejpeg
@pytest.mark.parametrize(("size", "scale"), [((150, 120), 1), ((340, 320), 2), ((650, 640), 4), ((1300, 1280), 8)])
def test_fast_jpeg_decodes_at_the_scale_pillows_draft_picks_with_the_same_pixels(tmp_path, size, scale):
    path = tmp_path / "photo.jpg"
    Image.fromarray(_photo(size[1], size[0])).save(path, quality=90)
    for pre in (RGB, GRAY):  # no smaller than JPEG_DRAFT_GAP x the model: 160 px for RGB's 32, 140 for GRAY's 28
        assert jpeg_scale(*size, DecodeSpec(pre).draft_size()) == scale
    for pre in (RGB, GRAY):
        result, got = _decode(path, pre, mode="fast")
        assert result.decoder == ("jpeg:simplejpeg" if scale == 1 else f"jpeg:simplejpeg 1/{scale}")
        pillow, want = _decode(path, pre, mode="fast", libraries=False)  # Pillow's draft, the pure-Pillow fallback
        assert pillow.decoder == "jpeg:pillow fast"
        np.testing.assert_array_equal(got, want)
        if scale == 1:  # no reduced scale leaves JPEG_DRAFT_GAP x the model's size: exact pixels
            np.testing.assert_array_equal(got, _reference(path, pre)[1])


def test_jpeg_scale_never_goes_below_the_requested_size():
    for w in range(1, 700, 7):
        for h in range(1, 500, 11):
            s = jpeg_scale(w, h, (64, 64))
            assert s in (1, 2, 4, 8)
            if s > 1:
                assert -(-w // s) >= 64 and -(-h // s) >= 64


# -- the pure-Pillow fallback ---------------------------------------------------------------------
def test_the_pure_pillow_fallback_decodes_everything_the_libraries_do(tmp_path, monkeypatch):
    pixels = _photo(90, 120)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=90)
    Image.fromarray(pixels).save(tmp_path / "b.png")
    Image.fromarray(pixels).save(tmp_path / "c.webp", lossless=True)
    for mode in ("exact", "fast"):
        for path in sorted(tmp_path.iterdir()):
            got = _decode(path, mode=mode)[1]
            pillow, want = _decode(path, mode=mode, libraries=False)
            assert pillow.ok and pillow.decoder.endswith(("pillow", "pillow fast")), pillow.decoder
            np.testing.assert_array_equal(got, want, err_msg=f"{path.name} {mode}")
    monkeypatch.setenv("STN_DEPLOY_DECODERS", "pillow")
    assert DecodeSpec(RGB).libraries is False
    assert _decode(tmp_path / "b.png")[0].decoder == "png:pillow"


def test_missing_libraries_fall_back_to_pillow(tmp_path, monkeypatch):
    """An install without the fast-decode extra: the imports fail, Pillow decodes."""
    import builtins

    real_import = builtins.__import__

    def no_fast_decoders(name, *args, **kwargs):
        if name in ("simplejpeg", "pyspng"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fast_decoders)
    monkeypatch.setattr(decoders, "_simplejpeg", decoders._simplejpeg.__wrapped__)
    monkeypatch.setattr(decoders, "_pyspng", decoders._pyspng.__wrapped__)
    assert decoders._simplejpeg() is None and decoders._pyspng() is None
    Image.fromarray(_photo(40, 40)).save(tmp_path / "a.jpg")
    Image.fromarray(_photo(40, 40)).save(tmp_path / "a.png")
    assert _decode(tmp_path / "a.jpg", mode="exact")[0].decoder == "jpeg:pillow"
    assert _decode(tmp_path / "a.png")[0].decoder == "png:pillow"
    assert DecodeSpec(RGB).describe()["libraries"]["simplejpeg"] is None


# -- bad files: the reference path's rows ---------------------------------------------------------
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_files_get_the_reference_paths_error_texts(tmp_path):
    good_png, good_jpg = tmp_path / "good.png", tmp_path / "good.jpg"
    Image.fromarray(_photo(64, 64)).save(good_png)
    Image.fromarray(_photo(64, 64)).save(good_jpg, quality=90)
    png, jpg = good_png.read_bytes(), good_jpg.read_bytes()
    bad = {
        "empty.png": b"",
        "text.jpg": b"this is not an image\n" * 10,
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpg[:200],
        "corrupt.png": png[:60] + bytes(len(png) - 60),
        "corrupt.jpg": b"\xff\xd8\xff\xe0" + bytes(300),
        "bomb.png": png[:16] + struct.pack(">II", 10_000, 10_000) + png[24:],
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "dir.png").mkdir()
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.png")
    for path in sorted(tmp_path.iterdir()):
        if path.name.startswith("good"):
            continue
        for mode in ("exact", "fast"):
            result, out = _decode(path, mode=mode, max_pixels=50_000_000)
            ref = decode(path, RGB, max_pixels=50_000_000)
            assert not result.ok and result.error == ref.error, (path.name, result.error, ref.error)
            assert (out == 7).all(), path.name  # nothing written for a failed file


def _mutations(data: bytes, rng: np.random.Generator, count: int):
    for _ in range(count):
        d = bytearray(data)
        kind = rng.integers(0, 3)
        if kind == 0:  # flip a few bytes anywhere
            for i in rng.integers(0, len(d), rng.integers(1, 4)):
                d[i] ^= int(rng.integers(1, 256))
        elif kind == 1:  # truncate
            d = d[: int(rng.integers(8, len(d)))]
        else:  # flip bytes in the header region, where the structure is
            for i in rng.integers(0, min(len(d), 120), rng.integers(1, 3)):
                d[i] ^= int(rng.integers(1, 256))
        yield bytes(d)


@pytest.mark.slow
def test_mutated_files_decode_exactly_as_the_reference_path(tmp_path):
    """Seeded fuzzing: whatever a damaged PNG or JPEG is, the fast path's verdict (pixels or
    error text) is the reference path's."""
    rng = np.random.default_rng(13)
    sources = {}
    for ext, kw in (("png", {}), ("jpg", {"quality": 90})):
        buf = io.BytesIO()
        Image.fromarray(_photo(48, 40, seed=3)).save(buf, "PNG" if ext == "png" else "JPEG", **kw)
        sources[ext] = buf.getvalue()
    agreed = {"ok": 0, "error": 0}
    for ext, data in sources.items():
        for i, mutated in enumerate(_mutations(data, rng, 150)):
            path = tmp_path / f"m{i:03d}.{ext}"
            path.write_bytes(mutated)
            result, got = _decode(path, mode="exact")
            ref, want = _reference(path)
            assert result.error == ref.error, (path.name, result.error, ref.error)
            if ref.ok:
                np.testing.assert_array_equal(got, want, err_msg=path.name)
            agreed["ok" if ref.ok else "error"] += 1
    assert agreed["ok"] > 20 and agreed["error"] > 20, agreed  # both verdicts were exercised


# -- EXIF orientation -----------------------------------------------------------------------------
@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_exif_orientation_is_applied_by_every_decode_path(tmp_path, ext):
    """A camera's portrait photo: stored landscape with Orientation 6 (rotate 90° clockwise)."""
    stored = _photo(60, 90)  # h=60, w=90 as stored
    path = tmp_path / f"portrait.{ext}"
    kw = {"quality": 95} if ext == "jpg" else {}
    Image.fromarray(stored).save(path, exif=_exif(6)[6:] if ext == "png" else _exif(6), **kw)
    with open_image(path) as image:
        assert image.size == (60, 90)  # upright: portrait
        upright = np.asarray(image.convert("RGB"))
    with Image.open(path) as raw:
        raw.load()
        np.testing.assert_array_equal(upright, np.asarray(raw.convert("RGB").transpose(Image.Transpose.ROTATE_270)))
    want = _reference(path)[1]
    for mode in ("exact", "fast"):
        for libs in (True, False):
            result, got = _decode(path, mode=mode, libraries=libs)
            assert result.ok
            if mode == "exact" or ext == "png":
                np.testing.assert_array_equal(got, want, err_msg=f"{mode} {result.decoder}")
            else:  # reduced-scale decode: the same picture, upright, pixels a little different
                assert np.abs(got.astype(int) - want).mean() < 6, result.decoder


def test_training_imagefolder_reads_images_upright(tmp_path):
    """stn-train's imagefolder: goes through the same open_image, so it sees what stn-infer sees."""
    pytest.importorskip("torch")
    from stn_deploy.train.data import load_dataset

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(_photo(20, 30, seed=i)).save(tmp_path / cls / f"{i}.jpg", quality=95, exif=_exif(8))
    loaded = load_dataset(f"imagefolder:{tmp_path}", "train")
    image, _ = loaded.dataset[0]
    path = loaded.dataset.files[0]
    with open_image(path) as upright:
        assert upright.size == (20, 30)
        np.testing.assert_allclose(image.numpy(), loaded.preprocessing(upright), atol=1e-6)


# -- warnings -------------------------------------------------------------------------------------
def _jpeg_with_bad_exif(path):
    # Orientation 6 and an ImageDescription whose 1000 bytes lie past the end of the EXIF block:
    # Pillow warns "Tag data larger than file" and still reads the orientation.
    Image.fromarray(_photo(16, 24)).save(path, quality=90, exif=_exif(6, (0x010E, 2, 1000, 26)))


def test_pillow_warnings_go_into_the_result_not_to_stderr(tmp_path, capfd):
    path = tmp_path / "bad_exif.jpg"
    _jpeg_with_bad_exif(path)
    for mode in ("exact", "fast"):
        for libs in (True, False):
            for _ in range(2):  # the second file too: not "once per code line"
                result, _ = _decode(path, mode=mode, libraries=libs)
                assert result.ok
                assert result.warnings == ["UserWarning: Tag data larger than file. Skipping tag 270"], result.warnings
    ref = decode(path, RGB)
    assert ref.warnings == ["UserWarning: Tag data larger than file. Skipping tag 270"]
    captured = capfd.readouterr()
    assert "Tag data" not in captured.err and "Tag data" not in captured.out


def test_warning_capture_is_per_thread():
    barrier = threading.Barrier(2)
    seen: dict[str, list[str]] = {}

    def work(name: str) -> None:
        with capture() as caught:
            barrier.wait()
            warnings.warn(f"from {name}", UserWarning, stacklevel=1)
            barrier.wait()
        seen[name] = caught

    threads = [threading.Thread(target=work, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a": ["UserWarning: from a"], "b": ["UserWarning: from b"]}
