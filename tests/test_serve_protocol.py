"""stn-serve's pieces without a server: request/response bodies and the dynamic batcher."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest

from stn_deploy.serve.batching import BatcherClosed, DynamicBatcher, QueueFull
from stn_deploy.serve.protocol import (
    HEADER_LENGTH,
    ModelSignature,
    RequestError,
    TensorSpec,
    build_infer_response,
    model_metadata,
    parse_header_length,
    parse_infer_request,
)

SIG = ModelSignature(
    name="stn",
    input=TensorSpec("image", (3, 4, 4)),
    outputs=(TensorSpec("log_probs", (10,)), TensorSpec("theta", (2, 3))),
    max_batch_size=8,
)


def _binary(x: np.ndarray, **header) -> tuple[bytes, int]:
    request = {
        "inputs": [
            {"name": "image", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
        ],
        **header,
    }
    text = json.dumps(request).encode()
    return text + x.astype("<f4").tobytes(), len(text)


def _error(body: bytes, header_length: int | None = None) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_infer_request(body, header_length, SIG)
    assert info.value.status == 400
    return info.value


def test_flat_nested_and_binary_data_parse_to_the_same_batch():
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4) / 7
    flat = json.dumps(
        {"inputs": [{"name": "image", "shape": [2, 3, 4, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}
    ).encode()
    nested = json.dumps(
        {"inputs": [{"name": "image", "shape": [2, 3, 4, 4], "datatype": "FP32", "data": x.tolist()}]}
    ).encode()
    body, n = _binary(x, id="a")
    for parsed in (
        parse_infer_request(flat, None, SIG),
        parse_infer_request(nested, None, SIG),
        parse_infer_request(body, n, SIG),
    ):
        assert parsed.inputs.dtype == np.float32
        np.testing.assert_array_equal(parsed.inputs, x)
    assert parse_infer_request(body, n, SIG).id == "a"


def test_outputs_default_to_all_and_binary_follows_binary_data_output_unless_overridden():
    x = np.zeros((1, 3, 4, 4), np.float32)
    body, n = _binary(x, parameters={"binary_data_output": True})
    assert [(o.name, o.binary) for o in parse_infer_request(body, n, SIG).outputs] == [
        ("log_probs", True),
        ("theta", True),
    ]
    body, n = _binary(
        x, parameters={"binary_data_output": True}, outputs=[{"name": "theta", "parameters": {"binary_data": False}}]
    )
    assert [(o.name, o.binary) for o in parse_infer_request(body, n, SIG).outputs] == [("theta", False)]
    body, n = _binary(x)
    assert [o.binary for o in parse_infer_request(body, n, SIG).outputs] == [False, False]


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda r: r["inputs"][0].update(datatype="FP64"), "datatype 'FP64'"),
        (lambda r: r["inputs"][0].update(datatype="BYTES"), "datatype 'BYTES'"),
        (lambda r: r["inputs"][0].update(shape=[1, 3, 4]), "rank 3"),
        (lambda r: r["inputs"][0].update(shape=[9, 3, 4, 4]), "exceeds the server's maximum of 8"),
        (lambda r: r["inputs"][0].update(shape=[10**9, 3, 4, 4]), "exceeds the server's maximum"),
        (lambda r: r["inputs"][0].update(shape=[1, 3, 4, True]), "list of integers"),
        (lambda r: r["inputs"][0].update(name="x"), "unknown input 'x'"),
        (lambda r: r["inputs"].append(dict(r["inputs"][0])), "given twice"),
        (lambda r: r.update(id=5), "'id' must be a string"),
        (lambda r: r.update(outputs=[{"name": "warped"}]), "unknown output 'warped'"),
        (lambda r: r.update(outputs=[{"name": "theta"}, {"name": "theta"}]), "requested twice"),
        (lambda r: r.update(outputs=[{"name": "theta", "parameters": {"binary_data": "yes"}}]), "true or false"),
        (lambda r: r.update(outputs=[{"name": "theta", "parameters": {"classification": 2}}]), "classify"),
        (lambda r: r.update(parameters=[]), "must be a JSON object"),
        (lambda r: r["inputs"][0].update(data=[0.0] * 47), "has 47 elements"),
        (lambda r: r["inputs"][0].update(data=[[0.0] * 47, [0.0]]), "not a regular array"),
        (lambda r: r["inputs"][0].update(data=[True] * 48), "booleans"),
        (lambda r: r["inputs"][0].update(data=[None] * 48), "non-numbers"),
        (lambda r: r["inputs"][0].pop("data"), "no 'data'"),
        (lambda r: r.pop("inputs"), "'inputs' must be a non-empty list"),
    ],
)
def test_a_bad_json_request_is_a_400_naming_the_problem(mutate, words):
    request = {"inputs": [{"name": "image", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": [0.0] * 48}]}
    mutate(request)
    assert words in _error(json.dumps(request).encode()).message


def test_binary_body_errors_name_the_sizes():
    x = np.zeros((2, 3, 4, 4), np.float32)
    body, n = _binary(x)
    assert "larger than the 284 bytes" in _error(body[:-100], n).message
    assert "not claimed" in _error(body + b"\0" * 4, n).message
    assert (
        "malformed JSON" in _error(body, None).message
    )  # binary bytes after the JSON, and no header to say where it ends
    assert "needs the Inference-Header-Content-Length" in _error(body[:n], None).message
    header = json.dumps(
        {
            "inputs": [
                {"name": "image", "shape": [2, 3, 4, 4], "datatype": "FP32", "parameters": {"binary_data_size": 12}}
            ]
        }
    ).encode()
    assert "does not match shape" in _error(header + b"\0" * 12, len(header)).message
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    body, n = _binary(nan)
    assert "NaN" in _error(body, n).message


def test_header_length_must_lie_within_the_body():
    assert parse_header_length(None, 10) is None
    assert parse_header_length("5", 10) == 5
    for bad in ("0", "11", "-1", "x"):
        with pytest.raises(RequestError, match=HEADER_LENGTH):
            parse_header_length(bad, 10)


def test_malformed_and_deeply_nested_json_are_400s():
    assert "malformed JSON" in _error(b"{").message
    assert "nested too deeply" in _error(b"[" * 100_000 + b"]" * 100_000).message
    assert "empty request body" in _error(b"").message
    assert "JSON object" in _error(b"[1]").message


def test_a_binary_response_reads_back_through_tritonclient():
    infer_result = pytest.importorskip("tritonclient.http", reason="tritonclient is a dev dependency").InferResult
    x = np.zeros((1, 3, 4, 4), np.float32)
    body, n = _binary(
        x, id="q", outputs=[{"name": "log_probs", "parameters": {"binary_data": True}}, {"name": "theta"}]
    )
    request = parse_infer_request(body, n, SIG)
    arrays = {
        "log_probs": np.linspace(-3, 0, 10, dtype=np.float32)[None],
        "theta": np.eye(2, 3, dtype=np.float32)[None],
    }
    content, header_length = build_infer_response("stn", request.id, request.outputs, arrays)
    assert header_length is not None
    result = infer_result.from_response_body(content, header_length=header_length)
    assert result.get_response()["id"] == "q"
    np.testing.assert_array_equal(result.as_numpy("log_probs"), arrays["log_probs"])
    np.testing.assert_array_equal(result.as_numpy("theta"), arrays["theta"])
    assert model_metadata(SIG)["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 4, 4]}]


# -- the batcher ----------------------------------------------------------------------------------------
class Recorder:
    """A stand-in model: output row i is input row i's sum, and every batch size is recorded."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[int] = []
        self.delay = delay
        self.threads: set[str] = set()

    def __call__(self, x: np.ndarray, names) -> dict[str, np.ndarray]:
        self.threads.add(threading.current_thread().name)
        self.batches.append(len(x))
        time.sleep(self.delay)
        return {"sum": x.reshape(len(x), -1).sum(1), "double": x * 2}


def _run(coro):
    return asyncio.run(coro)


def test_requests_of_different_sizes_share_batches_and_get_their_own_rows():
    model = Recorder(delay=0.005)

    async def main():
        batcher = DynamicBatcher(
            model, output_order=["sum", "double"], max_batch_size=16, max_queue_delay_s=0.01, max_queue=100
        )
        batcher.start(asyncio.get_running_loop())
        rng = np.random.default_rng(0)
        inputs = [rng.normal(size=(int(rng.integers(1, 6)), 2)).astype(np.float32) for _ in range(60)]
        jobs = [batcher.submit(x, ["sum"] if i % 2 else ["sum", "double"]) for i, x in enumerate(inputs)]
        results = await asyncio.gather(*(job.future for job in jobs))
        batcher.close()
        return inputs, results

    inputs, results = _run(main())
    for i, (x, out) in enumerate(zip(inputs, results)):
        np.testing.assert_allclose(out["sum"], x.sum(1), rtol=1e-6)
        assert ("double" in out) == (i % 2 == 0)
    assert sum(model.batches) == sum(len(x) for x in inputs)
    assert max(model.batches) <= 16 and len(model.batches) < len(inputs)
    assert model.threads == {"stn-batcher-model"}  # never on the event loop's thread


def test_a_full_queue_refuses_at_once_and_close_drains_what_was_accepted():
    model = Recorder()

    async def main():
        batcher = DynamicBatcher(model, output_order=["sum"], max_batch_size=4, max_queue_delay_s=10.0, max_queue=3)
        batcher.start(asyncio.get_running_loop())
        await asyncio.to_thread(batcher.ready.wait)
        jobs = [batcher.submit(np.ones((1, 2), np.float32), ["sum"]) for _ in range(3)]
        with pytest.raises(QueueFull):
            batcher.submit(np.ones((1, 2), np.float32), ["sum"])
        start = time.perf_counter()
        await asyncio.to_thread(batcher.close)  # runs the 3 queued without waiting 10 s for company
        results = await asyncio.gather(*(job.future for job in jobs))
        with pytest.raises(BatcherClosed):
            batcher.submit(np.ones((1, 2), np.float32), ["sum"])
        return results, time.perf_counter() - start

    results, seconds = _run(main())
    assert [float(r["sum"][0]) for r in results] == [2.0, 2.0, 2.0]
    assert seconds < 5


def test_a_cancelled_request_leaves_the_queue_and_a_failed_batch_fails_only_its_requests():
    calls = []

    def flaky(x, names):
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return {"sum": x.sum(1)}

    async def main():
        batcher = DynamicBatcher(flaky, output_order=["sum"], max_batch_size=8, max_queue_delay_s=0.2, max_queue=8)
        batcher.start(asyncio.get_running_loop())
        await asyncio.to_thread(batcher.ready.wait)
        first = batcher.submit(np.ones((1, 2), np.float32), ["sum"])
        gone = batcher.submit(np.ones((1, 2), np.float32), ["sum"])
        assert batcher.cancel(gone) and batcher.depth == 1
        with pytest.raises(RuntimeError, match="boom"):
            await first.future
        second = batcher.submit(np.ones((2, 2), np.float32), ["sum"])
        out = await second.future
        batcher.close()
        return out

    assert _run(main())["sum"].tolist() == [2.0, 2.0]
    assert calls == [1, 2]
