"""The portable sampler against PyTorch's grid_sample, and opset lowering (no export, fast)."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from stn_deploy.export.sampling import portable_grid_sample, portable_grid_sampler_decomposition
from stn_deploy.export.targets import TARGETS, get_target, lower_opset


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0, 50.0])
def test_portable_grid_sample_matches_torch(align_corners, scale):
    torch.manual_seed(int(scale * 10) + align_corners)
    x = torch.randn(3, 2, 7, 9)
    grid = torch.randn(3, 5, 6, 2) * scale  # scale 3 and 50: most points far outside the image
    want = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)
    got = portable_grid_sample(x, grid, align_corners)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("align_corners", [False, True])
def test_portable_grid_sample_edges_and_exact_pixels(align_corners):
    x = torch.arange(2 * 4 * 5, dtype=torch.float32).reshape(1, 2, 4, 5)
    # Exactly ±1 (the border), just outside it, and the centre: the cases where off-by-one
    # neighbour masking and the align_corners convention show.
    values = torch.tensor([-1.0, -1.0001, -0.9999, 0.0, 0.9999, 1.0, 1.0001, 1.2, -1.2])
    gx, gy = torch.meshgrid(values, values, indexing="xy")
    grid = torch.stack([gx, gy], dim=-1).unsqueeze(0)
    want = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)
    torch.testing.assert_close(portable_grid_sample(x, grid, align_corners), want, atol=1e-4, rtol=0)


def test_portable_grid_sample_affine_theta_outside_image():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    theta = torch.tensor([[2.5, 0.4, 1.5], [-0.3, 2.0, -1.2]]).expand(4, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    assert (grid.abs() > 1).any(-1).float().mean() > 0.5
    want = F.grid_sample(x, grid, align_corners=False)
    torch.testing.assert_close(portable_grid_sample(x, grid, False), want, atol=1e-5, rtol=0)


def test_decomposition_refuses_modes_it_does_not_implement():
    x, grid = torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 2, 2)
    with pytest.raises(NotImplementedError, match="bilinear"):
        portable_grid_sampler_decomposition(x, grid, 1, 0, False)  # nearest
    with pytest.raises(NotImplementedError, match="zeros"):
        portable_grid_sampler_decomposition(x, grid, 0, 1, False)  # border padding


def _model(op: str, opset: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3] if op != "ReduceMean" else [])
    if op == "ReduceMean":  # changed at opset 18 (axes became an input)
        node = helper.make_node("ReduceMean", ["x"], ["y"], keepdims=0)
    else:
        node = helper.make_node(op, ["x"], ["y"])
    graph = helper.make_graph([node], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_lower_opset_restamps_only_when_no_operator_changed():
    model = lower_opset(_model("Relu", 18), 17)
    assert model.opset_import[0].version == 17
    onnx.checker.check_model(model, full_check=True)
    with pytest.raises(ValueError, match="ReduceMean"):
        lower_opset(_model("ReduceMean", 18), 17)


def test_targets_and_opset_ranges():
    assert set(TARGETS) == {"ort", "cuda", "portable"}
    assert get_target("ort").resolve_opset(None) == 20
    assert get_target("cuda").resolve_opset(None) == 18
    assert get_target("portable").resolve_opset(None) == 17
    with pytest.raises(ValueError, match="opset 20"):
        get_target("cuda").resolve_opset(20)  # GridSample-20: not the CUDA EP's 16-19 kernel
    with pytest.raises(ValueError, match="unknown target"):
        get_target("tensorrt")
