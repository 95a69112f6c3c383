"""Warnings raised while one file is decoded go to that file's result, never to stderr.

Pillow reports odd-but-readable files with :func:`warnings.warn` ("Corrupt EXIF data",
"Truncated File Read", "Palette images with Transparency expressed in bytes ..."). Printed, they
would interleave with a progress bar, once per code location, without saying which file they
are about. :func:`capture` collects every warning raised in the calling thread while its block
runs, one line each, so the decoder can put them in the file's result (stn-infer's summary and
``--json`` list them per file). Outside a capture block warnings behave as Python's defaults say.

``warnings.catch_warnings`` cannot be used for this: it swaps process-wide state, and decoding
runs in several threads at once. Here one hook is installed process-wide and each thread has its
own list.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from typing import Any

_local = threading.local()
_lock = threading.Lock()


def _hook(
    message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    bucket = getattr(_local, "bucket", None)
    if bucket is None:  # not inside capture() in this thread: Python's usual output
        _hook.previous(message, category, filename, lineno, file, line)  # type: ignore[attr-defined]
        return
    if category.__name__ == "DecompressionBombWarning":
        return  # the decoder refuses such files itself, with a clearer error
    text = " ".join(str(message).split())
    bucket.append(f"{category.__name__}: {text}" if text else category.__name__)


_hook.previous = warnings.showwarning  # type: ignore[attr-defined]


_MODULES = r"(PIL|stn_deploy)(\.|$)"  # Pillow and our own decoders


def _ours_first() -> bool:
    first = warnings.filters[0] if warnings.filters else None
    return (
        first is not None
        and first[0] == "always"
        and first[2] is Warning
        and getattr(first[3], "pattern", None) == _MODULES
    )


def _install() -> None:
    """Route warnings through :func:`_hook` and show every occurrence (not once per code line).

    Checked on every capture, not once: test runners and ``catch_warnings`` blocks restore
    ``warnings.showwarning`` and the filters when they exit.
    """
    if warnings.showwarning is _hook and _ours_first():
        return
    with _lock:
        if warnings.showwarning is not _hook:
            _hook.previous = warnings.showwarning  # type: ignore[attr-defined]
            warnings.showwarning = _hook
        if not _ours_first():
            # "default" would show a warning only the first time its code line raises it: the
            # second file with corrupt EXIF would then carry nothing.
            warnings.filterwarnings("always", category=Warning, module=_MODULES)


@contextlib.contextmanager
def capture(into: list[str] | None = None) -> Iterator[list[str]]:
    """Collect the warnings this thread raises inside the block, as ``"Category: message"`` lines
    (appended to ``into`` when given). A nested block keeps its own warnings from the outer one."""
    _install()
    outer = getattr(_local, "bucket", None)
    bucket: list[str] = [] if into is None else into
    _local.bucket = bucket
    try:
        yield bucket
    finally:
        _local.bucket = outer
