"""Dynamic batching: requests for one model queue up and run together on one worker thread.

The shape Triton, Ray Serve and LitServe share: a bounded queue, a cap on the batch, and a cap on
how long the first request of a batch waits for company.

* The event loop calls :meth:`DynamicBatcher.submit` with a request's rows; it never blocks: the
  request is queued (or refused at once with :class:`QueueFull` when ``max_queue`` requests are
  already waiting) and an :class:`asyncio.Future` is returned to await.
* The worker thread takes the oldest request, waits at most ``max_queue_delay_s`` from that
  request's arrival for more rows, and takes whole requests in arrival order while they fit in
  ``max_batch_size`` images. A request is never split, so a request of up to ``max_batch_size``
  rows always fits in a batch of its own.
* The batch is concatenated, run (``Session.run`` releases the GIL, so the event loop keeps
  parsing and answering while it runs), cut back into each request's rows by offset, and every
  future is resolved in one hop back to the loop (``call_soon_threadsafe``).
* While a batch runs, new requests queue up, so under load batches fill without any delay; the
  delay only matters when the server is lightly loaded.
* :meth:`close` stops accepting, and the worker runs everything still queued before it exits:
  that is how a graceful shutdown answers every accepted request.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

RunFn = Callable[[np.ndarray, Sequence[str]], dict[str, np.ndarray]]


class QueueFull(Exception):
    """The model's queue holds ``max_queue`` requests already."""


class BatcherClosed(Exception):
    """The batcher is shutting down and takes no new requests."""


@dataclass(eq=False)
class Job:
    """One request's rows, the outputs it wants, and the future its rows are delivered to."""

    inputs: np.ndarray
    outputs: frozenset[str]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return len(self.inputs)


class DynamicBatcher:
    """Batches requests for one model on one worker thread.

    Args:
        run: runs one batch ``[N, ...]`` for the named outputs and returns ``{name: [N, ...]}``.
        output_order: the model's outputs in order (a batch runs the union of what its requests want).
        max_batch_size: most images in one batch.
        max_queue_delay_s: longest the oldest queued request waits for the batch to fill.
        max_queue: most requests waiting (not yet running); past it :meth:`submit` raises QueueFull.
        warmup: called once on the worker thread before the first batch; :attr:`ready` is set after it.
        on_batch: called after every batch with (images, seconds) (metrics).
    """

    def __init__(
        self,
        run: RunFn,
        *,
        output_order: Sequence[str],
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue: int,
        name: str = "model",
        warmup: Callable[[], None] | None = None,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_queue_delay_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_queue_delay_s >= 0")
        self._run = run
        self._output_order = list(output_order)
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue = max_queue
        self.name = name
        self._warmup = warmup
        self._on_batch = on_batch
        self._queue: deque[Job] = deque()
        self._rows = 0  # images queued
        self._cond = threading.Condition()
        self._closing = False
        self._hurry = False  # set at shutdown: run what is queued without waiting for company
        self._running = 0  # images in the batch now running
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._work, name=f"stn-batcher-{name}", daemon=True)
        self.ready = threading.Event()  # set once warm-up finished (or failed: see warmup_error)
        self.warmup_error: BaseException | None = None

    # -- the event loop's side --------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the worker; results are delivered to futures of ``loop``."""
        self._loop = loop
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting (not yet running)."""
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return bool(self._queue) or self._running > 0

    def submit(self, inputs: np.ndarray, outputs: Iterable[str]) -> Job:
        """Queue a request's rows (call on the event loop); await ``job.future`` for ``{name: rows}``."""
        if self._loop is None:
            raise RuntimeError("DynamicBatcher.start() was not called")
        job = Job(inputs=inputs, outputs=frozenset(outputs), future=self._loop.create_future())
        with self._cond:
            if self._closing:
                raise BatcherClosed(self.name)
            if len(self._queue) >= self.max_queue:
                raise QueueFull(self.name)
            self._queue.append(job)
            self._rows += job.rows
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> bool:
        """Take a request that gave up (timed out) out of the queue; False when it already runs."""
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
            self._rows -= job.rows
            self._cond.notify()  # the worker may be waiting on this request's deadline
            return True

    def hurry(self) -> None:
        """Stop waiting for batches to fill (a shutdown began); requests are still taken."""
        with self._cond:
            self._hurry = True
            self._cond.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Take no new requests, run every queued one, and stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the worker thread --------------------------------------------------------------------------
    def _work(self) -> None:
        try:
            if self._warmup is not None:
                self._warmup()
        except BaseException as exc:  # noqa: BLE001 - reported by the server as not ready, with the reason
            self.warmup_error = exc
        finally:
            self.ready.set()
        while True:
            jobs = self._next_batch()
            if jobs is None:
                return
            if jobs:
                self._run_batch(jobs)

    def _next_batch(self) -> list[Job] | None:
        """The next requests to run together; None once closed and drained."""
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            while self._queue and self._rows < self.max_batch_size and not (self._closing or self._hurry):
                # The oldest request still queued sets the deadline (one ahead of it may have given up).
                remaining = self._queue[0].enqueued + self.max_queue_delay_s - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            jobs: list[Job] = []
            rows = 0
            while self._queue and (not jobs or rows + self._queue[0].rows <= self.max_batch_size):
                job = self._queue.popleft()
                self._rows -= job.rows
                rows += job.rows
                jobs.append(job)
            self._running = rows
            return jobs

    def _run_batch(self, jobs: list[Job]) -> None:
        wanted = set().union(*(job.outputs for job in jobs))
        names = [n for n in self._output_order if n in wanted]
        batch = jobs[0].inputs if len(jobs) == 1 else np.concatenate([job.inputs for job in jobs])
        start = time.perf_counter()
        results: list[tuple[asyncio.Future, object]] = []
        try:
            outputs = self._run(batch, names)
        except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error, the worker goes on
            results = [(job.future, exc) for job in jobs]
        else:
            offset = 0
            for job in jobs:
                end = offset + job.rows
                results.append((job.future, {n: outputs[n][offset:end] for n in job.outputs}))
                offset = end
        seconds = time.perf_counter() - start
        with self._cond:
            self._running = 0
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(_deliver, results)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass
        if self._on_batch is not None:
            self._on_batch(len(batch), seconds)


def _deliver(results: list[tuple[asyncio.Future, object]]) -> None:
    for future, value in results:
        if future.done():  # the request timed out meanwhile
            continue
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)
