"""ONNX files with an unexpected signature: each is a one-line ModelFileError from Session, and a
one-line error with exit 1 from stn-infer and stn-bench, never a traceback or a huge allocation."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from helpers import assert_cli_error
from stn_deploy import metadata as md
from stn_deploy.bench.cli import main as bench_main
from stn_deploy.errors import ModelFileError
from stn_deploy.infer.cli import main as infer_main
from stn_deploy.runtime import Session


def _model(
    path,
    *,
    input_type=TensorProto.FLOAT,
    input_shape=("N", 3, 8, 8),
    out_type=TensorProto.FLOAT,
    out_shape=("N", 3),
    nodes=None,
    image_size=(8, 8),
    classes=("a", "b", "c"),
):
    """A tiny graph with stn-deploy metadata: log_probs = the image's per-channel means."""
    nodes = nodes or [helper.make_node("ReduceMean", ["image", "axes"], ["log_probs"], keepdims=0)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("image", input_type, list(input_shape))],
        [helper.make_tensor_value_info("log_probs", out_type, list(out_shape))],
        [
            helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
            helper.make_tensor("last", TensorProto.INT64, [1], [2]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    pre = {
        "image_size": list(image_size),
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "channel_order": "RGB",
        "resample": "bilinear",
    }
    helper.set_model_props(model, {md.PREPROCESSING: json.dumps(pre), md.CLASS_NAMES: json.dumps(list(classes))})
    onnx.save(model, str(path))
    return path


CASES = {
    "a uint8 input": (
        dict(
            input_type=TensorProto.UINT8,
            nodes=[
                helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
                helper.make_node("ReduceMean", ["f", "axes"], ["log_probs"], keepdims=0),
            ],
        ),
        "input 'image' is tensor(uint8) of rank 4",
    ),
    "a rank-3 input": (
        dict(
            input_shape=("N", 3, 8),
            nodes=[helper.make_node("ReduceMean", ["image", "last"], ["log_probs"], keepdims=0)],
        ),
        "of rank 3; stn-deploy models take a float32 [N, C, H, W] batch",
    ),
    "log_probs of rank 1": (
        dict(nodes=[helper.make_node("ReduceMean", ["image"], ["log_probs"], keepdims=0)], out_shape=()),
        "output 'log_probs' is tensor(float) of rank 0",
    ),
    "log_probs of rank 3": (
        dict(
            nodes=[helper.make_node("ReduceMean", ["image", "axes"], ["log_probs"], keepdims=1)],
            out_shape=("N", 3, 1, 1),
        ),
        "of rank 4; expected float32 [N, classes]",
    ),
    "log_probs of string type": (
        dict(
            out_type=TensorProto.STRING,
            nodes=[
                helper.make_node("ReduceMean", ["image", "axes"], ["m"], keepdims=0),
                helper.make_node("Cast", ["m"], ["log_probs"], to=TensorProto.STRING),
            ],
        ),
        "is tensor(string)",
    ),
    "more classes than names": (dict(classes=("a", "b")), "'log_probs' has 3 classes but the metadata names 2"),
    "a huge image size behind a symbolic H x W": (
        dict(input_shape=("N", 3, "H", "W"), image_size=(4000, 4000)),
        "values per image, limit",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_unexpected_signature_is_one_line_from_session_infer_and_bench(case, tmp_path):
    kwargs, text = CASES[case]
    path = _model(tmp_path / "odd.onnx", **kwargs)
    with pytest.raises(ModelFileError) as exc:
        Session(path, "cpu")
    assert text in str(exc.value) and "\n" not in str(exc.value)
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "a.png")
    result = CliRunner().invoke(infer_main, [str(images), "--model", str(path), "--no-progress"])
    assert_cli_error(result, 1, text)
    bench = CliRunner().invoke(bench_main, ["--model", str(path), "--batch-sizes", "1", "--iterations", "1", "-q"])
    assert_cli_error(bench, 1, text)


def test_fewer_output_rows_than_inputs_is_a_model_error(tmp_path):
    """A graph that answers one row whatever the batch (its batch axis reduced away)."""
    nodes = [helper.make_node("ReduceMean", ["image", "axes0"], ["log_probs"], keepdims=0)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, ["one", 3])],
        [helper.make_tensor("axes0", TensorProto.INT64, [3], [0, 2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    # ReduceMean over N, H, W keeps [3]: reshape so the output is [1, 3]
    model.graph.node[0].output[0] = "m"
    model.graph.node.append(helper.make_node("Unsqueeze", ["m", "zero"], ["log_probs"]))
    model.graph.initializer.append(helper.make_tensor("zero", TensorProto.INT64, [1], [0]))
    pre = {"image_size": [8, 8], "mean": [0.5] * 3, "std": [0.5] * 3, "channel_order": "RGB", "resample": "bilinear"}
    helper.set_model_props(model, {md.PREPROCESSING: json.dumps(pre), md.CLASS_NAMES: json.dumps(["a", "b", "c"])})
    path = tmp_path / "one_row.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelFileError, match="output 'log_probs' has 1 rows for a batch of 2"):
        Session(path, "cpu", warmup_batch=2)
