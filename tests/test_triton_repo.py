"""stn-export --triton-repo / stn_deploy.export.triton_repo: config.pbtxt parsed into Triton's own ModelConfig."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from helpers import assert_cli_error
from serve_support import export_served_model
from stn_deploy import metadata as md
from stn_deploy.errors import ModelFileError
from stn_deploy.export.triton_repo import TritonRepoError, write_triton_repo
from stn_deploy.export.triton_repo import main as repo_main

text_format = pytest.importorskip("google.protobuf.text_format")
MODULE = "tritonclient.grpc.model_config_pb2"


def model_config_class():
    """Triton's ModelConfig message from the tritonclient wheel, loaded by file path: importing the
    tritonclient.grpc package would need grpcio, which the http client does not install."""
    if MODULE not in sys.modules:  # the protobuf descriptor pool takes the file once per process
        tritonclient = pytest.importorskip("tritonclient", reason="tritonclient[http] is a dev dependency")
        path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
        if not path.is_file():
            pytest.skip(f"this tritonclient wheel has no {path.name}")
        spec = importlib.util.spec_from_file_location(MODULE, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[MODULE] = module
    return sys.modules[MODULE].ModelConfig


def parse_config(path: Path):
    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_class()())


@pytest.fixture(scope="module")
def served_model(tmp_path_factory, checkpoint_path) -> Path:
    return export_served_model(tmp_path_factory, checkpoint_path)


def test_the_repository_config_parses_as_tritons_model_config(served_model, tmp_path):
    directory = write_triton_repo(served_model, tmp_path / "models", name="digits", max_batch_size=48)
    assert directory == tmp_path / "models" / "digits"
    config = parse_config(directory / "config.pbtxt")
    pb = sys.modules[MODULE]
    assert config.name == "digits" and config.backend == "onnxruntime"
    assert config.max_batch_size == 48
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("image", pb.TYPE_FP32, [3, 32, 32])]
    assert [(o.name, list(o.dims)) for o in config.output] == [
        ("log_probs", [10]),
        ("theta", [2, 3]),
        ("warped", [3, 32, 32]),
    ]
    assert config.output[0].label_filename == "labels.txt"
    assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds == 1000
    assert list(config.dynamic_batching.preferred_batch_size) == []
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, pb.ModelInstanceGroup.KIND_CPU)]
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator  # ort target: no TensorRT
    text = (directory / "config.pbtxt").read_text()
    with pytest.raises(text_format.ParseError):  # the check has teeth: a misspelt field is refused
        text_format.Parse(text.replace("max_batch_size", "max_batchsize"), model_config_class()())

    model = onnx.load(str(served_model))
    props = {p.key: p.value for p in model.metadata_props}
    assert {k: v.string_value for k, v in config.parameters.items()} == {
        k: v for k, v in props.items() if k.startswith("stn_deploy.")
    }
    assert (directory / "1" / "model.onnx").read_bytes() == served_model.read_bytes()
    assert (directory / "labels.txt").read_text().splitlines() == json.loads(props[md.CLASS_NAMES])


def test_any_class_name_survives_the_text_format(served_model, tmp_path):
    names = ['say "hi"', "back\\slash", "Straße", "猫", "tab\there", "new\nline", "c6", "c7", "c8", "c9"]
    model = onnx.load(str(served_model))
    for prop in model.metadata_props:
        if prop.key == md.CLASS_NAMES:
            prop.value = json.dumps(names, ensure_ascii=False)
    path = tmp_path / "odd.onnx"
    onnx.save(model, str(path))
    config = parse_config(write_triton_repo(path, tmp_path / "models") / "config.pbtxt")
    assert json.loads(config.parameters[md.CLASS_NAMES].string_value) == names
    assert (tmp_path / "models" / "odd" / "labels.txt").read_text(encoding="utf-8").splitlines()[5] == "new line"


@pytest.mark.slow
def test_stn_export_triton_repo_for_the_cuda_target_writes_a_tensorrt_block(checkpoint_path, tmp_path):
    from stn_deploy.export.cli import main as export_main

    out = tmp_path / "stn.cuda.onnx"
    result = CliRunner().invoke(
        export_main,
        [
            str(checkpoint_path),
            "-o",
            str(out),
            "--target",
            "cuda",
            "--parity-samples",
            "8",
            "-q",
            "--json",
            "--triton-repo",
            str(tmp_path / "models"),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["triton_repo"] == str(tmp_path / "models" / "stn.cuda")
    config = parse_config(tmp_path / "models" / "stn.cuda" / "config.pbtxt")
    pb = sys.modules[MODULE]
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    (trt,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt"
    assert dict(trt.parameters) == {"precision_mode": "FP32", "max_workspace_size_bytes": str(1 << 30)}
    assert config.parameters[md.TARGET].string_value == "cuda"
    assert (tmp_path / "models" / "stn.cuda" / "1" / "model.onnx").read_bytes() == out.read_bytes()


def test_an_fp16_variant_asks_tensorrt_for_fp16(served_model, tmp_path):
    model = onnx.load(str(served_model))
    for prop in model.metadata_props:
        if prop.key == md.TARGET:
            prop.value = "cuda"
        if prop.key == md.PRECISION:
            prop.value = "fp16"
    path = tmp_path / "stn.cuda.fp16.onnx"
    onnx.save(model, str(path))
    config = parse_config(write_triton_repo(path, tmp_path / "models") / "config.pbtxt")
    (trt,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.parameters["precision_mode"] == "FP16"


def test_bad_names_foreign_models_and_onnx_sources_are_clear_errors(served_model, tmp_path):
    with pytest.raises(TritonRepoError, match="model name '../x'"):
        write_triton_repo(served_model, tmp_path, name="../x")
    foreign = onnx.load(str(served_model))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    with pytest.raises(TritonRepoError, match="not exported by stn-export"):
        write_triton_repo(tmp_path / "foreign.onnx", tmp_path / "models")
    with pytest.raises(ModelFileError, match="no such model file"):
        write_triton_repo(tmp_path / "missing.onnx", tmp_path / "models")
    assert not (tmp_path / "models" / "foreign").exists()

    result = CliRunner().invoke(repo_main, [str(tmp_path / "foreign.onnx"), str(tmp_path / "models")])
    assert_cli_error(result, 1, "not exported by stn-export")
    result = CliRunner().invoke(repo_main, [str(served_model), str(tmp_path / "models"), "--name", "ok"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "models" / "ok" / "config.pbtxt").is_file()

    from stn_deploy.export.cli import main as export_main

    result = CliRunner().invoke(export_main, [str(served_model), "--triton-repo", str(tmp_path / "models")])
    assert_cli_error(result, 2, "python -m stn_deploy.export.triton_repo")
