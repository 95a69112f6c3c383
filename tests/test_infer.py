"""stn-infer end to end: real image files, a real exported model, parity with PyTorch, bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from stn_deploy.infer.cli import EXIT_SOME_FAILED, main
from stn_deploy.infer.rows import rate_text
from stn_deploy.preprocessing import Preprocessing

torch = pytest.importorskip("torch")


def _write_images(root: Path, n_png: int = 9, n_jpg: int = 8, seed: int = 0) -> list[Path]:
    """Real PNG and JPEG files (some not 32×32, some grayscale) in nested directories."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n_png + n_jpg):
        kind = "png" if i < n_png else "jpg"
        h, w = (32, 32) if i % 3 else (45, 27)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = Image.fromarray(pixels) if i % 5 else Image.fromarray(pixels[..., 0])  # every 5th is grayscale
        path = root / ("nested" if i % 2 else "") / f"img_{i:02d}.{kind}"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **({"quality": 90} if kind == "jpg" else {}))
        paths.append(path)
    return sorted(paths, key=lambda p: p.relative_to(root).as_posix())


def _invoke(*args: str):
    return CliRunner().invoke(main, [*map(str, args), "--no-progress"], catch_exceptions=False)


def _rows(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_parity_with_pytorch_on_png_and_jpeg_files(tmp_path, model_path, checkpoint_path):
    """stn-infer's log-probs and labels equal the PyTorch model's on the same decoded tensors."""
    from stn_deploy.train.checkpoint import load_checkpoint

    images = tmp_path / "images"
    paths = _write_images(images)
    out = tmp_path / "preds.jsonl"
    result = _invoke(images, "--model", model_path, "-o", out, "--log-probs", "--top-k", "3", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert [r["path"] for r in rows] == [p.as_posix() for p in paths]  # sorted, deterministic order
    assert all(r["error"] is None for r in rows)

    ckpt = load_checkpoint(checkpoint_path)
    pre: Preprocessing = ckpt.preprocessing
    model = ckpt.build_model()
    batch = []
    for p in paths:
        with Image.open(p) as im:
            batch.append(pre(im))
    with torch.no_grad():
        x = torch.from_numpy(np.stack(batch))
        warped, theta = model.transform(x)
        ref = model.classify(warped).numpy()
    got = np.array([r["log_probs"] for r in rows])
    assert np.abs(got - ref).max() <= 1e-4, np.abs(got - ref).max()
    assert [r["index"] for r in rows] == ref.argmax(1).tolist()
    assert [r["label"] for r in rows] == [ckpt.class_names[i] for i in ref.argmax(1)]
    np.testing.assert_allclose([r["theta"] for r in rows], theta.reshape(len(paths), 6).numpy(), atol=1e-5)
    for r, lp in zip(rows, ref):
        assert [t["label"] for t in r["top_k"]] == [ckpt.class_names[i] for i in np.argsort(-lp)[:3]]
        assert r["confidence"] == pytest.approx(float(np.exp(lp.max())), abs=1e-4)


def test_csv_output_columns_and_stdout_default(tmp_path, model_path):
    images = tmp_path / "images"
    paths = _write_images(images, n_png=3, n_jpg=2)
    result = _invoke(images, "--model", model_path, "--top-k", "2")
    assert result.exit_code == 0
    stdout = result.stdout
    rows = list(csv.DictReader(stdout.splitlines()))
    assert list(rows[0]) == [
        "path",
        "label",
        "index",
        "confidence",
        "top1_label",
        "top1_prob",
        "top2_label",
        "top2_prob",
        *[f"theta_{i}" for i in range(6)],
        "error",
    ]
    assert [r["path"] for r in rows] == [p.as_posix() for p in paths]
    assert all(r["error"] == "" and r["label"].startswith("class_") for r in rows)
    assert "stn-infer: 5 ok, 0 failed of 5 images" in result.stderr

    # --streams 2: each batch cut into two concurrent slices; the same rows
    streamed = _invoke(images, "--model", model_path, "--top-k", "2", "--threads", "2", "--streams", "2", "-b", "5")
    assert streamed.exit_code == 0
    assert [(r["path"], r["label"], r["top1_prob"]) for r in csv.DictReader(streamed.stdout.splitlines())] == [
        (r["path"], r["label"], r["top1_prob"]) for r in rows
    ]
    assert "2 streams" in streamed.stderr


def test_streams_auto_is_reported_in_the_summary_line_and_the_json(tmp_path, model_path):
    """--streams auto (the default): 2 threads and batches of 32 or more run on 2 streams; batches
    of 8 on 1, and so does a run whose only batch is smaller than 32 (what the summary says is what ran)."""
    images = tmp_path / "images"
    _write_images(images, n_png=36, n_jpg=4)
    big = _invoke(images, "--model", model_path, "--threads", "2", "-o", tmp_path / "a.csv", "--json")
    assert big.exit_code == 0, big.output
    assert "CPUExecutionProvider, 2 streams)" in big.stderr and json.loads(big.stdout)["streams"] == 2
    few = tmp_path / "few"
    _write_images(few, n_png=3, n_jpg=2)
    one_batch = _invoke(few, "--model", model_path, "--threads", "2", "-o", tmp_path / "d.csv", "--json")
    assert "CPUExecutionProvider, 1 stream)" in one_batch.stderr and json.loads(one_batch.stdout)["streams"] == 1
    small = _invoke(images, "--model", model_path, "--threads", "2", "-b", "8", "-o", tmp_path / "b.csv", "--json")
    assert "CPUExecutionProvider, 1 stream)" in small.stderr and json.loads(small.stdout)["streams"] == 1
    explicit = _invoke(
        images, "--model", model_path, "--threads", "2", "-b", "8", "--streams", "2", "-o", tmp_path / "c.csv"
    )
    assert "2 streams)" in explicit.stderr  # an explicit number wins


def test_bad_files_get_error_rows_and_exit_3(tmp_path, model_path):
    images = tmp_path / "images"
    good = _write_images(images, n_png=4, n_jpg=2)
    (images / "zero.png").write_bytes(b"")
    (images / "notes.jpg").write_text("plain text, not a JPEG")
    data = good[0].read_bytes()
    (images / "truncated.png").write_bytes(data[: len(data) // 2])
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(300))
    # Header says 10000×10000 (100 MP): over the 50 MP default, refused before decoding.
    bomb = Image.new("L", (1, 1))
    bomb_path = images / "bomb.png"
    bomb.save(bomb_path)
    raw = bytearray(bomb_path.read_bytes())
    import struct
    import zlib

    raw[16:24] = struct.pack(">II", 10_000, 10_000)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    bomb_path.write_bytes(bytes(raw))
    (images / "readme.txt").write_text("ignored: not an image extension")

    out = tmp_path / "preds.csv"
    result = _invoke(images, "--model", model_path, "-o", out, "--json", "--batch-size", "3")
    assert result.exit_code == EXIT_SOME_FAILED == 3, result.output
    summary = json.loads(result.stdout)
    assert (summary["ok"], summary["failed"], summary["images"], summary["skipped_non_image_files"]) == (6, 5, 11, 1)
    rows = {Path(r["path"]).name: r for r in _rows(out)}
    assert len(rows) == 11
    assert rows["zero.png"]["error"] == "empty file (0 bytes)"
    assert "not an image" in rows["notes.jpg"]["error"]
    assert rows["truncated.png"]["error"].startswith("cannot decode")
    assert rows["corrupt.jpg"]["error"]
    assert "100,000,000 pixels exceeds the limit of 50,000,000" in rows["bomb.png"]["error"]
    assert all(rows[p.name]["error"] == "" and rows[p.name]["label"] for p in good)
    assert "6 ok, 5 failed of 11 images" in result.stderr
    # The pixel limit is a flag.
    small = _invoke(images / "nested", "--model", model_path, "-o", tmp_path / "p2.csv", "--max-pixels", "1000")
    assert small.exit_code == 3 and "exceeds the limit of 1,000" in (tmp_path / "p2.csv").read_text()


@pytest.mark.parametrize("setup", ["missing", "empty", "no-images"])
def test_missing_or_empty_directory_exits_2_with_one_line(tmp_path, model_path, setup):
    target = tmp_path / "images"
    if setup != "missing":
        target.mkdir()
    if setup == "no-images":
        (target / "a.txt").write_text("x")
    result = _invoke(target, "--model", model_path, "-o", tmp_path / "p.csv")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {target}")
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert not (tmp_path / "p.csv").exists()


def test_output_is_atomic_when_the_run_fails(tmp_path, model_path, monkeypatch):
    """Interrupted after the first batch's rows are written: the old file stays, no temp is left."""
    import stn_deploy.infer as infer

    images = tmp_path / "images"
    _write_images(images, n_png=3, n_jpg=0)
    out = tmp_path / "preds.csv"
    out.write_text("previous results\n")
    real_write, written = infer.RowWriter.write, []

    def write(self, rows):
        if written:
            raise KeyboardInterrupt  # Ctrl-C during the second batch
        real_write(self, rows)
        written.append(len(rows))

    monkeypatch.setattr(infer.RowWriter, "write", write)
    result = _invoke(images, "--model", model_path, "-o", out, "--batch-size", "1")
    assert result.exit_code == 130 and "Interrupted." in result.stderr
    assert written == [1]  # one batch's rows had reached the temporary file
    assert out.read_text() == "previous results\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".preds")] == []
    # A run that fails before any row (a missing model) leaves it alone too.
    result = _invoke(images, "--model", tmp_path / "missing.onnx", "-o", out)
    assert result.exit_code == 1 and "missing.onnx: no such model file" in result.stderr
    assert out.read_text() == "previous results\n"


def test_usage_errors(tmp_path, model_path):
    images = tmp_path / "images"
    _write_images(images, n_png=1, n_jpg=0)
    r = _invoke(images, "--model", model_path, "--json")
    assert r.exit_code == 2 and "--json prints the summary on stdout" in r.stderr
    r = _invoke(images, "--model", model_path, "-o", tmp_path / "p.txt")
    assert r.exit_code == 2 and "cannot tell the output format" in r.stderr
    r = _invoke(images, "--model", model_path, "-o", tmp_path / "p.parquet")
    assert r.exit_code == 2 and "p.parquet: Parquet is written by --engine ray" in r.stderr
    r = _invoke(images, "--model", model_path, "-o", tmp_path)
    assert r.exit_code == 2 and f"{tmp_path}: is a directory; --output takes a file" in r.stderr
    r = _invoke(images, "--model", model_path, "-o", tmp_path / "p.csv", "--streams", "3", "--threads", "2")
    assert r.exit_code == 2 and "--streams 3 needs --threads >= 3" in r.stderr
    r = _invoke(images, "--model", model_path, "--provider", "cuda")
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        assert r.exit_code == 1 and "has no CUDAExecutionProvider" in r.stderr and "stn-deploy[gpu]" in r.stderr


def test_visualize_writes_input_warped_pairs(tmp_path, model_path, checkpoint_path):
    images = tmp_path / "images"
    paths = _write_images(images, n_png=3, n_jpg=1)
    vis = tmp_path / "vis"
    result = _invoke(images, "--model", model_path, "-o", tmp_path / "p.csv", "--visualize", vis)
    assert result.exit_code == 0, result.output
    written = sorted(p.relative_to(vis).as_posix() for p in vis.rglob("*.png"))
    assert written == sorted(f"{p.relative_to(images).as_posix()}.png" for p in paths)
    with Image.open(vis / written[0]) as fig:
        assert fig.width > 2 * 32 and fig.mode == "RGB"
    # A model without the warped output cannot be visualized: a clear usage error, before any work.
    from stn_deploy.export import export_model

    plain = tmp_path / "plain.onnx"
    export_model(checkpoint_path, plain, parity_samples=8, progress=False)
    r = _invoke(images, "--model", plain, "-o", tmp_path / "q.csv", "--visualize", vis)
    assert r.exit_code == 2 and "needs the 'warped' output" in r.stderr
    assert not (tmp_path / "q.csv").exists()
    # A --visualize path that is a file, or lies under one: an error before any row is written.
    (tmp_path / "a_file").write_text("x")
    r = _invoke(images, "--model", model_path, "-o", tmp_path / "q.csv", "--visualize", tmp_path / "a_file")
    assert r.exit_code == 2 and "is a file" in r.stderr
    r = _invoke(images, "--model", model_path, "-o", tmp_path / "q.csv", "--visualize", tmp_path / "a_file" / "vis")
    assert r.exit_code == 1 and r.stderr.strip() == f"Error: {tmp_path / 'a_file' / 'vis'}: Not a directory"
    assert not (tmp_path / "q.csv").exists()
    # ... and its rows carry no theta columns.
    assert _invoke(images, "--model", plain, "-o", tmp_path / "q.csv").exit_code == 0
    assert "theta_0" not in (tmp_path / "q.csv").read_text().splitlines()[0]


def test_decode_pools_and_workers_give_identical_rows(tmp_path, model_path):
    images = tmp_path / "images"
    _write_images(images, n_png=7, n_jpg=6)
    outs = []
    for extra in (
        ["--decode-workers", "1"],
        ["--decode-workers", "3", "--batch-size", "2"],
        ["--decode-pool", "process", "--decode-workers", "2"],
    ):
        out = tmp_path / f"p{len(outs)}.csv"
        assert _invoke(images, "--model", model_path, "-o", out, *extra).exit_code == 0
        outs.append(out.read_text())
    assert outs[0] == outs[1] == outs[2]


def test_help_documents_exit_codes_and_output():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for text in (
        "Exit status: 0",
        "3 the run finished but some files failed",
        "--output",
        ".jsonl",
        "--strict-placement",
        "--visualize",
    ):
        assert text in r.output, text


def test_cli_imports_no_torch_and_runs_as_a_command(tmp_path, model_path):
    """The console script on a real directory, in a fresh interpreter that never loads torch (nor
    numpy.random: its import alone is 6.5 MB of a one-image run's memory)."""
    images = tmp_path / "images"
    _write_images(images, n_png=2, n_jpg=1)
    code = (
        "import sys, runpy; sys.argv = ['stn-infer', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('stn_deploy.infer', run_name='__main__')\n"
        "finally:\n    print('NUMPY.RANDOM' if 'numpy.random' in sys.modules else '', file=sys.stderr)\n"
        "    print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n"
    )
    out = tmp_path / "p.jsonl"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(images), "--model", str(model_path), "-o", str(out), "--no-progress"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().endswith("NO-TORCH") and "NUMPY.RANDOM" not in proc.stderr
    assert len(_rows(out)) == 3


# -- hardening (issue 12): outputs, failed batches, pictures, created folders, links --------------
def test_output_onto_the_model_or_an_input_image_is_refused(tmp_path, model_path):
    import shutil

    images = tmp_path / "images"
    paths = _write_images(images, n_png=2, n_jpg=1)
    model = tmp_path / "m.onnx"
    shutil.copy(model_path, model)
    before = model.read_bytes()
    r = _invoke(images, "--model", model, "-o", model, "--format", "csv")
    assert r.exit_code == 2 and "is the --model file" in r.stderr
    assert model.read_bytes() == before
    victim = paths[0]
    original = victim.read_bytes()
    r = _invoke(images, "--model", model, "-o", victim, "--format", "csv")
    assert r.exit_code == 2 and "is one of the input images" in r.stderr
    assert victim.read_bytes() == original
    ok = _invoke(images, "--model", model, "-o", images / "preds.csv")  # a CSV beside the images is fine
    assert ok.exit_code == 0, ok.output


def test_a_batch_onnx_runtime_cannot_run_gets_error_rows_and_the_run_goes_on(tmp_path, model_path, monkeypatch):
    """The partial last batch fails inside ONNX Runtime: its rows carry the error, the others are
    classified, exit 3."""
    from stn_deploy.runtime import Session

    images = tmp_path / "images"
    _write_images(images, n_png=5, n_jpg=2)  # 7 files: batches of 3, 3 and 1
    real = Session.run

    def flaky(self, batch, names=None):
        if len(batch) == 1:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : simulated kernel failure")
        return real(self, batch, names)

    monkeypatch.setattr(Session, "run", flaky)
    out = tmp_path / "p.csv"
    r = _invoke(images, "--model", model_path, "-o", out, "-b", "3", "--streams", "1")
    assert r.exit_code == EXIT_SOME_FAILED, r.output
    rows = _rows(out)
    assert len(rows) == 7
    failed = [row for row in rows if row["error"]]
    assert len(failed) == 1 and "inference failed for this batch of 1" in failed[0]["error"]
    assert "simulated kernel failure" in failed[0]["error"] and failed[0]["label"] == ""
    assert all(row["label"] for row in rows if not row["error"])


def test_a_visualize_picture_that_cannot_be_written_is_that_files_error_row(tmp_path, model_path):
    images = tmp_path / "images"
    _write_images(images, n_png=2, n_jpg=0)
    long_name = "x" * 250 + ".png"  # fits the file system; with ".png" appended it does not
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / long_name)
    out = tmp_path / "p.csv"
    r = _invoke(images, "--model", model_path, "-o", out, "--visualize", tmp_path / "vis")
    assert r.exit_code == EXIT_SOME_FAILED, r.output
    rows = {Path(row["path"]).name: row for row in _rows(out)}
    assert "--visualize could not write" in rows[long_name]["error"]
    assert sum(1 for row in rows.values() if not row["error"]) == 2
    assert len(list((tmp_path / "vis").rglob("*.png"))) == 2


def test_a_failed_run_removes_the_folders_it_created(tmp_path, model_path, monkeypatch):
    from stn_deploy.infer import pipeline

    images = tmp_path / "images"
    _write_images(images, n_png=2, n_jpg=0)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "predictions_for", boom)
    r = _invoke(
        images,
        "--model",
        model_path,
        "-o",
        tmp_path / "new" / "deep" / "p.csv",
        "--visualize",
        tmp_path / "pictures" / "run1",
    )
    assert r.exit_code == 130
    assert not (tmp_path / "new").exists() and not (tmp_path / "pictures").exists()


def test_symbolic_links_to_directories_are_counted_not_followed(tmp_path, model_path):
    images = tmp_path / "images"
    _write_images(images, n_png=2, n_jpg=0)
    elsewhere = tmp_path / "elsewhere"
    _write_images(elsewhere, n_png=3, n_jpg=0)
    (images / "linked").symlink_to(elsewhere, target_is_directory=True)
    (images / "loop").symlink_to(images, target_is_directory=True)
    out = tmp_path / "p.csv"
    r = _invoke(images, "--model", model_path, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    assert len(_rows(out)) == 2
    assert "2 symbolic link(s) to directories not followed" in r.stderr
    assert json.loads(r.stdout)["skipped_directory_links"] == 2


def test_ctrl_c_with_the_process_pool_prints_no_worker_tracebacks(tmp_path, model_path):
    import signal
    import time

    images = tmp_path / "images"
    for i in range(3000):  # enough for the run to be mid-way when Ctrl-C comes
        path = images / f"d{i % 4}" / f"img_{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((64, 64, 3), i % 255, np.uint8)).save(path)
    out = tmp_path / "p.csv"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stn_deploy.infer",
            str(images),
            "--model",
            str(model_path),
            "-o",
            str(out),
            "--decode-pool",
            "process",
            "--decode-workers",
            "2",
            "-b",
            "8",
            "--no-progress",
            "--threads",
            "1",
        ],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # A terminal's foreground job takes Ctrl-C; a suite started in the background by a
        # non-interactive shell inherits SIGINT ignored, and so would stn-infer (as it should).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".partial") for p in tmp_path.iterdir()):  # rows are being written
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.05)
    time.sleep(0.3)  # mid-run: the worker processes are decoding
    assert proc.poll() is None, "the run ended before Ctrl-C could be sent"
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C does: the whole process group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err, err
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_the_summary_rate_keeps_two_digits_below_ten_images_per_second():
    assert [rate_text(x) for x in (0.1747, 1.0, 6153.2)] == ["0.17", "1", "6153"]
