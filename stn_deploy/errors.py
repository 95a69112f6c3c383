"""User-facing errors: each carries one line that names the file and the problem."""

from __future__ import annotations


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``"TypeName: message"`` with the message's whitespace collapsed and cut at ``limit`` characters."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:limit]}"


class StnDeployError(Exception):
    """An error a command reports as a one-line message (never a traceback).

    ``exit_code`` is the process exit status the CLI uses for it.
    """

    exit_code = 1


class CheckpointError(StnDeployError):
    """A file that is not a usable stn-deploy checkpoint."""


class ModelFileError(StnDeployError):
    """An ONNX file that cannot be loaded or lacks the metadata stn-deploy needs."""


class ExportCheckError(StnDeployError):
    """An exported model failed one of its checks; no model file was left behind."""


class ProviderError(StnDeployError):
    """An execution provider was asked for that this machine cannot run."""


class ImageError(StnDeployError):
    """One image could not be read or decoded."""


class DatasetError(StnDeployError):
    """A dataset cannot be found, downloaded or read."""
