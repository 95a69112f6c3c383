"""The STN tutorial figure for a trained checkpoint: test images beside their warped versions."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from stn_deploy.errors import DatasetError
from stn_deploy.visualize import save_warp_grid

from .checkpoint import load_checkpoint
from .data import load_samples


@torch.no_grad()
def visualize_checkpoint(
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    count: int = 32,
    data_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Run the first ``count`` test images of the checkpoint's dataset through ``model.transform``
    and write the input|warped grid to ``output`` (PNG)."""
    ckpt = load_checkpoint(checkpoint)
    samples = load_samples(ckpt.dataset, count, split="test", data_dir=data_dir)
    if samples is None:
        raise DatasetError(f"{ckpt.dataset}: no test images available offline to visualize")
    images, labels = samples
    model = ckpt.build_model()
    warped, _theta = model.transform(images)
    predicted = model.classify(warped).argmax(1)
    pre = ckpt.preprocessing
    names = [ckpt.class_names[int(p)] for p in predicted]
    return save_warp_grid(
        pre.denormalize(images.numpy()),
        pre.denormalize(warped.numpy()),
        output,
        labels=[f"{n}{'' if int(p) == int(y) else '(x)'}" for n, p, y in zip(names, predicted, labels)],
        titles=("Test images", "Transformed by the STN" if model.has_transformer else "Plain CNN (no transformer)"),
    )
