"""stn-infer --engine ray: the single-process command's rows from real Ray Data.

The tests share one local Ray instance (2 CPUs, started once); the engine uses the instance its
process already has. The multi-node test starts a head and a worker with ``ray start`` on
127.0.0.1 and runs the real command against the head in a subprocess.
"""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

ray = pytest.importorskip("ray", reason="--engine ray needs Ray Data: pip install 'stn-deploy[ray]'")
pytest.importorskip("ray.data", reason="--engine ray needs Ray Data: pip install 'stn-deploy[ray]'")
pq = pytest.importorskip("pyarrow.parquet", reason="--engine ray needs pyarrow: pip install 'stn-deploy[ray]'")
torch = pytest.importorskip("torch")  # the test model is exported from a checkpoint

from stn_deploy.infer.cli import main
from stn_deploy.infer.ray_engine import FAULT_ENV

sys.path.insert(0, str(Path(__file__).parent))
from ray_cluster import LoopbackCluster, group_members

TOL = 1e-6  # probabilities, log-probabilities and theta: the two engines' batches differ in size


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for every test here ("local": never a cluster found on the machine)."""
    if ray.is_initialized():
        yield
        return
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=256 * 1024 * 1024,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def model_path(tmp_path_factory, checkpoint_path) -> Path:
    """The conftest checkpoint exported with theta and warped outputs (test_infer.py's fixture writes
    the same path, so whichever runs first exports)."""
    path = tmp_path_factory.getbasetemp() / "runtime_models" / "stn_theta_warped.onnx"
    if not path.exists():
        from stn_deploy.export import export_model

        path.parent.mkdir(parents=True, exist_ok=True)
        export_model(checkpoint_path, path, with_theta=True, with_warped=True, parity_samples=32, progress=False)
    return path


def _bomb_png(width: int, height: int) -> bytes:
    """A 1×1 PNG whose header claims ``width``×``height``: refused before any pixel is decoded."""
    import io

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    return bytes(raw)


BAD = {  # file -> what its error row says (the single-process command's texts)
    "bad/zero.png": "empty file (0 bytes)",
    "bad/notes.jpg": "not an image PIL can decode (unknown or corrupt format)",
    "bad/truncated.png": "cannot decode",
    "bad/corrupt.jpg": "not an image PIL can decode (unknown or corrupt format)",
    "bad/bomb.png": "100,000,000 pixels exceeds the limit of 50,000,000",
}
UNREADABLE = {"bad/dangling.png": "No such file or directory", "bad/pipe.png": "not a regular file"}


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory) -> Path:
    """Good PNG, JPEG and BMP files of several sizes and modes in nested folders, bad files of every
    kind, a file that is not an image by extension, and a hidden folder."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(7)
    sizes = [(32, 32), (45, 27), (64, 64), (7, 100), (32, 32), (120, 80)]
    for i in range(30):
        h, w = sizes[i % len(sizes)]
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        if i % 5 == 1:
            image = image.convert("L")
        elif i % 5 == 2:
            image = image.convert("P")
        elif i % 5 == 3:
            image = Image.fromarray(np.dstack([pixels, pixels[..., :1]]), "RGBA")
        ext = ("png", "jpg", "bmp")[i % 3]
        if ext == "jpg" and image.mode in ("P", "RGBA"):
            image = image.convert("RGB")
        path = root / ("a" if i % 2 else "b/c") / f"img_{i:02d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    Image.fromarray((rng.integers(0, 65535, (20, 30))).astype(np.uint16)).save(root / "a" / "gray16.png")
    (root / "bad").mkdir()
    (root / "bad/zero.png").write_bytes(b"")
    (root / "bad/notes.jpg").write_text("plain text, not a JPEG\n" * 5)
    good = (root / "a" / "img_01.jpg").read_bytes()
    png = (root / "b/c" / "img_00.png").read_bytes()
    (root / "bad/truncated.png").write_bytes(png[: len(png) // 2])
    (root / "bad/corrupt.jpg").write_bytes(good[:4] + bytes(len(good) - 4))
    (root / "bad/bomb.png").write_bytes(_bomb_png(10_000, 10_000))
    os.symlink(root / "bad" / "missing.png", root / "bad/dangling.png")
    os.mkfifo(root / "bad/pipe.png")
    (root / "readme.txt").write_text("not an image extension: skipped")
    (root / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".hidden" / "x.png")
    return root


def _invoke(*args):
    return CliRunner().invoke(main, [*map(str, args), "--no-progress"], catch_exceptions=False)


def _stn_infer(*args, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real command in a fresh interpreter."""
    cmd = [sys.executable, "-m", "stn_deploy.infer", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def _rows(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_rows(ray_rows: list[dict], local_rows: list[dict]) -> None:
    """Labels identical, probabilities (and log-probs, theta) within TOL, identical error texts."""
    assert [r["path"] for r in ray_rows] == [r["path"] for r in local_rows]
    for a, b in zip(ray_rows, local_rows):
        assert (a["error"], a["label"], a["index"]) == (b["error"], b["label"], b["index"]), a["path"]
        assert [t["label"] for t in a["top_k"]] == [t["label"] for t in b["top_k"]], a["path"]
        if b["error"] is None:
            np.testing.assert_allclose(
                [t["prob"] for t in a["top_k"]], [t["prob"] for t in b["top_k"]], rtol=0, atol=TOL
            )
            np.testing.assert_allclose(a["confidence"], b["confidence"], rtol=0, atol=TOL)
            np.testing.assert_allclose(a["log_probs"], b["log_probs"], rtol=0, atol=TOL)
            np.testing.assert_allclose(a["theta"], b["theta"], rtol=0, atol=TOL)
        else:
            assert a["confidence"] is a["theta"] is a["log_probs"] is None and a["top_k"] == []


def _summary_counts(stderr: str) -> str:
    line = [s for s in stderr.splitlines() if s.startswith("stn-infer: ")][-1]
    return line.split(" in ")[0]


@pytest.fixture(scope="module")
def local_rows(mixed_dir, model_path, tmp_path_factory) -> tuple[list[dict], str]:
    out = tmp_path_factory.mktemp("local") / "rows.jsonl"
    result = _invoke(mixed_dir, "--model", model_path, "-o", out, "--log-probs", "--top-k", "3", "-b", "8")
    assert result.exit_code == 3, result.output
    return _rows(out), result.stderr


def test_both_engines_give_the_same_rows_on_a_mixed_directory(ray_local, mixed_dir, model_path, local_rows, tmp_path):
    rows, local_stderr = local_rows
    out = tmp_path / "rows.jsonl"
    ray_args = ["--engine", "ray", "--actors", "2", "--json"]
    result = _invoke(mixed_dir, "--model", model_path, "-o", out, "--log-probs", "--top-k", "3", "-b", "4", *ray_args)
    assert result.exit_code == 3, result.output  # some files failed: their rows say why
    got = _rows(out)
    _assert_same_rows(got, rows)
    errors = {Path(r["path"]).relative_to(mixed_dir).as_posix(): r["error"] for r in got if r["error"]}
    assert set(errors) == set(BAD) | set(UNREADABLE)
    for name, text in {**BAD, **UNREADABLE}.items():
        assert text in errors[name], (name, errors[name])
    assert sum(r["error"] is None for r in got) == 31
    summary = json.loads(result.stdout)
    assert (summary["images"], summary["ok"], summary["failed"], summary["skipped_non_image_files"]) == (38, 31, 7, 1)
    assert (
        summary["engine"] == "ray" and summary["ray"]["actors"] == 2 and summary["provider"] == "CPUExecutionProvider"
    )
    assert sum(summary["ray"]["rows_per_node"].values()) == 38
    assert _summary_counts(result.stderr) == _summary_counts(local_stderr) == "stn-infer: 31 ok, 7 failed of 38 images"


def test_csv_and_parquet_outputs_have_the_single_process_columns(ray_local, mixed_dir, model_path, tmp_path):
    local_csv = tmp_path / "local.csv"
    assert _invoke(mixed_dir, "--model", model_path, "-o", local_csv).exit_code == 3
    want = _rows(local_csv)
    header = local_csv.read_text().splitlines()[0].split(",")

    ray_csv = tmp_path / "ray.csv"
    assert _invoke(mixed_dir, "--model", model_path, "-o", ray_csv, "--engine", "ray", "-b", "16").exit_code == 3
    assert ray_csv.read_text().splitlines()[0].split(",") == header
    got = _rows(ray_csv)
    assert [(r["path"], r["label"], r["top5_label"], r["error"]) for r in got] == [
        (r["path"], r["label"], r["top5_label"], r["error"]) for r in want
    ]  # in path order, as the local file

    # A directory: Parquet parts with the CSV's columns, committed by a rename (no hidden staging left).
    out_dir = tmp_path / "parts"
    result = _invoke(
        mixed_dir, "--model", model_path, "-o", f"{out_dir}/", "--engine", "ray", "--actors", "2", "-b", "8"
    )
    assert result.exit_code == 3, result.output
    assert "-> " + f"{out_dir}/" in result.stderr
    parts = sorted(p.name for p in out_dir.iterdir())
    assert parts and all(p.startswith("part-") and p.endswith(".parquet") for p in parts), parts
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".parts")] == []
    table = pq.read_table(out_dir)
    assert table.column_names == header
    rows = sorted(table.to_pylist(), key=lambda r: r["path"])
    assert [r["path"] for r in rows] == sorted(r["path"] for r in want)
    by_path = {r["path"]: r for r in want}
    for r in rows:
        w = by_path[r["path"]]
        assert (r["label"] or "", r["error"] or "") == (w["label"], w["error"])
        if not r["error"]:
            assert abs(r["top1_prob"] - float(w["top1_prob"])) <= TOL and r["index"] == int(w["index"])
            assert abs(r["theta_4"] - float(w["theta_4"])) <= TOL
        else:
            assert r["index"] is None and r["confidence"] is None and r["theta_0"] is None

    # One .parquet file, in path order; an existing non-empty directory is refused before any work.
    one = tmp_path / "rows.parquet"
    assert _invoke(mixed_dir, "--model", model_path, "-o", one, "--engine", "ray").exit_code == 3
    assert pq.read_table(one).column("path").to_pylist() == [r["path"] for r in want]
    again = _invoke(mixed_dir, "--model", model_path, "-o", out_dir, "--engine", "ray")
    assert again.exit_code == 2 and "directory exists and is not empty" in again.stderr

    # A directory URI (as s3://bucket/prefix/ would be): parts written in place, then _SUCCESS.
    uri_dir = tmp_path / "uri_parts"
    result = _invoke(mixed_dir / "a", "--model", model_path, "-o", uri_dir.as_uri() + "/", "--engine", "ray")
    assert result.exit_code == 0, result.output
    assert (uri_dir / "_SUCCESS").exists()
    assert sorted(pq.read_table(uri_dir).column("path").to_pylist()) == sorted(
        r["path"] for r in want if r["path"].startswith((mixed_dir / "a").as_posix() + "/")
    )


def test_an_object_store_uri_is_read_as_bytes_and_decoded_the_same(
    ray_local, mixed_dir, model_path, local_rows, tmp_path
):
    """file:// goes through the object-store path (a pyarrow filesystem, bytes, decode_bytes): the
    same rows as the local path, named by URI. Only regular files are objects: the dangling link
    and the named pipe are not listed."""
    rows, _ = local_rows
    uri = mixed_dir.resolve().as_uri()
    out = tmp_path / "rows.jsonl"
    result = _invoke(uri, "--model", model_path, "-o", out, "--log-probs", "--top-k", "3", "--engine", "ray", "-b", "8")
    assert result.exit_code == 3, result.output
    got = _rows(out)
    prefix = mixed_dir.as_posix()
    want = [
        dict(r, path=uri + r["path"][len(prefix) :])
        for r in rows
        if Path(r["path"]).relative_to(mixed_dir).as_posix() not in UNREADABLE
    ]
    _assert_same_rows(got, want)
    assert "stn-infer: 31 ok, 5 failed of 36 images" in result.stderr


def test_an_inference_actor_killed_mid_run_is_restarted_and_every_row_comes_once(
    ray_local, model_path, tmp_path, monkeypatch
):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(3)
    for i in range(240):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
    marker = tmp_path / "crashed"
    monkeypatch.setenv(FAULT_ENV, f"4:{marker}")  # the first actor to start its 4th batch exits, once
    out = tmp_path / "parts"
    result = _invoke(
        images, "--model", model_path, "-o", f"{out}/", "--engine", "ray", "--actors", "2", "-b", "8", "--json"
    )
    assert marker.exists(), "no actor crashed: the test proved nothing"
    assert result.exit_code == 0, result.output
    paths = pq.read_table(out).column("path").to_pylist()
    assert len(paths) == 240 and sorted(paths) == sorted((images / f"{i:03d}.png").as_posix() for i in range(240))
    summary = json.loads(result.stdout)
    assert (summary["ok"], summary["failed"]) == (240, 0)


def _one_line_error(result, code: int) -> str:
    """The command failed with exit ``code`` and printed one line (no traceback); that line."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_usage_and_whole_job_errors_are_one_line(ray_local, mixed_dir, model_path, tmp_path):
    out = ["-o", tmp_path / "p.csv"]
    ray_engine = [mixed_dir, "--model", model_path, "--engine", "ray", *out]
    line = _one_line_error(_invoke(*ray_engine, "--visualize", tmp_path / "v", "--streams", "2"), 2)
    assert line == "Error: --streams, --visualize: not available with --engine ray (the local engine's options)"
    line = _one_line_error(_invoke(mixed_dir, "--model", model_path, "--actors", "2", *out), 2)
    assert line == "Error: --ray-address and --actors apply to --engine ray"
    line = _one_line_error(_invoke(*ray_engine, "--actors", "3"), 2)
    assert "--actors 3: the Ray cluster needs 3 CPUs (3 actors x 1 threads) but it has 2" in line
    line = _one_line_error(_invoke(*ray_engine, "--ray-address", "ray://head:10001"), 2)
    assert "Ray Data does not run through Ray Client" in line and "--ray-address auto" in line
    line = _one_line_error(_invoke(mixed_dir, "--model", model_path, "--engine", "ray", "-o", tmp_path / "p.txt"), 2)
    assert "cannot tell the output format" in line
    line = _one_line_error(_invoke(tmp_path / "missing", "--model", model_path, "--engine", "ray", *out), 2)
    assert line == f"Error: {tmp_path / 'missing'}: no such file or directory"
    line = _one_line_error(_invoke("file:///nonexistent/dir", "--model", model_path, "--engine", "ray", *out), 2)
    assert line == "Error: file:///nonexistent/dir: no such file or directory"
    bad_model = tmp_path / "bad.onnx"
    bad_model.write_bytes(b"not an onnx file")
    line = _one_line_error(_invoke(mixed_dir, "--model", bad_model, "--engine", "ray", *out), 1)
    assert "bad.onnx: onnxruntime cannot load it" in line
    assert not (tmp_path / "p.csv").exists()


def test_an_actor_that_keeps_dying_ends_the_job_with_one_line_and_exit_1(
    ray_local, mixed_dir, model_path, tmp_path, monkeypatch
):
    """Every actor exits on its first batch (a batch that crashes the runtime): Ray restarts and
    retries a bounded number of times, then the job fails; no rows file appears."""
    monkeypatch.setenv(FAULT_ENV, "1:always")
    result = _invoke(mixed_dir / "a", "--model", model_path, "--engine", "ray", "-o", tmp_path / "p.csv")
    assert result.exit_code == 1, result.output
    last = result.stderr.strip().splitlines()[-1]  # Ray's own notices of each worker's death come before it
    assert last.startswith("Error: the Ray job failed: ActorDiedError: The actor died unexpectedly"), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "p.csv").exists()


def test_an_unreachable_cluster_is_a_one_line_error_with_exit_1(mixed_dir, model_path, tmp_path):
    """A fresh interpreter (this one already has Ray): the job asks for a cluster nobody runs."""
    from ray_cluster import free_port

    address = f"127.0.0.1:{free_port()}"
    args = [mixed_dir, "--model", model_path, "--engine", "ray", "--ray-address", address, "-o", tmp_path / "p.csv"]
    proc = _stn_infer(*args, "--no-progress", timeout=180)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().startswith(
        f"Error: cannot start or reach the Ray cluster at {address}: Connection refused"
    )
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p.csv").exists()


def test_the_ray_engine_imports_no_torch_and_starts_its_own_local_instance(mixed_dir, model_path, tmp_path):
    code = (
        "import sys, runpy; sys.argv = ['stn-infer', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('stn_deploy.infer', run_name='__main__')\n"
        "finally:\n    print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n"
    )
    out = tmp_path / "p.jsonl"
    args = [mixed_dir / "a", "--model", model_path, "-o", out, "--engine", "ray", "--json"]
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().endswith("NO-TORCH")
    summary = json.loads(proc.stdout)
    assert summary["ray"]["address"] == "local" and summary["ray_init_seconds"] > 0
    assert len(_rows(out)) == summary["ok"] == 16


@pytest.mark.slow
def test_a_two_node_cluster_started_with_ray_start_runs_inference_on_both_nodes(model_path, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(5)
    for i in range(300):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
    out = tmp_path / "rows.csv"
    with LoopbackCluster(tmp_path / "cluster", node_cpus=(1, 1)) as cluster:
        args = [images, "--model", model_path, "-o", out, "--engine", "ray", "--ray-address", cluster.address]
        proc = _stn_infer(*args, "--actors", "2", "-b", "16", "--json", "--no-progress", env=cluster.env)
        nodes = list(cluster.procs)
        assert proc.returncode == 0, proc.stderr
        assert all(group_members(node.pid) for node in nodes)
    summary = json.loads(proc.stdout)
    assert summary["ray"]["nodes"] == 2 and summary["ray"]["cluster_cpus"] == 2
    per_node = summary["ray"]["rows_per_node"]
    assert len(per_node) == 2 and all(n > 0 for n in per_node.values()), per_node  # both nodes ran inference
    assert sum(per_node.values()) == 300
    assert sorted(r["path"] for r in _rows(out)) == sorted((images / f"{i:03d}.png").as_posix() for i in range(300))
    for node in nodes:  # both nodes stopped: `ray start` and every process of its group
        assert node.poll() is not None and group_members(node.pid) == []
