"""Precision variants derived from a verified fp32 export: ``--quantize int8`` and ``--precision fp16``.

``stn-export stn.pt --quantize int8 --calibration digits`` writes ``stn.onnx`` (fp32, checked)
and then ``stn.int8.onnx``; ``--precision fp16`` adds ``stn.fp16.onnx``. ``stn-export stn.onnx
--quantize int8 ...`` derives the variant from an fp32 file stn-export wrote earlier, without
exporting again. Each variant has its own gate (:mod:`.quantize`, :mod:`.precision`) and is
written only if it passes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from stn_deploy import metadata as md
from stn_deploy.errors import DatasetError, ModelFileError
from stn_deploy.preprocessing import Preprocessing
from stn_deploy.train.data import BUILTIN_DATASETS, Samples, load_image_samples

from .checks import load_onnx
from .precision import convert_fp16
from .quantize import (
    CONFIGS,
    DEFAULT_CALIBRATION_SAMPLES,
    DEFAULT_EVAL_SAMPLES,
    FAST_CPU,
    quantize_int8,
    refuse_quantized,
)


def _model_info(path: Path) -> tuple[Preprocessing, list[str], str]:
    """Preprocessing, class names and dataset of an fp32 stn-export file; anything else is a one-line error."""
    model = load_onnx(path, load_external_data=False)
    try:
        meta = md.ModelMetadata.from_props({p.key: p.value for p in model.metadata_props}, source=str(path))
    except ValueError as exc:
        raise ModelFileError(str(exc)) from None
    precision = meta.props.get(md.PRECISION, "fp32")
    if precision != "fp32":
        raise ModelFileError(f"{path}: precision {precision}, not fp32; variants are derived from the fp32 export")
    refuse_quantized(model, path)  # hardening (issue 12): whatever the metadata claims, at once
    return meta.preprocessing, meta.class_names, meta.props.get(md.DATASET, "")


def _test_split(
    dataset: str, pre: Preprocessing, n: int, data_dir: Path | None, *, from_user: bool = False
) -> Samples | None:
    """The test split of a dataset, or None. A name from the file's metadata must be a built-in
    dataset (a model file never chooses a path to read); the user's --calibration may also be
    ``imagefolder:PATH`` (a plain directory has no test split)."""
    allowed = (
        dataset.startswith("imagefolder:") or dataset in BUILTIN_DATASETS if from_user else dataset in BUILTIN_DATASETS
    )
    if not allowed:
        return None
    try:
        return load_image_samples(dataset, pre, n=n, split="test", data_dir=data_dir)
    except DatasetError:
        return None


def derive_variants(
    fp32_path: Path,
    *,
    quantize: str | None = None,
    calibration: str | None = None,
    max_accuracy_drop: float | None = 0.5,
    precision: str = "fp32",
    data_dir: Path | None = None,
    int8_config: str | None = None,
    int8_output: Path | None = None,
    fp16_output: Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write the requested variants (default: beside ``fp32_path``, named by
    :func:`stn_deploy.metadata.variant_path`); returns ``{"int8": report, "fp16": report}`` dicts."""
    out: dict[str, Any] = {}
    pre, class_names, dataset = _model_info(fp32_path)
    if quantize == "int8":
        if not calibration:
            raise DatasetError("--quantize int8 needs --calibration DIR|dataset (real samples to calibrate on)")
        cal = load_image_samples(
            calibration, pre, n=DEFAULT_CALIBRATION_SAMPLES, split="train", class_names=class_names, data_dir=data_dir
        )
        # The gate's images, best first: the model's own test split (its labels are the model's
        # classes); held-out images of the calibration dataset (labels dropped: they may name other
        # classes); a labelled calibration directory (the report says it scored on those images).
        ev = _test_split(dataset, pre, DEFAULT_EVAL_SAMPLES, data_dir)
        if (
            ev is None
            and (other := _test_split(calibration, pre, DEFAULT_EVAL_SAMPLES, data_dir, from_user=True)) is not None
        ):
            ev = dataclasses.replace(other, labels=None)
        if ev is None and cal.labels is not None:
            ev = dataclasses.replace(cal, source=f"{cal.source} (the calibration images: no held-out split)")
        config = CONFIGS[int8_config] if int8_config else FAST_CPU
        echo(f"Quantizing {fp32_path} to int8 ({config.name}; calibration {cal.source}, {len(cal.images)} images)")
        report = quantize_int8(
            fp32_path,
            int8_output or md.variant_path(fp32_path, "int8"),
            cal.images,
            eval_images=ev.images if ev is not None else None,
            eval_labels=ev.labels if ev is not None else None,
            eval_source=ev.source if ev is not None else None,
            max_accuracy_drop=max_accuracy_drop,
            config=config,
        )
        echo(report.format_table())
        out["int8"] = report.to_dict()
    if precision == "fp16":
        ev = _test_split(dataset, pre, 4, data_dir)
        noise = np.random.default_rng(0).standard_normal((4, *pre.input_shape), dtype=np.float32)
        inputs = np.concatenate([ev.images[:4], noise]) if ev is not None else noise
        echo(f"Converting {fp32_path} to fp16")
        report16 = convert_fp16(
            fp32_path, fp16_output or md.variant_path(fp32_path, "fp16"), inputs, reference_inputs=len(inputs)
        )
        echo(report16.format_table())
        out["fp16"] = report16.to_dict()
    return out
