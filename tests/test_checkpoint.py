"""The checkpoint format: a round trip keeps everything; hostile or foreign files are refused."""

from __future__ import annotations

import pickle

import pytest
import torch

from stn_deploy.errors import CheckpointError
from stn_deploy.preprocessing import Preprocessing
from stn_deploy.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from stn_deploy.train.model import STNConfig, build_model


def _checkpoint(config: STNConfig) -> Checkpoint:
    torch.manual_seed(3)
    model = build_model(config)
    channels = "RGB" if config.in_channels == 3 else "L"
    return Checkpoint(
        config=config,
        state_dict=model.state_dict(),
        class_names=[f"c{i}" for i in range(config.num_classes)],
        preprocessing=Preprocessing(
            image_size=(config.image_size,) * 2,
            mean=(0.1,) * config.in_channels,
            std=(0.3,) * config.in_channels,
            channel_order=channels,
        ),
        dataset="digits",
        metrics={"test_accuracy": 0.975, "best_epoch": 7},
        train_state={"epoch": 7, "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0]}]}},
    )


@pytest.mark.parametrize("config", [STNConfig(), STNConfig(in_channels=1, image_size=28, num_classes=4, arch="cnn")])
def test_round_trip_keeps_weights_and_metadata(tmp_path, config):
    original = _checkpoint(config)
    path = save_checkpoint(original, tmp_path / "model.pt")
    loaded = load_checkpoint(path)
    assert loaded.config == config
    assert loaded.class_names == original.class_names
    assert loaded.preprocessing == original.preprocessing
    assert loaded.dataset == "digits"
    assert loaded.metrics == {"test_accuracy": 0.975, "best_epoch": 7}
    assert loaded.train_state["epoch"] == 7
    assert loaded.versions["torch"] == torch.__version__
    model = loaded.build_model()
    assert not model.training
    x = torch.randn(2, config.in_channels, config.image_size, config.image_size)
    reference = build_model(config)
    reference.load_state_dict(original.state_dict)
    torch.testing.assert_close(model(x), reference.eval()(x), rtol=0, atol=0)
    assert not list(tmp_path.glob(".*.tmp")), "atomic write left a temporary file"


class _WritesMarker:
    """Unpickling this would call os.system/open and create a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_hostile_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"format": "stn-deploy-checkpoint", "format_version": 1, "config": {}, "boom": _WritesMarker(marker)}
    torch.save(payload, path)  # torch.save pickles the object; torch.load(weights_only=False) would run it
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "refused" in message
    assert not marker.exists()

    # a raw pickle (not a torch zip file) with the same gadget is refused too
    raw = tmp_path / "evil_raw.pt"
    raw.write_bytes(pickle.dumps(_WritesMarker(marker)))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not marker.exists()


def test_foreign_files_are_refused_with_one_line(tmp_path):
    not_torch = tmp_path / "notes.pt"
    not_torch.write_text("hello")
    plain_state_dict = tmp_path / "weights.pt"
    torch.save(build_model().state_dict(), plain_state_dict)
    for path, needle in [
        (tmp_path / "missing.pt", "no such file"),
        (tmp_path, "directory"),
        (not_torch, "not a checkpoint"),
        (plain_state_dict, "not a stn-deploy checkpoint"),
    ]:
        with pytest.raises(CheckpointError, match=needle) as info:
            load_checkpoint(path)
        assert "\n" not in str(info.value)


def test_weights_that_do_not_fit_the_config_are_a_checkpoint_error(tmp_path):
    ckpt = _checkpoint(STNConfig())
    ckpt.state_dict = {k: v for k, v in ckpt.state_dict.items() if not k.startswith("fc2")}
    loaded = load_checkpoint(save_checkpoint(ckpt, tmp_path / "partial.pt"))
    with pytest.raises(CheckpointError, match="do not fit"):
        loaded.build_model()


def test_malformed_fields_are_one_line_checkpoint_errors(tmp_path):
    """Fields of the wrong type (a hand-edited or foreign payload) are messages, not TypeErrors."""
    good = _checkpoint(STNConfig()).to_payload()
    cases = {
        "version.pt": ({"format_version": "2"}, "format_version '2' is not an integer"),
        "metrics.pt": ({"metrics": [1, 2]}, "malformed checkpoint"),
        "resample.pt": ({"preprocessing": {**good["preprocessing"], "resample": "lanczos"}}, "resample must be one of"),
        "size.pt": (
            {"preprocessing": {**good["preprocessing"], "image_size": [32]}},
            "image_size must be two positive",
        ),
    }
    for name, (change, needle) in cases.items():
        torch.save({**good, **change}, tmp_path / name)
        with pytest.raises(CheckpointError, match=needle) as info:
            load_checkpoint(tmp_path / name)
        assert "\n" not in str(info.value) and name in str(info.value)
