"""What a torch.export archive (.pt2) may hold, checked before torch reads any of it.

``torch.export.load`` is not a data reader. Loading an archive and running its program turns
text from the archive into code in four places:

* every symbolic-shape ``expr_str`` (tensor sizes and strides, sym-int/bool/float values) goes
  to ``sympy.sympify``, which ``eval``\\s it: ``(__import__('os').system('…'), s0)[1]`` runs;
* every ``guards_code`` line is pasted into a Python function that ``program.module()``
  ``exec``\\s;
* parameter, buffer and constant names are pasted into the ``forward`` source that FX
  generates (``getattr(self, "<name>")``, unescaped);
* a node's ``target`` is looked up by name under ``torch``/``operator``/``math``, and any
  callable found there (``torch.os.system``) is called when the program runs; so is
  ``aten.from_file``, which maps a host file of the archive's choosing;

and an archive with a ``data/aotinductor/`` folder makes ``torch.export.load`` load the
compiled shared library inside it. (Pickled members are the fifth way; :mod:`.sources` forces
``weights_only`` for those.)

:func:`check_archive` reads the zip itself, with :mod:`zipfile` and :mod:`json` only, and
refuses an archive unless every part of it is what ``torch.export.save`` writes for a plain
model: the members torch writes and no others; expressions in the grammar below; guard lines
in the grammar torch prints guards in; names that are names; ATen operators (not
``from_file``) and the symbolic-int operators as node targets; tensors (and symbolic ints) as
graph inputs. Everything is matched against an allowlist by parsing with :mod:`ast`, which
never evaluates. ``stn-export --trust-archive`` skips this check for an archive the user
trusts (one made by a newer torch that writes something this grammar does not know).

Expression grammar (``expr_str``; torch writes ``sympy.srepr``, e.g.
``FloorDiv(Add(Symbol('s77', positive=True, integer=True), Integer(-4)), Integer(2))``, and
infix text such as ``s0 // 2 + 1`` parses the same way): integer and float literals; bare
symbol names; ``+ - * // % /``, unary ``-``/``+``, comparisons, ``and``/``or``/``not``; calls of
:data:`EXPRESSION_FUNCTIONS` only (no attribute access, subscripts, lambdas or
comprehensions); ``Symbol('<name>', <assumption>=True|False, …)`` and ``Float('<number>',
precision=<int>)`` are the only calls that take strings or keywords; powers only with an
exponent literal of at most :data:`MAX_EXPONENT`. Guard grammar (``guards_code``): the same
operators over ``L['<input>']``, ``L['<input>'].size()[i]`` / ``.stride()[i]`` /
``.storage_offset()``, literals and :data:`GUARD_FUNCTIONS`.
"""

from __future__ import annotations

import ast
import json
import math
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stn_deploy.errors import CheckpointError

# Members of an archive written by torch.export.save, under its one root folder.
_MEMBER = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/[\w.\-]+\.json|data/(weights|constants|sample_inputs)/[\w.\-]+|extra/[\w.\-]+)"
)
MAX_JSON_BYTES = 256 << 20  # a model.json of a plain CNN is tens of kB; this bounds a zip bomb
MAX_EXPRESSION_CHARS = 20_000
MAX_EXPRESSION_NODES = 4_000
MAX_INT_DIGITS = 30  # sizes, strides and offsets are < 2**63 (19 digits)
MAX_EXPONENT = 64

# sympy's own classes as srepr names them, and torch.utils._sympy.functions (the names
# torch's deserializer puts in sympify's namespace). Each builds an expression; none runs code.
EXPRESSION_FUNCTIONS = frozenset(
    {
        "Symbol", "Integer", "Rational", "Float",
        "Add", "Mul", "Pow", "Mod", "Min", "Max", "Abs", "floor", "ceiling",
        "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality",
        "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan",
        "And", "Or", "Not", "Piecewise", "ExprCondPair",
        "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilDiv",
        "CeilToInt", "FloorToInt", "TruncToInt", "RoundToInt", "RoundDecimal",
        "ToFloat", "TruncToFloat", "IntTrueDiv", "FloatTrueDiv",
        "PowByNatural", "FloatPow", "LShift", "RShift",
        "IsNonOverlappingAndDenseIndicator", "Identity",
    }
)  # fmt: skip
_POWERS = frozenset({"Pow", "PowByNatural", "FloatPow"})
_ASSUMPTIONS = frozenset(
    {
        "positive", "negative", "nonnegative", "nonpositive", "nonzero", "zero", "integer", "real",
        "finite", "infinite", "extended_real", "extended_positive", "extended_negative",
        "extended_nonnegative", "extended_nonpositive", "extended_nonzero", "rational", "even", "odd",
        "commutative", "complex", "hermitian", "imaginary",
    }
)  # fmt: skip
# What ShapeGuardPythonPrinter writes in guard lines (torch.sym_max(1, L['x'].size()[3] // 2)).
GUARD_FUNCTIONS = frozenset(
    {
        "torch.sym_max", "torch.sym_min", "torch.sym_float", "torch.sym_int", "torch.sym_not",
        "torch.sym_ite", "torch.sym_sqrt", "math.floor", "math.ceil", "math.trunc", "math.isnan",
        "IsNonOverlappingAndDenseIndicator",
    }
)  # fmt: skip
_SIZE_ACCESSORS = frozenset({"size", "stride", "storage_offset"})

# Node targets: ATen/prims operator overloads, and the symbolic-int ops of torch's _SYM_OPS.
_ATEN_TARGET = re.compile(r"torch\.ops\.(aten|prims)\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)", re.ASCII)
_SYM_TARGETS = frozenset(
    {f"_operator.{op}" for op in (
        "eq", "ne", "le", "ge", "lt", "gt", "neg", "pos", "mul", "add", "sub", "floordiv", "mod",
        "pow", "truediv", "and_", "or_", "lshift", "rshift",
    )}
    | {"math.trunc"}
    | {f"torch.sym_{op}" for op in ("not", "int", "float", "ite", "max", "min", "sqrt")}
)  # fmt: skip
_REFUSED_OPERATORS = frozenset({"from_file"})  # maps a host file named by the archive

# Any other string must be a plain name: letters, digits, _ . - + : (module paths such as
# "localization.0.weight", device types, versions). No quotes, brackets, spaces or escapes.
_PLAIN = re.compile(r"[\w.\-+:]*")
_NAME = re.compile(r"[A-Za-z_]\w*", re.ASCII)
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
# Keys whose strings are free text that torch keeps as metadata or parses as JSON, never as code.
_FREE_TEXT = frozenset(
    {"stack_trace", "nn_module_stack", "torch_fn", "source_fn_stack", "custom", "from_node", "in_spec", "out_spec"}
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u2028\u2029]")  # in free text only \n and \t


class ArchiveRefused(CheckpointError):
    """A .pt2 archive holds something that torch would run as code, or that this check cannot vouch for."""


def check_archive(path: str | Path) -> None:
    """Refuse ``path`` unless every member and string in it fits the allowlist (module docstring).

    Raises :class:`ArchiveRefused` (a :class:`~stn_deploy.errors.CheckpointError`, exit 1) with
    one line naming the member, the place in it and the offending text, cut short.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            infos = [info for info in archive.infolist() if not info.is_dir()]
            root = _root(path, infos)
            for info in infos:
                member = info.filename[len(root) + 1 :]
                if member.startswith("data/aotinductor/"):
                    _refuse(path, info.filename, "holds AOTInductor-compiled code (a shared library torch would load)")
                if not _MEMBER.fullmatch(member):
                    _refuse(path, info.filename, "is not a member torch.export.save writes")
                if member.startswith("models/"):
                    _check_model(path, info.filename, _read_json(archive, info, path))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as exc:
        raise CheckpointError(
            f"{path}: not a readable torch.export archive ({type(exc).__name__}: {_cut(str(exc))})"
        ) from None


def _root(path: Path, infos: list[zipfile.ZipInfo]) -> str:
    roots = {info.filename.split("/", 1)[0] for info in infos}
    if len(roots) != 1 or not all("/" in info.filename for info in infos):
        raise ArchiveRefused(f"{path}: refused: not laid out as torch.export.save writes (one top-level folder)")
    root = roots.pop()
    names = {info.filename[len(root) + 1 :] for info in infos}
    if "archive_version" not in names or not any(n.startswith("models/") for n in names):
        raise ArchiveRefused(f"{path}: refused: no archive_version or models/ (not an archive this torch writes)")
    return root


def _read_json(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> Any:
    if info.file_size > MAX_JSON_BYTES:
        _refuse(path, info.filename, f"is {info.file_size} bytes (limit {MAX_JSON_BYTES})")
    with archive.open(info) as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        _refuse(path, info.filename, f"is over {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        _refuse(path, info.filename, f"is not JSON ({type(exc).__name__})")


def _check_model(path: Path, member: str, model: Any) -> None:
    if not isinstance(model, dict):
        _refuse(path, member, "is not a serialized ExportedProgram (not a JSON object)")
    for where, problem in _problems(model, ()):
        _refuse(path, member, f"{'/'.join(where) or 'top level'}: {problem}")
    graph = model.get("graph_module", {}).get("graph", {}) if isinstance(model.get("graph_module"), dict) else {}
    for arg in graph.get("inputs", []) if isinstance(graph, dict) else []:
        if not (isinstance(arg, dict) and set(arg) <= {"as_tensor", "as_sym_int"}):
            kind = next(iter(arg), "?") if isinstance(arg, dict) else type(arg).__name__
            _refuse(path, member, f"graph input of kind {kind!r} (an STN takes tensors)")


def _problems(obj: Any, where: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], str]]:
    """Every string in the serialized program that the allowlist does not vouch for."""
    if isinstance(obj, dict):
        is_node = "target" in obj and "inputs" in obj and "outputs" in obj
        for key, value in obj.items():
            here = (*where, str(key))
            if not _PLAIN.fullmatch(str(key)):
                yield here, f"key {_cut(repr(key))} is not a plain name"
            elif key == "expr_str":
                if not isinstance(value, str):
                    yield here, "expr_str is not a string"
                elif (problem := expression_problem(value)) is not None:
                    yield here, f"expression {_cut(repr(value))} refused ({problem})"
            elif key == "guards_code":
                for i, line in enumerate(value if isinstance(value, list) else [value]):
                    if not isinstance(line, str):
                        yield (*here, str(i)), "guard is not a string"
                    elif (problem := guard_problem(line)) is not None:
                        yield (*here, str(i)), f"guard {_cut(repr(line))} refused ({problem})"
            elif key == "target" and is_node:
                if not isinstance(value, str) or (problem := target_problem(value)) is not None:
                    yield here, f"node target {_cut(repr(value))} refused ({problem or 'not a string'})"
            elif key in _FREE_TEXT or (key in ("as_string", "as_strings") and "nodes" in where):
                # Metadata kept as text, JSON parsed by json.loads, and string arguments of ATen
                # calls (FX writes those with repr()): never pasted into code unquoted.
                for text in _strings(value):
                    if _CONTROL.search(text):
                        yield here, f"text {_cut(repr(text))} holds control characters"
            else:
                yield from _problems(value, here)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _problems(value, (*where, str(i)))
    elif isinstance(obj, str) and not _PLAIN.fullmatch(obj):
        yield where, f"string {_cut(repr(obj))} is not a plain name"


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _strings(value)


def target_problem(target: str) -> str | None:
    """None if a node may call ``target``; else why not."""
    if target in _SYM_TARGETS:
        return None
    match = _ATEN_TARGET.fullmatch(target)
    if match is None:
        return "only torch.ops.aten/prims operators and symbolic-int operators may be called"
    if match.group(2) in _REFUSED_OPERATORS:
        return f"{match.group(2)} reads or maps a file on the host"
    return None


# -- expressions ---------------------------------------------------------------------------------
def expression_problem(text: str) -> str | None:
    """None if ``text`` is in the expression grammar (module docstring); else why not."""
    return _grammar_problem(text, _check_expression)


def guard_problem(text: str) -> str | None:
    """None if ``text`` is in the guard grammar (module docstring); else why not."""
    return _grammar_problem(text, _check_guard)


def _grammar_problem(text: str, check) -> str | None:
    if len(text) > MAX_EXPRESSION_CHARS:
        return f"{len(text)} characters, limit {MAX_EXPRESSION_CHARS}"
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "not an expression"
    nodes = sum(1 for _ in ast.walk(tree))
    if nodes > MAX_EXPRESSION_NODES:
        return f"{nodes} syntax nodes, limit {MAX_EXPRESSION_NODES}"
    try:
        check(tree.body)
    except _Refused as exc:
        return str(exc)
    except RecursionError:
        return "nested too deeply"
    return None


class _Refused(Exception):
    pass


def _check_operators(node: ast.AST, recurse) -> bool:
    """The operators both grammars share; True if ``node`` was one of them (and checked)."""
    if isinstance(node, ast.BinOp):
        if not isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.Div, ast.Pow)):
            raise _Refused(f"operator {type(node.op).__name__}")
        if isinstance(node.op, ast.Pow):
            _check_exponent(node.right)
        recurse(node.left)
        recurse(node.right)
    elif isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
            raise _Refused(f"operator {type(node.op).__name__}")
        recurse(node.operand)
    elif isinstance(node, ast.BoolOp):
        for value in node.values:
            recurse(value)
    elif isinstance(node, ast.Compare):
        if not all(isinstance(op, (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)) for op in node.ops):
            raise _Refused("comparison other than == != < <= > >=")
        recurse(node.left)
        for value in node.comparators:
            recurse(value)
    elif isinstance(node, ast.Constant):
        _check_number(node.value)
    else:
        return False
    return True


def _check_number(value: Any) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if len(str(abs(value))) > MAX_INT_DIGITS:
            raise _Refused(f"integer of more than {MAX_INT_DIGITS} digits")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Refused("non-finite literal")
        return
    raise _Refused(f"{type(value).__name__} literal")


def _check_exponent(node: ast.AST) -> None:
    """A power's exponent: a literal integer 0..MAX_EXPONENT (2**(2**62) would never finish)."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "Integer"
        and len(node.args) == 1
    ):
        node = node.args[0]
    if not (isinstance(node, ast.Constant) and type(node.value) is int and 0 <= node.value <= MAX_EXPONENT):
        raise _Refused(f"a power whose exponent is not a literal integer 0..{MAX_EXPONENT}")


def _check_expression(node: ast.AST) -> None:
    if _check_operators(node, _check_expression):
        return
    if isinstance(node, ast.Name):
        if not _NAME.fullmatch(node.id) or node.id.startswith("__"):
            raise _Refused(f"name {node.id!r}")
        return
    if not isinstance(node, ast.Call):
        raise _Refused(f"{type(node).__name__} syntax")
    if not isinstance(node.func, ast.Name) or node.func.id not in EXPRESSION_FUNCTIONS:
        raise _Refused(f"call of {ast.unparse(node.func)[:60]!r}, not a symbolic-shape function")
    name = node.func.id
    if name == "Symbol":
        if not node.args or len(node.args) > 1:
            raise _Refused("Symbol takes one name")
        arg = node.args[0]
        if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str) and _NAME.fullmatch(arg.value)):
            raise _Refused("Symbol's name is not a plain identifier")
        for kw in node.keywords:
            if kw.arg not in _ASSUMPTIONS or not (
                isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, bool)
            ):
                raise _Refused(f"Symbol keyword {kw.arg!r}")
        return
    if name == "Float":
        if len(node.args) != 1:
            raise _Refused("Float takes one value")
        arg = node.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            if not _FLOAT_TEXT.fullmatch(arg.value) or len(arg.value) > 64:
                raise _Refused("Float's text is not a number")
        else:
            _check_expression(arg)
        for kw in node.keywords:
            if kw.arg not in ("precision", "dps") or not (
                isinstance(kw.value, ast.Constant) and type(kw.value.value) is int and 1 <= kw.value.value <= 1024
            ):
                raise _Refused(f"Float keyword {kw.arg!r}")
        return
    if node.keywords:
        raise _Refused(f"{name} takes no keywords")
    if name in _POWERS:
        if len(node.args) != 2:
            raise _Refused(f"{name} takes two arguments")
        _check_exponent(node.args[1])
    for arg in node.args:
        if isinstance(arg, ast.Starred):
            raise _Refused("starred argument")
        _check_expression(arg)


# -- guards --------------------------------------------------------------------------------------
def _check_guard(node: ast.AST) -> None:
    if _check_operators(node, _check_guard):
        return
    if _is_input_path(node):
        return
    if isinstance(node, ast.Subscript):
        # L['x'].size()[2], L['x'].stride()[0]
        call = node.value
        if (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and call.func.attr in ("size", "stride")
            and not call.args
            and not call.keywords
            and _is_input_path(call.func.value)
            and isinstance(node.slice, ast.Constant)
            and type(node.slice.value) is int
            and 0 <= node.slice.value < 64
        ):
            return
        raise _Refused("subscript other than L['<input>'].size()[i] / .stride()[i]")
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "storage_offset" and _is_input_path(func.value):
            if node.args or node.keywords:
                raise _Refused("storage_offset() takes no arguments")
            return
        dotted = _dotted(func)
        if dotted not in GUARD_FUNCTIONS:
            raise _Refused(f"call of {ast.unparse(func)[:60]!r}, not a guard function")
        if node.keywords:
            raise _Refused(f"{dotted} takes no keywords")
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise _Refused("starred argument")
            _check_guard(arg)
        return
    raise _Refused(f"{type(node).__name__} syntax")


def _is_input_path(node: ast.AST) -> bool:
    """``L['x']``, ``L['x']['k']``, ``L['args'][0]``: the guarded inputs, by name or index."""
    if not isinstance(node, ast.Subscript):
        return False
    key = node.slice
    if not isinstance(key, ast.Constant) or not (
        (isinstance(key.value, str) and _NAME.fullmatch(key.value))
        or (type(key.value) is int and 0 <= key.value < 1 << 16)
    ):
        return False
    return (isinstance(node.value, ast.Name) and node.value.id == "L") or _is_input_path(node.value)


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return f"{node.value.id}.{node.attr}"
    return None


# -- errors --------------------------------------------------------------------------------------
def _cut(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _refuse(path: Path, member: str, problem: str):
    raise ArchiveRefused(
        f"{path}: refused: {member}: {problem}; torch would run archive text as code "
        "(stn-export --trust-archive loads an archive you trust)"
    )
