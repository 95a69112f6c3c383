"""``stn-bench``: the same input batches through every available backend, side by side."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from stn_deploy import metadata as md
from stn_deploy.console import STREAMS, device_check_option, report_errors, to_json
from stn_deploy.errors import ModelFileError, StnDeployError
from stn_deploy.fileio import input_file_problem
from stn_deploy.runtime import Session

from .measure import DEFAULT_REWARM_MS, DEFAULT_SETTLE_MS, Backend, make_inputs, run_benchmark
from .report import BenchOptionError, format_table, machine_info, plot, require_pyplot
from .runners import EAGER, plan_runners

DEFAULT_BATCH_SIZES = (1, 8, 64, 256)
EXIT_SOME_FAILED = 3  # the run finished, but at least one backend failed (its row says why)


class BenchError(StnDeployError):
    """A run that cannot go on: an unusable --checkpoint, no backend that could run (exit 1)."""


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers, got {text!r}", param_hint="--batch-sizes"
        ) from None
    if not sizes or any(s < 1 for s in sizes):
        raise click.BadParameter(f"batch sizes must be positive, got {text!r}", param_hint="--batch-sizes")
    return list(dict.fromkeys(sizes))  # a repeated size would pool two passes into one row


def plan_backends(
    model: Path,
    checkpoint: Path | None,
    int8_model: Path | None,
    fp16_model: Path | None,
    threads: int,
    only: set[str] | None = None,
    *,
    openvino_int8_model: Path | None = None,
    max_batch: int = max(DEFAULT_BATCH_SIZES),
    streams: int | str = "auto",
    device_check: bool = True,
) -> list[Backend]:
    """The runners to try, filtered by ``--backends`` (PyTorch eager on the CPU always stays: it is
    the baseline of every ratio). Two rows that would carry one name (say an int8 file given as
    --model and as --int8-model) keep the first; the second is skipped with the reason."""
    runners = plan_runners(
        model,
        checkpoint,
        int8_model,
        fp16_model,
        threads,
        openvino_int8_model=openvino_int8_model,
        max_batch=max_batch,
        streams=streams,
        device_check=device_check,
    )
    backends: list[Backend] = []
    seen: set[str] = set()
    for runner in runners:
        if only is not None and runner.name not in only and runner.name != EAGER:
            continue
        backend = Backend(runner)
        if runner.name in seen:
            backend.status, backend.reason = "skipped", f"a row named {runner.name} is already in the table"
        seen.add(runner.name)
        backends.append(backend)
    return backends


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--model", "model", type=click.Path(path_type=Path), required=True, help="fp32 ONNX file from stn-export."
)
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    default=None,
    help="The checkpoint it came from (PyTorch eager rows).",
)
@click.option(
    "--int8-model",
    type=click.Path(path_type=Path),
    default=None,
    help="int8 ONNX file (stn-export --quantize int8): ORT and OpenVINO int8 rows. Default: MODEL.int8.onnx "
    "when it exists.",
)
@click.option(
    "--openvino-int8-model",
    type=click.Path(path_type=Path),
    default=None,
    help="int8 ONNX file for the OpenVINO int8 row (default: --int8-model); stn-export --int8-config plain "
    "writes the layout OpenVINO runs fastest.",
)
@click.option(
    "--fp16-model",
    type=click.Path(path_type=Path),
    default=None,
    help="fp16 ONNX file (stn-export --precision fp16): ORT CUDA fp16 row. Default: MODEL.fp16.onnx when it exists.",
)
@click.option(
    "--batch-sizes",
    default=",".join(map(str, DEFAULT_BATCH_SIZES)),
    show_default=True,
    help="Comma-separated batch sizes.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Intra-op threads for every CPU backend.",
)
@click.option(
    "--streams",
    type=STREAMS,
    default="auto",
    show_default=True,
    help="auto: ONNX Runtime CPU rows choose streams per batch size as stn-infer does (one stream per "
    "thread from batch 32 on; the results' 'streams' field says what ran). A number N > 1: every ONNX "
    "Runtime CPU and OpenVINO row also runs with the batch cut into N concurrent streams of "
    "threads/N threads (rows named <backend>-<N>streams); 1: one stream only.",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Untimed calls per backend and batch size.",
)
@click.option(
    "--iterations",
    type=click.IntRange(min=1),
    default=30,
    show_default=True,
    help="Timed calls per backend and batch size.",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Interleaved rounds the iterations are split over.",
)
@click.option(
    "--settle-ms",
    type=click.FloatRange(min=0),
    default=DEFAULT_SETTLE_MS,
    show_default=True,
    help="Pause before each backend's turn in a round, so the previous runtime's spinning threads go idle.",
)
@click.option(
    "--rewarm-ms",
    type=click.FloatRange(min=0),
    default=DEFAULT_REWARM_MS,
    show_default=True,
    help="Untimed calls after that pause, before the timed ones, so waking threads and cores are not timed.",
)
@click.option(
    "--inputs",
    default="auto",
    show_default=True,
    help="auto (the model's built-in dataset's test split when it is on this machine, else random), random, "
    "an image directory, or a dataset name. Only this flag chooses paths: a model's metadata never does.",
)
@click.option(
    "--backends",
    "only",
    default=None,
    help="Comma-separated backend names to run (default: all; PyTorch eager CPU always runs when it can).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout instead of the table.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write throughput vs batch size to this PNG (needs matplotlib).",
)
@device_check_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@report_errors
def main(
    model: Path,
    checkpoint: Path | None,
    int8_model: Path | None,
    openvino_int8_model: Path | None,
    fp16_model: Path | None,
    batch_sizes: str,
    threads: int,
    streams: int | str,
    warmup: int,
    iterations: int,
    rounds: int,
    settle_ms: float,
    rewarm_ms: float,
    inputs: str,
    only: str | None,
    as_json: bool,
    plot_path: Path | None,
    device_check: bool,
    quiet: bool,
) -> None:
    """Benchmark MODEL on every available backend with the same input batches: PyTorch eager
    (with --checkpoint), ONNX Runtime per provider and precision, OpenVINO when installed.
    Reports p50/p90/p99 latency, throughput and the ratio to PyTorch eager per batch size;
    backends that cannot run here are listed as skipped with the reason. A row's precision
    (fp32, fp16, int8) is read from its file's graph.

    Exit status: 0 every backend ran or was skipped; 3 the run finished but a backend failed
    (its row says why); 2 bad arguments; 1 any other error (a missing or unusable --model or
    --checkpoint, no backend could run).

    \b
    Examples:
      stn-bench --model stn.onnx --checkpoint stn.pt
      stn-bench --model stn.onnx --checkpoint stn.pt --int8-model stn.int8.onnx --plot bench.png
      stn-bench --model stn.onnx --batch-sizes 1,256 --json > bench.json
      stn-bench --model stn.onnx --int8-model stn.int8.onnx --streams 2   # + throughput rows
    """
    sizes = _batch_sizes(batch_sizes)
    wanted = {n.strip() for n in only.split(",") if n.strip()} if only else None
    # The variants stn-export writes beside the fp32 file, unless other files are named (and
    # only when a row that reads them is selected).
    int8_model = int8_model or _beside(model, "int8", wanted)
    fp16_model = fp16_model or _beside(model, "fp16", wanted)
    for path, flag in (
        (model, "--model"),
        (checkpoint, "--checkpoint"),
        (int8_model, "--int8-model"),
        (openvino_int8_model, "--openvino-int8-model"),
        (fp16_model, "--fp16-model"),
    ):
        if path is not None and (problem := input_file_problem(path)):
            raise ModelFileError(f"{path}: {problem} ({flag})")
    rounds = min(rounds, iterations)
    if streams != "auto" and streams > threads:
        raise BenchOptionError(f"{streams} streams need at least {streams} threads (--threads {threads})")
    if plot_path is not None:
        require_pyplot()  # fail before the run, not after it
    backends = plan_backends(
        model,
        checkpoint,
        int8_model,
        fp16_model,
        threads,
        wanted,
        openvino_int8_model=openvino_int8_model,
        max_batch=max(sizes),
        streams=streams,
        device_check=device_check,
    )
    if wanted:
        known = {
            b.runner.name for b in plan_backends(model, checkpoint, int8_model, fp16_model, threads, streams=streams)
        }
        unknown = wanted - known
        if unknown:
            raise BenchOptionError(
                f"unknown backend(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})"
            )

    with Session(model, provider="cpu", threads=1, warmup=0, record_placement=False, device_check=False) as session:
        if checkpoint is not None:
            _check_checkpoint_fits(checkpoint, model, session)
        x, input_source = make_inputs(session, max(sizes), inputs)
    results, agreement = run_benchmark(
        backends,
        x,
        sizes,
        warmup=warmup,
        iterations=iterations,
        rounds=rounds,
        settle_ms=settle_ms,
        rewarm_ms=rewarm_ms,
        progress=not quiet,
    )
    report = {
        "model": str(model),
        "threads": threads,
        "streams": streams,
        "batch_sizes": sizes,
        "warmup": warmup,
        "iterations": iterations,
        "rounds": rounds,
        "settle_ms": settle_ms,
        "rewarm_ms": rewarm_ms,
        "inputs": input_source,
        "machine": machine_info(threads),
        "backends": [b.to_dict() for b in backends],
        "results": results,
        "agreement": agreement,
    }
    click.echo(to_json(report) if as_json else format_table(report))
    if not any(b.status == "ok" for b in backends):
        raise BenchError("no backend could run")
    if plot_path is not None:
        plot(report, plot_path)
    if any(b.status == "failed" for b in backends):
        sys.exit(EXIT_SOME_FAILED)


def _beside(model: Path, precision: str, wanted: set[str] | None) -> Path | None:
    path = md.variant_path(model, precision)
    if not path.is_file():
        return None
    if wanted is not None and not any(f"-{precision}" in name for name in wanted):
        return None  # --backends left out every row that would read it
    click.echo(f"stn-bench: {precision} rows read {path} (found beside --model)", err=True)
    return path


def _check_checkpoint_fits(checkpoint: Path, model: Path, session: Session) -> None:
    """The PyTorch eager rows are the baseline: a checkpoint that cannot load, or that takes other
    inputs or gives other classes than ``model``, is an error before the run, not a failed row after it."""
    try:
        from stn_deploy.train.checkpoint import load_checkpoint  # torch: the eager rows need the training stack
    except ImportError as exc:
        raise BenchError(f"{checkpoint}: --checkpoint needs torch to load ({exc})") from None
    ckpt = load_checkpoint(checkpoint)
    if tuple(ckpt.preprocessing.input_shape) != tuple(session.preprocessing.input_shape):
        raise BenchError(
            f"{checkpoint}: takes {list(ckpt.preprocessing.input_shape)} inputs, {model} takes "
            f"{list(session.preprocessing.input_shape)}; pass the checkpoint the model was exported from"
        )
    if len(ckpt.class_names) != len(session.class_names):
        raise BenchError(
            f"{checkpoint}: has {len(ckpt.class_names)} classes, {model} has {len(session.class_names)}; "
            "pass the checkpoint the model was exported from"
        )


if __name__ == "__main__":  # pragma: no cover
    main()
