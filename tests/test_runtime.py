"""The ONNX Runtime session wrapper: provider selection and options (GPU ones with a faked
provider list), real CPU sessions on an exported model, batching, IO binding, placement."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import onnxruntime as ort
import pytest

from stn_deploy import runtime
from stn_deploy.errors import ModelFileError, ProviderError
from stn_deploy.runtime import (
    CPU,
    CUDA,
    STREAM_CHUNK,
    STREAMS_MIN_BATCH,
    TENSORRT,
    NodePlacement,
    PlacementReport,
    ProviderConfig,
    Session,
    parse_profile,
    providers,
    resolve_providers,
)

# -- provider selection (no GPU needed) ----------------------------------------------------------
GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
CUDA_BUILD = ["CUDAExecutionProvider", "CPUExecutionProvider"]
CPU_BUILD = ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("available", "expected"),
    [
        (GPU_BUILD, [TENSORRT, CUDA, CPU]),
        (CUDA_BUILD, [CUDA, CPU]),
        (CPU_BUILD, [CPU]),
        (["AzureExecutionProvider", CPU], [CPU]),
    ],
)
def test_auto_picks_the_best_available_in_order(available, expected):
    assert [name for name, _ in resolve_providers("auto", available=available)] == expected


def test_explicit_provider_chains():
    assert [n for n, _ in resolve_providers("cuda", available=GPU_BUILD)] == [CUDA, CPU]
    assert [n for n, _ in resolve_providers("tensorrt", available=GPU_BUILD)] == [TENSORRT, CUDA, CPU]
    assert [n for n, _ in resolve_providers("cpu", available=GPU_BUILD)] == [CPU]


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_missing_provider_is_an_error_that_says_why(provider):
    with pytest.raises(ProviderError) as exc:
        resolve_providers(provider, available=CPU_BUILD)
    msg = str(exc.value)
    assert f"has no {runtime.PROVIDER_NAMES[provider]}" in msg and "stn-deploy[gpu]" in msg and "offers CPU" in msg
    assert "\n" not in msg


def test_unknown_provider():
    with pytest.raises(ProviderError, match="unknown provider 'rocm'"):
        resolve_providers("rocm", available=GPU_BUILD)


def test_provider_options_are_built_from_the_config(tmp_path):
    config = ProviderConfig(
        device_id=1,
        trt_fp16=True,
        trt_engine_cache=tmp_path / "trt",
        trt_max_batch=64,
        cuda_conv_algo_search="heuristic",
    )
    chain = dict(
        resolve_providers("tensorrt", config, available=GPU_BUILD, input_name="image", input_shape=(3, 32, 32))
    )
    trt = chain[TENSORRT]
    assert trt["device_id"] == 1 and trt["trt_fp16_enable"] is True
    assert trt["trt_engine_cache_enable"] is True and trt["trt_engine_cache_path"] == str(tmp_path / "trt")
    assert trt["trt_profile_min_shapes"] == "image:1x3x32x32"
    assert trt["trt_profile_max_shapes"] == trt["trt_profile_opt_shapes"] == "image:64x3x32x32"
    assert chain[CUDA] == {"device_id": 1, "use_tf32": 0, "cudnn_conv_algo_search": "HEURISTIC"}
    assert chain[CPU] == {}
    # Defaults: no cache, no fp16, no profile, ORT's own conv search.
    plain = dict(resolve_providers("auto", available=GPU_BUILD))
    assert plain[TENSORRT] == {"device_id": 0, "trt_fp16_enable": False}
    assert plain[CUDA] == {"device_id": 0, "use_tf32": 0}  # fp32 means fp32: TF32 only when asked for
    assert dict(resolve_providers("cuda", ProviderConfig(cuda_tf32=True), available=GPU_BUILD))[CUDA]["use_tf32"] == 1
    with pytest.raises(ProviderError, match="cuda_conv_algo_search must be one of"):
        ProviderConfig(cuda_conv_algo_search="fastest").cuda_options()


def test_available_providers_source_is_monkeypatchable(monkeypatch, model_path):
    """Session asks runtime.available_providers(): a build 'with' CUDA selects it first."""
    monkeypatch.setattr(providers, "available_providers", lambda: CUDA_BUILD)
    assert [n for n, _ in resolve_providers("auto")] == [CUDA, CPU]
    monkeypatch.setattr(providers, "available_providers", lambda: CPU_BUILD)
    with pytest.raises(ProviderError, match="has no CUDAExecutionProvider"):
        Session(model_path, "cuda")


def test_auto_falls_back_with_a_warning_when_a_gpu_provider_fails_to_start(monkeypatch, model_path):
    """A build that lists CUDA but cannot start it (no driver here): auto warns and runs on CPU;
    an explicit request is an error. onnxruntime is really asked for CUDA in both cases."""
    monkeypatch.setattr(providers, "available_providers", lambda: CUDA_BUILD)
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime build really has CUDA; the failure path cannot be provoked")
    with pytest.warns(RuntimeWarning, match="failed to initialise"):
        session = Session(model_path, "auto")
    assert session.providers == [CPU]
    with pytest.raises(ProviderError, match="failed to initialise|failed to start"):
        Session(model_path, "cuda")


def test_auto_tries_the_next_provider_when_one_cannot_start(monkeypatch, model_path):
    """TensorRT fails to build (say), then CUDA: auto warns for each and ends on the CPU; the
    TensorRT attempt carried the optimization profile read from the file. An explicit request
    is an error at once."""
    monkeypatch.setattr(providers, "available_providers", lambda: GPU_BUILD)
    from stn_deploy.runtime import session as session_module

    real_create, tried = session_module.create_session, []

    def create(model, options=None, chain=None, **kwargs):
        chain = chain or [(CPU, {})]
        tried.append(chain)
        if chain[0][0] in (TENSORRT, CUDA) and len(chain) > 1:
            raise ProviderError(f"{model}: {chain[0][0]} failed to start: simulated")
        return real_create(model, options, chain, **kwargs)

    monkeypatch.setattr(session_module, "create_session", create)
    with pytest.warns(RuntimeWarning, match="auto: trying") as caught:
        session = Session(model_path, "auto", provider_config=ProviderConfig(trt_max_batch=8), device_check=False)
    assert [w.filename for w in caught if "auto: trying" in str(w.message)] == [__file__] * 2  # at the caller
    assert [[n for n, _ in c] for c in tried] == [[CPU], [TENSORRT, CUDA, CPU], [CUDA, CPU], [CPU]]
    assert tried[1][0][1]["trt_profile_min_shapes"] == "image:1x3x32x32"
    assert tried[1][0][1]["trt_profile_max_shapes"] == "image:8x3x32x32"
    assert session.providers == [CPU] and session.provider_chain == [(CPU, {})]
    with pytest.raises(ProviderError, match="failed to start: simulated"):
        Session(model_path, "tensorrt")


def test_onnxruntime_is_never_left_to_fall_back_on_its_own(monkeypatch, model_path):
    """Its fallback prints to stdout and drops the provider options; ours warns instead."""
    seen = []
    real = ort.InferenceSession

    def session(*args, **kwargs):
        seen.append(kwargs.get("enable_fallback"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    Session(model_path, "cpu")
    assert seen and set(seen) == {0}


def test_a_broken_file_named_cuda_is_a_model_error_not_a_provider_error(monkeypatch, tmp_path):
    junk = tmp_path / "stn.cuda.onnx"
    junk.write_bytes(b"not an onnx file")
    monkeypatch.setattr(providers, "available_providers", lambda: CUDA_BUILD)
    with pytest.raises(ModelFileError, match="onnxruntime cannot load it"):
        Session(junk, "auto")


def test_class_names_must_match_the_model_output(tmp_path, model_path):
    import onnx

    from stn_deploy import metadata as md

    model = onnx.load(model_path)
    for prop in model.metadata_props:
        if prop.key == md.CLASS_NAMES:
            prop.value = json.dumps(["only"])
    bad = tmp_path / "one_name.onnx"
    onnx.save(model, bad)
    with pytest.raises(ModelFileError, match="'log_probs' has 10 classes but the metadata names 1"):
        Session(bad, "cpu")


# -- real CPU sessions ---------------------------------------------------------------------------
def test_session_reads_metadata_and_runs_batches(model_path):
    session = Session(model_path, "cpu", threads=1)
    assert session.providers == [CPU] and session.provider == CPU
    assert session.input_name == "image"
    assert session.output_names == ["log_probs", "theta", "warped"]
    assert session.class_names == [f"class_{i}" for i in range(10)]
    assert session.preprocessing.input_shape == (3, 32, 32) and session.preprocessing.std == (0.25, 0.25, 0.25)
    assert session.has_theta and session.has_warped and not session.io_binding

    x = np.random.default_rng(0).normal(size=(10, 3, 32, 32)).astype(np.float32)
    full = session.run(x)
    assert (
        full["log_probs"].shape == (10, 10)
        and full["theta"].shape == (10, 2, 3)
        and full["warped"].shape == (10, 3, 32, 32)
    )
    np.testing.assert_allclose(np.exp(full["log_probs"]).sum(1), 1.0, rtol=1e-5)
    # Batches of 4: 4 + 4 + a partial 2, same numbers as one run.
    parts = list(session.predict(x, batch_size=4, output_names=["log_probs"]))
    assert [len(p["log_probs"]) for p in parts] == [4, 4, 2]
    np.testing.assert_allclose(np.concatenate([p["log_probs"] for p in parts]), full["log_probs"], atol=1e-6)
    with pytest.raises(ValueError, match=r"expected a \[N, 3, 32, 32\] batch"):
        session.run(np.zeros((2, 1, 32, 32), np.float32))


def test_io_binding_path_gives_the_same_outputs(model_path):
    x = np.random.default_rng(1).normal(size=(5, 3, 32, 32)).astype(np.float32)
    plain = Session(model_path, "cpu", threads=1).run(x)
    bound = Session(model_path, "cpu", threads=1, io_binding=True)
    assert bound.io_binding
    out = bound.run(x)
    for name in plain:
        np.testing.assert_array_equal(out[name], plain[name])


def test_the_warm_up_batch_is_deterministic_and_every_row_differs(model_path):
    with Session(model_path, "cpu", threads=1, warmup=0, record_placement=False, device_check=False) as session:
        x = session._warmup_input(8)
        assert x.shape == (8, 3, 32, 32) and x.dtype == np.float32
        assert np.array_equal(x, session._warmup_input(8))
        assert len({row.tobytes() for row in x}) == 8 and x.min() >= -2 and x.max() < 2
        assert abs(float(x.mean())) < 0.05 and 1.0 < float(x.std()) < 1.3  # spread like normalized pixels


def test_session_options_are_applied(model_path):
    session = Session(model_path, "cpu", threads=1, graph_optimization="basic", spin=False, warmup=2, warmup_batch=3)
    opts = session.session_options
    assert opts.intra_op_num_threads == 1
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    seen: list[tuple[int, ...]] = []
    real_run = session._session.run
    session._session = type(
        "Spy", (), {"run": lambda _, names, feeds: seen.append(feeds["image"].shape) or real_run(names, feeds)}
    )()
    assert session.warmup(2, batch=3) > 0
    assert seen == [(3, 3, 32, 32)] * 2  # two runs of a batch of three
    assert session.warmup(0) == 0.0 and len(seen) == 2
    with pytest.raises(ProviderError, match="graph_optimization must be one of"):
        Session(model_path, "cpu", graph_optimization="max")


def test_streams_cut_the_batch_and_give_the_same_outputs(model_path):
    """streams=2: two threads of 1 intra-op thread each take chunks of the batch in turn; every
    output equals the one-stream run, in the batch's order."""
    one = Session(model_path, "cpu", threads=2)
    two = Session(model_path, "cpu", threads=2, streams=2)
    assert two.describe()["streams"] == 2 and two.session_options.intra_op_num_threads == 1
    x = np.random.default_rng(3).standard_normal((37, *one.preprocessing.input_shape), dtype=np.float32)
    for n in (1, 2, 9, 37):  # 1 runs on one stream; 9 is cut 5 + 4; 37 into 3 chunks of <= STREAM_CHUNK
        a, b = one.run(x[:n]), two.run(x[:n])
        assert set(a) == set(b) == set(one.output_names)
        for name in a:
            assert b[name].shape == a[name].shape
            np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-5)
    with pytest.raises(ProviderError, match="streams must be >= 1"):
        Session(model_path, "cpu", streams=0)
    with pytest.raises(ProviderError, match="3 streams need at least 3 threads"):
        Session(model_path, "cpu", threads=2, streams=3)


def test_streams_report_a_failed_chunk_after_the_other_chunks_ran(model_path, monkeypatch):
    """An error in one chunk reaches the caller once no stream thread is still running."""
    two = Session(model_path, "cpu", threads=2, streams=2)
    real_run, sizes, lock = two._session.run, [], threading.Lock()

    def run(names, feeds):
        with lock:  # both stream threads call this: count under a lock, so exactly one call fails
            sizes.append(len(feeds[two.input_name]))
            fail = len(sizes) == 2
        if fail:
            raise RuntimeError("chunk failed")
        return real_run(names, feeds)

    monkeypatch.setattr(two._session, "run", run)
    x = np.zeros((3 * STREAM_CHUNK, *two.preprocessing.input_shape), dtype=np.float32)
    with pytest.raises(RuntimeError, match="chunk failed"):
        two.run(x)
    assert sorted(sizes) == [STREAM_CHUNK] * 3  # the other thread took the remaining chunks


def test_placement_report_on_cpu(model_path):
    session = Session(model_path, "cpu", threads=1)
    report = session.placement()
    assert report.nodes, "the profiler recorded no kernel events"
    assert set(report.counts) == {CPU}
    ops = {n.op_type for n in report.nodes}
    assert {"Conv", "GridSample"} <= ops
    assert report.cpu_fallback == [] and not report.gpu
    assert report.summary().startswith(f"{len(report.nodes)} nodes (CPU: {len(report.nodes)})")
    assert session.check_placement(strict=True) is report  # nothing to complain about on CPU
    d = report.to_dict()
    assert d["counts"] == {CPU: len(report.nodes)} and json.dumps(d)
    # The profiler is off after the first run: no trace files accumulate.
    session.run(np.zeros((2, 3, 32, 32), np.float32))
    assert session._session.end_profiling() == ""


def test_placement_flags_compute_left_on_cpu_in_a_gpu_run():
    """Parsing a (synthetic) CUDA trace: shape-only CPU nodes are expected, compute is not."""
    events = [
        {"cat": "Session", "name": "model_run", "args": {}},
        {
            "cat": "Node",
            "name": "conv1_kernel_time",
            "args": {"op_name": "Conv", "provider": CUDA, "output_type_shape": [{"float": [1, 16, 28, 28]}]},
        },
        {
            "cat": "Node",
            "name": "shape_kernel_time",
            "args": {"op_name": "Shape", "provider": CPU, "output_type_shape": [{"int64": [4]}]},
        },
        {
            "cat": "Node",
            "name": "grid_kernel_time",
            "args": {"op_name": "GridSample", "provider": CPU, "output_type_shape": [{"float": [1, 3, 32, 32]}]},
        },
        {
            "cat": "Node",
            "name": "copy_kernel_time",
            "args": {"op_name": "MemcpyToHost", "provider": CUDA, "output_type_shape": [{"float": [1, 3, 32, 32]}]},
        },
        {"cat": "Node", "name": "conv1_kernel_time", "args": {"op_name": "Conv", "provider": CUDA}},  # a second run
    ]
    report = parse_profile(events, [CUDA, CPU])
    assert report.counts == {CUDA: 2, CPU: 2}
    assert [n.op_type for n in report.cpu_fallback] == ["GridSample"]
    assert report.copies == 1
    assert "1 compute node(s) fell back to CPU: GridSample" in report.summary()
    cpu_only = PlacementReport(providers=[CPU], nodes=[NodePlacement("g", "GridSample", CPU, ("float",))])
    assert cpu_only.cpu_fallback == []


def test_strict_placement_raises_and_default_warns(model_path, monkeypatch):
    session = Session(model_path, "cpu", threads=1)
    fake = PlacementReport(
        providers=[CUDA, CPU],
        nodes=[NodePlacement("g", "GridSample", CPU, ("float",)), NodePlacement("c", "Conv", CUDA, ("float",))],
    )
    monkeypatch.setattr(session, "_placement", fake)
    monkeypatch.setattr(session, "providers", [CUDA, CPU])
    seen: list[str] = []
    session.check_placement(strict=False, warn=seen.append)
    assert len(seen) == 1 and "1 of 2 nodes run on the CPU under CUDA (GridSample)" in seen[0]
    with pytest.raises(ProviderError, match="strict-placement"):
        session.check_placement(strict=True)


def test_bad_model_files(tmp_path):
    with pytest.raises(ModelFileError, match="no such model file"):
        Session(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf")
    with pytest.raises(ModelFileError, match="onnxruntime cannot load it"):
        Session(junk, "cpu")


def test_model_without_stn_metadata_is_refused(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["log_probs"])],
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, ["N", 3, 32, 32])],
    )
    path = tmp_path / "plain.onnx"
    # IR version 10: what onnxruntime 1.30 reads (onnx 1.23's helper defaults to 14)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    with pytest.raises(ModelFileError, match="no 'stn_deploy.preprocessing' metadata"):
        Session(path, "cpu")


def test_runtime_imports_no_torch():
    code = "import sys, stn_deploy.runtime, stn_deploy.images, stn_deploy.infer.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- real GPU providers, where present -----------------------------------------------------------
def _skip_without_gpu(provider: str, needs: str) -> None:
    """Skip, with the reason, unless this onnxruntime build has ``provider`` and an NVIDIA driver
    is installed. (onnxruntime-gpu lists its GPU providers on any machine; without the driver's
    libcuda they cannot start: a missing GPU, not a failure of the code under test.)"""
    import ctypes

    if provider not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} here has no {provider} (needs {needs})")
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        pytest.skip(f"onnxruntime {ort.__version__} lists {provider}, but no NVIDIA driver (libcuda.so.1) is here")


@pytest.mark.cuda
def test_cuda_session_matches_cpu(model_path):
    _skip_without_gpu(CUDA, "onnxruntime-gpu and a GPU")
    x = np.random.default_rng(2).normal(size=(8, 3, 32, 32)).astype(np.float32)
    cpu = Session(model_path, "cpu").run(x)
    cuda = Session(model_path, "cuda", provider_config=ProviderConfig(cuda_conv_algo_search="HEURISTIC"))
    assert cuda.provider == CUDA and cuda.io_binding
    out = cuda.run(x)
    np.testing.assert_allclose(out["log_probs"], cpu["log_probs"], atol=1e-4)
    report = cuda.placement()
    assert report.counts.get(CUDA, 0) > 0, report.summary()


@pytest.mark.tensorrt
def test_tensorrt_session_matches_cpu(model_path, tmp_path):
    _skip_without_gpu(TENSORRT, "onnxruntime-gpu with TensorRT")
    x = np.random.default_rng(3).normal(size=(8, 3, 32, 32)).astype(np.float32)
    cpu = Session(model_path, "cpu").run(x)
    trt = Session(
        model_path, "tensorrt", provider_config=ProviderConfig(trt_engine_cache=tmp_path / "trt", trt_max_batch=8)
    )
    assert trt.provider == TENSORRT
    np.testing.assert_allclose(trt.run(x)["log_probs"], cpu["log_probs"], atol=1e-3)
    assert any(tmp_path.joinpath("trt").iterdir()), "no TensorRT engine was cached"


def test_streams_auto_cuts_only_large_cpu_batches_and_gives_the_same_outputs(model_path):
    auto = Session(model_path, "cpu", threads=2)  # streams="auto" is the default
    one = Session(model_path, "cpu", threads=2, streams=1)
    assert auto.requested_streams == "auto" and auto.streams == 2
    assert [auto.streams_for(n) for n in (1, 8, STREAMS_MIN_BATCH - 1, STREAMS_MIN_BATCH, 256)] == [1, 1, 1, 2, 2]
    assert auto.session_options.intra_op_num_threads == 2  # small batches keep both threads in one stream
    x = np.random.default_rng(5).standard_normal((STREAMS_MIN_BATCH + 3, 3, 32, 32), dtype=np.float32)
    for n in (1, len(x)):
        np.testing.assert_allclose(auto.run(x[:n])["log_probs"], one.run(x[:n])["log_probs"], rtol=0, atol=1e-5)
    assert Session(model_path, "cpu", threads=1).streams == 1  # one thread: nothing to share out
    auto.close()
    one.close()


def test_a_closed_session_refuses_to_run_and_closes_once(model_path):
    with Session(model_path, "cpu", threads=2, streams=2) as session:
        session.run(np.zeros((40, 3, 32, 32), np.float32))
        pool = session._stream_pool
        assert pool is not None
    assert session._stream_pool is None and pool._shutdown
    session.close()  # idempotent
    with pytest.raises(ProviderError, match="session is closed"):
        session.run(np.zeros((1, 3, 32, 32), np.float32))


def test_the_streams_session_never_keeps_the_placement_profiler_on(model_path):
    """A warm-up batch large enough for streams builds the streams' session during the warm-up;
    it must not inherit the placement profiler (which would keep every run's events in memory)."""
    session = Session(model_path, "cpu", threads=2, warmup_batch=STREAMS_MIN_BATCH)  # streams="auto"
    assert session._stream_session is not None  # built by the warm-up
    session.run(np.zeros((STREAMS_MIN_BATCH, 3, 32, 32), np.float32))
    assert session._stream_session.end_profiling() == ""  # "" : the profiler was never on
    assert session._session.end_profiling() == ""  # the first session's stopped after the warm-up
