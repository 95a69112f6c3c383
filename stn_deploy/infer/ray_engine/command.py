"""``stn-infer ... --engine ray``: the options the command accepts, the run, the summary line and --json."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import click

from stn_deploy.console import to_json
from stn_deploy.infer.exits import EXIT_OK, EXIT_SOME_FAILED, InferUsageError
from stn_deploy.infer.rows import rate_text

from .job import RayOptions, infer_on_ray

# -- the command ---------------------------------------------------------------------------------
# stn-infer options that only the local engine has: given with --engine ray, they are a usage error
# rather than silently ignored (Ray schedules decoding itself and assigns each actor its GPU).
LOCAL_ONLY = (
    "streams",
    "decode_workers",
    "decode_pool",
    "visualize",
    "strict_placement",
    "device_id",
    "trt_fp16",
    "trt_engine_cache",
    "cuda_tf32",
    "device_check",
)


def main_ray(ctx: click.Context) -> int:
    """``stn-infer ... --engine ray``, from the stn-infer command's parsed options; returns the exit status."""
    from click.core import ParameterSource

    p = ctx.params
    given = [name for name in LOCAL_ONLY if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise InferUsageError(f"{flags}: not available with --engine ray (the local engine's options)")
    options = RayOptions(
        address=p["ray_address"],
        actors=p["actors"],
        threads=p["threads"] or 1,
        provider=p["provider"],
        spin=p["ort_spin"],
        batch_size=64 if p["batch_size"] == "auto" else p["batch_size"],  # Ray's blocks: the engine's own default
        top_k=p["top_k"],
        log_probs=p["log_probs"],
        max_pixels=p["max_pixels"],
        decode=p["decode_mode"],
        progress=p["progress"],
    )
    return run_command(p["images"], p["model_path"], p["output"], p["fmt"], options, as_json=p["as_json"])


def run_command(
    source: str, model_path: Path, output: str, fmt: str | None, options: RayOptions, *, as_json: bool
) -> int:
    """``stn-infer --engine ray``: run, print the summary line (and ``--json``), return the exit status."""
    with _ray_prints_to_stderr() as stdout:
        return _run_command(source, model_path, output, fmt, options, as_json=as_json, stdout=stdout)


@contextlib.contextmanager
def _ray_prints_to_stderr() -> Iterator[IO[str]]:
    """Ray's driver prints cluster messages (a task retried after its actor died, ...) on sys.stdout,
    where rows (``-o -``) and ``--json`` go: point sys.stdout at stderr while the job runs, and yield
    the real stdout for the rows and the summary."""
    real = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield real
    finally:
        real.flush()
        sys.stdout = real


def _run_command(
    source: str, model_path: Path, output: str, fmt: str | None, options: RayOptions, *, as_json: bool, stdout: IO[str]
) -> int:
    summary = infer_on_ray(source, model_path, output, fmt, options, stdout=stdout)
    where = "stdout" if output == "-" else output
    line = (
        f"stn-infer: {summary.ok} ok, {summary.failed} failed of {summary.images} images "
        f"in {summary.seconds:.2f} s ({rate_text(summary.images_per_s)} img/s, {summary.provider}) -> {where}"
    )
    click.echo(line, err=True)
    if as_json:
        click.echo(
            to_json(
                {
                    "engine": "ray",
                    "images": summary.images,
                    "ok": summary.ok,
                    "failed": summary.failed,
                    "skipped_non_image_files": summary.skipped_files,
                    "seconds": round(summary.seconds, 4),
                    "images_per_s": round(summary.images_per_s, 1),
                    "ray_init_seconds": round(summary.init_seconds, 4),
                    "output": str(output),
                    "format": summary.format,
                    "batch_size": options.batch_size,
                    "provider": summary.provider,
                    "ray": {
                        "address": options.address or "local",
                        "nodes": summary.nodes,
                        "cluster_cpus": summary.cluster_cpus,
                        "actors": summary.actors,
                        "threads_per_actor": summary.threads,
                        "rows_per_node": summary.rows_per_node,
                    },
                    "errors": summary.errors,
                }
            ),
            file=stdout,
        )
    return EXIT_SOME_FAILED if summary.failed else EXIT_OK
