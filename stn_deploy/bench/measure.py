"""Measurement: load every backend, prove it on the largest batch, then time them interleaved.

For each batch size every backend runs ``warmup`` untimed calls, then ``iterations`` timed calls
split over ``rounds`` interleaved rounds (backend A, B, C, A, B, C, ...), so a burst of load from
another process hits every backend alike. Before each backend's turn the benchmark pauses
``settle_ms``: each runtime's idle worker threads keep spinning for a while after a call (ONNX
Runtime's pool, PyTorch's OpenMP team, OpenVINO's TBB arena), and on a small machine that spin
steals the cores from whichever backend runs next. After the pause the backend runs untimed for
``rewarm_ms`` (at least one call), so the wake-up of its idle threads and cores is not timed
either (benchmarks/README.md and the README's Results section have the measurements behind both
defaults). Latency is per call (p50/p90/p99, ms); throughput is images per second at the p50
latency; each backend's ratio is taken against PyTorch eager on the CPU at the same batch size in
the same run.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from stn_deploy import metadata as md
from stn_deploy.errors import DatasetError, StnDeployError, one_line
from stn_deploy.runtime import Session

from .runners import EAGER, EAGER_CUDA, BackendUnavailable, Runner

DEFAULT_SETTLE_MS = 100.0
DEFAULT_REWARM_MS = 100.0
# Datasets --inputs auto may load because the model's metadata names them (the training side's
# BUILTIN_DATASETS; stated here too because a torch-free host cannot import it). A model file must
# not choose paths on the host: an imagefolder:PATH or any other value falls back to random inputs.
AUTO_DATASETS = ("digits", "cifar10", "mnist")


@dataclass
class Backend:
    """A runner and how it fared: ``ok``, ``skipped`` (cannot run here) or ``failed``."""

    runner: Runner
    status: str = "pending"
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = self.runner.describe()
        d.update(status=self.status, reason=self.reason)
        return d


@dataclass
class Measurement:
    backend: str
    batch_size: int
    latencies_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms)
        p50 = float(np.percentile(lat, 50))
        return {
            "backend": self.backend,
            "batch_size": self.batch_size,
            "iterations": int(lat.size),
            "p50_ms": p50,
            "p90_ms": float(np.percentile(lat, 90)),
            "p99_ms": float(np.percentile(lat, 99)),
            "mean_ms": float(lat.mean()),
            "min_ms": float(lat.min()),
            "throughput": self.batch_size / (p50 / 1000.0),
        }


def make_inputs(session: Session, count: int, source: str, seed: int = 0) -> tuple[np.ndarray, str]:
    """``count`` inputs for ``session``'s model and where they came from: standard-normal
    (``random``), an image directory or a dataset's test split (the user's flag), or ``auto``:
    the model's own dataset when its metadata names a built-in dataset that is on this machine."""
    pre = session.preprocessing
    if source == "random":
        return np.random.default_rng(seed).standard_normal((count, *pre.input_shape), dtype=np.float32), "random"
    if source == "auto":
        dataset = session.metadata.props.get(md.DATASET, "")
        if dataset not in AUTO_DATASETS:
            return make_inputs(session, count, "random", seed)
        try:
            from stn_deploy.train.data import load_image_samples  # torch: only where a dataset is named
        except ImportError:  # a deployment host without torch: the dataset cannot be rendered here
            return make_inputs(session, count, "random", seed)
        try:
            images = load_image_samples(dataset, pre, n=count, split="test").images
        except StnDeployError:
            return make_inputs(session, count, "random", seed)
        source = f"{dataset}:test"
    else:
        try:
            from stn_deploy.train.data import load_image_samples  # torch: datasets are rendered by it
        except ImportError as exc:
            raise DatasetError(f"--inputs {source}: needs the training stack (torch) to load ({exc})") from None
        images = load_image_samples(source, pre, n=count, split="test").images
    reps = -(-count // len(images))
    return np.ascontiguousarray(np.concatenate([images] * reps)[:count]), source


def run_benchmark(
    backends: list[Backend],
    inputs: np.ndarray,
    batch_sizes: list[int],
    *,
    warmup: int = 5,
    iterations: int = 30,
    rounds: int = 3,
    settle_ms: float = DEFAULT_SETTLE_MS,
    rewarm_ms: float = DEFAULT_REWARM_MS,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Load every backend, then time them interleaved. Returns (results, agreement per backend).

    A backend that fails to load, gives non-finite or wrongly shaped outputs on the largest
    batch, or fails later while timed is marked ``failed`` with the one-line reason and dropped;
    the others go on.
    """
    largest = np.ascontiguousarray(inputs[: max(batch_sizes)])
    outputs: dict[str, np.ndarray] = {}
    pending = [b for b in backends if b.status == "pending"]
    bar = tqdm(
        total=len(pending) * (1 + len(batch_sizes)),
        desc="stn-bench",
        unit="step",
        disable=not progress,
        file=sys.stderr,
    )
    classes: int | None = None
    for b in pending:
        bar.set_postfix_str(f"load {b.runner.name}")
        try:
            b.runner.load()
            out = np.asarray(b.runner.infer(largest))  # also proves the largest batch runs
            _check_output(out, len(largest), classes)
            classes = out.shape[1] if classes is None else classes
            outputs[b.runner.name] = out
            b.status = "ok"
        except BackendUnavailable as exc:
            b.status, b.reason = "skipped", str(exc)
        except Exception as exc:  # noqa: BLE001 - one broken backend must not stop the others
            _fail(b, exc)
        bar.update(1)
    live = [b for b in backends if b.status == "ok"]
    agreement = _agreement(live, outputs)

    measurements = {(b.runner.name, bs): Measurement(b.runner.name, bs) for b in live for bs in batch_sizes}
    per_round = [iterations // rounds + (1 if r < iterations % rounds else 0) for r in range(rounds)]
    for bs in batch_sizes:
        batch = np.ascontiguousarray(inputs[:bs])
        for b in list(live):
            try:
                for _ in range(warmup):
                    b.runner.infer(batch)
            except Exception as exc:  # noqa: BLE001
                _fail(b, exc, live)
        for n in per_round:
            for b in list(live):
                bar.set_postfix_str(f"{b.runner.name} b{bs}")
                m = measurements[(b.runner.name, bs)]
                try:
                    if len(live) > 1:
                        time.sleep(settle_ms / 1000.0)  # let the previous backend's spinning threads go idle
                        _rewarm(b.runner, batch, rewarm_ms / 1000.0)
                    for _ in range(n):
                        start = time.perf_counter()
                        b.runner.infer(batch)
                        m.latencies_ms.append((time.perf_counter() - start) * 1000.0)
                except Exception as exc:  # noqa: BLE001
                    _fail(b, exc, live)
        bar.update(len(pending))
    bar.close()
    alive = {b.runner.name for b in live}
    results = [m.summary() for m in measurements.values() if m.latencies_ms and m.backend in alive]
    eager = {r["batch_size"]: r["throughput"] for r in results if r["backend"] == EAGER}
    eager_cuda = {r["batch_size"]: r["throughput"] for r in results if r["backend"] == EAGER_CUDA}
    device = {b.runner.name: b.runner.device for b in backends}
    runners = {b.runner.name: b.runner for b in backends}
    for r in results:
        if hasattr(runners[r["backend"]], "streams_for"):  # what streams="auto" chose at this size
            r["streams"] = runners[r["backend"]].streams_for(r["batch_size"])
        base = eager.get(r["batch_size"])
        r["ratio_to_eager"] = r["throughput"] / base if base else None
        if device[r["backend"]] == "cuda":  # GPU rows are also compared with PyTorch on the same GPU
            base = eager_cuda.get(r["batch_size"])
            r["ratio_to_eager_cuda"] = r["throughput"] / base if base else None
    order = {b.runner.name: i for i, b in enumerate(backends)}
    results.sort(key=lambda r: (r["batch_size"], order[r["backend"]]))
    for b in backends:
        b.runner.close()
    return results, {name: a for name, a in agreement.items() if name in alive}


class OutputError(StnDeployError):
    """A backend's outputs are not log-probabilities of the benchmark's batch."""


def _check_output(out: np.ndarray, rows: int, classes: int | None) -> None:
    if out.ndim != 2 or len(out) != rows:
        raise OutputError(f"returned shape {list(out.shape)} for a batch of {rows} (expected [{rows}, classes])")
    if classes is not None and out.shape[1] != classes:
        raise OutputError(f"returned {out.shape[1]} classes; the first backend returned {classes}")
    if not np.isfinite(out).all():
        raise OutputError(f"returned non-finite log-probabilities ({int((~np.isfinite(out)).sum())} values)")


def _fail(backend: Backend, exc: BaseException, live: list[Backend] | None = None) -> None:
    """Mark ``backend`` failed with the one-line reason and take it out of ``live``."""
    backend.status = "failed"
    backend.reason = str(exc) if isinstance(exc, StnDeployError) else one_line(exc, 200)
    if live is not None and backend in live:
        live.remove(backend)


def _rewarm(runner: Runner, batch: np.ndarray, seconds: float) -> None:
    """Untimed calls for ``seconds`` (at least one) after the settle pause: its own threads and the
    cores were idle for that pause, and the first calls after it pay for waking them."""
    end = time.perf_counter() + seconds
    runner.infer(batch)
    while time.perf_counter() < end:
        runner.infer(batch)


def _agreement(live: list[Backend], outputs: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Each backend's outputs on the same batch against the first fp32 backend's (the reference)."""
    if not live:
        return {}
    ref_backend = next((b for b in live if b.runner.precision == "fp32"), live[0])
    ref = outputs[ref_backend.runner.name]
    out = {}
    for b in live:
        got = outputs[b.runner.name]
        out[b.runner.name] = {
            "reference": ref_backend.runner.name,
            "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean() * 100),
            "max_abs_diff": float(np.abs(got - ref).max()),
        }
    return out
