"""stn-bench on the CPU with tiny iteration counts: real sessions, real PyTorch, real files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import assert_cli_error, make_checkpoint
from stn_deploy import metadata as md
from stn_deploy.bench import BackendUnavailable, OrtRunner, TorchRunner, main, plan_backends
from stn_deploy.export import export_model
from stn_deploy.export.quantize import quantize_int8
from stn_deploy.train.model import STNConfig

SMALL = STNConfig(conv_channels=(8, 16), fc_hidden=32, loc_channels=(8, 16), loc_hidden=16)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    ckpt = make_checkpoint(root / "b.pt", SMALL, seed=5)
    export_model(ckpt, root / "b.onnx", parity_samples=8, progress=False)
    return ckpt, root / "b.onnx"


@pytest.fixture(scope="module")
def int8_file(exported, tmp_path_factory):
    """A real int8 file of the small model (calibrated on noise: these tests time it, not score it)."""
    _, onnx_path = exported
    out = tmp_path_factory.mktemp("bench_int8") / "b.int8.onnx"
    cal = np.random.default_rng(1).standard_normal((32, 3, 32, 32), dtype=np.float32)
    quantize_int8(onnx_path, out, cal, max_accuracy_drop=None)
    return out


def _load_reason(runner) -> str:
    with pytest.raises(BackendUnavailable) as exc:
        runner.load()
    return str(exc.value)


def test_runners_share_one_interface_and_agree(exported):
    ckpt, onnx_path = exported
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    eager, ort_cpu = TorchRunner(ckpt, "cpu", threads=1), OrtRunner(onnx_path, "cpu", "fp32", threads=1)
    eager.load()
    ort_cpu.load()
    a, b = eager.infer(x), ort_cpu.infer(x)
    assert a.shape == b.shape == (3, 10)
    assert np.abs(a - b).max() <= 1e-4


def test_stn_bench_json_table_and_plot(exported, tmp_path):
    ckpt, onnx_path = exported
    png = tmp_path / "bench.png"
    args = [
        "--model",
        str(onnx_path),
        "--checkpoint",
        str(ckpt),
        "--batch-sizes",
        "1,4",
        "--threads",
        "1",
        "--warmup",
        "1",
        "--iterations",
        "2",
        "--rounds",
        "2",
        "--inputs",
        "random",
        "-q",
    ]
    result = CliRunner().invoke(main, [*args, "--json", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    status = {b["name"]: b for b in report["backends"]}
    assert status["pytorch-eager-cpu"]["status"] == "ok" and status["ort-cpu-fp32"]["status"] == "ok"
    # a backend that cannot run here is listed with its reason
    assert status["ort-cpu-int8"]["status"] == "skipped" and "--int8-model" in status["ort-cpu-int8"]["reason"]
    for name in ("ort-cuda-fp32", "ort-tensorrt-fp32"):  # no GPU here: skipped, with the reason, never failed
        assert status[name]["status"] in ("ok", "skipped"), status[name]
        assert status[name]["status"] == "ok" or "CUDA" in status[name]["reason"] or "no " in status[name]["reason"]
    rows = {(r["backend"], r["batch_size"]): r for r in report["results"]}
    for bs in (1, 4):
        eager, cpu = rows[("pytorch-eager-cpu", bs)], rows[("ort-cpu-fp32", bs)]
        assert eager["ratio_to_eager"] == pytest.approx(1.0)
        assert cpu["iterations"] == 2 and cpu["p50_ms"] <= cpu["p99_ms"]
        assert cpu["ratio_to_eager"] == pytest.approx(cpu["throughput"] / eager["throughput"])
        assert cpu["throughput"] == pytest.approx(bs / (cpu["p50_ms"] / 1000))
    assert report["threads"] == 1 and report["machine"]["logical_cpus"]
    assert report["settle_ms"] == 100.0  # the pause before each backend's turn, recorded with the results
    assert report["rewarm_ms"] == 100.0  # and the untimed calls after it
    assert report["agreement"]["ort-cpu-fp32"]["top1_agreement"] == 100.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = CliRunner().invoke(main, [*args, "--backends", "ort-cpu-fp32", "--settle-ms", "0", "--rewarm-ms", "5"])
    assert table.exit_code == 0, table.output
    assert "ort-cpu-fp32" in table.stdout and "x eager" in table.stdout and "p99 ms" in table.stdout
    assert "0 ms settle, 5 ms re-warm" in table.stdout


def test_stn_bench_bad_input_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["--model", str(tmp_path / "missing.onnx")])
    assert_cli_error(result, 1, "missing.onnx")


def test_openvino_int8_row_reads_its_own_model_when_given(tmp_path):
    fp32, int8, plain = tmp_path / "m.onnx", tmp_path / "m.int8.onnx", tmp_path / "m_plain.int8.onnx"
    runners = {b.runner.name: b for b in plan_backends(fp32, None, int8, None, 2, openvino_int8_model=plain)}
    assert runners["ort-cpu-int8"].runner.model == int8
    assert runners["openvino-cpu-int8"].runner.model == plain
    runners = {b.runner.name: b for b in plan_backends(fp32, None, int8, None, 2)}
    assert runners["openvino-cpu-int8"].runner.model == int8
    runners = {b.runner.name: b for b in plan_backends(fp32, None, None, None, 2)}
    missing = runners["openvino-cpu-int8"].runner
    assert missing.model is None and "--openvino-int8-model" in _load_reason(missing)  # skipped with its reason


def test_no_device_check_reaches_every_gpu_row_and_the_check_is_on_by_default(tmp_path):
    fp32 = tmp_path / "m.onnx"
    for flag, expected in ((True, True), (False, False)):
        gpu_rows = [
            b.runner
            for b in plan_backends(fp32, None, None, None, 2, device_check=flag)
            if isinstance(b.runner, OrtRunner) and b.runner.device == "cuda"
        ]
        assert len(gpu_rows) == 5 and all(r.device_check is expected for r in gpu_rows)
    option = next(p for p in main.params if p.name == "device_check")
    assert option.default is True and "--no-device-check" in option.secondary_opts


def test_streams_rows_twin_the_cpu_rows(exported, int8_file, tmp_path):
    ckpt, onnx_path = exported
    plan = plan_backends(onnx_path, None, int8_file, None, 2, streams=2)
    names = [b.runner.name for b in plan]
    for base in ("ort-cpu-fp32", "ort-cpu-int8", "openvino-cpu-default", "openvino-cpu-f32", "openvino-cpu-int8"):
        assert names.index(base + "-2streams") == names.index(base) + 1  # each twin follows its row
        assert {b.runner.name: b.runner for b in plan}[base + "-2streams"].streams == 2
    assert not any(n.endswith("streams") for n in names if "cuda" in n or "tensorrt" in n or "pytorch" in n)

    args = [
        "--model",
        str(onnx_path),
        "--checkpoint",
        str(ckpt),
        "--batch-sizes",
        "1,6",
        "--threads",
        "2",
        "--warmup",
        "1",
        "--iterations",
        "2",
        "--rounds",
        "1",
        "--inputs",
        "random",
        "--settle-ms",
        "0",
        "-q",
    ]
    result = CliRunner().invoke(
        main, [*args, "--streams", "2", "--backends", "ort-cpu-fp32,ort-cpu-fp32-2streams", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["streams"] == 2
    rows = {(r["backend"], r["batch_size"]) for r in report["results"]}
    assert {("ort-cpu-fp32-2streams", 1), ("ort-cpu-fp32-2streams", 6), ("ort-cpu-fp32", 6)} <= rows
    assert report["agreement"]["ort-cpu-fp32-2streams"]["max_abs_diff"] <= 1e-4
    assert_cli_error(CliRunner().invoke(main, [*args, "--streams", "3"]), 2, "3 streams need at least 3 threads")


def test_a_failing_backend_is_a_row_and_the_others_run(exported, tmp_path):
    ckpt, onnx_path = exported
    not_onnx = tmp_path / "broken.int8.onnx"
    not_onnx.write_bytes(b"not a model")
    png = tmp_path / "bench.png"
    args = [
        "--model",
        str(onnx_path),
        "--checkpoint",
        str(ckpt),
        "--int8-model",
        str(not_onnx),
        "--batch-sizes",
        "2,1,2",
        "--threads",
        "1",
        "--warmup",
        "0",
        "--iterations",
        "2",
        "--rounds",
        "1",
        "--inputs",
        "random",
        "--settle-ms",
        "0",
        "--backends",
        "ort-cpu-fp32,ort-cpu-int8",
        "-q",
        "--json",
    ]
    result = CliRunner().invoke(main, [*args, "--plot", str(png)])
    assert result.exit_code == 3, result.output  # finished, but a backend failed
    report = json.loads(result.stdout)
    status = {b["name"]: b for b in report["backends"]}
    assert status["ort-cpu-int8"]["status"] == "failed" and "broken.int8.onnx" in status["ort-cpu-int8"]["reason"]
    assert status["ort-cpu-fp32"]["status"] == "ok" and status["pytorch-eager-cpu"]["status"] == "ok"
    assert report["batch_sizes"] == [2, 1]  # a repeated size would pool two passes into one row
    assert sorted((r["backend"], r["batch_size"], r["iterations"]) for r in report["results"]) == [
        ("ort-cpu-fp32", 1, 2),
        ("ort-cpu-fp32", 2, 2),
        ("pytorch-eager-cpu", 1, 2),
        ("pytorch-eager-cpu", 2, 2),
    ]
    assert "ort-cpu-int8" not in report["agreement"] and png.is_file()  # the plot still comes


def test_bad_checkpoint_and_plot_paths_fail_before_the_run(exported, tmp_path):
    ckpt, onnx_path = exported
    gray = make_checkpoint(tmp_path / "gray.pt", STNConfig(in_channels=1, image_size=28), seed=1)
    base = ["--model", str(onnx_path), "--batch-sizes", "1", "--iterations", "1", "--inputs", "random", "-q"]
    assert_cli_error(
        CliRunner().invoke(main, [*base, "--checkpoint", str(gray)]), 1, "gray.pt: takes [1, 28, 28] inputs"
    )
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    assert_cli_error(CliRunner().invoke(main, [*base, "--checkpoint", str(junk)]), 1, "junk.pt")
    assert_cli_error(CliRunner().invoke(main, [*base, "--plot", str(tmp_path)]), 2, "is a directory")
    assert_cli_error(CliRunner().invoke(main, [*base, "--backends", "bogus"]), 2, "unknown backend(s) bogus")

    # the results are printed first; then the plot's bad path is the error
    result = CliRunner().invoke(main, [*base, "--backends", "ort-cpu-fp32", "--plot", str(junk / "p.png")])
    assert_cli_error(result, 1, f"{junk}: a part of this path is a file")
    assert "ort-cpu-fp32" in result.stdout


def test_variants_beside_the_model_are_found(exported, int8_file, tmp_path):
    """stn-export writes stn.int8.onnx / stn.fp16.onnx beside stn.onnx; stn-bench picks them up."""
    import shutil

    _, onnx_path = exported
    model = tmp_path / "stn.onnx"
    shutil.copy(onnx_path, model)
    args = _quick(model, "--json", "--backends", "ort-cpu-int8")
    alone = json.loads(CliRunner().invoke(main, args).stdout)
    int8_row = next(b for b in alone["backends"] if b["name"] == "ort-cpu-int8")
    assert int8_row["status"] == "skipped" and "no stn.int8.onnx beside --model" in int8_row["reason"]

    shutil.copy(int8_file, tmp_path / "stn.int8.onnx")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    int8_row = next(b for b in json.loads(result.stdout)["backends"] if b["name"] == "ort-cpu-int8")
    assert int8_row["status"] == "ok" and int8_row["model"] == str(tmp_path / "stn.int8.onnx")
    assert "int8 rows read" in result.stderr


def test_rows_are_named_by_what_the_file_is_not_by_the_flag(exported, int8_file):
    """An int8 file given as --model is an int8 row; its precision comes from the graph."""
    _, onnx_path = exported
    names = [b.runner.name for b in plan_backends(int8_file, None, None, None, 1)]
    assert "ort-cpu-int8" in names and "ort-cpu-fp32" not in names
    dup = [b for b in plan_backends(int8_file, None, int8_file, None, 1) if b.runner.name == "ort-cpu-int8"]
    assert [b.status for b in dup] == ["pending", "skipped"] and "already in the table" in dup[1].reason


def _quick(model, *extra: str, batch_sizes: str = "1", inputs: str | None = "random") -> list[str]:
    """stn-bench arguments for a run of seconds: one timed call per cell, no pause between turns."""
    args = ["--model", str(model), "--batch-sizes", batch_sizes, "--iterations", "1"]
    args += ["--inputs", inputs] if inputs else []
    return [*args, "--settle-ms", "0", "-q", *extra]


def _with_metadata(src, dst, **props):
    import onnx

    model = onnx.load(str(src))
    current = {p.key: p.value for p in model.metadata_props}
    onnx.helper.set_model_props(model, {**current, **props})
    onnx.save(model, str(dst))
    return dst


def test_the_model_file_never_chooses_what_stn_bench_reads(exported, tmp_path):
    """--inputs auto reads a dataset only when the metadata names a built-in one; an
    imagefolder: path in the file is ignored (random inputs), whatever is at that path."""
    _, onnx_path = exported
    trap = tmp_path / "trap"
    (trap / "a").mkdir(parents=True)
    (trap / "a" / "x.png").write_bytes(b"not read")
    model = _with_metadata(onnx_path, tmp_path / "m.onnx", **{md.DATASET: f"imagefolder:{trap}"})
    args = _quick(model, "--json", "--backends", "ort-cpu-fp32", inputs=None)  # --inputs auto
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["inputs"] == "random"


def test_a_backend_that_returns_nan_fails_instead_of_agreeing(exported, tmp_path, monkeypatch):
    ckpt, onnx_path = exported
    real = OrtRunner.infer

    def nan_infer(self, batch):
        out = real(self, batch)
        return np.full_like(out, np.nan) if self.name == "ort-cpu-fp32" else out

    monkeypatch.setattr(OrtRunner, "infer", nan_infer)
    args = _quick(onnx_path, "--checkpoint", str(ckpt), "--json", "--backends", "ort-cpu-fp32")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)
    row = next(b for b in report["backends"] if b["name"] == "ort-cpu-fp32")
    assert row["status"] == "failed" and "non-finite" in row["reason"]
    assert "ort-cpu-fp32" not in report["agreement"]


def test_a_model_of_another_class_count_is_a_failed_row_and_a_checkpoint_one_line(exported, tmp_path):
    ckpt, onnx_path = exported
    five = make_checkpoint(
        tmp_path / "five.pt",
        STNConfig(conv_channels=(8, 16), fc_hidden=32, loc_channels=(8, 16), loc_hidden=16, num_classes=5),
        seed=2,
    )
    five_onnx = tmp_path / "five.onnx"
    export_model(five, five_onnx, parity_samples=4, progress=False)
    base = ["--batch-sizes", "1", "--iterations", "1", "--inputs", "random", "--settle-ms", "0", "-q"]
    assert_cli_error(
        CliRunner().invoke(main, ["--model", str(onnx_path), "--checkpoint", str(five), *base]),
        1,
        "five.pt: has 5 classes",
    )
    five_int8 = tmp_path / "five.int8.onnx"
    quantize_int8(five_onnx, five_int8, np.zeros((8, 3, 32, 32), np.float32) + 0.5, max_accuracy_drop=None)
    result = CliRunner().invoke(
        main,
        [
            "--model",
            str(onnx_path),
            "--checkpoint",
            str(ckpt),
            "--int8-model",
            str(five_int8),
            *base,
            "--json",
            "--backends",
            "ort-cpu-fp32,ort-cpu-int8",
        ],
    )
    assert result.exit_code == 3, result.output  # the run finished; the odd backend is a failed row
    rows = {b["name"]: b for b in json.loads(result.stdout)["backends"]}
    assert rows["ort-cpu-int8"]["status"] == "failed" and "returned 5 classes" in rows["ort-cpu-int8"]["reason"]
    assert rows["ort-cpu-fp32"]["status"] == "ok"


def test_excluded_int8_rows_are_not_announced(exported, int8_file, tmp_path):
    import shutil

    _, onnx_path = exported
    model = tmp_path / "stn.onnx"
    shutil.copy(onnx_path, model)
    shutil.copy(int8_file, tmp_path / "stn.int8.onnx")
    args = _quick(model, "--backends", "ort-cpu-fp32")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "int8 rows read" not in result.stderr and "ort-cpu-int8" not in result.stdout


def test_inputs_auto_falls_back_to_random_without_torch(exported, monkeypatch):
    """On a torch-free host the dataset cannot be rendered: random inputs, not an ImportError."""
    import builtins

    from stn_deploy.bench.measure import make_inputs
    from stn_deploy.runtime import Session

    _, onnx_path = exported
    model_meta = onnx_path
    real_import = builtins.__import__

    def no_train(name, *args, **kwargs):
        if name.startswith("stn_deploy.train"):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    with Session(model_meta, "cpu", warmup=0, record_placement=False) as session:
        monkeypatch.setattr(session.metadata, "props", {**session.metadata.props, md.DATASET: "digits"})
        monkeypatch.setattr(builtins, "__import__", no_train)
        images, source = make_inputs(session, 4, "auto")
    assert images.shape == (4, 3, 32, 32) and source == "random"


def test_streams_auto_rows_say_what_ran_at_each_batch_size(exported):
    _, onnx_path = exported
    args = _quick(onnx_path, "--threads", "2", "--json", "--backends", "ort-cpu-fp32", batch_sizes="1,64")
    report = json.loads(CliRunner().invoke(main, args).stdout)
    assert report["streams"] == "auto"
    assert {r["batch_size"]: r["streams"] for r in report["results"] if r["backend"] == "ort-cpu-fp32"} == {1: 1, 64: 2}
