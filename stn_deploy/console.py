"""Shared command-line plumbing: one-line errors instead of tracebacks, JSON output."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .errors import StnDeployError

F = TypeVar("F", bound=Callable[..., Any])


def report_errors(fn: F) -> F:
    """Turn :class:`StnDeployError` (and a few OS errors) into ``Error: <message>`` and an exit code.

    Everything else is a bug and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except StnDeployError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"Error: {where}{exc.strerror or exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


class StreamsType(click.ParamType):
    """``--streams``: ``auto`` or a positive number of concurrent inference streams."""

    name = "auto|N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str | int:
        if isinstance(value, int) and value >= 1:
            return value
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        try:
            number = int(text)
        except ValueError:
            number = 0
        if number < 1:
            self.fail(f"expected 'auto' or a positive number, got {value!r}", param, ctx)
        return number


STREAMS = StreamsType()


def to_json(obj: Any) -> str:
    """Pretty, stable JSON for reports (numpy scalars and paths included)."""
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default)


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(obj, "__fspath__"):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
