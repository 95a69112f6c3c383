"""Atomic output files: complete or untouched, and a bad destination named in the error."""

from __future__ import annotations

from pathlib import Path

import pytest

from stn_deploy.fileio import atomic_path, atomic_write_text


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_bad_destinations_are_named(tmp_path):
    (tmp_path / "a_dir").mkdir()
    with pytest.raises(IsADirectoryError) as exc, atomic_path(tmp_path / "a_dir"):
        pass
    assert exc.value.filename == str(tmp_path / "a_dir")

    (tmp_path / "a_file").write_text("x")
    for target in (tmp_path / "a_file" / "out.txt", tmp_path / "a_file" / "deeper" / "out.txt"):
        with pytest.raises(NotADirectoryError) as exc, atomic_path(target):
            pass
        assert exc.value.filename == str(target.parent)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "a_file"]


def test_a_refused_temporary_file_names_the_destination(tmp_path, monkeypatch):
    """mkstemp's error names the hidden temporary file; the user asked for the destination."""
    import tempfile

    def refuse(prefix, suffix, dir):  # noqa: A002 - mkstemp's own keyword
        raise PermissionError(13, "Permission denied", f"{dir}/{prefix}abc{suffix}")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError) as exc, atomic_path(tmp_path / "out.txt"):
        pass
    assert (exc.value.filename, exc.value.strerror) == (str(tmp_path / "out.txt"), "Permission denied")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names the synced files through /proc (Linux)")
def test_the_file_and_the_rename_are_synced(tmp_path, monkeypatch):
    import os

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    target = tmp_path / "out.txt"
    atomic_write_text(target, "data")
    assert len(synced) == 2 and synced[0].startswith(str(tmp_path / ".out.txt.")) and synced[1] == str(tmp_path)
    assert target.read_text() == "data"
