"""stn-serve's command line without a running server: help, bad arguments, unusable models and ports."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner

from helpers import assert_cli_error
from serve_support import export_served_model

main = pytest.importorskip(
    "stn_deploy.serve.cli", reason="stn-serve needs the serve extra (pip install -e '.[serve]')"
).main


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_help_lists_the_endpoints_and_the_exit_codes():
    result = _invoke("--help")
    assert result.exit_code == 0
    for text in (
        "/v2/models/NAME/infer",
        "/classify",
        "/metrics",
        "--max-queue-delay-ms",
        "--request-timeout-s",
        "Exit status",
    ):
        assert text in result.output


GPU_OPTIONS = ("--provider", "--device-id", "--trt-fp16", "--cuda-tf32", "--trt-engine-cache", "--device-check")


def test_the_provider_and_gpu_options_are_stn_infers_word_for_word():
    from stn_deploy.infer.cli import main as infer_main

    def options(command) -> dict[str, tuple]:
        return {o: (p.name, p.help, p.default) for p in command.params for o in p.opts if o in GPU_OPTIONS}

    assert set(options(main)) == set(GPU_OPTIONS)
    assert options(main) == options(infer_main)
    assert "--strict-placement" in _invoke("--help").output


def test_the_gpu_options_reach_every_models_session(tmp_path, monkeypatch):
    import stn_deploy.serve.cli as serve_cli
    from stn_deploy.errors import ProviderError
    from stn_deploy.runtime import ProviderConfig

    seen: list[dict] = []

    def fake_session(path, provider, **kwargs):
        seen.append({"path": path, "provider": provider, **kwargs})
        raise ProviderError(f"{path}: stopped before warm-up")

    monkeypatch.setattr(serve_cli, "Session", fake_session)
    model = tmp_path / "stn.onnx"
    model.write_bytes(b"unused: the session is faked")
    args = ["--provider", "cuda", "--device-id", "1", "--cuda-tf32", "--trt-fp16", "--no-device-check"]
    assert_cli_error(_invoke(model, *args, "--max-batch-size", "64"), 1, "stopped before warm-up")
    (call,) = seen
    assert call["provider"] == "cuda" and call["device_check"] is False
    assert call["provider_config"] == ProviderConfig(device_id=1, trt_fp16=True, trt_max_batch=64, cuda_tf32=True)


def test_a_missing_model_file_is_a_one_line_error(tmp_path):
    assert_cli_error(_invoke(tmp_path / "missing.onnx"), 1, "no such model file")


def test_a_file_that_is_not_a_model_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    assert_cli_error(_invoke(bad), 1, "onnxruntime cannot load it")


def test_names_must_be_one_per_model_distinct_and_url_safe(tmp_path):
    a = tmp_path / "a" / "stn.onnx"
    b = tmp_path / "b" / "stn.onnx"
    assert_cli_error(_invoke(a, b), 2, "used twice")
    assert_cli_error(_invoke(a, b, "--name", "x"), 2, "one per model")
    assert_cli_error(_invoke(a, "--name", "../x"), 2, "model name '../x'")
    assert_cli_error(_invoke(tmp_path / "my model.onnx"), 2, "choose one with --name")
    assert_cli_error(_invoke(a, "--threads", "1", "--streams", "2"), 2, "--streams 2 needs --threads")


@pytest.mark.slow
def test_a_port_in_use_is_a_one_line_error(tmp_path_factory, checkpoint_path):
    model = export_served_model(tmp_path_factory, checkpoint_path)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert_cli_error(_invoke(model, "--port", port), 1, f"cannot listen on 127.0.0.1:{port}")


def test_the_server_imports_no_torch_and_no_training_or_export_code():
    code = (
        "import sys, stn_deploy.serve.cli, stn_deploy.serve.app\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'stn_deploy.train', "
        "'stn_deploy.export')))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.filterwarnings(
    "ignore:Using `httpx` with `starlette.testclient`"
)  # newer Starlette prefers httpx2; httpx works
def test_ready_turns_false_when_a_shutdown_begins(tmp_path_factory, checkpoint_path):
    from starlette.testclient import TestClient

    from stn_deploy.runtime import Session
    from stn_deploy.serve.app import ServerLimits, create_app
    from stn_deploy.serve.metrics import ServeMetrics
    from stn_deploy.serve.model import BatchingConfig, ServedModel

    model = export_served_model(tmp_path_factory, checkpoint_path)
    metrics = ServeMetrics()
    served = ServedModel("stn", Session(model, "cpu", threads=1), BatchingConfig(), metrics)
    app = create_app([served], ServerLimits(), metrics)
    with TestClient(app) as client:
        served.batcher.ready.wait(60)
        assert client.get("/v2/health/ready").status_code == 200
        app.state.serve["shutting_down"] = True  # what the SIGTERM handler does
        response = client.get("/v2/health/ready")
        assert response.status_code == 400 and "shutting down" in response.json()["error"]
        assert client.get("/v2/health/live").status_code == 200
