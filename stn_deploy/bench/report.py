"""stn-bench's output: the machine it ran on, the table, the JSON report's parts, the plot."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from stn_deploy.errors import StnDeployError
from stn_deploy.fileio import atomic_path


class BenchOptionError(StnDeployError):
    """Bad stn-bench arguments (exit 2)."""

    exit_code = 2


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    model_name = next((ln for ln in cpuinfo if ln.startswith("model name")), None)
    if model_name is not None:
        cpu = model_name.split(":", 1)[1].strip()
    flags = next((ln for ln in cpuinfo if ln.startswith("flags")), "")
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f" {f}" in flags]
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("onnxruntime", "torch", "openvino"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return {
        "cpu": cpu,
        "isa": isa,
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "threads": threads,
        "gpus": _gpus(),
        "versions": versions,
    }


def _gpus() -> list[str]:
    """``name, driver`` of each NVIDIA GPU (nvidia-smi), or [] where there is none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"stn-bench: {report['model']}  threads={report['threads']}  "
        + (
            f"streams=1 and {report['streams']}  "
            if isinstance(report.get("streams"), int) and report["streams"] > 1
            else f"streams={report.get('streams', 1)}  "
        )
        + f"inputs={report['inputs']}  "
        f"iterations={report['iterations']} (x{report['rounds']} rounds interleaved, {report.get('settle_ms', 0):g} "
        "ms settle, "
        f"{report.get('rewarm_ms', 0):g} ms re-warm)",
        f"machine: {report['machine']['cpu']} ({report['machine']['logical_cpus']} logical CPUs, "
        f"{'/'.join(report['machine']['isa']) or 'no AVX2'})"
        + (f"; GPU: {'; '.join(report['machine']['gpus'])}" if report["machine"].get("gpus") else ""),
        "",
        f"{'backend':<30} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'img/s':>10} {'x eager':>8}",
    ]
    for r in report["results"]:
        ratio = f"{r['ratio_to_eager']:.2f}" if r["ratio_to_eager"] else "-"
        lines.append(
            f"{r['backend']:<30} {r['batch_size']:>5} {r['p50_ms']:>9.3f} {r['p90_ms']:>9.3f} {r['p99_ms']:>9.3f} "
            f"{r['throughput']:>10.0f} {ratio:>8}"
        )
    lines.append("")
    for b in report["backends"]:
        if b["status"] == "ok":
            agree = report["agreement"].get(b["name"], {})
            lines.append(
                f"  {b['name']:<30} ok       top-1 agreement {agree.get('top1_agreement', float('nan')):.1f}% "
                f"max |Δ| {agree.get('max_abs_diff', float('nan')):.3g} vs {agree.get('reference', '-')}"
            )
        else:
            lines.append(f"  {b['name']:<30} {b['status']:<8} {b['reason']}")
    return "\n".join(lines)


def require_pyplot():
    """matplotlib.pyplot on the Agg backend, or a one-line error saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchOptionError("--plot needs matplotlib (pip install matplotlib, or stn-deploy[dev])") from None
    return plt


def plot(report: dict[str, Any], path: Path) -> None:
    """Throughput against batch size, one line per backend (log-log)."""
    plt = require_pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(dict.fromkeys(r["backend"] for r in report["results"]))
    for name in names:
        rows = [r for r in report["results"] if r["backend"] == name]
        ax.plot([r["batch_size"] for r in rows], [r["throughput"] for r in rows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    ax.set_title(f"stn-bench, {report['threads']} threads, {report['machine']['cpu']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
