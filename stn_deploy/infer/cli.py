"""``stn-infer``: classify every image under a directory with an exported ONNX model (no torch)."""

from __future__ import annotations

import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from PIL import Image

from stn_deploy import metadata as md
from stn_deploy.console import BATCH, STREAMS, provider_options, report_errors, to_json
from stn_deploy.decode_pool import POOLS, prestart_processes
from stn_deploy.decoders import AUTO_MODES, DECODE_MODES, DecodeSpec
from stn_deploy.image_walk import walk_images
from stn_deploy.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS
from stn_deploy.runtime import (
    PROVIDERS,
    STREAM_CHUNK,
    STREAMS_MIN_BATCH,
    ProviderConfig,
    Session,
    try_read_graph_info,
)

from .exits import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, InferUsageError
from .pipeline import (
    AUTO_BATCH_BYTES,
    AUTO_BATCH_MAX,
    auto_batch_size,
    choose_pool,
    default_decode_workers,
    mean_file_size,
    run_inference,
)
from .rows import OUTPUT_FORMATS, RowWriter, open_output, output_format, rate_text

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
and the run goes on; so do the files of a batch ONNX Runtime cannot run, and a --visualize
picture that cannot be written. Symbolic links to directories are not followed (the summary
counts them). --output may not be the model or an image the run reads. A summary line
(ok/failed counts, images/s) goes to stderr; --json also prints the summary as JSON on stdout
(then --output must be a file).

\b
Decoding (--decode): 'exact' decodes every file at full size, as training does. 'fast' decodes a
JPEG at 1/2, 1/4 or 1/8 scale inside the JPEG decoder (no smaller than 5x the model's size),
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
@click.option(
    "--model",
    "-m",
    "model_path",
    required=True,
    type=click.Path(path_type=Path),
    help="ONNX model written by stn-export.",
)
@click.option(
    "--output",
    "-o",
    default="-",
    show_default=True,
    help="Predictions file (.csv or .jsonl; --engine ray also .parquet or a directory/); '-' is stdout.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(OUTPUT_FORMATS),
    default=None,
    help="Output format (default: from the --output extension; csv on stdout).",
)
@click.option(
    "--batch-size",
    "-b",
    default="auto",
    show_default=True,
    type=BATCH,
    help=f"Images per inference batch (the last one may be partial). auto: as many as fit in "
    f"{AUTO_BATCH_BYTES // 2**20} MiB of model input, at most {AUTO_BATCH_MAX} (256 for 32x32 RGB; was 64).",
)
@click.option(
    "--top-k",
    "-k",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Top classes per image (capped at the number of classes).",
)
@click.option("--log-probs", is_flag=True, help="Also write every class's log-probability.")
@provider_options(PROVIDERS)
@click.option(
    "--threads",
    "-t",
    default=None,
    type=click.IntRange(min=1),
    help="ONNX Runtime intra-op threads (default: onnxruntime's, one per core; --engine ray: per actor, default 1).",
)
@click.option(
    "--streams",
    default="auto",
    show_default=True,
    type=STREAMS,
    help="CPU: run each batch on this many concurrent streams of threads/streams ONNX Runtime threads, "
    f"which take chunks of {STREAM_CHUNK} images in turn. auto: one stream per thread for batches of "
    f"{STREAMS_MIN_BATCH} or more on the CPU provider with 2+ threads (faster there), else one stream; "
    "one stream on a GPU. The summary line says which was used.",
)
@click.option(
    "--decode",
    "decode_mode",
    type=click.Choice(DECODE_MODES),
    default="auto",
    show_default=True,
    help="fast: JPEG decoded at reduced scale; exact: full decode, as training; auto: "
    + ", ".join(f"{kind} {mode}" for kind, mode in AUTO_MODES.items())
    + ".",
)
@click.option(
    "--decode-workers",
    default=None,
    type=click.IntRange(min=1),
    help="Image decoding workers (default: one per core, at most 4).",
)
@click.option(
    "--decode-pool",
    type=click.Choice(["auto", *POOLS]),
    default="auto",
    show_default=True,
    help="Decode in worker processes (shared-memory batches), threads, or inline in the inference thread; "
    "auto: inline when the files fit in one batch, process when they average 256 KB or more "
    "(large photos), else thread (was: always thread).",
)
@click.option(
    "--ort-spin/--no-ort-spin",
    default=False,
    show_default=True,
    help="Let idle ONNX Runtime threads spin-wait (off: they sleep and leave the cores to decoding).",
)
@click.option(
    "--max-pixels",
    default=DEFAULT_MAX_PIXELS,
    show_default=True,
    type=click.IntRange(min=1),
    help="Refuse images with more pixels than this (decompression-bomb guard).",
)
@click.option(
    "--visualize",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write input|warped image pairs here (model needs the 'warped' output: stn-export --with-warped).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the run summary (counts, throughput, providers, placement) as JSON on stdout.",
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
# -- --engine ray (stn_deploy/infer/ray_engine/) --
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: this process; ray: Ray Data, on a local Ray instance or the cluster at --ray-address.",
)
@click.option(
    "--ray-address",
    default=None,
    metavar="ADDRESS",
    help="--engine ray: join this cluster (auto, or the head's HOST:PORT) instead of starting a local instance.",
)
@click.option(
    "--actors",
    default=None,
    type=click.IntRange(min=1),
    help="--engine ray: inference actors, each with --threads ONNX Runtime threads (default: as many as "
    "the cluster's CPUs hold; one per GPU).",
)
@report_errors
def main(
    images: str,
    model_path: Path,
    output: str,
    fmt: str | None,
    batch_size: int | str,
    top_k: int,
    log_probs: bool,
    provider: str,
    device_id: int,
    threads: int | None,
    streams: int | str,
    decode_mode: str,
    decode_workers: int | None,
    decode_pool: str,
    ort_spin: bool,
    max_pixels: int,
    trt_fp16: bool,
    cuda_tf32: bool,
    trt_engine_cache: Path | None,
    device_check: bool,
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
    if engine == "ray":
        from .ray_engine import main_ray  # the optional [ray] extra: imported only when the engine is chosen

        sys.exit(main_ray(click.get_current_context()))
    if ray_address is not None or actors is not None:
        raise InferUsageError("--ray-address and --actors apply to --engine ray")
    images_path = Path(images)
    graph = try_read_graph_info(model_path)  # once: for --batch-size auto, then handed to the Session
    if batch_size == "auto":
        batch_size = auto_batch_size(graph)
    if threads is not None and streams != "auto" and streams > threads:
        raise InferUsageError(
            f"--streams {streams} needs --threads >= {streams} (each stream runs at least one thread)"
        )
    fmt = output_format(output, fmt)
    started = time.perf_counter()
    # The walk streams; its first batch is read now, so a missing or empty directory still exits
    # 2 before the model is loaded, and a run that fits in one batch is known as such.
    listing = walk_images(images_path)
    first = listing.peek(batch_size + 1)  # one more: a run of exactly one batch is known as such
    _check_output_is_no_input(output, model_path, images_path)
    decode_pool = choose_pool(decode_pool, len(first) if listing.finished else None, batch_size, mean_file_size(first))
    if decode_pool == "process":
        prestart_processes()  # the decode processes' fork server starts while the model loads
    # PIL's own decompression-bomb limit, as a second line behind the explicit size check.
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # we refuse explicitly

    session = Session(
        model_path,
        provider,
        provider_config=ProviderConfig(
            device_id=device_id,
            trt_fp16=trt_fp16,
            trt_engine_cache=trt_engine_cache,
            trt_max_batch=batch_size,
            cuda_tf32=cuda_tf32,
        ),
        threads=threads,
        streams=streams,
        spin=ort_spin,
        warmup=1,
        warmup_batch=min(batch_size, len(first)),
        device_check=device_check,
        graph=graph,
    )
    session_s = time.perf_counter() - started
    placement = session.check_placement(strict_placement, warn=lambda m: click.echo(f"Warning: {m}", err=True))
    if visualize is not None and not session.has_warped:
        raise InferUsageError(
            f"{model_path}: --visualize needs the '{md.WARPED}' output (export with stn-export --with-warped)"
        )

    targets = [p for p in (visualize, None if output == "-" else Path(output).parent) if p is not None]
    with _remove_created_dirs_on_failure(targets):
        if visualize is not None:
            visualize.mkdir(parents=True, exist_ok=True)  # a bad path fails here, before any row is written
        with open_output(output) as stream:
            writer = RowWriter(
                stream, fmt, top_k=top_k, class_names=session.class_names, theta=session.has_theta, log_probs=log_probs
            )
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
    # What "auto" chose for the largest batch this run had (a run of 3 images ran one batch of 3).
    used_streams = session.streams_for(min(batch_size, max(1, summary.images)))
    line = (
        f"stn-infer: {summary.ok} ok, {summary.failed} failed of {summary.images} images "
        f"in {summary.seconds:.2f} s ({rate_text(summary.images_per_s)} img/s, {session.provider}, "
        f"{used_streams} stream{'s' if used_streams > 1 else ''}) -> {where}"
    )
    if listing.skipped_dir_links:
        line += f"; {listing.skipped_dir_links} symbolic link(s) to directories not followed"
    if summary.warnings:
        line += f"; {len(summary.warnings)} decoder warning(s)" + (
            " (listed by --json)" if as_json else " (--json lists them)"
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
                    "skipped_directory_links": listing.skipped_dir_links,
                    "seconds": round(summary.seconds, 4),
                    "images_per_s": round(summary.images_per_s, 1),
                    "output": str(output),
                    "format": fmt,
                    "batch_size": batch_size,
                    "streams": used_streams,
                    "decode_workers": decode_workers or default_decode_workers(),
                    "decode_pool": summary.pool,
                    "decode": {
                        **DecodeSpec(session.preprocessing, mode=decode_mode).describe(),
                        "files_by_decoder": summary.decoders,
                    },
                    "timings": {
                        "start_to_session_ready_s": round(session_s, 4),
                        "start_to_first_rows_s": round(session_s + (summary.first_rows_s or 0.0), 4),
                    },
                    "ort_spin": ort_spin,
                    "session": session.describe(),
                    "placement": {k: v for k, v in placement.to_dict().items() if k != "nodes"},
                    "errors": summary.errors,
                    "warnings": summary.warnings,
                }
            )
        )
    sys.exit(EXIT_SOME_FAILED if summary.failed else EXIT_OK)


def _check_output_is_no_input(output: str, model: Path, images: Path) -> None:
    """Refuse an --output that would overwrite the model or one of the images the run reads."""
    if output == "-":
        return
    out = Path(output)
    try:
        target = out.resolve()
    except OSError:
        return  # atomic_path reports an unusable path itself
    if model.exists() and target == model.resolve():
        raise InferUsageError(f"{output}: is the --model file; the predictions need a file of their own")
    root = images.resolve()
    if target == root or (
        root.is_dir()
        and target.is_relative_to(root)
        and target.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in target.relative_to(root).parts)
    ):
        raise InferUsageError(f"{output}: is one of the input images; the predictions need a file of their own")


@contextmanager
def _remove_created_dirs_on_failure(paths: list[Path]) -> Iterator[None]:
    """Directories this run creates (the --output folder, --visualize) are removed again if the
    run fails, so a failed run leaves the tree as it found it."""
    created: list[Path] = []
    for path in paths:
        top = None
        for parent in [path, *path.parents]:
            if parent.exists():
                break
            top = parent
        if top is not None:
            created.append(top)
    try:
        yield
    except BaseException:
        for top in created:
            shutil.rmtree(top, ignore_errors=True)
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
