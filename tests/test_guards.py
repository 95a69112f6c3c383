"""The GPU guards, decided and tested on the CPU: TensorRT never samples an opset-20 GridSample,
and a GPU session's warm-up batch must agree with the CPU provider's."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from stn_deploy.errors import ProviderError
from stn_deploy.runtime import (
    CPU,
    CUDA,
    TENSORRT,
    GraphInfo,
    ProviderConfig,
    Session,
    compare_devices,
    providers,
    read_graph_info,
    resolve_providers,
    tensorrt_excluded_ops,
)
from stn_deploy.runtime import session as session_module
from stn_deploy.runtime.graph_info import GraphReadError
from stn_deploy.runtime.guards import FP32_MAX_ABS_DIFF, LOW_PRECISION_MAX_ABS_DIFF

GPU_BUILD = [TENSORRT, CUDA, CPU]


@pytest.fixture(scope="module")
def cuda_target_model(tmp_path_factory, checkpoint_path):
    from stn_deploy.export import export_model

    path = tmp_path_factory.mktemp("guards") / "stn.cuda.onnx"
    export_model(checkpoint_path, path, target="cuda", parity_samples=8, optimize=False, progress=False)
    return path


def test_the_graph_facts_are_read_without_onnx(model_path, cuda_target_model):
    ort_target, cuda_target = read_graph_info(model_path), read_graph_info(cuda_target_model)
    assert ort_target.opset == 20 and ort_target.op_types["GridSample"] == 1 and ort_target.precision == "fp32"
    assert cuda_target.opset == 18 and cuda_target.op_types["GridSample"] == 1
    import onnx  # the reader agrees with the onnx package on every operator count

    proto = onnx.load(str(model_path))
    assert sum(ort_target.op_types.values()) == len(proto.graph.node)


def test_the_graph_reader_refuses_a_fifo_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    with pytest.raises(GraphReadError, match="not a regular file"):
        read_graph_info(fifo)  # a plain open() would block here until someone wrote to the FIFO
    with pytest.raises(GraphReadError, match="not a regular file"):
        read_graph_info(tmp_path)


def test_tensorrt_keeps_an_opset_20_gridsample_off_and_takes_an_opset_16_one():
    assert tensorrt_excluded_ops(GraphInfo(opsets={"": 20}, op_types={"GridSample": 1})) == ("GridSample",)
    assert tensorrt_excluded_ops(GraphInfo(opsets={"": 18}, op_types={"GridSample": 1})) == ()
    assert tensorrt_excluded_ops(GraphInfo(opsets={"": 21}, op_types={"Conv": 3})) == ()  # portable: no GridSample
    chain = dict(resolve_providers("auto", available=GPU_BUILD, trt_exclude_ops=("GridSample",)))
    # ONNX Runtime's own default list stays excluded too (setting the option replaces it)
    assert chain[TENSORRT]["trt_op_types_to_exclude"] == "NonMaxSuppression,NonZero,RoiAlign,GridSample"
    assert "trt_op_types_to_exclude" not in chain[CUDA]
    assert "trt_op_types_to_exclude" not in dict(resolve_providers("auto", available=GPU_BUILD))[TENSORRT]


def test_a_session_on_tensorrt_excludes_gridsample_20_and_says_so_once(monkeypatch, model_path, cuda_target_model):
    """The chain ONNX Runtime is asked for, with a build that offers TensorRT (faked: it cannot start
    here, so auto falls back to the CPU after recording what it asked for)."""
    monkeypatch.setattr(providers, "available_providers", lambda: GPU_BUILD)
    monkeypatch.setattr(session_module, "_TRT_GUARD_SAID", set())
    asked = []
    real = session_module.create_session

    def create(model, options=None, chain=None, **kwargs):
        asked.append(chain)
        if chain and chain[0][0] != CPU:
            raise ProviderError(f"{model}: {chain[0][0]} failed to start: no GPU here")
        return real(model, options, chain, **kwargs)

    monkeypatch.setattr(session_module, "create_session", create)
    with pytest.warns(RuntimeWarning) as said:
        Session(model_path, "auto", device_check=False)
        Session(model_path, "auto", device_check=False)
    guard = [w for w in said if "runs on CUDA, not TensorRT" in str(w.message)]
    assert len(guard) == 1 and "--target cuda" in str(guard[0].message)  # once, naming the fix
    assert asked[0][0][0] == TENSORRT and "GridSample" in asked[0][0][1]["trt_op_types_to_exclude"]
    asked.clear()
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        Session(cuda_target_model, "auto", device_check=False)
    assert "trt_op_types_to_exclude" not in asked[0][0][1]  # GridSample-16: TensorRT maps it correctly
    assert not [w for w in quiet if "not TensorRT" in str(w.message)]


def test_the_device_check_bounds_fp32_and_fp16():
    rng = np.random.default_rng(0)
    cpu = np.log(rng.dirichlet(np.ones(10), size=8))
    ok = compare_devices(CUDA, "fp32", cpu + 1e-4, cpu)
    assert ok.passed and ok.max_abs_diff == pytest.approx(1e-4) and ok.top1_mismatches == 0
    off = compare_devices(CUDA, "fp32", cpu + 2 * FP32_MAX_ABS_DIFF, cpu)
    assert not off.passed and "bound 0.001" in off.describe()
    first, second = np.argsort(-cpu[0])[:2]
    swapped = cpu.copy()
    swapped[0, [first, second]] = cpu[0, [second, first]]  # the GPU picks the runner-up for one input
    assert compare_devices(CUDA, "fp32", swapped, cpu).top1_mismatches == 1
    assert not compare_devices(CUDA, "fp32", np.full_like(cpu, np.nan), cpu).passed  # NaN never passes
    # fp16: a looser bound over the classes a user can see; a near-tie may swap, a clear winner may not
    assert compare_devices(CUDA, "fp16", cpu + 0.02, cpu).passed
    assert not compare_devices(CUDA, "fp16", cpu + 2 * LOW_PRECISION_MAX_ABS_DIFF, cpu).passed
    clear = np.log(np.array([[0.6, 0.3, 0.1]]))
    assert compare_devices(CUDA, "fp16", clear[:, [1, 0, 2]], clear).top1_mismatches == 1  # a clear lead swapped
    near = np.log(np.array([[0.5, 0.49, 0.01]]))
    assert compare_devices(CUDA, "fp16", near[:, [1, 0, 2]], near).passed  # a near-tie within fp16's bound


def test_a_gpu_session_that_disagrees_with_the_cpu_is_refused(model_path, monkeypatch):
    """A session faked onto a GPU provider whose outputs drift: the check names provider and numbers."""
    session = Session(model_path, "cpu", threads=1)
    monkeypatch.setattr(session, "providers", [CUDA, CPU])
    monkeypatch.setattr(session, "device", "cuda")
    real_run = session.run
    monkeypatch.setattr(session, "run", lambda x, names=None: {k: v + 0.01 for k, v in real_run(x, names).items()})
    with pytest.raises(ProviderError) as exc:
        session._check_device(4)
    msg = str(exc.value)
    assert "device check failed: CUDAExecutionProvider vs CPUExecutionProvider on 8 inputs (fp32)" in msg
    assert "max |Δ log-prob| 0.01" in msg and "--no-device-check" in msg and "\n" not in msg
    monkeypatch.setattr(session, "run", real_run)
    assert session._check_device(4).passed  # the same provider path without the drift passes


def test_a_gpu_session_asked_for_tf32_or_tensorrt_fp16_is_checked_with_the_reduced_precision_bound(
    model_path, monkeypatch
):
    """--cuda-tf32 and --trt-fp16 lower an fp32 file's math on purpose (TF32 moved the digits
    model's log-probs by up to 3.5e-3 on an H200): the check then uses fp16's bound instead of
    refusing the session the user asked for, and still refuses a gross disagreement."""
    session = Session(model_path, "cpu", threads=1)
    assert session.compute_precision == session.precision == "fp32"  # the CPU computes what the file holds
    monkeypatch.setattr(session, "device", "cuda")
    real_run = session.run
    drift = 10 * FP32_MAX_ABS_DIFF  # over fp32's bound, inside fp16's
    monkeypatch.setattr(session, "run", lambda x, names=None: {k: v + drift for k, v in real_run(x, names).items()})
    for providers_, config, expected in (
        ([CUDA, CPU], ProviderConfig(cuda_tf32=True), "tf32"),
        ([TENSORRT, CUDA, CPU], ProviderConfig(trt_fp16=True), "fp16"),
        ([CUDA, CPU], ProviderConfig(), "fp32"),
    ):
        monkeypatch.setattr(session, "providers", providers_)
        monkeypatch.setattr(session, "provider_config", config)
        assert session.compute_precision == expected
        if expected == "fp32":
            with pytest.raises(ProviderError, match=r"\(fp32\)"):
                session._check_device(4)
        else:
            check = session._check_device(4)
            assert check.passed and check.precision == expected and check.bound == LOW_PRECISION_MAX_ABS_DIFF
    monkeypatch.setattr(session, "providers", [CUDA, CPU])
    monkeypatch.setattr(session, "provider_config", ProviderConfig(cuda_tf32=True))
    monkeypatch.setattr(session, "run", lambda x, names=None: {k: v + 1.0 for k, v in real_run(x, names).items()})
    with pytest.raises(ProviderError, match=r"\(tf32\)"):
        session._check_device(4)  # a gross error (a wrong sampling mode) is refused under TF32 too


def test_cpu_sessions_do_not_run_the_device_check(model_path):
    assert Session(model_path, "cpu", threads=1).device_check is None
