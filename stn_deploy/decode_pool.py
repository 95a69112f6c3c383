"""Decoding spread over the cores, each batch assembled in place in the model's input buffer.

A run keeps a small ring of batch buffers, float32 ``[batch, C, H, W]`` each: the model's input
exactly as ONNX Runtime reads it. A batch of files is cut into chunks; each chunk goes to a
worker, which decodes every file into a uint8 staging array of the model's size
(:func:`stn_deploy.decoders.decode_file`) and then normalizes the chunk straight into its rows of
the buffer (the same float32 operations as :meth:`Preprocessing.normalize`, so the values are
bit-identical). Nothing is stacked or copied per image, and the consumer gets a view of the
buffer; only a batch with failed files is compacted (a copy of its good rows).

Pools (``pool=``):

* ``process``: worker processes write into buffers in shared memory. Decoding then needs no GIL
  at all, and the consumer's thread (inference, rows) never waits on it. Worker processes come
  from a fork server (never a fork of a process that already runs ONNX Runtime's threads). A
  worker that dies (the OOM killer, a decoder crash) is replaced; the files of its batch are
  decoded again one by one, and a file that kills a worker twice gets an error row.
* ``thread``: the same work in threads of this process (no start-up cost; libjpeg-turbo, libspng
  and Pillow's decoders run without the GIL for most of the work, the per-file Python does not).
* ``inline``: in the consumer's own thread, one batch at a time (a handful of files: no pool is
  worth starting).

At most ``prefetch`` batches are decoded ahead of the one the consumer holds, so memory is
bounded by ``(prefetch + 1)`` buffers whatever the number of files; ``files`` may be a lazy
iterator (a directory walk in progress): it is read only as buffers free up.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .decode_warnings import capture as capture_warnings
from .decoders import DecodeSpec, decode_into
from .images import DecodedBatch, DecodeResult

POOLS = ("process", "thread", "inline")
NORMALIZE_ROWS = 32  # normalize this many images at a time: their float32 rows stay in the core's cache
WORKER_DIED = "the decoder's worker process died on this file (killed, or a decoder crash)"


class BatchFiller:
    """Decodes files into rows of a batch buffer (the work one worker does on one chunk)."""

    def __init__(self, spec: DecodeSpec) -> None:
        pre = spec.preprocessing
        self.spec = spec
        self.shape = (*pre.image_size, pre.channels)  # H, W, C of one decoded image
        self.mean = np.asarray(pre.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(pre.std, dtype=np.float32).reshape(1, -1, 1, 1)
        self._local = threading.local()

    def _staging(self, n: int) -> np.ndarray:
        stage = getattr(self._local, "stage", None)
        if stage is None or len(stage) < n:
            stage = self._local.stage = np.empty((n, *self.shape), dtype=np.uint8)
        return stage[:n]

    def fill(self, dest: np.ndarray, paths: Sequence[Path]) -> ChunkResult:
        """Decode ``paths`` into ``dest`` (float32 ``[len(paths), C, H, W]``); rows of failed files
        are left undefined. Returns how each file went, compactly (it may cross a process boundary)."""
        stage = self._staging(len(paths))
        decoders: list[str] = []
        problems: dict[int, tuple[str | None, list[str]]] = {}
        with capture_warnings() as caught:  # one capture for the chunk; decode_into empties it per file
            for i, path in enumerate(paths):
                decoder, error, warnings = decode_into(path, self.spec, stage[i], caught)
                decoders.append(_TAGS.setdefault(decoder, decoder))  # one object per tag: pickled once
                if error is not None or warnings:
                    problems[i] = (error, warnings)
        for start in range(0, len(paths), NORMALIZE_ROWS):
            rows = slice(start, start + NORMALIZE_ROWS)
            out = dest[rows]
            # Preprocessing.normalize's operations, in place: uint8 → float32, / 255, - mean, / std.
            np.copyto(out, stage[rows].transpose(0, 3, 1, 2), casting="unsafe")
            np.divide(out, np.float32(255.0), out=out)
            np.subtract(out, self.mean, out=out)
            np.divide(out, self.std, out=out)
        return decoders, problems


ChunkResult = tuple[list[str], dict[int, tuple[str | None, list[str]]]]  # decoder per file; (error, warnings) where any
_TAGS: dict[str, str] = {}


def _results(paths: Sequence[Path], chunk: ChunkResult) -> list[DecodeResult]:
    decoders, problems = chunk
    out = [DecodeResult(path, decoder=decoder) for path, decoder in zip(paths, decoders)]
    for i, (error, warnings) in problems.items():
        out[i].error, out[i].warnings = error, warnings
    return out


# -- worker processes -----------------------------------------------------------------------------
_process_state: dict[str, Any] = {}


def _process_init(spec: DecodeSpec, names: list[str], shape: tuple[int, ...], pil_limit: int | None) -> None:
    from multiprocessing import shared_memory  # process pool only: not imported by a thread or inline run

    # Ctrl-C reaches the whole process group; the parent handles it (stops the run, keeps the old
    # output) and shuts the pool down. A worker that took it too would print its own traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    Image.MAX_IMAGE_PIXELS = pil_limit  # stn-infer's --max-pixels, as in the parent
    kwargs = {"track": False} if "track" in shared_memory.SharedMemory.__init__.__code__.co_varnames else {}
    blocks = [shared_memory.SharedMemory(name=name, **kwargs) for name in names]
    _process_state["blocks"] = blocks  # kept open for the worker's life
    _process_state["buffers"] = [np.ndarray(shape, dtype=np.float32, buffer=b.buf) for b in blocks]
    _process_state["filler"] = BatchFiller(spec)


def _process_fill(slot: int, start: int, paths: list[Path]) -> ChunkResult:
    buffer = _process_state["buffers"][slot]
    return _process_state["filler"].fill(buffer[start : start + len(paths)], paths)


class _Inline(Executor):
    """Runs each call at once in the caller's thread."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - delivered through the future, like a pool
            future.set_exception(exc)
        return future


class DecodePool:
    """Decoded batches of files, in order, with decoding spread over ``workers``.

    ``pool="process"`` starts its workers from a fork server (spawn where there is none), which
    import the main module: a script using it needs the usual ``if __name__ == "__main__":``
    guard. Use as a context manager (it owns threads or processes and shared memory)::

        with DecodePool(spec, batch_size=256, workers=2, pool="process") as pool:
            for batch in pool.batches(files):
                session.run(batch.inputs)        # valid until the next batch is asked for
    """

    def __init__(
        self,
        spec: DecodeSpec,
        *,
        batch_size: int,
        workers: int = 1,
        pool: str = "thread",
        prefetch: int | None = None,
        chunk: int | None = None,
    ) -> None:
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        if batch_size < 1 or workers < 1:
            raise ValueError("batch_size and workers must be >= 1")
        self.spec = spec
        self.batch_size = batch_size
        self.pool = pool
        self.workers = 1 if pool == "inline" else workers
        # Each batch is cut into about one chunk per worker, so all of them work on the batch
        # the consumer waits for next.
        self.chunk = chunk or max(1, math.ceil(batch_size / self.workers))
        # In flight beyond the batch the consumer holds: enough to keep every worker busy.
        self.prefetch = 0 if pool == "inline" else max(1, prefetch if prefetch is not None else 2)
        pre = spec.preprocessing
        self.shape = (batch_size, pre.channels, *pre.image_size)
        self._blocks: list[Any] = []
        self.buffers = self._allocate(self.prefetch + 1)
        self._filler = BatchFiller(spec)
        self._executor: Executor | None = None

    # -- resources ---------------------------------------------------------------------------------
    def _allocate(self, count: int) -> list[np.ndarray]:
        if self.pool != "process":
            return [np.empty(self.shape, dtype=np.float32) for _ in range(count)]
        from multiprocessing import shared_memory  # process pool only

        nbytes = int(np.prod(self.shape)) * 4
        try:
            for _ in range(count):
                self._blocks.append(shared_memory.SharedMemory(create=True, size=nbytes))
        except BaseException:
            self._release_blocks()
            raise
        return [np.ndarray(self.shape, dtype=np.float32, buffer=b.buf) for b in self._blocks]

    def _start(self) -> Executor:
        if self.pool == "inline":
            return _Inline()
        if self.pool == "thread":
            return ThreadPoolExecutor(self.workers, thread_name_prefix="stn-decode")
        from concurrent.futures import ProcessPoolExecutor  # process pool only

        context = _process_context()
        names = [b.name for b in self._blocks]
        return ProcessPoolExecutor(
            self.workers,
            mp_context=context,
            initializer=_process_init,
            initargs=(self.spec, names, self.shape, Image.MAX_IMAGE_PIXELS),
        )

    def _submit(self, slot: int, start: int, paths: list[Path]) -> Future[ChunkResult]:
        if self._executor is None:
            self._executor = self._start()
        if self.pool == "process":
            return self._executor.submit(_process_fill, slot, start, paths)
        return self._executor.submit(self._filler.fill, self.buffers[slot][start : start + len(paths)], paths)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._release_blocks()

    def _release_blocks(self) -> None:
        self.buffers = []
        for block in self._blocks:
            block.close()
            block.unlink()
        self._blocks = []

    def __enter__(self) -> DecodePool:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the stream of batches ---------------------------------------------------------------------
    def batches(self, files: Iterable[Path]) -> Iterator[DecodedBatch]:
        """Batches of ``files`` in order. A batch's ``inputs`` is a view of a reusable buffer:
        it is valid until the next batch is asked for."""
        source = iter(files)
        free = deque(range(len(self.buffers)))
        pending: deque[tuple[int, list[Path], list[Future[ChunkResult]]]] = deque()

        def chunks(slot: int, paths: list[Path]) -> list[Future[ChunkResult]]:
            return [self._submit(slot, i, paths[i : i + self.chunk]) for i in range(0, len(paths), self.chunk)]

        def recover() -> None:
            # A worker process died: every future of that pool is lost. Start a new pool and
            # queue the batches in flight again.
            self._restart()
            for i, (slot, paths, _) in enumerate(pending):
                pending[i] = (slot, paths, chunks(slot, paths))

        def refill(limit: int) -> None:
            while free and len(pending) < limit:
                paths = list(islice(source, self.batch_size))
                if not paths:
                    return
                slot = free.popleft()
                try:
                    futures = chunks(slot, paths)
                except Exception as exc:
                    if not _worker_died(exc):
                        raise
                    recover()
                    futures = chunks(slot, paths)
                pending.append((slot, paths, futures))

        try:
            refill(self.prefetch + 1)
            while pending:
                slot, paths, futures = pending.popleft()
                try:
                    results = [
                        r
                        for i, future in enumerate(futures)
                        for r in _results(paths[i * self.chunk : (i + 1) * self.chunk], future.result())
                    ]
                except Exception as exc:
                    if not _worker_died(exc):
                        raise
                    recover()
                    results = self._one_by_one(slot, paths, recover)
                view = self.buffers[slot][: len(paths)]
                ok = [r.ok for r in results]
                inputs = view if all(ok) else view[np.flatnonzero(ok)]
                yield DecodedBatch(results=results, inputs=inputs)
                free.append(slot)
                refill(self.prefetch + 1)
        finally:
            for _, _, futures in pending:
                for future in futures:
                    future.cancel()

    def _one_by_one(self, slot: int, paths: list[Path], recover: Callable[[], None]) -> list[DecodeResult]:
        """The files of a batch whose worker died, each on its own: a file that kills a worker
        again gets an error row instead of sinking the run."""
        results: list[DecodeResult] = []
        for start, path in enumerate(paths):
            try:
                results.extend(_results([path], self._submit(slot, start, [path]).result()))
            except Exception as exc:
                if not _worker_died(exc):
                    raise
                recover()
                results.append(DecodeResult(path, error=WORKER_DIED, decoder="none"))
        return results

    def _restart(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._start()


def _process_context() -> Any:
    """Worker processes come from a fork server where there is one (a clean process that imported
    numpy, Pillow and the decoders once), never from a fork of this process, whose ONNX Runtime
    threads may hold locks at the moment of a fork."""
    import multiprocessing  # process pool only

    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        context.set_forkserver_preload(["stn_deploy.decode_pool"])
    return context


def prestart_processes() -> None:
    """Start the fork server now, in the background: stn-infer calls this before it loads the
    model, so the server's interpreter start and imports (a few hundred ms) overlap the model
    load instead of delaying the first batch."""
    if _process_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver  # process pool only

        forkserver.ensure_running()


def _worker_died(exc: BaseException) -> bool:
    from concurrent.futures.process import BrokenProcessPool  # only a process pool raises it

    return isinstance(exc, BrokenProcessPool)


def default_workers() -> int:
    """One decode worker per core (at least 1)."""
    return max(1, os.cpu_count() or 1)
