"""Exact-math graph rewrites that make the exported STN cheaper to run, in fp32 and int8 alike.

Each rewrite is a small named :class:`Rule` on an ``onnx_ir`` graph (:mod:`.graph` has the
plumbing). Each changes how a result is computed, never what it is (up to float summation order):

``relu_before_maxpool``
    ``Conv → MaxPool → Relu`` becomes ``Conv → Relu → MaxPool``. ReLU is monotonic, so
    ``relu(max(a, b)) == max(relu(a), relu(b))`` exactly. ONNX Runtime then fuses Conv+ReLU (fp32)
    and a quantized Conv's output clamp absorbs the ReLU (int8).
``affine_grid_as_matmul``
    The exporter builds the affine grid as ``ReduceSum(base[HW,3,1] * θᵀ[N,1,3,2], axis=-2)``: a
    [N, H·W, 3, 2] temporary for a 3-term dot product per grid point. ``MatMul(base[HW,3],
    θᵀ[N,3,2])`` computes the same sums without the temporary.
``crop_unpooled_conv_input``
    A valid stride-1 Conv followed by [Relu and] a floor-mode MaxPool with stride s never has its
    last ``H_out mod s`` output rows/columns read. Slicing the Conv's *input* to the rows the pool
    reads skips computing them (the localization network's second conv: 9×9 → 8×8 outputs, 21%
    of its multiply-adds).
``crop_through_pool``
    Such a crop of a pooled conv output moves up to that conv's input: the localization network's
    first conv then computes the 24×24 outputs its pool and the cropped second conv read, not
    26×26 (15% of its multiply-adds).

Not part of :data:`EXACT_RULES` (they help only the int8 graph, see benchmarks/INT8.md):

``unfold_conv_rows``
    A valid stride-1 ``Conv`` with few input channels (the RGB convs: C_in = 3, K×K kernel) becomes
    ``Concat`` of K row-shifted ``Slice`` copies of its input (C·K channels, zero-weight copies pad
    them to a multiple of 4) and a 1×K ``Conv``. Every output is the same sum of the same products,
    in another order. ONNX Runtime's symmetric uint8×int8 conv kernel needs C_in % 4 == 0; the
    unfolded conv qualifies. In fp32 it is slower (the NCHWc conv already handles C_in = 3 well),
    so only quantization applies it.
``pad_conv_input_channels``
    Zero-pads a Conv's input channels to a multiple of 4, the layout ONNX Runtime's symmetric int8
    conv kernel requires (slower than ``unfold_conv_rows``; no configuration uses it: it is kept,
    and tested, for the comparison in benchmarks/INT8.md).

:func:`apply_rules` takes and returns an ``onnx.ModelProto`` with the number of places each rule
changed; a rule whose pattern is absent (a user's own ``.pt2`` model, say) changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.convenience import replace_nodes_and_values

from .graph import (
    add_initializer,
    constant,
    drop_unused_initializers,
    forget_shapes,
    static_chw,
    to_ir,
    to_proto,
    unique_name,
)


@dataclass(frozen=True)
class Rule:
    """A named rewrite: ``apply(model)`` edits the onnx_ir model and returns the places it changed;
    ``pattern`` says what it looks for (the reason given when a graph has none)."""

    name: str
    apply: Callable[[ir.Model], int]
    pattern: str = ""


class Rewritten(NamedTuple):
    model: onnx.ModelProto
    counts: dict[str, int]  # rule name -> places changed
    skipped: dict[str, str]  # rule name -> why it changed nothing


def apply_rules(model: onnx.ModelProto, rules: Sequence[Rule]) -> Rewritten:
    """The model with ``rules`` applied in order, the places each changed, and why others changed nothing.

    A rule that fails on a graph it was not written for (a user's own ``.pt2`` model, say) is
    skipped with the error as its reason; the graph goes on to the next rule as it was before.
    """
    counts: dict[str, int] = {}
    skipped: dict[str, str] = {}
    for rule in rules:
        graph_model = to_ir(model)
        try:
            counts[rule.name] = rule.apply(graph_model)
        except Exception as exc:  # noqa: BLE001 - an unexpected graph skips the rule, not the export
            counts[rule.name] = 0
            skipped[rule.name] = f"failed on this graph ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
            continue
        if counts[rule.name]:
            model = to_proto(graph_model)
        else:
            skipped[rule.name] = f"no {rule.pattern} in this graph" if rule.pattern else "nothing to rewrite"
    return Rewritten(model, counts, skipped)


def rewrite_exact(model: onnx.ModelProto) -> Rewritten:
    """Every exact rule (:data:`EXACT_RULES`) in order."""
    return apply_rules(model, EXACT_RULES)


# -- conditions the rules share -----------------------------------------------------------------
_NO_AUTO_PAD = ("NOTSET", "VALID")


def _unpadded_unit_stride(conv: ir.Node) -> bool:
    """No padding, stride 1, dilation 1: each output row/column reads ``kernel`` input rows/columns."""
    a = conv.attributes
    return (
        not any(a.get_ints("pads", [0, 0, 0, 0]))
        and all(v == 1 for v in a.get_ints("strides", [1, 1]))
        and all(v == 1 for v in a.get_ints("dilations", [1, 1]))
        and a.get_string("auto_pad", "NOTSET") in _NO_AUTO_PAD
    )


def _floor_unpadded_pool(pool: ir.Node) -> bool:
    """A MaxPool in floor mode with no padding or dilation (it may skip trailing rows/columns)."""
    a = pool.attributes
    return (
        not a.get_int("ceil_mode", 0)
        and not any(a.get_ints("pads", [0, 0, 0, 0]))
        and all(v == 1 for v in a.get_ints("dilations", [1, 1]))
        and a.get_string("auto_pad", "NOTSET") in _NO_AUTO_PAD
    )


def _only_reader(value: ir.Value) -> ir.Node | None:
    """The one node that reads ``value`` (None when several do, or it is a graph output)."""
    readers = value.consumers()
    return readers[0] if len(readers) == 1 and len(value.uses()) == 1 and not value.is_graph_output() else None


def _copy_attributes(node: ir.Node, drop: Sequence[str] = ()) -> list[ir.Attr]:
    return [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values() if a.name not in drop]


def _slice(graph: ir.Graph, source: ir.Value, starts, ends, axes, name: str, prefix: str, out: str) -> ir.Node:
    """``Slice(source, starts, ends, axes)`` with its three index initializers named ``prefix_<part>``."""
    parts = [
        add_initializer(graph, np.asarray(v, dtype=np.int64), f"{prefix}_{part}")
        for part, v in (("starts", starts), ("ends", ends), ("axes", axes))
    ]
    return ir.Node("", "Slice", [source, *parts], outputs=[ir.Value(name=unique_name(graph, out))], name=name)


def _crop_conv_input(graph: ir.Graph, conv: ir.Node, height: int, width: int) -> None:
    """Make ``conv`` read only the top-left ``height`` × ``width`` of its input (a Slice before it)."""
    source = conv.inputs[0]
    crop = _slice(
        graph,
        source,
        [0, 0],
        [height, width],
        [2, 3],
        f"{conv.name}_crop",
        f"{conv.name}_crop",
        f"{source.name}_crop{height}x{width}",
    )
    graph.insert_before(conv, crop)
    conv.replace_input_with(0, crop.outputs[0])


# -- exact rules ---------------------------------------------------------------------------------
def _relu_before_maxpool(model: ir.Model) -> int:
    """``MaxPool → Relu`` → ``Relu → MaxPool`` (exact: ReLU is monotonic)."""
    graph = model.graph
    count = 0
    for relu in list(graph):
        if relu.op_type != "Relu":
            continue
        pool = relu.inputs[0].producer()
        if pool is None or pool.op_type != "MaxPool" or len(pool.outputs) != 1 or _only_reader(pool.outputs[0]) is None:
            continue
        source = pool.inputs[0]
        rectified = ir.Value(name=unique_name(graph, f"{source.name}_relu"))
        new_relu = ir.Node("", "Relu", [source], outputs=[rectified], name=relu.name)
        new_pool = ir.Node("", "MaxPool", [rectified], _copy_attributes(pool), outputs=[ir.Value()], name=pool.name)
        replace_nodes_and_values(graph, relu, [pool, relu], [new_relu, new_pool], [relu.outputs[0]], new_pool.outputs)
        count += 1
    if count:
        graph.sort()
    return count


def _affine_grid_as_matmul(model: ir.Model) -> int:
    """``ReduceSum(Mul(base[HW,3,1], Unsqueeze(θᵀ)), axes=[-2])`` → ``MatMul(base[HW,3], θᵀ)``."""
    graph = model.graph
    count = 0
    for reduce in list(graph):
        if reduce.op_type != "ReduceSum" or reduce.attributes.get_int("keepdims", 1) != 0 or len(reduce.inputs) < 2:
            continue
        axes = constant(reduce.inputs[1])
        mul = reduce.inputs[0].producer()
        if axes is None or axes.tolist() not in ([-2], [2]) or mul is None or mul.op_type != "Mul":
            continue
        if _only_reader(mul.outputs[0]) is not reduce:
            continue
        bases = [(i, constant(v)) for i, v in enumerate(mul.inputs) if constant(v) is not None]
        if len(bases) != 1:
            continue
        base_index, base = bases[0]
        if base.ndim != 3 or base.shape[1:] != (3, 1):
            continue
        unsqueeze = mul.inputs[1 - base_index].producer()
        if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or len(unsqueeze.inputs) < 2:
            continue
        unsq_axes = constant(unsqueeze.inputs[1])
        if unsq_axes is None or unsq_axes.tolist() != [1]:
            continue
        matrix = add_initializer(graph, base[:, :, 0], f"{mul.inputs[base_index].name}_matrix")
        matmul = ir.Node(
            "", "MatMul", [matrix, unsqueeze.inputs[0]], outputs=[ir.Value()], name=f"{reduce.name}_as_matmul"
        )
        old = [reduce, mul] + ([unsqueeze] if _only_reader(unsqueeze.outputs[0]) is mul else [])
        replace_nodes_and_values(graph, reduce, old, [matmul], [reduce.outputs[0]], matmul.outputs)
        count += 1
    if count:
        drop_unused_initializers(graph)
        graph.sort()
    return count


def _crop_unpooled_conv_input(model: ir.Model) -> int:
    """Slice a Conv's input so it computes only the output rows/cols the following MaxPool reads."""
    graph = model.graph
    shapes = static_chw(model)
    count = 0
    for conv in list(graph):
        if conv.op_type != "Conv" or len(conv.inputs) < 2 or conv.inputs[0].name not in shapes:
            continue
        weight = constant(conv.inputs[1])
        if weight is None or weight.ndim != 4 or not _unpadded_unit_stride(conv):
            continue
        chain = [conv]
        reader = _only_reader(conv.outputs[0])
        if reader is not None and reader.op_type == "Relu":
            chain.append(reader)
            reader = _only_reader(reader.outputs[0])
        if reader is None or reader.op_type != "MaxPool" or not _floor_unpadded_pool(reader):
            continue
        pool = reader
        kernel, strides = pool.attributes.get_ints("kernel_shape"), pool.attributes.get_ints("strides", [1, 1])
        _, height, width = shapes[conv.inputs[0].name]
        kh, kw = weight.shape[2:]
        out_h, out_w = height - kh + 1, width - kw + 1
        read_h = (out_h - kernel[0]) // strides[0] * strides[0] + kernel[0]
        read_w = (out_w - kernel[1]) // strides[1] * strides[1] + kernel[1]
        if (read_h, read_w) == (out_h, out_w) or read_h <= 0 or read_w <= 0:
            continue
        _crop_conv_input(graph, conv, read_h + kh - 1, read_w + kw - 1)
        forget_shapes(n.outputs[0] for n in chain)
        count += 1
    if count:
        graph.sort()
    return count


def _crop_through_pool(model: ir.Model) -> int:
    """Move an origin-anchored spatial ``Slice`` of a pooled conv output to the conv's input.

    ``Conv → [Relu →] MaxPool → Slice[:, :, :h, :w]`` reads only the first ``(h-1)·s + k`` pool
    input rows (floor mode, no padding), which a valid stride-1 Conv computes from its first
    ``(h-1)·s + k + K - 1`` input rows. Slicing the Conv's input to those rows makes the pool's
    output exactly ``h × w``, so the original Slice is dropped. (After ``crop_unpooled_conv_input``
    the localization net's second conv reads 12×12 of the first pool's 13×13 output, so its first
    conv reads 30×30 of the 32×32 image and computes 24×24 instead of 26×26 outputs.)
    """
    graph = model.graph
    shapes = static_chw(model)
    count = 0
    for crop in list(graph):
        if crop.op_type != "Slice" or len(crop.inputs) < 4:
            continue
        starts, ends, axes = (constant(v) for v in crop.inputs[1:4])
        steps = constant(crop.inputs[4]) if len(crop.inputs) > 4 and crop.inputs[4] is not None else None
        if starts is None or ends is None or axes is None or sorted(axes.tolist()) != [2, 3] or any(starts.tolist()):
            continue
        if steps is not None and any(v != 1 for v in steps.tolist()):
            continue
        pool = crop.inputs[0].producer()
        if (
            pool is None
            or pool.op_type != "MaxPool"
            or len(pool.outputs) != 1
            or _only_reader(pool.outputs[0]) is not crop
        ):
            continue
        if not _floor_unpadded_pool(pool):
            continue
        chain = [pool]
        node = pool.inputs[0].producer()
        if node is not None and node.op_type == "Relu" and _only_reader(node.outputs[0]) is not None:
            chain.append(node)
            node = node.inputs[0].producer()
        conv = node
        if conv is None or conv.op_type != "Conv" or _only_reader(conv.outputs[0]) is None:
            continue
        if conv.inputs[0].name not in shapes:
            continue
        weight = constant(conv.inputs[1])
        if weight is None or weight.ndim != 4 or not _unpadded_unit_stride(conv):
            continue
        _, height, width = shapes[conv.inputs[0].name]
        kernel, strides = pool.attributes.get_ints("kernel_shape"), pool.attributes.get_ints("strides", [1, 1])
        pooled_h = (height - weight.shape[2] + 1 - kernel[0]) // strides[0] + 1
        pooled_w = (width - weight.shape[3] + 1 - kernel[1]) // strides[1] + 1
        want = dict(zip(axes.tolist(), ends.tolist()))
        h, w = min(want[2], pooled_h), min(want[3], pooled_w)
        if (h, w) == (pooled_h, pooled_w) or h <= 0 or w <= 0:
            continue
        in_h = (h - 1) * strides[0] + kernel[0] + weight.shape[2] - 1
        in_w = (w - 1) * strides[1] + kernel[1] + weight.shape[3] - 1
        _crop_conv_input(graph, conv, in_h, in_w)
        # The pool now yields exactly h × w: its readers take its output in place of the Slice's.
        forget_shapes([crop.outputs[0], conv.outputs[0], *(n.outputs[0] for n in chain)])
        sliced = crop.outputs[0]
        was_output, sliced_name = sliced.is_graph_output(), sliced.name
        ir.convenience.replace_all_uses_with(sliced, pool.outputs[0], replace_graph_outputs=True)
        graph.remove(crop, safe=True)
        if was_output:  # the graph's output keeps its name
            pool.outputs[0].name = sliced_name
        count += 1
    if count:
        drop_unused_initializers(graph)
        graph.sort()
    return count


EXACT_RULES = (
    Rule("relu_before_maxpool", _relu_before_maxpool, "Relu after a MaxPool that nothing else reads"),
    Rule("affine_grid_as_matmul", _affine_grid_as_matmul, "affine grid as ReduceSum(Mul(base grid, Unsqueeze(θᵀ)))"),
    Rule(
        "crop_unpooled_conv_input", _crop_unpooled_conv_input, "plain Conv whose floor-mode MaxPool leaves rows unread"
    ),
    Rule("crop_through_pool", _crop_through_pool, "origin-anchored Slice of a pooled plain Conv's output"),
)


# -- int8-only rules -------------------------------------------------------------------------------
def pad_conv_input_channels(multiple: int = 4, nodes: set[str] | None = None) -> Rule:
    """Zero-pad the input channels (and weights) of Convs whose C_in is not a multiple of ``multiple``."""

    def apply(model: ir.Model) -> int:
        graph = model.graph
        count = 0
        for conv in list(graph):
            if conv.op_type != "Conv" or (nodes is not None and conv.name not in nodes):
                continue
            if conv.attributes.get_int("group", 1) != 1:
                continue
            weight = constant(conv.inputs[1])
            if weight is None or weight.shape[1] % multiple == 0:
                continue
            extra = multiple - weight.shape[1] % multiple
            padded_w = np.concatenate(
                [weight, np.zeros((weight.shape[0], extra, *weight.shape[2:]), weight.dtype)], axis=1
            )
            w_value = add_initializer(graph, padded_w, f"{conv.inputs[1].name}_padded")
            pads = np.zeros(2 * weight.ndim, dtype=np.int64)
            pads[weight.ndim + 1] = extra
            p_value = add_initializer(graph, pads, f"{conv.name}_channel_pads")
            padded = ir.Value(name=unique_name(graph, f"{conv.inputs[0].name}_padded{weight.shape[1] + extra}ch"))
            pad = ir.Node(
                "",
                "Pad",
                [conv.inputs[0], p_value],
                [ir.AttrString("mode", "constant")],
                outputs=[padded],
                name=f"{conv.name}_pad_channels",
            )
            graph.insert_before(conv, pad)
            conv.replace_input_with(0, padded)
            conv.replace_input_with(1, w_value)
            count += 1
        if count:
            drop_unused_initializers(graph)
            graph.sort()
        return count

    return Rule("pad_conv_input_channels", apply, f"group-1 Conv whose input channels are not a multiple of {multiple}")


def unfold_conv_rows(max_input_channels: int = 4, multiple: int = 4) -> Rule:
    """``Conv(x, W[O,C,K,L])`` → ``Conv(Concat(x[:, :, i:i+H_out] for i < K), W'[O,C·K,1,L])``.

    Applies to group-1, stride-1, dilation-1, unpadded Convs with ``C <= max_input_channels`` and a
    static input height. Channel ``i·C + c`` of the unfolded input is channel ``c`` shifted up by
    ``i`` rows, and ``W'[o, i·C + c, 0, j] = W[o, c, i, j]``. When ``C·K`` is not a multiple of
    ``multiple``, the first channels of the row-0 slice are repeated with zero weights.
    """

    def apply(model: ir.Model) -> int:
        graph = model.graph
        shapes = static_chw(model)
        count = 0
        for conv in list(graph):
            if conv.op_type != "Conv" or len(conv.inputs) < 2 or conv.inputs[0].name not in shapes:
                continue
            weight = constant(conv.inputs[1])
            if weight is None or weight.ndim != 4 or weight.shape[1] > max_input_channels or weight.shape[2] == 1:
                continue
            if conv.attributes.get_int("group", 1) != 1 or not _unpadded_unit_stride(conv):
                continue
            out_ch, in_ch, kh, kw = weight.shape
            _, height, _ = shapes[conv.inputs[0].name]
            out_h = height - kh + 1
            extra = (-(in_ch * kh)) % multiple
            if out_h <= 0 or extra > in_ch:  # padding would need more than one slice's channels
                continue
            source = conv.inputs[0]
            new_nodes = [
                _slice(
                    graph,
                    source,
                    [i],
                    [i + out_h],
                    [2],
                    f"{conv.name}_row{i}",
                    f"{conv.name}_row{i}",
                    f"{source.name}_row{i}",
                )
                for i in range(kh)
            ]
            rows = [n.outputs[0] for n in new_nodes]
            if extra:
                pad = _slice(
                    graph,
                    rows[0],
                    [0],
                    [extra],
                    [1],
                    f"{conv.name}_channel_pad",
                    f"{conv.name}_channel_pad",
                    f"{source.name}_row0_channel_pad",
                )
                new_nodes.append(pad)
                rows.append(pad.outputs[0])
            unfolded = ir.Value(name=unique_name(graph, f"{source.name}_rows_unfolded"))
            new_nodes.append(
                ir.Node(
                    "", "Concat", rows, [ir.AttrInt64("axis", 1)], outputs=[unfolded], name=f"{conv.name}_unfold_rows"
                )
            )
            graph.insert_before(conv, new_nodes)

            unfolded_w = np.zeros((out_ch, in_ch * kh + extra, 1, kw), dtype=weight.dtype)
            for i in range(kh):
                unfolded_w[:, i * in_ch : (i + 1) * in_ch, 0, :] = weight[:, :, i, :]
            w_value = add_initializer(graph, unfolded_w, f"{conv.inputs[1].name}_rows_unfolded")
            conv.replace_input_with(0, unfolded)
            conv.replace_input_with(1, w_value)
            conv.attributes["kernel_shape"] = ir.AttrInt64s("kernel_shape", [1, kw])
            count += 1
        if count:
            drop_unused_initializers(graph)
            graph.sort()
        return count

    return Rule("unfold_conv_rows", apply, f"plain Conv with at most {max_input_channels} input channels")
