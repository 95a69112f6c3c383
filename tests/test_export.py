"""stn-export end to end: real exports, real ONNX Runtime sessions, real parity numbers.

Exports are module-scoped and shared between tests (each costs a few seconds on a CPU).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from helpers import assert_cli_error, make_checkpoint
from stn_deploy import metadata as md
from stn_deploy.errors import CheckpointError, ExportCheckError
from stn_deploy.export import export_model
from stn_deploy.export.cli import main as stn_export
from stn_deploy.export.parity import THETA_PROBES
from stn_deploy.train.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.slow

CHECK_NAMES = ["onnx_checker", "shape_inference", "signature", "target_form", "batch_sizes", "parity"]
# The default export is optimized: the raw export's checks, the optimization, and every check again.
DEFAULT_CHECKS = [*CHECK_NAMES, "optimize", *("optimized_" + n for n in CHECK_NAMES)]


def _export(src, out, **kw):
    kw.setdefault("progress", False)
    return export_model(src, out, **kw)


@pytest.fixture(scope="module")
def target_exports(extreme_theta_checkpoint_path, tmp_path_factory):
    """The extreme-θ checkpoint (θ samples ~80% outside the image) exported for every target."""
    out = tmp_path_factory.mktemp("targets")
    reports = {}
    for target in ("ort", "cuda", "portable"):
        extra = {"with_theta": True, "with_warped": True} if target == "portable" else {}
        reports[target] = _export(
            extreme_theta_checkpoint_path, out / f"stn.{target}.onnx", target=target, parity_samples=128, **extra
        )
    return reports


def _nodes(path: Path) -> list[onnx.NodeProto]:
    return list(onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("target", ["ort", "cuda", "portable"])
def test_every_target_passes_every_check_on_extreme_theta(target_exports, target):
    report = target_exports[target]
    assert report.passed and report.optimized
    assert [c.name for c in report.checks] == DEFAULT_CHECKS
    assert report.output.is_file()
    for stats in (report.parity, report.optimized_parity):  # the written file is the optimized one
        assert stats.max_abs_diff <= 1e-4 and stats.top1_agreement == 1.0
    stats = report.parity
    assert stats.n_inputs == 128
    assert stats.max_abs_diff <= 1e-4 and stats.top1_agreement == 1.0
    # The checkpoint's own θ already samples mostly outside; the probes push it further.
    assert stats.by_kind["random"]["mean_outside_fraction"] > 0.5
    assert stats.by_kind["extreme_theta"]["n"] == 32
    assert stats.by_kind["extreme_theta"]["mean_outside_fraction"] > 0.5
    assert stats.by_kind["extreme_theta"]["max_abs_diff"] <= 1e-4


def test_ort_target_is_gridsample_20(target_exports):
    model = onnx.load(str(target_exports["ort"].output))
    assert model.opset_import[0].version == 20
    (sampler,) = [n for n in model.graph.node if n.op_type == "GridSample"]
    assert onnx.helper.get_attribute_value(next(a for a in sampler.attribute if a.name == "mode")) == b"linear"


def test_cuda_target_has_no_opset20_gridsample(target_exports):
    model = onnx.load(str(target_exports["cuda"].output))
    opset = model.opset_import[0].version
    assert 16 <= opset <= 19
    samplers = [n for n in model.graph.node if n.op_type == "GridSample"]
    assert len(samplers) == 1
    assert onnx.defs.get_schema("GridSample", opset).since_version == 16
    modes = {a.name: onnx.helper.get_attribute_value(a) for a in samplers[0].attribute}
    assert modes["mode"] == b"bilinear" and modes["padding_mode"] == b"zeros" and modes["align_corners"] == 0


def test_portable_target_has_no_gridsample_or_affinegrid(target_exports):
    report = target_exports["portable"]
    model = onnx.load(str(report.output))
    assert model.opset_import[0].version <= 17
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"GridSample", "AffineGrid"}
    assert {"GatherElements", "Floor", "Where"} <= ops
    assert "GridSample" not in report.op_counts


def test_theta_and_warped_outputs_are_compared(target_exports, extreme_theta_checkpoint_path):
    report = target_exports["portable"]
    assert report.outputs == ["log_probs", "theta", "warped"]
    assert set(report.parity.outputs) == {"log_probs", "theta", "warped"}
    assert report.parity.outputs["warped"].max_abs <= 1e-4
    session = ort.InferenceSession(str(report.output), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).standard_normal((5, 3, 32, 32), dtype=np.float32)
    log_probs, theta, warped = session.run(None, {"image": x})
    model = load_checkpoint(extreme_theta_checkpoint_path).build_model()
    with torch.no_grad():
        want_warped, want_theta = model.transform(torch.from_numpy(x))
    np.testing.assert_allclose(theta, want_theta.numpy(), atol=1e-5)
    np.testing.assert_allclose(warped, want_warped.numpy(), atol=1e-4)
    assert log_probs.shape == (5, 10)


def test_metadata_and_no_debug_leftovers(target_exports, extreme_theta_checkpoint_path):
    path = target_exports["cuda"].output
    model = onnx.load(str(path))
    assert model.producer_name == "stn-deploy"
    props = {p.key: p.value for p in model.metadata_props}
    meta = md.ModelMetadata.from_props(props)
    ckpt = load_checkpoint(extreme_theta_checkpoint_path)
    assert meta.class_names == ckpt.class_names
    assert meta.preprocessing == ckpt.preprocessing
    assert props[md.TARGET] == "cuda" and props[md.PRECISION] == "fp32"
    assert json.loads(props[md.METRICS]) == {"test_accuracy": 0.1}
    assert json.loads(props[md.MODEL_CONFIG]) == ckpt.config.to_dict()
    assert {"stn_deploy", "torch", "onnx"} <= set(json.loads(props[md.VERSIONS]))
    import hashlib

    assert props[md.CHECKPOINT_SHA256] == hashlib.sha256(extreme_theta_checkpoint_path.read_bytes()).hexdigest()
    # The exporter's per-node stack traces name local files; none may survive.
    data = path.read_bytes()
    assert b"pkg.torch" not in data and b"stack_trace" not in data and str(Path.cwd()).encode() not in data
    assert all(len(n.metadata_props) == 0 for n in model.graph.node)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_cli_json_report_and_dataset_samples(tmp_path):
    """--json on stdout, parsed; a checkpoint of an offline dataset gets dataset parity samples."""
    pytest.importorskip("stn_deploy.train.data")
    ckpt = make_checkpoint(tmp_path / "digits.pt", dataset="digits", seed=4)
    result = CliRunner().invoke(stn_export, [str(ckpt), "--json", "--parity-samples", "64", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and report["output"] == str(tmp_path / "digits.onnx")
    assert [c["name"] for c in report["checks"]] == DEFAULT_CHECKS
    parity = report["parity"]
    assert parity["max_abs_diff"] <= 1e-4 and parity["top1_agreement"] == 1.0
    from stn_deploy.train.data import load_samples

    if load_samples("digits", 1, split="test") is not None:
        assert parity["inputs_by_kind"]["dataset"] > 0
    assert sum(parity["inputs_by_kind"].values()) == parity["n_inputs"] == 64
    # every kind is compared at batch size 1 and at an odd size above 1 (7, or less for a short kind)
    for kind, entry in parity["by_kind"].items():
        sizes = entry["batch_sizes"]
        assert sizes[0] == 1 and any(b > 1 and b % 2 for b in sizes), (kind, entry)
    assert 7 in parity["by_kind"]["random"]["batch_sizes"]
    assert (tmp_path / "digits.onnx").is_file()
    # -o may not be the checkpoint itself; a tiny --parity-samples still runs every probe it can
    same = CliRunner().invoke(stn_export, [str(ckpt), "-o", str(ckpt), "-q"])
    assert_cli_error(same, 2, "is MODEL itself")
    small = CliRunner().invoke(
        stn_export, [str(ckpt), "-o", str(tmp_path / "small.onnx"), "--parity-samples", "3", "--json", "-q"]
    )
    assert small.exit_code == 0, small.output
    assert json.loads(small.stdout)["parity"]["inputs_by_kind"] == {"extreme_theta": 3}


def test_a_nan_difference_fails_parity():
    from stn_deploy.export.parity import parity_verdict
    from stn_deploy.export.report import OutputDiff, ParityStats

    nan = OutputDiff(max_abs=float("nan"), mean_abs=float("nan"), p99_abs=float("nan"))
    stats = ParityStats(
        n_inputs=4, inputs_by_kind={"random": 4}, outputs={"log_probs": nan}, top1_agreement=1.0, by_kind={}, notes=[]
    )
    passed, message, _ = parity_verdict(stats)
    assert not passed and "log_probs max |Δ| nan > 0.0001" in message


def test_class_names_file_errors_are_one_line(tmp_path):
    from stn_deploy.export.sources import ExportOptionError, parse_class_names

    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "dict.json").write_text('{"a": 1}')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    for name, text in (
        ("bad.json", "cannot read class names"),
        ("dict.json", "must be a JSON list, got dict"),
        ("latin1.txt", "cannot read class names"),
    ):
        with pytest.raises(ExportOptionError, match=text) as info:
            parse_class_names(str(tmp_path / name))
        assert "\n" not in str(info.value) and str(tmp_path / name) in str(info.value)
    assert parse_class_names(str(tmp_path / "dict.json").replace("dict", "none")) == [str(tmp_path / "none.json")]


def test_cli_table_mnist_shaped_optimized(mnist_checkpoint_path, tmp_path):
    out = tmp_path / "mnist.onnx"
    result = CliRunner().invoke(
        stn_export,
        [str(mnist_checkpoint_path), "-o", str(out), "--target", "cuda", "--optimize", "--parity-samples", "64", "-q"],
    )
    assert result.exit_code == 0, result.output
    verdicts: dict[str, str] = {}  # each check's row: "  name  PASS  detail" (the first row of that name)
    for words in (line.split() for line in result.stdout.splitlines()):
        if len(words) > 1:
            verdicts.setdefault(words[0], words[1])
    for name in CHECK_NAMES + ["optimized_" + n for n in CHECK_NAMES]:
        assert verdicts.get(name) == "PASS", (name, result.stdout)
    assert "FAIL" not in result.stdout and "top-1 agreement 100.00%" in result.stdout
    model = onnx.load(str(out))
    assert list(model.graph.input[0].type.tensor_type.shape.dim[i].dim_value for i in (1, 2, 3)) == [1, 28, 28]
    assert {p.key for p in model.metadata_props} >= {md.CLASS_NAMES, md.PREPROCESSING}
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)  # BASIC keeps standard ops
    assert model.opset_import[0].version == 18


def test_failed_check_leaves_no_file(checkpoint_path, tmp_path, monkeypatch):
    """A real parity run judged against a zero tolerance: the check fails, nothing is written."""
    from stn_deploy.export import exporter, parity

    monkeypatch.setattr(exporter, "parity_verdict", lambda stats: parity.parity_verdict(stats, tolerance=0.0))
    out = tmp_path / "out" / "stn.onnx"
    with pytest.raises(ExportCheckError, match=r"check 'parity' failed: log_probs max \|Δ\|") as caught:
        _export(checkpoint_path, out, parity_samples=8)
    assert not caught.value.report.passed
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temporary file left either
    # The CLI: exit 1, the failed report as JSON on stdout, one error line on stderr.
    result = CliRunner().invoke(
        stn_export, [str(checkpoint_path), "-o", str(out), "--json", "-q", "--parity-samples", "8"]
    )
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["passed"] is False
    assert [c["name"] for c in report["checks"] if not c["passed"]] == ["parity"]
    assert result.stderr.strip().splitlines() == [f"Error: {caught.value}"]
    assert list(out.parent.iterdir()) == []


# -- bring your own model (.pt2) ---------------------------------------------------------------
class PlateReader(nn.Module):
    """A user's own STN-style model: its own layer names, affine_grid + grid_sample inline."""

    def __init__(self) -> None:
        super().__init__()
        self.where = nn.Sequential(
            nn.Conv2d(1, 4, 5), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 10, 16), nn.Tanh()
        )
        self.pose = nn.Linear(16, 6)
        self.what = nn.Sequential(
            nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 11 * 11, 5)
        )
        with torch.no_grad():
            self.pose.bias.copy_(torch.tensor([1.0, 0, 0, 0, 1.0, 0]))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        grid = F.affine_grid(self.pose(self.where(img)).view(-1, 2, 3), img.size(), align_corners=True)
        return F.log_softmax(self.what(F.grid_sample(img, grid, align_corners=True)), dim=1)


@pytest.fixture(scope="module")
def archive_path(tmp_path_factory) -> Path:
    torch.manual_seed(5)
    model = PlateReader().eval()
    program = torch.export.export(model, (torch.randn(2, 1, 24, 24),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path_factory.mktemp("pt2") / "plates.pt2"
    torch.export.save(program, path)
    return path


def test_pt2_bring_your_own_model(archive_path, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("A\nB\nC\nD\nE\n")
    out = tmp_path / "plates.onnx"
    result = CliRunner().invoke(
        stn_export,
        [
            str(archive_path),
            "-o",
            str(out),
            "--target",
            "portable",
            "--mean",
            "0.2",
            "--std",
            "0.3",
            "--class-names",
            str(names),
            "--json",
            "-q",
            "--parity-samples",
            "64",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and report["parity"]["max_abs_diff"] <= 1e-4
    assert report["parity"]["inputs_by_kind"]["extreme_theta"] == 16  # θ head found in the user's graph
    assert "GridSample" not in report["op_counts"]
    meta = md.ModelMetadata.from_props(report["metadata"])
    assert meta.class_names == ["A", "B", "C", "D", "E"]
    assert meta.preprocessing.input_shape == (1, 24, 24) and meta.preprocessing.mean == (0.2,)
    assert md.MODEL_CONFIG not in report["metadata"]


def test_pt2_refuses_theta_outputs_and_checkpoint_flags(archive_path, checkpoint_path, tmp_path):
    runner = CliRunner()
    result = runner.invoke(stn_export, [str(archive_path), "-o", str(tmp_path / "a.onnx"), "--with-theta"])
    assert result.exit_code != 0 and "--with-theta" in result.output
    result = runner.invoke(stn_export, [str(checkpoint_path), "-o", str(tmp_path / "b.onnx"), "--mean", "0.1,0.1,0.1"])
    assert result.exit_code != 0 and "carries its own preprocessing" in result.output
    assert not list(tmp_path.glob("*.onnx"))


# -- bad input ---------------------------------------------------------------------------------
class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile_pt2(archive: Path, path: Path, marker: Path) -> Path:
    """The archive with its sample inputs replaced by a pickle that runs a shell command."""
    import io

    payload = io.BytesIO()
    torch.save({"inputs": _RunsCode(marker)}, payload)
    with zipfile.ZipFile(archive) as zin, zipfile.ZipFile(path, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            zout.writestr(item, payload.getvalue() if item.filename.endswith("sample_inputs/model.pt") else data)
    return path


def _bad_sources(
    tmp_path: Path, checkpoint_path: Path, archive_path: Path, marker: Path
) -> dict[str, tuple[Path, str]]:
    not_ckpt = tmp_path / "notes.pt"
    not_ckpt.write_text("these are not weights")
    hostile = tmp_path / "hostile.pt"
    torch.save({"format": "stn-deploy-checkpoint", "config": _RunsCode(marker)}, hostile)
    ckpt = load_checkpoint(checkpoint_path)
    ckpt.state_dict = {k: v for k, v in ckpt.state_dict.items() if k != "fc2.bias"}
    misfit = save_checkpoint(ckpt, tmp_path / "misfit.pt")
    not_zip = tmp_path / "model.pt2"
    not_zip.write_bytes(b"\x00" * 64)
    return {
        "missing": (tmp_path / "nope.pt", "no such file"),
        "not a checkpoint": (not_ckpt, "not a checkpoint"),
        "hostile pickle": (hostile, "refused"),
        "state_dict misfit": (misfit, "do not fit"),
        "not an archive": (not_zip, "not a torch.export archive"),
        "hostile archive": (_hostile_pt2(archive_path, tmp_path / "hostile.pt2", marker), "refused"),
    }


def test_bad_input_is_one_line_error_and_no_file(tmp_path, checkpoint_path, archive_path):
    marker = tmp_path / "code_ran"
    runner = CliRunner()
    for label, (source, message) in _bad_sources(tmp_path, checkpoint_path, archive_path, marker).items():
        out = tmp_path / "out" / f"{source.stem}.onnx"
        result = runner.invoke(stn_export, [str(source), "-o", str(out), "-q"])
        assert result.exit_code == 1, (label, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and message in errors[0] and str(source) in errors[0], (label, result.output)
        assert isinstance(result.exception, SystemExit), (label, repr(result.exception))
        assert not out.exists(), label
        assert not marker.exists(), f"{label}: the pickle ran code"
    with pytest.raises(CheckpointError):
        export_model(tmp_path / "nope.pt", tmp_path / "x.onnx")


def test_an_unusable_output_fails_before_the_export(tmp_path, checkpoint_path):
    (tmp_path / "a_file").write_text("x")
    result = CliRunner().invoke(stn_export, [str(checkpoint_path), "-o", str(tmp_path / "a_file" / "m.onnx")])
    assert_cli_error(result, 1, f"Error: {tmp_path / 'a_file'}: a part of this path is a file, not a directory")
    assert "Exporting" not in result.output  # refused before any export work


def test_cli_help_and_default_output_names(tmp_path):
    from stn_deploy.export.cli import default_output

    result = CliRunner().invoke(stn_export, ["--help"])
    assert result.exit_code == 0
    for flag in (
        "--target",
        "--opset",
        "--with-theta",
        "--with-warped",
        "--optimize",
        "--parity-samples",
        "--json",
        "--image-size",
        "--mean",
        "--std",
        "--channels",
        "--class-names",
        "--data-dir",
    ):
        assert flag in result.output
    assert default_output(Path("m/stn.pt"), "ort") == Path("m/stn.onnx")
    assert default_output(Path("m/stn.pt"), "cuda") == Path("m/stn.cuda.onnx")
    result = CliRunner().invoke(stn_export, [str(tmp_path / "x.pt"), "--target", "cuda", "--opset", "20"])
    assert result.exit_code == 1 and "--opset 20 does not fit target 'cuda'" in result.output


def test_extreme_theta_probes_sample_outside():
    """Every probe θ' = s·θ + t moves the identity's grid at least partly outside [-1, 1]²."""
    identity = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]])
    for s, tx, ty in THETA_PROBES:
        theta = identity * s + torch.tensor([[0.0, 0, tx], [0, 0, ty]])
        grid = F.affine_grid(theta, [1, 1, 16, 16], align_corners=False)
        assert (grid.abs() > 1).any(-1).float().mean() >= 0.25


def test_theta_head_is_found_in_a_core_aten_program(archive_path):
    """Decomposed to core ATen, the θ Linear is addmm(bias, x, t(weight)): still the θ head."""
    from stn_deploy.export.theta_head import find_theta_head

    program = torch.export.load(archive_path)
    assert find_theta_head(program) is not None  # aten.linear
    decomposed = program.run_decompositions()
    assert any("addmm" in str(n.target) for n in decomposed.graph.nodes)
    head = find_theta_head(decomposed)
    assert head is not None and head == find_theta_head(program)


# -- the default export: optimized, on users' own archives --------------------------------------
class TutorialSTN(nn.Module):
    """The PyTorch STN tutorial's MNIST network (1×28×28), as a user would save it as .pt2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 10, 5), nn.Conv2d(10, 20, 5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1, self.fc2 = nn.Linear(320, 50), nn.Linear(50, 10)
        self.localization = nn.Sequential(
            nn.Conv2d(1, 8, 7),
            nn.MaxPool2d(2, stride=2),
            nn.ReLU(True),
            nn.Conv2d(8, 10, 5),
            nn.MaxPool2d(2, stride=2),
            nn.ReLU(True),
        )
        self.fc_loc = nn.Sequential(nn.Linear(10 * 3 * 3, 32), nn.ReLU(True), nn.Linear(32, 3 * 2))
        with torch.no_grad():
            self.fc_loc[2].weight.normal_(0, 0.05)
            self.fc_loc[2].bias.copy_(torch.tensor([1, 0, 0, 0, 1, 0], dtype=torch.float))

    def stn(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.fc_loc(self.localization(x).view(-1, 10 * 3 * 3)).view(-1, 2, 3)
        return F.grid_sample(x, F.affine_grid(theta, x.size(), align_corners=False), align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stn(x)
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = F.relu(self.fc1(x.view(-1, 320)))
        return F.log_softmax(self.fc2(x), dim=1)


class ZoomReader(nn.Module):
    """A sampler whose output (16×16) is smaller than its input (24×24): the classifier sees a crop."""

    def __init__(self) -> None:
        super().__init__()
        self.where = nn.Sequential(
            nn.Conv2d(3, 4, 5), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64, 6)
        )
        self.what = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 7 * 7, 4))
        with torch.no_grad():
            self.where[-1].weight.mul_(0.1)
            self.where[-1].bias.copy_(torch.tensor([0.6, 0, 0.1, 0, 0.6, -0.1]))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        theta = self.where(img).view(-1, 2, 3)
        grid = F.affine_grid(theta, [img.shape[0], 3, 16, 16], align_corners=False)
        return F.log_softmax(self.what(F.grid_sample(img, grid, align_corners=False)), dim=1)


def _save_pt2(model: nn.Module, shape, path: Path) -> Path:
    torch.manual_seed(0)
    program = torch.export.export(
        model.eval(), (torch.randn(2, *shape),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, path)
    return path


@pytest.mark.parametrize("target", ["ort", "cuda", "portable"])
@pytest.mark.parametrize("kind", ["tutorial 1x28x28", "sampler output smaller than input"])
def test_users_archives_pass_every_check_with_the_default_optimized_export(kind, target, tmp_path):
    torch.manual_seed(7)
    model, shape = (TutorialSTN(), (1, 28, 28)) if kind.startswith("tutorial") else (ZoomReader(), (3, 24, 24))
    archive = _save_pt2(model, shape, tmp_path / "user.pt2")
    report = _export(archive, tmp_path / "user.onnx", target=target, parity_samples=16)
    assert report.passed and report.optimized
    assert [c.name for c in report.checks] == DEFAULT_CHECKS
    for stats in (report.parity, report.optimized_parity):
        assert stats.max_abs_diff <= 1e-4 and stats.top1_agreement == 1.0
        assert stats.inputs_by_kind.get("extreme_theta", 0) > 0  # θ head found in the user's graph
    optimize = report.check("optimize")
    if kind.startswith("tutorial"):  # the reference-style graph gets every rewrite
        assert optimize.details["rewrites"]["relu_before_maxpool"] >= 2, optimize.message


def test_a_rewrite_that_does_not_fit_is_skipped_with_its_reason(tmp_path, monkeypatch):
    """A rule that breaks on a user's graph is skipped, named, and the export still succeeds."""
    from stn_deploy.export import graph_rewrites

    def broken(model):
        raise ValueError("an unexpected graph")

    rules = (graph_rewrites.Rule("affine_grid_as_matmul", broken, "affine grid"), *graph_rewrites.EXACT_RULES[2:])
    monkeypatch.setattr(graph_rewrites, "EXACT_RULES", rules)
    archive = _save_pt2(ZoomReader(), (3, 24, 24), tmp_path / "zoom.pt2")
    report = _export(archive, tmp_path / "zoom.onnx", parity_samples=8)
    optimize = report.check("optimize")
    assert (
        report.passed
        and "skipped: affine_grid_as_matmul (failed on this graph (ValueError: an unexpected graph))"
        in optimize.message
    )
    assert optimize.details["skipped"]["affine_grid_as_matmul"].startswith("failed on this graph")


def test_one_mean_and_std_value_stands_for_every_channel(tmp_path):
    archive = _save_pt2(ZoomReader(), (3, 24, 24), tmp_path / "zoom.pt2")
    result = CliRunner().invoke(
        stn_export,
        [
            str(archive),
            "-o",
            str(tmp_path / "z.onnx"),
            "--mean",
            "0.45",
            "--std",
            "0.2",
            "--no-optimize",
            "--parity-samples",
            "4",
            "--json",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    meta = md.ModelMetadata.from_props(json.loads(result.stdout)["metadata"])
    assert meta.preprocessing.mean == (0.45,) * 3 and meta.preprocessing.std == (0.2,) * 3
    two = CliRunner().invoke(stn_export, [str(archive), "-o", str(tmp_path / "y.onnx"), "--mean", "0.4,0.5", "-q"])
    assert_cli_error(two, 1, "mean/std need 3 values")


def test_the_export_ends_with_what_to_run_next_and_the_measured_int8_speedup(checkpoint_path, tmp_path):
    out = tmp_path / "next.onnx"
    result = CliRunner().invoke(stn_export, [str(checkpoint_path), "-o", str(out), "--parity-samples", "8", "-q"])
    assert result.exit_code == 0, result.output
    assert f"stn-infer IMAGES_DIR --model {out}" in result.stderr
    assert f"stn-export {out} --quantize int8 --calibration CALIBRATION_IMAGES_DIR" in result.stderr
    assert "int8 ran " in result.stderr and "x as fast as fp32 here" in result.stderr
    js = CliRunner().invoke(
        stn_export, [str(checkpoint_path), "-o", str(out), "--parity-samples", "8", "-q", "--json", "--target", "cuda"]
    )
    steps = json.loads(js.stdout)["next_steps"]
    assert "--provider cuda" in steps["infer"] and "--precision fp16" in steps["fp16"] and "int8_speedup" not in steps
