"""``stn-train``: train an STN (or the plain-CNN baseline) and keep the best checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from stn_deploy.console import report_errors, to_json
from stn_deploy.fileio import check_writable

from .trainer import DEVICES, OPTIMIZERS, TrainConfig, TrainError, read_resume_state, train

DEFAULTS = TrainConfig()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--dataset",
    default=DEFAULTS.dataset,
    metavar="NAME",
    help="digits (offline), cifar10, mnist, or imagefolder:PATH (one sub-folder per class).",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=DEFAULTS.epochs,
    help="Total epochs. With --resume: the new total; without it, the interrupted run's.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULTS.batch_size)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULTS.lr,
    help="Peak learning rate of the one-cycle schedule (warm-up, then cosine decay).",
)
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=DEFAULTS.optimizer)
@click.option(
    "--seed", type=int, default=DEFAULTS.seed, help="Fixes initialisation, shuffling, dropout and distortions."
)
@click.option("--device", type=click.Choice(DEVICES), default=DEFAULTS.device, help="auto: cuda when available.")
@click.option(
    "--arch",
    type=click.Choice(["stn", "cnn"]),
    default=DEFAULTS.arch,
    help="stn, or cnn: the same classifier without the spatial transformer (ablation).",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULTS.output,
    help="Checkpoint to write (the best epoch by test accuracy; rewritten atomically each epoch).",
)
@click.option(
    "--resume",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Continue the run recorded in this checkpoint (its recipe is reused; writes back to it "
    "unless --output is given).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option(
    "--visualize",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="PNG",
    help="Write test images beside their STN-warped versions to this PNG.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where cifar10/mnist live or are downloaded to [default: ./data].",
)
@click.option("--download", is_flag=True, help="Download cifar10/mnist if missing.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar per epoch on stderr.")
@click.pass_context
@report_errors
def main(
    ctx: click.Context, resume: Path | None, as_json: bool, visualize: Path | None, progress: bool, **options
) -> None:
    """Train an STN image classifier and write the best checkpoint.

    \b
    Examples:
      stn-train                                  # STN on the offline digits benchmark
      stn-train --arch cnn -o cnn.pt             # the plain-CNN baseline
      stn-train --visualize stn.png --json       # plus a picture of the learned warps
      stn-train --resume model.pt --epochs 40    # continue a run to 40 epochs
      stn-train --dataset mnist --data-dir data --download
    """
    if resume is not None:
        state = read_resume_state(resume)
        if ctx.get_parameter_source("output") is click.core.ParameterSource.DEFAULT:
            options["output"] = resume
        if "epochs" in state and ctx.get_parameter_source("epochs") is click.core.ParameterSource.DEFAULT:
            options["epochs"] = state["epochs"]  # same total, same learning-rate schedule
    config = TrainConfig(**options)
    if resume is not None:
        recorded = state["recipe"]
        given = {
            name
            for name in TrainConfig.RECIPE
            if name in ctx.params and ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
        }
        clashes = [
            f"--{n.replace('_', '-')} {getattr(config, n)} (recorded: {recorded[n]})"
            for n in sorted(given)
            if n in recorded and recorded[n] != getattr(config, n)
        ]
        if clashes:
            raise TrainError(f"{resume}: cannot resume with a different recipe: {'; '.join(clashes)}")

    if visualize is not None:
        check_writable(visualize)  # before training, not after it
    result = train(config, resume=resume, progress=progress)
    click.echo(
        f"best test accuracy {100 * result.test_accuracy:.2f}% (error {100 * (1 - result.test_accuracy):.2f}%) "
        f"at epoch {result.best_epoch}/{result.epochs}, {result.seconds:.1f}s; wrote {result.output}",
        err=True,
    )
    summary = result.summary()
    if visualize is not None:
        from .visualization import visualize_checkpoint

        visualize_checkpoint(result.output, visualize, data_dir=config.data_dir)
        click.echo(f"wrote {visualize}", err=True)
        summary["visualization"] = str(visualize)
    if as_json:
        click.echo(to_json(summary))


if __name__ == "__main__":  # pragma: no cover
    main()
