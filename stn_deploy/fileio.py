"""Atomic file output: a reader sees either the old file, the complete new file, or nothing."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    The temporary file lives in the destination directory so the final ``os.replace`` is a
    rename on one file system; the file and then the directory are synced, so that after a
    power loss ``path`` is the old file or the new one, never a truncated one. On any exception
    the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    tmp = _temporary_beside(path)
    try:
        yield tmp
        _fsync(tmp)  # the data is on disk before the rename can be
        os.replace(tmp, path)
        _fsync(path.parent)  # and so is the rename
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(path: str | os.PathLike[str]) -> None:
    """Raise now the error :func:`atomic_path` would raise for ``path`` at the end of a long job."""
    _temporary_beside(Path(path)).unlink()


def _temporary_beside(path: Path) -> Path:
    """An empty temporary file in ``path``'s directory (created if missing); errors name ``path``."""
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(errno.ENOTDIR, "a part of this path is a file, not a directory", str(path.parent)) from None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # name the user's path, not the hidden temporary file
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates the file 0600; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
