"""``stn-export``: a checkpoint (.pt) or torch.export archive (.pt2) → a verified ONNX file;
an fp32 ONNX file it wrote → its int8 / fp16 variant."""

from __future__ import annotations

import math
from pathlib import Path

import click
from click.core import ParameterSource

from stn_deploy import metadata as md
from stn_deploy.console import report_errors, to_json
from stn_deploy.errors import ExportCheckError
from stn_deploy.fileio import check_writable

from .next_steps import format_next_steps, next_steps
from .quantize import CONFIGS as INT8_CONFIGS
from .quantize import FAST_CPU
from .targets import TARGETS
from .triton_repo import write_triton_repo

_TARGET_HELP = "; ".join(f"{t.name}: {t.summary}" for t in TARGETS.values())
# Options that shape the export itself; an .onnx MODEL has been exported already.
_EXPORT_ONLY = (
    "target",
    "opset",
    "with_theta",
    "with_warped",
    "optimize",
    "parity_samples",
    "image_size",
    "mean",
    "std",
    "channels",
    "class_names",
    "trust_archive",
)


def default_output(model: Path, target: str) -> Path:
    """``stn.pt`` → ``stn.onnx`` for the default target, ``stn.<target>.onnx`` for the others."""
    return model.with_suffix(".onnx") if target == "ort" else model.with_name(f"{model.stem}.{target}.onnx")


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=flag) from None
    if not all(math.isfinite(v) for v in values):  # hardening (issue 12): nan/inf are not a mean or a std
        raise click.BadParameter(f"expected finite numbers, got {text!r}", param_hint=flag)
    return values


def _image_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().replace("x", ",").split(",")
    try:
        dims = tuple(int(p) for p in parts if p)
    except ValueError:
        raise click.BadParameter(f"expected H,W or one size, got {text!r}", param_hint="--image-size") from None
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2:
        raise click.BadParameter(f"expected H,W or one size, got {text!r}", param_hint="--image-size")
    return dims  # type: ignore[return-value]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="ONNX file to write. Default: MODEL with suffix .onnx for --target ort, MODEL.<target>.onnx otherwise "
    "(stn.pt -> stn.onnx, stn.cuda.onnx, stn.portable.onnx). For an .onnx MODEL: the variant's file "
    "(default MODEL.int8.onnx / MODEL.fp16.onnx).",
)
@click.option("--target", type=click.Choice(list(TARGETS)), default="ort", show_default=True, help=_TARGET_HELP)
@click.option(
    "--opset",
    type=int,
    default=None,
    help="ONNX opset (ort: 20-21, default 20; cuda: 16-19, default 18; portable: 16-17, default 17).",
)
@click.option("--with-theta", is_flag=True, help="Add the output 'theta' [N, 2, 3] (the affine transform).")
@click.option("--with-warped", is_flag=True, help="Add the output 'warped' [N, C, H, W] (the transformed image).")
@click.option(
    "--optimize/--no-optimize",
    default=True,
    show_default=True,
    help="Apply exact graph rewrites (ReLU before MaxPool, affine grid as one MatMul, unread conv rows cropped) "
    "and ONNX Runtime's offline BASIC optimization, then run every check again on the file that is written. "
    "A rewrite that does not fit the graph is skipped with the reason.",
)
@click.option(
    "--parity-samples",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Inputs compared against PyTorch (random, dataset samples, extreme theta).",
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where datasets live: the checkpoint's (dataset parity samples) and --calibration's (int8 calibration and "
    "test split).",
)
@click.option("--image-size", default=None, help=".pt2 only: input size H,W (default: the archive's input shape).")
@click.option(
    "--mean",
    default=None,
    help=".pt2 only: normalization mean, one value for every channel (0.1307) or one per channel "
    "(0.485,0.456,0.406); default 0.5.",
)
@click.option("--std", default=None, help=".pt2 only: normalization std, one value or one per channel (default 0.5).")
@click.option(
    "--channels",
    type=click.Choice(["RGB", "L"], case_sensitive=False),
    default=None,
    help=".pt2 only: channel order the model expects (default: RGB for 3 channels, L for 1).",
)
@click.option(
    "--class-names",
    default=None,
    help=".pt2 only: comma-separated class names, or a file (one per line, or a JSON list).",
)
@click.option(
    "--quantize",
    type=click.Choice(["int8"]),
    default=None,
    help="Also write OUTPUT.int8.onnx beside the fp32 file (for an .onnx MODEL: -o, default MODEL.int8.onnx): "
    "ONNX Runtime static int8 in the --int8-config configuration (benchmarks/INT8.md).",
)
@click.option(
    "--int8-config",
    type=click.Choice(list(INT8_CONFIGS)),
    default=FAST_CPU.name,
    show_default=True,
    help="int8 configuration: fast-cpu (fastest on ONNX Runtime's CPU EP), plain (no conv unfolding; for OpenVINO "
    "and other int8 runtimes), ort-default-qdq (quantize_static's defaults, for comparison).",
)
@click.option(
    "--calibration", default=None, help="int8 calibration samples: an image DIR or a dataset name (its train split)."
)
@click.option(
    "--max-accuracy-drop",
    type=float,
    default=0.5,
    show_default=True,
    help="Refuse the int8 model if it loses more top-1 points than this on the test split (negative: no limit).",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16"]),
    default="fp32",
    show_default=True,
    help="fp16: also write OUTPUT.fp16.onnx beside the fp32 file (for an .onnx MODEL: -o, default MODEL.fp16.onnx) "
    "for GPU targets (fp32 I/O; θ path and GridSample stay fp32).",
)
@click.option("--json", "as_json", is_flag=True, help="Write the export report as JSON to stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option(
    "--triton-repo",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="After the export, also write a Triton model repository entry for the fp32 file: "
    "DIR/<output stem>/config.pbtxt, DIR/<output stem>/1/model.onnx, labels.txt (docs/serve.md).",
)
# -- hardening (issue 12)
@click.option(
    "--trust-archive",
    is_flag=True,
    help=".pt2 only: skip the check that every expression, guard, name and operator in the archive is one "
    "torch writes for a plain model (torch runs them as code). Only for an archive you made or trust; "
    "pickled objects are refused either way.",
)
# -- end hardening
@report_errors
def main(
    model: Path,
    output: Path | None,
    target: str,
    opset: int | None,
    with_theta: bool,
    with_warped: bool,
    optimize: bool,
    parity_samples: int,
    data_dir: Path | None,
    image_size: str | None,
    mean: str | None,
    std: str | None,
    channels: str | None,
    class_names: str | None,
    quantize: str | None,
    int8_config: str,
    calibration: str | None,
    max_accuracy_drop: float,
    precision: str,
    as_json: bool,
    quiet: bool,
    triton_repo: Path | None,
    trust_archive: bool = False,
) -> None:
    """Export MODEL (a stn-deploy checkpoint .pt, or a torch.export archive .pt2 of your own
    STN-style model) to ONNX, and prove the file before it is written: onnx.checker (full),
    strict shape inference, the graph signature, ONNX Runtime at batch sizes 1/7/64, and parity
    with PyTorch (max |Δ log-prob| <= 1e-4, identical top-1) on random, dataset and extreme-θ
    inputs. Any failed check exits non-zero and leaves no file.

    Given an fp32 .onnx MODEL that stn-export wrote, --quantize int8 and --precision fp16 derive
    the variant from it (same gates) without exporting again.

    \b
    Examples:
      stn-export stn.pt                          # -> stn.onnx (GridSample-20, opset 20)
      stn-export stn.pt --target cuda            # -> stn.cuda.onnx (GridSample-16, opset 18)
      stn-export stn.pt --target portable --json # -> stn.portable.onnx, report as JSON
      stn-export my_stn.pt2 --mean 0.1307 --std 0.3081 --class-names digits.txt
      stn-export stn.onnx --quantize int8 --int8-config plain --calibration digits -o stn.plain.int8.onnx
    """
    from .exporter import export_model
    from .sources import parse_class_names

    if int8_config != FAST_CPU.name and quantize != "int8":
        raise click.BadParameter("applies to the int8 model only; add --quantize int8", param_hint="--int8-config")
    if quantize and not calibration:
        raise click.UsageError("--quantize int8 needs --calibration DIR|dataset (real samples to calibrate on)")
    if model.suffix.lower() == ".onnx":
        if triton_repo is not None:
            raise click.BadParameter(
                f"writes the file an export makes; for {model} run: python -m "
                f"stn_deploy.export.triton_repo {model} {triton_repo}",
                param_hint="--triton-repo",
            )
        _derive_from_onnx(
            model,
            output,
            quantize=quantize,
            precision=precision,
            calibration=calibration,
            int8_config=int8_config,
            max_accuracy_drop=max_accuracy_drop,
            data_dir=data_dir,
            as_json=as_json,
        )
        return
    pre_overrides = {
        k: v
        for k, v in {
            "image_size": _image_size(image_size),
            "mean": _floats(mean, "--mean"),
            "std": _floats(std, "--std"),
            "channel_order": channels.upper() if channels else None,
        }.items()
        if v is not None
    }
    output = output or default_output(model, target)
    if model.exists() and output.resolve() == model.resolve():
        raise click.BadParameter(
            f"{output} is MODEL itself; the ONNX file needs a file of its own", param_hint="-o/--output"
        )
    check_writable(output)  # a bad -o fails now, not after the export and its checks
    if not as_json:
        click.echo(f"Exporting {model} -> {output} (target {target})", err=True)

    # The fp32 export: written, checked and moved into place by export_model. Post-processing
    # steps (quantization, fp16) start from this verified file.
    try:
        report = export_model(
            model,
            output,
            target=target,
            opset=opset,
            with_theta=with_theta,
            with_warped=with_warped,
            optimize=optimize,
            parity_samples=parity_samples,
            preprocessing=pre_overrides or None,
            class_names=parse_class_names(class_names),
            data_dir=data_dir,
            progress=not quiet,
            trust_archive=trust_archive,
        )
    except ExportCheckError as exc:
        if as_json and getattr(exc, "report", None) is not None:
            click.echo(to_json(exc.report.to_dict()))  # the failed report on stdout, the one-line error on stderr
        raise

    if not as_json:
        click.echo(report.format_table())
        click.echo(
            f"Wrote {report.output} ({report.output.stat().st_size / 1e6:.2f} MB) in {report.seconds:.1f} s", err=True
        )
    variants = {}  # export_model raised on any failed check, so the fp32 file here has passed them all
    if quantize or precision != "fp32":
        variants = _variants(
            report.output,
            quantize=quantize,
            precision=precision,
            calibration=calibration,
            int8_config=int8_config,
            max_accuracy_drop=max_accuracy_drop,
            data_dir=data_dir,
            as_json=as_json,
        )
    if triton_repo is not None:  # the verified fp32 file as a Triton model repository entry
        variants["triton_repo"] = str(write_triton_repo(report.output, triton_repo))
        if not as_json:
            click.echo(f"Wrote Triton model repository entry {variants['triton_repo']}", err=True)
    int8 = variants.get("int8", {})
    steps = next_steps(
        report.output,
        target=report.target,
        dataset=report.metadata.get(md.DATASET, ""),
        int8_written=Path(int8["output"]) if int8.get("written") else None,
    )
    if as_json:
        click.echo(to_json({**report.to_dict(), **variants, "next_steps": steps}))
    else:
        click.echo(format_next_steps(steps), err=True)


def _derive_from_onnx(
    model: Path,
    output: Path | None,
    *,
    quantize: str | None,
    precision: str,
    calibration: str | None,
    int8_config: str,
    max_accuracy_drop: float,
    data_dir: Path | None,
    as_json: bool,
) -> None:
    """``stn-export stn.onnx --quantize int8 ...``: the variants of an fp32 file stn-export wrote."""
    ctx = click.get_current_context()
    for param in ctx.command.params:
        if param.name in _EXPORT_ONLY and ctx.get_parameter_source(param.name) is ParameterSource.COMMANDLINE:
            raise click.BadParameter(
                f"{model} is ONNX already; this option shapes an export from .pt/.pt2", param_hint="/".join(param.opts)
            )
    if quantize is None and precision == "fp32":
        raise click.UsageError(
            f"{model} is ONNX already: add --quantize int8 and/or --precision fp16 to derive a variant"
        )
    if output is not None and quantize and precision == "fp16":
        raise click.BadParameter(
            "names one file but two variants were asked for; leave it out to write both beside MODEL",
            param_hint="-o/--output",
        )
    if output is not None and model.exists() and output.resolve() == model.resolve():
        raise click.BadParameter(
            f"{output} is MODEL itself; the variant needs a file of its own", param_hint="-o/--output"
        )
    variants = _variants(
        model,
        quantize=quantize,
        precision=precision,
        calibration=calibration,
        int8_config=int8_config,
        max_accuracy_drop=max_accuracy_drop,
        data_dir=data_dir,
        as_json=as_json,
        int8_output=output if quantize else None,
        fp16_output=output if precision == "fp16" else None,
    )
    if as_json:
        click.echo(to_json({"source": str(model), **variants}))


def _variants(fp32: Path, *, max_accuracy_drop: float, as_json: bool, **options) -> dict:
    """derive_variants with the CLI's conventions: a negative --max-accuracy-drop means no limit,
    and progress lines go to stderr unless the report is JSON."""
    from .variants import derive_variants

    return derive_variants(
        fp32,
        max_accuracy_drop=None if max_accuracy_drop < 0 else max_accuracy_drop,
        echo=(lambda m: None) if as_json else (lambda m: click.echo(m, err=True)),
        **options,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
