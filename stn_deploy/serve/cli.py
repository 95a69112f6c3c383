"""``stn-serve``: serve exported models over the Open Inference Protocol (uvicorn + Starlette, no torch)."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import click
import uvicorn
from PIL import Image

from stn_deploy.console import provider_options, report_errors
from stn_deploy.errors import StnDeployError, one_line
from stn_deploy.images import DEFAULT_MAX_PIXELS
from stn_deploy.runtime import PROVIDERS, STREAM_CHUNK, ProviderConfig, Session

from .app import ServerLimits, create_app
from .metrics import ServeMetrics
from .model import BatchingConfig, ServedModel, check_name

LOG = logging.getLogger("stn_serve")
# ONNX Runtime intra-op threads per model when --threads is not given. On the project's 2-core
# machine the event loop (HTTP parsing, JSON, responses) needs most of a core under load, and an
# ONNX Runtime pool as wide as the machine fights it for the cores: benchmarks/serve_load.py
# measures the choices (docs/serve.md has the numbers).
DEFAULT_THREADS = 1
# --max-queue-delay-ms defaults to 0: while one batch runs the next one queues, so batches fill by
# themselves under load, and a wait for company only adds latency. On the project's 2-core machine
# (shared, so best of 3 alternating 3 s wrk runs) 0 ms beat 0.5 ms and 2 ms at 1, 8 and 64 clients:
# 696/507/288 req/s at 1 client, 1102/907/588 at 64 (docs/serve.md).
# A backlog large enough for a burst of new connections (the kernel caps it at somaxconn).
BACKLOG = 2048
# Seconds uvicorn waits, after the last request's deadline, for connections to finish at shutdown.
SHUTDOWN_GRACE_S = 5.0


class ServeError(StnDeployError):
    """The server cannot start (port in use, a model that fails to warm up)."""


class ServeUsageError(StnDeployError):
    exit_code = 2


HELP = """Serve MODELS (ONNX files written by stn-export) over HTTP: the Open Inference Protocol
(KServe v2, what Triton, KServe and tritonclient speak), an image endpoint, Prometheus metrics and
a web page.

\b
Endpoints (NAME is the file stem, or --name):
  GET  /v2/health/live, /v2/health/ready, /v2, /v2/models/NAME[/versions/1][/ready]
  POST /v2/models/NAME/infer      tensors as JSON (flat or nested) or binary (tritonclient's default)
  POST /v2/models/NAME/classify   image bytes or a multipart upload -> label, top-k, theta as JSON
  GET  /metrics                   Prometheus metrics;  GET /  the web page (drop an image)

\b
Requests for a model are batched: they queue and run together up to --max-batch-size images or
--max-queue-delay-ms, on a worker thread. Past --max-queue waiting requests a request gets 503
with Retry-After; a request with no answer within --request-timeout-s gets 504 (408 if its body
did not arrive in time); a body over --max-body-mb gets 413. SIGTERM or Ctrl-C stops accepting,
answers every accepted request, and exits 0.

\b
Examples:
  stn-serve stn.onnx                                  # http://127.0.0.1:8000
  curl --data-binary @digit.png http://127.0.0.1:8000/v2/models/stn/classify
  stn-serve a.onnx b.onnx --name digits --name cifar --host 0.0.0.0 --port 9000

\b
Exit status: 0 stopped by SIGTERM/SIGINT after a graceful shutdown; 1 a model, provider or port
error (one line on stderr); 2 bad arguments.
"""


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--name", "names", multiple=True, help="Model name in URLs, once per MODEL in order (default: the file stem)."
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port (0: any free port; the ready line says which).",
)
@provider_options(PROVIDERS)
@click.option(
    "--threads",
    "-t",
    default=None,
    type=click.IntRange(min=1),
    help=f"ONNX Runtime intra-op threads per model (default {DEFAULT_THREADS}, or --streams: the event loop "
    "needs a core of its own).",
)
@click.option(
    "--streams",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="CPU: run each batch on this many concurrent streams of threads/streams ONNX Runtime threads, "
    f"taking chunks of {STREAM_CHUNK} images.",
)
@click.option(
    "--ort-spin/--no-ort-spin",
    default=False,
    show_default=True,
    help="Let idle ONNX Runtime threads spin-wait (off: they sleep and leave the cores to the HTTP side).",
)
@click.option(
    "--max-batch-size",
    default=32,
    show_default=True,
    type=click.IntRange(1, 4096),
    help="Most images in one batch, and in one request.",
)
@click.option(
    "--max-queue-delay-ms",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 60_000),
    help="Longest the oldest queued request waits for a batch to fill. 0: a batch starts as soon as the model "
    "is free, with every request that queued while the last one ran (batches still form under load).",
)
@click.option(
    "--max-queue",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most requests waiting per model; past it a request gets 503 at once.",
)
@click.option(
    "--max-body-mb",
    default=16.0,
    show_default=True,
    type=click.FloatRange(min=0.001),
    help="Largest request body (413 above it).",
)
@click.option(
    "--request-timeout-s",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0.001),
    help="Per request: the body must arrive (else 408) and the answer be ready (else 504) within this time.",
)
@click.option(
    "--max-pixels",
    default=DEFAULT_MAX_PIXELS,
    show_default=True,
    type=click.IntRange(min=1),
    help="classify: refuse images with more pixels than this (decompression-bomb guard, as stn-infer).",
)
@click.option(
    "--top-k", default=5, show_default=True, type=click.IntRange(min=1), help="classify: default number of top classes."
)
@click.option("--access-log/--no-access-log", default=True, show_default=True, help="One line per request on stderr.")
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="When ready, print one JSON line on stdout: the URL, the models and the settings.",
)
@report_errors
def main(
    models: tuple[Path, ...],
    names: tuple[str, ...],
    host: str,
    port: int,
    provider: str,
    device_id: int,
    trt_fp16: bool,
    cuda_tf32: bool,
    trt_engine_cache: Path | None,
    device_check: bool,
    strict_placement: bool,
    threads: int | None,
    streams: int,
    ort_spin: bool,
    max_batch_size: int,
    max_queue_delay_ms: float,
    max_queue: int,
    max_body_mb: float,
    request_timeout_s: float,
    max_pixels: int,
    top_k: int,
    access_log: bool,
    log_level: str,
    as_json: bool,
) -> None:
    _configure_logging(log_level, access_log)
    model_names = _model_names(models, names)
    if threads is None:
        threads = max(DEFAULT_THREADS, streams)
    if streams > threads:
        raise ServeUsageError(
            f"--streams {streams} needs --threads >= {streams} (each stream runs at least one thread)"
        )
    Image.MAX_IMAGE_PIXELS = max_pixels  # PIL's own bomb limit, behind the explicit check (as stn-infer)
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

    metrics = ServeMetrics()
    batching = BatchingConfig(
        max_batch_size=max_batch_size, max_queue_delay_s=max_queue_delay_ms / 1e3, max_queue=max_queue
    )
    provider_config = ProviderConfig(
        device_id=device_id,
        trt_fp16=trt_fp16,
        trt_engine_cache=trt_engine_cache,
        trt_max_batch=max_batch_size,  # TensorRT's optimization profile covers the largest batch
        cuda_tf32=cuda_tf32,
    )
    served = []
    for path, name in zip(models, model_names):
        session = Session(
            path,
            provider,
            provider_config=provider_config,
            threads=threads,
            streams=streams,
            spin=ort_spin,
            warmup=1,
            warmup_batch=1,
            device_check=device_check,
        )
        session.check_placement(strict_placement, warn=lambda m: click.echo(f"Warning: {m}", err=True))
        served.append(ServedModel(name, session, batching, metrics))
    limits = ServerLimits(
        max_body_bytes=int(max_body_mb * (1 << 20)),
        request_timeout_s=request_timeout_s,
        max_pixels=max_pixels,
        top_k=top_k,
    )
    sock = _listen(host, port)
    bound = sock.getsockname()
    url = f"http://{_url_host(host)}:{bound[1]}"
    settings = {
        "provider": served[0].session.providers[0],
        "threads": threads,
        "streams": streams,
        "max_batch_size": max_batch_size,
        "max_queue_delay_ms": max_queue_delay_ms,
        "max_queue": max_queue,
        "max_body_mb": max_body_mb,
        "request_timeout_s": request_timeout_s,
    }
    failure: list[BaseException] = []
    server: _Server | None = None

    def on_ready(error: BaseException | None) -> None:
        if error is not None:
            failure.append(error)
            assert server is not None
            server.should_exit = True
            return
        click.echo(f"stn-serve: ready at {url} ({', '.join(m.name for m in served)})", err=True)
        if as_json:
            click.echo(json.dumps({"url": url, "models": [m.describe() for m in served], **settings}))
            sys.stdout.flush()

    app = create_app(served, limits, metrics, on_ready=on_ready)
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,  # our middleware writes one line per request, with the latency
        lifespan="on",
        backlog=BACKLOG,
        timeout_graceful_shutdown=request_timeout_s + SHUTDOWN_GRACE_S,
        server_header=False,
    )
    server = _Server(config, served, app.state.serve)
    click.echo(
        f"stn-serve: listening on {url}: {', '.join(f'{m.name} ({m.path})' for m in served)} on "
        f"{settings['provider']}, "
        f"{threads} thread(s), {streams} stream(s), max batch {max_batch_size}, max delay {max_queue_delay_ms:g} ms; "
        "warming up",
        err=True,
    )
    server.run(sockets=[sock])
    if failure:
        raise ServeError(f"a model failed to warm up: {one_line(failure[0])}")
    click.echo("stn-serve: stopped", err=True)


def _model_names(models: tuple[Path, ...], names: tuple[str, ...]) -> list[str]:
    if names and len(names) != len(models):
        raise ServeUsageError(
            f"--name is given {len(names)} time(s) for {len(models)} model(s): give one per model, in order"
        )
    chosen = list(names) if names else [p.stem for p in models]
    for name, path in zip(chosen, models):
        try:
            check_name(name)
        except ValueError as exc:
            hint = "" if names else f" (from {path}; choose one with --name)"
            raise ServeUsageError(f"{exc}{hint}") from None
    duplicates = sorted({n for n in chosen if chosen.count(n) > 1})
    if duplicates:
        raise ServeUsageError(f"model name(s) {', '.join(duplicates)} used twice; give each model its own --name")
    return chosen


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=BACKLOG)
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _configure_logging(level: str, access_log: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    root = logging.getLogger("stn_serve")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    logging.getLogger("stn_serve.access").disabled = not access_log
    # uvicorn's own lines (startup, shutdown steps) only at debug; errors always.
    uv = logging.getLogger("uvicorn.error")
    uv.handlers[:] = [handler]
    uv.setLevel("DEBUG" if level == "debug" else "WARNING")
    uv.propagate = False


class _Server(uvicorn.Server):
    """uvicorn's server with stn-serve's signal handling.

    uvicorn re-raises a caught SIGTERM/SIGINT after its graceful shutdown, so the process would
    die by the signal (status -15 / 130); stn-serve's shutdown is the normal end of its life and
    exits 0 once every accepted request has been answered.
    """

    def __init__(self, config: uvicorn.Config, models: list[ServedModel], app_state: dict) -> None:
        super().__init__(config)
        self._models = models
        self._app_state = app_state

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
            click.echo("stn-serve: second interrupt: stopping without waiting", err=True)
            return
        if not self.should_exit:
            self._app_state["shutting_down"] = True  # /v2/health/ready answers 400 from now on
            for model in self._models:  # queued requests run now instead of waiting for company
                model.batcher.hurry()
            queued = sum(m.batcher.depth for m in self._models)
            click.echo(
                f"stn-serve: {signal.Signals(sig).name}: no new connections; answering the requests in flight "
                f"({queued} queued)",
                err=True,
            )
        self.should_exit = True


if __name__ == "__main__":  # pragma: no cover
    main()
