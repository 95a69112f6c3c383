"""The Open Inference Protocol (KServe v2) over REST, as pure functions: bytes in, arrays out.

Parsing and building bodies lives here, apart from the web framework, so that every rule can be
unit-tested without a server. The protocol:

* an infer request is a JSON object ``{id?, parameters?, inputs: [{name, shape, datatype,
  parameters?, data?}], outputs?: [{name, parameters?}]}``; ``data`` is row-major, flat or
  nested;
* the binary tensor data extension (Triton's ``extension_binary_data.md``): the body is the JSON
  header followed by raw little-endian tensors in the order of the JSON's inputs, the
  ``Inference-Header-Content-Length`` HTTP header gives the JSON's length, and an input sent this
  way carries ``parameters.binary_data_size``. Outputs come back as binary when the output asks
  with ``parameters.binary_data: true``, or, unless it says otherwise, when the request's
  ``parameters.binary_data_output`` is true (what ``tritonclient.http`` sends by default);
* errors are an HTTP status and ``{"error": "message"}``.

Every check that guards memory runs before anything is allocated: a declared shape is compared
with the model's and with the batch limit, and a binary size with the bytes actually received,
before any array exists.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PROTOCOL_VERSION = "2"
EXTENSIONS = ("binary_tensor_data", "classify", "metrics")
HEADER_LENGTH = "Inference-Header-Content-Length"
MODEL_VERSION = "1"  # one version per served file
PLATFORM = "onnxruntime_onnx"

# Open Inference Protocol datatype names and their numpy equivalents (BYTES: length-prefixed strings).
DATATYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
_NUMPY_TO_DATATYPE = {np.dtype(t): name for name, t in DATATYPES.items() if name != "BYTES"}
# Longest error message quoted back from a client's own text (names, ids).
_QUOTE_LIMIT = 80


class RequestError(Exception):
    """A request the server refuses: the HTTP ``status`` and a one-line ``message`` for ``{"error": ...}``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def bad_request(message: str) -> RequestError:
    return RequestError(400, message)


def _quote(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _QUOTE_LIMIT else text[: _QUOTE_LIMIT - 3] + "..."


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the protocol describes it; ``shape`` excludes the batch axis."""

    name: str
    shape: tuple[int, ...]
    datatype: str = "FP32"

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": [-1, *self.shape]}


@dataclass(frozen=True)
class ModelSignature:
    """What a served model takes and gives: one image input, named outputs, the batch limit."""

    name: str
    input: TensorSpec
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def output(self, name: str) -> TensorSpec | None:
        return next((o for o in self.outputs if o.name == name), None)


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    """A parsed, validated infer request: the input batch ``[N, *input.shape]`` float32 and the outputs to send back."""

    inputs: np.ndarray
    outputs: list[RequestedOutput]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]


# -- metadata ------------------------------------------------------------------------------------
def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "stn-serve", "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(sig: ModelSignature, parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": sig.name,
        "versions": [MODEL_VERSION],
        "platform": PLATFORM,
        "inputs": [sig.input.metadata()],
        "outputs": [o.metadata() for o in sig.outputs],
    }
    if parameters:
        body["parameters"] = dict(parameters)
    return body


# -- infer request ---------------------------------------------------------------------------------
def parse_header_length(value: str | None, body_size: int) -> int | None:
    """The ``Inference-Header-Content-Length`` header as a JSON length within the body, or None."""
    if value is None:
        return None
    try:
        length = int(value.strip())
    except ValueError:
        raise bad_request(f"{HEADER_LENGTH} must be an integer, got {_quote(value)}") from None
    if length <= 0 or length > body_size:
        raise bad_request(f"{HEADER_LENGTH} {length} is outside the {body_size}-byte body")
    return length


def parse_infer_request(body: bytes, header_length: int | None, sig: ModelSignature) -> InferRequest:
    """Validate and decode an infer request body for ``sig`` (raises :class:`RequestError`, status 400)."""
    if not body:
        raise bad_request("empty request body: send a JSON inference request")
    header, binary = (body, b"") if header_length is None else (body[:header_length], body[header_length:])
    try:
        request = json.loads(header)
    except RecursionError:
        raise bad_request("malformed JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        where = f" in the first {header_length} bytes ({HEADER_LENGTH})" if header_length is not None else ""
        raise bad_request(f"malformed JSON{where}: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(request, dict):
        raise bad_request(f"the request must be a JSON object, got {type(request).__name__}")

    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad_request(f"'id' must be a string, got {type(request_id).__name__}")
    parameters = _object(request.get("parameters"), "request 'parameters'")

    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad_request(f"'inputs' must be a non-empty list (the model takes one input, '{sig.input.name}')")
    offset = 0
    batch: np.ndarray | None = None
    for entry in inputs:
        if not isinstance(entry, dict):
            raise bad_request(f"each input must be a JSON object, got {type(entry).__name__}")
        name = entry.get("name")
        if name != sig.input.name:
            raise bad_request(f"unknown input {_quote(name)}: the model takes one input, '{sig.input.name}'")
        if batch is not None:
            raise bad_request(f"input '{name}' is given twice")
        batch, offset = _parse_input(entry, sig, binary, offset, header_length is not None)
    assert batch is not None
    if offset != len(binary):
        raise bad_request(
            f"{len(binary) - offset} bytes after the JSON header are not claimed by any input's binary_data_size"
        )
    if not np.isfinite(batch).all():
        raise bad_request(f"input '{sig.input.name}' holds NaN or infinite values")

    outputs = _parse_outputs(
        request.get("outputs"), sig, default_binary=_flag(parameters, "binary_data_output", "request")
    )
    return InferRequest(inputs=batch, outputs=outputs, id=request_id, parameters=parameters)


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _flag(parameters: Mapping[str, Any], key: str, where: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise bad_request(f"{where} parameter '{key}' must be true or false, got {_quote(value)}")
    return value


def _parse_input(
    entry: dict[str, Any], sig: ModelSignature, binary: bytes, offset: int, has_header: bool
) -> tuple[np.ndarray, int]:
    name = sig.input.name
    datatype = entry.get("datatype")
    if datatype != sig.input.datatype:
        known = "" if datatype in DATATYPES else " (not a protocol datatype)"
        raise bad_request(
            f"input '{name}': datatype {_quote(datatype)}{known} is not accepted; the model takes {sig.input.datatype}"
        )
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise bad_request(f"input '{name}': 'shape' must be a list of integers, got {_quote(shape)}")
    want = list(sig.input.shape)
    expected = f"[N, {', '.join(map(str, want))}]"
    if len(shape) != len(want) + 1:
        raise bad_request(f"input '{name}': shape {_quote(shape)} has rank {len(shape)}; the model takes {expected}")
    if shape[1:] != want:
        raise bad_request(f"input '{name}': shape {_quote(shape)} does not match the model's {expected}")
    n = shape[0]
    if n < 1:
        raise bad_request(f"input '{name}': batch size {n} in shape {_quote(shape)} must be at least 1")
    if n > sig.max_batch_size:
        raise bad_request(
            f"input '{name}': batch size {n} exceeds the server's maximum of {sig.max_batch_size} images per request "
            "(--max-batch-size)"
        )
    count = math.prod(shape)  # small: n and every other dim are bounded above
    itemsize = np.dtype(DATATYPES[datatype]).itemsize
    params = _object(entry.get("parameters"), f"input '{name}' 'parameters'")

    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad_request(f"input '{name}': binary_data_size must be a non-negative integer, got {_quote(size)}")
        if not has_header:
            raise bad_request(f"input '{name}': binary_data_size needs the {HEADER_LENGTH} header (the JSON's length)")
        if "data" in entry:
            raise bad_request(f"input '{name}': give either 'data' or binary_data_size, not both")
        if size != count * itemsize:
            raise bad_request(
                f"input '{name}': binary_data_size {size} does not match shape {_quote(shape)} of {datatype} "
                f"({count * itemsize} bytes)"
            )
        if offset + size > len(binary):
            raise bad_request(
                f"input '{name}': binary_data_size {size} is larger than the {len(binary) - offset} bytes "
                f"left after the JSON header (truncated body?)"
            )
        array = np.frombuffer(binary, dtype=np.dtype(DATATYPES[datatype]).newbyteorder("<"), count=count, offset=offset)
        return array.reshape(shape).astype(np.float32, copy=False), offset + size

    if "data" not in entry:
        raise bad_request(f"input '{name}': no 'data' and no binary_data_size")
    data = entry["data"]
    if not isinstance(data, list):
        raise bad_request(
            f"input '{name}': 'data' must be a list of numbers (flat or nested), got {type(data).__name__}"
        )
    try:
        array = np.asarray(data)
    except (ValueError, TypeError):
        raise bad_request(f"input '{name}': 'data' is not a regular array of numbers (ragged nesting?)") from None
    if array.dtype.kind not in "fiu":  # strings, booleans, nulls and ragged lists (object) are refused
        raise bad_request(f"input '{name}': 'data' must hold only numbers for {datatype} (found {_kind(array)})")
    if array.size != count:
        raise bad_request(f"input '{name}': 'data' has {array.size} elements but shape {_quote(shape)} needs {count}")
    if array.ndim != 1 and list(array.shape) != shape:
        raise bad_request(
            f"input '{name}': nested 'data' of shape {list(array.shape)} does not match shape {_quote(shape)}"
        )
    return array.astype(np.float32).reshape(shape), offset


def _kind(array: np.ndarray) -> str:
    return {"b": "booleans", "U": "strings", "S": "strings", "O": "non-numbers or ragged lists"}.get(
        array.dtype.kind, str(array.dtype)
    )


def _parse_outputs(value: Any, sig: ModelSignature, *, default_binary: bool) -> list[RequestedOutput]:
    if value is None:
        return [RequestedOutput(name, default_binary) for name in sig.output_names]
    if not isinstance(value, list) or not value:
        raise bad_request("'outputs' must be a non-empty list of {\"name\": ...} objects (or left out for all outputs)")
    out: list[RequestedOutput] = []
    for entry in value:
        if not isinstance(entry, dict):
            raise bad_request(f"each requested output must be a JSON object, got {type(entry).__name__}")
        name = entry.get("name")
        if sig.output(name if isinstance(name, str) else "") is None:
            raise bad_request(f"unknown output {_quote(name)}: the model has {', '.join(sig.output_names)}")
        if any(o.name == name for o in out):
            raise bad_request(f"output '{name}' is requested twice")
        params = _object(entry.get("parameters"), f"output '{name}' 'parameters'")
        if "classification" in params:
            raise bad_request("the classification extension is not supported; use POST /v2/models/{name}/classify")
        binary = _flag(params, "binary_data", f"output '{name}'") if "binary_data" in params else default_binary
        out.append(RequestedOutput(name, binary))
    return out


# -- infer response -------------------------------------------------------------------------------
def datatype_of(array: np.ndarray) -> str:
    try:
        return _NUMPY_TO_DATATYPE[array.dtype]
    except KeyError:
        raise TypeError(f"no protocol datatype for numpy {array.dtype}") from None


def build_infer_response(
    model_name: str,
    request_id: str | None,
    outputs: Sequence[RequestedOutput],
    arrays: Mapping[str, np.ndarray],
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length.

    JSON outputs carry their data flat (row-major), as Triton sends them; binary outputs carry
    ``parameters.binary_data_size`` and their raw little-endian bytes follow the JSON in order.
    """
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for out in outputs:
        array = arrays[out.name]
        entry: dict[str, Any] = {"name": out.name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if out.binary:
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": MODEL_VERSION}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = entries
    header = json.dumps(response, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
