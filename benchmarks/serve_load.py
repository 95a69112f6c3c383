"""stn-serve under load: wrk and hey against real servers on loopback, 1-image binary requests.

What it does (every request goes to 127.0.0.1 only; every load run is bounded in time or count):

1. Uses ``--model`` or exports the reference STN (3×32×32, 10 classes) with random weights and
   a ``theta`` output (the weights do not change the compute; the file is the fp32 ``ort`` form).
2. Builds the request body with tritonclient itself (``InferenceServerClient.generate_request_body``
   for one [1, 3, 32, 32] FP32 image with the client's defaults: binary input, no outputs listed,
   so ``binary_data_output: true``), so the bytes wrk sends are exactly what tritonclient sends.
   Before any load, one request goes through tritonclient's own ``infer`` and one through the
   body file; both must equal ``Session.run`` on the same input.
3. Starts stn-serve twice, each with the given configuration: dynamic batching on (the defaults),
   and off (``--max-batch-size 1``). Each stays idle while the other is loaded.
4. ``wrk`` (one thread, a Lua script that posts the body and counts status codes) at 1, 8, 32
   and 64 concurrent connections against the batching server: throughput, p50 and p99 latency.
5. Batching on vs off at 32 clients, alternating ``--rounds`` times (best of each, on a shared
   machine the least disturbed run), and served images/s at 64 clients against the same Session
   configuration's model-only images/s at batch 32 (``Session.run`` in this process, alternating
   with the 64-client runs).
6. Overload: ``hey`` offers 4× the saturating rate (the best 64-client throughput) from
   ``--overload-workers`` rate-limited workers (more than ``--max-queue``, so that the queue can
   fill) for ``--overload-s`` seconds' worth of requests. Checks: only 200 and 503 answers (no other
   5xx, no connection errors), the p99 latency of the accepted requests, the server's RSS before
   and after (growth < 100 MB), and ``/v2/health/ready`` still 200 afterwards.
7. Prints a table, and writes ``benchmarks/results/serve_load.json`` and ``serve_load.md``.

Targets (issue 14): batching on ≥ 3× off at 32 clients; 64-client images/s ≥ 0.5× model-only at
batch 32; overload answers only 200/503, RSS growth < 100 MB, ready afterwards.

Needs ``wrk`` and ``hey`` (Debian: ``apt-get install -y wrk hey``).

Run:  .venv/bin/python benchmarks/serve_load.py            (the issue's sizes: about 3 minutes)
      .venv/bin/python benchmarks/serve_load.py --quick    (short runs, to validate the script)
      .venv/bin/python benchmarks/serve_load.py --server-args="--threads 2 --streams 2"   (another configuration)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TARGET_BATCHING_RATIO = 3.0
TARGET_MODEL_RATIO = 0.5
RSS_LIMIT_MB = 100.0

LUA = r"""
-- Posts the same binary infer request on every connection and counts the status codes.
local f = assert(io.open("@BODY@", "rb"))
local body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.body = body
wrk.headers["Inference-Header-Content-Length"] = "@JSON_SIZE@"

local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) codes = {} end
function response(status, headers, body) codes[status] = (codes[status] or 0) + 1 end
function done(summary, latency, requests)
  local merged = {}
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("codes")) do merged[code] = (merged[code] or 0) + n end
  end
  local parts = {}
  for code, n in pairs(merged) do table.insert(parts, string.format('"%d": %d', code, n)) end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d}, "codes": {%s}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, e.connect, e.read, e.write, e.timeout, table.concat(parts, ", ")))
end
"""


# -- setup ---------------------------------------------------------------------------------------------
def export_random_model(path: Path) -> Path:
    """The reference STN, random weights (seed 0), exported with stn-export's exporter (theta output)."""
    import torch

    from stn_deploy.export import export_model
    from stn_deploy.preprocessing import Preprocessing
    from stn_deploy.train.checkpoint import Checkpoint, save_checkpoint
    from stn_deploy.train.model import STNConfig, build_model

    torch.manual_seed(0)
    config = STNConfig()
    ckpt = Checkpoint(
        config=config,
        state_dict=build_model(config).state_dict(),
        class_names=[str(i) for i in range(config.num_classes)],
        preprocessing=Preprocessing(),
        dataset="random",
    )
    export_model(save_checkpoint(ckpt, path.with_suffix(".pt")), path, with_theta=True, progress=False)
    return path


def request_body(x: np.ndarray) -> tuple[bytes, int]:
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return httpclient.InferenceServerClient.generate_request_body([inp])


class Server:
    """stn-serve in a subprocess on a free loopback port."""

    def __init__(self, model: Path, args: list[str], name: str) -> None:
        # The server's defaults, access log included (its lines are read and only the last ones kept).
        cmd = [sys.executable, "-m", "stn_deploy.serve", str(model), "--name", name, "--port", "0", *args]
        self.name = name
        self.args = args
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = ""
        ready = threading.Event()
        self.log: deque[str] = deque(maxlen=50)

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line.rstrip())
                match = re.search(r"listening on (http://[0-9.]+:\d+)", line)
                if match:
                    self.url = match.group(1)
                if "ready at" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120) or not self.url or self.proc.poll() is not None:
            self.stop()
            raise SystemExit(f"stn-serve {' '.join(args)} did not start:\n" + "\n".join(self.log))

    @property
    def infer_url(self) -> str:
        return f"{self.url}/v2/models/{self.name}/infer"

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=10) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.returncode


def check_answers(server: Server, x: np.ndarray, body: bytes, json_size: int, session) -> None:
    """tritonclient's own infer, and the body file as wrk sends it, both equal Session.run."""
    import tritonclient.http as httpclient

    reference = session.run(x)["log_probs"]
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    inp = httpclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    got = client.infer(server.name, [inp]).as_numpy("log_probs")
    request = urllib.request.Request(
        server.infer_url, data=body, headers={"Inference-Header-Content-Length": str(json_size)}
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        raw = httpclient.InferResult.from_response_body(
            r.read(), header_length=int(r.headers["Inference-Header-Content-Length"])
        )
    for name, value in (("tritonclient", got), ("body file", raw.as_numpy("log_probs"))):
        diff = float(np.abs(value - reference).max())
        if diff > 1e-5:
            raise SystemExit(f"{name}: served log_probs differ from Session.run by {diff:.3g}")


# -- load ------------------------------------------------------------------------------------------------
def wrk(url: str, script: Path, connections: int, seconds: float) -> dict:
    cmd = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds:g}s", "--timeout", "10s", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("WRKJSON "))
    result = json.loads(line.removeprefix("WRKJSON "))
    result["connections"] = connections
    result["seconds"] = result["duration_us"] / 1e6
    ok = result["codes"].get("200", 0)
    result["ok_per_s"] = ok / result["seconds"]
    result["p50_ms"] = result["p50_us"] / 1e3
    result["p99_ms"] = result["p99_us"] / 1e3
    result["other"] = result["requests"] - ok
    return result


def model_only(session, x32: np.ndarray, seconds: float) -> float:
    """images/s of Session.run on batches of ``len(x32)`` (the outputs a default tritonclient request gets)."""
    session.run(x32)
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(x32)
        count += len(x32)
    return count / (time.perf_counter() - start)


def hey_overload(server: Server, body_path: Path, json_size: int, rate: float, seconds: float, workers: int) -> dict:
    per_worker = max(1, round(rate / workers))
    total = int(rate * seconds) // workers * workers  # hey sends n // c requests per worker
    cmd = [
        "hey",
        "-n",
        str(total),
        "-c",
        str(workers),
        "-q",
        str(per_worker),
        "-t",
        "30",
        "-m",
        "POST",
        "-D",
        str(body_path),
        "-H",
        f"Inference-Header-Content-Length: {json_size}",
        "-o",
        "csv",
        server.infer_url,
    ]
    rss_before = server.rss_mb()
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * 10 + 120, check=True).stdout
    wall = time.perf_counter() - start
    time.sleep(1.0)
    rss_after = server.rss_mb()
    rows = list(csv.DictReader(io.StringIO(out)))
    codes: dict[str, int] = {}
    for row in rows:
        codes[row["status-code"]] = codes.get(row["status-code"], 0) + 1
    accepted = sorted(float(r["response-time"]) for r in rows if r["status-code"] == "200")
    refused = sorted(float(r["response-time"]) for r in rows if r["status-code"] == "503")

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] * 1e3 if values else float("nan")

    return {
        "offered_rate": per_worker * workers,
        "workers": workers,
        "requests": total,
        "answered": len(rows),
        "connection_errors": total - len(rows),  # hey's CSV lists answered requests only
        "seconds": wall,
        "achieved_rate": len(rows) / wall,
        "codes": codes,
        "only_200_503": set(codes) <= {"200", "503"} and len(rows) == total,
        "accepted_p50_ms": pct(accepted, 0.50),
        "accepted_p99_ms": pct(accepted, 0.99),
        "refused_p99_ms": pct(refused, 0.99),
        "rss_before_mb": rss_before,
        "rss_after_mb": rss_after,
        "rss_growth_mb": rss_after - rss_before,
        "ready_after": server.ready(),
    }


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    import onnxruntime

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "platform": platform.platform(),
        "load_average": os.getloadavg(),
    }


# -- main ------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", type=Path, default=None, help="ONNX model (default: export the reference STN, random weights)"
    )
    ap.add_argument("--server-args", default="", help="extra stn-serve options for both servers, e.g. '--threads 2'")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each wrk run")
    ap.add_argument(
        "--rounds", type=int, default=2, help="alternating rounds for the on/off and served/model-only ratios"
    )
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--overload-s", type=float, default=20.0, help="seconds of requests at 4x the saturating rate")
    ap.add_argument(
        "--overload-workers", type=int, default=640, help="hey workers (more than the server's --max-queue)"
    )
    ap.add_argument("--quick", action="store_true", help="3 s runs, one round, a 5 s overload (to validate the script)")
    ap.add_argument("--json-out", type=Path, default=RESULTS / "serve_load.json")
    ap.add_argument("--md-out", type=Path, default=RESULTS / "serve_load.md")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.rounds, args.overload_s = 3.0, 1, 5.0
    for tool in ("wrk", "hey"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (Debian: apt-get install -y wrk hey)")

    from stn_deploy.runtime import Session
    from stn_deploy.serve.cli import DEFAULT_THREADS

    work = Path(tempfile.mkdtemp(prefix="stn-serve-load-"))
    model = args.model or export_random_model(work / "stn.onnx")
    extra = shlex.split(args.server_args)
    threads = int(extra[extra.index("--threads") + 1]) if "--threads" in extra else None
    streams = int(extra[extra.index("--streams") + 1]) if "--streams" in extra else 1
    threads = threads or max(DEFAULT_THREADS, streams)
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=(1, 3, 32, 32)).astype(np.float32)
    body, json_size = request_body(x1)
    body_path = work / "body.bin"
    body_path.write_bytes(body)
    script = work / "infer.lua"
    script.write_text(LUA.replace("@BODY@", str(body_path)).replace("@JSON_SIZE@", str(json_size)))
    # The same Session configuration the servers run (no spinning, as stn-serve's default).
    session = Session(model, "cpu", threads=threads, streams=streams, spin=False)
    x32 = rng.normal(size=(32, 3, 32, 32)).astype(np.float32)

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, load average {info['load_average']}", file=sys.stderr)
    on = Server(model, extra, "stn")
    off = Server(model, [*extra, "--max-batch-size", "1"], "stn")
    results: dict = {
        "machine": info,
        "model": str(model),
        "server_args": extra,
        "threads": threads,
        "streams": streams,
        "seconds_per_run": args.seconds,
        "rounds": args.rounds,
        "body_bytes": len(body),
        "json_size": json_size,
    }
    try:
        check_answers(on, x1, body, json_size, session)
        check_answers(off, x1, body, json_size, session)

        sweep = []
        for c in (int(v) for v in args.concurrency.split(",")):
            r = wrk(on.infer_url, script, c, args.seconds)
            sweep.append(r)
            print(
                f"batching on, {c:3d} clients: {r['ok_per_s']:7.0f} req/s  p50 {r['p50_ms']:7.2f} ms  p99 "
                f"{r['p99_ms']:7.2f} ms"
                f"  non-200 {r['other']}",
                file=sys.stderr,
            )
        results["sweep"] = sweep

        pairs = {"on32": [], "off32": [], "on64": [], "model32": [], "model1": []}
        for _ in range(args.rounds):
            pairs["on32"].append(wrk(on.infer_url, script, 32, args.seconds))
            pairs["off32"].append(wrk(off.infer_url, script, 32, args.seconds))
            pairs["on64"].append(wrk(on.infer_url, script, 64, args.seconds))
            pairs["model32"].append(model_only(session, x32, args.seconds))
            # Batch 1 on the same session: model32 / model1 is the most that batching can save in
            # the model itself, the ceiling of the on/off ratio above.
            pairs["model1"].append(model_only(session, x32[:1], args.seconds))
        best = {k: max(v) if k.startswith("model") else max(v, key=lambda r: r["ok_per_s"]) for k, v in pairs.items()}
        results["batching"] = {
            "on_32": best["on32"],
            "off_32": best["off32"],
            "ratio": best["on32"]["ok_per_s"] / best["off32"]["ok_per_s"],
        }
        results["model_only"] = {
            "served_64_images_per_s": best["on64"]["ok_per_s"],
            "model_only_batch32_images_per_s": best["model32"],
            "ratio": best["on64"]["ok_per_s"] / best["model32"],
            "all_model_only": pairs["model32"],
            "model_only_batch1_images_per_s": best["model1"],
            "all_model_only_batch1": pairs["model1"],
            "batching_ceiling": best["model32"] / best["model1"],
        }
        print(
            f"batching on/off at 32 clients: {best['on32']['ok_per_s']:.0f} / {best['off32']['ok_per_s']:.0f} = "
            f"{results['batching']['ratio']:.2f}x",
            file=sys.stderr,
        )
        print(
            f"served at 64 clients / model-only at batch 32: {best['on64']['ok_per_s']:.0f} / {best['model32']:.0f} = "
            f"{results['model_only']['ratio']:.2f}",
            file=sys.stderr,
        )
        print(
            f"model-only batch 32 / batch 1 (the batching ceiling): {best['model32']:.0f} / {best['model1']:.0f} = "
            f"{results['model_only']['batching_ceiling']:.2f}x",
            file=sys.stderr,
        )

        saturating = max(r["ok_per_s"] for r in [*sweep, *pairs["on64"], *pairs["on32"]])
        off.stop()
        overload = hey_overload(on, body_path, json_size, 4 * saturating, args.overload_s, args.overload_workers)
        overload["saturating_rate"] = saturating
        results["overload"] = overload
        print(
            f"overload: offered {overload['offered_rate']:.0f}/s, achieved {overload['achieved_rate']:.0f}/s, codes "
            f"{overload['codes']}, "
            f"accepted p99 {overload['accepted_p99_ms']:.0f} ms, RSS {overload['rss_before_mb']:.0f} -> "
            f"{overload['rss_after_mb']:.0f} MB, "
            f"ready after: {overload['ready_after']}",
            file=sys.stderr,
        )
    finally:
        on_code = on.stop()
        off.stop()
    results["server_exit_code"] = on_code
    results["machine"]["load_average_end"] = os.getloadavg()
    results["targets"] = {
        "batching_ratio_ge_3": results["batching"]["ratio"] >= TARGET_BATCHING_RATIO,
        "served_vs_model_ge_0_5": results["model_only"]["ratio"] >= TARGET_MODEL_RATIO,
        "overload_only_200_503": overload["only_200_503"],
        "overload_rss_growth_lt_100mb": overload["rss_growth_mb"] < RSS_LIMIT_MB,
        "ready_after_overload": overload["ready_after"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    args.md_out.write_text(table)
    print(table)
    shutil.rmtree(work, ignore_errors=True)


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        (
            f"stn-serve under load (`benchmarks/serve_load.py`), {m['cpu']}, {m['cores']} cores, onnxruntime "
            f"{m['onnxruntime']}; "
            f"load average {m['load_average'][0]:.1f} at the start and {m['load_average_end'][0]:.1f} at the end "
            "(the run's own server, wrk and hey included). "
            f"Server: `stn-serve {' '.join(r['server_args']) or '(defaults)'}` ({r['threads']} "
            "ONNX Runtime thread(s), "
            f"{r['streams']} stream(s)); wrk with one thread, {r['seconds_per_run']:g} s per run; each request one "
            "1×3×32×32 FP32 image "
            f"as tritonclient sends it (binary, all outputs binary); the server writes its access log."
        ),
        "",
        "| clients | req/s (= images/s) | p50 ms | p99 ms | non-200 |",
        "|---:|---:|---:|---:|---:|",
    ]
    for s in r["sweep"]:
        lines.append(
            f"| {s['connections']} | {s['ok_per_s']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['other']} |"
        )
    b, mo, o = r["batching"], r["model_only"], r["overload"]
    lines += [
        "",
        "| check | measured | target | met |",
        "|---|---|---|---|",
        (
            f"| batching on ÷ off (`--max-batch-size 1`), 32 clients | {b['on_32']['ok_per_s']:.0f} ÷ "
            f"{b['off_32']['ok_per_s']:.0f} req/s = "
            f"**{b['ratio']:.2f}×** | ≥ 3× | {'yes' if r['targets']['batching_ratio_ge_3'] else 'no'} |"
        ),
        (
            f"| model-only batch 32 ÷ batch 1, same session (what batching can save in the model) | "
            f"{mo['model_only_batch32_images_per_s']:.0f} ÷ {mo['model_only_batch1_images_per_s']:.0f} img/s = "
            f"**{mo['batching_ceiling']:.2f}×** | — | — |"
        ),
        (
            f"| served images/s at 64 clients ÷ model-only at batch 32 | {mo['served_64_images_per_s']:.0f} ÷ "
            f"{mo['model_only_batch32_images_per_s']:.0f} = **{mo['ratio']:.2f}** | ≥ 0.5 | "
            f"{'yes' if r['targets']['served_vs_model_ge_0_5'] else 'no'} |"
        ),
        (
            f"| overload: {o['offered_rate']:.0f} req/s offered (4× {o['saturating_rate']:.0f}) by {o['workers']} "
            "hey workers, "
            f"{o['requests']} requests, {o['seconds']:.0f} s | codes {json.dumps(o['codes'])}, "
            f"{o['connection_errors']} connection errors | "
            f"only 200/503 | {'yes' if r['targets']['overload_only_200_503'] else 'no'} |"
        ),
        (
            f"| overload: accepted requests' latency | p50 {o['accepted_p50_ms']:.0f} ms, p99 "
            f"**{o['accepted_p99_ms']:.0f} ms** "
            f"(503s: p99 {o['refused_p99_ms']:.0f} ms) | bounded | — |"
        ),
        (
            f"| overload: server RSS | {o['rss_before_mb']:.0f} → {o['rss_after_mb']:.0f} MB "
            f"({o['rss_growth_mb']:+.1f} MB) | < 100 MB growth | "
            f"{'yes' if r['targets']['overload_rss_growth_lt_100mb'] else 'no'} |"
        ),
        (
            f"| overload: `/v2/health/ready` afterwards | {'200' if o['ready_after'] else 'not ready'} | 200 | "
            f"{'yes' if r['targets']['ready_after_overload'] else 'no'} |"
        ),
        f"| SIGTERM after the run | exit {r['server_exit_code']} | 0 | "
        f"{'yes' if r['server_exit_code'] == 0 else 'no'} |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
