"""The stn-infer pipeline: decode image files a few batches ahead, run them, write their rows.

Decoding (:class:`stn_deploy.decode_pool.DecodePool`) runs beside inference, straight into the
model's input buffer, in threads, worker processes or inline, and hands batches back in the
order of the files, so rows come out in the order of the (streamed) directory walk whatever the
worker timing. Nothing one file or one batch does stops the run: a file that fails to decode
gets a row with its error; a batch that ONNX Runtime cannot run gets that error on each of its
rows; a ``--visualize`` picture that cannot be written is an error on its own row.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stn_deploy import metadata as md
from stn_deploy.decode_pool import DecodePool
from stn_deploy.decoders import DecodeSpec
from stn_deploy.errors import StnDeployError, one_line
from stn_deploy.images import DEFAULT_MAX_PIXELS, DecodedBatch
from stn_deploy.preprocessing import Preprocessing
from stn_deploy.runtime import GraphInfo, Session
from stn_deploy.visualize import save_warp_grid

from .rows import Prediction, RowWriter, predictions_for

LARGE_FILE_BYTES = 256 * 1024  # mean file size above which auto decodes in processes
# --batch-size auto: as many images as fit in this many bytes of model input, at most AUTO_BATCH_MAX.
# Larger batches cost less per image (fewer calls, fewer hand-offs between decoding and inference;
# 256 against 64 measured faster for the 32x32 digits model, benchmarks/DECODE.md), while the decode
# ring holds a few such buffers at once, so big inputs get smaller batches.
AUTO_BATCH_BYTES = 16 * 1024 * 1024
AUTO_BATCH_MAX = 256
FALLBACK_BATCH = 64  # when the model's input size cannot be read before the session starts


def auto_batch_size(graph: GraphInfo | None) -> int:
    """``--batch-size auto`` for a model file's ``graph`` facts: from its input size in the metadata."""
    if graph is None:
        return FALLBACK_BATCH
    try:
        pre = Preprocessing.from_json(graph.metadata[md.PREPROCESSING])
    except (KeyError, ValueError, StnDeployError):  # no usable metadata: the session says why in its own words
        return FALLBACK_BATCH
    per_image = 4 * int(np.prod(pre.input_shape))
    return max(1, min(AUTO_BATCH_MAX, AUTO_BATCH_BYTES // per_image))


def default_decode_workers() -> int:
    """One decode worker per core, at most 4 (benchmarks/DECODE.md: on 2 cores, 2 workers beside
    inference's threads kept the pipeline closest to model-only speed)."""
    return max(1, min(4, os.cpu_count() or 1))


def choose_pool(pool: str, files_known: int | None, batch_size: int, mean_file_bytes: float = 0.0) -> str:
    """``auto``: no pool for a run that fits in one batch (nothing to overlap); worker processes
    for large files (each is milliseconds of decoding, and a decode thread pre-empted while it
    holds the GIL stalls the others); threads otherwise (for small files processes cost more in
    start-up and messages than they save). benchmarks/DECODE.md has the measurements."""
    if pool != "auto":
        return pool
    if files_known is not None and files_known <= batch_size:
        return "inline"
    return "process" if mean_file_bytes >= LARGE_FILE_BYTES else "thread"


def mean_file_size(paths: Sequence[Path]) -> float:
    """Mean size in bytes of ``paths`` (a sample: the first batch); unreadable ones count 0."""
    sizes = []
    for path in paths:
        try:
            sizes.append(path.stat().st_size)
        except OSError:
            sizes.append(0)
    return sum(sizes) / len(sizes) if sizes else 0.0


def iter_decoded(
    files: Iterable[Path],
    preprocessing: Preprocessing,
    *,
    batch_size: int,
    workers: int,
    pool: str = "thread",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    prefetch: int | None = None,
    decode: str = "auto",
) -> Iterator[DecodedBatch]:
    """Decoded batches of ``files`` in order, decoded by ``workers`` ahead of the consumer.

    ``files`` may be a lazy iterator (a directory walk in progress). At most ``prefetch`` batches
    are decoded ahead of the one the consumer holds, so memory stays bounded however many files
    there are. Each batch's ``inputs`` is a view of a reused buffer, valid until the next batch
    is asked for (:class:`stn_deploy.decode_pool.DecodePool`).
    """
    spec = DecodeSpec(preprocessing, mode=decode, max_pixels=max_pixels)
    with DecodePool(spec, batch_size=batch_size, workers=workers, pool=pool, prefetch=prefetch) as decoder:
        yield from decoder.batches(files)


def write_pairs(
    directory: Path,
    rows: Sequence[Prediction],
    inputs: np.ndarray,
    warped: np.ndarray,
    preprocessing: Preprocessing,
    root: Path,
) -> None:
    """One PNG per classified row, mirroring the input tree: the model input beside the warped
    image the classifier saw, with the predicted label (drawn by :mod:`stn_deploy.visualize`).

    ``inputs``/``warped`` hold the rows without an error, in order. A picture that cannot be
    written (a name too long with the ``.png`` added, a full disk) becomes that row's error.
    """
    left = preprocessing.denormalize(inputs)
    right = preprocessing.denormalize(warped)
    classified = [r for r in rows if r.error is None]
    for row, a, b in zip(classified, left, right):
        path = Path(row.path)
        rel = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
        dest = directory / rel.parent / f"{rel.name}.png"  # keep the extension: a.png and a.jpg may both exist
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            save_warp_grid(a[None], b[None], dest, titles=("Input", "Warped"), labels=[row.label])
        except (OSError, StnDeployError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            row.error = f"--visualize could not write {dest.name}: {reason}"


@dataclass
class InferSummary:
    images: int = 0
    ok: int = 0
    failed: int = 0
    skipped_files: int = 0
    seconds: float = 0.0
    errors: list[dict[str, str]] = field(default_factory=list)
    # how files were decoded, the decoders' warnings, when the first rows were written
    decoders: dict[str, int] = field(default_factory=dict)
    warnings: list[dict[str, str]] = field(default_factory=list)
    first_rows_s: float | None = None
    pool: str = ""

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else math.nan


def run_inference(
    session: Session,
    files: Iterable[Path],
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
    decode: str = "auto",
) -> InferSummary:
    """Decode, classify and write rows for ``files``; the engine behind ``stn-infer``.

    ``files`` is a sequence or a lazy stream (:class:`stn_deploy.image_walk.ImageWalk`): rows are
    written batch by batch while the walk goes on. ``decode_pool="auto"`` picks by size
    (:func:`choose_pool`).
    """
    summary = InferSummary()
    outputs_wanted = [md.LOG_PROBS] + [n for n in (md.THETA,) if n in session.output_names]
    if visualize is not None:
        outputs_wanted.append(md.WARPED)
    workers = decode_workers or default_decode_workers()
    total = _known_total(files)
    pool = summary.pool = choose_pool(decode_pool, total, batch_size)
    bar = _progress_bar(total, progress and not (total is not None and total <= batch_size))
    decoders: Counter[str] = Counter()
    flush = writer is not None and writer.stream is sys.stdout  # a reader downstream sees each batch
    start = time.perf_counter()
    try:
        batches = iter_decoded(
            files,
            session.preprocessing,
            batch_size=batch_size,
            workers=workers,
            pool=pool,
            max_pixels=max_pixels,
            decode=decode,
        )
        for batch in batches:
            rows = _classify(session, batch, outputs_wanted, top_k, want_log_probs, visualize, root)
            if writer is not None:
                writer.write(rows)
                if flush:
                    writer.stream.flush()
            if summary.first_rows_s is None:
                summary.first_rows_s = time.perf_counter() - start
            summary.images += len(rows)
            for r, res in zip(rows, batch.results):
                decoders[res.decoder] += 1
                if res.warnings:
                    summary.warnings.extend({"path": r.path, "warning": w} for w in res.warnings)
                if r.error is None:
                    summary.ok += 1
                else:
                    summary.failed += 1
                    summary.errors.append({"path": r.path, "error": r.error})
            if bar is not None:
                if bar.total is None and getattr(files, "finished", False):
                    bar.total = files.found  # type: ignore[attr-defined]
                bar.update(len(batch.results))
                if summary.failed:
                    bar.set_postfix(failed=summary.failed, refresh=False)
    finally:
        if bar is not None:
            bar.close()
    summary.seconds = time.perf_counter() - start
    summary.decoders = dict(sorted(decoders.items()))
    return summary


def _classify(
    session: Session,
    batch: DecodedBatch,
    outputs_wanted: list[str],
    top_k: int,
    want_log_probs: bool,
    visualize: Path | None,
    root: Path,
) -> list[Prediction]:
    """One batch's rows. A batch ONNX Runtime cannot run (say a model that fails on a partial
    last batch) gives each of its decoded files that error; the run goes on with the next batch."""
    try:
        outputs = session.run(batch.inputs, outputs_wanted) if len(batch.inputs) else {}
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types; one batch must not end the run
        reason = str(exc) if isinstance(exc, StnDeployError) else one_line(exc, 300)
        failed = f"inference failed for this batch of {len(batch.inputs)} ({reason})"
        return [Prediction(path=r.path.as_posix(), error=r.error if not r.ok else failed) for r in batch.results]
    rows = predictions_for(batch, outputs, session.class_names, top_k=top_k, want_log_probs=want_log_probs)
    if visualize is not None and len(batch.inputs):
        write_pairs(visualize, rows, batch.inputs, outputs[md.WARPED], session.preprocessing, root)
    return rows


def _known_total(files: Iterable[Path]) -> int | None:
    """How many files there are, if known yet (a sequence, or a walk that has finished)."""
    if isinstance(files, Sequence):
        return len(files)
    if getattr(files, "finished", False):
        return int(files.found)  # type: ignore[attr-defined]
    return None


def _progress_bar(total: int | None, enabled: bool) -> Any:
    """A tqdm bar on stderr, or None. tqdm is imported only when a bar is drawn (~50 ms of start-up)."""
    if not enabled:
        return None
    from tqdm import tqdm  # lazy: a one-batch run draws no bar and should not pay for the import

    return tqdm(total=total, unit="img", desc="stn-infer", file=sys.stderr, dynamic_ncols=True)
