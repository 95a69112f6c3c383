"""The ONNX ``metadata_props`` keys stn-deploy writes at export and reads at inference.

Everything a deployment needs to use the model travels inside the ONNX file; this module is
the one place the keys are named, and the names of a model's precision variants
(:func:`variant_path`). It needs no torch and no onnx (values are JSON strings).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MetadataError, clip, shorten
from .preprocessing import Preprocessing

PRODUCER_NAME = "stn-deploy"

CLASS_NAMES = "stn_deploy.class_names"  # JSON list of strings
PREPROCESSING = "stn_deploy.preprocessing"  # JSON, Preprocessing.to_dict()
CHECKPOINT_SHA256 = "stn_deploy.checkpoint_sha256"  # hex digest of the source file
METRICS = "stn_deploy.metrics"  # JSON dict, training metrics
VERSIONS = "stn_deploy.versions"  # JSON dict, stn_deploy/torch/onnx/... versions
TARGET = "stn_deploy.target"  # ort | cuda | portable
PRECISION = "stn_deploy.precision"  # fp32 | fp16 | int8
DATASET = "stn_deploy.dataset"  # the checkpoint's dataset name
MODEL_CONFIG = "stn_deploy.model_config"  # JSON, STNConfig.to_dict() (absent for .pt2 sources)

# Graph input/output names.
INPUT = "image"
LOG_PROBS = "log_probs"
THETA = "theta"
WARPED = "warped"


def variant_path(fp32_path: Path, precision: str) -> Path:
    """Where stn-export writes a precision variant: ``stn.onnx`` → ``stn.int8.onnx`` /
    ``stn.fp16.onnx`` (``stn.cuda.onnx`` → ``stn.cuda.fp16.onnx``)."""
    fp32_path = Path(fp32_path)
    return fp32_path.with_name(f"{fp32_path.stem}.{precision}{fp32_path.suffix or '.onnx'}")


@dataclass
class ModelMetadata:
    """The parsed stn-deploy metadata of an ONNX model."""

    preprocessing: Preprocessing
    class_names: list[str]
    props: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "model") -> ModelMetadata:
        """Parse ``metadata_props`` (a plain dict); a missing or bad key is a one-line
        :class:`~stn_deploy.errors.MetadataError` (a ModelFileError and a ValueError) naming it."""
        # -- hardening (issue 12): any value is a result or a MetadataError, never another exception
        if not isinstance(props, dict):
            raise MetadataError(f"{source}: metadata must be a mapping of strings, got {shorten(props)}")
        try:
            pre = Preprocessing.from_json(props[PREPROCESSING])
        except KeyError:
            raise MetadataError(f"{source}: no '{PREPROCESSING}' metadata (not exported by stn-export?)") from None
        except (ValueError, TypeError) as exc:
            raise MetadataError(f"{source}: bad '{PREPROCESSING}' metadata ({exc})") from None
        try:
            text = props[CLASS_NAMES]
            names = json.loads(text) if isinstance(text, (str, bytes, bytearray)) else text
        except KeyError:
            raise MetadataError(f"{source}: no '{CLASS_NAMES}' metadata") from None
        except (ValueError, RecursionError) as exc:
            detail = f"{type(exc).__name__}: {clip(str(exc), 120)}"
            raise MetadataError(f"{source}: bad '{CLASS_NAMES}' metadata ({detail})") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise MetadataError(
                f"{source}: bad '{CLASS_NAMES}' metadata (a JSON list of strings, got {shorten(names)})"
            )
        return cls(preprocessing=pre, class_names=list(names), props=dict(props))
        # -- end hardening
