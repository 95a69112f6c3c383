"""``stn-infer``: classify every image under a directory with an exported ONNX model (no torch)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click
from PIL import Image

from stn_deploy import metadata as md
from stn_deploy.console import STREAMS, report_errors, to_json
from stn_deploy.errors import StnDeployError
from stn_deploy.images import DEFAULT_MAX_PIXELS, find_images
from stn_deploy.runtime import PROVIDERS, STREAM_CHUNK, STREAMS_MIN_BATCH, ProviderConfig, Session

from .pipeline import default_decode_workers, run_inference
from .rows import OUTPUT_FORMATS, RowWriter, open_output, output_format

EXIT_OK = 0
EXIT_USAGE = 2  # bad arguments, missing or empty input directory
EXIT_SOME_FAILED = 3  # the run finished but at least one file could not be classified


class InferUsageError(StnDeployError):
    exit_code = EXIT_USAGE


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
A missing or non-finite number is an empty CSV cell and JSON null (never NaN). A CSV text cell
(path, label, error) that a spreadsheet would run as a formula (starting with = + - @, a tab or
a carriage return) or that starts with an apostrophe gets a leading apostrophe; numbers never do.

\b
Bad files (corrupt, truncated, empty, not an image, over --max-pixels) get a row with the error
and the run goes on. A summary line (ok/failed counts, images/s) goes to stderr; --json also
prints the summary as JSON on stdout (then --output must be a file).

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
@click.option("--streams", default="auto", show_default=True, type=STREAMS,
              help="CPU: run each batch on this many concurrent streams of threads/streams ONNX Runtime threads, "
                   f"which take chunks of {STREAM_CHUNK} images in turn. auto: one stream per thread for batches of "
                   f"{STREAMS_MIN_BATCH} or more on the CPU provider with 2+ threads (faster there), else one stream; "
                   "one stream on a GPU. The summary line says which was used.")
@click.option("--decode-workers", default=None, type=click.IntRange(min=1), help="Image decoding workers (default: one per core, at most 4).")
@click.option("--decode-pool", type=click.Choice(["thread", "process"]), default="thread", show_default=True, help="Decode in threads (PIL releases the GIL) or processes.")
@click.option("--ort-spin/--no-ort-spin", default=False, show_default=True, help="Let idle ONNX Runtime threads spin-wait (off: they sleep and leave the cores to decoding).")
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, type=click.IntRange(min=1), help="Refuse images with more pixels than this (decompression-bomb guard).")
@click.option("--trt-fp16", is_flag=True, help="TensorRT: allow fp16 kernels.")
@click.option("--trt-engine-cache", type=click.Path(path_type=Path), default=None, help="TensorRT: engine/timing cache directory.")
@click.option("--device-check/--no-device-check", default=True, show_default=True,
              help="On a GPU provider, run the warm-up batch on the CPU provider too and stop if the log-probabilities "
                   "disagree (fp32: max |Δ| 1e-3 and identical top-1).")
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
    streams: int | str,
    decode_workers: int | None,
    decode_pool: str,
    ort_spin: bool,
    max_pixels: int,
    trt_fp16: bool,
    trt_engine_cache: Path | None,
    device_check: bool,
    strict_placement: bool,
    visualize: Path | None,
    as_json: bool,
    progress: bool,
) -> None:
    if as_json and output == "-":
        raise InferUsageError("--json prints the summary on stdout: give the rows a file with --output")
    if threads is not None and streams != "auto" and streams > threads:
        raise InferUsageError(f"--streams {streams} needs --threads >= {streams} (each stream runs at least one thread)")
    fmt = output_format(output, fmt)
    listing = find_images(images)  # missing/empty directory: exit 2 before loading the model
    # PIL's own decompression-bomb limit, as a second line behind the explicit size check.
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # we refuse explicitly

    session = Session(
        model_path,
        provider,
        provider_config=ProviderConfig(
            device_id=device_id, trt_fp16=trt_fp16, trt_engine_cache=trt_engine_cache, trt_max_batch=batch_size
        ),
        threads=threads,
        streams=streams,
        spin=ort_spin,
        warmup=1,
        warmup_batch=min(batch_size, len(listing.files)),
        device_check=device_check,
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
    used_streams = session.streams_for(batch_size)  # what "auto" chose for this batch size
    line = (
        f"stn-infer: {summary.ok} ok, {summary.failed} failed of {summary.images} images "
        f"in {summary.seconds:.2f} s ({summary.images_per_s:.0f} img/s, {session.provider}, "
        f"{used_streams} stream{'s' if used_streams > 1 else ''}) -> {where}"
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
                    "streams": used_streams,
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
