"""Where ONNX Runtime placed each node: a report parsed from its profiler trace.

ONNX Runtime assigns each node of the optimized graph to one provider; a GPU run with compute
nodes left on the CPU pays a copy each way. A session's first (warm-up) run executes with ONNX
Runtime's profiler on: every kernel event in its trace carries ``args.provider``, ``args.op_name``
and the output types. This works on every provider and every onnxruntime version stn-deploy
supports (CPU included, where every node is on ``CPUExecutionProvider``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .providers import CPU, GPU_PROVIDERS, display

# Node events whose outputs are all integer shape tensors: ONNX Runtime deliberately keeps these
# small shape computations on the CPU under GPU providers; they are reported, not failed on.
_INT_TYPES = {"int64", "int32"}


@dataclass
class NodePlacement:
    name: str
    op_type: str
    provider: str
    output_types: tuple[str, ...] = ()

    @property
    def shape_only(self) -> bool:
        """True for a node that only computes integer shape tensors."""
        return bool(self.output_types) and all(t in _INT_TYPES for t in self.output_types)


@dataclass
class PlacementReport:
    """Which node of the optimized graph ran on which execution provider."""

    providers: list[str]
    nodes: list[NodePlacement] = field(default_factory=list)
    method: str = "onnxruntime profiler (args.provider of each kernel event)"

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(n.provider for n in self.nodes))

    @property
    def gpu(self) -> bool:
        return any(p in GPU_PROVIDERS for p in self.providers)

    @property
    def cpu_nodes(self) -> list[NodePlacement]:
        return [n for n in self.nodes if n.provider == CPU]

    @property
    def cpu_fallback(self) -> list[NodePlacement]:
        """Tensor-computing nodes left on the CPU in a GPU run (each one costs copies each way)."""
        if not self.gpu:
            return []
        return [n for n in self.cpu_nodes if not n.shape_only]

    @property
    def copies(self) -> int:
        """Host/device copy nodes ONNX Runtime inserted (MemcpyToHost / MemcpyFromHost)."""
        return sum(1 for n in self.nodes if n.op_type.startswith("Memcpy"))

    def summary(self) -> str:
        parts = ", ".join(f"{display(p)}: {c}" for p, c in sorted(self.counts.items(), key=lambda kv: -kv[1]))
        line = f"{len(self.nodes)} nodes ({parts})"
        if self.gpu:
            fb = self.cpu_fallback
            if fb:
                ops = ", ".join(sorted({n.op_type for n in fb}))
                line += f"; {len(fb)} compute node(s) fell back to CPU: {ops}"
            if self.copies:
                line += f"; {self.copies} host/device copies"
        return line

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "providers": list(self.providers),
            "counts": self.counts,
            "cpu_fallback": [{"name": n.name, "op_type": n.op_type} for n in self.cpu_fallback],
            "copies": self.copies,
            "nodes": [{"name": n.name, "op_type": n.op_type, "provider": n.provider} for n in self.nodes],
        }


def parse_profile(events: list[dict[str, Any]], providers: Sequence[str]) -> PlacementReport:
    """A placement report from an ONNX Runtime profiler trace (the JSON ``end_profiling`` writes)."""
    seen: dict[str, NodePlacement] = {}
    for ev in events:
        args = ev.get("args") or {}
        if ev.get("cat") != "Node" or "provider" not in args:
            continue
        name = str(ev.get("name", ""))
        name = name.removesuffix("_kernel_time").removesuffix("_fence_before").removesuffix("_fence_after")
        if name in seen:
            continue
        types = tuple(next(iter(o)) for o in args.get("output_type_shape", []) if isinstance(o, dict) and o)
        seen[name] = NodePlacement(
            name=name, op_type=str(args.get("op_name", "?")), provider=str(args["provider"]), output_types=types
        )
    return PlacementReport(providers=list(providers), nodes=list(seen.values()))
