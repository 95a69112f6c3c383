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
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import click
import numpy as np
from PIL import Image
from tqdm import tqdm

from . import metadata as md
from .cli import report_errors, to_json
from .errors import StnDeployError
from .fileio import atomic_path
from .images import DEFAULT_MAX_PIXELS, DecodedBatch, decode_batch, find_images
from .preprocessing import Preprocessing
from .runtime import PROVIDERS, STREAM_CHUNK, Session

EXIT_OK = 0
EXIT_USAGE = 2  # bad arguments, missing or empty input directory
EXIT_SOME_FAILED = 3  # the run finished but at least one file could not be classified
OUTPUT_FORMATS = ("csv", "jsonl")


class InferUsageError(StnDeployError):
    exit_code = EXIT_USAGE


# -- the pipeline --------------------------------------------------------------------------------
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
--engine ray runs the same pipeline on Ray Data (pip install 'stn-deploy[ray]'): a local Ray
instance sized to this machine, or the cluster at --ray-address; IMAGES may then also be a URI
(s3://bucket/prefix, gs://..., file:///...), and --output a directory (or one ending in /) gets
Parquet files with the same columns (.parquet: one file). See docs/ray.md.

\b
Exit status: {EXIT_OK} every file classified; {EXIT_SOME_FAILED} the run finished but some files failed
(their rows carry the error); {EXIT_USAGE} bad arguments or a missing/empty directory; 1 any
other error (unreadable model, unavailable provider, --strict-placement violated).
"""


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("images", type=click.Path(path_type=str))
@click.option("--model", "-m", "model_path", required=True, type=click.Path(path_type=Path), help="ONNX model written by stn-export.")
@click.option("--output", "-o", default="-", show_default=True, help="Predictions file (.csv or .jsonl; --engine ray also .parquet or a directory/); '-' is stdout.")
@click.option("--format", "fmt", type=click.Choice(OUTPUT_FORMATS), default=None, help="Output format (default: from the --output extension; csv on stdout).")
@click.option("--batch-size", "-b", default=64, show_default=True, type=click.IntRange(min=1), help="Images per inference batch (the last one may be partial).")
@click.option("--top-k", "-k", default=5, show_default=True, type=click.IntRange(min=1), help="Top classes per image (capped at the number of classes).")
@click.option("--log-probs", is_flag=True, help="Also write every class's log-probability.")
@click.option("--provider", "-p", type=click.Choice(PROVIDERS), default="auto", show_default=True, help="Execution provider; auto = TensorRT, else CUDA, else CPU.")
@click.option("--device-id", default=0, show_default=True, type=click.IntRange(min=0), help="GPU ordinal for cuda/tensorrt.")
@click.option("--threads", "-t", default=None, type=click.IntRange(min=1), help="ONNX Runtime intra-op threads (default: onnxruntime's, one per core; --engine ray: per actor, default 1).")
@click.option("--streams", default=1, show_default=True, type=click.IntRange(min=1),
              help="CPU: run each batch on this many concurrent streams of threads/streams ONNX Runtime threads, "
                   f"which take chunks of {STREAM_CHUNK} images in turn (throughput; stn-bench --streams measures it).")
@click.option("--decode-workers", default=None, type=click.IntRange(min=1), help="Image decoding workers (default: one per core, at most 4).")
@click.option("--decode-pool", type=click.Choice(["thread", "process"]), default="thread", show_default=True, help="Decode in threads (PIL releases the GIL) or processes.")
@click.option("--ort-spin/--no-ort-spin", default=False, show_default=True, help="Let idle ONNX Runtime threads spin-wait (off: they sleep and leave the cores to decoding).")
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, type=click.IntRange(min=1), help="Refuse images with more pixels than this (decompression-bomb guard).")
@click.option("--trt-fp16", is_flag=True, help="TensorRT: allow fp16 kernels.")
@click.option("--trt-engine-cache", type=click.Path(path_type=Path), default=None, help="TensorRT: engine/timing cache directory.")
@click.option("--strict-placement", is_flag=True, help="Fail (instead of warn) when a GPU provider leaves compute nodes on the CPU.")
@click.option("--visualize", type=click.Path(file_okay=False, path_type=Path), default=None, help="Write input|warped image pairs here (model needs the 'warped' output: stn-export --with-warped).")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary (counts, throughput, providers, placement) as JSON on stdout.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
# -- --engine ray options (stn_deploy/infer_ray.py) --
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process; ray: Ray Data, on a local Ray instance or the cluster at --ray-address.")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="--engine ray: join this cluster (auto, or the head's HOST:PORT) instead of starting a local instance.")
@click.option("--actors", default=None, type=click.IntRange(min=1),
              help="--engine ray: inference actors, each with --threads ONNX Runtime threads (default: as many as the cluster's CPUs hold; one per GPU).")
# -- end --engine ray options --
@report_errors
def main(
    images: str,
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
    engine: str,
    ray_address: str | None,
    actors: int | None,
) -> None:
    if as_json and output == "-":
        raise InferUsageError("--json prints the summary on stdout: give the rows a file with --output")
    # -- --engine ray: its own module; nothing below (the local engine) changes --
    if engine == "ray":
        from .infer_ray import main_ray  # here, not above: it imports this module (rows, writer); ray loads in the job

        sys.exit(main_ray(click.get_current_context()))
    if ray_address is not None or actors is not None:
        raise InferUsageError("--ray-address and --actors apply to --engine ray")
    # -- end --engine ray --
    if threads is not None and streams > threads:
        raise InferUsageError(f"--streams {streams} needs --threads >= {streams} (each stream runs at least one thread)")
    fmt = output_format(output, fmt)
    listing = find_images(images)  # missing/empty directory: exit 2 before loading the model
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
        warmup_batch=min(batch_size, len(listing.files)),
    )
    placement = session.check_placement(strict_placement, warn=lambda m: click.echo(f"Warning: {m}", err=True))
    if visualize is not None:
        if not session.has_warped:
            raise InferUsageError(f"{model_path}: --visualize needs the '{md.WARPED}' output (export with stn-export --with-warped)")
        visualize.mkdir(parents=True, exist_ok=True)  # a bad path fails here, before any row is written

    with open_output(output) as stream:
        writer = RowWriter(stream, fmt, top_k=top_k, class_names=session.class_names, theta=session.has_theta, log_probs=log_probs)
        summary = run_inference(
            session,
            listing.files,
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
        )
    summary.skipped_files = listing.skipped

    where = "stdout" if output == "-" else output
    line = (
        f"stn-infer: {summary.ok} ok, {summary.failed} failed of {summary.images} images "
        f"in {summary.seconds:.2f} s ({summary.images_per_s:.0f} img/s, {session.provider}) -> {where}"
    )
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
                    "decode_pool": decode_pool,
                    "ort_spin": ort_spin,
                    "session": session.describe(),
                    "placement": {k: v for k, v in placement.to_dict().items() if k != "nodes"},
                    "errors": summary.errors,
                }
            )
        )
    sys.exit(EXIT_SOME_FAILED if summary.failed else EXIT_OK)


if __name__ == "__main__":  # pragma: no cover
    main()
