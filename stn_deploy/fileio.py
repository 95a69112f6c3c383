"""Files on disk: atomic output, and the check every input file passes before it is opened.

Output is atomic: a reader sees either the old file, the complete new file, or nothing.

Only a regular file (or a new path) is replaced. ``-o`` naming anything else is written the
way a plain ``open()`` would write it, never turned into a regular file:

* a character or block device or a FIFO (``/dev/null``, ``/dev/stdout``, a named pipe) gets the
  finished bytes written *through* it once the block succeeds (a FIFO waits for a reader, as
  with any program); the temporary file then lives in the system's temporary directory;
* a symlink is followed: its final target is replaced atomically and the link stays a link
  pointing at it (as ``open()`` writes through a link; replacing the link with a regular file
  would silently cut it from the file it names);
* a socket is refused.

Temporary files are named ``.<name>.<random>.partial`` so that no tool takes an interrupted
one for a model, a checkpoint or a predictions file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

PARTIAL_SUFFIX = ".partial"
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path; when the block succeeds, its file becomes ``path``'s content.

    For a regular file the temporary file lives in the destination directory so the final
    ``os.replace`` is a rename on one file system; the file and then the directory are synced,
    so that after a power loss ``path`` is the old file or the new one, never a truncated one.
    A device or FIFO gets the bytes written through it instead, and a symlink's target is
    replaced (module docstring). On any exception the temporary file is removed and ``path``
    is left untouched.
    """
    path = Path(path)
    dest = _destination(path)
    special = _special_kind(dest, path) is not None
    tmp = _temporary_in(Path(tempfile.gettempdir()), dest, shown=path) if special else _temporary_beside(dest)
    try:
        yield tmp
        if special:
            _write_through(tmp, dest, shown=path)
        else:
            _fsync(tmp)  # the data is on disk before the rename can be
            os.replace(tmp, dest)
            _fsync(dest.parent)  # and so is the rename
    except OSError as exc:
        # A full disk or quota while the block wrote the temporary file (a stream's flush and
        # fsync carry no file name), or a failed rename of it: the error names the user's path.
        unnamed = exc.filename is None and exc.errno in _WRITE_ERRNOS
        if unnamed or (exc.filename is not None and os.fsdecode(exc.filename) == str(tmp)):
            raise type(exc)(exc.errno, exc.strerror, str(path)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def input_file_problem(
    path: str | os.PathLike[str], *, missing: str = "no such file", directory: str = "is a directory"
) -> str | None:
    """Why ``path`` cannot be read as an input file (``missing``, ``directory`` or "not a regular
    file"), or None for a regular file. Every reader of a model, checkpoint or archive asks this
    before opening: opening a FIFO for reading waits for a writer forever, and a device may never end."""
    path = Path(path)
    if path.is_file():
        return None
    if not path.exists():
        return missing
    return directory if path.is_dir() else "not a regular file"


def read_regular_file(path: str | os.PathLike[str]) -> bytes | None:
    """The bytes of ``path``, or None when it is not a regular file (a FIFO, a device, a
    directory), found without reading from it: opened non-blocking (a plain open of a FIFO waits
    for a writer forever) and checked with fstat on the open descriptor (a stat before the open
    could race a rename). O_NONBLOCK does nothing to reads of a regular file. OSError as open() raises it."""
    fd = os.open(path, _READ_FLAGS)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        data = os.read(fd, info.st_size + 1)  # one call: a regular file reads short only at its end
        if len(data) <= info.st_size:
            return data
        parts = [data]
        while chunk := os.read(fd, 1 << 20):  # it grew while we read
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def check_writable(path: str | os.PathLike[str]) -> None:
    """Raise now the error :func:`atomic_path` would raise for ``path`` at the end of a long job."""
    path = Path(path)
    dest = _destination(path)
    if _special_kind(dest, path) is not None:
        if not os.access(dest, os.W_OK):  # never opened here: opening a FIFO waits for a reader
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return
    _temporary_beside(dest).unlink()


def is_partial(path: str | os.PathLike[str]) -> bool:
    """True for a name :func:`atomic_path` gives its temporary files (``.<name>.<random>.partial``)."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(PARTIAL_SUFFIX)


def _destination(path: Path) -> Path:
    """The file a plain ``open(path, "w")`` would write: a symlink's final target, else ``path``."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _special_kind(dest: Path, shown: Path) -> str | None:
    """``"device"``/``"fifo"`` for what is written through; None for a regular file or a new path."""
    try:
        mode = os.stat(dest).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        raise OSError(errno.EINVAL, "is a socket; write to a file, a FIFO or a device", str(shown))
    return None  # a regular file, or a directory (refused by _temporary_beside)


def _write_through(tmp: Path, dest: Path, *, shown: Path) -> None:
    """Copy the finished temporary file into the device or FIFO ``dest``; errors name ``shown``."""
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_NOCTTY)
        with open(tmp, "rb") as src, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except OSError as exc:  # ENOSPC from /dev/full, EPIPE from a FIFO whose reader left, ...
        raise type(exc)(exc.errno, exc.strerror, str(shown)) from None


def _temporary_beside(path: Path) -> Path:
    """An empty temporary file in ``path``'s directory (created if missing); errors name ``path``."""
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(
            errno.ENOTDIR, "a part of this path is a file, not a directory", str(path.parent)
        ) from None
    # The temporary's name is cut short, so a name the file system cannot hold is refused here,
    # not by the rename at the end of the job.
    try:
        name_max = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(os.fsencode(path.name)) > name_max:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(path))
    return _temporary_in(path.parent, path, shown=path)


def _temporary_in(directory: Path, path: Path, *, shown: Path) -> Path:
    """``.<name>.<random>.partial`` in ``directory``, with the permissions a plain open() gives."""
    try:
        # The name never ends in .onnx/.pt/.csv: an interrupted one is not taken for a model.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name[:100]}.", suffix=PARTIAL_SUFFIX, dir=directory)
    except OSError as exc:  # name the user's path, not the hidden temporary file
        raise type(exc)(exc.errno, exc.strerror, str(shown)) from None
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
