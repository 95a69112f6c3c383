"""The structural checks every exported file must pass, each returning a named :class:`CheckResult`.

Parity, the numerical check, lives in :mod:`stn_deploy.export.parity`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.checker
import onnx.shape_inference

from stn_deploy.errors import ModelFileError, one_line
from stn_deploy.fileio import input_file_problem

from .report import CheckResult

BATCH_SIZES = (1, 7, 64)

_DTYPE_NAMES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}


@dataclass(frozen=True)
class TensorSpec:
    """A graph input/output as the source declares it; ``None`` in ``shape`` is the batch dim."""

    name: str
    shape: tuple[int | None, ...]
    dtype: int = onnx.TensorProto.FLOAT

    def describe(self) -> str:
        dims = ", ".join("batch" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {_DTYPE_NAMES.get(self.dtype, self.dtype)}[{dims}]"


def load_onnx(path: Path, *, load_external_data: bool = True) -> onnx.ModelProto:
    """The ONNX model in ``path``; a missing or undecodable file is a one-line :class:`ModelFileError`."""
    if problem := input_file_problem(path, missing="no such model file", directory="is a directory, not an ONNX file"):
        raise ModelFileError(f"{path}: {problem}")
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # noqa: BLE001 - any decode failure means "not an ONNX model"
        raise ModelFileError(f"{path}: not an ONNX model ({type(exc).__name__})") from None


def run_check(name: str, fn, *args, **kwargs) -> CheckResult:
    """Run ``fn`` → (passed, message, details); an exception is a failed check, not a crash."""
    try:
        passed, message, details = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure inside a check is that check failing
        return CheckResult(name, False, one_line(exc))
    return CheckResult(name, bool(passed), message, details)


def onnx_checker(path: Path) -> tuple[bool, str, dict]:
    """``onnx.checker.check_model(full_check=True)``: schema, graph and shape-inference checks."""
    onnx.checker.check_model(str(path), full_check=True)
    return True, "onnx.checker full check", {}


def strict_shape_inference(model: onnx.ModelProto) -> tuple[bool, str, dict]:
    """Strict shape inference with data propagation; every value a node produces must be typed."""
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    graph = inferred.graph
    known = {v.name: v for v in [*graph.value_info, *graph.output, *graph.input]}
    produced = [out for node in graph.node for out in node.output if out]
    untyped = []
    for name in produced:
        info = known.get(name)
        if info is None or not info.type.HasField("tensor_type"):
            untyped.append(name)
            continue
        tensor = info.type.tensor_type
        if tensor.elem_type == onnx.TensorProto.UNDEFINED or not tensor.HasField("shape"):
            untyped.append(name)
    details = {"values": len(produced), "untyped": untyped[:20], "n_untyped": len(untyped)}
    if untyped:
        return False, f"{len(untyped)} of {len(produced)} values untyped (e.g. {', '.join(untyped[:3])})", details
    return True, f"all {len(produced)} intermediate values typed (strict, data_prop)", details


def graph_signature(
    model: onnx.ModelProto, inputs: list[TensorSpec], outputs: list[TensorSpec]
) -> tuple[bool, str, dict]:
    """Graph inputs/outputs match the declared names, dtypes and shapes, with one symbolic batch dim."""
    problems: list[str] = []
    batch_params: set[str] = set()
    actual = {"inputs": [], "outputs": []}
    for kind, declared, values in (("input", inputs, model.graph.input), ("output", outputs, model.graph.output)):
        names = [v.name for v in values]
        if names != [s.name for s in declared]:
            problems.append(f"{kind}s {names} != {[s.name for s in declared]}")
            continue
        for spec, value in zip(declared, values, strict=True):
            tensor = value.type.tensor_type
            dims = []
            for d in tensor.shape.dim:
                dims.append(
                    d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
                )
            actual[f"{kind}s"].append({"name": value.name, "dtype": int(tensor.elem_type), "shape": dims})
            if tensor.elem_type != spec.dtype:
                problems.append(f"{spec.name} dtype {tensor.elem_type} != {spec.dtype}")
            if len(dims) != len(spec.shape):
                problems.append(f"{spec.name} rank {len(dims)} != {len(spec.shape)}")
                continue
            for i, (got, want) in enumerate(zip(dims, spec.shape, strict=True)):
                if want is None:
                    if not isinstance(got, str) or got == "?":
                        problems.append(f"{spec.name} dim {i} is {got}, expected a symbolic batch")
                    else:
                        batch_params.add(got)
                elif got != want:
                    problems.append(f"{spec.name} dim {i} is {got}, expected {want}")
    if len(batch_params) > 1:
        problems.append(f"batch dims disagree: {sorted(batch_params)}")
    details = {"declared": [s.describe() for s in [*inputs, *outputs]], "actual": actual}
    if problems:
        return False, "; ".join(problems), details
    return True, "; ".join(s.describe() for s in [*inputs, *outputs]), details


def batch_sizes(
    session, input_spec: TensorSpec, outputs: list[TensorSpec], sizes=BATCH_SIZES
) -> tuple[bool, str, dict]:
    """An ONNX Runtime CPU session runs at each batch size with the declared output shapes."""
    rng = np.random.default_rng(0)
    problems: list[str] = []
    shapes: dict[str, dict[str, list[int]]] = {}
    names = [o.name for o in outputs]
    for n in sizes:
        x = rng.standard_normal((n, *input_spec.shape[1:]), dtype=np.float32)
        results = session.run(names, {input_spec.name: x})
        shapes[str(n)] = {}
        for spec, value in zip(outputs, results, strict=True):
            want = tuple(n if d is None else d for d in spec.shape)
            shapes[str(n)][spec.name] = list(value.shape)
            if tuple(value.shape) != want:
                problems.append(f"batch {n}: {spec.name} {tuple(value.shape)} != {want}")
            if value.dtype != np.float32:
                problems.append(f"batch {n}: {spec.name} dtype {value.dtype}")
            if not np.isfinite(value).all():
                problems.append(f"batch {n}: {spec.name} has non-finite values")
    if problems:
        return False, "; ".join(problems), {"shapes": shapes}
    return True, f"batch sizes {', '.join(map(str, sizes))} give the declared shapes", {"shapes": shapes}
