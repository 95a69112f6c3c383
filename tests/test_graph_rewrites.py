"""Each exact rewrite on a small synthetic graph: where it applies the outputs do not change, and
where its condition does not hold (a shared MaxPool, ceil_mode=1, a padded conv, ...) it leaves the
graph alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from stn_deploy.export.graph import op_counts, theta_path_nodes, to_ir
from stn_deploy.export.graph_rewrites import EXACT_RULES, apply_rules, pad_conv_input_channels, unfold_conv_rows

RULES = {rule.name: rule for rule in EXACT_RULES}
RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10  # what every supported onnxruntime reads (a newer onnx writes a newer default)
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _same_outputs(before, after, feeds, atol=1e-5) -> None:
    onnx.checker.check_model(after, full_check=True)
    for a, b in zip(_run(before, feeds), _run(after, feeds), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=atol)


def _tensor(name, shape):
    """A float tensor; ``None`` for an output of rank 4 whose sizes shape inference works out."""
    if shape is None:
        shape = [f"{name}_{i}" for i in range(4)]
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _weight(name, shape):
    return nh.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _conv_pool(*, pool_attrs=None, conv_attrs=None, size=10, kernel=2, extra_reader=False, relu_after_pool=True):
    """x → Conv(k) → MaxPool(2, stride 2) [→ Relu] → y (optionally a second reader of the pool)."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[kernel, kernel], **(conv_attrs or {})),
        helper.make_node(
            "MaxPool", ["c"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2], **(pool_attrs or {})
        ),
    ]
    outputs = [_tensor("y", None)]
    if relu_after_pool:
        nodes.append(helper.make_node("Relu", ["p"], ["y"], name="relu"))
    else:
        nodes.append(helper.make_node("Identity", ["p"], ["y"], name="id"))
    if extra_reader:
        nodes.append(helper.make_node("Sigmoid", ["p"], ["z"], name="other"))
        outputs.append(_tensor("z", None))
    return _model(nodes, [_tensor("x", [1, 2, size, size])], outputs, [_weight("w", [3, 2, kernel, kernel])])


X10 = {"x": RNG.standard_normal((1, 2, 10, 10)).astype(np.float32)}


# -- relu_before_maxpool ----------------------------------------------------------------------------
def test_relu_moves_before_the_maxpool_and_the_outputs_stay():
    model = _conv_pool()
    after, counts, _ = apply_rules(model, [RULES["relu_before_maxpool"]])
    assert counts == {"relu_before_maxpool": 1}
    assert [n.op_type for n in after.graph.node] == ["Conv", "Relu", "MaxPool"]
    assert after.graph.output[0].name == "y"  # the graph output keeps its name
    _same_outputs(model, after, X10)


def test_relu_stays_after_a_maxpool_whose_output_is_shared():
    model = _conv_pool(extra_reader=True)
    after, counts, _ = apply_rules(model, [RULES["relu_before_maxpool"]])
    assert counts == {"relu_before_maxpool": 0}
    assert [n.op_type for n in after.graph.node] == ["Conv", "MaxPool", "Relu", "Sigmoid"]


# -- affine_grid_as_matmul --------------------------------------------------------------------------
def _affine_grid(keepdims=0, axes=(-2,)):
    base = RNG.standard_normal((16, 3, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Unsqueeze", ["theta_t", "one"], ["u"], name="unsqueeze"),
        helper.make_node("Mul", ["base", "u"], ["m"], name="mul"),
        helper.make_node("ReduceSum", ["m", "axes"], ["grid"], name="reduce", keepdims=keepdims),
    ]
    inits = [
        nh.from_array(base, "base"),
        nh.from_array(np.array([1], np.int64), "one"),
        nh.from_array(np.array(axes, np.int64), "axes"),
    ]
    return _model(
        nodes, [_tensor("theta_t", ["n", 3, 2])], [_tensor("grid", [f"g{i}" for i in range(3 + keepdims)])], inits
    )


def test_the_affine_grid_becomes_one_matmul_with_the_same_values():
    model = _affine_grid()
    after, counts, _ = apply_rules(model, [RULES["affine_grid_as_matmul"]])
    assert counts == {"affine_grid_as_matmul": 1}
    assert op_counts(after) == {"MatMul": 1}
    assert {t.name for t in after.graph.initializer} == {"base_matrix"}  # the unused constants are dropped
    _same_outputs(model, after, {"theta_t": RNG.standard_normal((5, 3, 2)).astype(np.float32)})


@pytest.mark.parametrize("variant", [{"keepdims": 1}, {"axes": (-1,)}])
def test_a_reduction_that_is_not_the_grid_dot_product_is_left_alone(variant):
    model = _affine_grid(**variant)
    after, counts, _ = apply_rules(model, [RULES["affine_grid_as_matmul"]])
    assert counts == {"affine_grid_as_matmul": 0} and op_counts(after) == op_counts(model)


# -- crop_unpooled_conv_input -----------------------------------------------------------------------
def test_a_conv_computes_only_the_rows_its_floor_mode_pool_reads():
    model = _conv_pool(kernel=2)  # 10x10 → conv 9x9 → pool reads 8x8
    after, counts, _ = apply_rules(model, [RULES["crop_unpooled_conv_input"]])
    assert counts == {"crop_unpooled_conv_input": 1}
    crop = next(n for n in after.graph.node if n.op_type == "Slice")
    ends = nh.to_array(next(t for t in after.graph.initializer if t.name == crop.input[2]))
    assert ends.tolist() == [9, 9]  # 8 conv rows need 9 input rows
    _same_outputs(model, after, X10)


@pytest.mark.parametrize(
    ("why", "options"),
    [
        ("ceil_mode=1 reads the last row", {"pool_attrs": {"ceil_mode": 1}}),
        ("a padded conv", {"conv_attrs": {"pads": [1, 1, 1, 1]}}),
        ("a strided conv", {"conv_attrs": {"strides": [2, 2]}}),
        ("a padded pool", {"pool_attrs": {"pads": [1, 1, 1, 1]}}),
        ("every row is read already", {"size": 11}),
    ],
)
def test_no_crop_where_the_pool_reads_every_row_or_the_conv_is_not_plain(why, options):
    model = _conv_pool(**options)
    after, counts, _ = apply_rules(model, [RULES["crop_unpooled_conv_input"]])
    assert counts == {"crop_unpooled_conv_input": 0}, why
    assert "Slice" not in op_counts(after)


# -- crop_through_pool ------------------------------------------------------------------------------
def _pool_then_slice(*, shared=False):
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Slice", ["p", "starts", "ends", "axes"], ["s"], name="crop"),
        helper.make_node("Sigmoid", ["s"], ["y"], name="after"),
    ]
    outputs = [_tensor("y", None)]
    if shared:
        nodes.append(helper.make_node("Identity", ["p"], ["z"], name="other"))
        outputs.append(_tensor("z", None))
    inits = [
        _weight("w", [3, 2, 3, 3]),
        nh.from_array(np.array([0, 0], np.int64), "starts"),
        nh.from_array(np.array([4, 4], np.int64), "ends"),
        nh.from_array(np.array([2, 3], np.int64), "axes"),
    ]
    return _model(nodes, [_tensor("x", [1, 2, 12, 12])], outputs, inits)


X12 = {"x": RNG.standard_normal((1, 2, 12, 12)).astype(np.float32)}


def test_a_slice_after_the_pool_moves_to_the_conv_input():
    model = _pool_then_slice()  # 12x12 → conv 10x10 → pool 5x5 → slice 4x4
    after, counts, _ = apply_rules(model, [RULES["crop_through_pool"]])
    assert counts == {"crop_through_pool": 1}
    assert [n.op_type for n in after.graph.node] == ["Slice", "Conv", "Relu", "MaxPool", "Sigmoid"]
    _same_outputs(model, after, X12)


def test_the_slice_stays_when_the_pooled_output_has_other_readers():
    after, counts, _ = apply_rules(_pool_then_slice(shared=True), [RULES["crop_through_pool"]])
    assert counts == {"crop_through_pool": 0}
    assert [n.name for n in after.graph.node if n.op_type == "Slice"] == ["crop"]


# -- the int8-only rules, and the θ path ------------------------------------------------------------
def test_unfolded_and_padded_rgb_convs_keep_their_outputs():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="rgb", kernel_shape=[5, 5])]
    model = _model(nodes, [_tensor("x", [1, 3, 12, 12])], [_tensor("y", None)], [_weight("w", [4, 3, 5, 5])])
    feeds = {"x": RNG.standard_normal((1, 3, 12, 12)).astype(np.float32)}
    unfolded, counts, _ = apply_rules(model, [unfold_conv_rows()])
    assert counts == {"unfold_conv_rows": 1}
    weight = next(t for t in unfolded.graph.initializer if t.name.endswith("rows_unfolded"))
    assert list(weight.dims) == [4, 16, 1, 5]  # 3 channels x 5 rows + 1 zero-weight channel
    _same_outputs(model, unfolded, feeds)
    padded, counts, _ = apply_rules(model, [pad_conv_input_channels()])
    assert counts == {"pad_conv_input_channels": 1} and "Pad" in op_counts(padded)
    _same_outputs(model, padded, feeds)
    grouped = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[5, 5], group=3)],
        [_tensor("x", [1, 3, 12, 12])],
        [_tensor("y", None)],
        [_weight("w", [3, 1, 5, 5])],
    )
    assert apply_rules(grouped, [unfold_conv_rows(), pad_conv_input_channels()])[1] == {
        "unfold_conv_rows": 0,
        "pad_conv_input_channels": 0,
    }


def test_the_theta_path_runs_from_the_theta_linear_to_the_sampler_grid():
    nodes = [
        helper.make_node("Gemm", ["feat", "w_theta", "b_theta"], ["theta6"], name="theta_linear", transB=1),
        helper.make_node("Reshape", ["theta6", "shape"], ["theta"], name="to_2x3"),
        helper.make_node("AffineGrid", ["theta", "size"], ["grid"], name="affine_grid"),
        helper.make_node("GridSample", ["image", "grid"], ["warped"], name="sampler"),
        helper.make_node("Relu", ["warped"], ["out"], name="classifier"),
    ]
    inits = [
        _weight("w_theta", [6, 4]),
        _weight("b_theta", [6]),
        nh.from_array(np.array([-1, 2, 3], np.int64), "shape"),
        nh.from_array(np.array([1, 1, 4, 4], np.int64), "size"),
    ]
    graph = helper.make_graph(
        nodes, "g", [_tensor("feat", [1, 4]), _tensor("image", [1, 1, 4, 4])], [_tensor("out", None)], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    assert sorted(theta_path_nodes(to_ir(model).graph)) == ["affine_grid", "theta_linear", "to_2x3"]
