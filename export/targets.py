"""Export targets: which form the grid sampler takes, at which opset, for which runtime.

``ort``
    The exporter's own form: ``GridSample`` at opset 20 (GridSample-20, ``mode="linear"``).
    ONNX Runtime's CPU provider runs it natively.
``cuda``
    ``GridSample-16`` (``mode="bilinear"``) at opset 16–19 (default 18). ONNX Runtime's CUDA
    provider registers its GridSample kernel for the ONNX domain as a *versioned* kernel,
    opsets 16 to 19: ``ONNX_OPERATOR_VERSIONED_TYPED_KERNEL_EX(GridSample, kOnnxDomain, 16, 19,
    T, kCudaExecutionProvider, ...)`` in microsoft/onnxruntime
    ``onnxruntime/core/providers/cuda/tensor/grid_sample.cc``. Only newer releases add a
    second, float-only opset-20 registration (``REGISTER_KERNEL_TYPED_20`` in the same file);
    on releases without it an opset-20 model's GridSample falls back to the CPU provider, with
    a device copy each way. The 16–19 form runs on the GPU on every release that has the op.
``portable``
    No GridSample and no AffineGrid node at all: bilinear sampling from Floor/Gather/Where
    (:mod:`stn_deploy.export.sampling`), opset 16–17 (default 17), for runtimes without
    GridSample (opset < 16 runtimes, many NPUs and older TensorRT/OpenVINO/TFLite converters).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx
import onnx.defs

# The lowest opset the dynamo exporter's operator library (onnxscript torchlib) implements.
EXPORTER_MIN_OPSET = 18


@dataclass(frozen=True)
class Target:
    name: str
    default_opset: int
    min_opset: int
    max_opset: int
    portable_sampler: bool
    summary: str

    def resolve_opset(self, opset: int | None) -> int:
        if opset is None:
            return self.default_opset
        if not self.min_opset <= opset <= self.max_opset:
            raise ValueError(
                f"--opset {opset} does not fit target '{self.name}' (opset {self.min_opset}–{self.max_opset})"
            )
        return opset


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("ort", 20, 20, 21, False, "GridSample-20 at opset 20: ONNX Runtime CPU (default)"),
        Target(
            "cuda", 18, 16, 19, False, "GridSample-16 (bilinear) at opset 16-19: the form ONNX Runtime's CUDA EP runs"
        ),
        Target(
            "portable", 17, 16, 17, True, "no GridSample/AffineGrid: bilinear sampling from standard ops, opset <= 17"
        ),
    )
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r} (choose from {', '.join(TARGETS)})") from None


# -- opset bookkeeping ------------------------------------------------------------------------
def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise ValueError("model imports no default-domain opset")


def op_versions(model: onnx.ModelProto) -> Counter:
    """Count of ``(op_type, since_version)`` over the main graph's default-domain nodes."""
    opset = default_opset(model)
    counts: Counter = Counter()
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx"):
            counts[(node.op_type, onnx.defs.get_schema(node.op_type, opset).since_version)] += 1
    return counts


def lower_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Re-declare ``model`` at a lower default opset when that changes no operator's meaning.

    The dynamo exporter emits opset 18 at the lowest; ONNX's version converter has no
    adapters for some ops it leaves behind. But when every operator in the graph resolves to
    the same schema version at ``opset`` as at the current opset, the graph is already a
    valid ``opset`` graph and only the import needs changing. Otherwise a ValueError names the
    operators that changed (their new form would need a real conversion).
    """
    current = default_opset(model)
    if opset >= current:
        return model
    changed = sorted(
        {
            f"{node.op_type} (opset {onnx.defs.get_schema(node.op_type, current).since_version})"
            for node in model.graph.node
            if node.domain in ("", "ai.onnx")
            and _since(node.op_type, opset) != onnx.defs.get_schema(node.op_type, current).since_version
        }
    )
    if changed:
        raise ValueError(f"cannot lower opset {current} to {opset}: {', '.join(changed)} changed after opset {opset}")
    if model.functions:
        raise ValueError(f"cannot lower opset {current} to {opset}: the model has local functions")
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset
    return model


def _since(op_type: str, opset: int) -> int | None:
    try:
        return onnx.defs.get_schema(op_type, opset).since_version
    except onnx.defs.SchemaError:
        return None  # the op does not exist yet at that opset


# -- what each target promises about its graph -------------------------------------------------
def check_target_form(model: onnx.ModelProto, target: Target) -> tuple[bool, str, dict]:
    """(passed, message, details): does the graph have the sampler form ``target`` promises?"""
    opset = default_opset(model)
    samplers = [n for n in model.graph.node if n.op_type == "GridSample"]
    affine = [n for n in model.graph.node if n.op_type == "AffineGrid"]
    forms = Counter(
        f"GridSample-{onnx.defs.get_schema('GridSample', opset).since_version}"
        f"({_attr(n, 'mode', 'bilinear')},{_attr(n, 'padding_mode', 'zeros')},"
        f"align_corners={_attr(n, 'align_corners', 0)})"
        for n in samplers
    )
    details = {
        "opset": opset,
        "grid_sample_nodes": dict(forms),
        "affine_grid_nodes": len(affine),
        "contrib_grid_sample_nodes": sum(1 for n in samplers if n.domain == "com.microsoft"),
    }
    if not target.min_opset <= opset <= target.max_opset:
        return False, f"opset {opset} outside {target.min_opset}-{target.max_opset}", details
    if target.portable_sampler:
        if samplers or affine:
            return False, f"{len(samplers)} GridSample and {len(affine)} AffineGrid nodes left", details
        return True, f"opset {opset}, no GridSample/AffineGrid nodes", details
    if target.name == "cuda":
        bad = [n for n in samplers if not (16 <= opset <= 19 and _attr(n, "mode", "bilinear") == "bilinear")]
        if bad or not samplers:
            return False, f"expected GridSample-16 (bilinear) at opset 16-19, found {dict(forms) or 'none'}", details
        return True, f"{len(samplers)} GridSample-16 (bilinear) at opset {opset}, no GridSample-20", details
    if not samplers and details["contrib_grid_sample_nodes"] == 0:
        return True, f"opset {opset}, no GridSample (model without a transformer)", details
    return True, f"opset {opset}, {', '.join(f'{k} x{v}' for k, v in forms.items())}", details


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default
