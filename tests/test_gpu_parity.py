"""benchmarks/gpu_parity.py, the Python half of the one-shot GPU check, on the CPU.

The comparison, bounds, placement verdict and summary logic are plain numpy; ``check`` and the
probes run for real on the CPU provider (the GPU run uses the same code with ``--provider cuda``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import make_checkpoint
from stn_deploy.runtime import Session

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_parity.py"


@pytest.fixture(scope="module")
def gp():
    spec = importlib.util.spec_from_file_location("gpu_parity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_parity"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A checkpoint whose θ samples partly outside the image, exported to the ort target with θ."""
    from stn_deploy.export import export_model

    root = tmp_path_factory.mktemp("gpu_parity")
    ckpt = make_checkpoint(root / "stn.pt", seed=3, theta_bias=(0.9, 0.2, 0.3, -0.1, 1.1, -0.2))
    path = root / "stn.onnx"
    export_model(ckpt, path, with_theta=True, parity_samples=8, progress=False)
    return ckpt, path


def test_compare_reports_the_largest_difference_and_the_top1_agreement(gp):
    want = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]]))
    got = want.copy()
    got[1, 2] += 2e-5
    got[3] = np.log([0.4, 0.5, 0.1])  # top-1 moves from class 0 to class 1
    stats = gp.compare(got, want)
    assert stats["n"] == 4
    assert stats["top1_agreement"] == pytest.approx(75.0)
    assert stats["max_abs"] == pytest.approx(abs(np.log(0.4) - np.log(0.5)))
    assert stats["mean_abs"] == pytest.approx(np.abs(got - want).mean())
    assert not gp.verdict(stats, "fp32")
    same = gp.compare(want + 5e-5, want)
    assert same["max_abs"] == pytest.approx(5e-5) and same["top1_agreement"] == 100.0
    assert gp.verdict(same, "fp32")
    assert not gp.verdict(gp.compare(want + 2e-4, want), "fp32")  # over the 1e-4 bar
    with pytest.raises(ValueError, match="shapes differ"):
        gp.compare(want[:2], want)


def test_a_nan_output_never_passes(gp):
    want = np.log(np.full((2, 4), 0.25))
    got = want.copy()
    got[0, 1] = np.nan
    stats = gp.compare(got, want)
    assert stats["nan"] and math.isnan(stats["max_abs"])
    assert not gp.verdict(stats, "fp32") and not gp.verdict(stats, "fp16")


def test_fp16_bounds_count_only_visible_classes_and_are_stn_exports_own(gp):
    from stn_deploy.export import precision

    assert (gp.FP16_MAX_ABS_DIFF, gp.FP16_MIN_TOP1_AGREEMENT, gp.FP16_VISIBLE_LOG_PROB) == (
        precision.FP16_MAX_ABS_DIFF,
        precision.FP16_MIN_TOP1_AGREEMENT,
        precision.FP16_VISIBLE_LOG_PROB,
    )
    want = np.array([[-0.01, -5.0, -20.0]] * 100)
    got = want + np.array([0.01, -0.02, 3.0])  # a large error only on an invisible class (p < e^-10)
    stats = gp.compare_kinds({"random": got}, {"random": want}, "fp16")
    assert stats["max_abs"] == pytest.approx(0.02) and stats["max_abs_all"] == pytest.approx(3.0)
    assert stats["passed"] and stats["bounds"]["visible_floor"] == -10.0
    assert not gp.compare_kinds({"random": got}, {"random": want}, "fp32")["passed"]
    # 98 of 100 top-1 agree: under the fp16 bound of 99%.
    flipped = got.copy()
    flipped[:2] = want[:2][:, ::-1]
    assert not gp.compare_kinds({"random": flipped}, {"random": want}, "fp16")["passed"]


def test_batch_plan_runs_one_batch_of_each_size_then_the_largest(gp):
    assert gp.batch_plan(300, (1, 7, 256)) == [(0, 1), (1, 8), (8, 264), (264, 300)]
    assert gp.batch_plan(1290, (1, 7, 256, 1024)) == [(0, 1), (1, 8), (8, 264), (264, 1288), (1288, 1290)]
    assert gp.batch_plan(5, (1, 7)) == [(0, 1), (1, 5)]
    assert gp.batch_plan(0, (1,)) == []


def test_placement_verdict_names_where_gridsample_ran_and_what_fell_back(gp):
    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    nodes = [
        {"name": "conv", "op_type": "Conv", "provider": cuda},
        {"name": "grid", "op_type": "GridSample", "provider": cpu},
        {"name": "shape", "op_type": "Shape", "provider": cpu},
    ]
    report = {
        "nodes": nodes,
        "counts": {cuda: 1, cpu: 2},
        "copies": 2,
        "cpu_fallback": [{"name": "grid", "op_type": "GridSample"}],
    }
    v = gp.placement_verdict(report, "cuda")
    assert v["gridsample_on"] == [cpu] and v["cpu_fallback_ops"] == ["GridSample"]
    assert v["all_compute_on_provider"] is False and v["copies"] == 2
    nodes[1]["provider"] = cuda
    v = gp.placement_verdict({**report, "cpu_fallback": []}, "cuda")
    assert v["gridsample_on"] == [cuda] and v["all_compute_on_provider"] is True


def _check_args(models, ckpt, out, *, random: int, extreme: int, batches: str, extra=()) -> list[str]:
    """``gpu_parity.py check`` on the CPU provider with random and extreme-θ inputs only (no dataset)."""
    return [
        "check",
        *map(str, models),
        *("--checkpoint", str(ckpt), "--provider", "cpu", "--dataset-count", "0"),
        *("--random", str(random), "--extreme", str(extreme), "--batches", batches, "--json", str(out)),
        *extra,
    ]


def test_check_measures_placement_and_parity_of_a_real_model_on_the_cpu_provider(gp, exported, tmp_path):
    ckpt, model = exported
    out, placement = tmp_path / "parity.json", tmp_path / "placement.json"
    args = _check_args([model], ckpt, out, random=9, extreme=8, batches="1,7", extra=["--placement", str(placement)])
    assert gp.main(args) == 0
    report = json.loads(out.read_text())
    assert report["references"] == ["torch-cpu"] and report["inputs"] == {"random": 9}
    (m,) = report["models"]
    assert m["target"] == "ort" and m["precision"] == "fp32" and m["session"]["providers"] == ["CPUExecutionProvider"]
    assert m["placement"]["gridsample_on"] == ["CPUExecutionProvider"] and m["placement"]["all_compute_on_provider"]
    (c,) = m["comparisons"]
    assert c["onnx"] == "session" and c["reference"] == "torch-cpu" and c["passed"]
    assert c["max_abs"] <= 1e-4 and c["top1_agreement"] == 100.0
    # random inputs plus the four extreme-θ probes, two inputs each
    assert set(c["by_kind"]) == {"random", "extreme_theta_0", "extreme_theta_1", "extreme_theta_2", "extreme_theta_3"}
    assert c["n"] == 9 + 8 and m["extreme_theta"] == "4 probes x 2 inputs"
    nodes = json.loads(placement.read_text())[str(model)]["nodes"]
    assert {"GridSample", "Conv"} <= {n["op_type"] for n in nodes}


def test_check_records_a_broken_model_and_goes_on(gp, exported, tmp_path):
    ckpt, model = exported
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    out = tmp_path / "parity.json"
    args = _check_args([bad, model], ckpt, out, random=2, extreme=0, batches="1")
    assert gp.main(args) == 1
    first, second = json.loads(out.read_text())["models"]
    assert first["model"] == str(bad) and "error" in first
    assert second["comparisons"][0]["passed"]


def test_probe_ort_proves_a_node_ran_on_the_provider_without_importing_torch(tmp_path):
    """Run as gpu_check.sh runs it: its own process, in which torch must not be imported (torch would
    load the CUDA libraries for onnxruntime and hide a missing-library problem)."""
    out = tmp_path / "probe.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "probe-ort", "--provider", "cpu", "--json", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    info = json.loads(out.read_text())
    assert info["ok"] and info["nodes_ran_on"] == ["CPUExecutionProvider"] and info["output_correct"]
    assert info["torch_imported"] is False
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "probe-ort", "--provider", "cpu", "--expect-version", "0.0.0"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "expected 0.0.0" in done.stdout


def test_probe_provider_reports_an_unavailable_provider_as_skipped(gp, exported, tmp_path, monkeypatch):
    from stn_deploy import runtime

    _, model = exported
    monkeypatch.setattr(runtime, "available_providers", lambda: ["CPUExecutionProvider"])
    out = tmp_path / "trt.json"
    assert gp.main(["probe-provider", str(model), "--provider", "tensorrt", "--json", str(out)]) == 3
    info = json.loads(out.read_text())
    assert info["status"] == "skipped" and "TensorrtExecutionProvider" in info["reason"]
    assert gp.main(["probe-provider", str(model), "--provider", "cpu"]) == 0


def _bench(rows: list[tuple[str, int, float, float]]) -> dict:
    return {
        "results": [{"backend": b, "batch_size": bs, "throughput": tp, "p50_ms": p50} for b, bs, tp, p50 in rows],
        "backends": [{"name": "ort-tensorrt-fp32", "status": "skipped", "reason": "no TensorRT libraries"}],
    }


def test_summary_judges_the_issues_speed_targets_from_the_bench_rows(gp, tmp_path):
    bench = _bench(
        [
            ("pytorch-eager-cuda", 1, 2000.0, 0.5),
            ("pytorch-eager-cuda", 256, 100000.0, 2.56),
            ("ort-cuda-fp32", 1, 5000.0, 0.2),
            ("ort-cuda-fp32", 256, 120000.0, 2.13),
            ("ort-cuda-fp16", 1, 4000.0, 0.25),
            ("ort-cuda-fp16", 256, 150000.0, 1.71),
        ]
    )
    fp32, fp16, b1 = gp.bench_targets(bench)
    assert fp32["value"] == pytest.approx(1.2) and fp32["met"] is True
    assert fp16["value"] == pytest.approx(1.25) and fp16["met"] is False
    assert b1["value"] == pytest.approx(0.2) and b1["met"] is True and "ort-cuda-fp32" in b1["text"]
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    (work / "bench.json").write_text(json.dumps(bench))
    steps = [
        {"name": "install", "status": "ok", "rc": 0, "seconds": 12.5, "note": ""},
        {"name": "bench", "status": "FAILED", "rc": 3, "seconds": 60.1, "note": "a backend failed"},
    ]
    (work / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps) + "{truncated li")
    (work / "pytest-cuda.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_runtime" name="test_cuda" time="1.5"/>'
        '<testcase classname="tests.test_runtime" name="test_trt" time="0.1">'
        '<skipped message="no TensorRT"/></testcase>'
        "</testsuite></testsuites>"
    )
    assert gp.main(["summarize", str(work), "--out", str(out)]) == 0
    text = (out / "summary.md").read_text()
    assert "| install | ok | 0 | 12.5 |" in text and "| bench | FAILED | 3 | 60.1 | a backend failed |" in text
    assert "| ORT CUDA fp16 >= 1.5x fp32 @256 | 1.25x | NO |" in text
    assert "| ort-cuda-fp32 | 5000 (0.200) | 120000 (2.130) |" in text
    assert "ort-tensorrt-fp32: skipped: no TensorRT libraries" in text
    assert "- tests.test_runtime::test_trt: skipped no TensorRT" in text
    results = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in results["steps"]] == ["install", "bench"]  # the cut-off line is dropped
    assert results["pytest"]["counts"] == {"passed": 1, "skipped": 1}
    assert [t["met"] for t in results["bench_targets"]] == [True, False, True]


def test_summary_says_not_measured_when_rows_are_missing(gp, tmp_path):
    targets = gp.bench_targets(_bench([("pytorch-eager-cpu", 256, 900.0, 280.0)]))
    assert [t["text"] for t in targets] == ["not measured"] * 3 and all(t["met"] is None for t in targets)
    assert gp.summarize(tmp_path).startswith("# gpu_check summary")  # nothing there yet: still a summary


def test_fp32_math_switches_are_readable_and_settable_on_this_torch(gp):
    torch = pytest.importorskip("torch")
    before = gp.fp32_math(torch)
    assert before and set(before) in (set(gp._NEW_MATH), set(gp._OLD_MATH))
    ieee = gp.ieee_math(torch)
    try:
        gp.apply_math(torch, ieee)
        assert gp.fp32_math(torch) == {k: str(v) if isinstance(before[k], str) else v for k, v in ieee.items()}
    finally:
        gp.apply_math(torch, before)
    assert gp.fp32_math(torch) == before


def test_session_placement_feeds_the_verdict(gp, exported):
    _, model = exported
    report = Session(model, "cpu").placement().to_dict()
    v = gp.placement_verdict(report, "cpu")
    assert v["all_compute_on_provider"] and v["cpu_fallback"] == 0 and v["nodes"] == len(report["nodes"])


def test_a_failing_diagnostic_session_leaves_the_main_comparison(gp, exported, tmp_path, monkeypatch):
    """The extreme-θ and use_tf32=0 sessions are extras: if they cannot run, the placement and the
    user's session against PyTorch are still measured, and the failure is recorded."""
    ckpt, model = exported

    def broken(*args, **kwargs):
        raise RuntimeError("no such provider option")

    monkeypatch.setattr(gp, "raw_session", broken)
    out = tmp_path / "parity.json"
    args = _check_args([model], ckpt, out, random=8, extreme=8, batches="1,7")
    assert gp.main(args) == 0
    (m,) = json.loads(out.read_text())["models"]
    assert m["extreme_theta"] == "failed: RuntimeError: no such provider option"
    (c,) = m["comparisons"]
    assert set(c["by_kind"]) == {"random"} and c["passed"] and m["placement"]["all_compute_on_provider"]


def test_a_gpu_reference_that_cannot_start_is_recorded_and_the_cpu_one_goes_on(gp, exported, tmp_path, monkeypatch):
    """torch says it has CUDA, but moving the model there fails (no driver here): the CUDA references
    are recorded as errors, not fatal."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine really has CUDA")
    ckpt, model = exported
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = tmp_path / "parity.json"
    args = _check_args([model], ckpt, out, random=8, extreme=0, batches="8")
    assert gp.main(args) == 0
    report = json.loads(out.read_text())
    assert report["references"] == ["torch-cpu"] and set(report["reference_errors"]) == {
        "torch-cuda",
        "torch-cuda-ieee",
    }
    assert report["models"][0]["comparisons"][0]["passed"]
