"""``stn-infer --engine ray`` throughput against the single-process ``stn-infer``, and a two-node run.

What it does:

1. Writes ``--count`` (default 100,000) random 32×32 RGB PNGs into a cache directory (default
   ``build/bench_ray/png32_<count>``), once: a later run reuses them.
2. Uses ``--model`` or, without it, the reference STN with random weights (seed 0) exported once
   into the cache directory (benchmarks/infer_throughput.py's exporter; the weights do not change
   the amount of compute).
3. Runs the real command on the same files and model, each run a fresh process writing CSV rows
   to a file, in rounds that interleave the configurations (``--repeats`` rounds; each config's
   best run is kept, the least disturbed on a shared machine):
   * ``local``: ``stn-infer IMAGES --threads T`` (T = ``--threads``, default: the machine's cores);
   * ``ray AxB``: ``stn-infer IMAGES --engine ray --actors A --threads B`` on a local Ray instance
     the command starts itself, for A×B = T (the same total ONNX Runtime threads) and 1 actor of 1;
   * ``ray TxB parquet-dir``: the same, writing a Parquet directory instead of one ordered CSV.
   The rate is each command's own images/s, which excludes what happens before the pipeline starts
   (the model load; for Ray also starting the local instance, reported separately as
   ``ray_init_s``). The Ray rate includes starting its actors and decode workers.
4. Starts a two-node cluster on 127.0.0.1 (``ray start`` head and worker, 1 CPU each, as
   tests/test_infer_ray.py's multi-node test does), runs ``--multinode-count`` images (default
   300, batch size 16: the test's job) with 2 actors against the head, and records the cluster
   start, the job's wall time and rate, the rows each node inferred, and the stop.
5. Writes ``--json-out`` (default benchmarks/results/ray_infer.json) and a Markdown table beside it.

Run:  .venv/bin/python benchmarks/ray_infer.py [--count 10000] [--repeats 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from ray_cluster import LoopbackCluster
from serve_load import export_random_model
from stn_deploy.fileio import atomic_write_text
from synthetic_images import write_pngs

TARGET_RATIO = 0.70


def run_cli(images: Path, model: Path, out: Path, extra: list[str], env: dict[str, str] | None = None) -> dict:
    """One stn-infer command (a fresh process); its --json summary plus the command's wall time."""
    cmd = [
        sys.executable,
        "-m",
        "stn_deploy.infer",
        str(images),
        "--model",
        str(model),
        "-o",
        str(out),
        "--json",
        "--no-progress",
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.strip()[-2000:]}")
    summary = json.loads(proc.stdout)
    summary["command_wall_s"] = round(wall, 2)
    return summary


def configs(threads: int, batch_size: int) -> list[tuple[str, list[str], str]]:
    """(name, extra CLI arguments, output suffix) for each configuration compared."""
    b = ["--batch-size", str(batch_size)]
    out = [("local", ["--threads", str(threads), *b], ".csv")]
    out.append((f"ray {threads}x1", ["--engine", "ray", "--actors", str(threads), "--threads", "1", *b], ".csv"))
    if threads > 1:
        out.append((f"ray 1x{threads}", ["--engine", "ray", "--actors", "1", "--threads", str(threads), *b], ".csv"))
        out.append(("ray 1x1", ["--engine", "ray", "--actors", "1", "--threads", "1", *b], ".csv"))
    out.append(
        (f"ray {threads}x1 parquet-dir", ["--engine", "ray", "--actors", str(threads), "--threads", "1", *b], "/")
    )
    return out


def multinode(images: Path, model: Path, work: Path, batch_size: int) -> dict:
    t0 = time.perf_counter()
    with LoopbackCluster(work / "cluster", node_cpus=(1, 1)) as cluster:
        started = time.perf_counter() - t0
        s = run_cli(
            images,
            model,
            work / "multinode.csv",
            ["--engine", "ray", "--ray-address", cluster.address, "--actors", "2", "-b", str(batch_size)],
            env=cluster.env,
        )
        t1 = time.perf_counter()
    stopped = time.perf_counter() - t1
    return {
        "nodes": s["ray"]["nodes"],
        "cpus_per_node": 1,
        "actors": s["ray"]["actors"],
        "images": s["images"],
        "batch_size": batch_size,
        "cluster_start_s": round(started, 2),
        "job_wall_s": s["command_wall_s"],
        "job_images_per_s": s["images_per_s"],
        "ray_init_s": s["ray_init_seconds"],
        "cluster_stop_s": round(stopped, 2),
        "rows_per_node": list(s["ray"]["rows_per_node"].values()),
    }


def markdown(result: dict) -> str:
    m, mn, best = result["machine"], result.get("multinode"), result["best_ray_same_threads"]
    machine = (
        f"Machine: {m['cpus']} CPUs, {m['platform']}; load average {m['load_average_at_start']} at the start and "
        f"{m['load_average_at_end']} at the end ({result['note']})."
    )
    setup = (
        f"{result['images']} 32×32 PNGs, batch size {result['batch_size']}, {result['threads']} ONNX Runtime threads "
        f"in total; best of {result['repeats']} interleaved runs per configuration (all runs in ray_infer.json)."
    )
    lines = ["# stn-infer --engine ray vs the single-process command", "", machine, setup, ""]
    lines.append(
        "| configuration | actors × threads | output | images/s (best) | vs local (best) | vs local, each round "
        "| Ray start (s, not in the rate) | command wall (s) |"
    )
    lines.append("|---|---|---|---:|---:|---|---:|---:|")
    local_runs = next(r["runs_images_per_s"] for r in result["configs"] if r["name"] == "local")
    for r in result["configs"]:
        start = f"{r['ray_init_s']:.1f}" if r["ray_init_s"] is not None else "–"
        rounds = " / ".join(f"{a / b:.2f}" for a, b in zip(r["runs_images_per_s"], local_runs))
        lines.append(
            f"| {r['name']} | {r['actors_x_threads']} | {r['format']} | {r['images_per_s']:.0f} | {r['vs_local']:.2f} "
            f"| {rounds} | {start} | {r['command_wall_s']} |"
        )
    if mn:
        two = (
            f"Two-node cluster on 127.0.0.1 (`ray start` head + worker, {mn['cpus_per_node']} CPU each, "
            f"{mn['actors']} actors, batch size {mn['batch_size']}): {mn['images']} images; cluster start "
            f"{mn['cluster_start_s']} s, job "
            f"{mn['job_wall_s']} s wall ({mn['job_images_per_s']} img/s in the pipeline, connecting "
            f"{mn['ray_init_s']} s), stop {mn['cluster_stop_s']} s; rows per node {mn['rows_per_node']}."
        )
        lines += ["", two]
    target = (
        f"Target: the best Ray configuration at the same total threads ≥ {TARGET_RATIO}× local: "
        f"{best['name']} at {best['vs_local']:.2f}×."
    )
    lines += ["", target]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--count", type=int, default=100_000, help="images (default 100,000)")
    ap.add_argument(
        "--images", type=Path, default=None, help="image cache directory (default build/bench_ray/png32_<count>)"
    )
    ap.add_argument(
        "--model",
        type=Path,
        default=None,
        help="ONNX model (default: the reference STN, random weights, exported once)",
    )
    ap.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="total ONNX Runtime threads (default: cores)"
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--multinode-count", type=int, default=300, help="images for the two-node run (0: skip it)")
    ap.add_argument(
        "--multinode-batch-size", type=int, default=16, help="its batch size (16 and 300 images: the test's)"
    )
    ap.add_argument("--quick", action="store_true", help="2,000 images, 1 round")
    ap.add_argument("--json-out", type=Path, default=REPO / "benchmarks" / "results" / "ray_infer.json")
    ap.add_argument(
        "--render", type=Path, default=None, help="only write the Markdown table of this results JSON beside it"
    )
    args = ap.parse_args()
    if args.render:
        atomic_write_text(args.render.with_suffix(".md"), markdown(json.loads(args.render.read_text())))
        return
    if args.quick:
        args.count, args.repeats = min(args.count, 2000), 1

    cache = REPO / "build" / "bench_ray"
    images = args.images or cache / f"png32_{args.count}"
    t0 = time.perf_counter()
    if write_pngs(images, args.count):
        print(f"wrote {args.count} PNGs to {images} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    model = args.model
    if model is None:
        model = cache / "stn_random.onnx"
        if not model.exists():
            cache.mkdir(parents=True, exist_ok=True)
            export_random_model(model)
    load_start = list(os.getloadavg())

    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="stn-ray-bench-") as tmp:
        work = Path(tmp)
        for rnd in range(args.repeats):
            for name, extra, suffix in configs(args.threads, args.batch_size):
                out = work / f"out{len(runs.get(name, []))}_{name.replace(' ', '_')}{suffix}"
                s = run_cli(images, model, out if suffix != "/" else Path(f"{out}/"), extra)
                runs.setdefault(name, []).append(s)
                print(
                    f"round {rnd + 1} {name:>24}: {s['images_per_s']:8.1f} img/s"
                    + (f"  (ray start {s['ray_init_seconds']:.1f} s)" if "ray" in s else ""),
                    file=sys.stderr,
                )
        mn = None
        if args.multinode_count:
            mn_images = work / "multinode_images"
            write_pngs(mn_images, args.multinode_count, seed=1)
            mn = multinode(mn_images, model, work, args.multinode_batch_size)
            print(f"two nodes: {mn}", file=sys.stderr)

    best = {name: max(rs, key=lambda s: s["images_per_s"]) for name, rs in runs.items()}
    local = best["local"]["images_per_s"]
    rows = []
    for name, s in best.items():
        r = s.get("ray")
        rows.append(
            {
                "name": name,
                "actors_x_threads": f"{r['actors']}x{r['threads_per_actor']}" if r else f"1 process x {args.threads}",
                "format": s["format"],
                "images_per_s": s["images_per_s"],
                "vs_local": round(s["images_per_s"] / local, 3),
                "ray_init_s": s.get("ray_init_seconds"),
                "command_wall_s": s["command_wall_s"],
                "runs_images_per_s": [x["images_per_s"] for x in runs[name]],
                "rows_per_node": list(r["rows_per_node"].values()) if r else None,
            }
        )
    same = [
        r for r in rows if r["name"] != "local" and r["actors_x_threads"] in (f"{args.threads}x1", f"1x{args.threads}")
    ]
    best_same = max(same, key=lambda r: r["vs_local"])
    result = {
        "benchmark": "stn-infer --engine ray vs single-process stn-infer",
        "images": args.count,
        "image_size": "32x32 PNG",
        "batch_size": args.batch_size,
        "threads": args.threads,
        "repeats": args.repeats,
        "model": str(args.model) if args.model else "reference STN, random weights (seed 0)",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "load_average_at_start": [round(x, 2) for x in load_start],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "configs": rows,
        "best_ray_same_threads": best_same,
        "target_ratio": TARGET_RATIO,
        "meets_target": best_same["vs_local"] >= TARGET_RATIO,
        "multinode": mn,
        "note": "ratios come from interleaved runs (the load average is the run's own plus anything else running)",
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json_out, json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.json_out.with_suffix(".md"), markdown(result))
    print(markdown(result), file=sys.stderr)


if __name__ == "__main__":
    main()
