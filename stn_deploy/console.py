"""Shared command-line plumbing: one-line errors instead of tracebacks, JSON output."""

from __future__ import annotations

import functools
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from .cells import json_safe
from .errors import StnDeployError, clip

F = TypeVar("F", bound=Callable[..., Any])


# -- hardening (issue 12): SIGTERM is handled like Ctrl-C ---------------------------------------
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, what a shell reports for a process SIGTERM ended
ERROR_MESSAGE_LIMIT = 1000  # characters of one error line; a message quoting a huge value is cut


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so the same ``finally``/``with`` blocks run as on
    Ctrl-C: :func:`stn_deploy.fileio.atomic_path` removes its temporary file and the old output
    stays. A KeyboardInterrupt subclass, so code that cleans up on Ctrl-C cleans up here too."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While the block runs (main thread only), SIGTERM raises :class:`Terminated`; further
    SIGTERMs are ignored so the clean-up it starts can finish (SIGKILL still ends the process)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _error_line(text: str) -> str:
    return clip(text, ERROR_MESSAGE_LIMIT)


# -- end hardening


def report_errors(fn: F) -> F:
    """Turn :class:`StnDeployError` and OS errors into ``Error: <message>`` and an exit code.

    Exit codes: the error's ``exit_code`` (1 unless the class says otherwise), 1 for an OS error
    (named by its file: ENOSPC, EROFS, ENAMETOOLONG, ...), 130 for Ctrl-C and 143 for SIGTERM
    (the temporary output removed, the old output kept). Everything else is a bug and keeps its
    traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with sigterm_raises():
                return fn(*args, **kwargs)
        except StnDeployError as exc:
            click.echo(f"Error: {_error_line(str(exc))}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"Error: {_error_line(f'{where}{exc.strerror or exc}')}", err=True)
            sys.exit(1)
        except Terminated:
            click.echo("Terminated.", err=True)
            sys.exit(EXIT_TERMINATED)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


class AutoOrCount(click.ParamType):
    """``auto`` or a positive whole number (``--streams``, ``--batch-size``)."""

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


STREAMS = AutoOrCount()
BATCH = AutoOrCount()

# --device-check/--no-device-check: in provider_options, and on its own in stn-bench (whose
# backends, not a --provider, choose the GPU rows).
device_check_option = click.option(
    "--device-check/--no-device-check",
    default=True,
    show_default=True,
    help="On a GPU provider, run the warm-up batch on the CPU provider too and stop if the log-probabilities "
    "disagree (fp32: max |Δ| 1e-3 and identical top-1; fp16, int8, --cuda-tf32 and --trt-fp16: fp16's "
    "bound, 5e-2).",
)


def provider_options(providers: Sequence[str]) -> Callable[[F], F]:
    """``--provider`` and the GPU options of a command that runs a ``Session`` (stn-infer,
    stn-serve), spelled and explained the same way in each. ``providers`` is
    ``stn_deploy.runtime.PROVIDERS`` (the core layer does not import the runtime). The command
    receives ``provider``, ``device_id``, ``trt_fp16``, ``cuda_tf32``, ``trt_engine_cache``,
    ``device_check`` and ``strict_placement``."""
    options = [
        click.option(
            "--provider",
            "-p",
            type=click.Choice(list(providers)),
            default="auto",
            show_default=True,
            help="Execution provider; auto = TensorRT, else CUDA, else CPU.",
        ),
        click.option(
            "--device-id",
            default=0,
            show_default=True,
            type=click.IntRange(min=0),
            help="GPU ordinal for cuda/tensorrt.",
        ),
        click.option("--trt-fp16", is_flag=True, help="TensorRT: allow fp16 kernels."),
        click.option(
            "--cuda-tf32",
            is_flag=True,
            help="CUDA: let fp32 convolutions and matmuls use TF32 (faster on Ampere and later; log-probs move by "
            "~1e-3). Off by default: an fp32 model computes in fp32.",
        ),
        click.option(
            "--trt-engine-cache",
            type=click.Path(path_type=Path),
            default=None,
            help="TensorRT: engine/timing cache directory.",
        ),
        device_check_option,
        click.option(
            "--strict-placement",
            is_flag=True,
            help="Fail (instead of warn) when a GPU provider leaves compute nodes on the CPU.",
        ),
    ]

    def decorate(fn: F) -> F:
        for option in reversed(options):  # click lists options in the order they are written
            fn = option(fn)
        return fn

    return decorate


def to_json(obj: Any) -> str:
    """Pretty, stable JSON for reports (numpy scalars and paths included).

    Strict JSON: a missing or non-finite number (NaN, ±Infinity) is written as ``null``
    (:func:`stn_deploy.cells.json_safe`), never as a bare ``NaN`` that strict parsers reject.
    """
    return json.dumps(json_safe(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False)


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return json_safe(obj.item())
        if isinstance(obj, np.ndarray):
            return json_safe(obj.tolist())
    except ImportError:  # pragma: no cover
        pass
    if hasattr(obj, "__fspath__"):
        return json_safe(str(obj))
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
