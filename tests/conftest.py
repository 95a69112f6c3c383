"""Shared fixtures: small real checkpoints and one exported model, written to disk once per session
(no network, no downloads). Helper functions live in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

from helpers import make_checkpoint  # noqa: E402
from stn_deploy.train.model import STNConfig  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint_path(tmp_path_factory) -> Path:
    """The reference STN (3×32×32, 10 classes), random weights, identity θ init."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "stn.pt")


@pytest.fixture(scope="session")
def extreme_theta_checkpoint_path(tmp_path_factory) -> Path:
    """A reference STN whose θ samples mostly outside the image (zeros padding matters)."""
    return make_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "stn_extreme.pt",
        seed=1,
        theta_bias=(2.5, 0.4, 1.5, -0.3, 2.0, -1.2),
    )


@pytest.fixture(scope="session")
def mnist_checkpoint_path(tmp_path_factory) -> Path:
    """A 1×28×28 (MNIST-shaped) STN checkpoint."""
    return make_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "stn_mnist.pt", STNConfig(in_channels=1, image_size=28), seed=2
    )


@pytest.fixture(scope="session")
def model_path(tmp_path_factory, checkpoint_path) -> Path:
    """``checkpoint_path`` exported once (default target) with the ``theta`` and ``warped`` outputs:
    the model every runtime, stn-infer and serving test runs."""
    from stn_deploy.export import export_model

    path = tmp_path_factory.mktemp("models") / "stn_theta_warped.onnx"
    export_model(checkpoint_path, path, with_theta=True, with_warped=True, parity_samples=32, progress=False)
    return path
