"""Exact-math graph rewrites that make the exported STN cheaper to run, in fp32 and int8 alike.

Each rewrite changes how a result is computed, never what it is (up to float summation order):

``relu_before_maxpool``
    ``Conv → MaxPool → Relu`` becomes ``Conv → Relu → MaxPool``. ReLU is monotonic, so
    ``relu(max(a, b)) == max(relu(a), relu(b))`` exactly. ONNX Runtime then fuses Conv+ReLU (fp32)
    and a quantized Conv's output clamp absorbs the ReLU (int8).
``affine_grid_as_matmul``
    The exporter builds the affine grid as ``ReduceSum(base[HW,3,1] * θᵀ[N,1,3,2], axis=-2)``: a
    [N, H·W, 3, 2] temporary for a 3-term dot product per grid point (about a quarter of the fp32
    run time of the reference model at batch 256). ``MatMul(base[HW,3], θᵀ[N,3,2])`` computes the
    same sums without the temporary.
``crop_unpooled_conv_input``
    A valid stride-1 Conv followed by [Relu and] a floor-mode MaxPool with stride s never has its
    last ``H_out mod s`` output rows/columns read. Slicing the Conv's *input* to the rows the pool
    reads skips computing them (the localization network's second conv: 9×9 → 8×8 outputs, 21%
    of its multiply-adds).
``crop_through_pool``
    Such a crop of a pooled conv output moves up to that conv's input: the localization network's
    first conv then computes the 24×24 outputs its pool and the cropped second conv read, not
    26×26 (15% of its multiply-adds).

Not part of :func:`rewrite_exact` (they help only the int8 graph, see benchmarks/INT8.md):

``unfold_conv_rows``
    A valid stride-1 ``Conv`` with few input channels (the RGB convs: C_in = 3, K×K kernel) becomes
    ``Concat`` of K row-shifted ``Slice`` copies of its input (C·K channels, zero-weight copies pad them to
    a multiple of 4) and a 1×K ``Conv``. Every output is the same sum of the same products, in
    another order. ONNX Runtime's symmetric uint8×int8 conv kernel needs C_in % 4 == 0; the
    unfolded conv qualifies and, quantized, runs the RGB convs about 2× faster. In fp32 it is
    slower (the NCHWc conv already handles C_in = 3 well), so only quantization applies it.
``pad_conv_input_channels`` zero-pads a Conv's input channels to a multiple of 4, the layout
ONNX Runtime's symmetric int8 conv kernel requires (slower than ``unfold_conv_rows``; no
configuration uses it: it is kept, and tested, for the comparison in benchmarks/INT8.md).

All functions edit an ``onnx.ModelProto`` in place and return how many places they changed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper
from onnx import numpy_helper as nh


# -- graph plumbing ------------------------------------------------------------------------------
def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


_NO_AUTO_PAD = (b"NOTSET", "NOTSET", b"VALID", "VALID")


def _unpadded_unit_stride(conv: onnx.NodeProto) -> bool:
    """No padding, stride 1, dilation 1: each output row/column reads ``kernel`` input rows/columns."""
    return (
        not any(_attr(conv, "pads", [0, 0, 0, 0]))
        and all(v == 1 for v in _attr(conv, "strides", [1, 1]))
        and all(v == 1 for v in _attr(conv, "dilations", [1, 1]))
        and _attr(conv, "auto_pad", b"NOTSET") in _NO_AUTO_PAD
    )


def _floor_unpadded_pool(pool: onnx.NodeProto) -> bool:
    """A MaxPool in floor mode with no padding or dilation (it may skip trailing rows/columns)."""
    return (
        not _attr(pool, "ceil_mode", 0)
        and not any(_attr(pool, "pads", [0, 0, 0, 0]))
        and all(v == 1 for v in _attr(pool, "dilations", [1, 1]))
        and _attr(pool, "auto_pad", b"NOTSET") in _NO_AUTO_PAD
    )


def _drop_value_info(graph: onnx.GraphProto, names: set[str]) -> None:
    kept = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(kept)


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for init in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(init)


def toposort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so every input is produced before it is read (stable for sorted graphs)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
                pending.remove(node)
                break
        else:
            raise ValueError("graph has a cycle or an input nobody produces")
    del graph.node[:]
    graph.node.extend(ordered)


def _initializer(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    for t in graph.initializer:
        if t.name == name:
            return nh.to_array(t)
    return None


def _unique(graph: onnx.GraphProto, base: str) -> str:
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


# -- rewrites ------------------------------------------------------------------------------------
def relu_before_maxpool(model: onnx.ModelProto) -> int:
    """``MaxPool → Relu`` → ``Relu → MaxPool`` (exact: ReLU is monotonic)."""
    graph = model.graph
    producers, consumers = _producers(graph), _consumers(graph)
    graph_outputs = {o.name for o in graph.output}
    stale: set[str] = set()
    count = 0
    for relu in list(graph.node):
        if relu.op_type != "Relu":
            continue
        pool = producers.get(relu.input[0])
        if pool is None or pool.op_type != "MaxPool" or len(pool.output) != 1:
            continue
        pooled = pool.output[0]
        if len(consumers.get(pooled, [])) != 1 or pooled in graph_outputs:
            continue
        source, result = pool.input[0], relu.output[0]
        rectified = _unique(graph, f"{source}_relu")
        relu.input[0], relu.output[0] = source, rectified
        pool.input[0], pool.output[0] = rectified, result
        stale.add(pooled)
        count += 1
    if count:
        _drop_value_info(graph, stale)
        toposort(graph)
    return count


def affine_grid_as_matmul(model: onnx.ModelProto) -> int:
    """``ReduceSum(Mul(base[HW,3,1], Unsqueeze(θᵀ)), axes=[-2])`` → ``MatMul(base[HW,3], θᵀ)``."""
    graph = model.graph
    producers, consumers = _producers(graph), _consumers(graph)
    count = 0
    for reduce in list(graph.node):
        if reduce.op_type != "ReduceSum" or _attr(reduce, "keepdims", 1) != 0 or len(reduce.input) < 2:
            continue
        axes = _initializer(graph, reduce.input[1])
        mul = producers.get(reduce.input[0])
        if axes is None or axes.tolist() not in ([-2], [2]) or mul is None or mul.op_type != "Mul":
            continue
        constant = [(i, _initializer(graph, name)) for i, name in enumerate(mul.input)]
        bases = [(i, a) for i, a in constant if a is not None]
        if len(bases) != 1:
            continue
        base_index, base = bases[0]
        if base.ndim != 3 or base.shape[1:] != (3, 1):
            continue
        unsqueeze = producers.get(mul.input[1 - base_index])
        if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or len(unsqueeze.input) < 2:
            continue
        unsq_axes = _initializer(graph, unsqueeze.input[1])
        if unsq_axes is None or unsq_axes.tolist() != [1]:
            continue
        matrix = _unique(graph, f"{mul.input[base_index]}_matrix")
        graph.initializer.append(nh.from_array(np.ascontiguousarray(base[:, :, 0]), matrix))
        matmul = helper.make_node("MatMul", [matrix, unsqueeze.input[0]], [reduce.output[0]], name=f"{reduce.name}_as_matmul")
        graph.node.insert(list(graph.node).index(reduce), matmul)
        graph.node.remove(reduce)
        graph.node.remove(mul)
        stale = {mul.output[0]}
        if len(consumers.get(unsqueeze.output[0], [])) == 1:
            graph.node.remove(unsqueeze)
            stale.add(unsqueeze.output[0])
        _drop_value_info(graph, stale)
        count += 1
    if count:
        _drop_unused_initializers(graph)
        toposort(graph)
    return count


def static_chw(model: onnx.ModelProto) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of every 4-D tensor whose non-batch dims shape inference can pin down."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, tuple[int, int, int]] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info]:
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 4 and all(d.HasField("dim_value") for d in dims[1:]):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims[1:])  # type: ignore[assignment]
    return shapes


def crop_unpooled_conv_input(model: onnx.ModelProto) -> int:
    """Slice a Conv's input so it computes only the output rows/cols the following MaxPool reads."""
    graph = model.graph
    consumers = _consumers(graph)
    shapes = static_chw(model)
    count = 0
    for conv in list(graph.node):
        if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[0] not in shapes:
            continue
        weight = _initializer(graph, conv.input[1])
        if weight is None or weight.ndim != 4:
            continue
        if not _unpadded_unit_stride(conv):
            continue
        chain = [conv]
        nxt = consumers.get(conv.output[0], [])
        if len(nxt) == 1 and nxt[0].op_type == "Relu":
            chain.append(nxt[0])
            nxt = consumers.get(nxt[0].output[0], [])
        if len(nxt) != 1 or nxt[0].op_type != "MaxPool":
            continue
        pool = nxt[0]
        kernel, strides = _attr(pool, "kernel_shape"), _attr(pool, "strides", [1, 1])
        if not _floor_unpadded_pool(pool):
            continue
        _, height, width = shapes[conv.input[0]]
        kh, kw = weight.shape[2:]
        out_h, out_w = height - kh + 1, width - kw + 1
        read_h = (out_h - kernel[0]) // strides[0] * strides[0] + kernel[0]
        read_w = (out_w - kernel[1]) // strides[1] * strides[1] + kernel[1]
        if (read_h, read_w) == (out_h, out_w) or read_h <= 0 or read_w <= 0:
            continue
        in_h, in_w = read_h + kh - 1, read_w + kw - 1
        names = [_unique(graph, f"{conv.name}_crop_{part}") for part in ("starts", "ends", "axes")]
        for name, value in zip(names, ([0, 0], [in_h, in_w], [2, 3])):
            graph.initializer.append(nh.from_array(np.asarray(value, dtype=np.int64), name))
        cropped = _unique(graph, f"{conv.input[0]}_crop{in_h}x{in_w}")
        crop = helper.make_node("Slice", [conv.input[0], *names], [cropped], name=f"{conv.name}_crop")
        graph.node.insert(list(graph.node).index(conv), crop)
        conv.input[0] = cropped
        _drop_value_info(graph, {n.output[0] for n in chain})
        count += 1
    if count:
        toposort(graph)
    return count


def crop_through_pool(model: onnx.ModelProto) -> int:
    """Move an origin-anchored spatial ``Slice`` of a pooled conv output to the conv's input.

    ``Conv → [Relu →] MaxPool → Slice[:, :, :h, :w]`` reads only the first ``(h-1)·s + k`` pool
    input rows (floor mode, no padding), which a valid stride-1 Conv computes from its first
    ``(h-1)·s + k + K - 1`` input rows. Slicing the Conv's input to those rows makes the pool's
    output exactly ``h × w``, so the original Slice is dropped. (After ``crop_unpooled_conv_input``
    the localization net's second conv reads 12×12 of the first pool's 13×13 output, so its first
    conv reads 30×30 of the 32×32 image and computes 24×24 instead of 26×26 outputs.)
    """
    graph = model.graph
    producers, consumers = _producers(graph), _consumers(graph)
    graph_outputs = {o.name for o in graph.output}
    shapes = static_chw(model)
    count = 0
    for crop in list(graph.node):
        if crop.op_type != "Slice" or len(crop.input) < 4:
            continue
        starts, ends, axes = (_initializer(graph, name) for name in crop.input[1:4])
        steps = _initializer(graph, crop.input[4]) if len(crop.input) > 4 and crop.input[4] else None
        if starts is None or ends is None or axes is None or sorted(axes.tolist()) != [2, 3] or any(starts.tolist()):
            continue
        if steps is not None and any(v != 1 for v in steps.tolist()):
            continue
        pool = producers.get(crop.input[0])
        if pool is None or pool.op_type != "MaxPool" or len(pool.output) != 1 or len(consumers.get(pool.output[0], [])) != 1:
            continue
        if not _floor_unpadded_pool(pool):
            continue
        chain = [pool]
        node = producers.get(pool.input[0])
        if node is not None and node.op_type == "Relu" and len(consumers.get(node.output[0], [])) == 1:
            chain.append(node)
            node = producers.get(node.input[0])
        conv = node
        if conv is None or conv.op_type != "Conv" or len(consumers.get(conv.output[0], [])) != 1 or conv.input[0] not in shapes:
            continue
        weight = _initializer(graph, conv.input[1])
        if weight is None or weight.ndim != 4 or not _unpadded_unit_stride(conv):
            continue
        _, height, width = shapes[conv.input[0]]
        kernel, strides = _attr(pool, "kernel_shape"), _attr(pool, "strides", [1, 1])
        pooled_h = (height - weight.shape[2] + 1 - kernel[0]) // strides[0] + 1
        pooled_w = (width - weight.shape[3] + 1 - kernel[1]) // strides[1] + 1
        want = dict(zip(axes.tolist(), ends.tolist()))
        h, w = min(want[2], pooled_h), min(want[3], pooled_w)
        if (h, w) == (pooled_h, pooled_w) or h <= 0 or w <= 0:
            continue
        in_h = (h - 1) * strides[0] + kernel[0] + weight.shape[2] - 1
        in_w = (w - 1) * strides[1] + kernel[1] + weight.shape[3] - 1
        names = [_unique(graph, f"{conv.name}_crop_{part}") for part in ("starts", "ends", "axes")]
        for name, value in zip(names, ([0, 0], [in_h, in_w], [2, 3])):
            graph.initializer.append(nh.from_array(np.asarray(value, dtype=np.int64), name))
        cropped = _unique(graph, f"{conv.input[0]}_crop{in_h}x{in_w}")
        graph.node.insert(list(graph.node).index(conv), helper.make_node("Slice", [conv.input[0], *names], [cropped], name=f"{conv.name}_crop"))
        conv.input[0] = cropped
        # The pool now yields exactly h × w: its readers take its output in place of the Slice's.
        if crop.output[0] in graph_outputs:
            pool.output[0] = crop.output[0]
        else:
            for reader in consumers.get(crop.output[0], []):
                for i, name in enumerate(reader.input):
                    if name == crop.output[0]:
                        reader.input[i] = pool.output[0]
        graph.node.remove(crop)
        _drop_value_info(graph, {crop.output[0], conv.output[0], *(n.output[0] for n in chain)})
        count += 1
    if count:
        _drop_unused_initializers(graph)
        toposort(graph)
    return count


def pad_conv_input_channels(model: onnx.ModelProto, multiple: int = 4, nodes: set[str] | None = None) -> int:
    """Zero-pad the input channels (and weights) of Convs whose C_in is not a multiple of ``multiple``."""
    graph = model.graph
    count = 0
    for conv in list(graph.node):
        if conv.op_type != "Conv" or (nodes is not None and conv.name not in nodes) or _attr(conv, "group", 1) != 1:
            continue
        weight = _initializer(graph, conv.input[1])
        if weight is None or weight.shape[1] % multiple == 0:
            continue
        extra = multiple - weight.shape[1] % multiple
        padded_w = np.concatenate([weight, np.zeros((weight.shape[0], extra, *weight.shape[2:]), weight.dtype)], axis=1)
        w_name = _unique(graph, f"{conv.input[1]}_padded")
        graph.initializer.append(nh.from_array(padded_w, w_name))
        pads = np.zeros(2 * weight.ndim, dtype=np.int64)
        pads[weight.ndim + 1] = extra
        p_name = _unique(graph, f"{conv.name}_channel_pads")
        graph.initializer.append(nh.from_array(pads, p_name))
        padded = _unique(graph, f"{conv.input[0]}_padded{weight.shape[1] + extra}ch")
        pad = helper.make_node("Pad", [conv.input[0], p_name], [padded], name=f"{conv.name}_pad_channels", mode="constant")
        graph.node.insert(list(graph.node).index(conv), pad)
        conv.input[0], conv.input[1] = padded, w_name
        count += 1
    if count:
        _drop_unused_initializers(graph)
        toposort(graph)
    return count


def unfold_conv_rows(model: onnx.ModelProto, max_input_channels: int = 4, multiple: int = 4) -> int:
    """``Conv(x, W[O,C,K,L])`` → ``Conv(Concat(x[:, :, i:i+H_out] for i < K), W'[O,C·K,1,L])``.

    Applies to group-1, stride-1, dilation-1, unpadded Convs with ``C <= max_input_channels`` and a
    static input height. Channel ``i·C + c`` of the unfolded input is channel ``c`` shifted up by
    ``i`` rows, and ``W'[o, i·C + c, 0, j] = W[o, c, i, j]``. When ``C·K`` is not a multiple of
    ``multiple``, the first channels of the row-0 slice are repeated with zero weights.
    """
    graph = model.graph
    shapes = static_chw(model)
    count = 0
    for conv in list(graph.node):
        if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[0] not in shapes:
            continue
        weight = _initializer(graph, conv.input[1])
        if weight is None or weight.ndim != 4 or weight.shape[1] > max_input_channels or weight.shape[2] == 1:
            continue
        if _attr(conv, "group", 1) != 1 or not _unpadded_unit_stride(conv):
            continue
        out_ch, in_ch, kh, kw = weight.shape
        _, height, _ = shapes[conv.input[0]]
        out_h = height - kh + 1
        if out_h <= 0:
            continue
        extra = (-(in_ch * kh)) % multiple
        if extra > in_ch:  # padding would need more than one slice's channels; leave the conv alone
            continue
        position = list(graph.node).index(conv)
        new_nodes, rows = [], []

        def constant(base: str, value: list[int]) -> str:
            name = _unique(graph, base)
            graph.initializer.append(nh.from_array(np.asarray(value, dtype=np.int64), name))
            return name

        for i in range(kh):
            starts, ends, axes = (constant(f"{conv.name}_row{i}_{p}", v) for p, v in (("starts", [i]), ("ends", [i + out_h]), ("axes", [2])))
            shifted = _unique(graph, f"{conv.input[0]}_row{i}")
            new_nodes.append(helper.make_node("Slice", [conv.input[0], starts, ends, axes], [shifted], name=f"{conv.name}_row{i}"))
            rows.append(shifted)
        if extra:
            starts, ends, axes = (constant(f"{conv.name}_channel_pad_{p}", v) for p, v in (("starts", [0]), ("ends", [extra]), ("axes", [1])))
            padding = _unique(graph, f"{conv.input[0]}_row0_channel_pad")
            new_nodes.append(helper.make_node("Slice", [rows[0], starts, ends, axes], [padding], name=f"{conv.name}_channel_pad"))
            rows.append(padding)
        unfolded = _unique(graph, f"{conv.input[0]}_rows_unfolded")
        new_nodes.append(helper.make_node("Concat", rows, [unfolded], axis=1, name=f"{conv.name}_unfold_rows"))
        for k, node in enumerate(new_nodes):
            graph.node.insert(position + k, node)

        unfolded_w = np.zeros((out_ch, in_ch * kh + extra, 1, kw), dtype=weight.dtype)
        for i in range(kh):
            unfolded_w[:, i * in_ch : (i + 1) * in_ch, 0, :] = weight[:, :, i, :]
        w_name = _unique(graph, f"{conv.input[1]}_rows_unfolded")
        graph.initializer.append(nh.from_array(unfolded_w, w_name))
        conv.input[0], conv.input[1] = unfolded, w_name
        kept = [a for a in conv.attribute if a.name != "kernel_shape"]
        del conv.attribute[:]
        conv.attribute.extend([*kept, helper.make_attribute("kernel_shape", [1, kw])])
        count += 1
    if count:
        _drop_unused_initializers(graph)
        toposort(graph)
    return count


REWRITES = {
    "relu_before_maxpool": relu_before_maxpool,
    "affine_grid_as_matmul": affine_grid_as_matmul,
    "crop_unpooled_conv_input": crop_unpooled_conv_input,
    "crop_through_pool": crop_through_pool,
}


def rewrite_exact(model: onnx.ModelProto) -> dict[str, int]:
    """Apply every exact rewrite in order; returns ``{rewrite name: places changed}``."""
    return {name: fn(model) for name, fn in REWRITES.items()}
