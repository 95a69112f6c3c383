"""The checkpoint format: weights plus everything needed to rebuild and use the model.

A checkpoint is one ``torch.save`` file holding plain data only (tensors, numbers, strings,
lists, dicts). It is always read with ``torch.load(weights_only=True)``, whose unpickler refuses
any pickle that would import or call code, so loading an untrusted file never runs it.
"""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stn_deploy import __version__, fields
from stn_deploy.errors import CheckpointError, clip
from stn_deploy.fileio import atomic_path, input_file_problem
from stn_deploy.preprocessing import Preprocessing

from .model import STNClassifier, STNConfig

FORMAT = "stn-deploy-checkpoint"
FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    """Versions of the software that produced an artifact (recorded in checkpoints and ONNX)."""
    # str(): torch.__version__ is a TorchVersion, which weights_only loading refuses to unpickle.
    out = {"stn_deploy": __version__, "torch": str(torch.__version__), "python": platform.python_version()}
    for name in ("onnx", "onnxruntime", "onnxscript", "torchvision"):
        try:
            module = __import__(name)
            out[name] = str(getattr(module, "__version__", "unknown"))
        except ImportError:
            pass
    return out


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Checkpoint:
    """A loaded checkpoint. :meth:`build_model` rebuilds the network with its weights."""

    config: STNConfig
    state_dict: dict[str, torch.Tensor]
    class_names: list[str]
    preprocessing: Preprocessing
    dataset: str
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    # Training state for --resume: epoch, optimizer state, RNG-free run arguments.
    train_state: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def build_model(self) -> STNClassifier:
        """The model in eval mode with these weights; a mismatch is a :class:`CheckpointError`."""
        model = STNClassifier(self.config)
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as exc:
            where = self.path or "checkpoint"
            detail = " ".join(str(exc).split())
            raise CheckpointError(f"{where}: weights do not fit the model config ({detail[:300]})") from None
        return model.eval()

    def to_payload(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict.items()},
            "class_names": list(self.class_names),
            "preprocessing": self.preprocessing.to_dict(),
            "dataset": self.dataset,
            "metrics": dict(self.metrics),
            "versions": dict(self.versions or versions()),
            "train_state": dict(self.train_state),
        }


def save_checkpoint(checkpoint: Checkpoint, path: str | os.PathLike[str]) -> Path:
    """Write ``checkpoint`` atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(checkpoint.to_payload(), tmp)
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint without running any code it might contain.

    Raises :class:`CheckpointError` with a one-line message for a missing file, a file that is
    not a checkpoint, or a pickle whose unpickling would import or call code.
    """
    path = Path(path)
    if problem := input_file_problem(path, directory="is a directory, not a checkpoint file"):
        raise CheckpointError(f"{path}: {problem}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means "not a checkpoint"
        msg = " ".join(str(exc).split())
        if "weights_only" in msg or "Unsupported global" in msg or "GLOBAL" in msg:
            reason = "refused: unpickling it would run code (only plain-data checkpoints are loaded)"
        else:
            reason = f"not a checkpoint ({type(exc).__name__}: {msg[:200]})"
        raise CheckpointError(f"{path}: {reason}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a stn-deploy checkpoint (no '{FORMAT}' header)")
    version = payload.get("format_version", 0)
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: malformed checkpoint (format_version {version!r} is not an integer)")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {version} is newer than this stn-deploy reads ({FORMAT_VERSION})"
        )
    try:
        config = STNConfig.from_dict(payload["config"])
        preprocessing = Preprocessing.from_dict(payload["preprocessing"])
        state_dict = payload["state_dict"]
        # -- hardening (issue 12): names are a list of strings ("abc" is not three classes), the
        # other fields are mappings, and the dataset a string
        class_names = [fields.string(c, "class name") for c in fields.sequence(payload["class_names"], "class_names")]
        metrics, recorded_versions, train_state = (
            dict(fields.mapping(payload.get(k, {}), k)) for k in ("metrics", "versions", "train_state")
        )
        dataset = fields.string(payload.get("dataset", "unknown"), "dataset")
        # -- end hardening
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed checkpoint ({type(exc).__name__}: {clip(str(exc))})") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: malformed checkpoint (state_dict is not a mapping of tensors)")
    if len(class_names) != config.num_classes:
        raise CheckpointError(f"{path}: {len(class_names)} class names for a {config.num_classes}-class model")
    return Checkpoint(
        config=config,
        state_dict=state_dict,
        class_names=class_names,
        preprocessing=preprocessing,
        dataset=dataset,
        metrics=metrics,
        versions=recorded_versions,
        train_state=train_state,
        path=path,
    )
