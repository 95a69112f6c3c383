"""Reproduce the README results table on this machine: train → export → int8 → stn-bench.

What it does, each step through the real command a user runs:

1. ``stn-train`` (the default recipe, ``digits``) → ``<work>/stn_digits.pt``, unless that file,
   or the one given with ``--checkpoint``, already exists;
2. ``stn-export <ckpt> --quantize int8 --calibration digits --json`` (the default export, which is
   optimized) → the fp32 model and the int8 model in the fast CPU configuration
   (export/quantize.py, benchmarks/INT8.md), with the int8 vs fp32 top-1 accuracy on the digits
   test split; then ``stn-export <that fp32 model> --quantize int8 --int8-config plain``, the int8
   layout OpenVINO runs fastest, for the OpenVINO int8 row (quantized from the same fp32 file, not exported again);
3. ``stn-bench --model … --checkpoint … --int8-model … --openvino-int8-model … --threads 2 --json``
   at batch sizes 1, 8, 64, 256 with stn-bench's defaults (PyTorch eager, ONNX Runtime fp32 and
   int8 with ``--streams auto``: one stream at batch 1 and 8, two from 64 on; OpenVINO when
   installed, with its own defaults); ``--streams N`` adds the older twin rows;
4. before and after step 3, times the int8 file at batch 1 in a bare loop on ``--threads``
   threads and on 1 (``core_probe``): on a shared VM a slow second vCPU makes the 2-thread
   rows slow, and this records whether the run met that state;
5. issue 17's check: the default export against an explicit ``stn-export --optimize`` of the same
   checkpoint, batch 1 in a bare interleaved loop (p50 of each; the files' sha256 too);
6. writes ``benchmarks/results/bench_table.json`` and ``bench_table.md`` and prints whether
   each target of the issue was met (batch 256, 2 threads):
   * the fastest stn-deploy (ONNX Runtime) CPU path ≥ 4× PyTorch eager,
   * … and ≥ 1.0× OpenVINO's best precision in the same run,
   * at ≤ 0.5 points of top-1 loss (int8 vs fp32, digits test split),
   * ONNX Runtime fp32 ≥ 2× PyTorch eager,
   * batch-1 p50 latency ≤ 0.2 ms.

Run on a quiet machine (nothing else using the cores):
    .venv/bin/python benchmarks/bench_table.py [--iterations 100 --rounds 10] [--checkpoint stn.pt]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from stn_deploy.metadata import variant_path
from stn_deploy.runtime import Session

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
BIN = Path(sys.executable).parent


def run(cmd: list[str], capture: bool = True, ok: tuple[int, ...] = (0,)) -> str:
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, check=False, text=True, stdout=subprocess.PIPE if capture else None)
    if done.returncode not in ok:
        sys.exit(f"command failed ({done.returncode}): {' '.join(cmd)}")
    return done.stdout or ""


def core_probe(model: Path, threads: int, blocks: int = 6, calls: int = 300) -> dict:
    """Batch-1 p50 of ``model`` in a bare loop, ``threads`` threads against 1, interleaved in blocks.

    On this shared VM the second vCPU sometimes runs slower for seconds at a time (the host's
    load, not ours: steal time stays near 0). ONNX Runtime's 2-thread calls then wait for it at
    every parallel node, and batch 1 becomes slower on 2 threads than on 1 (0.25 vs 0.20 ms)
    while the 1-thread loop does not change. Run before and after the benchmark, this records
    which state the run met; ``speedup`` < 1 means the second core was slow.
    """
    sessions = {n: Session(model, provider="cpu", threads=n, warmup=20) for n in dict.fromkeys((threads, 1))}
    x = np.random.default_rng(0).random((1, *sessions[1].preprocessing.input_shape), dtype=np.float32)
    times: dict[int, list[float]] = {n: [] for n in sessions}
    for _ in range(blocks):
        for n, session in sessions.items():
            for _ in range(calls):
                start = time.perf_counter()
                session.run(x)
                times[n].append(time.perf_counter() - start)
    p50 = {n: float(np.median(t)) * 1000.0 for n, t in times.items()}
    return {
        "model": str(model),
        "p50_ms": {str(n): round(v, 4) for n, v in p50.items()},
        "speedup": round(p50[1] / p50[threads], 3),
    }


def default_vs_explicit(default: Path, explicit: Path, threads: int, blocks: int = 6, calls: int = 300) -> dict:
    """Batch-1 p50 of the default export against an explicit ``--optimize`` export, interleaved."""
    import hashlib

    files = {"default": default, "explicit_optimize": explicit}
    sessions = {k: Session(p, provider="cpu", threads=threads, warmup=20) for k, p in files.items()}
    x = np.random.default_rng(0).random((1, *sessions["default"].preprocessing.input_shape), dtype=np.float32)
    times: dict[str, list[float]] = {k: [] for k in files}
    for _ in range(blocks):
        for k, session in sessions.items():
            for _ in range(calls):
                start = time.perf_counter()
                session.run(x)
                times[k].append(time.perf_counter() - start)
    p50 = {k: float(np.median(t)) * 1000.0 for k, t in times.items()}
    digest = {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in files.items()}
    return {
        "p50_ms": {k: round(v, 4) for k, v in p50.items()},
        "ratio": round(p50["default"] / p50["explicit_optimize"], 3),
        "sha256": digest,
        "same_bytes": digest["default"] == digest["explicit_optimize"],
    }


def describe_probe(when: str, probe: dict, threads: int) -> str:
    p50 = probe["p50_ms"]
    return f"{when} {p50[str(threads)]:.3f} ms on {threads} threads vs {p50['1']:.3f} ms on 1 ({probe['speedup']:.2f}x)"


def row(results: list[dict], backend: str, batch: int) -> dict | None:
    return next((r for r in results if r["backend"] == backend and r["batch_size"] == batch), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, default=REPO / "build" / "bench_table", help="models go here")
    ap.add_argument("--checkpoint", type=Path, default=None, help="reuse this checkpoint instead of training")
    ap.add_argument("--threads", type=int, default=2)
    # Ten interleaved rounds: on a shared 2-vCPU VM the 2-thread speed drifts between two levels for
    # seconds at a time, and more, shorter rounds spread that drift over the backends more evenly.
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--batch-sizes", default="1,8,64,256")
    ap.add_argument("--streams", default=None, help="stn-bench --streams (default: stn-bench's own, auto)")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_table.json")
    args = ap.parse_args()

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    if args.checkpoint is not None and not args.checkpoint.is_file():
        ap.error(f"--checkpoint {args.checkpoint}: no such file")
    ckpt = args.checkpoint or work / "stn_digits.pt"
    train_summary = None
    if not ckpt.is_file():
        started = time.perf_counter()
        train_summary = json.loads(
            run([str(BIN / "stn-train"), "--dataset", "digits", "-o", str(ckpt), "--json", "--no-progress"])
        )
        train_summary["wall_seconds"] = time.perf_counter() - started

    fp32 = work / "stn_digits.onnx"
    export = json.loads(
        run(
            [
                str(BIN / "stn-export"),
                str(ckpt),
                "-o",
                str(fp32),
                "--quantize",
                "int8",
                "--calibration",
                "digits",
                "--json",
                "-q",
            ]
        )
    )
    int8 = variant_path(fp32, "int8")
    explicit = work / "stn_digits.explicit_optimize.onnx"
    run([str(BIN / "stn-export"), str(ckpt), "-o", str(explicit), "--optimize", "--json", "-q"])
    # OpenVINO's int8 row gets the int8 layout OpenVINO runs fastest (no conv unfolding), so the
    # comparison is against OpenVINO at its best, not on a graph tuned for ONNX Runtime.
    plain_int8 = variant_path(fp32, "plain.int8")
    run(
        [
            str(BIN / "stn-export"),
            str(fp32),
            "-o",
            str(plain_int8),
            "--quantize",
            "int8",
            "--int8-config",
            "plain",
            "--calibration",
            "digits",
            "--json",
            "-q",
        ]
    )
    probes = {"before": core_probe(int8, args.threads)}
    bench = json.loads(
        run(
            [
                str(BIN / "stn-bench"),
                "--model",
                str(fp32),
                "--checkpoint",
                str(ckpt),
                "--int8-model",
                str(int8),
                "--openvino-int8-model",
                str(plain_int8),
                "--threads",
                str(args.threads),
                *(["--streams", args.streams] if args.streams else []),
                "--batch-sizes",
                args.batch_sizes,
                "--iterations",
                str(args.iterations),
                "--rounds",
                str(args.rounds),
                "--json",
            ],
            ok=(0, 3),
        )
    )  # 3: a backend failed; its row says why and the table says so
    probes["after"] = core_probe(int8, args.threads)
    defaults = default_vs_explicit(fp32, explicit, args.threads)

    results = bench["results"]
    big, one = max(bench["batch_sizes"]), min(bench["batch_sizes"])
    status = {b["name"]: b for b in bench["backends"]}
    for needed in ("pytorch-eager-cpu", "ort-cpu-fp32", "ort-cpu-int8"):
        if not (row(results, needed, big) and row(results, needed, one)):
            sys.exit(f"stn-bench has no {needed} result ({status[needed]['status']}: {status[needed]['reason']})")
    eager = row(results, "pytorch-eager-cpu", big)["throughput"]
    # stn-deploy's CPU paths: ONNX Runtime fp32 and int8, each as one stream and as --streams streams
    ours = [r for r in results if r["backend"].startswith("ort-cpu-")]
    fastest = max((r for r in ours if r["batch_size"] == big), key=lambda r: r["throughput"])
    fp32 = max((r for r in ours if r["batch_size"] == big and "-fp32" in r["backend"]), key=lambda r: r["throughput"])
    openvino = [r for r in results if r["backend"].startswith("openvino") and r["batch_size"] == big]
    ov_best = max(openvino, key=lambda r: r["throughput"]) if openvino else None
    b1 = min((r for r in ours if r["batch_size"] == one), key=lambda r: r["p50_ms"])
    int8_report = export["int8"]
    drop = int8_report["accuracy_drop"] if "-int8" in fastest["backend"] else 0.0

    targets = [
        (
            "fastest CPU path >= 4x PyTorch eager",
            f"{fastest['backend']} {fastest['throughput'] / eager:.2f}x",
            fastest["throughput"] / eager >= 4.0,
        ),
        (
            "fastest CPU path >= 1.0x OpenVINO best",
            f"{fastest['throughput'] / ov_best['throughput']:.2f}x vs {ov_best['backend']}"
            if ov_best
            else "OpenVINO not installed",
            bool(ov_best) and fastest["throughput"] >= ov_best["throughput"],
        ),
        (
            "top-1 loss <= 0.5 points",
            f"{drop:+.2f} points (fp32 {int8_report['fp32_accuracy']:.2f}%, int8 {int8_report['int8_accuracy']:.2f}%)",
            drop <= 0.5,
        ),
        (
            "ORT fp32 >= 2x PyTorch eager",
            f"{fp32['backend']} {fp32['throughput'] / eager:.2f}x",
            fp32["throughput"] / eager >= 2.0,
        ),
        ("batch-1 p50 <= 0.2 ms", f"{b1['backend']} {b1['p50_ms']:.3f} ms", b1["p50_ms"] <= 0.2),
        (
            "default export's batch-1 p50 within 10% of an explicit --optimize file",
            f"{defaults['p50_ms']['default']:.3f} vs {defaults['p50_ms']['explicit_optimize']:.3f} ms "
            f"({defaults['ratio']:.3f}x; {'the same bytes' if defaults['same_bytes'] else 'different bytes'})",
            defaults["ratio"] <= 1.10,
        ),
    ]

    lines = [
        f"Machine: {bench['machine']['cpu']}, {bench['machine']['logical_cpus']} logical CPUs "
        f"({'/'.join(bench['machine']['isa'])}), {args.threads} threads; "
        f"onnxruntime {bench['machine']['versions'].get('onnxruntime')}, torch "
        f"{bench['machine']['versions'].get('torch')}, "
        f"openvino {bench['machine']['versions'].get('openvino', 'not installed')}.",
        "",
        f"| backend | img/s @ {big} | x eager | p50 ms @ {one} | p99 ms @ {one} |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in dict.fromkeys(r["backend"] for r in results):
        r_big, r_one = row(results, name, big), row(results, name, one)
        lines.append(
            f"| {name} | {r_big['throughput']:.0f} | {r_big['ratio_to_eager']:.2f} | {r_one['p50_ms']:.3f} | "
            f"{r_one['p99_ms']:.3f} |"
        )
    lines += [
        "",
        f"int8: top-1 {int8_report['fp32_accuracy']:.2f}% (fp32) -> {int8_report['int8_accuracy']:.2f}% (int8) "
        f"on {int8_report['eval_samples']} digits test images.",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    lines += [f"| {t} | {m} | {'yes' if ok else 'NO'} |" for t, m, ok in targets]
    lines += [
        "",
        "Second-core check (ORT int8, batch 1, bare loop, p50): "
        + ", ".join(describe_probe(when, probe, args.threads) for when, probe in probes.items())
        + ". Below 1x the second vCPU was running slow.",
    ]
    failed = [b for b in bench["backends"] if b["status"] == "failed"]
    if failed:
        lines += ["", "Failed backends: " + "; ".join(f"{b['name']} ({b['reason']})" for b in failed)]
    markdown = "\n".join(lines)

    from stn_deploy.fileio import atomic_write_text

    payload = {
        "train": train_summary,
        "checkpoint": str(ckpt),
        "export": export,
        "bench": bench,
        "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in targets],
        "core_probe": probes,
        "default_vs_explicit_optimize": defaults,
        "markdown": markdown,
    }
    atomic_write_text(args.out, json.dumps(payload, indent=2))
    atomic_write_text(args.out.with_suffix(".md"), markdown + "\n")
    print(markdown)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
