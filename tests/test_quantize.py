"""int8 quantization and fp16 conversion of real exported models, and their gates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers import assert_cli_error, make_checkpoint
from stn_deploy import metadata as md
from stn_deploy.errors import DatasetError, ExportCheckError
from stn_deploy.export import export_model
from stn_deploy.export.cli import main as export_main
from stn_deploy.export.graph import theta_path_nodes, to_ir
from stn_deploy.export.graph_rewrites import EXACT_RULES, apply_rules, rewrite_exact, unfold_conv_rows
from stn_deploy.export.precision import FP16_MAX_ABS_DIFF, convert_fp16
from stn_deploy.export.quantize import CONFIGS, FAST_CPU, quantize_int8
from stn_deploy.train.model import STNConfig

SMALL = STNConfig(conv_channels=(8, 16), fc_hidden=32, loc_channels=(8, 16), loc_hidden=16)


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    """A small STN exported by stn-export (real export and checks), with a non-trivial θ head."""
    root = tmp_path_factory.mktemp("q")
    ckpt = make_checkpoint(root / "small.pt", SMALL, seed=3, theta_bias=(0.9, 0.1, 0.05, -0.1, 0.8, 0.0))
    # The raw export (no --optimize): these tests apply the rewrites themselves.
    export_model(ckpt, root / "small.onnx", parity_samples=16, optimize=False, progress=False)
    return root / "small.onnx"


def _images(n: int, seed: int) -> np.ndarray:
    """Smooth blobs in the normalized input range: image-like, not white noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    out = np.empty((n, 3, 32, 32), np.float32)
    for i in range(n):
        cy, cx, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.1, 0.3)]
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        out[i] = (blob[None] * rng.uniform(0.5, 1.0, (3, 1, 1)) - 0.5) / 0.25
    return out + rng.normal(0, 0.05, out.shape).astype(np.float32)


def _log_probs(path, images: np.ndarray) -> np.ndarray:
    """The file's first output (log_probs) on the CPU provider."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {md.INPUT: images})[0]


def _fp32_labels(path, images):
    return _log_probs(path, images).argmax(1)


def test_exact_rewrites_keep_outputs(small_onnx, tmp_path):
    model, counts, _ = rewrite_exact(onnx.load(str(small_onnx)))
    assert counts == {
        "relu_before_maxpool": 4,
        "affine_grid_as_matmul": 1,
        "crop_unpooled_conv_input": 1,
        "crop_through_pool": 1,
    }
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, tmp_path / "rewritten.onnx")
    x = _images(16, 1)
    assert np.abs(_log_probs(small_onnx, x) - _log_probs(tmp_path / "rewritten.onnx", x)).max() <= 1e-5


def test_unfold_conv_rows_keeps_outputs_and_makes_channels_a_multiple_of_4(small_onnx, tmp_path):
    model, counts, _ = apply_rules(onnx.load(str(small_onnx)), [*EXACT_RULES, unfold_conv_rows()])
    assert counts["unfold_conv_rows"] == 2  # the localization net's and the classifier's RGB convs
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: t for t in model.graph.initializer}
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        assert inits[conv.input[1]].dims[1] % 4 == 0
    onnx.save(model, tmp_path / "unfolded.onnx")
    x = _images(16, 7)
    assert np.abs(_log_probs(small_onnx, x) - _log_probs(tmp_path / "unfolded.onnx", x)).max() <= 1e-5


def test_pad_conv_input_channels_keeps_outputs(small_onnx, tmp_path):
    """The channel-padding alternative of INT8.md's comparison: zero channels, same outputs."""
    from stn_deploy.export.graph_rewrites import pad_conv_input_channels

    model, counts, _ = apply_rules(onnx.load(str(small_onnx)), [pad_conv_input_channels()])
    assert counts == {"pad_conv_input_channels": 2}  # both RGB convs
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: t for t in model.graph.initializer}
    assert all(inits[n.input[1]].dims[1] % 4 == 0 for n in model.graph.node if n.op_type == "Conv")
    onnx.save(model, tmp_path / "padded.onnx")
    x = _images(8, 9)
    assert np.abs(_log_probs(small_onnx, x) - _log_probs(tmp_path / "padded.onnx", x)).max() <= 1e-5


def test_quantize_int8_writes_a_running_model_with_report(small_onnx, tmp_path):
    cal, ev = _images(128, 2), _images(200, 3)
    labels = _fp32_labels(small_onnx, ev)  # fp32 is 100% right by construction: int8 accuracy = agreement
    out = tmp_path / "small.int8.onnx"
    report = quantize_int8(small_onnx, out, cal, eval_images=ev, eval_labels=labels, max_accuracy_drop=5.0)
    assert report.written and out.is_file()
    assert report.fp32_accuracy == 100.0
    assert report.int8_accuracy == pytest.approx(report.top1_agreement)
    assert report.accuracy_drop == pytest.approx(100.0 - report.int8_accuracy)
    assert report.config == FAST_CPU.to_dict()
    assert report.rewrites["unfold_conv_rows"] == 2 and report.op_counts.get("Concat") == 2
    assert report.op_counts.get("QuantizeLinear", 0) > 0 and report.op_counts.get("GridSample") == 1

    model = onnx.load(str(out))
    props = {p.key: p.value for p in model.metadata_props}
    source_props = {p.key: p.value for p in onnx.load(str(small_onnx)).metadata_props}
    assert props[md.PRECISION] == "int8"
    assert all(props[k] == v for k, v in source_props.items() if k != md.PRECISION)
    assert json.loads(props["stn_deploy.quantization"])["config"]["activation_type"] == "uint8"
    # the θ head's Gemm, the grid math and the sampler stay fp32: no DequantizeLinear feeds them
    producers = {o: n for n in model.graph.node for o in n.output}
    sampler = next(n for n in model.graph.node if n.op_type == "GridSample")
    assert producers[sampler.input[1]].op_type != "DequantizeLinear"
    # the image is quantized once, for the unfolding's Slices; the sampler reads the fp32 image
    assert [n.op_type for n in model.graph.node if md.INPUT in n.input].count("QuantizeLinear") == 1
    assert sampler.input[0] == md.INPUT and report.rewrites["float_readers_of_quantized_inputs"] == 1
    # the nodes kept out of quantization are the θ path of the graph that was quantized (rewritten fp32)
    rewritten, _, _ = apply_rules(onnx.load(str(small_onnx)), [*EXACT_RULES, unfold_conv_rows()])
    assert report.excluded_nodes and set(report.excluded_nodes) == set(theta_path_nodes(to_ir(rewritten).graph))
    kept_fp32 = {n.name: n for n in model.graph.node if n.name in report.excluded_nodes}
    assert set(kept_fp32) == set(report.excluded_nodes)
    # the θ Linear, the grid's reshapes and transpose, and the grid MatMul
    assert {n.op_type for n in kept_fp32.values()} >= {"Gemm", "Reshape", "Transpose", "MatMul"}
    # ... and they run in fp32: no weight or second operand of theirs is dequantized int8
    assert not any(
        i in producers and producers[i].op_type == "DequantizeLinear" for n in kept_fp32.values() for i in n.input[1:]
    )

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        assert session.run(None, {md.INPUT: ev[:n]})[0].shape == (n, 10)


def test_quantize_refuses_an_inaccurate_model_and_leaves_no_file(small_onnx, tmp_path):
    # Calibrated on blank images, every real activation saturates the int8 range.
    ev = _images(200, 4)
    labels = _fp32_labels(small_onnx, ev)
    out = tmp_path / "bad.int8.onnx"
    with pytest.raises(ExportCheckError, match="top-1 points"):
        quantize_int8(small_onnx, out, np.zeros((32, 3, 32, 32), np.float32), eval_images=ev, eval_labels=labels)
    assert not out.exists()
    assert not list(tmp_path.iterdir())
    # the same model with the gate turned off is written (the override)
    report = quantize_int8(
        small_onnx,
        out,
        np.zeros((32, 3, 32, 32), np.float32),
        eval_images=ev,
        eval_labels=labels,
        max_accuracy_drop=None,
    )
    assert report.written and report.accuracy_drop > 0.5 and out.is_file()


def test_fp16_conversion_and_parity(small_onnx, tmp_path):
    out = tmp_path / "small.fp16.onnx"
    report = convert_fp16(small_onnx, out, _images(6, 5))
    assert report.passed and report.written and out.is_file()
    assert report.max_abs_diff <= FP16_MAX_ABS_DIFF and report.top1_agreement >= 99.0
    model = onnx.load(str(out))
    f16 = onnx.TensorProto.FLOAT16
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == f16 for t in model.graph.initializer)
    assert {p.key: p.value for p in model.metadata_props}[md.PRECISION] == "fp16"
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    sampler = next(n for n in model.graph.node if n.op_type == "GridSample")
    assert types[sampler.output[0]] == onnx.TensorProto.FLOAT  # the sampler runs in fp32
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert types[conv.output[0]] == f16
    # Nothing kept in fp32 reads a value that went through fp16 on its way: no Cast(fp16) feeds a
    # kept node, the image reaches GridSample as given, and log_probs is not rounded to fp16.
    producer = {o: n for n in model.graph.node for o in n.output}

    def through_fp16(name: str) -> bool:
        node = producer.get(name)
        while node is not None and node.op_type == "Cast":
            if next(a.i for a in node.attribute if a.name == "to") == f16:
                return True
            node = producer.get(node.input[0])
        return False

    kept = {n.name for n in model.graph.node} & set(report.fp32_nodes)
    assert kept and report.fp32_nodes == sorted(report.fp32_nodes)
    for node in model.graph.node:
        if node.name in kept:
            assert not any(through_fp16(i) for i in node.input if i), node.name
    assert not through_fp16(md.LOG_PROBS)
    assert not through_fp16(sampler.input[0]) and not through_fp16(sampler.input[1])


def test_fp16_of_the_cuda_target_is_checked_on_a_cpu_too(tmp_path):
    """The cuda target's GridSample-16 names its mode 'bilinear', which onnx's reference evaluator
    (the CPU fp16 check) only knows by the opset-20 name: the check maps it and passes."""
    ckpt = make_checkpoint(tmp_path / "c.pt", SMALL, seed=4)
    cuda = tmp_path / "c.cuda.onnx"
    export_model(ckpt, cuda, target="cuda", parity_samples=8, progress=False)
    report = convert_fp16(cuda, tmp_path / "c.cuda.fp16.onnx", _images(4, 8), provider="reference")
    assert report.passed and report.written and report.checked_with == "onnx.reference.ReferenceEvaluator"


def test_fp16_refused_beyond_bounds(small_onnx, tmp_path, monkeypatch):
    import stn_deploy.export.precision as precision

    monkeypatch.setattr(precision, "FP16_MAX_ABS_DIFF", 1e-9)
    out = tmp_path / "tight.fp16.onnx"
    with pytest.raises(ExportCheckError, match="fp16_parity"):
        precision.convert_fp16(small_onnx, out, _images(2, 6))
    assert not out.exists()


def _image_dir(path, n: int, seed: int):
    """``n`` PNG files of :func:`_images` (de-normalized) in a new directory ``path``."""
    path.mkdir()
    for i, arr in enumerate(_images(n, seed)):
        pixels = np.clip((arr * 0.25 + 0.5) * 255, 0, 255).astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(pixels).save(path / f"{i:03d}.png")
    return path


def test_stn_export_quantize_from_an_image_directory(tmp_path):
    ckpt = make_checkpoint(tmp_path / "cli.pt", SMALL, seed=4)
    images = _image_dir(tmp_path / "calib", 24, 7)
    result = CliRunner().invoke(
        export_main,
        [
            str(ckpt),
            "--parity-samples",
            "8",
            "-q",
            "--json",
            "--quantize",
            "int8",
            "--calibration",
            str(images),
            "--max-accuracy-drop",
            "50",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["int8"]["written"] and payload["int8"]["calibration_samples"] == 24
    assert payload["int8"]["accuracy_drop_measure"].startswith("disagreement")
    assert payload["int8"]["eval_source"] == "the calibration images"  # unlabelled, and no test split to use
    assert (tmp_path / "cli.int8.onnx").is_file() and (tmp_path / "cli.onnx").is_file()

    # Class folders named after the model's classes give labels; with no held-out split the
    # gate scores on those same images, and the report says so.
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    for k in (0, 1):
        _image_dir(labelled / f"class_{k}", 6, 20 + k)
    scored = CliRunner().invoke(
        export_main,
        [
            str(tmp_path / "cli.onnx"),
            "-o",
            str(tmp_path / "lab.int8.onnx"),
            "-q",
            "--json",
            "--quantize",
            "int8",
            "--calibration",
            str(labelled),
            "--max-accuracy-drop",
            "50",
        ],
    )
    assert scored.exit_code == 0, scored.output
    report = json.loads(scored.stdout)["int8"]
    assert report["accuracy_drop_measure"] == "top-1 points" and report["eval_samples"] == 12
    assert report["eval_source"] == f"{labelled} (the calibration images: no held-out split)"

    # --int8-config plain: the same quantization without the row unfolding (the layout OpenVINO runs best)
    plain = CliRunner().invoke(
        export_main,
        [
            str(ckpt),
            "-o",
            str(tmp_path / "plain.onnx"),
            "--parity-samples",
            "8",
            "-q",
            "--json",
            "--quantize",
            "int8",
            "--int8-config",
            "plain",
            "--calibration",
            str(images),
            "--max-accuracy-drop",
            "50",
        ],
    )
    assert plain.exit_code == 0, plain.output
    report = json.loads(plain.stdout)["int8"]
    assert report["config"]["name"] == "plain" and report["config"]["unfold_conv_rows"] is False
    assert "unfold_conv_rows" not in report["rewrites"] and report["op_counts"].get("Concat", 0) == 0
    assert report["op_counts"].get("QuantizeLinear", 0) > 0
    session = ort.InferenceSession(str(tmp_path / "plain.int8.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {md.INPUT: _images(3, 8)})[0].shape == (3, 10)

    lone = CliRunner().invoke(
        export_main, [str(ckpt), "-o", str(tmp_path / "lone.onnx"), "-q", "--int8-config", "plain"]
    )
    assert_cli_error(lone, 2, "--quantize int8")
    assert not (tmp_path / "lone.onnx").exists()

    # no calibration samples: refused before the export starts
    uncalibrated = CliRunner().invoke(
        export_main, [str(ckpt), "-o", str(tmp_path / "u.onnx"), "-q", "--quantize", "int8"]
    )
    assert_cli_error(uncalibrated, 2, "--calibration")
    assert not (tmp_path / "u.onnx").exists()

    missing = CliRunner().invoke(
        export_main,
        [
            str(ckpt),
            "-o",
            str(tmp_path / "m.onnx"),
            "-q",
            "--quantize",
            "int8",
            "--calibration",
            str(tmp_path / "nope"),
        ],
    )
    assert_cli_error(missing, 1, "nope")
    assert not (tmp_path / "m.int8.onnx").exists()
    # a mistyped dataset name says so (it used to read "not available on this machine")
    from stn_deploy.preprocessing import Preprocessing
    from stn_deploy.train.data import load_image_samples as load_calibration

    with pytest.raises(DatasetError, match="digitz: not a directory, nor a dataset name"):
        load_calibration("digitz", Preprocessing())


def test_stn_export_derives_variants_from_an_exported_onnx_file(small_onnx, tmp_path):
    images = _image_dir(tmp_path / "calib", 24, 9)
    fp32 = tmp_path / "small.onnx"
    shutil.copy(small_onnx, fp32)
    before = fp32.read_bytes()
    run = lambda *args: CliRunner().invoke(export_main, [str(a) for a in args])  # noqa: E731

    plain = tmp_path / "small.plain.int8.onnx"
    result = run(
        fp32,
        "-q",
        "--json",
        "--quantize",
        "int8",
        "--int8-config",
        "plain",
        "--calibration",
        images,
        "--max-accuracy-drop",
        "50",
        "-o",
        plain,
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["source"] == str(fp32) and payload["int8"]["written"]
    assert payload["int8"]["config"]["name"] == "plain" and payload["int8"]["calibration_samples"] == 24
    assert fp32.read_bytes() == before and not (tmp_path / "small.int8.onnx").exists()
    quantized = onnx.load(str(plain))
    assert {p.key: p.value for p in quantized.metadata_props}[md.PRECISION] == "int8"
    session = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"])
    assert session.run(None, {md.INPUT: _images(3, 8)})[0].shape == (3, 10)

    fp16 = run(fp32, "-q", "--json", "--precision", "fp16")  # default name: beside MODEL
    assert fp16.exit_code == 0, fp16.output
    assert json.loads(fp16.stdout)["fp16"]["written"] and (tmp_path / "small.fp16.onnx").is_file()

    # Usage errors (exit 2) and bad MODEL files: one line each, no traceback, nothing written.
    cases = [
        (run(fp32, "-q"), 2, "--quantize int8"),
        (run(fp32, "-q", "--optimize", "--precision", "fp16"), 2, "--optimize"),
        (run(fp32, "-q", "--target", "cuda", "--precision", "fp16"), 2, "--target"),
        (
            run(
                fp32,
                "-q",
                "--quantize",
                "int8",
                "--calibration",
                images,
                "--precision",
                "fp16",
                "-o",
                tmp_path / "x.onnx",
            ),
            2,
            "two variants",
        ),
        (run(fp32, "-q", "--precision", "fp16", "-o", fp32), 2, "MODEL itself"),
        (run(plain, "-q", "--precision", "fp16", "-o", tmp_path / "y.onnx"), 1, "precision int8, not fp32"),
        (run(tmp_path / "missing.onnx", "-q", "--precision", "fp16"), 1, "no such model file"),
    ]
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    cases.append((run(tmp_path / "junk.onnx", "-q", "--precision", "fp16"), 1, "not an ONNX model"))
    (tmp_path / "a_dir.onnx").mkdir()
    cases.append((run(tmp_path / "a_dir.onnx", "-q", "--precision", "fp16"), 1, "is a directory"))
    cases.append((run(fp32, "-q", "--precision", "fp16", "-o", tmp_path / "a_dir.onnx"), 2, "is a directory"))
    cases.append((run(fp32, "-q", "--quantize", "int8", "-o", tmp_path / "z.onnx"), 2, "--calibration"))
    # -o inside a file: the conversion runs, then the write is refused, naming the file in the way
    cases.append(
        (run(fp32, "-q", "--precision", "fp16", "-o", fp32 / "x.onnx"), 1, f"{fp32}: a part of this path is a file")
    )
    for result, code, text in cases:
        assert_cli_error(result, code, text)
    assert not any((tmp_path / n).exists() for n in ("x.onnx", "y.onnx", "z.onnx", "junk.fp16.onnx"))
    assert fp32.read_bytes() == before


def test_portable_target_keeps_its_standard_op_sampler_in_fp32(tmp_path):
    """Without GridSample the sampler is Floor/Gather/Where math fed by θ: none of it is
    quantized (θ and the sampling coordinates would be uint8-rounded)."""
    dump = Path("sym_shape_infer_temp.onnx")  # onnxruntime 1.30 leaves it in the working directory
    dumped_before = dump.exists()
    ckpt = make_checkpoint(tmp_path / "p.pt", SMALL, seed=3, theta_bias=(0.9, 0.1, 0.05, -0.1, 0.8, 0.0))
    fp32 = tmp_path / "p.onnx"
    export_model(ckpt, fp32, target="portable", parity_samples=8, progress=False)
    report = quantize_int8(
        fp32, tmp_path / "p.int8.onnx", _images(32, 2), max_accuracy_drop=None, config=CONFIGS["plain"]
    )
    model = onnx.load(str(tmp_path / "p.int8.onnx"))
    excluded = {n.name: n for n in model.graph.node if n.name in report.excluded_nodes}
    assert {"Gemm", "Floor", "GatherElements", "Where"} <= {n.op_type for n in excluded.values()}
    assert "Conv" not in {n.op_type for n in excluded.values()}
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in excluded.values():  # no kept node reads a dequantized int8 tensor (the θ Gemm's
        # activation input is the int8 layer before it; its weights, as every other input, are fp32) ...
        inputs = node.input[1:] if node.op_type == "Gemm" else node.input
        fed = [producers[i] for i in inputs if i in producers]
        assert not any(f.op_type == "DequantizeLinear" for f in fed), node.name
    assert any(
        n.op_type == "QLinearConv" or n.op_type == "DequantizeLinear" for n in model.graph.node
    )  # ... yet convs are int8
    assert dumped_before or not dump.exists()  # ... and removed when it gives up
