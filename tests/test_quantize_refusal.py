"""stn-export --quantize int8 on a file that is quantized already is refused at once, by its graph,
whatever its metadata claims (issue 12: it spun for minutes inside ONNX Runtime)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from helpers import assert_cli_error, make_checkpoint
from stn_deploy import metadata as md
from stn_deploy.errors import ModelFileError
from stn_deploy.export import export_model
from stn_deploy.export.cli import main as stn_export
from stn_deploy.export.quantize import CalibrationReader, quantize_int8, quantized_content
from stn_deploy.train.model import STNConfig

SMALL = STNConfig(conv_channels=(8, 16), fc_hidden=32, loc_channels=(8, 16), loc_hidden=16)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qr")
    ckpt = make_checkpoint(root / "small.pt", SMALL, seed=3, dataset="digits")
    export_model(ckpt, root / "small.onnx", parity_samples=8, progress=False)
    return root / "small.onnx"


def _claiming_fp32(quantized: Path, fp32: Path) -> Path:
    """Give ``quantized`` the fp32 file's metadata, precision fp32 included: a file that lies."""
    model = onnx.load(str(quantized))
    onnx.helper.set_model_props(model, {p.key: p.value for p in onnx.load(str(fp32)).metadata_props})
    onnx.save(model, str(quantized))
    assert {p.key: p.value for p in model.metadata_props}[md.PRECISION] == "fp32"
    return quantized


@pytest.fixture(scope="module")
def quantized_files(fp32, tmp_path_factory) -> dict[str, Path]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    root = tmp_path_factory.mktemp("quantized")
    images = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    files = {}
    files["dynamic (ConvInteger/MatMulInteger)"] = root / "dynamic.onnx"
    quantize_dynamic(str(fp32), str(files["dynamic (ConvInteger/MatMulInteger)"]), weight_type=QuantType.QUInt8)
    for name, fmt in (("QDQ", QuantFormat.QDQ), ("QOperator (QLinearConv)", QuantFormat.QOperator)):
        files[name] = root / f"{fmt.name}.onnx"
        quantize_static(str(fp32), str(files[name]), CalibrationReader(images), quant_format=fmt)
    half = onnx.load(str(fp32))
    for tensor in half.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            tensor.CopyFrom(
                onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor).astype(np.float16), tensor.name)
            )
    files["float16 weights"] = root / "half.onnx"
    onnx.save(half, str(files["float16 weights"]))
    return {name: _claiming_fp32(path, fp32) for name, path in files.items()}


MARKS = {
    "dynamic (ConvInteger/MatMulInteger)": "ConvInteger",
    "QDQ": "QuantizeLinear",
    "QOperator (QLinearConv)": "QLinearConv",
    "float16 weights": "float16 weights",
}


def test_an_fp32_export_holds_nothing_quantized(fp32):
    assert quantized_content(onnx.load(str(fp32))) == []


@pytest.mark.parametrize("kind", list(MARKS))
def test_stn_export_refuses_to_quantize_a_quantized_file_at_once_whatever_its_metadata_says(
    kind, quantized_files, tmp_path
):
    path = quantized_files[kind]
    out = tmp_path / "again.int8.onnx"
    started = time.perf_counter()
    result = CliRunner().invoke(
        stn_export, [str(path), "--quantize", "int8", "--calibration", "digits", "-o", str(out), "-q"]
    )
    seconds = time.perf_counter() - started
    assert_cli_error(result, 1, f"Error: {path}: quantized already (")
    assert MARKS[kind] in result.stderr and "its metadata says precision fp32" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
    assert seconds < 20, f"refused only after {seconds:.1f} s"  # before any calibration data is loaded


def test_quantize_int8_itself_refuses_before_calibrating(quantized_files, tmp_path):
    path = quantized_files["QDQ"]
    with pytest.raises(ModelFileError, match="quantized already"):
        quantize_int8(path, tmp_path / "x.onnx", np.zeros((4, 3, 32, 32), np.float32))
    assert not (tmp_path / "x.onnx").exists()
