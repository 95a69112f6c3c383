"""The image files under a directory as a stream: rows can start before the walk ends.

:func:`walk_images` yields the same files, in the same order, as
:func:`stn_deploy.images.find_images` (sorted by path relative to the root; hidden files and
directories skipped; symbolic links to directories not followed), but lists one directory at a
time as the consumer asks for more. Memory is one directory listing per level of depth, not the
whole tree, and the first batch can be classified while the rest of a 100,000-file tree is still
unread.

Why the order is the same: listing a directory sorted by ``name`` for files and ``name + "/"``
for directories, and descending into each directory where it sorts, is a depth-first walk whose
sequence of paths is exactly the sorted list of relative paths: every path under ``d/`` starts
with ``d/``, so it sorts after everything that sorts before ``d/`` and before everything after.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

from .images import IMAGE_EXTENSIONS, ImageDirectoryError


class ImageWalk:
    """An iterator over the image files under ``root``, with counts that grow as it goes.

    ``skipped`` (files present whose extension is not an image extension), ``skipped_dir_links``
    (symbolic links to directories, which are not followed) and ``found`` are final once
    ``finished`` is true. :meth:`peek` reads ahead without losing anything; it is how a
    command fails early ("no image files") and learns whether a run is small.
    """

    def __init__(self, root: str | os.PathLike[str], *, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> None:
        root = Path(root)
        self.extensions = frozenset(e.lower() for e in extensions)
        if not root.exists():
            raise ImageDirectoryError(f"{root}: no such file or directory")
        self.skipped = 0
        self.skipped_dir_links = 0  # symbolic links to directories: listed, not entered, counted
        self.found = 0
        self.finished = False
        self._ahead: deque[Path] = deque()
        if root.is_file():
            if root.suffix.lower() not in self.extensions:
                raise ImageDirectoryError(
                    f"{root}: not an image file (extensions: {', '.join(sorted(self.extensions))})"
                )
            self.root = root.parent
            self._walk: Iterator[Path] = iter([root])
        elif root.is_dir():
            self.root = root
            self._walk = self._directory(str(root))
        else:
            raise ImageDirectoryError(f"{root}: not a directory")
        self._root_arg = root

    def _directory(self, top: str) -> Iterator[Path]:
        try:
            with os.scandir(top) as it:
                entries = list(it)
        except OSError as exc:
            raise ImageDirectoryError(f"{exc.filename}: {exc.strerror or exc}") from None
        keyed = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()  # follows a link, as os.walk does
            except OSError:
                is_dir = False
            if is_dir:
                if entry.is_symlink():  # os.walk(followlinks=False): not entered (a loop, or a tree elsewhere)
                    self.skipped_dir_links += 1
                else:
                    keyed.append((entry.name + "/", True))
            elif os.path.splitext(entry.name)[1].lower() in self.extensions:
                keyed.append((entry.name, False))
            else:
                self.skipped += 1
        del entries
        keyed.sort()
        for key, is_dir in keyed:
            if is_dir:
                yield from self._directory(os.path.join(top, key[:-1]))
            else:
                yield Path(os.path.join(top, key))

    def _next_walked(self) -> Path | None:
        if self.finished:
            return None
        path = next(self._walk, None)
        if path is None:
            self.finished = True
            if not self.found:
                extra = f" ({self.skipped} other files)" if self.skipped else ""
                exts = ", ".join(sorted(self.extensions))
                raise ImageDirectoryError(f"{self._root_arg}: no image files{extra} (looked for {exts}, recursively)")
            return None
        self.found += 1
        return path

    def peek(self, n: int) -> list[Path]:
        """The next ``n`` files (fewer at the end), without consuming them."""
        while len(self._ahead) < n:
            path = self._next_walked()
            if path is None:
                break
            self._ahead.append(path)
        return list(self._ahead)[:n]

    def __iter__(self) -> Iterator[Path]:
        return self

    def __next__(self) -> Path:
        if self._ahead:
            return self._ahead.popleft()
        path = self._next_walked()
        if path is None:
            raise StopIteration
        return path


def walk_images(root: str | os.PathLike[str], *, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> ImageWalk:
    """The image files under ``root`` (a directory, or one image file) as a stream; see :class:`ImageWalk`."""
    return ImageWalk(root, extensions=extensions)
