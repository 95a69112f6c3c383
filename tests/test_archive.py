"""A .pt2 archive is checked before torch reads it: nothing in it runs on the host.

The crafted archives here are real exploits: ``--trust-archive`` (which skips the check) runs
them, and the marker file appears. Without it they are refused with one line, and it does not.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from stn_deploy.errors import CheckpointError
from stn_deploy.export import export_model
from stn_deploy.export.archive import ArchiveRefused, check_archive, expression_problem, guard_problem
from stn_deploy.export.sources import load_source

SYMBOL = "Symbol('s77', positive=True, integer=True)"


class TutorialSTN(nn.Module):
    """The STN of PyTorch's spatial-transformer tutorial: 1×28×28 digits, 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, 5)
        self.conv2 = nn.Conv2d(10, 20, 5)
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)
        self.localization = nn.Sequential(
            nn.Conv2d(1, 8, 7),
            nn.MaxPool2d(2, 2),
            nn.ReLU(True),
            nn.Conv2d(8, 10, 5),
            nn.MaxPool2d(2, 2),
            nn.ReLU(True),
        )
        self.fc_loc = nn.Sequential(nn.Linear(10 * 3 * 3, 32), nn.ReLU(True), nn.Linear(32, 6))
        with torch.no_grad():
            self.fc_loc[2].weight.zero_()
            self.fc_loc[2].bias.copy_(torch.tensor([1.0, 0, 0, 0, 1.0, 0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.fc_loc(self.localization(x).view(-1, 90)).view(-1, 2, 3)
        x = F.grid_sample(x, F.affine_grid(theta, x.size(), align_corners=False), align_corners=False)
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        return F.log_softmax(self.fc2(F.relu(self.fc1(x.view(-1, 320)))), dim=1)


class OddBatchSTN(TutorialSTN):
    """Branches on the batch size, so the program carries Mod/FloorDiv shapes and guard lines."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        out = super().forward(x)
        return out[: n // 2 * 2 + n % 2]


def _save(model: nn.Module, dynamic_shapes, path: Path, batch: int = 4) -> Path:
    torch.manual_seed(0)
    program = torch.export.export(model.eval(), (torch.randn(batch, 1, 28, 28),), dynamic_shapes=dynamic_shapes)
    torch.export.save(program, path)
    return path


@pytest.fixture(scope="module")
def tutorial_archive(tmp_path_factory) -> Path:
    return _save(TutorialSTN(), ({0: torch.export.Dim("batch")},), tmp_path_factory.mktemp("pt2") / "tutorial.pt2")


def _rewrite(
    src: Path,
    dst: Path,
    edit: Callable[[dict], None] | None = None,
    extra: dict[str, bytes] | None = None,
    weights: Callable[[dict], None] | None = None,
) -> Path:
    """``src`` with its models/model.json (and weights config) edited and ``extra`` members added."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/")[0]
        for item in zin.infolist():
            data = zin.read(item.filename)
            if edit is not None and item.filename.endswith("models/model.json"):
                model = json.loads(data)
                edit(model)
                data = json.dumps(model).encode()
            if weights is not None and item.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                weights(config)
                data = json.dumps(config).encode()
            zout.writestr(item, data)
        for name, data in (extra or {}).items():
            zout.writestr(f"{root}/{name}", data)
    return dst


def _replace_expr(marker: Path) -> Callable[[dict], None]:
    crafted = f"(__import__('os').system('touch {marker}'), {SYMBOL})[1]"

    def edit(model: dict) -> None:
        model["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]["as_expr"]["expr_str"] = crafted

    return edit


def _evil_guard(marker: Path) -> Callable[[dict], None]:
    def edit(model: dict) -> None:
        model["guards_code"] = [f"__import__('os').system('touch {marker}') == 0"]

    return edit


# A parameter name that FX pastes, unescaped, into the forward() source it generates.
def _evil_parameter_name(marker: Path) -> str:
    return (
        'conv1"), exec("__import__(\\x27os\\x27)\\x2esystem(\\x27touch '
        + str(marker).replace(".", "\\x2e")
        + '\\x27)"), getattr(self, "conv1'
    )


def _rename_parameter(marker: Path):
    name = _evil_parameter_name(marker)

    def edit(model: dict) -> None:
        model["graph_module"]["signature"]["input_specs"][0]["parameter"]["parameter_name"] = name

    def weights(config: dict) -> None:
        config["config"][name] = config["config"].pop("conv1.weight")

    return edit, weights


def _crafted(kind: str, src: Path, tmp_path: Path, marker: Path) -> Path:
    dst = tmp_path / f"{kind}.pt2"
    if kind == "expression":
        return _rewrite(src, dst, _replace_expr(marker))
    if kind == "guard":
        return _rewrite(src, dst, _evil_guard(marker))
    edit, weights = _rename_parameter(marker)
    return _rewrite(src, dst, edit, weights=weights)


def test_a_crafted_expression_runs_nothing_and_stn_export_exits_with_one_line(tutorial_archive, tmp_path):
    marker = tmp_path / "MARKER"
    crafted = _rewrite(tutorial_archive, tmp_path / "crafted.pt2", _replace_expr(marker))
    out = tmp_path / "out.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "stn_deploy.export.cli", str(crafted), "-o", str(out), "-q"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors == result.stderr.splitlines()[-1:], result.stderr
    assert f"{crafted}: refused:" in errors[0] and "expr_str" in errors[0] and "--trust-archive" in errors[0]
    assert "Traceback" not in result.stderr
    assert not marker.exists(), "the archive's expression ran"
    assert not out.exists()


@pytest.mark.parametrize("kind", ["expression", "guard", "parameter name"])
def test_each_way_an_archive_runs_code_is_refused_and_trust_archive_shows_it_was_real(kind, tutorial_archive, tmp_path):
    marker = tmp_path / "MARKER"
    crafted = _crafted(kind, tutorial_archive, tmp_path, marker)
    with pytest.raises(ArchiveRefused) as refused:
        load_source(crafted)
    assert str(crafted) in str(refused.value) and "\n" not in str(refused.value)
    assert not marker.exists()
    # The same file with the check skipped: torch runs the archive's text, so the check is what stops it.
    with contextlib.suppress(CheckpointError):  # the renamed parameter breaks the program, after its code ran
        load_source(crafted, trust_archive=True)
    assert marker.exists(), f"{kind}: the crafted archive did not run code even with the check skipped"


def _node(model: dict, target: str) -> dict:
    return next(n for n in model["graph_module"]["graph"]["nodes"] if n["target"] == target)


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(model: dict) -> None:
        obj = model
        for key in keys[:-1]:
            obj = obj[key]
        obj[keys[-1]] = value

    return edit


def _retarget(target: str):
    def edit(model: dict) -> None:
        _node(model, "torch.ops.aten.relu.default")["target"] = target

    return edit


def _stack_trace(text: str):
    def edit(model: dict) -> None:
        _node(model, "torch.ops.aten.relu.default")["metadata"]["stack_trace"] = text

    return edit


def _string_input(model: dict) -> None:
    model["graph_module"]["graph"]["inputs"].append({"as_string": "cpu"})


EXPR = ("graph_module", "graph", "tensor_values", "x", "sizes", 0, "as_expr", "expr_str")
REFUSED = {
    "a call of a Python builtin": (_set(*EXPR, "__import__('os').getpid()"), "not a symbolic-shape function"),
    "an attribute": (_set(*EXPR, f"{SYMBOL}.func"), "Attribute syntax"),
    "a lambda": (_set(*EXPR, "(lambda: 1)()"), "call of"),
    "a string where a number goes": (_set(*EXPR, "Integer('12')"), "str literal"),
    "a tower of powers": (_set(*EXPR, "PowByNatural(Integer(2), PowByNatural(Integer(2), Integer(64)))"), "exponent"),
    "a huge integer": (_set(*EXPR, "Integer(" + "9" * 40 + ")"), "digits"),
    "a Symbol keyword that is not an assumption": (_set(*EXPR, "Symbol('s0', cls=Integer)"), "Symbol keyword"),
    "a guard that imports": (_set("guards_code", ["__import__('os') is None"]), "guard"),
    "a guard with an odd subscript": (_set("guards_code", ["L['x'].size()[0][0] == 1"]), "subscript"),
    "a call of torch.os.system": (_retarget("torch.os.system"), "only torch.ops.aten/prims"),
    "aten.from_file": (_retarget("torch.ops.aten.from_file.default"), "from_file reads or maps a file"),
    "a higher-order operator": (_retarget("torch.ops.higher_order.cond"), "only torch.ops.aten/prims"),
    "a quote in a tensor name": (
        _set("graph_module", "graph", "outputs", 0, "as_tensor", "name", 'log"softmax'),
        "not a plain name",
    ),
    "a carriage return in a stack trace": (_stack_trace('File "a.py", line 1, in f\n  x\rimport os'), "control"),
    "a string graph input": (_string_input, "graph input of kind 'as_string'"),
}


@pytest.mark.parametrize("label", list(REFUSED))
def test_archive_text_outside_the_grammar_is_refused_with_one_line(label, tutorial_archive, tmp_path):
    edit, message = REFUSED[label]
    crafted = _rewrite(tutorial_archive, tmp_path / "crafted.pt2", edit)
    with pytest.raises(ArchiveRefused) as refused:
        check_archive(crafted)
    text = str(refused.value)
    assert message in text and text.startswith(f"{crafted}: refused: ") and "\n" not in text, text
    assert len(text) < 500


def test_members_torch_does_not_write_are_refused(tutorial_archive, tmp_path):
    aoti = _rewrite(tutorial_archive, tmp_path / "aoti.pt2", extra={"data/aotinductor/model/model.so": b"\x7fELF"})
    with pytest.raises(ArchiveRefused, match="AOTInductor"):
        check_archive(aoti)
    odd = _rewrite(tutorial_archive, tmp_path / "odd.pt2", extra={"code/run.py": b"print()"})
    with pytest.raises(ArchiveRefused, match="not a member torch.export.save writes"):
        check_archive(odd)
    flat = tmp_path / "flat.pt2"
    with zipfile.ZipFile(flat, "w") as z:
        z.writestr("version", "1")
        z.writestr("serialized_exported_program.json", "{}")
    with pytest.raises(ArchiveRefused, match="one top-level folder"):
        check_archive(flat)
    broken = tmp_path / "broken.pt2"
    broken.write_bytes(tutorial_archive.read_bytes()[:2000])
    with pytest.raises(CheckpointError):
        check_archive(broken)


@pytest.mark.parametrize(
    "label, model, dynamic_shapes",
    [
        ("Dim('batch')", TutorialSTN(), ({0: torch.export.Dim("batch")},)),
        ("Dim with bounds", TutorialSTN(), ({0: torch.export.Dim("batch", min=2, max=1024)},)),
        (
            "Dim.AUTO everywhere",
            TutorialSTN(),
            ({0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO},),
        ),
        ("Mod and FloorDiv shapes, guards", OddBatchSTN(), ({0: torch.export.Dim.AUTO},)),
    ],
)
def test_archives_torch_writes_for_dynamic_shapes_pass_the_check(label, model, dynamic_shapes, tmp_path):
    path = _save(model, dynamic_shapes, tmp_path / "model.pt2")
    check_archive(path)
    with zipfile.ZipFile(path) as z:
        text = next(z.read(n) for n in z.namelist() if n.endswith("models/model.json")).decode()
    if label.startswith("Mod"):  # the grammar met something beyond a bare symbol
        assert "FloorDiv(" in text and "Mod(" in text and '"guards_code": ["' in text


@pytest.mark.slow
def test_the_tutorial_stn_archive_exports_with_every_check(tutorial_archive, tmp_path):
    report = export_model(
        tutorial_archive,
        tmp_path / "tutorial.onnx",
        parity_samples=16,
        progress=False,
        preprocessing={"mean": (0.1307,), "std": (0.3081,)},
    )
    assert report.passed and report.output.is_file()


# -- the grammars against what torch's own printers write -----------------------------------------
def _sympy_expressions():
    import sympy
    from torch.utils._sympy import functions as fn

    symbols = [sympy.Symbol(f"s{i}", positive=True, integer=True) for i in (0, 1, 77)]
    leaves = st.one_of(st.sampled_from(symbols), st.integers(0, 4096).map(sympy.Integer))  # sizes: never negative

    def grow(children):
        pair = st.tuples(children, children)
        return st.one_of(
            pair.map(lambda p: sympy.Add(*p)),
            pair.map(lambda p: sympy.Mul(*p)),
            pair.map(lambda p: sympy.Max(*p)),
            pair.map(lambda p: sympy.Min(*p)),
            pair.map(lambda p: fn.FloorDiv(p[0], p[1] if p[1] != 0 else sympy.Integer(2))),
            pair.map(lambda p: fn.Mod(p[0], sympy.Integer(3))),
            pair.map(lambda p: fn.PythonMod(p[0], sympy.Integer(5))),
            pair.map(lambda p: fn.CeilDiv(p[0], sympy.Integer(4))),
            children.map(lambda e: fn.PowByNatural(e, sympy.Integer(2))),
        )

    # torch's sizes are finite integers: no nan/zoo from e.g. a Mod by an expression that is 0
    undefined = (sympy.nan, sympy.zoo, sympy.oo, -sympy.oo)
    return st.recursive(leaves, grow, max_leaves=12).filter(lambda e: e not in undefined and not e.has(*undefined))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_every_shape_expression_torch_prints_is_in_the_grammar(data):
    import sympy

    expr = data.draw(_sympy_expressions())
    relation = data.draw(st.sampled_from([None, sympy.Eq, sympy.Ne, sympy.Lt, sympy.Le, sympy.Gt, sympy.Ge]))
    if relation is not None:
        expr = relation(expr, sympy.Integer(7))
        if expr in (sympy.true, sympy.false):
            return
    text = sympy.srepr(expr)  # what torch.export.save writes (serialize.py: _print_sympy)
    assert expression_problem(text) is None, text


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_every_guard_line_torch_prints_is_in_the_guard_grammar(data):
    import sympy
    from torch.fx.experimental.symbolic_shapes import ShapeGuardPythonPrinter

    expr = data.draw(_sympy_expressions())
    relation = data.draw(st.sampled_from([sympy.Eq, sympy.Ne, sympy.Lt, sympy.Le, sympy.Gt, sympy.Ge]))
    # The printer torch writes guards_code with, each size named by its source.
    sources = {
        sympy.Symbol(f"s{i}", positive=True, integer=True): [f"L['x'].size()[{j}]"] for j, i in enumerate((0, 1, 77))
    }
    line = ShapeGuardPythonPrinter(sources, lambda source: source, {}).doprint(relation(expr, 7))
    assert guard_problem(line) is None, line


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_the_grammar_checks_answer_for_any_text_and_never_raise(text):
    for check in (expression_problem, guard_problem):
        assert check(text) is None or isinstance(check(text), str)
