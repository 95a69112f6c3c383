"""stn-infer's decoding as a user meets it: --decode, streamed rows, the one-image start-up,
warnings kept off stderr, the pure-Pillow fallback. Real files, a real exported model."""

from __future__ import annotations

import csv
import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from stn_deploy.images import decode_batch
from stn_deploy.infer import RowWriter, run_inference
from stn_deploy.infer.cli import main
from stn_deploy.runtime import Session

pytest.importorskip("torch")  # the fixture exports a model


@pytest.fixture(scope="session")
def model_path(tmp_path_factory, checkpoint_path) -> Path:
    """The conftest checkpoint exported with theta and warped outputs (shared with test_infer.py)."""
    path = tmp_path_factory.getbasetemp() / "runtime_models" / "stn_theta_warped.onnx"
    if not path.exists():
        from stn_deploy.export import export_model

        path.parent.mkdir(parents=True, exist_ok=True)
        export_model(checkpoint_path, path, with_theta=True, with_warped=True, parity_samples=32, progress=False)
    return path


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(base, dtype=np.int16) + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


def _mixed(root: Path) -> list[Path]:
    """Photos over 10x the model's size (JPEG, decoded at 1/2), small PNGs, one BMP, in two folders."""
    paths = []
    for i in range(6):
        path = root / ("photos" if i % 2 else "icons") / (f"{i}.jpg" if i % 2 else f"{i}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        if i % 2:
            Image.fromarray(_photo(330, 340, i)).save(path, quality=90)
        else:
            Image.fromarray(_photo(32, 32, i)).save(path)
        paths.append(path)
    Image.fromarray(_photo(40, 30, 9)).save(root / "icons" / "z.bmp")
    paths.append(root / "icons" / "z.bmp")
    return sorted(paths)


def _invoke(*args: str):
    return CliRunner().invoke(main, [*map(str, args), "--no-progress"], catch_exceptions=False)


def _csv(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_decode_modes_are_recorded_and_exact_matches_the_reference_decoder(tmp_path, model_path):
    paths = _mixed(tmp_path / "images")
    summaries, rows = {}, {}
    for mode in ("auto", "fast", "exact"):
        out = tmp_path / f"{mode}.csv"
        r = _invoke(tmp_path / "images", "--model", model_path, "-o", out, "--json", "--decode", mode, "--log-probs")
        assert r.exit_code == 0, r.output
        summaries[mode] = json.loads(r.stdout)
        rows[mode] = _csv(out.read_text())
    by_decoder = {m: s["decode"]["files_by_decoder"] for m, s in summaries.items()}
    assert summaries["auto"]["decode"]["by_kind"] == {"jpeg": "fast", "png": "exact", "other": "exact"}
    assert summaries["exact"]["decode"]["by_kind"] == {"jpeg": "exact", "png": "exact", "other": "exact"}
    jpeg_fast = [k for k in by_decoder["auto"] if k.startswith("jpeg:")]
    assert jpeg_fast in (["jpeg:simplejpeg 1/2"], ["jpeg:pillow fast"]), by_decoder  # 340x330 -> 1/2 (5x32 = 160)
    assert by_decoder["auto"] == by_decoder["fast"]
    assert sum(by_decoder["exact"].values()) == 7 and "other:pillow" in by_decoder["exact"]
    # exact: the log-probs of the model on the reference decode (Pillow, Preprocessing.normalize)
    session = Session(model_path, "cpu", warmup=0, record_placement=False)
    ref = session.run(decode_batch(paths, session.preprocessing).inputs, ["log_probs"])["log_probs"]
    got = np.array([[float(r[f"log_prob_class_{c}"]) for c in range(10)] for r in rows["exact"]])
    assert [r["path"] for r in rows["exact"]] == [p.as_posix() for p in paths]
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # fast changes only the JPEGs' rows
    for a, b in zip(rows["fast"], rows["exact"]):
        if not a["path"].endswith(".jpg"):
            assert a == b


def test_rows_are_written_before_the_walk_ends(tmp_path, model_path):
    from stn_deploy.image_walk import walk_images

    for d in range(4):
        for i in range(3):
            (tmp_path / f"d{d}").mkdir(exist_ok=True)
            Image.fromarray(_photo(32, 32, d * 3 + i)).save(tmp_path / f"d{d}" / f"{i}.png")
    session = Session(model_path, "cpu", warmup=0, record_placement=False)
    walk = walk_images(tmp_path)
    stream = io.StringIO()
    writer = RowWriter(stream, "csv", top_k=1, class_names=session.class_names, theta=False, log_probs=False)
    finished_at_write = []
    real_write = writer.write
    writer.write = lambda rows: (finished_at_write.append(walk.finished), real_write(rows))[1]
    summary = run_inference(
        session, walk, writer, root=tmp_path, batch_size=2, decode_workers=1, decode_pool="thread", progress=False
    )
    assert summary.images == summary.ok == 12 and summary.pool == "thread"
    assert finished_at_write[0] is False and finished_at_write[-1] is True
    assert [r["path"] for r in _csv(stream.getvalue())] == [p.as_posix() for p in sorted(tmp_path.rglob("*.png"))]


def test_a_one_image_run_starts_no_pool_and_imports_no_progress_bar(tmp_path, model_path):
    """The whole command on one file: nothing that only a long run needs is imported."""
    Image.fromarray(_photo(32, 32, 0)).save(tmp_path / "one.png")
    code = (
        "import sys, runpy; sys.argv = ['stn-infer', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('stn_deploy.infer', run_name='__main__')\n"
        "finally:\n    print(sorted(m for m in ('torch', 'tqdm', 'multiprocessing', 'concurrent.futures.process') "
        "if m in sys.modules), file=sys.stderr)\n"
    )
    out = tmp_path / "p.jsonl"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "one.png"), "--model", str(model_path), "-o", str(out), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "[]"
    summary = json.loads(proc.stdout)
    assert summary["decode_pool"] == "inline" and summary["images"] == 1
    assert summary["timings"]["start_to_first_rows_s"] >= summary["timings"]["start_to_session_ready_s"] > 0


def test_the_model_file_is_read_once_before_onnx_runtime_loads_it(tmp_path, model_path, monkeypatch):
    """--batch-size auto needs the file's metadata before the session starts; the Session gets
    those graph facts instead of reading and parsing the file again."""
    import stn_deploy.runtime.graph_info as graph_info

    reads: list[str] = []
    real = graph_info.read_regular_file

    def counting(path, *args, **kwargs):
        reads.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(graph_info, "read_regular_file", counting)
    Image.fromarray(_photo(32, 32, 0)).save(tmp_path / "one.png")
    out = tmp_path / "p.csv"
    result = CliRunner().invoke(main, [str(tmp_path / "one.png"), "--model", str(model_path), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert reads == [str(model_path)]
    assert json.loads(result.stdout)["batch_size"] == 256  # auto still read the input size from that one read


def _exif_block(orientation: int) -> bytes:
    entries = [(0x0112, 3, 1, orientation), (0x010E, 2, 1000, 26)]  # an ImageDescription past the end
    body = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    for tag, typ, count, value in entries:
        body += struct.pack("<HHII", tag, typ, count, value)
    return b"Exif\x00\x00" + body + b"\x00\x00\x00\x00"


@pytest.mark.parametrize("pool", ["process", "thread"])
def test_decoder_warnings_reach_the_json_summary_never_stderr(tmp_path, model_path, pool):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(_photo(40, 60, i)).save(images / f"{i}.jpg", quality=90, exif=_exif_block(6))
    out = tmp_path / "p.csv"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stn_deploy.infer",
            str(images),
            "--model",
            str(model_path),
            "-o",
            str(out),
            "--json",
            "--no-progress",
            "--decode-pool",
            pool,
            "--batch-size",
            "2",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Tag data" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    assert "3 decoder warning(s) (listed by --json)" in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["decode_pool"] == pool
    assert summary["warnings"] == [
        {
            "path": (images / f"{i}.jpg").as_posix(),
            "warning": "UserWarning: Tag data larger than file. Skipping tag 270",
        }
        for i in range(3)
    ]


def test_the_pure_pillow_fallback_gives_the_same_exact_rows(tmp_path, model_path, monkeypatch):
    _mixed(tmp_path / "images")
    first = _invoke(tmp_path / "images", "--model", model_path, "--decode", "exact", "--decode-pool", "process")
    monkeypatch.setenv("STN_DEPLOY_DECODERS", "pillow")
    out = tmp_path / "p.csv"
    second = _invoke(tmp_path / "images", "--model", model_path, "--decode", "exact", "-o", out, "--json")
    assert first.exit_code == second.exit_code == 0
    assert _csv(first.stdout) == _csv(out.read_text())
    summary = json.loads(second.stdout)
    assert set(summary["decode"]["files_by_decoder"]) == {"jpeg:pillow", "png:pillow", "other:pillow"}
    assert summary["decode"]["libraries"]["simplejpeg"] is None


def test_auto_pool_depends_on_the_run_size_and_the_file_size():
    from stn_deploy.infer.pipeline import LARGE_FILE_BYTES, choose_pool

    assert choose_pool("auto", 64, 64) == "inline"  # one batch: nothing to overlap
    assert choose_pool("auto", None, 64, 2_000) == "thread"  # small files
    assert choose_pool("auto", None, 64, LARGE_FILE_BYTES) == "process"  # large photos
    assert choose_pool("thread", 1, 64, 10**9) == "thread"  # an explicit choice stands


def test_help_says_what_decode_auto_does():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for text in (
        "--decode [auto|fast|exact]",
        "jpeg fast, png exact, other exact",
        "--decode-pool",
        "(was: always thread)",
    ):
        assert text in " ".join(r.output.split()), text
