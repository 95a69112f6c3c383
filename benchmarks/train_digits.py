"""Must-show benchmark: STN vs the plain CNN on `digits` with the default stn-train recipe.

Runs the real command twice (``stn-train --arch stn`` and ``stn-train --arch cnn``, nothing but
--arch, --output, --seed, --json, --device cpu and --no-progress on the command line, so the
defaults are the recipe) and
prints both test errors, their ratio and the STN training time. Writes the figures to
benchmarks/results/train_digits.json.

Targets (issue 2): STN test error <= 2.5%, CNN error / STN error >= 3, STN training <= 180 s
on a 2-core CPU. Wall-clock time is shared-machine sensitive: the JSON records the load average
before and after each run so a slow figure can be told from a slow machine.

    python benchmarks/train_digits.py [--seed 0] [--threads 2] [--out benchmarks/results/train_digits.json]
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

TARGET_STN_ERROR = 0.025
TARGET_RATIO = 3.0
TARGET_STN_SECONDS = 180.0
ROOT = Path(__file__).resolve().parent.parent


def run_stn_train(arch: str, output: Path, seed: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [
        sys.executable,
        "-m",
        "stn_deploy.train.cli",
        "--arch",
        arch,
        "--seed",
        str(seed),
        "--device",
        "cpu",
        "--output",
        str(output),
        "--json",
        "--no-progress",
    ]
    print(f"$ stn-train {' '.join(command[3:])}", file=sys.stderr, flush=True)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"stn-train --arch {arch} failed with exit code {proc.returncode}")
    summary = json.loads(proc.stdout)
    summary["wall_seconds"] = round(wall, 2)  # the whole command: data, training, evaluation, saving
    summary["load_average_before"] = round(load_before, 2)
    summary["load_average_after"] = round(os.getloadavg()[0], 2)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (OMP_NUM_THREADS)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_digits.json")
    args = parser.parse_args()

    from stn_deploy.train.data import DEFAULT_DISTORTION
    from stn_deploy.train.trainer import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        stn = run_stn_train("stn", Path(tmp) / "stn.pt", args.seed, args.threads)
        cnn = run_stn_train("cnn", Path(tmp) / "cnn.pt", args.seed, args.threads)

    stn_error, cnn_error = stn["test_error"], cnn["test_error"]
    ratio = cnn_error / stn_error if stn_error > 0 else float("inf")
    checks = {
        "stn_error_le_2.5pct": stn_error <= TARGET_STN_ERROR,
        "cnn_over_stn_error_ge_3": ratio >= TARGET_RATIO,
        "stn_training_le_180s": stn["wall_seconds"] <= TARGET_STN_SECONDS,
    }
    recipe = {k: v for k, v in vars(TrainConfig()).items() if k not in ("output", "data_dir", "download", "device")}
    result = {
        "benchmark": "train_digits",
        "command": f"stn-train --arch {{stn,cnn}} --seed {args.seed} --device cpu --json",
        "recipe": {**recipe, "distortion": {k: v for k, v in vars(DEFAULT_DISTORTION).items()}},
        "machine": {
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "stn": {k: v for k, v in stn.items() if k != "history"},
        "cnn": {k: v for k, v in cnn.items() if k != "history"},
        "stn_history": stn["history"],
        "cnn_history": cnn["history"],
        "stn_test_error": stn_error,
        "cnn_test_error": cnn_error,
        "error_ratio_cnn_over_stn": round(ratio, 3),
        "stn_train_seconds": stn["seconds"],
        "stn_wall_seconds": stn["wall_seconds"],
        "targets": {"stn_test_error": TARGET_STN_ERROR, "error_ratio": TARGET_RATIO, "stn_seconds": TARGET_STN_SECONDS},
        "checks": checks,
        "passed": all(checks.values()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"STN test error  {100 * stn_error:5.2f}%  (target <= {100 * TARGET_STN_ERROR:.1f}%)  best epoch "
        f"{stn['best_epoch']}/{stn['epochs']}"
    )
    print(f"CNN test error  {100 * cnn_error:5.2f}%  best epoch {cnn['best_epoch']}/{cnn['epochs']}")
    print(f"CNN / STN error {ratio:5.2f}x   (target >= {TARGET_RATIO:.0f}x)")
    print(
        f"STN training    {stn['seconds']:.1f}s in the loop, {stn['wall_seconds']:.1f}s wall for the command "
        f"(target <= {TARGET_STN_SECONDS:.0f}s; load average {stn['load_average_before']} -> "
        f"{stn['load_average_after']})"
    )
    print(f"CNN training    {cnn['seconds']:.1f}s in the loop, {cnn['wall_seconds']:.1f}s wall")
    print(
        f"{'PASS' if result['passed'] else 'FAIL'}: "
        f"{', '.join(k for k, ok in checks.items() if not ok) or 'all targets met'}"
    )
    print(f"wrote {args.out}")
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
