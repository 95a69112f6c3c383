"""Two checks that only matter on a GPU, decided on the CPU so they can be tested there.

**TensorRT and GridSample-20.** onnx-tensorrt maps GridSample's ``mode`` by the opset-16 names
only (``bilinear``/``bicubic``); the opset-20 name ``linear`` falls through to nearest-neighbour
sampling with no error (NVIDIA/TensorRT issue 4646, onnx-tensorrt PR 1060). A session whose
provider chain includes TensorRT therefore keeps every GridSample of an opset ≥ 20 graph off
TensorRT (``trt_op_types_to_exclude``): the node runs on the next provider, CUDA, which implements
the opset-20 semantics, and the rest of the graph still gets TensorRT. We exclude rather than
refuse so that ``--provider auto`` keeps working with the default ``ort``-target file; the
session says so once, naming ``--target cuda`` (GridSample-16, which TensorRT maps correctly).

**Device parity at session start.** A GPU kernel that computes something else than the CPU's
(a wrong mode, a bad fp16 cast, a driver bug) gives plausible-looking probabilities. So a
session on a GPU provider runs its warm-up batch on the CPU provider too and compares the
log-probabilities: fp32 models must agree within :data:`FP32_MAX_ABS_DIFF` with identical
top-1; fp16 (and int8) models within :data:`LOW_PRECISION_MAX_ABS_DIFF` over the classes a user
can see, with top-1 identical wherever the CPU's winner leads by more than that bound (two
classes closer than fp16's rounding may swap). A mismatch is a ProviderError naming the
provider and the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .graph_info import GraphInfo

GRIDSAMPLE_MODE_RENAMED_AT = 20  # opset 20 renamed GridSample's modes bilinear→linear, bicubic→cubic
FP32_MAX_ABS_DIFF = 1e-3
# fp16 rounds every activation to ~3 significant digits: the same bound as stn-export's fp16
# gate (stn_deploy.export.precision), over classes with log-prob >= VISIBLE_LOG_PROB. It also
# holds for an fp32 file run with TF32 math (the same 10-bit mantissa, in convolution and matmul
# inputs only) or TensorRT fp16 kernels: every precision but fp32 gets it.
LOW_PRECISION_MAX_ABS_DIFF = 5e-2
VISIBLE_LOG_PROB = -10.0


def tensorrt_excluded_ops(info: GraphInfo) -> tuple[str, ...]:
    """Op types TensorRT must not take in this graph (GridSample at opset ≥ 20)."""
    if info.op_types.get("GridSample") and info.opset >= GRIDSAMPLE_MODE_RENAMED_AT:
        return ("GridSample",)
    return ()


@dataclass(frozen=True)
class DeviceCheck:
    """A GPU provider's log-probabilities against the CPU provider's on the same batch."""

    provider: str
    precision: str
    n_inputs: int
    max_abs_diff: float  # over the compared classes (all for fp32, visible ones otherwise)
    top1_mismatches: int  # mismatches that count (see the module docstring)
    bound: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.bound and self.top1_mismatches == 0  # a NaN fails too

    def describe(self) -> str:
        return (
            f"{self.provider} vs CPUExecutionProvider on {self.n_inputs} inputs ({self.precision}): "
            f"max |Δ log-prob| {self.max_abs_diff:.3g} (bound {self.bound:g}), "
            f"{self.top1_mismatches} top-1 mismatch(es)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "precision": self.precision,
            "n_inputs": self.n_inputs,
            "max_abs_diff": self.max_abs_diff,
            "top1_mismatches": self.top1_mismatches,
            "bound": self.bound,
            "passed": self.passed,
        }


def compare_devices(provider: str, precision: str, device: np.ndarray, cpu: np.ndarray) -> DeviceCheck:
    """Compare log-probabilities [N, classes] from ``provider`` with the CPU provider's."""
    device = np.asarray(device, dtype=np.float64)
    cpu = np.asarray(cpu, dtype=np.float64)
    if device.shape != cpu.shape:
        return DeviceCheck(provider, precision, len(cpu), float("inf"), len(cpu), 0.0)
    diff = np.abs(device - cpu)
    if precision == "fp32":
        bound = FP32_MAX_ABS_DIFF
        max_diff = float(diff.max()) if diff.size else 0.0
        mismatches = int((device.argmax(1) != cpu.argmax(1)).sum())
    else:
        bound = LOW_PRECISION_MAX_ABS_DIFF
        visible = cpu >= VISIBLE_LOG_PROB
        max_diff = float(diff[visible].max()) if visible.any() else 0.0
        picked = device.argmax(1)
        rows = np.arange(len(cpu))
        lead = cpu[rows, cpu.argmax(1)] - cpu[rows, picked]  # how far the CPU's winner is ahead
        mismatches = int(((picked != cpu.argmax(1)) & (lead > bound)).sum())
    if not np.isfinite(device).all():  # a NaN or inf anywhere fails, whatever the class
        max_diff = float("nan")
    return DeviceCheck(provider, precision, len(cpu), max_diff, mismatches, bound)
