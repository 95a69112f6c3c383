"""What an export proved: the named checks, the parity statistics and the graph's op counts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class CheckResult:
    """One named check: passed or not, a one-line message, and its numbers."""

    name: str
    passed: bool
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class OutputDiff:
    """Absolute differences of one output (ONNX Runtime vs PyTorch) over a set of inputs."""

    max_abs: float
    mean_abs: float
    p99_abs: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class ParityStats:
    """Parity of one model file against the PyTorch reference, overall and per input kind.

    ``outputs`` maps each compared output (log_probs, theta, warped) to its differences;
    ``top1_agreement`` is the fraction of inputs whose arg-max class is identical.
    """

    n_inputs: int
    inputs_by_kind: dict[str, int]
    outputs: dict[str, OutputDiff]
    top1_agreement: float
    by_kind: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        return self.outputs["log_probs"].max_abs

    @property
    def mean_abs_diff(self) -> float:
        return self.outputs["log_probs"].mean_abs

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_inputs": self.n_inputs,
            "inputs_by_kind": dict(self.inputs_by_kind),
            "max_abs_diff": self.max_abs_diff,
            "mean_abs_diff": self.mean_abs_diff,
            "top1_agreement": self.top1_agreement,
            "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
            "by_kind": self.by_kind,
            "notes": list(self.notes),
        }


@dataclass
class ExportReport:
    """The result of :func:`stn_deploy.export.export_model`."""

    source: Path
    output: Path
    target: str
    opset: int
    outputs: list[str]
    checks: list[CheckResult] = field(default_factory=list)
    parity: ParityStats | None = None
    optimized_parity: ParityStats | None = None
    op_counts: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    optimized: bool = False
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def check(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "output": str(self.output),
            "target": self.target,
            "opset": self.opset,
            "outputs": list(self.outputs),
            "optimized": self.optimized,
            "passed": self.passed,
            "checks": [c.to_dict() for c in self.checks],
            "parity": self.parity.to_dict() if self.parity else None,
            "optimized_parity": self.optimized_parity.to_dict() if self.optimized_parity else None,
            "op_counts": dict(self.op_counts),
            "metadata": dict(self.metadata),
            "seconds": round(self.seconds, 3),
        }

    def format_table(self) -> str:
        """The human-readable check table ``stn-export`` prints."""
        width = max([len(c.name) for c in self.checks] + [5])
        lines = [f"{self.source} -> {self.output}  (target {self.target}, opset {self.opset})"]
        for c in self.checks:
            status = "PASS" if c.passed else "FAIL"
            lines.append(f"  {c.name:<{width}}  {status}  {c.message}")
        for label, stats in (("parity", self.parity), ("parity (optimized)", self.optimized_parity)):
            if stats is None:
                continue
            kinds = ", ".join(f"{k} {v}" for k, v in stats.inputs_by_kind.items())
            lines.append(
                f"  {label}: max |Δ log-prob| {stats.max_abs_diff:.3g}, mean {stats.mean_abs_diff:.3g}, "
                f"top-1 agreement {stats.top1_agreement:.2%} on {stats.n_inputs} inputs ({kinds})"
            )
            lines.extend(f"    note: {note}" for note in stats.notes)
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.op_counts.items()))
        lines.append(f"  ops: {ops}")
        return "\n".join(lines)
