"""Helpers the tests import (fixtures live in conftest.py): checkpoints written to disk, CLI checks."""

from __future__ import annotations

from pathlib import Path

import torch

from stn_deploy.preprocessing import Preprocessing
from stn_deploy.train.checkpoint import Checkpoint, save_checkpoint
from stn_deploy.train.model import STNConfig, build_model

DIGIT_CLASSES = [str(i) for i in range(10)]


def assert_cli_error(result, code: int, text: str) -> None:
    """A click command failed the way users should see it: exit ``code``, ``text`` in the output,
    and no escaped exception (CliRunner keeps those in ``result.exception``; it never prints them)."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert text in result.output, result.output


def make_checkpoint(
    path: Path,
    config: STNConfig | None = None,
    *,
    seed: int = 0,
    theta_bias: tuple[float, ...] | None = None,
    dataset: str = "random",
) -> Path:
    """Write a checkpoint of a randomly initialised model.

    ``theta_bias`` overrides the θ head's bias (its weights stay zero, so every input gets that
    θ): e.g. ``(2.5, 0.4, 1.5, -0.3, 2.0, -1.2)`` samples far outside the image.
    """
    config = config or STNConfig()
    torch.manual_seed(seed)
    model = build_model(config)
    if theta_bias is not None:
        with torch.no_grad():
            model.fc_loc[-1].weight.normal_(0, 0.01)
            model.fc_loc[-1].bias.copy_(torch.tensor(theta_bias))
    channels = "RGB" if config.in_channels == 3 else "L"
    pre = Preprocessing(
        image_size=(config.image_size, config.image_size),
        mean=(0.5,) * config.in_channels,
        std=(0.25,) * config.in_channels,
        channel_order=channels,
    )
    ckpt = Checkpoint(
        config=config,
        state_dict=model.state_dict(),
        class_names=[f"class_{i}" for i in range(config.num_classes)],
        preprocessing=pre,
        dataset=dataset,
        metrics={"test_accuracy": 0.1},
    )
    return save_checkpoint(ckpt, path)
