"""int8: ONNX Runtime static quantization of a verified fp32 export, behind an accuracy gate.

    >>> from stn_deploy.export.quantize import quantize_int8
    >>> from stn_deploy.train.data import load_image_samples
    >>> cal = load_image_samples("digits", preprocessing, split="train")          # doctest: +SKIP
    >>> ev = load_image_samples("digits", preprocessing, split="test")            # doctest: +SKIP
    >>> report = quantize_int8("stn.onnx", "stn.int8.onnx", cal.images,
    ...                        eval_images=ev.images, eval_labels=ev.labels)        # doctest: +SKIP
    >>> report.accuracy_drop                                                       # doctest: +SKIP

The default configuration, :data:`FAST_CPU`, is the layout ONNX Runtime's x86 CPU kernels run
fastest (benchmarks/INT8.md has the measurements, on CPUs with and without VNNI, and the reasons):

* the fp32 graph first gets the exact rewrites of :mod:`.graph_rewrites` (ReLU before MaxPool,
  the affine grid as one MatMul, the unread conv rows cropped), and the RGB convs are unfolded
  into 1×K convs over row-shifted copies of their input (``unfold_conv_rows``: C_in 3 → 24 / 16,
  so they too get the symmetric kernel; the Slices and the Concat run on uint8, and the image and
  the sampler's output are each quantized once, before the Slices, not once per Slice);
* QDQ format, **uint8 activations with symmetric int8 per-channel weights** (U8S8): the
  combination for which MLAS has its symmetric indirect-conv kernels (``vpmaddubsw`` on AVX2,
  ``vpdpbusd`` with VNNI);
* ``reduce_range``: 7-bit weights, so ``vpmaddubsw``'s int16 pair sums cannot saturate on a CPU
  without VNNI (255·63·2 < 32767); without it the 3-channel convs lose accuracy there;
* only Conv, Gemm, MaxPool, Relu, Reshape, Slice and Concat are quantized; the θ head's last Gemm, the
  affine-grid math and GridSample stay fp32 (a sampling-coordinate error moves pixels);
* ONNX Runtime's graph optimization at ``all``, where the QDQ pairs fold into QLinearConv /
  QGemm and the conv chain runs in NHWC uint8 end to end.

The int8 model keeps the fp32 model's metadata, with ``stn_deploy.precision`` set to ``int8`` and
the configuration and accuracy recorded under ``stn_deploy.quantization``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from stn_deploy import metadata as md
from stn_deploy.errors import DatasetError, ExportCheckError, ModelFileError, StnDeployError, one_line
from stn_deploy.fileio import atomic_path
from stn_deploy.runtime import create_session, session_options

from .checks import load_onnx
from .graph import ensure_node_names, op_counts, theta_path_nodes, to_ir, to_proto
from .graph_rewrites import EXACT_RULES, unfold_conv_rows

QUANTIZATION = "stn_deploy.quantization"  # metadata key: JSON {config, accuracy, ...}
DEFAULT_MAX_ACCURACY_DROP = 0.5  # top-1 points
DEFAULT_CALIBRATION_SAMPLES = 512
DEFAULT_EVAL_SAMPLES = 2000


@dataclass(frozen=True)
class Int8Config:
    """How ONNX Runtime's ``quantize_static`` is called. :data:`FAST_CPU` is the default."""

    name: str = "fast-cpu"
    quant_format: str = "QDQ"  # QDQ | QOperator
    activation_type: str = "uint8"  # uint8 | int8
    weight_type: str = "int8"  # int8 | uint8
    per_channel: bool = True
    reduce_range: bool = True
    calibrate_method: str = "MinMax"  # MinMax | Entropy | Percentile
    # None: onnxruntime's default list (every op it can quantize).
    op_types: tuple[str, ...] | None = ("Conv", "Gemm", "MaxPool", "Relu", "Reshape", "Slice", "Concat")
    keep_theta_fp32: bool = True  # θ head's last Gemm, the affine grid and the sampler stay fp32
    exact_rewrites: bool = True  # graph_rewrites.rewrite_exact before quantizing
    unfold_conv_rows: bool = True  # graph_rewrites.unfold_conv_rows: RGB convs as C_in % 4 == 0 convs
    # Quantize the tensors the unfolding Slices read (the image, the sampler's output) once, so the
    # Slices copy uint8 (ForceQuantizeNoInputCheck). The fp32 GridSample reads the fp32 image again
    # (float_readers_read_float); a 'warped' output, when exported, is the uint8-rounded sampler
    # output that the int8 classifier sees.
    quantize_slice_inputs: bool = True
    pre_process: bool = True  # onnxruntime.quantization.shape_inference.quant_pre_process

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["op_types"] = list(self.op_types) if self.op_types is not None else None
        return d


FAST_CPU = Int8Config()
# FAST_CPU without the row unfolding: every conv keeps its own shape, so the graph is the plain
# QDQ form that other int8 runtimes read best (OpenVINO's 3-channel int8 convs beat the unfolded
# ones; benchmarks/INT8.md). ONNX Runtime runs it slower than FAST_CPU.
PLAIN = dataclasses.replace(FAST_CPU, name="plain", unfold_conv_rows=False, quantize_slice_inputs=False)
# What quantize_static does when given nothing but a model and a reader (for comparison).
ORT_DEFAULT = Int8Config(
    name="ort-default-qdq",
    activation_type="int8",
    weight_type="int8",
    per_channel=False,
    reduce_range=False,
    op_types=None,
    keep_theta_fp32=False,
    exact_rewrites=False,
    unfold_conv_rows=False,
    quantize_slice_inputs=False,
    pre_process=False,
)
CONFIGS = {c.name: c for c in (FAST_CPU, PLAIN, ORT_DEFAULT)}


@dataclass
class QuantizationReport:
    """int8 against fp32 on labelled evaluation images (or agreement only, without labels)."""

    source: Path
    output: Path
    config: dict[str, Any]
    calibration_samples: int
    eval_samples: int
    fp32_accuracy: float | None  # top-1, percent
    int8_accuracy: float | None
    top1_agreement: float  # percent of eval inputs with the same arg-max in both models
    max_abs_diff: float  # max |Δ log-prob|
    max_accuracy_drop: float | None
    eval_source: str = "the calibration images"  # where the evaluation images came from
    written: bool = False
    rewrites: dict[str, int] = field(default_factory=dict)
    excluded_nodes: list[str] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def labelled(self) -> bool:
        return self.fp32_accuracy is not None

    @property
    def accuracy_drop(self) -> float:
        """fp32 minus int8 top-1 in points; without labels, the disagreement (an upper bound)."""
        if self.labelled:
            return float(self.fp32_accuracy - self.int8_accuracy)  # type: ignore[operator]
        return float(100.0 - self.top1_agreement)

    @property
    def passed(self) -> bool:
        return self.max_accuracy_drop is None or self.accuracy_drop <= self.max_accuracy_drop + 1e-9

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "output": str(self.output),
            "written": self.written,
            "config": self.config,
            "calibration_samples": self.calibration_samples,
            "eval_samples": self.eval_samples,
            "eval_source": self.eval_source,
            "fp32_accuracy": self.fp32_accuracy,
            "int8_accuracy": self.int8_accuracy,
            "accuracy_drop": self.accuracy_drop,
            "accuracy_drop_measure": "top-1 points" if self.labelled else "disagreement with fp32 (no labels)",
            "max_accuracy_drop": self.max_accuracy_drop,
            "passed": self.passed,
            "top1_agreement": self.top1_agreement,
            "max_abs_diff": self.max_abs_diff,
            "rewrites": self.rewrites,
            "excluded_nodes": self.excluded_nodes,
            "op_counts": self.op_counts,
            "seconds": round(self.seconds, 2),
        }

    def format_table(self) -> str:
        acc = (
            f"top-1 fp32 {self.fp32_accuracy:.2f}% -> int8 {self.int8_accuracy:.2f}% "
            f"(drop {self.accuracy_drop:+.2f} points"
            if self.labelled
            else f"no labels: disagreement with fp32 {self.accuracy_drop:.2f}% (used as the drop"
        )
        limit = "no limit" if self.max_accuracy_drop is None else f"limit {self.max_accuracy_drop:.2f}"
        lines = [
            f"int8 ({self.config['name']}): {self.source} -> {self.output}",
            f"  {acc}, {limit}) on {self.eval_samples} images of {self.eval_source}; calibrated on "
            f"{self.calibration_samples}",
            f"  top-1 agreement {self.top1_agreement:.2f}%, max |Δ log-prob| {self.max_abs_diff:.3g}",
            f"  {self.config['quant_format']} {self.config['activation_type']} activations / "
            f"{self.config['weight_type']} weights, per_channel={self.config['per_channel']}, "
            f"reduce_range={self.config['reduce_range']}; fp32 kept: {', '.join(self.excluded_nodes) or 'none'}",
        ]
        return "\n".join(lines)


# -- hardening (issue 12): a model that is quantized already is refused at once -------------------
# Quantizing a graph that holds quantization nodes or integer weights does not make sense and
# kept ONNX Runtime's calibration busy for minutes; the graph is read, not only the metadata.
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
        "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "QAttention", "QEmbedLayerNormalization",
    }
)  # fmt: skip
_LOW_PRECISION_WEIGHTS = {
    onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT4: "int4",
    onnx.TensorProto.UINT4: "uint4", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16",
}  # fmt: skip


def quantized_content(model: onnx.ModelProto) -> list[str]:
    """What in ``model``'s graph says it is not an fp32 model: quantization operators (QDQ pairs,
    QLinear*/QGemm, ConvInteger/MatMulInteger) and integer or half-precision weights. Empty for fp32."""
    found: dict[str, int] = {}
    graphs = [model.graph]
    for graph in graphs:
        for node in graph.node:
            if node.op_type in QUANTIZED_OPS or node.op_type.startswith("QLinear"):
                found[node.op_type] = found.get(node.op_type, 0) + 1
            graphs.extend(a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
        for tensor in graph.initializer:
            kind = _LOW_PRECISION_WEIGHTS.get(tensor.data_type)
            if kind is not None:
                found[f"{kind} weights"] = found.get(f"{kind} weights", 0) + 1
    return [f"{name} x{count}" for name, count in sorted(found.items())]


def refuse_quantized(model: onnx.ModelProto, path: Path) -> None:
    """Raise a one-line :class:`ModelFileError` if ``model`` is quantized (or half precision) already."""
    found = quantized_content(model)
    if found:
        precision = {p.key: p.value for p in model.metadata_props}.get(md.PRECISION, "none")
        raise ModelFileError(
            f"{path}: quantized already ({', '.join(found[:6])}{', ...' if len(found) > 6 else ''}; "
            f"its metadata says precision {precision}): variants are derived from the fp32 export"
        )


# -- end hardening


class CalibrationReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over preprocessed images, in batches."""

    def __init__(self, images: np.ndarray, input_name: str = md.INPUT, batch_size: int = 64) -> None:
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.input_name = input_name
        self.batch_size = batch_size
        self._start = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._start >= len(self.images):
            return None
        batch = self.images[self._start : self._start + self.batch_size]
        self._start += self.batch_size
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._start = 0

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)


# -- which nodes stay fp32 ---------------------------------------------------------------------------
def float_readers_read_float(
    model: onnx.ModelProto, quantized_op_types: tuple[str, ...] | None
) -> tuple[onnx.ModelProto, int]:
    """Point unquantized readers of ``DequantizeLinear(QuantizeLinear(x))``, ``x`` a graph input, back at ``x``.

    With ``ForceQuantizeNoInputCheck`` the quantizer rounds the image through uint8 for every
    reader, the fp32 GridSample included; the sampler then reads the fp32 image again, as in the
    fp32 model (only the Slices of the unfolded conv read the uint8 copy).
    """
    if quantized_op_types is None:
        return model, 0
    graph_model = to_ir(model)
    count = 0
    for node in graph_model.graph:
        if node.op_type in quantized_op_types or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, value in enumerate(node.inputs):
            dq = value.producer() if value is not None else None
            q = dq.inputs[0].producer() if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear" and q.inputs[0].is_graph_input():
                node.replace_input_with(i, q.inputs[0])
                count += 1
    return to_proto(graph_model), count


# -- running and comparing ------------------------------------------------------------------------
def _session(path_or_bytes: str | bytes, threads: int = 2):
    return create_session(path_or_bytes, session_options(threads=threads))


def _log_probs(session, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    name = session.get_inputs()[0].name
    out_name = (
        md.LOG_PROBS if md.LOG_PROBS in [o.name for o in session.get_outputs()] else session.get_outputs()[0].name
    )
    chunks = [session.run([out_name], {name: images[i : i + batch_size]})[0] for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


# Where onnxruntime's symbolic shape inference dumps its partial result (and a <uuid>.data file
# beside it) when it gives up: the working directory.
_SYMBOLIC_DUMP = Path("sym_shape_infer_temp.onnx")


def _remove_onnx_and_data(path: Path) -> None:
    """Delete an ONNX file and the external-data files its initializers name."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - nothing there, or not ONNX: leave it
        return
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and "/" not in entry.value:
                (path.parent / entry.value).unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    try:
        return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[name]
    except KeyError:
        raise ValueError(f"quantization type must be uint8 or int8, got {name!r}") from None


def quantize_int8(
    fp32_onnx_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    calibration: np.ndarray,
    *,
    eval_images: np.ndarray | None = None,
    eval_labels: np.ndarray | None = None,
    eval_source: str | None = None,
    max_accuracy_drop: float | None = DEFAULT_MAX_ACCURACY_DROP,
    config: Int8Config = FAST_CPU,
    threads: int = 2,
) -> QuantizationReport:
    """Quantize a verified fp32 ONNX file to int8 and write it only if it keeps its accuracy.

    ``calibration``: preprocessed images [N, C, H, W] (real samples, not noise). ``eval_images`` /
    ``eval_labels``: the held-out test split; without labels the gate uses the disagreement with
    fp32, and without eval images the calibration images are used for agreement only.
    ``eval_source`` names where the eval images came from, for the report.
    ``max_accuracy_drop``: top-1 points; ``None`` turns the gate off. When the drop exceeds it,
    :class:`ExportCheckError` is raised and nothing is written at ``output_path``.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    started = time.perf_counter()
    source, output = Path(fp32_onnx_path), Path(output_path)
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    if calibration.ndim != 4 or len(calibration) == 0:
        raise DatasetError(
            f"calibration images must be a non-empty [N, C, H, W] array, got shape {list(calibration.shape)}"
        )
    model = load_onnx(source)
    refuse_quantized(model, source)  # hardening (issue 12): before any calibration
    props = {p.key: p.value for p in model.metadata_props}
    input_name = model.graph.input[0].name

    graph_model = to_ir(model)
    ensure_node_names(graph_model.graph)  # nodes are excluded from quantization by name
    rules = (EXACT_RULES if config.exact_rewrites else ()) + ((unfold_conv_rows(),) if config.unfold_conv_rows else ())
    rewrites = {rule.name: rule.apply(graph_model) for rule in rules}
    excluded = theta_path_nodes(graph_model.graph) if config.keep_theta_fp32 else []
    model = to_proto(graph_model)

    with tempfile.TemporaryDirectory(prefix="stn-int8-") as tmp_dir:
        tmp = Path(tmp_dir)
        prepared = tmp / "prepared.onnx"
        onnx.save(model, str(prepared))
        quantized = tmp / "int8.onnx"
        kwargs: dict[str, Any] = {}
        if config.op_types is not None:
            kwargs["op_types_to_quantize"] = list(config.op_types)
        if config.quantize_slice_inputs:
            kwargs["extra_options"] = {"ForceQuantizeNoInputCheck": True}
        try:
            if config.pre_process:
                processed = tmp / "preprocessed.onnx"
                dump_existed = _SYMBOLIC_DUMP.exists()
                try:
                    quant_pre_process(str(prepared), str(processed), skip_symbolic_shape=False)
                except Exception as exc:  # noqa: BLE001
                    # onnxruntime 1.30's symbolic shape inference gives up on the portable target's
                    # standard-op sampler ("Incomplete symbolic shape inference"; 1.32's does not):
                    # ONNX's own shape inference, which quant_pre_process runs as well, is enough.
                    if "symbolic shape" not in str(exc).lower():
                        raise
                    if not dump_existed:
                        _remove_onnx_and_data(_SYMBOLIC_DUMP)
                    quant_pre_process(str(prepared), str(processed), skip_symbolic_shape=True)
                prepared = processed
            quantize_static(
                str(prepared),
                str(quantized),
                CalibrationReader(calibration, input_name),
                quant_format=QuantFormat.QDQ if config.quant_format == "QDQ" else QuantFormat.QOperator,
                activation_type=_quant_type(config.activation_type),
                weight_type=_quant_type(config.weight_type),
                per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                calibrate_method=getattr(CalibrationMethod, config.calibrate_method),
                nodes_to_exclude=excluded,
                **kwargs,
            )
        except StnDeployError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ExportCheckError(f"{source}: int8 quantization failed ({one_line(exc)})") from None
        int8_model = onnx.load(str(quantized))
    if config.quantize_slice_inputs:
        int8_model, rewrites["float_readers_of_quantized_inputs"] = float_readers_read_float(
            int8_model, config.op_types
        )

    evaluate = eval_images if eval_images is not None else calibration
    labels = eval_labels if eval_images is not None else None
    evaluate = np.ascontiguousarray(evaluate, dtype=np.float32)
    fp32_out = _log_probs(_session(str(source), threads), evaluate)
    try:
        int8_out = _log_probs(_session(int8_model.SerializeToString(), threads), evaluate)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
        raise ExportCheckError(f"{source}: the int8 model does not run in onnxruntime ({one_line(exc)})") from None
    fp32_top, int8_top = fp32_out.argmax(1), int8_out.argmax(1)
    report = QuantizationReport(
        source=source,
        output=output,
        config=config.to_dict(),
        calibration_samples=len(calibration),
        eval_samples=len(evaluate),
        fp32_accuracy=float((fp32_top == labels).mean() * 100) if labels is not None else None,
        int8_accuracy=float((int8_top == labels).mean() * 100) if labels is not None else None,
        top1_agreement=float((fp32_top == int8_top).mean() * 100),
        max_abs_diff=float(np.abs(fp32_out - int8_out).max()),
        max_accuracy_drop=max_accuracy_drop,
        eval_source=(eval_source or "the evaluation images") if eval_images is not None else "the calibration images",
        rewrites=rewrites,
        excluded_nodes=excluded,
        op_counts=op_counts(int8_model),
    )
    report.seconds = time.perf_counter() - started
    if not report.passed:
        raise ExportCheckError(
            f"{output}: int8 loses {report.accuracy_drop:.2f} top-1 points "
            f"({'accuracy' if report.labelled else 'disagreement with fp32'}; limit {max_accuracy_drop:.2f}), "
            "not written (raise --max-accuracy-drop to accept it)"
        )

    stamp = {
        **props,
        md.PRECISION: "int8",
        QUANTIZATION: json.dumps(
            {
                k: v
                for k, v in report.to_dict().items()
                if k not in ("source", "output", "written", "op_counts", "seconds")
            },
            sort_keys=True,
        ),
    }
    onnx.helper.set_model_props(int8_model, stamp)
    int8_model.producer_name = model.producer_name or md.PRODUCER_NAME
    int8_model.producer_version = model.producer_version
    int8_model.doc_string = (model.doc_string + " | " if model.doc_string else "") + f"int8 ({config.name})"
    with atomic_path(output) as tmp_path:
        onnx.save(int8_model, str(tmp_path))
    report.written = True
    report.seconds = time.perf_counter() - started
    return report
