"""The Starlette application: Open Inference Protocol routes, classify, metrics, the page.

Every response to a refused request is a 4xx/5xx status with ``{"error": "one line"}``; an
unexpected exception is logged on the server with its traceback and answered as a 500 with a
one-line message, never the traceback. Request bodies are read with a size limit (413) and a
deadline (408, so a slow-loris client holds nothing but its own connection); the same deadline
bounds the wait for a result (504).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from stn_deploy import __version__
from stn_deploy import metadata as md
from stn_deploy.errors import one_line
from stn_deploy.images import DEFAULT_MAX_PIXELS, decode_bytes

from .metrics import ServeMetrics
from .model import ServedModel, dumps, within
from .protocol import (
    HEADER_LENGTH,
    MODEL_VERSION,
    RequestError,
    build_infer_response,
    error_body,
    model_metadata,
    parse_header_length,
    parse_infer_request,
    server_metadata,
)

STATIC = Path(__file__).with_name("static")
ACCESS_LOG = logging.getLogger("stn_serve.access")
LOG = logging.getLogger("stn_serve")
# A JSON body larger than this is parsed on a worker thread, so that one big request does not
# hold up the event loop (and every other client) while json.loads runs.
PARSE_IN_THREAD_BYTES = 1 << 20


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 16 << 20
    request_timeout_s: float = 30.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    top_k: int = 5


def create_app(
    models: Sequence[ServedModel],
    limits: ServerLimits,
    metrics: ServeMetrics,
    *,
    on_ready: Callable[[BaseException | None], None] | None = None,
) -> Starlette:
    """The ASGI app serving ``models``; their batchers start with the app and drain when it stops.

    ``on_ready(error)`` is called once every model has warmed up (``error`` None) or one failed to.
    """
    by_name = {m.name: m for m in models}
    state: dict[str, Any] = {"shutting_down": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        for model in models:
            model.batcher.start(loop)
        announce = loop.create_task(_announce_ready())
        try:
            yield
        finally:
            state["shutting_down"] = True
            announce.cancel()
            # uvicorn has waited for in-flight requests; drain anything still queued (a request
            # whose client went away) without blocking the loop.
            for model in models:
                await run_in_threadpool(model.batcher.close)

    async def _announce_ready() -> None:
        error: BaseException | None = None
        for model in models:
            await run_in_threadpool(model.batcher.ready.wait)
            if model.batcher.warmup_error is not None:
                error = model.batcher.warmup_error
                LOG.error("stn-serve: model '%s' failed to warm up: %s", model.name, one_line(error))
                break
        if on_ready is not None:
            on_ready(error)

    def lookup(request: Request) -> ServedModel:
        name = request.path_params["name"]
        model = by_name.get(name)
        if model is None:
            shown = name if len(name) <= 80 else name[:77] + "..."
            raise RequestError(404, f"unknown model {shown!r} (served: {', '.join(by_name)})")
        version = request.path_params.get("version")
        if version is not None and version != MODEL_VERSION:
            raise RequestError(404, f"model '{name}' has no version {version[:20]!r} (versions: {MODEL_VERSION})")
        return model

    def deadline() -> float:
        return asyncio.get_running_loop().time() + limits.request_timeout_s

    async def read_body(request: Request, until: float) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise RequestError(400, f"Content-Length must be an integer, got {declared[:40]!r}") from None
            if size > limits.max_body_bytes:
                raise _too_large(size)
        chunks: list[bytes] = []
        received = 0

        async def receive_all() -> None:
            nonlocal received
            async for chunk in request.stream():
                received += len(chunk)
                if received > limits.max_body_bytes:
                    raise _too_large(received, at_least=True)
                chunks.append(chunk)

        try:
            await within(receive_all(), until)
        except asyncio.TimeoutError:
            raise RequestError(
                408,
                f"request body not received within {limits.request_timeout_s:g} s ({received} bytes arrived; "
                "--request-timeout-s)",
            ) from None
        return b"".join(chunks)

    def _too_large(size: int, at_least: bool = False) -> RequestError:
        more = "more than " if at_least else ""
        return RequestError(
            413,
            f"request body of {more}{size:,} bytes exceeds the limit of {limits.max_body_bytes:,} bytes "
            "(--max-body-mb)",
        )

    # -- health and metadata --------------------------------------------------------------------
    async def live(request: Request) -> Response:
        return Response(status_code=200)

    async def ready(request: Request) -> Response:
        if state["shutting_down"]:
            raise RequestError(400, "not ready: shutting down")
        waiting = [m.name for m in models if not m.ready]
        if waiting:
            raise RequestError(400, f"not ready: warming up {', '.join(waiting)}")
        return Response(status_code=200)

    async def server_meta(request: Request) -> Response:
        return _json(server_metadata(__version__))

    async def model_meta(request: Request) -> Response:
        model = lookup(request)
        return _json(model_metadata(model.signature, model.parameters()))

    async def model_ready(request: Request) -> Response:
        model = lookup(request)
        if not model.ready:
            why = one_line(model.batcher.warmup_error) if model.batcher.warmup_error else "warming up"
            raise RequestError(400, f"model '{model.name}' is not ready: {why}")
        return Response(status_code=200)

    # -- inference ----------------------------------------------------------------------------------
    async def infer(request: Request) -> Response:
        until = deadline()
        model = lookup(request)
        model.refuse_if_full()  # before reading and parsing the body: shedding load must be cheap
        body = await read_body(request, until)
        header_length = parse_header_length(request.headers.get(HEADER_LENGTH), len(body))
        if len(body) > PARSE_IN_THREAD_BYTES:
            parsed = await run_in_threadpool(parse_infer_request, body, header_length, model.signature)
        else:
            parsed = parse_infer_request(body, header_length, model.signature)
        del body
        arrays = await model.infer(parsed.inputs, parsed.output_names, until)
        content, json_length = build_infer_response(model.name, parsed.id, parsed.outputs, arrays)
        if json_length is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(json_length)})

    async def classify(request: Request) -> Response:
        until = deadline()
        model = lookup(request)
        top_k = _int_param(request, "top_k", limits.top_k, 1, len(model.class_names))
        images = request.query_params.get("images", "0").lower() in ("1", "true", "yes")
        model.refuse_if_full()
        body = await read_body(request, until)
        content_type = request.headers.get("content-type", "")
        if content_type.lower().startswith("multipart/form-data"):
            data, name = await _multipart_image(request.headers, body, limits.max_body_bytes)
        else:
            data, name = body, "upload"
        if not data:
            raise RequestError(
                400, "empty body: send the image bytes (curl --data-binary @digit.png) or a multipart upload"
            )
        decoded = await run_in_threadpool(decode_bytes, data, name, model.preprocessing, max_pixels=limits.max_pixels)
        if not decoded.ok:
            raise RequestError(400, f"{name}: {decoded.error}")
        inputs = model.preprocessing.normalize(decoded.array[None])
        wanted = [md.LOG_PROBS] + [n for n in (md.THETA,) if model.has_theta]
        if images and model.has_warped:
            wanted.append(md.WARPED)
        arrays = await model.infer(inputs, wanted, until)
        result = model.classification(arrays, top_k, images, inputs)
        return Response(dumps(result), media_type="application/json")

    # -- observability and the page -------------------------------------------------------------------
    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def page_models(request: Request) -> Response:
        return _json({"models": [m.page_info() for m in models], "top_k": limits.top_k})

    def model_routes(prefix: str) -> list[Route]:
        return [
            Route(prefix, model_meta, methods=["GET"]),
            Route(prefix + "/ready", model_ready, methods=["GET"]),
            Route(prefix + "/infer", infer, methods=["POST"]),
            Route(prefix + "/classify", classify, methods=["POST"]),
        ]

    routes = [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_meta, methods=["GET"]),
        *model_routes("/v2/models/{name}"),
        *model_routes("/v2/models/{name}/versions/{version}"),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/", page, methods=["GET"]),
        Route("/ui/models", page_models, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(AccessMiddleware, metrics=metrics, models=set(by_name))],
        exception_handlers={RequestError: _request_error, HTTPException: _http_error, Exception: _internal_error},
    )
    # The server sets this when a shutdown begins, so /v2/health/ready says so at once.
    app.state.serve = state
    return app


# -- helpers --------------------------------------------------------------------------------------------
def _json(obj: Any, status: int = 200) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(message), status_code=status, media_type="application/json", headers=headers)


async def _request_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    return _error(exc.status, exc.message, exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no such endpoint: {request.method} {_printable(request.url.path)}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {_printable(request.url.path)}"
    else:
        message = str(exc.detail)
    return _error(exc.status_code, message, dict(exc.headers or {}))


async def _internal_error(request: Request, exc: Exception) -> Response:
    LOG.error("stn-serve: internal error on %s %s", request.method, _printable(request.url.path), exc_info=exc)
    return _error(500, f"internal server error ({type(exc).__name__}); the server log has the details")


def _printable(path: str, limit: int = 200) -> str:
    """A client-chosen path for a log line or message: percent-encoded, so it cannot forge lines."""
    text = quote(path, safe="/:@!$&'()*+,;=-._~")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _int_param(request: Request, key: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(key)
    if raw is None:
        return min(default, high)
    try:
        value = int(raw)
    except ValueError:
        raise RequestError(400, f"query parameter {key} must be an integer, got {raw[:20]!r}") from None
    if not low <= value <= high:
        raise RequestError(400, f"query parameter {key} must be between {low} and {high}, got {value}")
    return value


async def _multipart_image(headers: Headers, body: bytes, max_bytes: int) -> tuple[bytes, str]:
    """The first file of a multipart/form-data body (field name free), and a safe name for it."""

    async def stream() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(headers, stream(), max_files=4, max_fields=16, max_part_size=max_bytes)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise RequestError(400, f"malformed multipart upload: {exc.message}") from None
    try:
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read()
                return data, _safe_name(value.filename)
    finally:
        await form.close()
    raise RequestError(
        400, "the multipart upload holds no file (send the image as a file field, e.g. curl -F image=@digit.png)"
    )


def _safe_name(filename: str | None) -> str:
    base = (filename or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in base)[:100]
    return cleaned or "upload"


def _endpoint(path: str, models: set[str]) -> tuple[str, str]:
    """(model, endpoint) labels for a request path; the model label is empty for unknown names."""
    parts = path.strip("/").split("/")
    if path == "/metrics":
        return "", "metrics"
    if parts[:2] == ["v2", "health"]:
        return "", "health"
    if parts == ["v2"]:
        return "", "server_metadata"
    if parts[:2] == ["v2", "models"] and len(parts) >= 3:
        model = parts[2] if parts[2] in models else ""
        rest = parts[3:]
        if rest[:1] == ["versions"]:
            rest = rest[2:]
        endpoint = {
            (): "model_metadata",
            ("ready",): "model_ready",
            ("infer",): "infer",
            ("classify",): "classify",
        }.get(tuple(rest), "other")
        return model, endpoint
    if path == "/" or parts[0] in ("static", "ui"):
        return "", "page"
    return "", "other"


class AccessMiddleware:
    """One access-log line and the request metrics for every HTTP request (a pure ASGI middleware)."""

    def __init__(self, app: Any, metrics: ServeMetrics, models: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.models = models

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # if the app fails before it answers, the error middleware outside answers 500
        sent = 0

        async def send_and_note(message: dict[str, Any]) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            seconds = time.perf_counter() - start
            path = scope.get("path", "")
            model, endpoint = _endpoint(path, self.models)
            self.metrics.observe_request(model, endpoint, status, seconds)
            client = scope.get("client") or ("-", 0)
            query = scope.get("query_string", b"")
            target = _printable(path) + ("?" + _printable(query.decode("latin-1")) if query else "")
            ACCESS_LOG.info(
                '%s:%s "%s %s HTTP/%s" %d %d %.2fms',
                client[0],
                client[1],
                scope.get("method", "-"),
                target,
                scope.get("http_version", "1.1"),
                status,
                sent,
                seconds * 1e3,
            )
