"""SOURCE listed on the driver: a local directory (as stn-infer lists it) or an object-store URI."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from stn_deploy.errors import one_line
from stn_deploy.images import (
    IMAGE_EXTENSIONS,
    ImageDirectoryError,
    find_images,
)
from stn_deploy.infer.exits import InferUsageError

from .common import RayEngineError, is_uri


# -- listing -------------------------------------------------------------------------------------
@dataclass
class SourceListing:
    """The image files of SOURCE in the single-process command's order."""

    paths: list[str]  # the row's path: as stn-infer writes it, or the URI of an object
    locations: list[str]  # what the decode task opens: an absolute local path, or a path in ``filesystem``
    filesystem: Any = None  # a pyarrow FileSystem for URIs; None: local files, decoded by path
    skipped: int = 0


def list_source(source: str) -> SourceListing:
    """List SOURCE: a local directory or file (exactly :func:`find_images`), or a URI pyarrow or fsspec
    understands (``s3://bucket/prefix``, ``gs://...``, ``file:///...``), filtered and ordered the same way."""
    if not is_uri(source):
        listing = find_images(source)
        return SourceListing(
            paths=[p.as_posix() for p in listing.files],
            locations=[os.path.abspath(p) for p in listing.files],  # workers need not share the driver's cwd
            skipped=listing.skipped,
        )
    import pyarrow.fs as pafs  # optional [ray] extra

    fs, root = uri_filesystem(source)
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise ImageDirectoryError(f"{source}: no such file or directory")
        if info.type == pafs.FileType.File:
            if os.path.splitext(root)[1].lower() not in IMAGE_EXTENSIONS:
                raise ImageDirectoryError(
                    f"{source}: not an image file (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            return SourceListing(paths=[source], locations=[root], filesystem=fs)
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as exc:
        raise RayEngineError(f"{source}: cannot list it ({one_line(exc, 300)})") from None
    base = root.rstrip("/")
    found: list[str] = []
    skipped = 0
    for entry in infos:
        if entry.type != pafs.FileType.File:
            continue
        rel = entry.path[len(base) + 1 :] if entry.path.startswith(base + "/") else entry.base_name
        if any(part.startswith(".") for part in rel.split("/")):
            continue  # hidden, as find_images skips them
        if os.path.splitext(rel)[1].lower() in IMAGE_EXTENSIONS:
            found.append(rel)
        else:
            skipped += 1
    if not found:
        extra = f" ({skipped} other files)" if skipped else ""
        raise ImageDirectoryError(
            f"{source}: no image files{extra} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, recursively)"
        )
    found.sort()
    prefix = source.rstrip("/")
    return SourceListing(
        paths=[f"{prefix}/{r}" for r in found], locations=[f"{base}/{r}" for r in found], filesystem=fs, skipped=skipped
    )


def uri_filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) for a URI: pyarrow's own (s3, gs, hdfs, file), else fsspec's."""
    import pyarrow as pa  # optional [ray] extra
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        pass
    except OSError as exc:  # a known scheme whose filesystem could not start (credentials, region)
        raise RayEngineError(f"{uri}: {one_line(exc, 300)}") from None
    try:
        import fsspec  # schemes pyarrow lacks (az://, abfs://, ...): fsspec and that scheme's package

        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        raise InferUsageError(f"{uri}: no filesystem for this URI ({one_line(exc, 200)})") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
