"""User-facing errors: each carries one line that names the file and the problem."""

from __future__ import annotations


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``"TypeName: message"`` with the message's whitespace collapsed and cut at ``limit`` characters
    (a cut message ends in ``…``)."""
    return f"{type(exc).__name__}: {clip(str(exc), limit)}"


def shorten(value: object, limit: int = 80) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters with ``…``: how an error quotes a
    value it was given, which may be a 10 MB string or a million-element list."""
    if isinstance(value, (list, tuple, dict, set)) and len(value) > limit:
        return f"{type(value).__name__} of {len(value)} items"  # never repr a huge container
    return clip(repr(value), limit)


def clip(text: str, limit: int = 300) -> str:
    """``text`` on one line (whitespace collapsed), cut to ``limit`` characters with ``…``."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


class StnDeployError(Exception):
    """An error a command reports as a one-line message (never a traceback).

    ``exit_code`` is the process exit status the CLI uses for it.
    """

    exit_code = 1


class CheckpointError(StnDeployError):
    """A file that is not a usable stn-deploy checkpoint."""


class ModelFileError(StnDeployError):
    """An ONNX file that cannot be loaded or lacks the metadata stn-deploy needs."""


class MetadataError(ModelFileError, ValueError):
    """Missing or malformed stn-deploy metadata in an ONNX file (a ValueError too, for older callers)."""


class PreprocessingError(StnDeployError, ValueError):
    """A preprocessing field of the wrong type, not finite, or out of range (a ValueError too)."""


class ExportCheckError(StnDeployError):
    """An exported model failed one of its checks; no model file was left behind."""


class ProviderError(StnDeployError):
    """An execution provider was asked for that this machine cannot run."""


class ImageError(StnDeployError):
    """One image could not be read or decoded."""


class DatasetError(StnDeployError):
    """A dataset cannot be found, downloaded or read."""
