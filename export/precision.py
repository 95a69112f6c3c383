"""fp16: a half-precision copy of a verified fp32 export, for GPU targets (CUDA, TensorRT).

What stays fp32, and why:

* the graph input ``image`` and every output (``keep_io_types``): callers keep feeding float32
  and reading float32; the casts sit inside the graph where the GPU does them;
* the θ path — the θ head's last Linear, the affine-grid math and GridSample: a sampling
  coordinate carries fp16's 11-bit mantissa (about 5e-4 near ±1, under 1% of a pixel at 32×32
  but a full pixel at 2048 wide), and these nodes cost nothing next to the convolutions;
* LogSoftmax: the reduction over classes is [N, classes]; in fp32 small log-probabilities keep
  their digits.

Parity bounds for fp16 (:data:`FP16_MAX_ABS_DIFF`, :data:`FP16_MIN_TOP1_AGREEMENT`): fp16 rounds
every activation to ~3 significant digits, so the fp32 bar (1e-4, identical top-1) does not
apply. We require max |Δ log-prob| ≤ 5e-2 over classes whose fp32 log-prob is ≥ -10 (the
classes a user can see; below that, a probability under 5e-5 is reported with a relative
error, not an absolute one) and top-1 agreement ≥ 99% against the fp32 model.

On a CPU-only machine the check runs the fp16 graph with ``onnx.reference.ReferenceEvaluator``
(numpy, exact fp16 semantics) on a small set of inputs, so what is checked is the graph, not one
CPU's fp16 kernels; on a GPU machine it runs the CUDA provider on all of them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from stn_deploy import metadata as md
from stn_deploy.errors import ExportCheckError
from stn_deploy.fileio import atomic_path
from stn_deploy.runtime import CUDA, available_providers, create_session, session_options

from .checks import load_onnx
from .graph import ensure_node_names, theta_path_nodes, to_ir, to_proto

FP16_MAX_ABS_DIFF = 5e-2
FP16_MIN_TOP1_AGREEMENT = 99.0
FP16_VISIBLE_LOG_PROB = -10.0
FP32_OPS = ("GridSample", "AffineGrid", "LogSoftmax")


@dataclass
class Fp16Report:
    source: Path
    output: Path
    checked_with: str
    n_inputs: int
    max_abs_diff: float  # over visible classes (fp32 log-prob >= FP16_VISIBLE_LOG_PROB)
    max_abs_diff_all: float
    top1_agreement: float
    fp32_nodes: list[str] = field(default_factory=list)
    written: bool = False
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= FP16_MAX_ABS_DIFF and self.top1_agreement >= FP16_MIN_TOP1_AGREEMENT

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "output": str(self.output),
            "written": self.written,
            "checked_with": self.checked_with,
            "n_inputs": self.n_inputs,
            "max_abs_diff": self.max_abs_diff,
            "max_abs_diff_all_classes": self.max_abs_diff_all,
            "top1_agreement": self.top1_agreement,
            "passed": self.passed,
            "bounds": {
                "max_abs_diff": FP16_MAX_ABS_DIFF,
                "over_log_prob_at_least": FP16_VISIBLE_LOG_PROB,
                "min_top1_agreement": FP16_MIN_TOP1_AGREEMENT,
            },
            "fp32_nodes": self.fp32_nodes,
            "seconds": round(self.seconds, 2),
        }

    def format_table(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"fp16: {self.source} -> {self.output}\n"
            f"  parity {verdict}  max |Δ log-prob| {self.max_abs_diff:.3g} (bound {FP16_MAX_ABS_DIFF:g}, classes with "
            f"log-prob >= {FP16_VISIBLE_LOG_PROB:g}; all classes {self.max_abs_diff_all:.3g}), top-1 agreement "
            f"{self.top1_agreement:.2f}% (bound {FP16_MIN_TOP1_AGREEMENT:g}%) on {self.n_inputs} inputs "
            f"({self.checked_with})\n"
            f"  fp32 kept: {', '.join(self.fp32_nodes) or 'none'}"
        )


def to_fp16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The fp16 graph (fp32 I/O) and the names of the nodes kept in fp32."""
    from onnxruntime.transformers.float16 import (  # onnxruntime's converter: imported only for this step
        DEFAULT_OP_BLOCK_LIST,
        convert_float_to_float16,
    )

    graph_model = to_ir(model)
    ensure_node_names(graph_model.graph)  # the converter keeps nodes in fp32 by name
    keep = theta_path_nodes(graph_model.graph) + [n.name for n in graph_model.graph if n.op_type in FP32_OPS]
    named = to_proto(graph_model)
    props = {p.key: p.value for p in model.metadata_props}
    converted = convert_float_to_float16(
        named, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP32_OPS), node_block_list=keep
    )
    converted = to_ir(converted)
    _skip_fp16_round_trips(converted.graph)
    converted.graph.sort()  # the converter appends its Cast nodes at the end
    # The converter's value_info keeps some fp32 types (and types initializers it left fp32 as
    # fp16): forget every intermediate type; shape inference re-derives them from the graph.
    values = [*converted.graph.initializers.values(), *(v for node in converted.graph for v in node.outputs)]
    for value in values:
        if not value.is_graph_output() and not value.is_graph_input():
            value.shape, value.type = None, None
    result = to_proto(converted)
    onnx.helper.set_model_props(result, {**props, md.PRECISION: "fp16"})
    return result, sorted(set(keep))


def _skip_fp16_round_trips(graph: ir.Graph) -> None:
    """Between two fp32 nodes the converter inserts Cast(fp16) → Cast(fp32), which rounds the
    tensor to fp16 on its way (the image into GridSample, θ, the grid, the log-probs). Point each
    such Cast(fp32) at the fp32 tensor itself, and drop the Cast(fp16) where nothing else reads it."""

    def cast_to(node: ir.Node | None) -> int | None:
        return node.attributes.get_int("to") if node is not None and node.op_type == "Cast" else None

    for node in list(graph):
        first = node.inputs[0].producer() if node.op_type == "Cast" else None
        if cast_to(node) == onnx.TensorProto.FLOAT and cast_to(first) == onnx.TensorProto.FLOAT16:
            node.replace_input_with(0, first.inputs[0])  # an fp32 → fp32 Cast: the value passes unrounded
    for node in list(graph):
        if (
            cast_to(node) == onnx.TensorProto.FLOAT16
            and not node.outputs[0].uses()
            and not node.outputs[0].is_graph_output()
        ):
            graph.remove(node, safe=True)


def _run(model_or_path, images: np.ndarray, provider: str) -> np.ndarray:
    if provider == "reference":
        ref = _reference_evaluator(model_or_path)
        return np.concatenate(
            [ref.run([md.LOG_PROBS], {md.INPUT: images[i : i + 8]})[0] for i in range(0, len(images), 8)]
        )
    data = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    session = create_session(data, session_options(), [(provider, {})])
    return session.run([md.LOG_PROBS], {md.INPUT: images})[0]


def _reference_evaluator(model):
    """``onnx.reference.ReferenceEvaluator`` for ``model``, reading GridSample-16's mode names too.

    Opset 20 renamed GridSample's modes (``bilinear`` → ``linear``, ``bicubic`` → ``cubic``) and
    onnx's reference implementation only knows the new names; the ``cuda`` target is opset 16-19.
    The sampling is the same, so the old names are mapped onto the new ones.
    """
    from onnx.reference import ReferenceEvaluator  # onnx's numpy evaluator: the CPU fp16 check only
    from onnx.reference.ops.op_grid_sample import GridSample as ReferenceGridSample

    class GridSample(ReferenceGridSample):  # the evaluator finds an op's class by its name
        op_domain = ""

        def _run(self, X, grid, align_corners=None, mode=None, padding_mode=None):  # noqa: N803 - onnx's names
            mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
            return super()._run(X, grid, align_corners=align_corners, mode=mode, padding_mode=padding_mode)

    return ReferenceEvaluator(model, new_ops=[GridSample])


def convert_fp16(
    fp32_onnx_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    check_inputs: np.ndarray,
    *,
    provider: str | None = None,
    reference_inputs: int = 16,
) -> Fp16Report:
    """Write the fp16 model only if it meets the fp16 parity bounds against the fp32 file.

    ``check_inputs``: preprocessed images [N, C, H, W]. ``provider``: ``CUDAExecutionProvider``
    where available (all inputs), else the ONNX reference evaluator on the first
    ``reference_inputs``. Raises :class:`ExportCheckError` (nothing written) on failure.
    """
    started = time.perf_counter()
    source, output = Path(fp32_onnx_path), Path(output_path)
    fp32 = load_onnx(source)
    fp16, kept = to_fp16(fp32)
    try:
        onnx.checker.check_model(fp16, full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise ExportCheckError(
            f"{output}: check 'fp16_onnx_checker' failed: {' '.join(str(exc).split())[:300]}"
        ) from None

    if provider is None:
        provider = CUDA if CUDA in available_providers() else "reference"
    images = np.ascontiguousarray(
        check_inputs if provider != "reference" else check_inputs[:reference_inputs], dtype=np.float32
    )
    want = _run(str(source), images, "CPUExecutionProvider")
    got = _run(fp16, images, provider).astype(np.float32)
    diff = np.abs(got - want)
    visible = want >= FP16_VISIBLE_LOG_PROB
    report = Fp16Report(
        source=source,
        output=output,
        checked_with="onnx.reference.ReferenceEvaluator" if provider == "reference" else provider,
        n_inputs=len(images),
        max_abs_diff=float(diff[visible].max()) if visible.any() else 0.0,
        max_abs_diff_all=float(diff.max()),
        top1_agreement=float((got.argmax(1) == want.argmax(1)).mean() * 100),
        fp32_nodes=kept,
    )
    report.seconds = time.perf_counter() - started
    if not report.passed:
        raise ExportCheckError(
            f"{output}: check 'fp16_parity' failed: max |Δ log-prob| {report.max_abs_diff:.3g} (bound "
            f"{FP16_MAX_ABS_DIFF:g}), "
            f"top-1 agreement {report.top1_agreement:.1f}% (bound {FP16_MIN_TOP1_AGREEMENT:g}%) (no file written)"
        )
    with atomic_path(output) as tmp:
        onnx.save(fp16, str(tmp))
    report.written = True
    report.seconds = time.perf_counter() - started
    return report
