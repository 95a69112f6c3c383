"""stn-serve end to end: a real server process on loopback, driven by tritonclient, httpx and raw sockets."""

from __future__ import annotations

import io
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from serve_support import (
    ServerProcess,
    assert_json_error,
    binary_infer_body,
    digit_png,
    export_served_model,
    plain_model,
    raw_http,
    read_response,
)
from stn_deploy.images import decode
from stn_deploy.runtime import Session

REASON = "stn-serve's test tools are not installed (pip install -e '.[serve,dev]')"
for _module in ("uvicorn", "starlette", "multipart"):
    pytest.importorskip(_module, reason=REASON)
httpx = pytest.importorskip("httpx", reason=REASON)
httpclient = pytest.importorskip("tritonclient.http", reason=REASON)
text_string_to_metric_families = pytest.importorskip(
    "prometheus_client.parser", reason=REASON
).text_string_to_metric_families

pytestmark = pytest.mark.slow
TIMEOUT_S = 3.0  # the main server's --request-timeout-s (the slow-loris test waits this long)
MAX_BODY_MB = 1.0


@pytest.fixture(scope="module")
def served_model(tmp_path_factory, checkpoint_path) -> Path:
    return export_served_model(tmp_path_factory, checkpoint_path)


@pytest.fixture(scope="module")
def plain_path(served_model, tmp_path_factory) -> Path:
    return plain_model(served_model, tmp_path_factory.getbasetemp() / "runtime_models" / "stn_plain.onnx")


@pytest.fixture(scope="module")
def server(served_model, plain_path):
    proc = ServerProcess(
        served_model,
        plain_path,
        "--name",
        "stn",
        "--name",
        "plain",
        "--max-body-mb",
        str(MAX_BODY_MB),
        "--request-timeout-s",
        str(TIMEOUT_S),
        "--max-batch-size",
        "16",
        "--max-queue-delay-ms",
        "5",
        "--json",
    )
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def session(served_model) -> Session:
    return Session(served_model, "cpu", threads=1)


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 32, 32)).astype(np.float32)


def _json_request(x: np.ndarray, **extra) -> dict:
    return {
        "inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
        **extra,
    }


def _still_serving(server, session) -> None:
    """The server answers a good request correctly after a bad one."""
    x = _images(1, 999)
    client = httpclient.InferenceServerClient(server.hostport)
    result = client.infer("stn", [_infer_input(x)])
    np.testing.assert_allclose(result.as_numpy("log_probs"), session.run(x)["log_probs"], atol=1e-5)


def _infer_input(x: np.ndarray, binary: bool = True):
    inp = httpclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


# -- the protocol through an unmodified third-party client -------------------------------------------
def test_tritonclient_health_metadata_and_binary_infer_match_the_session(server, session):
    client = httpclient.InferenceServerClient(server.hostport)  # the client's defaults: binary both ways
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("stn") and client.is_model_ready("plain")
    assert not client.is_model_ready("nope")
    meta = client.get_model_metadata("stn")
    assert meta["name"] == "stn" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {
        "log_probs": [-1, 10],
        "theta": [-1, 2, 3],
        "warped": [-1, 3, 32, 32],
    }
    assert client.get_model_metadata("plain")["outputs"] == [
        {"name": "log_probs", "datatype": "FP32", "shape": [-1, 10]}
    ]

    x = _images(5, 0)
    result = client.infer("stn", [_infer_input(x)], request_id="req-42")
    reference = session.run(x)
    assert result.get_response()["id"] == "req-42"
    for name in ("log_probs", "theta", "warped"):
        assert np.abs(result.as_numpy(name) - reference[name]).max() <= 1e-5, name
        assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])


def test_tritonclient_output_selection_and_json_outputs(server, session):
    client = httpclient.InferenceServerClient(server.hostport)
    x = _images(3, 1)
    outputs = [
        httpclient.InferRequestedOutput("theta", binary_data=False),
        httpclient.InferRequestedOutput("log_probs"),
    ]
    result = client.infer("stn", [_infer_input(x, binary=False)], outputs=outputs)
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["theta", "log_probs"]  # only what was asked, in that order
    assert "data" in response["outputs"][0] and "parameters" in response["outputs"][1]
    reference = session.run(x)
    assert np.abs(result.as_numpy("theta") - reference["theta"]).max() <= 1e-5
    assert np.abs(result.as_numpy("log_probs") - reference["log_probs"]).max() <= 1e-5
    assert result.as_numpy("warped") is None


def test_tritonclient_infer_on_a_versioned_route_and_a_missing_version(server):
    client = httpclient.InferenceServerClient(server.hostport)
    assert client.is_model_ready("stn", model_version="1")
    client.infer("stn", [_infer_input(_images(1, 2))], model_version="1")
    with pytest.raises(httpclient.InferenceServerException, match="no version '2'"):
        client.infer("stn", [_infer_input(_images(1, 2))], model_version="2")


def test_json_request_with_flat_or_nested_data_gives_the_same_json_outputs(client, session):
    x = _images(2, 3)
    flat = client.post("/v2/models/stn/infer", json=_json_request(x, id="flat-1"))
    nested = client.post(
        "/v2/models/stn/infer",
        json={"inputs": [{"name": "image", "shape": [2, 3, 32, 32], "datatype": "FP32", "data": x.tolist()}]},
    )
    assert flat.status_code == nested.status_code == 200
    assert flat.headers["content-type"] == "application/json"
    a, b = flat.json(), nested.json()
    assert a["id"] == "flat-1" and "id" not in b
    assert a["model_name"] == "stn" and a["model_version"] == "1"
    reference = session.run(x)
    for out_a, out_b in zip(a["outputs"], b["outputs"]):
        assert out_a == out_b
        got = np.asarray(out_a["data"], dtype=np.float32).reshape(out_a["shape"])
        assert np.abs(got - reference[out_a["name"]]).max() <= 1e-5


def test_binary_request_with_binary_output_flag_per_output(client, session):
    x = _images(1, 4)
    body, json_size = binary_infer_body(x, outputs=["log_probs"])
    r = client.post("/v2/models/stn/infer", content=body, headers={"Inference-Header-Content-Length": str(json_size)})
    assert r.status_code == 200
    result = httpclient.InferResult.from_response_body(
        r.content, header_length=int(r.headers["Inference-Header-Content-Length"])
    )
    assert np.abs(result.as_numpy("log_probs") - session.run(x)["log_probs"]).max() <= 1e-5


def test_json_prints_one_ready_line_with_the_url_models_and_settings(server):
    deadline = time.monotonic() + 5
    while not server.stdout and time.monotonic() < deadline:
        time.sleep(0.05)
    (line,) = server.stdout
    ready = json.loads(line)
    assert ready["url"] == server.url
    assert [m["name"] for m in ready["models"]] == ["stn", "plain"]
    assert ready["models"][1]["has_warped"] is False and ready["max_batch_size"] == 16
    assert all(m["device_check"] is None for m in ready["models"])  # the CPU provider: nothing to check against


def test_server_metadata_names_the_binary_tensor_extension(client):
    r = client.get("/v2")
    assert r.status_code == 200
    assert "binary_tensor_data" in r.json()["extensions"]


# -- bad input: each a clear 4xx with {"error"}, and the server keeps serving ---------------------------
def _post_binary(client, body: bytes, json_size: int | str, model: str = "stn"):
    return client.post(
        f"/v2/models/{model}/infer", content=body, headers={"Inference-Header-Content-Length": str(json_size)}
    )


def test_truncated_binary_body_is_a_400(client, server, session):
    body, json_size = binary_infer_body(_images(2, 5))
    r = _post_binary(client, body[:-100], json_size)
    assert_json_error(r, 400, "binary_data_size", "truncated")
    _still_serving(server, session)


def test_binary_data_size_larger_than_the_body_is_a_400(client, server, session):
    x = _images(1, 6)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1, 3, 32, 32],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ]
        }
    ).encode()
    r = _post_binary(client, header + x.tobytes()[: x.nbytes // 2], len(header))
    assert_json_error(r, 400, "larger than the")
    # and a header length that points past the body
    r = _post_binary(client, header, len(header) + 10)
    assert_json_error(r, 400, "Inference-Header-Content-Length")
    _still_serving(server, session)


@pytest.mark.parametrize("datatype", ["FP64", "BYTES", "INT8", "FP99"])
def test_a_wrong_datatype_is_a_400(client, server, session, datatype):
    x = _images(1, 7)
    r = client.post(
        "/v2/models/stn/infer",
        json={"inputs": [{"name": "image", "shape": [1, 3, 32, 32], "datatype": datatype, "data": x.ravel().tolist()}]},
    )
    assert_json_error(r, 400, datatype, "FP32")
    _still_serving(server, session)


@pytest.mark.parametrize(
    ("shape", "words"),
    [
        ([3, 32, 32], ["rank 3"]),
        ([1, 1, 3, 32, 32], ["rank 5"]),
        ([1, 3, 28, 28], ["does not match"]),
        ([1, 1, 32, 32], ["does not match"]),
        ([0, 3, 32, 32], ["at least 1"]),
        ([1, 3, 32, "32"], ["list of integers"]),
    ],
    ids=["rank3", "rank5", "wrong-size", "wrong-channels", "empty-batch", "string-dim"],
)
def test_a_wrong_shape_or_rank_is_a_400(client, server, session, shape, words):
    r = client.post(
        "/v2/models/stn/infer", json={"inputs": [{"name": "image", "shape": shape, "datatype": "FP32", "data": [0.0]}]}
    )
    assert_json_error(r, 400, *words)
    _still_serving(server, session)


def test_a_billion_element_shape_is_refused_before_any_allocation(client, server, session):
    for shape in ([1_000_000_000, 3, 32, 32], [1, 3, 31_623, 31_623]):
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "shape": shape,
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 4 * int(np.prod(shape, dtype=np.int64))},
                    }
                ]
            }
        ).encode()
        start = time.perf_counter()
        r = _post_binary(client, header + b"\0" * 64, len(header))
        assert time.perf_counter() - start < 2.0
        assert_json_error(r, 400, "input 'image'")
    _still_serving(server, session)


def test_nan_inputs_are_a_400_in_json_and_in_binary(client, server, session):
    x = _images(2, 8)
    x[1, 0, 5, 5] = np.nan
    text = json.dumps(_json_request(x))  # Python writes NaN as the (non-standard) token NaN
    r = client.post("/v2/models/stn/infer", content=text, headers={"content-type": "application/json"})
    assert_json_error(r, 400, "NaN")
    body, json_size = binary_infer_body(x)
    assert_json_error(_post_binary(client, body, json_size), 400, "NaN")
    x[1, 0, 5, 5] = np.inf
    body, json_size = binary_infer_body(x)
    assert_json_error(_post_binary(client, body, json_size), 400, "infinite")
    _still_serving(server, session)


def test_an_unknown_model_is_a_404(client, server, session):
    r = client.post("/v2/models/nope/infer", json=_json_request(_images(1, 9)))
    assert_json_error(r, 404, "unknown model 'nope'", "stn")
    assert_json_error(client.get("/v2/models/nope"), 404, "unknown model")
    assert_json_error(client.post("/v2/models/nope/classify", content=b"x"), 404, "unknown model")
    _still_serving(server, session)


@pytest.mark.parametrize("name", ["../x", "..%2Fx", "%2e%2e%2fstn", "..", "stn%00", "..%5cx"])
def test_path_like_model_names_are_a_404_and_touch_no_file(server, session, name):
    # Raw bytes on the wire: an HTTP client library would normalize the dots away before sending.
    status, headers, body = raw_http(
        server.port, f"GET /v2/models/{name}/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    assert status == 404, body
    assert headers["content-type"] == "application/json"
    assert "error" in json.loads(body) and b"Traceback" not in body
    _still_serving(server, session)


def test_a_body_over_max_body_mb_is_a_413_whether_declared_or_streamed(client, server, session):
    huge = (
        b'{"inputs": [{"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": ['
        + b"0.0," * 400_000
        + b"0.0]}]}"
    )
    assert len(huge) > MAX_BODY_MB * (1 << 20)
    assert_json_error(client.post("/v2/models/stn/infer", content=huge), 413, "exceeds the limit")

    def chunks():  # no Content-Length: chunked transfer, refused once the limit is passed
        for i in range(0, len(huge), 65536):
            yield huge[i : i + 65536]

    assert_json_error(client.post("/v2/models/stn/infer", content=chunks()), 413, "more than")
    _still_serving(server, session)


def test_deeply_nested_or_malformed_json_is_a_400(client, server, session):
    deep = b"[" * 200_000 + b"]" * 200_000
    assert_json_error(client.post("/v2/models/stn/infer", content=deep), 400, "malformed JSON")
    assert_json_error(client.post("/v2/models/stn/infer", content=b'{"inputs": [}'), 400, "malformed JSON")
    assert_json_error(client.post("/v2/models/stn/infer", content=b'["not", "an", "object"]'), 400, "JSON object")
    assert_json_error(
        client.post(
            "/v2/models/stn/infer",
            json={
                "inputs": [
                    {"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [[0.0] * 3] * 1024 + [[0.0]]}
                ]
            },
        ),
        400,
        "data",
    )
    assert_json_error(
        client.post(
            "/v2/models/stn/infer",
            json={"inputs": [{"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": ["a"] * 3072}]},
        ),
        400,
        "strings",
    )
    assert_json_error(
        client.post(
            "/v2/models/stn/infer", json={"inputs": [{"name": "pixels", "shape": [1], "datatype": "FP32", "data": [0]}]}
        ),
        400,
        "unknown input 'pixels'",
    )
    assert_json_error(
        client.post("/v2/models/stn/infer", json=_json_request(_images(1, 10), outputs=[{"name": "logits"}])),
        400,
        "unknown output",
    )
    _still_serving(server, session)


def test_a_slow_loris_client_gets_a_408_while_others_are_served(server, session):
    import socket

    sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S + 10)
    try:
        sock.sendall(b'POST /v2/models/stn/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n{"inputs"')
        start = time.perf_counter()
        served = 0
        while time.perf_counter() - start < TIMEOUT_S / 2:  # meanwhile, others get their answers
            _still_serving(server, session)
            sock.sendall(b" ")  # a byte now and then, never the whole body
            served += 1
            time.sleep(0.1)
        assert served >= 3
        status, _, body = read_response(sock)
    finally:
        sock.close()
    elapsed = time.perf_counter() - start
    assert status == 408, body
    assert "not received within" in json.loads(body)["error"]
    assert elapsed < TIMEOUT_S + 5
    _still_serving(server, session)


def test_unknown_routes_and_methods_answer_json_errors(client):
    assert_json_error(client.get("/v3/nothing"), 404, "no such endpoint")
    assert_json_error(client.delete("/v2/models/stn"), 405, "DELETE")
    assert_json_error(client.get("/v2/models/stn/infer"), 405, "GET")


# -- batching ------------------------------------------------------------------------------------------
def test_concurrent_requests_of_different_sizes_each_get_exactly_their_own_rows(server, session):
    rng = np.random.default_rng(11)
    requests = [_images(int(rng.integers(1, 8)), 100 + i) for i in range(96)]

    def send(i: int) -> tuple[int, dict]:
        x = requests[i]
        if i % 2:  # half binary through tritonclient, half JSON through httpx
            client = httpclient.InferenceServerClient(server.hostport)
            result = client.infer("stn", [_infer_input(x)], request_id=f"r{i}")
            return i, {n: result.as_numpy(n) for n in ("log_probs", "theta")} | {"id": result.get_response()["id"]}
        r = httpx.post(
            server.url + "/v2/models/stn/infer",
            json=_json_request(x, id=f"r{i}", outputs=[{"name": "log_probs"}, {"name": "theta"}]),
            timeout=30,
        )
        body = r.json()
        out = {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in body["outputs"]}
        return i, out | {"id": body["id"]}

    before = (
        _metric(server, "stn_serve_batch_size", "count", model="stn"),
        _metric(server, "stn_serve_batch_size", "sum", model="stn"),
    )
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(send, range(len(requests))))
    for i, out in answers:
        assert out["id"] == f"r{i}"
        reference = session.run(requests[i])
        assert out["log_probs"].shape == reference["log_probs"].shape
        assert np.abs(out["log_probs"] - reference["log_probs"]).max() <= 1e-5, i
        assert np.abs(out["theta"] - reference["theta"]).max() <= 1e-5, i
    batches = _metric(server, "stn_serve_batch_size", "count", model="stn") - before[0]
    images = _metric(server, "stn_serve_batch_size", "sum", model="stn") - before[1]
    assert images == sum(len(x) for x in requests)
    assert batches < len(requests)  # requests shared batches


# -- classify --------------------------------------------------------------------------------------------
def test_classify_raw_bytes_and_multipart_answer_what_the_session_says(client, session, tmp_path):
    png = digit_png(tmp_path / "digit.png", 7)
    decoded = decode(png, session.preprocessing)
    x = session.preprocessing.normalize(decoded.array[None])
    reference = session.run(x)
    expected = session.class_names[int(reference["log_probs"][0].argmax())]

    raw = client.post("/v2/models/stn/classify", content=png.read_bytes())
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert body["label"] == expected
    assert body["confidence"] == pytest.approx(float(np.exp(reference["log_probs"][0].max())), abs=1e-5)
    assert len(body["top_k"]) == 5 and body["top_k"][0]["label"] == expected
    np.testing.assert_allclose(np.asarray(body["theta"]), reference["theta"][0], atol=1e-5)
    assert "images" not in body

    multi = client.post(
        "/v2/models/stn/classify?top_k=3&images=1", files={"image": ("digit.png", png.read_bytes(), "image/png")}
    )
    assert multi.status_code == 200, multi.text
    mbody = multi.json()
    assert mbody["label"] == expected and len(mbody["top_k"]) == 3
    assert mbody["images"]["input"].startswith("data:image/png;base64,")
    assert mbody["images"]["warped"].startswith("data:image/png;base64,")


def test_classify_without_warped_output_says_why(client, tmp_path):
    png = digit_png(tmp_path / "digit.png", 2)
    body = client.post("/v2/models/plain/classify?images=1", content=png.read_bytes()).json()
    assert body["theta"] is None
    assert body["images"]["warped"] is None
    assert "--with-warped" in body["images"]["warped_note"]


def test_classify_bad_images_are_400s_naming_the_upload(client, server, session, tmp_path):
    assert_json_error(
        client.post("/v2/models/stn/classify", content=b"not an image at all"), 400, "upload", "not an image"
    )
    assert_json_error(client.post("/v2/models/stn/classify", content=b""), 400, "empty body")
    assert_json_error(
        client.post(
            "/v2/models/stn/classify", files={"image": ("bad.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "image/png")}
        ),
        400,
        "bad.png",
    )
    assert_json_error(client.post("/v2/models/stn/classify", files={"note": (None, "text only")}), 400, "no file")
    assert_json_error(client.post("/v2/models/stn/classify?top_k=0", content=b"x"), 400, "top_k")
    _still_serving(server, session)


def test_classify_refuses_an_image_over_max_pixels(served_model, tmp_path):
    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("RGB", (120, 120)).save(big)  # over --max-pixels, under PIL's own limit (twice it)
    proc = ServerProcess(served_model, "--max-pixels", "10000")
    try:
        r = httpx.post(proc.url + "/v2/models/" + served_model.stem + "/classify", content=big.read_bytes(), timeout=30)
        assert_json_error(r, 400, "exceeds the limit of 10,000", "--max-pixels")
    finally:
        assert proc.stop() == 0


# -- observability ---------------------------------------------------------------------------------------
def _metric(server, name: str, suffix: str | None = None, **labels) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            want = name + (f"_{suffix}" if suffix else "")
            if sample.name == want and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_metrics_count_requests_errors_latency_batches_and_queue(client, server):
    before_ok = _metric(server, "stn_serve_requests", "total", model="stn", endpoint="infer", code="200")
    before_err = _metric(server, "stn_serve_request_errors", "total", model="", endpoint="infer", code="404")
    for _ in range(3):
        assert client.post("/v2/models/stn/infer", json=_json_request(_images(2, 12))).status_code == 200
    client.post("/v2/models/missing/infer", json={})
    assert _metric(server, "stn_serve_requests", "total", model="stn", endpoint="infer", code="200") == before_ok + 3
    assert (
        _metric(server, "stn_serve_request_errors", "total", model="", endpoint="infer", code="404") == before_err + 1
    )
    assert _metric(server, "stn_serve_request_duration_seconds", "count", model="stn", endpoint="infer") >= 3
    assert _metric(server, "stn_serve_batch_size", "count", model="stn") >= 1
    assert _metric(server, "stn_serve_images", "total", model="stn") >= 6
    assert _metric(server, "stn_serve_images_per_second", model="stn") > 0
    assert _metric(server, "stn_serve_queue_depth", model="stn") == 0
    assert _metric(server, "stn_serve_model_ready", model="plain") == 1
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")


def test_every_request_writes_one_access_log_line(client, server):
    marker = f"marker{time.time_ns()}"
    for i in range(3):
        client.get(f"/v2/models/stn/ready?{marker}={i}")
    client.get(f"/v2/models/nope?{marker}=x")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [line for line in server.lines if marker in line]
        if len(lines) == 4:
            break
        time.sleep(0.05)
    assert len(lines) == 4, lines
    assert sum('"GET /v2/models/stn/ready' in line and " 200 " in line for line in lines) == 3
    assert any("/v2/models/nope" in line and " 404 " in line and line.endswith("ms") for line in lines)


# -- limits: a full queue and a timeout --------------------------------------------------------------------
@pytest.fixture(scope="module")
def slow_server(served_model):
    """A server whose batches wait 1.5 s for company, with room for 2 waiting requests and a 0.8 s timeout."""
    proc = ServerProcess(
        served_model,
        "--max-queue",
        "2",
        "--max-queue-delay-ms",
        "1500",
        "--max-batch-size",
        "8",
        "--request-timeout-s",
        "0.8",
        "--name",
        "slow",
    )
    yield proc
    assert proc.stop(signal.SIGINT) == 0  # Ctrl-C is a graceful stop too


def test_a_full_queue_is_a_503_with_retry_after_at_once(slow_server):
    x = _images(1, 13)
    body = _json_request(x)
    with ThreadPoolExecutor(2) as pool:
        waiting = [
            pool.submit(httpx.post, slow_server.url + "/v2/models/slow/infer", json=body, timeout=10) for _ in range(2)
        ]
        deadline = time.monotonic() + 5
        while _metric(slow_server, "stn_serve_queue_depth", model="slow") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        start = time.perf_counter()
        r = httpx.post(slow_server.url + "/v2/models/slow/infer", json=body, timeout=10)
        assert time.perf_counter() - start < 0.5  # refused at once, not after waiting
        assert_json_error(r, 503, "queue full", "--max-queue")
        assert r.headers["retry-after"] == "1"
        for fut in waiting:
            assert fut.result().status_code in (200, 504)


def test_a_request_without_an_answer_in_time_is_a_504(slow_server):
    start = time.perf_counter()
    r = httpx.post(slow_server.url + "/v2/models/slow/infer", json=_json_request(_images(1, 14)), timeout=10)
    assert_json_error(r, 504, "request timeout", "--request-timeout-s")
    assert 0.7 < time.perf_counter() - start < 1.5
    time.sleep(0.8)  # the abandoned request left the queue: the next one is answered
    assert _metric(slow_server, "stn_serve_queue_depth", model="slow") == 0


# -- graceful shutdown -----------------------------------------------------------------------------------
def test_sigterm_during_a_burst_answers_every_accepted_request_and_exits_0(served_model, session):
    # Batches wait up to 6 s for company: every request of the burst is queued when SIGTERM arrives,
    # and the server must run them at once instead of waiting out the delay.
    proc = ServerProcess(served_model, "--max-queue-delay-ms", "6000", "--max-batch-size", "128", "--name", "stn")
    try:
        requests = [_images(1 + i % 3, 200 + i) for i in range(40)]
        results: dict[int, object] = {}

        def send(i: int) -> None:
            try:
                client = httpclient.InferenceServerClient(proc.hostport, network_timeout=30)
                results[i] = client.infer("stn", [_infer_input(requests[i])]).as_numpy("log_probs")
            except Exception as exc:  # noqa: BLE001 - recorded and asserted on below
                results[i] = exc

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while _metric(proc, "stn_serve_queue_depth", model="stn") < len(requests) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _metric(proc, "stn_serve_queue_depth", model="stn") == len(requests)  # all accepted and waiting
        proc.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for t in threads:
            t.join(30)
        code = proc.proc.wait(30)
        stopped_in = time.monotonic() - signalled
    finally:
        proc.kill()
    assert code == 0, "\n".join(proc.lines[-20:])
    assert stopped_in < 4.0  # the queued batch ran at once, not after the 6 s delay
    for i, x in enumerate(requests):
        assert not isinstance(results[i], Exception), results[i]
        assert np.abs(results[i] - session.run(x)["log_probs"]).max() <= 1e-5
    assert any("SIGTERM" in line for line in proc.lines)
    assert proc.lines[-1].endswith("stn-serve: stopped")
    with pytest.raises(httpx.ConnectError):
        httpx.get(proc.url + "/v2/health/live", timeout=2)


def test_binary_png_upload_through_curl_style_request(server, tmp_path):
    """What README's curl --data-binary @digit.png sends: a POST with the file as the body."""
    png = digit_png(tmp_path / "d.png", 5)
    data = png.read_bytes()
    request = (
        f"POST /v2/models/stn/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/8\r\nAccept: */*\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode() + data
    status, headers, body = raw_http(server.port, request)
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.load(io.BytesIO(body))["label"].startswith("class_")
