"""Parallel in-place batch assembly and the streamed directory walk, on real files."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stn_deploy.decode_pool import POOLS, DecodePool
from stn_deploy.decoders import DecodeSpec
from stn_deploy.image_walk import walk_images
from stn_deploy.images import ImageDirectoryError, decode_batch, find_images
from stn_deploy.preprocessing import Preprocessing

PRE = Preprocessing(image_size=(32, 32), mean=(0.49, 0.51, 0.5), std=(0.21, 0.27, 0.3), channel_order="RGB")


def _write_tree(root: Path, n: int, *, bad_every: int = 0, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sub = root / f"d{i // 7}"
        sub.mkdir(parents=True, exist_ok=True)
        ext = ("png", "jpg", "bmp")[i % 3]
        path = sub / f"{i:03d}.{ext}"
        if bad_every and i % bad_every == bad_every - 1:
            path.write_bytes(b"not an image")
        else:
            h, w = (32, 32) if i % 2 else (int(rng.integers(20, 90)), int(rng.integers(20, 90)))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                path, **({"quality": 90} if ext == "jpg" else {})
            )
        paths.append(path)
    return sorted(paths)


@pytest.mark.parametrize("pool", POOLS)
def test_every_pool_assembles_the_reference_batches_in_place(tmp_path, pool):
    files = _write_tree(tmp_path, 23, bad_every=5)
    ref = decode_batch(files, PRE)  # the reference: per-file decode, Preprocessing.normalize on the stack
    with DecodePool(DecodeSpec(PRE, mode="exact"), batch_size=6, workers=2, pool=pool) as decoder:
        got_results, got_inputs = [], []
        for batch in decoder.batches(iter(files)):
            got_results += batch.results
            got_inputs.append(batch.inputs.copy())
            if all(r.ok for r in batch.results):  # no failures: the model reads the pool's buffer itself
                assert any(np.shares_memory(batch.inputs, buf) for buf in decoder.buffers)
    assert [r.path for r in got_results] == files
    assert [r.error for r in got_results] == [r.error for r in ref.results]
    np.testing.assert_array_equal(np.concatenate(got_inputs), ref.inputs)  # bit-identical normalization


def test_the_process_pool_reads_the_walk_lazily_and_keeps_memory_bounded(tmp_path):
    files = _write_tree(tmp_path, 40)
    pulled = []

    def source():
        for path in files:
            pulled.append(path)
            yield path

    with DecodePool(DecodeSpec(PRE), batch_size=4, workers=2, pool="process", prefetch=2) as decoder:
        stream = decoder.batches(source())
        first = next(stream)
        assert len(first.results) == 4
        assert len(pulled) <= 4 * 3  # the batch held plus two decoding ahead, never the whole list
        rest = sum(len(b.results) for b in stream)
    assert rest == 36 and len(decoder.buffers) == 0  # closed: shared memory released


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_a_killed_decode_worker_loses_no_file(tmp_path):
    """The OOM killer (or a decoder crash) takes a worker process mid-run: the pool starts a new
    one, decodes the lost batch again, and every file still gets its result."""
    files = _write_tree(tmp_path, 30)
    ref = decode_batch(files, PRE)
    with DecodePool(DecodeSpec(PRE, mode="exact"), batch_size=5, workers=2, pool="process") as decoder:
        stream = decoder.batches(files)
        batches = [next(stream)]
        inputs = [batches[0].inputs.copy()]
        first_pool = decoder._executor
        victim = next(iter(first_pool._processes.values()))  # a real worker process
        os.kill(victim.pid, signal.SIGKILL)
        time.sleep(0.2)
        for batch in stream:
            batches.append(batch)
            inputs.append(batch.inputs.copy())
        assert decoder._executor is not first_pool  # the pool was replaced
    results = [r for b in batches for r in b.results]
    assert [r.path for r in results] == files and all(r.ok for r in results)
    np.testing.assert_array_equal(np.concatenate(inputs), ref.inputs)


# -- the streamed walk ----------------------------------------------------------------------------
def _tricky_tree(root: Path) -> None:
    names = [
        "a.png",
        "a-b.png",
        "a0.png",
        "a/x.png",
        "a/z/1.jpg",
        "a/zz.PNG",
        "B/c.gif",
        "b.png",
        "b/0.png",
        "é/1.png",
        "Z.png",
        ".hidden/1.png",
        "a/.h.png",
        "notes.txt",
        "a/readme.md",
    ]
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() in (".png", ".jpg", ".gif"):
            Image.new("RGB", (4, 4)).save(
                path, format={".png": "PNG", ".jpg": "JPEG", ".gif": "GIF"}[path.suffix.lower()]
            )
        else:
            path.write_text("x")
    (root / "link_dir").symlink_to(root / "a", target_is_directory=True)  # listed by os.walk, not entered
    (root / "link.png").symlink_to(root / "a.png")


def test_the_streamed_walk_gives_find_images_files_in_the_same_order(tmp_path):
    _tricky_tree(tmp_path)
    ref = find_images(tmp_path)
    walk = walk_images(tmp_path)
    assert list(walk) == ref.files
    assert (walk.found, walk.skipped, walk.finished) == (len(ref.files), ref.skipped, True)
    assert walk_images(tmp_path / "a.png").root == tmp_path and list(walk_images(tmp_path / "a.png")) == [
        tmp_path / "a.png"
    ]


def test_the_walk_lists_one_directory_at_a_time(tmp_path, monkeypatch):
    for d in range(5):
        for i in range(3):
            (tmp_path / f"d{d}").mkdir(exist_ok=True)
            Image.new("L", (4, 4)).save(tmp_path / f"d{d}" / f"{i}.png")
    listed = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p: (listed.append(Path(p).name), real_scandir(p))[1])
    walk = walk_images(tmp_path)
    assert walk.peek(2) == [tmp_path / "d0" / "0.png", tmp_path / "d0" / "1.png"]
    assert listed == [tmp_path.name, "d0"] and not walk.finished
    assert next(walk) == tmp_path / "d0" / "0.png"  # peeked files are not lost
    assert len(list(walk)) == 14 and walk.finished


@pytest.mark.parametrize("setup", ["missing", "empty", "no-images"])
def test_the_walk_fails_like_find_images(tmp_path, setup):
    target = tmp_path / "images"
    if setup != "missing":
        target.mkdir()
    if setup == "no-images":
        (target / "a.txt").write_text("x")
    with pytest.raises(ImageDirectoryError) as ref:
        find_images(target)
    with pytest.raises(ImageDirectoryError) as got:
        walk_images(target).peek(10)
    assert str(got.value) == str(ref.value) and got.value.exit_code == 2
