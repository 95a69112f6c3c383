"""Helpers for the stn-serve tests: the served models, a real server process, raw HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def export_served_model(tmp_path_factory, checkpoint_path: Path) -> Path:
    """The conftest checkpoint exported with theta and warped outputs (test_infer.py and
    test_runtime.py export the same file to the same path: whichever runs first exports)."""
    path = tmp_path_factory.getbasetemp() / "runtime_models" / "stn_theta_warped.onnx"
    if not path.exists():
        from stn_deploy.export import export_model

        path.parent.mkdir(parents=True, exist_ok=True)
        export_model(checkpoint_path, path, with_theta=True, with_warped=True, parity_samples=32, progress=False)
    return path


def plain_model(source: Path, dest: Path) -> Path:
    """``source`` with only its log_probs output: the same graph, no theta and no warped output."""
    import onnx

    if dest.exists():
        return dest
    model = onnx.load(str(source))
    keep = [o for o in model.graph.output if o.name == "log_probs"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    tmp = dest.with_suffix(".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, dest)
    return dest


class ServerProcess:
    """``python -m stn_deploy.serve ... --port 0`` in a subprocess, its stderr collected line by line."""

    def __init__(self, *args: str | Path, timeout: float = 90.0) -> None:
        cmd = [sys.executable, "-m", "stn_deploy.serve", *map(str, args), "--port", "0"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        self.lines: list[str] = []
        self.stdout: list[str] = []
        self._ready = threading.Event()
        self._url: str | None = None
        threading.Thread(target=self._read_stderr, daemon=True).start()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        if not self._ready.wait(timeout) or self._url is None:
            self.kill()
            raise RuntimeError("stn-serve did not become ready:\n" + "\n".join(self.lines[-30:]))
        self.wait_ready(timeout)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            match = re.search(r"listening on (http://[0-9.]+:\d+)", line)
            if match:
                self._url = match.group(1)
            if "ready at" in line:
                self._ready.set()
        self._ready.set()  # the process ended

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout.append(line.rstrip("\n"))

    @property
    def url(self) -> str:
        assert self._url is not None
        return self._url

    @property
    def hostport(self) -> str:
        return self.url.removeprefix("http://")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("stn-serve never answered ready:\n" + "\n".join(self.lines[-30:]))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def raw_http(port: int, request: bytes, *, read_timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (malformed requests too) and read one response: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(request)
        return read_response(sock)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a response ({data[:200]!r})")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def binary_infer_body(
    x: np.ndarray, request_id: str | None = None, outputs: list[str] | None = None
) -> tuple[bytes, int]:
    """The body tritonclient sends for ``x`` (FP32 input 'image', binary), and its JSON length."""
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x.astype(np.float32))
    outs = [httpclient.InferRequestedOutput(n) for n in outputs] if outputs else None
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [inp], outputs=outs, request_id=request_id or ""
    )
    return body, json_size


def assert_json_error(response, status: int, *words: str) -> str:
    """An error answer: ``status``, JSON ``{"error": message}`` holding ``words``, no traceback."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert "Traceback" not in response.text
    body = json.loads(response.content)
    assert set(body) == {"error"}, body
    message = body["error"]
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def digit_png(path: Path, digit: int = 3) -> Path:
    """A real handwritten digit (scikit-learn's offline digits set), upscaled to a 32×32 RGB PNG."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    index = int(np.flatnonzero(digits.target == digit)[0])
    pixels = (digits.images[index] / 16.0 * 255).astype(np.uint8)
    Image.fromarray(pixels).resize((32, 32), Image.Resampling.BILINEAR).convert("RGB").save(path)
    return path
