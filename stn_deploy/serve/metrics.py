"""Prometheus metrics for ``GET /metrics`` (prometheus_client), one registry per server.

Requests and errors are counted by model, endpoint and status code; the model label is empty for
requests that name no served model (an unknown name is client input and must not grow the label
set). Latency is a histogram per model and endpoint, batches a size histogram per model, and the
queue depth and images/s are read when the metrics are scraped.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# Request latency buckets (seconds): a batch of one digit runs in well under a millisecond on a
# CPU, a full queue of batches takes tens to hundreds of milliseconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RATE_WINDOW_S = 10.0  # images/s is averaged over this window


class ImageRate:
    """Images served per second over the last ``window`` seconds (thread-safe)."""

    def __init__(self, window: float = RATE_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, images: int) -> None:
        with self._lock:
            self._events.append((self._clock(), images))

    def rate(self) -> float:
        now = self._clock()
        with self._lock:
            while self._events and self._events[0][0] < now - self.window:
                self._events.popleft()
            return sum(n for _, n in self._events) / self.window


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        # The *_created series (each counter's creation time) double the output and say nothing
        # here; the switch is process-wide, which is the server's process.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "stn_serve_requests", "HTTP requests answered", ["model", "endpoint", "code"], registry=r
        )
        self.errors = Counter(
            "stn_serve_request_errors",
            "HTTP requests answered with a 4xx or 5xx status",
            ["model", "endpoint", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "stn_serve_request_duration_seconds",
            "Time from request start to the last byte of the response",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "stn_serve_batch_size",
            "Images per batch run by the dynamic batcher",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "stn_serve_batch_duration_seconds",
            "Time Session.run took per batch",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter("stn_serve_images", "Images run through the model", ["model"], registry=r)
        self.queue_depth = Gauge("stn_serve_queue_depth", "Requests waiting for a batch", ["model"], registry=r)
        self.images_per_second = Gauge(
            "stn_serve_images_per_second",
            f"Images run per second over the last {RATE_WINDOW_S:g} s",
            ["model"],
            registry=r,
        )
        self.ready = Gauge("stn_serve_model_ready", "1 once the model has warmed up", ["model"], registry=r)
        self._rates: dict[str, ImageRate] = {}

    def add_model(self, name: str, depth: Callable[[], int], ready: Callable[[], bool]) -> None:
        rate = self._rates[name] = ImageRate()
        self.queue_depth.labels(name).set_function(depth)
        self.images_per_second.labels(name).set_function(rate.rate)
        self.ready.labels(name).set_function(lambda: 1.0 if ready() else 0.0)

    def observe_batch(self, model: str, images: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(images)
        self.batch_seconds.labels(model).observe(seconds)
        self.images.labels(model).inc(images)
        self._rates[model].add(images)

    def observe_request(self, model: str, endpoint: str, status: int, seconds: float) -> None:
        code = str(status)
        self.requests.labels(model, endpoint, code).inc()
        if status >= 400:
            self.errors.labels(model, endpoint, code).inc()
        self.latency.labels(model, endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
