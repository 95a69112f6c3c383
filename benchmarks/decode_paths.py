"""Which decoder for which input: the per-image cost of every candidate path, measured side by side.

For each input kind (a 32×32 PNG, a 640×480 and a 1920×1080 photo-like JPEG at quality 90, a
640×480 PNG) and each candidate way to get it to the model's 32×32 RGB uint8 pixels, this
measures:

* **CPU µs per image** on one thread (``time.thread_time``, so other processes on a shared
  machine disturb it less than wall time would): rounds interleave the candidates and the median
  round is kept;
* **GIL**: how far a pure-Python thread gets while the decoder runs in another thread, against
  how far it gets alone in the same time (1.0: the decoder never holds the GIL, so decode
  threads leave the inference thread's Python alone; near 0: it holds it throughout). Unlike a
  two-thread speed-up, this ratio holds on a machine whose cores are busy with other work;
* **import cost** of each optional library in a fresh interpreter (numpy already imported).

Candidates: Pillow full decode + resize (today's path), Pillow ``draft`` (DCT-domain 1/2..1/8)
+ resize, simplejpeg (full and DCT-scaled), OpenCV ``IMREAD_REDUCED_COLOR_*``, PyTurboJPEG,
pyspng, OpenCV's PNG decoder, Pillow's PNG decoder. Libraries that are not installed are listed
as such. Results: ``benchmarks/results/decode_paths.json``; the reading is in DECODE.md.

Run:  .venv/bin/python benchmarks/decode_paths.py [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stn_deploy.decoders import JPEG_DRAFT_GAP as GAP  # noqa: E402
from stn_deploy.decoders import jpeg_scale  # noqa: E402
from stn_deploy.fileio import atomic_write_text  # noqa: E402
from synthetic_images import photo_like  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET = (32, 32)
BILINEAR = Image.Resampling.BILINEAR


def _optional(name: str):
    try:
        return __import__(name)
    except Exception:  # noqa: BLE001 - not installed, or a broken build
        return None


def candidates(kind: str, data: bytes) -> dict[str, Callable[[], np.ndarray]]:
    """name → a function decoding ``data`` (bytes of one file) to 32×32 RGB uint8."""
    sj, cv2, spng, tj_mod = _optional("simplejpeg"), _optional("cv2"), _optional("pyspng"), _optional("turbojpeg")
    out: dict[str, Callable[[], np.ndarray]] = {}

    def pil_exact() -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB").resize(TARGET, BILINEAR))

    out["pillow full decode + resize"] = pil_exact
    if kind.startswith("jpeg"):

        def pil_draft() -> np.ndarray:
            with Image.open(io.BytesIO(data)) as im:
                im.draft("RGB", (TARGET[0] * GAP, TARGET[1] * GAP))
                return np.asarray(im.convert("RGB").resize(TARGET, BILINEAR))

        out[f"pillow draft (>= {GAP}x) + resize"] = pil_draft
        if sj is not None:
            w, h = Image.open(io.BytesIO(data)).size
            scale = jpeg_scale(w, h, (TARGET[0] * GAP, TARGET[1] * GAP))
            out["simplejpeg full + resize"] = lambda: np.asarray(
                Image.fromarray(sj.decode_jpeg(data, colorspace="RGB")).resize(TARGET, BILINEAR)
            )
            out[f"simplejpeg 1/{scale} + resize"] = lambda: np.asarray(
                Image.fromarray(
                    sj.decode_jpeg(data, colorspace="RGB", min_width=-(-w // scale), min_height=-(-h // scale))
                ).resize(TARGET, BILINEAR)
            )
        if cv2 is not None:
            buf = np.frombuffer(data, np.uint8)
            flag = {
                8: cv2.IMREAD_REDUCED_COLOR_8,
                4: cv2.IMREAD_REDUCED_COLOR_4,
                2: cv2.IMREAD_REDUCED_COLOR_2,
                1: cv2.IMREAD_COLOR,
            }
            w, h = Image.open(io.BytesIO(data)).size
            scale = jpeg_scale(w, h, (TARGET[0] * GAP, TARGET[1] * GAP))
            out[f"opencv reduced 1/{scale} + resize"] = lambda: np.asarray(
                Image.fromarray(cv2.cvtColor(cv2.imdecode(buf, flag[scale]), cv2.COLOR_BGR2RGB)).resize(
                    TARGET, BILINEAR
                )
            )
        if tj_mod is not None:
            try:
                tj = tj_mod.TurboJPEG()
                out["pyturbojpeg 1/8 + resize"] = lambda: np.asarray(
                    Image.fromarray(tj.decode(data, pixel_format=tj_mod.TJPF_RGB, scaling_factor=(1, 8))).resize(
                        TARGET, BILINEAR
                    )
                )
            except Exception:  # noqa: BLE001, S110 - the wheel needs a system libturbojpeg: not a candidate here
                pass
    else:
        if spng is not None:
            out["pyspng + resize"] = lambda: np.asarray(
                Image.fromarray(spng.load(data, "RGB")).resize(TARGET, BILINEAR)
            )
        if cv2 is not None:
            buf = np.frombuffer(data, np.uint8)
            out["opencv imdecode + resize"] = lambda: np.asarray(
                Image.fromarray(cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)).resize(
                    TARGET, BILINEAR
                )
            )
    return out


def cpu_us(fn: Callable[[], object], n: int) -> float:
    start = time.thread_time()
    for _ in range(n):
        fn()
    return (time.thread_time() - start) / n * 1e6


def gil_free_share(fn: Callable[[], object], n: int) -> float:
    """Progress of a pure-Python spinner thread while ``fn`` runs ``n`` times in this thread,
    over its progress alone for the same wall time."""

    def spin(stop: threading.Event, count: list[int]) -> None:
        while not stop.is_set():
            count[0] += 1

    stop, beside = threading.Event(), [0]
    spinner = threading.Thread(target=spin, args=(stop, beside))
    spinner.start()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    took = time.perf_counter() - start
    stop.set()
    spinner.join()
    stop, alone = threading.Event(), [0]
    spinner = threading.Thread(target=spin, args=(stop, alone))
    spinner.start()
    time.sleep(took)
    stop.set()
    spinner.join()
    return beside[0] / max(1, alone[0])


def import_ms(module: str, repeats: int = 3) -> float | None:
    code = (
        f"import numpy, time; t = time.perf_counter()\ntry:\n    import {module}\nexcept Exception:\n    "
        "print('none')\n"
        "else:\n    print((time.perf_counter() - t) * 1000)"
    )
    values = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False).stdout.strip()
        if out == "none" or not out:
            return None
        values.append(float(out))
    return round(min(values), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="3 rounds, fewer calls per round")
    ap.add_argument("--json-out", type=Path, default=REPO / "benchmarks" / "results" / "decode_paths.json")
    args = ap.parse_args()
    rounds, scale_n = (3, 0.3) if args.quick else (args.rounds, 1.0)

    inputs = {}
    for name, (w, h, fmt) in {
        "png 32x32": (32, 32, "PNG"),
        "jpeg 640x480": (640, 480, "JPEG"),
        "jpeg 1920x1080": (1920, 1080, "JPEG"),
        "png 640x480": (640, 480, "PNG"),
    }.items():
        buf = io.BytesIO()
        image = photo_like(w, h, seed=7)
        if w == 32:  # the throughput benchmark's small PNGs: smooth random content
            rng = np.random.default_rng(0)
            image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((32, 32), BILINEAR)
        image.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        inputs[name] = buf.getvalue()

    results: dict[str, dict] = {}
    for name, data in inputs.items():
        kind = "jpeg" if name.startswith("jpeg") else "png"
        paths = candidates(kind, data)
        reference = paths["pillow full decode + resize"]()
        n = max(3, int((2000 if name == "png 32x32" else 200 if "640" in name else 30) * scale_n))
        samples: dict[str, list[float]] = {p: [] for p in paths}
        for _ in range(rounds):
            for p, fn in paths.items():
                samples[p].append(cpu_us(fn, n))
        rows = {}
        for p, fn in paths.items():
            diff = np.abs(fn().astype(int) - reference).max()
            rows[p] = {
                "cpu_us_median": round(statistics.median(samples[p]), 1),
                "cpu_us_min": round(min(samples[p]), 1),
                "gil_free_share": round(gil_free_share(fn, max(2, n // 2)), 2),
                "max_abs_diff_vs_full_decode": int(diff),
            }
        results[name] = {"bytes": len(data), "paths": rows}
        base = rows["pillow full decode + resize"]["cpu_us_median"]
        print(f"\n{name} ({len(data):,} bytes)")
        for p, r in sorted(rows.items(), key=lambda kv: kv[1]["cpu_us_median"]):
            print(
                f"  {p:34s} {r['cpu_us_median']:9.1f} us  x{base / r['cpu_us_median']:5.2f}  GIL-free "
                f"{r['gil_free_share']:.2f}"
                f"  max|d| {r['max_abs_diff_vs_full_decode']}"
            )
    imports = {m: import_ms(m) for m in ("simplejpeg", "pyspng", "cv2", "turbojpeg", "PIL.Image")}
    print("\nimport ms (numpy already imported):", imports)
    result = {
        "benchmark": "per-image decode cost of candidate paths to a 32x32 RGB model input",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "load_average_at_end": list(os.getloadavg()),
        },
        "versions": {m: getattr(_optional(m), "__version__", None) for m in ("PIL", "simplejpeg", "pyspng", "cv2")},
        "rounds": rounds,
        "inputs": results,
        "import_ms": imports,
        "note": "CPU time on one thread, median of interleaved rounds; the machine may have been shared",
    }
    atomic_write_text(args.json_out, json.dumps(result, indent=2) + "\n")
    print(f"-> {args.json_out}")


if __name__ == "__main__":
    main()
