"""Write a dataset split as image files: ``python -m stn_deploy.train.samples OUT_DIR``.

The files are what the model sees (the split's images after preprocessing, mapped back to
8-bit pixels), one sub-folder per class: the layout ``imagefolder:`` datasets read, and a
directory ``stn-infer`` can classify, with the true label in each path.
"""

from __future__ import annotations

from pathlib import Path

import click
from PIL import Image
from tqdm import tqdm

from stn_deploy.console import report_errors
from stn_deploy.fileio import atomic_path

from .data import load_dataset


def write_samples(
    dataset: str, out_dir: Path, count: int, *, split: str = "test", data_dir: Path | None = None, progress: bool = True
) -> list[Path]:
    """Write the first ``count`` images of ``split`` as PNGs under ``out_dir/<class>/``."""
    loaded = load_dataset(dataset, split, data_dir=data_dir)
    pre = loaded.preprocessing
    written = []
    for i in tqdm(range(min(count, len(loaded))), desc="samples", unit="img", disable=not progress, leave=False):
        image, label = loaded.dataset[i]
        pixels = pre.denormalize(image.numpy())
        if pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
        path = out_dir / loaded.class_names[int(label)] / f"{split}_{i:05d}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(pixels).save(tmp, format="PNG")
        written.append(path)
    return written


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dataset", default="digits", help="digits, cifar10, mnist or imagefolder:PATH.")
@click.option("--split", type=click.Choice(["train", "test"]), default="test")
@click.option("--count", type=click.IntRange(min=1), default=100, help="Images to write (at most the split's size).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--progress/--no-progress", default=True)
@report_errors
def main(out_dir: Path, dataset: str, split: str, count: int, data_dir: Path | None, progress: bool) -> None:
    """Write images of a dataset split as PNG files under OUT_DIR/<class>/ (for stn-infer)."""
    written = write_samples(dataset, out_dir, count, split=split, data_dir=data_dir, progress=progress)
    click.echo(f"wrote {len(written)} images under {out_dir}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
