"""What an ONNX file's graph holds (opsets, operator types, weight types), read without ``onnx``.

A deployment host has onnxruntime, numpy and pillow, not the ``onnx`` package, and ONNX Runtime
does not expose the graph. The runtime still needs a few facts about it before it picks
providers: is there a GridSample at opset 20 or later (TensorRT would sample it with the wrong
mode, :mod:`.guards`), is the graph int8 or fp16 (a model file's metadata may say otherwise, and
the device check's bounds depend on it). These are read straight from the protobuf wire format:
the file is read once and only the fields below are decoded; every other field (the weights'
bytes above all) is stepped over by its length, without being copied or parsed.

Field numbers are those of ``onnx/onnx.proto`` (stable since ONNX 1.0).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from stn_deploy.fileio import read_regular_file

# onnx.proto field numbers
_MODEL_GRAPH, _MODEL_OPSET_IMPORT, _MODEL_METADATA_PROPS = 7, 8, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_ENTRY = (_ENTRY_KEY, _ENTRY_VALUE)
_OPSET_DOMAIN, _OPSET_VERSION = 1, 2
_GRAPH_NODE, _GRAPH_INITIALIZER = 1, 5
_NODE_OP_TYPE, _NODE_ATTRIBUTE, _NODE_DOMAIN = 4, 5, 7
_ATTR_NAME, _ATTR_I = 1, 3
_TENSOR_DATA_TYPE = 2
# onnx.TensorProto.DataType
INT8, UINT8, FLOAT16 = 3, 2, 10

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
# Operators that only exist in quantized graphs (QDQ and QOperator formats, integer kernels).
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "ConvInteger",
        "MatMulInteger",
        "DynamicQuantizeLinear",
        "QGemm",
        "QLinearAdd",
        "QLinearMul",
    }
)


class GraphReadError(ValueError):
    """The bytes are not a well-formed ONNX ModelProto."""


@dataclass
class GraphInfo:
    """The facts :func:`read_graph_info` extracts; ``op_types`` keys are ``op`` or ``domain.op``."""

    opsets: dict[str, int] = field(default_factory=dict)  # domain ("" = ai.onnx) -> version
    op_types: Counter[str] = field(default_factory=Counter)
    initializer_types: Counter[int] = field(default_factory=Counter)  # TensorProto.DataType -> count
    cast_targets: Counter[int] = field(default_factory=Counter)  # Cast(to=...) -> count
    metadata: dict[str, str] = field(default_factory=dict)  # the model's metadata_props

    @property
    def opset(self) -> int:
        return self.opsets.get("", self.opsets.get("ai.onnx", 0))

    @property
    def precision(self) -> str:
        """``int8`` (quantized operators or int8 weights), ``fp16`` (fp16 weights or casts), else ``fp32``."""
        if QUANTIZED_OPS & set(self.op_types) or self.initializer_types.get(INT8):
            return "int8"
        if self.initializer_types.get(FLOAT16) or self.cast_targets.get(FLOAT16):
            return "fp16"
        return "fp32"


def read_graph_info(path: str | os.PathLike[str]) -> GraphInfo:
    """Scan ``path``'s top-level graph; raises :class:`GraphReadError` on malformed bytes or on
    anything but a regular file."""
    data = read_regular_file(path)
    if data is None:
        raise GraphReadError(f"{path}: not a regular file")
    data = memoryview(data)
    info = GraphInfo()
    for number, _, value in _fields(data):
        if number == _MODEL_OPSET_IMPORT:
            domain, version = "", 0
            for n, _, v in _fields(value):
                if n == _OPSET_DOMAIN:
                    domain = bytes(v).decode("utf-8", "replace")
                elif n == _OPSET_VERSION:
                    version = int(v)
            info.opsets[domain] = version
        elif number == _MODEL_GRAPH:
            _read_graph(value, info)
        elif number == _MODEL_METADATA_PROPS:
            entry = {n: bytes(v).decode("utf-8", "replace") for n, _, v in _fields(value) if n in _ENTRY}
            info.metadata[entry.get(_ENTRY_KEY, "")] = entry.get(_ENTRY_VALUE, "")  # StringStringEntryProto
    return info


def try_read_graph_info(path: str | os.PathLike[str]) -> GraphInfo | None:
    """:func:`read_graph_info`, or None where the file cannot be read or parsed: for a caller whose
    next step (ONNX Runtime's load, a backend's ``load()``) says what is wrong with it, in its words."""
    try:
        return read_graph_info(path)
    except (GraphReadError, OSError):
        return None


def _read_graph(graph: memoryview, info: GraphInfo) -> None:
    for number, _, value in _fields(graph):
        if number == _GRAPH_NODE:
            op, domain, cast_to = "", "", None
            for n, _, v in _fields(value):
                if n == _NODE_OP_TYPE:
                    op = bytes(v).decode("utf-8", "replace")
                elif n == _NODE_DOMAIN:
                    domain = bytes(v).decode("utf-8", "replace")
                elif n == _NODE_ATTRIBUTE:
                    name, i = "", None
                    for an, _, av in _fields(v):
                        if an == _ATTR_NAME:
                            name = bytes(av).decode("utf-8", "replace")
                        elif an == _ATTR_I:
                            i = int(av)
                    if name == "to":
                        cast_to = i
            info.op_types[op if domain in ("", "ai.onnx") else f"{domain}.{op}"] += 1
            if op == "Cast" and cast_to is not None:
                info.cast_targets[cast_to] += 1
        elif number == _GRAPH_INITIALIZER:
            for n, _, v in _fields(value):
                if n == _TENSOR_DATA_TYPE:
                    info.initializer_types[int(v)] += 1
                    break


def _fields(buf: memoryview) -> Iterator[tuple[int, int, memoryview | int]]:
    """``(field number, wire type, value)`` for each field of one message: varints and fixed
    ints as ints, length-delimited fields as views into ``buf`` (nothing is copied)."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == _LENGTH:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise GraphReadError("a field runs past the end of the file (truncated?)")
            yield number, wire, buf[pos : pos + size]
            pos += size
        elif wire in (_FIXED64, _FIXED32):
            width = 8 if wire == _FIXED64 else 4
            if pos + width > end:
                raise GraphReadError("a field runs past the end of the file (truncated?)")
            yield number, wire, int.from_bytes(buf[pos : pos + width], "little")
            pos += width
        else:  # groups (3, 4) are not used by onnx.proto; 6 and 7 do not exist
            raise GraphReadError(f"wire type {wire} at byte {pos}: not an ONNX model")


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise GraphReadError("a varint runs past the end of the file (truncated?)")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise GraphReadError(f"a varint longer than 10 bytes at byte {pos}: not an ONNX model")
