"""Graph plumbing on ``onnx_ir`` (shipped with onnxscript): the one place the export side walks graphs.

onnx_ir gives each value its producer and consumers, each node its typed attributes, and the
graph a topological sort; this module adds the few questions the rewrites, int8 and fp16 ask:
what constant a value holds, a fresh unique name, a new initializer, the static (C, H, W) of a
4-D value, which nodes make up the θ path, and how many nodes of each type a model has.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_ir as ir


def to_ir(model: onnx.ModelProto) -> ir.Model:
    return ir.from_proto(model)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return ir.to_proto(model)


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The array an initializer holds; None for a computed value (or no value)."""
    if value is None or not value.is_initializer() or value.const_value is None:
        return None
    return value.const_value.numpy()


def unique_name(graph: ir.Graph, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : a name no value of ``graph`` has yet."""
    taken = set(graph.initializers) | {v.name for v in graph.inputs}
    taken |= {v.name for node in graph for v in node.outputs}
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def add_initializer(graph: ir.Graph, array: np.ndarray, base: str) -> ir.Value:
    """A new initializer named after ``base`` (made unique)."""
    name = unique_name(graph, base)
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    return value


def drop_unused_initializers(graph: ir.Graph) -> None:
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]


def forget_shapes(values: Iterable[ir.Value]) -> None:
    """A rewrite changed these values' shapes: drop what the file said about them (no value_info
    is written for them) and let shape inference derive them again."""
    for value in values:
        value.shape, value.type = None, None


def static_chw(model: ir.Model) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of every 4-D value whose non-batch dims shape inference can pin down."""
    inferred = onnx.shape_inference.infer_shapes(ir.to_proto(model))
    shapes: dict[str, tuple[int, int, int]] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info]:
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 4 and all(d.HasField("dim_value") for d in dims[1:]):
            shapes[value.name] = (int(dims[1].dim_value), int(dims[2].dim_value), int(dims[3].dim_value))
    return shapes


def ensure_node_names(graph: ir.Graph) -> None:
    """Give every unnamed node a unique ``<op>_<index>`` name (quantizers select nodes by name)."""
    taken = {node.name for node in graph if node.name}
    for i, node in enumerate(graph):
        if not node.name:
            name = f"{node.op_type.lower()}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def op_counts(model: onnx.ModelProto | ir.Model) -> dict[str, int]:
    """``{op_type: count}`` of the top-level graph (``domain.op`` outside the default domain)."""
    graph = model.graph
    nodes = (
        [(n.op_type, n.domain) for n in graph]
        if isinstance(model, ir.Model)
        else [(n.op_type, n.domain) for n in graph.node]
    )
    counts = Counter(op if domain in ("", "ai.onnx") else f"{domain}.{op}" for op, domain in nodes)
    return dict(sorted(counts.items()))


def theta_path_nodes(graph: ir.Graph) -> list[str]:
    """The θ head's last Gemm/MatMul and every node between it and the sampler's grid input.

    Walks back from each GridSample's grid. A graph without GridSample (the ``portable`` target)
    starts from the Gemms with 6 outputs (θ is 2×3) and walks forward to the first Conv: the
    sampler's standard-op decomposition stays fp32 too.
    """
    names: list[str] = []
    samplers = [n for n in graph if n.op_type == "GridSample"]
    for sampler in samplers:
        frontier, seen = [sampler.inputs[1]], set()
        while frontier:
            value = frontier.pop()
            node = value.producer() if value is not None else None
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            names.append(node.name)
            # The θ head's Linear (Gemm, or MatMul with its weight on the right) ends the walk;
            # the grid's own MatMul has the constant base grid on the left and is walked through.
            if node.op_type == "Gemm" or (node.op_type == "MatMul" and node.inputs[1].is_initializer()):
                continue
            frontier.extend(v for v in node.inputs if v is not None and not v.is_initializer())
    if not samplers:
        for node in graph:
            if node.op_type != "Gemm" or len(node.inputs) < 2 or not node.inputs[1].is_initializer():
                continue
            dims = list(node.inputs[1].const_value.shape)
            if (dims[0] if node.attributes.get_int("transB", 0) else dims[-1]) != 6:
                continue
            names.append(node.name)
            # The sampler is standard ops here: everything fed by θ up to the classifier's
            # first Conv (the grid, the corner indices and weights, the gathers) stays fp32.
            frontier, seen = list(node.outputs), {node.name}
            while frontier:
                for reader in frontier.pop().consumers():
                    if reader.op_type != "Conv" and reader.name not in seen:
                        seen.add(reader.name)
                        names.append(reader.name)
                        frontier.extend(reader.outputs)
    return [n for n in names if n]
