"""``stn-bench``: the same input batches through every available backend, side by side.

One runner class per backend behind one interface (Polygraphy's habit)::

    runner = OrtRunner("stn.onnx", provider="cpu", threads=2)
    runner.load()                      # may raise BackendUnavailable (listed as skipped)
    log_probs = runner.infer(batch)    # [N, C, H, W] float32 -> [N, classes]

Backends: PyTorch eager (CPU; CUDA when present; torch is imported only for these), ONNX Runtime
per available provider (CPU, CUDA, TensorRT) and precision (fp32; fp16 on GPU; int8 on CPU), and
OpenVINO on CPU when installed (its default precision hint, f32, and int8 from the int8 model).

Measurement. For each batch size every backend runs ``warmup`` untimed calls, then ``iterations``
timed calls split over ``rounds`` interleaved rounds (backend A, B, C, A, B, C, ...), so a burst
of load from another process hits every backend alike. Between one backend's calls and the next
backend's, the benchmark pauses ``settle_ms``: each runtime's idle worker threads keep spinning for
a while after a call (ONNX Runtime's pool, PyTorch's OpenMP team, OpenVINO's TBB arena), and on a
2-core machine that spin steals the cores from whichever backend runs next (measured here: OpenVINO
int8 53 ms per batch of 256 right after ONNX Runtime, 24 ms after a 100 ms pause; ONNX Runtime
35 ms right after PyTorch, 29 ms after the pause). After the pause the backend runs untimed for
``rewarm_ms`` (at least one call), so the wake-up of its idle threads and cores is not timed
either: on the project's VM the first ~100 ms of calls after a 100 ms pause run slow (ONNX
Runtime int8 at batch 1, p50 of the 10 calls that follow: 0.202 ms after 20 ms of re-warm,
0.160 ms after 100 ms, 0.165 ms after 300 ms; a bare loop gives 0.157 ms). Latency is per
call (p50/p90/p99, ms); throughput is images per second at the p50 latency; each backend's ratio
is taken against PyTorch eager on the CPU at the same batch size in the same run.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from . import metadata as md
from .cli import report_errors, to_json
from .errors import ModelFileError, StnDeployError, one_line

if TYPE_CHECKING:
    from .runtime import Session

DEFAULT_BATCH_SIZES = (1, 8, 64, 256)
EXIT_SOME_FAILED = 3  # the run finished, but at least one backend failed (its row says why)
DEFAULT_SETTLE_MS = 100.0
DEFAULT_REWARM_MS = 100.0
EAGER = "pytorch-eager-cpu"


class BackendUnavailable(Exception):
    """This backend cannot run here; the message says why (shown as 'skipped')."""


class BenchOptionError(StnDeployError):
    """Bad stn-bench arguments (exit 2)."""

    exit_code = 2


class BenchError(StnDeployError):
    """A run that cannot go on: an unusable --checkpoint, no backend that could run (exit 1)."""


# -- runners -----------------------------------------------------------------------------------------
class Runner(ABC):
    """One backend: ``load()`` once, then ``infer(batch)`` → log-probabilities [N, classes]."""

    name: str
    backend: str
    device: str = "cpu"
    precision: str = "fp32"

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.info: dict[str, Any] = {}

    @abstractmethod
    def load(self) -> None: ...

    @abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "device": self.device, "precision": self.precision, **self.info}


class TorchRunner(Runner):
    """PyTorch eager from the checkpoint (``torch.inference_mode``)."""

    backend = "pytorch"

    def __init__(self, checkpoint: Path, device: str, threads: int) -> None:
        super().__init__(threads)
        self.checkpoint, self.device = checkpoint, device
        self.name = f"pytorch-eager-{device}"

    def load(self) -> None:
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - torch is a dependency of the package
            raise BackendUnavailable(f"torch not importable ({exc})") from None
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("torch.cuda.is_available() is False (no CUDA device or CUDA build)")
        from .checkpoint import load_checkpoint

        self._torch = torch
        torch.set_num_threads(self.threads)
        self.model = load_checkpoint(self.checkpoint).build_model().to(self.device)
        self.info = {"model": str(self.checkpoint), "torch": torch.__version__}

    def infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, non_blocking=True)
            out = self.model(x)
            return out.float().cpu().numpy()  # .cpu() synchronizes a CUDA run


class OrtRunner(Runner):
    """ONNX Runtime through :class:`stn_deploy.runtime.Session` on one provider."""

    backend = "onnxruntime"

    def __init__(
        self, model: Path, provider: str, precision: str, threads: int, *, trt_fp16: bool = False,
        max_batch: int = max(DEFAULT_BATCH_SIZES), streams: int = 1,
    ) -> None:
        super().__init__(threads)
        self.model, self.provider, self.precision, self.trt_fp16 = model, provider, precision, trt_fp16
        self.max_batch = max_batch  # TensorRT's optimization profile must cover the largest batch
        self.streams = streams
        self.device = "cpu" if provider == "cpu" else "cuda"
        self.name = f"ort-{provider}-{precision}" + _streams_suffix(streams)

    def load(self) -> None:
        from .errors import ProviderError
        from .runtime import CPU, PROVIDER_NAMES, Session, available_providers

        wanted = PROVIDER_NAMES[self.provider]
        if wanted not in available_providers():
            raise BackendUnavailable(f"onnxruntime build has no {wanted} (install stn-deploy[gpu] on a CUDA machine)")
        try:
            self.session = Session(
                self.model, provider=self.provider, threads=self.threads, trt_fp16=self.trt_fp16,
                trt_max_batch=self.max_batch if self.provider == "tensorrt" else None,
                record_placement=self.provider != "cpu", warmup=1, streams=self.streams,
            )
        except ProviderError as exc:
            raise BackendUnavailable(str(exc)) from None
        self.info = {"model": str(self.model), "providers": self.session.providers, "streams": self.streams}
        if self.provider != "cpu":
            self.info["nodes_on_cpu"] = len(self.session.placement().cpu_fallback)
        elif self.session.provider != CPU:  # pragma: no cover
            raise BackendUnavailable(f"session runs on {self.session.provider}")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(batch, ["log_probs"])["log_probs"]


class OpenVinoRunner(Runner):
    """OpenVINO on the CPU, reading the ONNX file directly.

    ``hint`` None keeps OpenVINO's default ``INFERENCE_PRECISION_HINT`` for this CPU (bf16 or
    f16 where the CPU has them, f32 otherwise); ``"f32"`` forces f32. An int8 QDQ model from
    stn-export is read as FakeQuantize and run by OpenVINO's low-precision transformations.
    """

    backend = "openvino"

    def __init__(self, model: Path, hint: str | None, precision: str, threads: int, *, streams: int = 1) -> None:
        super().__init__(threads)
        self.model, self.hint, self.precision, self.streams = model, hint, precision, streams
        self.name = f"openvino-cpu-{precision}" + _streams_suffix(streams)

    def load(self) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise BackendUnavailable("openvino not installed (pip install 'stn-deploy[openvino]')") from None
        core = ov.Core()
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY"}
        if self.streams > 1:  # OpenVINO's own streams: one infer request per slice of the batch
            config.update(PERFORMANCE_HINT="THROUGHPUT", NUM_STREAMS=self.streams)
        if self.hint:
            config["INFERENCE_PRECISION_HINT"] = self.hint
        compiled = core.compile_model(core.read_model(str(self.model)), "CPU", config)
        self.requests = [compiled.create_infer_request() for _ in range(self.streams)]
        low = 0
        for op in compiled.get_runtime_model().get_ops():
            rt = op.get_rt_info()
            if rt["layerType"].astype(str) in ("Convolution", "FullyConnected") and rt["runtimePrecision"].astype(str) in ("u8", "i8"):
                low += 1
        self.info = {
            "model": str(self.model), "openvino": ov.__version__,
            "inference_precision": str(compiled.get_property("INFERENCE_PRECISION_HINT")),
            "int8_conv_fc_layers": low, "streams": self.streams,
        }

    def infer(self, batch: np.ndarray) -> np.ndarray:
        slices = np.array_split(batch, min(self.streams, len(batch)))
        for request, part in zip(self.requests, slices):
            request.start_async({0: part})
        for request in self.requests[: len(slices)]:
            request.wait()
        return np.concatenate([np.array(r.get_output_tensor(0).data) for r in self.requests[: len(slices)]])


def _streams_suffix(streams: int) -> str:
    """Row names of the throughput arrangement: ``ort-cpu-int8-2streams``."""
    return f"-{streams}streams" if streams > 1 else ""


# -- which runners -----------------------------------------------------------------------------------
@dataclass
class Backend:
    runner: Runner
    status: str = "pending"  # ok | skipped | failed
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = self.runner.describe()
        d.update(status=self.status, reason=self.reason)
        return d


def plan_backends(
    model: Path,
    checkpoint: Path | None,
    int8_model: Path | None,
    fp16_model: Path | None,
    threads: int,
    only: set[str] | None = None,
    openvino_int8_model: Path | None = None,
    max_batch: int = max(DEFAULT_BATCH_SIZES),
    streams: int = 1,
) -> list[Backend]:
    """Every backend stn-bench knows, each later loaded or marked skipped with its reason.

    The OpenVINO int8 row reads ``openvino_int8_model`` when given (e.g. ``stn-export
    --int8-config plain``, the layout OpenVINO runs fastest), else ``int8_model``. ``max_batch``
    is the largest batch size that will be run (TensorRT builds its profile for it). With
    ``streams`` > 1 each ONNX Runtime CPU and OpenVINO row gets a twin that cuts the batch into
    that many concurrent streams of ``threads // streams`` threads (the same cores).
    """
    arrangements = [1, streams] if streams > 1 else [1]
    ov_int8 = openvino_int8_model or int8_model
    plan: list[tuple[Runner, str]] = []
    no_ckpt = "no --checkpoint given (PyTorch eager runs from the checkpoint)"
    if checkpoint is not None:
        plan.append((TorchRunner(checkpoint, "cpu", threads), ""))
        plan.append((TorchRunner(checkpoint, "cuda", threads), ""))
    else:
        plan.append((_Placeholder("pytorch-eager-cpu", "pytorch", "cpu"), no_ckpt))
        plan.append((_Placeholder("pytorch-eager-cuda", "pytorch", "cuda"), no_ckpt))
    for n in arrangements:
        plan.append((OrtRunner(model, "cpu", "fp32", threads, streams=n), ""))
    def missing(flags: str, precision: str) -> str:
        return f"no {flags} given, and no {md.variant_path(model, precision).name} beside --model"

    no_int8, no_fp16 = missing("--int8-model", "int8"), missing("--fp16-model", "fp16")
    for n in arrangements:
        plan.append(_optional(int8_model, no_int8, lambda p, n=n: OrtRunner(p, "cpu", "int8", threads, streams=n),
                              "ort-cpu-int8" + _streams_suffix(n), "onnxruntime", "cpu", "int8"))
    plan.append((OrtRunner(model, "cuda", "fp32", threads), ""))
    plan.append(_optional(fp16_model, no_fp16, lambda p: OrtRunner(p, "cuda", "fp16", threads), "ort-cuda-fp16", "onnxruntime", "cuda", "fp16"))
    plan.append((OrtRunner(model, "tensorrt", "fp32", threads, max_batch=max_batch), ""))
    plan.append((OrtRunner(model, "tensorrt", "fp16", threads, trt_fp16=True, max_batch=max_batch), ""))
    for hint, precision in ((None, "default"), ("f32", "f32")):
        plan += [(OpenVinoRunner(model, hint, precision, threads, streams=n), "") for n in arrangements]
    for n in arrangements:
        plan.append(_optional(ov_int8, missing("--int8-model or --openvino-int8-model", "int8"),
                              lambda p, n=n: OpenVinoRunner(p, None, "int8", threads, streams=n),
                              "openvino-cpu-int8" + _streams_suffix(n), "openvino", "cpu", "int8"))
    backends = []
    for runner, reason in plan:
        if only is not None and runner.name not in only and runner.name != EAGER:
            continue
        b = Backend(runner)
        if reason:
            b.status, b.reason = "skipped", reason
        backends.append(b)
    return backends


class _Placeholder(Runner):
    """A backend that cannot be built from the given options (always skipped)."""

    def __init__(self, name: str, backend: str, device: str, precision: str = "fp32") -> None:
        super().__init__(0)
        self.name, self.backend, self.device, self.precision = name, backend, device, precision

    def load(self) -> None:  # pragma: no cover - never loaded
        raise BackendUnavailable("placeholder")

    def infer(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise BackendUnavailable("placeholder")


def _optional(
    path: Path | None, missing: str, make, name: str, backend: str, device: str, precision: str
) -> tuple[Runner, str]:
    """``make(path)``, or a skipped placeholder whose reason is ``missing`` when there is no file."""
    if path is None:
        return _Placeholder(name, backend, device, precision), missing
    return make(path), ""


# -- measurement -------------------------------------------------------------------------------------
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


def make_inputs(session: Session, count: int, source: str, seed: int = 0) -> np.ndarray:
    """``count`` inputs for ``session``'s model: standard-normal (``random``), an image directory,
    or a dataset's test split (``auto``: the model's own dataset when it is on this machine)."""
    pre = session.preprocessing
    if source == "random":
        return np.random.default_rng(seed).standard_normal((count, *pre.input_shape), dtype=np.float32)
    from .export.quantize import load_calibration

    if source == "auto":  # the model's own dataset when it is on this machine, else random
        dataset = session.metadata.props.get(md.DATASET, "")
        try:
            images = load_calibration(dataset, pre, n=count, split="test").images if dataset else None
        except (StnDeployError, ImportError):
            images = None
        if images is None:
            return make_inputs(session, count, "random", seed)
    else:
        images = load_calibration(source, pre, n=count, split="test").images
    reps = -(-count // len(images))
    return np.ascontiguousarray(np.concatenate([images] * reps)[:count])


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

    A backend that fails to load, to run the largest batch, or later while timed is marked
    ``failed`` with the one-line reason and dropped; the others go on.
    """
    from tqdm import tqdm

    largest = np.ascontiguousarray(inputs[: max(batch_sizes)])
    outputs: dict[str, np.ndarray] = {}
    pending = [b for b in backends if b.status != "skipped"]
    bar = tqdm(total=len(pending) * (1 + len(batch_sizes)), desc="stn-bench", unit="step", disable=not progress,
               file=sys.stderr)
    for b in pending:
        bar.set_postfix_str(f"load {b.runner.name}")
        try:
            b.runner.load()
            outputs[b.runner.name] = b.runner.infer(largest)  # also proves the largest batch runs
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
    for r in results:
        base = eager.get(r["batch_size"])
        r["ratio_to_eager"] = r["throughput"] / base if base else None
    order = {b.runner.name: i for i, b in enumerate(backends)}
    results.sort(key=lambda r: (r["batch_size"], order[r["backend"]]))
    return results, {name: a for name, a in agreement.items() if name in alive}


def _fail(backend: Backend, exc: BaseException, live: list[Backend] | None = None) -> None:
    """Mark ``backend`` failed with the one-line reason and take it out of ``live``."""
    backend.status, backend.reason = "failed", one_line(exc, 200)
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


# -- output ------------------------------------------------------------------------------------------
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
    return {"cpu": cpu, "isa": isa, "logical_cpus": os.cpu_count(), "platform": platform.platform(), "threads": threads, "versions": versions}


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"stn-bench: {report['model']}  threads={report['threads']}  "
        + (f"streams=1 and {report['streams']}  " if report.get("streams", 1) > 1 else "")
        + f"inputs={report['inputs']}  "
        f"iterations={report['iterations']} (x{report['rounds']} rounds interleaved, {report.get('settle_ms', 0):g} ms settle, "
        f"{report.get('rewarm_ms', 0):g} ms re-warm)",
        f"machine: {report['machine']['cpu']} ({report['machine']['logical_cpus']} logical CPUs, "
        f"{'/'.join(report['machine']['isa']) or 'no AVX2'})",
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


def _pyplot():
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
    plt = _pyplot()
    from .fileio import atomic_path

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


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint="--batch-sizes") from None
    if not sizes or any(s < 1 for s in sizes):
        raise click.BadParameter(f"batch sizes must be positive, got {text!r}", param_hint="--batch-sizes")
    return list(dict.fromkeys(sizes))  # a repeated size would pool two passes into one row


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--model", "model", type=click.Path(path_type=Path), required=True, help="fp32 ONNX file from stn-export.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help="The checkpoint it came from (PyTorch eager rows).")
@click.option("--int8-model", type=click.Path(path_type=Path), default=None,
              help="int8 ONNX file (stn-export --quantize int8): ORT and OpenVINO int8 rows. Default: MODEL.int8.onnx "
                   "when it exists.")
@click.option("--openvino-int8-model", type=click.Path(path_type=Path), default=None,
              help="int8 ONNX file for the OpenVINO int8 row (default: --int8-model); stn-export --int8-config plain "
                   "writes the layout OpenVINO runs fastest.")
@click.option("--fp16-model", type=click.Path(path_type=Path), default=None,
              help="fp16 ONNX file (stn-export --precision fp16): ORT CUDA fp16 row. Default: MODEL.fp16.onnx when it "
                   "exists.")
@click.option("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)), show_default=True, help="Comma-separated batch sizes.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="Intra-op threads for every CPU backend.")
@click.option("--streams", type=click.IntRange(min=1), default=1, show_default=True,
              help="Also run each ONNX Runtime CPU and OpenVINO row with the batch cut into this many concurrent "
                   "streams of threads/streams threads (rows named <backend>-<N>streams): the same cores, arranged "
                   "for throughput.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed calls per backend and batch size.")
@click.option("--iterations", type=click.IntRange(min=1), default=30, show_default=True, help="Timed calls per backend and batch size.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True, help="Interleaved rounds the iterations are split over.")
@click.option("--settle-ms", type=click.FloatRange(min=0), default=DEFAULT_SETTLE_MS, show_default=True,
              help="Pause before each backend's turn in a round, so the previous runtime's spinning threads go idle.")
@click.option("--rewarm-ms", type=click.FloatRange(min=0), default=DEFAULT_REWARM_MS, show_default=True,
              help="Untimed calls after that pause, before the timed ones, so waking threads and cores are not timed.")
@click.option("--inputs", default="auto", show_default=True,
              help="auto (the model's dataset test split when available, else random), random, an image directory, or a dataset name.")
@click.option("--backends", "only", default=None, help="Comma-separated backend names to run (default: all; PyTorch eager CPU always runs when it can).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout instead of the table.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write throughput vs batch size to this PNG (needs matplotlib).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@report_errors
def main(
    model: Path, checkpoint: Path | None, int8_model: Path | None, openvino_int8_model: Path | None,
    fp16_model: Path | None, batch_sizes: str,
    threads: int, streams: int, warmup: int, iterations: int, rounds: int, settle_ms: float, rewarm_ms: float,
    inputs: str, only: str | None, as_json: bool,
    plot_path: Path | None, quiet: bool,
) -> None:
    """Benchmark MODEL on every available backend with the same input batches: PyTorch eager
    (with --checkpoint), ONNX Runtime per provider and precision, OpenVINO when installed.
    Reports p50/p90/p99 latency, throughput and the ratio to PyTorch eager per batch size;
    backends that cannot run here are listed as skipped with the reason.

    Exit status: 0 every backend ran or was skipped; 3 the run finished but a backend failed
    (its row says why); 2 bad arguments; 1 any other error (a missing or unusable --model or
    --checkpoint, no backend could run).

    \b
    Examples:
      stn-bench --model stn.onnx --checkpoint stn.pt
      stn-bench --model stn.onnx --checkpoint stn.pt --int8-model stn.int8.onnx --plot bench.png
      stn-bench --model stn.onnx --batch-sizes 1,256 --json > bench.json
      stn-bench --model stn.onnx --int8-model stn.int8.onnx --streams 2   # + throughput rows
    """
    sizes = _batch_sizes(batch_sizes)
    # The variants stn-export writes beside the fp32 file, unless other files are named.
    int8_model = int8_model or _beside(model, "int8")
    fp16_model = fp16_model or _beside(model, "fp16")
    for path, flag in ((model, "--model"), (checkpoint, "--checkpoint"), (int8_model, "--int8-model"),
                       (openvino_int8_model, "--openvino-int8-model"), (fp16_model, "--fp16-model")):
        if path is not None and not Path(path).is_file():
            raise ModelFileError(f"{path}: no such file ({flag})")
    if rounds > iterations:
        rounds = iterations
    if streams > threads:
        raise click.BadParameter(f"{streams} streams need at least {streams} threads (--threads {threads})",
                                 param_hint="--streams")
    if plot_path is not None:
        _pyplot()  # fail before the run, not after it
    wanted = {n.strip() for n in only.split(",") if n.strip()} if only else None
    backends = plan_backends(model, checkpoint, int8_model, fp16_model, threads, wanted, openvino_int8_model,
                             max_batch=max(sizes), streams=streams)
    if wanted:
        known = {b.runner.name for b in plan_backends(model, checkpoint, int8_model, fp16_model, threads,
                                                         streams=streams)}
        unknown = wanted - known
        if unknown:
            raise BenchOptionError(f"unknown backend(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")

    from .runtime import Session

    session = Session(model, provider="cpu", threads=1, warmup=0, record_placement=False)
    if checkpoint is not None:
        _check_checkpoint_fits(checkpoint, model, session)
    x = make_inputs(session, max(sizes), inputs)
    results, agreement = run_benchmark(backends, x, sizes, warmup=warmup, iterations=iterations, rounds=rounds,
                                       settle_ms=settle_ms, rewarm_ms=rewarm_ms, progress=not quiet)
    report = {
        "model": str(model),
        "threads": threads,
        "streams": streams,
        "batch_sizes": sizes,
        "warmup": warmup,
        "iterations": iterations,
        "rounds": rounds,
        "settle_ms": settle_ms,
        "rewarm_ms": rewarm_ms,
        "inputs": inputs,
        "machine": machine_info(threads),
        "backends": [b.to_dict() for b in backends],
        "results": results,
        "agreement": agreement,
    }
    click.echo(to_json(report) if as_json else format_table(report))
    if not any(b.status == "ok" for b in backends):
        raise BenchError("no backend could run")
    if plot_path is not None:
        plot(report, plot_path)
    if any(b.status == "failed" for b in backends):
        sys.exit(EXIT_SOME_FAILED)


def _beside(model: Path, precision: str) -> Path | None:
    path = md.variant_path(model, precision)
    if not path.is_file():
        return None
    click.echo(f"stn-bench: {precision} rows read {path} (found beside --model)", err=True)
    return path


def _check_checkpoint_fits(checkpoint: Path, model: Path, session: Session) -> None:
    """The PyTorch eager rows are the baseline: a checkpoint that cannot load, or that takes other
    inputs than ``model``, is an error before the run, not a failed row after it."""
    from .checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    if tuple(ckpt.preprocessing.input_shape) != tuple(session.preprocessing.input_shape):
        raise BenchError(
            f"{checkpoint}: takes {list(ckpt.preprocessing.input_shape)} inputs, {model} takes "
            f"{list(session.preprocessing.input_shape)}; pass the checkpoint the model was exported from"
        )


if __name__ == "__main__":  # pragma: no cover
    main()
