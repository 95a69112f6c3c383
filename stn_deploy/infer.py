"""``stn-infer``: classify every image under a directory with an exported ONNX model (no torch).

Decoding runs in a pool (threads by default) a few batches ahead of inference through a bounded
window of futures, consumed in submission order, so rows come out in the sorted order of the
paths whatever the worker timing. A file that fails to decode gets a row with its error and the
run goes on.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import click
import numpy as np
from PIL import Image

from . import metadata as md
from .cli import report_errors, to_json
from .decode_pool import POOLS, DecodePool, prestart_processes
from .decoders import AUTO_MODES, DECODE_MODES, DecodeSpec
from .errors import StnDeployError
from .fileio import atomic_path
from .image_walk import walk_images
from .images import DEFAULT_MAX_PIXELS, DecodedBatch
from .preprocessing import Preprocessing
from .runtime import PROVIDERS, STREAM_CHUNK, Session

EXIT_OK = 0
EXIT_USAGE = 2  # bad arguments, missing or empty input directory
EXIT_SOME_FAILED = 3  # the run finished but at least one file could not be classified
OUTPUT_FORMATS = ("csv", "jsonl")


class InferUsageError(StnDeployError):
    exit_code = EXIT_USAGE


# -- the pipeline --------------------------------------------------------------------------------
# -- issue 13: decoding (stn_deploy.decoders, stn_deploy.decode_pool) --------------------------------
def default_decode_workers() -> int:
    """One decode worker per core, at most 4 (benchmarks/DECODE.md: on 2 cores, 2 workers beside
    inference's threads kept the pipeline closest to model-only speed)."""
    return max(1, min(4, os.cpu_count() or 1))


LARGE_FILE_BYTES = 256 * 1024  # mean file size above which auto decodes in processes


def choose_pool(pool: str, files_known: int | None, batch_size: int, mean_file_bytes: float = 0.0) -> str:
    """``auto``: no pool for a run that fits in one batch (nothing to overlap); worker processes
    for large files (a 1920x1080 JPEG: 124 vs 64 img/s with threads, benchmarks/DECODE.md: each
    file is milliseconds of decoding, and a decode thread that the OS pre-empts while it holds
    the GIL stalls the others); threads otherwise (small files: processes cost more in start-up
    and messages than they save, 1336 vs 2748 img/s on 32x32 PNGs)."""
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


# -- end of issue 13's decoding section -------------------------------------------------------------


@dataclass
class Prediction:
    """One output row: a classified file, or a file with its error."""

    path: str
    label: str | None = None
    index: int | None = None
    confidence: float | None = None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    theta: list[float] | None = None
    log_probs: list[float] | None = None
    error: str | None = None


def predictions_for(
    batch: DecodedBatch,
    outputs: dict[str, np.ndarray],
    class_names: Sequence[str],
    *,
    top_k: int,
    want_log_probs: bool = False,
) -> list[Prediction]:
    """Rows for one decoded batch, in the batch's file order."""
    log_probs = outputs.get(md.LOG_PROBS)
    theta = outputs.get(md.THETA)
    k = min(top_k, len(class_names))
    rows: list[Prediction] = []
    if log_probs is not None and len(log_probs):
        order = np.argsort(-log_probs, axis=1, kind="stable")[:, :k]
        top_lp = np.take_along_axis(log_probs, order, axis=1).astype(np.float64)
        top_p = np.exp(top_lp).tolist()
        order_l = order.tolist()
        theta_l = theta.reshape(len(theta), -1).tolist() if theta is not None else None
        lp_l = log_probs.tolist() if want_log_probs else None
    j = 0
    for result in batch.results:
        path = result.path.as_posix()  # as the user gave it: relative IMAGES give relative paths
        if not result.ok:
            rows.append(Prediction(path=path, error=result.error))
            continue
        idx = order_l[j]
        rows.append(
            Prediction(
                path=path,
                label=class_names[idx[0]],
                index=idx[0],
                confidence=top_p[j][0],
                top_k=[(class_names[c], p) for c, p in zip(idx, top_p[j])],
                theta=theta_l[j] if theta_l is not None else None,
                log_probs=lp_l[j] if lp_l is not None else None,
            )
        )
        j += 1
    return rows


# -- output --------------------------------------------------------------------------------------
class RowWriter:
    """Streams predictions as CSV or JSON Lines to an open text file."""

    def __init__(self, stream: IO[str], fmt: str, *, top_k: int, class_names: Sequence[str], theta: bool, log_probs: bool) -> None:
        self.stream = stream
        self.fmt = fmt
        self.k = min(top_k, len(class_names))
        self.theta = theta
        self.log_probs = log_probs
        self.class_names = list(class_names)
        if fmt == "csv":
            self._csv = csv.writer(stream, lineterminator="\n")
            self._csv.writerow(self.columns())

    def columns(self) -> list[str]:
        cols = ["path", "label", "index", "confidence"]
        for i in range(1, self.k + 1):
            cols += [f"top{i}_label", f"top{i}_prob"]
        if self.theta:
            cols += [f"theta_{i}" for i in range(6)]
        if self.log_probs:
            cols += [f"log_prob_{name}" for name in self.class_names]
        cols.append("error")
        return cols

    def write(self, rows: Sequence[Prediction]) -> None:
        if self.fmt == "csv":
            out = []
            for r in rows:
                line: list[Any] = [r.path, r.label or "", "" if r.index is None else r.index, "" if r.confidence is None else r.confidence]
                for i in range(self.k):
                    line += list(r.top_k[i]) if i < len(r.top_k) else ["", ""]
                if self.theta:
                    line += r.theta if r.theta is not None else [""] * 6
                if self.log_probs:
                    line += r.log_probs if r.log_probs is not None else [""] * len(self.class_names)
                line.append(r.error or "")
                out.append(line)
            self._csv.writerows(out)
        else:
            for r in rows:
                obj: dict[str, Any] = {"path": r.path, "label": r.label, "index": r.index, "confidence": r.confidence,
                                       "top_k": [{"label": lab, "prob": p} for lab, p in r.top_k]}
                if self.theta:
                    obj["theta"] = r.theta
                if self.log_probs:
                    obj["log_probs"] = r.log_probs
                obj["error"] = r.error
                self.stream.write(json.dumps(obj) + "\n")


@contextlib.contextmanager
def open_output(output: str) -> Iterator[IO[str]]:
    """``-`` is stdout; a path is written to a temporary file moved into place at the end."""
    if output == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        yield f


def output_format(output: str, fmt: str | None) -> str:
    if fmt:
        return fmt
    if output == "-":
        return "csv"
    ext = Path(output).suffix.lower()
    if ext == ".csv":
        return "csv"
    if ext in (".jsonl", ".ndjson"):
        return "jsonl"
    raise InferUsageError(f"{output}: cannot tell the output format from the extension (use .csv or .jsonl, or --format)")


# -- visualization -------------------------------------------------------------------------------
def write_pairs(directory: Path, rows: Sequence[Prediction], inputs: np.ndarray, warped: np.ndarray,
                preprocessing: Preprocessing, root: Path, paths: Sequence[Path]) -> None:
    """One PNG per classified image, mirroring the input tree: the model input beside the warped
    image the classifier saw, with the predicted label (drawn by :mod:`stn_deploy.visualize`)."""
    from .visualize import save_warp_grid

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
    # issue 13: how files were decoded, the decoders' warnings, when the first rows were written
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
    # -- issue 13: streamed files, the decode pool, decoder statistics ----------------------------
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
        batches = iter_decoded(files, session.preprocessing, batch_size=batch_size, workers=workers, pool=pool,
                               max_pixels=max_pixels, decode=decode)
        for batch in batches:
            outputs = session.run(batch.inputs, outputs_wanted) if len(batch.inputs) else {}
            rows = predictions_for(batch, outputs, session.class_names, top_k=top_k, want_log_probs=want_log_probs)
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
            if visualize is not None and len(batch.inputs):
                ok_paths = [res.path for res in batch.results if res.ok]
                write_pairs(visualize, rows, batch.inputs, outputs[md.WARPED], session.preprocessing, root, ok_paths)
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


# -- end of issue 13's run section ------------------------------------------------------------------


HELP = f"""Classify every image under IMAGES (a directory, searched recursively, or one file).

\b
Reads PNG, JPEG, BMP, WebP, TIFF, GIF (first frame) and PPM/PGM; grayscale, RGBA, palette and 16-bit
images are converted and resized as the model's metadata says. Files are processed in sorted
path order; hidden files and directories are skipped.

\b
Output: one row per image file, as CSV (default) or JSON Lines, chosen by the --output
extension (.csv / .jsonl) or --format. Without --output the rows go to stdout as CSV. Columns:
path, label, index, confidence, top1_label, top1_prob, ... topK_*, theta_0..theta_5 (when the
model outputs theta), log_prob_<class> (with --log-probs), error (empty when the file
was classified). A file is written atomically (a temporary file moved into place at the end).

\b
Bad files (corrupt, truncated, empty, not an image, over --max-pixels) get a row with the error
and the run goes on. A summary line (ok/failed counts, images/s) goes to stderr; --json also
prints the summary as JSON on stdout (then --output must be a file).

\b
Decoding (--decode): 'exact' decodes every file at full size, as training does. 'fast' decodes a
JPEG at 1/2, 1/4 or 1/8 scale inside the JPEG decoder (no smaller than 4x the model's size),
then resizes as the metadata says: faster on photos, slightly different pixels.
'auto' (the default) uses fast for JPEG, where it met the accuracy rule (top-1 agreement with
exact >= 99.5%, accuracy within 0.2 points at 4x and 16x the model's size), and exact for PNG
and other formats (one decode for them). This default is new: earlier versions decoded every
file exactly, and --decode exact gives their rows. The --json summary says which decoder read how many
files, and lists the decoders' warnings per file (they are never printed). EXIF orientation is
applied. Decoding runs beside inference, straight into the model's input buffer, in threads
or (for large files) worker processes with shared-memory batches; a run that fits in one batch
uses no pool (--decode-pool).

\b
Exit status: {EXIT_OK} every file classified; {EXIT_SOME_FAILED} the run finished but some files failed
(their rows carry the error); {EXIT_USAGE} bad arguments or a missing/empty directory; 1 any
other error (unreadable model, unavailable provider, --strict-placement violated).
"""


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("images", type=click.Path(path_type=Path))
@click.option("--model", "-m", "model_path", required=True, type=click.Path(path_type=Path), help="ONNX model written by stn-export.")
@click.option("--output", "-o", default="-", show_default=True, help="Predictions file (.csv or .jsonl); '-' is stdout.")
@click.option("--format", "fmt", type=click.Choice(OUTPUT_FORMATS), default=None, help="Output format (default: from the --output extension; csv on stdout).")
@click.option("--batch-size", "-b", default=64, show_default=True, type=click.IntRange(min=1), help="Images per inference batch (the last one may be partial).")
@click.option("--top-k", "-k", default=5, show_default=True, type=click.IntRange(min=1), help="Top classes per image (capped at the number of classes).")
@click.option("--log-probs", is_flag=True, help="Also write every class's log-probability.")
@click.option("--provider", "-p", type=click.Choice(PROVIDERS), default="auto", show_default=True, help="Execution provider; auto = TensorRT, else CUDA, else CPU.")
@click.option("--device-id", default=0, show_default=True, type=click.IntRange(min=0), help="GPU ordinal for cuda/tensorrt.")
@click.option("--threads", "-t", default=None, type=click.IntRange(min=1), help="ONNX Runtime intra-op threads (default: onnxruntime's, one per core).")
@click.option("--streams", default=1, show_default=True, type=click.IntRange(min=1),
              help="CPU: run each batch on this many concurrent streams of threads/streams ONNX Runtime threads, "
                   f"which take chunks of {STREAM_CHUNK} images in turn (throughput; stn-bench --streams measures it).")
@click.option("--decode", "decode_mode", type=click.Choice(DECODE_MODES), default="auto", show_default=True,
              help="fast: JPEG decoded at reduced scale; exact: full decode, as training; auto: "
                   + ", ".join(f"{kind} {mode}" for kind, mode in AUTO_MODES.items()) + ".")
@click.option("--decode-workers", default=None, type=click.IntRange(min=1), help="Image decoding workers (default: one per core, at most 4).")
@click.option("--decode-pool", type=click.Choice(["auto", *POOLS]), default="auto", show_default=True,
              help="Decode in worker processes (shared-memory batches), threads, or inline in the inference thread; "
                   "auto: inline when the files fit in one batch, process when they average 256 KB or more "
                   "(large photos), else thread (was: always thread).")
@click.option("--ort-spin/--no-ort-spin", default=False, show_default=True, help="Let idle ONNX Runtime threads spin-wait (off: they sleep and leave the cores to decoding).")
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, type=click.IntRange(min=1), help="Refuse images with more pixels than this (decompression-bomb guard).")
@click.option("--trt-fp16", is_flag=True, help="TensorRT: allow fp16 kernels.")
@click.option("--trt-engine-cache", type=click.Path(path_type=Path), default=None, help="TensorRT: engine/timing cache directory.")
@click.option("--strict-placement", is_flag=True, help="Fail (instead of warn) when a GPU provider leaves compute nodes on the CPU.")
@click.option("--visualize", type=click.Path(file_okay=False, path_type=Path), default=None, help="Write input|warped image pairs here (model needs the 'warped' output: stn-export --with-warped).")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary (counts, throughput, providers, placement) as JSON on stdout.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@report_errors
def main(
    images: Path,
    model_path: Path,
    output: str,
    fmt: str | None,
    batch_size: int,
    top_k: int,
    log_probs: bool,
    provider: str,
    device_id: int,
    threads: int | None,
    streams: int,
    decode_mode: str,
    decode_workers: int | None,
    decode_pool: str,
    ort_spin: bool,
    max_pixels: int,
    trt_fp16: bool,
    trt_engine_cache: Path | None,
    strict_placement: bool,
    visualize: Path | None,
    as_json: bool,
    progress: bool,
) -> None:
    if as_json and output == "-":
        raise InferUsageError("--json prints the summary on stdout: give the rows a file with --output")
    if threads is not None and streams > threads:
        raise InferUsageError(f"--streams {streams} needs --threads >= {streams} (each stream runs at least one thread)")
    fmt = output_format(output, fmt)
    started = time.perf_counter()
    # issue 13: the walk streams; its first batch is read now, so a missing or empty directory
    # still exits 2 before the model is loaded, and a run that fits in one batch is known as such.
    listing = walk_images(images)
    first = listing.peek(batch_size + 1)  # one more: a run of exactly one batch is known as such
    decode_pool = choose_pool(decode_pool, len(first) if listing.finished else None, batch_size, mean_file_size(first))
    if decode_pool == "process":
        prestart_processes()  # the decode processes' fork server starts while the model loads
    # PIL's own decompression-bomb limit, as a second line behind the explicit size check.
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # we refuse explicitly

    session = Session(
        model_path,
        provider,
        device_id=device_id,
        threads=threads,
        streams=streams,
        trt_fp16=trt_fp16,
        trt_engine_cache=trt_engine_cache,
        trt_max_batch=batch_size,
        spin=ort_spin,
        warmup=1,
        warmup_batch=min(batch_size, len(first)),
    )
    session_s = time.perf_counter() - started
    placement = session.check_placement(strict_placement, warn=lambda m: click.echo(f"Warning: {m}", err=True))
    if visualize is not None:
        if not session.has_warped:
            raise InferUsageError(f"{model_path}: --visualize needs the '{md.WARPED}' output (export with stn-export --with-warped)")
        visualize.mkdir(parents=True, exist_ok=True)  # a bad path fails here, before any row is written

    with open_output(output) as stream:
        writer = RowWriter(stream, fmt, top_k=top_k, class_names=session.class_names, theta=session.has_theta, log_probs=log_probs)
        summary = run_inference(
            session,
            listing,
            writer,
            root=listing.root,
            batch_size=batch_size,
            top_k=top_k,
            decode_workers=decode_workers,
            decode_pool=decode_pool,
            max_pixels=max_pixels,
            visualize=visualize,
            progress=progress,
            want_log_probs=log_probs,
            decode=decode_mode,
        )
    summary.skipped_files = listing.skipped

    where = "stdout" if output == "-" else output
    line = (
        f"stn-infer: {summary.ok} ok, {summary.failed} failed of {summary.images} images "
        f"in {summary.seconds:.2f} s ({summary.images_per_s:.0f} img/s, {session.provider}) -> {where}"
    )
    if summary.warnings:
        line += f"; {len(summary.warnings)} decoder warning(s)" + (" (listed by --json)" if as_json else " (--json lists them)")
    click.echo(line, err=True)
    if as_json:
        click.echo(
            to_json(
                {
                    "images": summary.images,
                    "ok": summary.ok,
                    "failed": summary.failed,
                    "skipped_non_image_files": summary.skipped_files,
                    "seconds": round(summary.seconds, 4),
                    "images_per_s": round(summary.images_per_s, 1),
                    "output": str(output),
                    "format": fmt,
                    "batch_size": batch_size,
                    "decode_workers": decode_workers or default_decode_workers(),
                    "decode_pool": summary.pool,
                    "decode": {**DecodeSpec(session.preprocessing, mode=decode_mode).describe(), "files_by_decoder": summary.decoders},
                    "timings": {"start_to_session_ready_s": round(session_s, 4),
                                "start_to_first_rows_s": round(session_s + (summary.first_rows_s or 0.0), 4)},
                    "ort_spin": ort_spin,
                    "session": session.describe(),
                    "placement": {k: v for k, v in placement.to_dict().items() if k != "nodes"},
                    "errors": summary.errors,
                    "warnings": summary.warnings,
                }
            )
        )
    sys.exit(EXIT_SOME_FAILED if summary.failed else EXIT_OK)


if __name__ == "__main__":  # pragma: no cover
    main()
