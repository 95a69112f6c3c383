"""The Linear layer whose output is θ, found by name in a model or a torch.export program.

The extreme-θ parity probes (:mod:`.parity`) replace that layer's weight and bias: in ONNX Runtime
through the two ONNX initializers of the same names, in PyTorch on the same module. A stn-deploy
checkpoint names it (``fc_loc``'s last Linear); for a user's ``.pt2`` archive it is found by
walking back from ``grid_sample``'s grid argument to the first Linear.
"""

from __future__ import annotations

from dataclasses import dataclass

_TRANSPOSES = ("aten.t.default", "aten.permute.default", "aten.transpose.int")


@dataclass(frozen=True)
class ThetaHead:
    """Names of the Linear layer that outputs θ (6 features) in the model and the ONNX graph."""

    weight: str
    bias: str


def find_theta_head(program) -> ThetaHead | None:
    """Walk back from the first grid_sample call in an ExportedProgram to the Linear that makes θ."""
    graph = program.graph
    params = program.graph_signature.inputs_to_parameters
    samplers = [n for n in graph.nodes if n.op == "call_function" and "grid_sampler" in str(n.target)]
    if not samplers:
        return None
    seen: set = set()
    frontier = [samplers[0].args[1]]  # the grid
    while frontier:
        node = frontier.pop(0)
        if not hasattr(node, "op") or node in seen:
            continue
        seen.add(node)
        if node.op == "call_function" and str(node.target) in ("aten.linear.default", "aten.addmm.default"):
            if str(node.target) == "aten.linear.default" and len(node.args) >= 3:
                weight, bias = node.args[1], node.args[2]
            else:
                bias, weight = node.args[0], node.args[2]
                if getattr(weight, "op", None) == "call_function" and str(weight.target) in _TRANSPOSES:
                    weight = weight.args[0]  # core ATen: addmm(bias, x, t(weight))
            w_name, b_name = params.get(getattr(weight, "name", "")), params.get(getattr(bias, "name", ""))
            if w_name and b_name:
                return ThetaHead(w_name, b_name)
            return None
        for arg in node.all_input_nodes:
            frontier.append(arg)
    return None
