"""A served model: the project's Session, its protocol signature, its dynamic batcher and classify."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from stn_deploy import metadata as md
from stn_deploy.errors import one_line
from stn_deploy.runtime import Session

from .batching import BatcherClosed, DynamicBatcher, QueueFull
from .metrics import ServeMetrics
from .protocol import ModelSignature, RequestError, TensorSpec

# A model name is a URL path segment and a Triton model directory name: letters, digits, and
# . _ - inside, never a path.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
NO_WARPED = f"this model has no '{md.WARPED}' output: export it with stn-export --with-warped to see the warped image"
# Retry-After (seconds) sent with a 503: a full queue drains in well under a second on a CPU.
RETRY_AFTER_S = 1
T = TypeVar("T")


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name) or ".." in name:
        raise ValueError(
            f"model name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 32
    max_queue_delay_s: float = 0.0
    max_queue: int = 256


class ServedModel:
    """One ONNX model behind the server: validated requests in, rows out, through the batcher."""

    def __init__(
        self, name: str, session: Session, batching: BatchingConfig, metrics: ServeMetrics | None = None
    ) -> None:
        self.name = check_name(name)
        self.session = session
        self.batching = batching
        self.preprocessing = session.preprocessing
        self.class_names = list(session.class_names)
        self.has_theta = session.has_theta
        self.has_warped = session.has_warped
        # Per-image output shapes from one real run (what the model gives, whatever its graph declares).
        probe = session.run(np.zeros((1, *self.preprocessing.input_shape), np.float32))
        described = session.describe()  # the Session's public account of its file and input
        self._path = Path(described["model"])
        self.signature = ModelSignature(
            name=self.name,
            input=TensorSpec(described["input"], tuple(self.preprocessing.input_shape)),
            outputs=tuple(TensorSpec(n, tuple(probe[n].shape[1:])) for n in session.output_names),
            max_batch_size=batching.max_batch_size,
        )
        self.metrics = metrics
        self.batcher = DynamicBatcher(
            session.run,
            output_order=session.output_names,
            max_batch_size=batching.max_batch_size,
            max_queue_delay_s=batching.max_queue_delay_s,
            max_queue=batching.max_queue,
            name=self.name,
            warmup=self._warmup,
            on_batch=(lambda n, s: metrics.observe_batch(self.name, n, s)) if metrics is not None else None,
        )
        if metrics is not None:
            metrics.add_model(self.name, lambda: self.batcher.depth, lambda: self.ready)

    def _warmup(self) -> None:
        # The first run at a new batch size allocates ONNX Runtime's buffers for it: do that for a
        # full batch before the server says it is ready, so the first burst is not the slow one.
        for rows in (self.batching.max_batch_size, 1, self.batching.max_batch_size):
            self.session.run(np.zeros((rows, *self.preprocessing.input_shape), np.float32))

    @property
    def ready(self) -> bool:
        return self.batcher.ready.is_set() and self.batcher.warmup_error is None

    @property
    def path(self) -> Path:
        return self._path

    def parameters(self) -> dict[str, Any]:
        """Extra metadata for GET /v2/models/{name}: what a client needs to read the outputs."""
        return {
            "class_names": self.class_names,
            "preprocessing": self.preprocessing.to_dict(),
            "max_batch_size": self.batching.max_batch_size,
        }

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "providers": list(self.session.providers),
            "input": self.signature.input.metadata(),
            "outputs": [o.metadata() for o in self.signature.outputs],
            "classes": len(self.class_names),
            "has_theta": self.has_theta,
            "has_warped": self.has_warped,
            # on a GPU provider: the warm-up batch against the CPU provider (None on the CPU)
            "device_check": self.session.device_check.to_dict() if self.session.device_check else None,
        }

    # -- running ----------------------------------------------------------------------------------
    def _queue_full(self) -> RequestError:
        return RequestError(
            503,
            f"model '{self.name}': queue full ({self.batching.max_queue} requests waiting, --max-queue); retry later",
            {"Retry-After": str(RETRY_AFTER_S)},
        )

    def refuse_if_full(self) -> None:
        """503 now if the queue is full (the request would be refused after its body was read anyway)."""
        if self.batcher.depth >= self.batching.max_queue:
            raise self._queue_full()

    async def infer(self, inputs: np.ndarray, outputs: Sequence[str], deadline: float) -> dict[str, np.ndarray]:
        """Queue ``inputs`` and await their rows; ``deadline`` is on the loop's clock (``loop.time()``)."""
        try:
            job = self.batcher.submit(inputs, outputs)
        except QueueFull:
            raise self._queue_full() from None
        except BatcherClosed:
            raise RequestError(503, "the server is shutting down", {"Retry-After": str(RETRY_AFTER_S)}) from None
        try:
            return await within(job.future, deadline)
        except asyncio.TimeoutError:
            self.batcher.cancel(job)
            raise RequestError(
                504,
                f"model '{self.name}': no result within the request timeout (--request-timeout-s); "
                f"{self.batcher.depth} requests are queued",
            ) from None
        except RequestError:
            raise
        except Exception as exc:  # noqa: BLE001 - an inference failure is a 500 with a message, not a traceback
            raise RequestError(500, f"model '{self.name}': inference failed ({one_line(exc, 200)})") from None

    def classification(
        self, arrays: dict[str, np.ndarray], top_k: int, images: bool, inputs: np.ndarray
    ) -> dict[str, Any]:
        """The classify endpoint's answer for one image."""
        log_probs = np.asarray(arrays[md.LOG_PROBS][0], dtype=np.float64)
        k = min(top_k, len(self.class_names))
        order = np.argsort(-log_probs, kind="stable")[:k]
        probs = np.exp(log_probs[order])
        top = [{"label": self.class_names[i], "index": int(i), "prob": float(p)} for i, p in zip(order, probs)]
        body: dict[str, Any] = {
            "model_name": self.name,
            "model_version": "1",
            "label": top[0]["label"],
            "index": top[0]["index"],
            "confidence": top[0]["prob"],
            "top_k": top,
            "theta": arrays[md.THETA][0].reshape(2, 3).tolist() if md.THETA in arrays else None,
        }
        if images:
            body["images"] = {
                "input": _png_data_url(self.preprocessing.denormalize(inputs[0])),
                "warped": _png_data_url(self.preprocessing.denormalize(arrays[md.WARPED][0]))
                if md.WARPED in arrays
                else None,
                "warped_note": None if self.has_warped else NO_WARPED,
            }
        return body

    def page_info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "classes": len(self.class_names),
            "input_shape": list(self.preprocessing.input_shape),
            "has_theta": self.has_theta,
            "has_warped": self.has_warped,
            "warped_note": None if self.has_warped else NO_WARPED,
            "ready": self.ready,
        }


async def within(awaitable: Awaitable[T], deadline: float) -> T:
    """Await ``awaitable`` until ``deadline`` (the loop's clock); asyncio.TimeoutError after it.

    ``asyncio.timeout_at`` (3.11+) needs no extra task per request, unlike ``wait_for`` on a coroutine.
    """
    if hasattr(asyncio, "timeout_at"):
        async with asyncio.timeout_at(deadline):
            return await awaitable
    return await asyncio.wait_for(awaitable, max(0.0, deadline - asyncio.get_running_loop().time()))


def _png_data_url(pixels: np.ndarray) -> str:
    """uint8 HWC (or HW1) pixels as a PNG data URL for the page."""
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
