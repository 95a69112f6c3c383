"""Hardening (issue 12): outputs never clobber what they should not (devices, FIFOs, symlinks),
SIGTERM is handled like Ctrl-C, and OS errors on outputs are one line with the old output intact.

Real devices and FIFOs, real subprocesses killed with a real SIGTERM, real small and read-only
mounts where the machine allows them (root): nothing is simulated that the machine can do.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers import assert_cli_error
from stn_deploy.console import EXIT_TERMINATED, report_errors
from stn_deploy.export.cli import main as stn_export
from stn_deploy.fileio import atomic_path, atomic_write_bytes, atomic_write_text, check_writable, is_partial
from stn_deploy.infer.cli import main as stn_infer

ROOT = os.geteuid() == 0


def _images(root: Path, n: int, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"img_{i:04d}.png")
    return root


def _infer(*args) -> object:
    return CliRunner().invoke(stn_infer, [*map(str, args), "--no-progress"])


def _partials(*dirs: Path) -> list[Path]:
    return [p for d in dirs if d.is_dir() for p in d.iterdir() if is_partial(p)]


# -- outputs onto things that are not regular files --------------------------------------------
def _char_device(tmp_path: Path, name: str, minor: int) -> Path:
    """A private twin of /dev/null (minor 3) or /dev/full (7): a real character device node, so a
    regression replaces this node, not the machine's /dev/null. Without root: the real one
    (which a non-root process cannot replace anyway)."""
    if ROOT:
        node = tmp_path / name
        try:
            os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, minor))
            return node
        except OSError:
            pass
    return Path(f"/dev/{name}")


def test_a_character_device_output_stays_a_device_and_receives_the_bytes(tmp_path):
    null = _char_device(tmp_path, "null", 3)
    check_writable(null)
    atomic_write_text(null, "rows\n")
    assert stat.S_ISCHR(os.stat(null).st_mode)
    assert _partials(tmp_path, Path(tempfile.gettempdir())) == []


def test_dev_full_output_is_a_one_line_no_space_error_and_leaves_no_temporary(tmp_path):
    full = _char_device(tmp_path, "full", 7)
    with pytest.raises(OSError) as exc:
        atomic_write_bytes(full, b"x" * 100_000)
    assert (exc.value.errno, exc.value.filename) == (errno.ENOSPC, str(full))
    assert stat.S_ISCHR(os.stat(full).st_mode)
    assert [p for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith(".full.")] == []


def test_a_fifo_output_stays_a_fifo_and_its_reader_gets_the_bytes(tmp_path):
    fifo = tmp_path / "rows.csv"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    check_writable(fifo)  # never opens it: that would wait for a reader
    atomic_write_bytes(fifo, b"a,b\n1,2\n")
    reader.join(10)
    assert received == [b"a,b\n1,2\n"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv"]


def test_check_writable_on_a_fifo_without_reader_returns_at_once(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    done = threading.Event()
    threading.Thread(target=lambda: (check_writable(fifo), done.set()), daemon=True).start()
    assert done.wait(5), "check_writable opened the FIFO and waited for a reader"


def test_a_symlink_output_stays_a_link_and_its_target_is_replaced_atomically(tmp_path):
    """Chosen: follow the link as open() does (the link may be how a deployment names its
    current model); never replace the link itself with a regular file."""
    releases = tmp_path / "releases"
    releases.mkdir()
    target = releases / "v3.csv"
    target.write_text("old\n")
    link = tmp_path / "current.csv"
    link.symlink_to(target)
    atomic_write_text(link, "new\n")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new\n"
    assert _partials(tmp_path, releases) == []
    dangling = tmp_path / "next.csv"
    dangling.symlink_to(releases / "v4.csv")
    atomic_write_text(dangling, "v4\n")
    assert dangling.is_symlink() and (releases / "v4.csv").read_text() == "v4\n"
    to_device = tmp_path / "sink"
    to_device.symlink_to(_char_device(tmp_path, "null", 3))
    atomic_write_text(to_device, "gone\n")
    assert to_device.is_symlink() and stat.S_ISCHR(os.stat(to_device).st_mode)


def test_a_socket_output_is_refused_with_one_line(tmp_path):
    path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    try:
        for call in (check_writable, lambda p: atomic_write_text(p, "x")):
            with pytest.raises(OSError, match="socket") as exc:
                call(path)
            assert exc.value.filename == str(path)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        server.close()


def test_stn_export_onto_a_character_device_leaves_it_a_device(tmp_path, mnist_checkpoint_path):
    null = _char_device(tmp_path, "null", 3)
    result = CliRunner().invoke(
        stn_export, [str(mnist_checkpoint_path), "-o", str(null), "-q", "--parity-samples", "8", "--no-optimize"]
    )
    assert result.exit_code == 0, result.output
    assert stat.S_ISCHR(os.stat(null).st_mode)


def test_stn_infer_onto_devices_and_a_symlink(tmp_path, model_path):
    images = _images(tmp_path / "images", 3)
    null = _char_device(tmp_path, "null", 3)
    result = _infer(images, "-m", model_path, "-o", null, "--format", "csv")
    assert result.exit_code == 0, result.output
    assert stat.S_ISCHR(os.stat(null).st_mode)
    full = _char_device(tmp_path, "full", 7)
    result = _infer(images, "-m", model_path, "-o", full, "--format", "csv")
    assert_cli_error(result, 1, f"Error: {full}: No space left on device")
    assert len(result.stderr.strip().splitlines()) == 1
    target = tmp_path / "runs" / "preds.csv"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "latest.csv"
    link.symlink_to(target)
    assert _infer(images, "-m", model_path, "-o", link).exit_code == 0
    assert link.is_symlink() and target.read_text().startswith("path,label")


# -- temporaries and SIGTERM -----------------------------------------------------------------------
def test_temporaries_are_named_partial_and_never_like_a_model(tmp_path):
    for name in ("stn.onnx", "stn.pt", "preds.csv", "stn.pt2"):
        with atomic_path(tmp_path / name) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(f".{name}.") and tmp.name.endswith(".partial")
            assert is_partial(tmp) and not tmp.name.endswith((".onnx", ".pt", ".csv", ".pt2"))
            tmp.write_text("x")
    assert not is_partial(tmp_path / "stn.onnx")


def test_sigterm_in_any_command_is_handled_like_ctrl_c(tmp_path):
    """report_errors (every command's wrapper): SIGTERM mid-write removes the temporary, keeps the
    old output and exits 143; the handler is restored afterwards."""
    out = tmp_path / "out.csv"
    out.write_text("old\n")

    @report_errors
    def command() -> None:
        with atomic_path(out) as tmp:
            tmp.write_text("half")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # never reached: the handler raises at the next bytecode
            tmp.write_text("all")

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc:
        command()
    assert exc.value.code == EXIT_TERMINATED == 143
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]
    assert signal.getsignal(signal.SIGTERM) is before


def _terminate_when(proc: subprocess.Popen, ready, timeout: float = 240) -> tuple[int, str]:
    """SIGTERM ``proc`` as soon as ``ready()``; (exit code, stderr)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the command ended (rc {proc.returncode}) before it was mid-write: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the command never started writing")
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.slow
def test_sigterm_mid_write_of_stn_infer_leaves_no_temporary_and_the_old_output(tmp_path, model_path):
    images = _images(tmp_path / "images", 400)
    out = tmp_path / "preds.csv"
    out.write_text("previous results\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stn_deploy.infer",
            str(images),
            "-m",
            str(model_path),
            "-o",
            str(out),
            "--batch-size",
            "1",
            "--no-progress",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )

    def rows_on_disk() -> bool:  # the temporary exists and rows have been flushed into it
        return any(p.stat().st_size > 0 for p in _partials(tmp_path))

    code, err = _terminate_when(proc, rows_on_disk)
    assert code == 143, err
    assert err.strip().splitlines()[-1] == "Terminated." and "Traceback" not in err
    assert out.read_text() == "previous results\n"
    assert _partials(tmp_path) == []


@pytest.mark.slow
def test_sigterm_mid_stn_export_leaves_no_temporary_model_and_the_old_output(tmp_path, mnist_checkpoint_path):
    out = tmp_path / "stn.onnx"
    out.write_bytes(b"previous model")
    proc = subprocess.Popen(
        [sys.executable, "-m", "stn_deploy.export.cli", str(mnist_checkpoint_path), "-o", str(out), "-q"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    # The exported file sits in its temporary while the checks run on it (parity: seconds).
    code, err = _terminate_when(proc, lambda: any(p.stat().st_size > 0 for p in _partials(tmp_path)))
    assert code == 143, err
    assert err.strip().splitlines()[-1] == "Terminated." and "Traceback" not in err
    assert out.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stn.onnx"]


# -- OS errors on outputs ----------------------------------------------------------------------------
def test_a_name_too_long_fails_before_the_work_with_one_line_and_the_old_output_stays(tmp_path, mnist_checkpoint_path):
    out = tmp_path / ("m" * 300 + ".onnx")
    result = CliRunner().invoke(stn_export, [str(mnist_checkpoint_path), "-o", str(out)])
    assert_cli_error(result, 1, "File name too long")
    assert "Exporting" not in result.output and len(result.stderr.strip().splitlines()) == 1
    # with a name the file system takes, but a temporary that would not fit: fine
    ok = tmp_path / ("m" * 250 + ".csv")
    atomic_write_text(ok, "x")
    assert ok.read_text() == "x" and _partials(tmp_path) == []


@contextlib.contextmanager
def _tmpfs(where: Path, options: str):
    where.mkdir()
    if not ROOT:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=False, capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_is_one_line_and_the_old_output_stays(tmp_path, model_path):
    images = _images(tmp_path / "images", 60)
    with _tmpfs(tmp_path / "small", "size=8k") as disk:
        out = disk / "preds.csv"
        out.write_text("previous results\n")  # one 4 KiB page of the two
        result = _infer(images, "-m", model_path, "-o", out)
        assert_cli_error(result, 1, f"Error: {out}: No space left on device")
        assert len(result.stderr.strip().splitlines()) == 1
        assert out.read_text() == "previous results\n" and sorted(p.name for p in disk.iterdir()) == ["preds.csv"]


def test_a_read_only_file_system_is_one_line_and_the_old_output_stays(tmp_path, model_path, mnist_checkpoint_path):
    images = _images(tmp_path / "images", 2)
    with _tmpfs(tmp_path / "ro", "size=1m") as disk:
        out = disk / "preds.csv"
        out.write_text("previous results\n")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        result = _infer(images, "-m", model_path, "-o", out)
        assert_cli_error(result, 1, f"Error: {out}: Read-only file system")
        result = CliRunner().invoke(stn_export, [str(mnist_checkpoint_path), "-o", str(disk / "m.onnx")])
        assert_cli_error(result, 1, f"Error: {disk / 'm.onnx'}: Read-only file system")
        assert "Exporting" not in result.output
        assert out.read_text() == "previous results\n"


def test_os_errors_raised_while_writing_name_the_output(tmp_path):
    out = tmp_path / "out.csv"
    out.write_text("old\n")

    @report_errors
    def command() -> None:
        with atomic_path(out) as tmp, open(tmp, "w") as f:
            f.write("rows")
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))  # what a flush on a full quota raises

    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(io.StringIO()) as err:
        command()
    assert exc.value.code == 1
    assert out.read_text() == "old\n" and err.getvalue() == f"Error: {out}: {os.strerror(errno.EDQUOT)}\n"
