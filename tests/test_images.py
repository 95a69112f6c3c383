"""Image discovery and decoding on real files of every supported format and the hostile ones."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stn_deploy.errors import ImageError
from stn_deploy.images import ImageDirectoryError, decode, decode_batch, find_images, open_image
from stn_deploy.preprocessing import Preprocessing

RGB = Preprocessing(image_size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), channel_order="RGB")
GRAY = Preprocessing(image_size=(28, 28), mean=(0.5,), std=(0.25,), channel_order="L")


def _pixels(h: int = 32, w: int = 32, c: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (h, w, c) if c > 1 else (h, w)
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture()
def every_format(tmp_path: Path) -> dict[str, Path]:
    """One real file per supported format and pixel layout."""
    files: dict[str, Path] = {}
    rgb = Image.fromarray(_pixels())

    def save(name: str, image: Image.Image, **kw) -> None:
        files[name] = tmp_path / name
        image.save(files[name], **kw)

    save("rgb.png", rgb)
    save("rgb.jpg", rgb, quality=95)
    save("rgb.bmp", rgb)
    save("rgb.webp", rgb, lossless=True)
    save("rgb.tiff", rgb)
    save("gray.png", Image.fromarray(_pixels(c=1)))
    save("rgba.png", Image.fromarray(_pixels(c=4)))
    save("palette.gif", rgb.convert("P", palette=Image.Palette.ADAPTIVE))
    gray16 = Image.fromarray(_pixels(c=1).astype(np.uint16) * 257)  # mode I;16
    assert gray16.mode.startswith("I;16")
    save("gray16.png", gray16)
    save("large.png", Image.fromarray(_pixels(h=100, w=60, seed=3)))
    # An animated GIF: only the first frame counts.
    frames = [Image.fromarray(np.full((32, 32, 3), v, np.uint8)).convert("P") for v in (10, 200)]
    files["anim.gif"] = tmp_path / "anim.gif"
    frames[0].save(files["anim.gif"], save_all=True, append_images=frames[1:], duration=50)
    return files


def test_every_format_decodes_to_the_model_input(every_format):
    for name, path in every_format.items():
        result = decode(path, RGB)
        assert result.ok, f"{name}: {result.error}"
        assert result.array.shape == (32, 32, 3) and result.array.dtype == np.uint8, name
    # Lossless formats give back exactly the pixels written.
    for name in ("rgb.png", "rgb.bmp", "rgb.webp", "rgb.tiff"):
        np.testing.assert_array_equal(decode(every_format[name], RGB).array, _pixels(), err_msg=name)
    # Grayscale replicates into RGB; 16-bit is rescaled to 8 bits, not clipped.
    gray = decode(every_format["gray.png"], RGB).array
    np.testing.assert_array_equal(gray[..., 0], _pixels(c=1))
    np.testing.assert_array_equal(decode(every_format["gray16.png"], RGB).array[..., 1], _pixels(c=1))
    # First frame of an animation.
    assert abs(int(decode(every_format["anim.gif"], RGB).array.mean()) - 10) <= 2


def test_decode_batch_matches_the_single_preprocessing_definition(every_format):
    paths = sorted(every_format.values())
    batch = decode_batch(paths, RGB)
    assert batch.inputs.shape == (len(paths), 3, 32, 32) and batch.inputs.dtype == np.float32
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            np.testing.assert_array_equal(batch.inputs[i], RGB(im), err_msg=path.name)


def test_grayscale_model_gets_one_channel(every_format):
    batch = decode_batch([every_format["rgb.png"], every_format["rgba.png"], every_format["gray.png"]], GRAY)
    assert batch.inputs.shape == (3, 1, 28, 28)
    with Image.open(every_format["rgba.png"]) as im:
        np.testing.assert_array_equal(batch.inputs[1], GRAY(im))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny file whose header claims width×height pixels (the pixel data is never reached)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.png", b"", "empty file (0 bytes)"),
        ("text.jpg", b"this is not an image\n" * 10, "not an image PIL can decode"),
        # Over our 50 MP default, under PIL's own limit: refused by the explicit header check.
        ("bomb.png", _bomb_png(10_000, 10_000), "100,000,000 pixels exceeds the limit of 50,000,000"),
        # Over twice PIL's limit as well: Image.open itself refuses; still one row, not a crash.
        ("huge.png", _bomb_png(20_000, 20_000), "decompression bomb"),
    ],
    ids=["empty", "not-an-image", "bomb-50MP", "bomb-PIL-limit"],
)
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_files_become_errors_not_exceptions(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    result = decode(path, RGB)
    assert not result.ok and result.array is None
    assert expected in result.error
    with pytest.raises(ImageError, match=str(path)):
        open_image(path)


def test_truncated_and_corrupt_files(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(_pixels(h=64, w=64)).save(good)
    data = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.png").write_bytes(data[:60] + bytes(len(data) - 60))
    jpg = tmp_path / "good.jpg"
    Image.fromarray(_pixels(h=64, w=64)).save(jpg)
    (tmp_path / "truncated.jpg").write_bytes(jpg.read_bytes()[:200])
    for name in ("truncated.png", "corrupt.png", "truncated.jpg"):
        result = decode(tmp_path / name, RGB)
        assert not result.ok, name
        assert result.error.startswith(("cannot decode", "not an image")), (name, result.error)
    # Failures stay per file: the batch still carries the good one.
    batch = decode_batch([tmp_path / "truncated.png", good, tmp_path / "corrupt.png"], RGB)
    assert [r.ok for r in batch.results] == [False, True, False]
    assert batch.ok_indices == [1] and batch.inputs.shape == (1, 3, 32, 32)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need os.mkfifo (POSIX)")
def test_a_named_pipe_is_a_row_error_not_a_hang(tmp_path):
    """A FIFO with an image name is listed by the directory walk; reading it would block forever."""
    Image.fromarray(_pixels()).save(tmp_path / "good.png")
    os.mkfifo(tmp_path / "pipe.png")
    listing = find_images(tmp_path)
    batch = decode_batch(listing.files, RGB)
    assert [(p.name, r.ok, r.error) for p, r in zip(listing.files, batch.results)] == [
        ("good.png", True, None),
        ("pipe.png", False, "not a regular file"),
    ]


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(_pixels(h=100, w=100)).save(path)
    assert decode(path, RGB, max_pixels=10_000).ok
    result = decode(path, RGB, max_pixels=9_999)
    assert "10,000 pixels exceeds the limit of 9,999" in result.error


def test_find_images_walks_recursively_in_sorted_order(tmp_path):
    for rel in ("b/2.png", "a/1.JPG", "a/z/3.webp", "c.gif", ".hidden/4.png", "a/.5.png"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_pixels(8, 8)).save(
            p, format={"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "gif": "GIF"}[p.suffix[1:].lower()]
        )
    (tmp_path / "notes.txt").write_text("not an image")
    listing = find_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in listing.files] == ["a/1.JPG", "a/z/3.webp", "b/2.png", "c.gif"]
    assert listing.skipped == 1
    # A single file is accepted too.
    assert find_images(tmp_path / "c.gif").files == [tmp_path / "c.gif"]


def test_missing_or_empty_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ImageDirectoryError, match="no such file or directory") as missing:
        find_images(tmp_path / "nope")
    assert missing.value.exit_code == 2
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ImageDirectoryError, match=r"no image files \(1 other files\)"):
        find_images(tmp_path)


def test_training_and_inference_read_the_same_image_files(tmp_path):
    """imagefolder: training and stn-infer share one extension list (Netpbm included)."""
    from stn_deploy.train.data import load_dataset

    pixels = _pixels()
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.ppm")
    listing = find_images(tmp_path)
    assert len(listing.files) == 10
    loaded = load_dataset(f"imagefolder:{tmp_path}", "train")
    image, _ = loaded.dataset[0]
    assert tuple(image.shape) == loaded.preprocessing.input_shape
    decoded = decode(listing.files[0], loaded.preprocessing)
    assert decoded.error is None
