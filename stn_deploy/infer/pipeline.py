"""The stn-infer pipeline: decode image files a few batches ahead, run them, write their rows.

Decoding runs in a pool (threads by default) a few batches ahead of inference through a bounded
window of futures, consumed in submission order, so rows come out in the sorted order of the
paths whatever the worker timing. A file that fails to decode gets a row with its error and the
run goes on.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from stn_deploy import metadata as md
from stn_deploy.images import DEFAULT_MAX_PIXELS, DecodedBatch, decode_batch
from stn_deploy.preprocessing import Preprocessing
from stn_deploy.runtime import Session
from stn_deploy.visualize import save_warp_grid

from .rows import Prediction, RowWriter, predictions_for


def default_decode_workers() -> int:
    """One decode thread per core (at most 4). Measured on 2 cores (benchmarks/infer_throughput.py):
    2 decode threads with non-spinning ONNX Runtime threads kept the pipeline closest to
    model-only speed; the threads mostly wait on the GIL or sleep, so they cost little."""
    return max(1, min(4, os.cpu_count() or 1))


def iter_decoded(
    files: Sequence[Path],
    preprocessing: Preprocessing,
    *,
    batch_size: int,
    workers: int,
    pool: str = "thread",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    prefetch: int | None = None,
) -> Iterator[DecodedBatch]:
    """Decoded batches of ``files`` in order, decoded by ``workers`` ahead of the consumer.

    At most ``prefetch`` batches (default ``2 × workers``) are in flight, so memory stays
    bounded however many files there are; the consumer (inference) overlaps with decoding
    because ONNX Runtime and PIL's decoders release the GIL.
    """
    chunks = (files[i : i + batch_size] for i in range(0, len(files), batch_size))
    window = max(1, prefetch if prefetch is not None else 2 * workers)
    executor: Executor = (
        ProcessPoolExecutor(max_workers=workers) if pool == "process" else ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stn-decode")
    )
    pending: deque[Future[DecodedBatch]] = deque()
    try:
        for chunk in chunks:
            pending.append(executor.submit(decode_batch, chunk, preprocessing, max_pixels=max_pixels))
            if len(pending) >= window:
                break
        while pending:
            batch = pending.popleft().result()
            nxt = next(chunks, None)
            if nxt is not None:
                pending.append(executor.submit(decode_batch, nxt, preprocessing, max_pixels=max_pixels))
            yield batch
    finally:
        for fut in pending:
            fut.cancel()
        executor.shutdown(wait=True, cancel_futures=True)


# -- visualization -------------------------------------------------------------------------------
def write_pairs(directory: Path, rows: Sequence[Prediction], inputs: np.ndarray, warped: np.ndarray,
                preprocessing: Preprocessing, root: Path, paths: Sequence[Path]) -> None:
    """One PNG per classified image, mirroring the input tree: the model input beside the warped
    image the classifier saw, with the predicted label (drawn by :mod:`stn_deploy.visualize`)."""
    left = preprocessing.denormalize(inputs)
    right = preprocessing.denormalize(warped)
    labels = [r.label for r in rows if r.error is None]
    for path, a, b, label in zip(paths, left, right, labels):
        rel = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
        dest = directory / rel.parent / f"{rel.name}.png"  # keep the extension: a.png and a.jpg may both exist
        dest.parent.mkdir(parents=True, exist_ok=True)
        save_warp_grid(a[None], b[None], dest, titles=("Input", "Warped"), labels=[label])


# -- the run -------------------------------------------------------------------------------------
@dataclass
class InferSummary:
    images: int = 0
    ok: int = 0
    failed: int = 0
    skipped_files: int = 0
    seconds: float = 0.0
    errors: list[dict[str, str]] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else math.nan


def run_inference(
    session: Session,
    files: Sequence[Path],
    writer: RowWriter | None,
    *,
    root: Path,
    batch_size: int = 64,
    top_k: int = 5,
    decode_workers: int | None = None,
    decode_pool: str = "thread",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    visualize: Path | None = None,
    progress: bool = True,
    want_log_probs: bool = False,
) -> InferSummary:
    """Decode, classify and write rows for ``files``; the engine behind ``stn-infer``."""
    summary = InferSummary(images=len(files))
    outputs_wanted = [md.LOG_PROBS] + [n for n in (md.THETA,) if n in session.output_names]
    if visualize is not None:
        outputs_wanted.append(md.WARPED)
    workers = decode_workers or default_decode_workers()
    bar = tqdm(total=len(files), unit="img", desc="stn-infer", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for batch in iter_decoded(files, session.preprocessing, batch_size=batch_size, workers=workers, pool=decode_pool, max_pixels=max_pixels):
            outputs = session.run(batch.inputs, outputs_wanted) if len(batch.inputs) else {}
            rows = predictions_for(batch, outputs, session.class_names, top_k=top_k, want_log_probs=want_log_probs)
            if writer is not None:
                writer.write(rows)
            for r in rows:
                if r.error is None:
                    summary.ok += 1
                else:
                    summary.failed += 1
                    summary.errors.append({"path": r.path, "error": r.error})
            if visualize is not None and len(batch.inputs):
                ok_paths = [res.path for res in batch.results if res.ok]
                write_pairs(visualize, rows, batch.inputs, outputs[md.WARPED], session.preprocessing, root, ok_paths)
            bar.update(len(batch.results))
            if summary.failed:
                bar.set_postfix(failed=summary.failed, refresh=False)
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - start
    return summary
