"""One runner class per backend behind one interface (Polygraphy's habit)::

    runner = OrtRunner("stn.onnx", provider="cpu", threads=2)
    runner.load()                      # may raise BackendUnavailable: listed as skipped, with why
    log_probs = runner.infer(batch)    # [N, C, H, W] float32 -> [N, classes]

A runner is built from whatever the user gave (a file may be missing) and decides in ``load()``
whether it can run here; its ``BackendUnavailable`` message is the reason the table shows.
:func:`plan_runners` lists every backend stn-bench knows for a set of files.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from stn_deploy import metadata as md
from stn_deploy.errors import ProviderError
from stn_deploy.runtime import CPU, PROVIDER_NAMES, ProviderConfig, Session, available_providers, try_read_graph_info

EAGER = "pytorch-eager-cpu"
EAGER_CUDA = "pytorch-eager-cuda"


class BackendUnavailable(Exception):
    """This backend cannot run here; the message says why (shown as 'skipped')."""


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

    def close(self) -> None:  # noqa: B027 - most runners hold nothing to release; the ones that do override it
        """Release what ``load`` took (sessions, threads)."""

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backend": self.backend,
            "device": self.device,
            "precision": self.precision,
            **self.info,
        }


def _missing(path: Path | None, flag: str) -> None:
    if path is None:
        raise BackendUnavailable(f"no {flag} given")


class TorchRunner(Runner):
    """PyTorch eager from the checkpoint (``torch.inference_mode``)."""

    backend = "pytorch"

    def __init__(self, checkpoint: Path | None, device: str, threads: int) -> None:
        super().__init__(threads)
        self.checkpoint, self.device = checkpoint, device
        self.name = f"pytorch-eager-{device}"

    def load(self) -> None:
        _missing(self.checkpoint, "--checkpoint (PyTorch eager runs from the checkpoint)")
        try:
            import torch  # heavy and optional on a deployment host: only the eager rows need it
        except ImportError as exc:
            raise BackendUnavailable(f"torch not importable ({exc})") from None
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("torch.cuda.is_available() is False (no CUDA device or CUDA build)")
        from stn_deploy.train.checkpoint import load_checkpoint  # torch-side: with torch only

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
    """ONNX Runtime through :class:`stn_deploy.runtime.Session` on one provider.

    The row's precision is read from the file's graph (int8 operators, fp16 weights), not from
    the flag that named it.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        model: Path | None,
        provider: str,
        precision: str,
        threads: int,
        *,
        trt_fp16: bool = False,
        max_batch: int = 256,
        streams: int | str = "auto",
        missing: str = "--model",
        cuda_tf32: bool = False,
        device_check: bool = True,
    ) -> None:
        super().__init__(threads)
        self.model, self.provider, self.trt_fp16 = model, provider, trt_fp16
        # TensorRT's fp16 row runs an fp32 file with fp16 kernels allowed; every other row is what its file is.
        self.precision = "fp16" if trt_fp16 else (_file_precision(model) or precision)
        self.max_batch = max_batch  # TensorRT's optimization profile must cover the largest batch
        self.streams = streams
        self.missing = missing
        self.device = "cpu" if provider == "cpu" else "cuda"
        self.cuda_tf32 = cuda_tf32  # the fp32 file with TF32 math (ProviderConfig.cuda_tf32): speed vs exactness
        self.device_check = device_check  # GPU rows: the warm-up batch checked against the CPU provider
        self.name = f"ort-{provider}-{'tf32' if cuda_tf32 else self.precision}" + (
            streams_suffix(streams) if isinstance(streams, int) else ""
        )

    def load(self) -> None:
        _missing(self.model, self.missing)
        wanted = PROVIDER_NAMES[self.provider]
        if wanted not in available_providers():
            raise BackendUnavailable(f"onnxruntime build has no {wanted} (install stn-deploy[gpu] on a CUDA machine)")
        config = ProviderConfig(
            trt_fp16=self.trt_fp16,
            cuda_tf32=self.cuda_tf32,
            trt_max_batch=self.max_batch if self.provider == "tensorrt" else None,
        )
        try:
            self.session = Session(
                self.model,
                provider=self.provider,
                provider_config=config,
                threads=self.threads,
                record_placement=self.provider != "cpu",
                warmup=1,
                streams=self.streams,
                device_check=self.device_check,
            )
        except ProviderError as exc:
            raise BackendUnavailable(str(exc)) from None
        self.info = {
            "model": str(self.model),
            "providers": self.session.providers,
            "streams": self.streams,
            "io_binding": self.session.io_binding,
        }
        if self.provider != "cpu":
            self.info["nodes_on_cpu"] = len(self.session.placement().cpu_fallback)
            if self.session.device_check is not None:
                self.info["device_check"] = self.session.device_check.to_dict()
        elif self.session.provider != CPU:  # pragma: no cover
            raise BackendUnavailable(f"session runs on {self.session.provider}")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(batch, [md.LOG_PROBS])[md.LOG_PROBS]

    def streams_for(self, batch_size: int) -> int:
        """The streams a batch of ``batch_size`` ran on (what ``auto`` chose)."""
        return self.session.streams_for(batch_size)

    def close(self) -> None:
        if getattr(self, "session", None) is not None:
            self.session.close()


class OpenVinoRunner(Runner):
    """OpenVINO on the CPU, reading the ONNX file directly.

    ``hint`` None keeps OpenVINO's default ``INFERENCE_PRECISION_HINT`` for this CPU (bf16 or
    f16 where the CPU has them, f32 otherwise); ``"f32"`` forces f32. An int8 QDQ model from
    stn-export is read as FakeQuantize and run by OpenVINO's low-precision transformations.
    """

    backend = "openvino"

    def __init__(
        self,
        model: Path | None,
        hint: str | None,
        precision: str,
        threads: int,
        *,
        streams: int = 1,
        missing: str = "--model",
    ) -> None:
        super().__init__(threads)
        self.model, self.hint, self.precision, self.streams, self.missing = model, hint, precision, streams, missing
        self.name = f"openvino-cpu-{precision}" + streams_suffix(streams)

    def load(self) -> None:
        _missing(self.model, self.missing)
        try:
            import openvino as ov  # optional backend: pip install 'stn-deploy[openvino]'
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
            if rt["layerType"].astype(str) in ("Convolution", "FullyConnected") and rt["runtimePrecision"].astype(
                str
            ) in ("u8", "i8"):
                low += 1
        self.info = {
            "model": str(self.model),
            "openvino": ov.__version__,
            "inference_precision": str(compiled.get_property("INFERENCE_PRECISION_HINT")),
            "int8_conv_fc_layers": low,
            "streams": self.streams,
        }

    def infer(self, batch: np.ndarray) -> np.ndarray:
        slices = np.array_split(batch, min(self.streams, len(batch)))
        for request, part in zip(self.requests, slices):
            request.start_async({0: part})
        for request in self.requests[: len(slices)]:
            request.wait()
        return np.concatenate([np.array(r.get_output_tensor(0).data) for r in self.requests[: len(slices)]])


def streams_suffix(streams: int) -> str:
    """Row names of the throughput arrangement: ``ort-cpu-int8-2streams``."""
    return f"-{streams}streams" if streams > 1 else ""


def _file_precision(path: Path | None) -> str | None:
    """``fp32`` / ``fp16`` / ``int8`` from the file's graph; None when there is no readable file."""
    graph = try_read_graph_info(path) if path is not None else None
    return graph.precision if graph is not None else None  # load() reports an unreadable file


def plan_runners(
    model: Path,
    checkpoint: Path | None,
    int8_model: Path | None,
    fp16_model: Path | None,
    threads: int,
    *,
    openvino_int8_model: Path | None = None,
    max_batch: int = 256,
    streams: int | str = "auto",
    device_check: bool = True,
) -> list[Runner]:
    """Every backend stn-bench knows, in table order; each decides in ``load()`` if it can run.

    The OpenVINO int8 row reads ``openvino_int8_model`` when given (e.g. ``stn-export
    --int8-config plain``, the layout OpenVINO runs fastest), else ``int8_model``. ``max_batch``
    is the largest batch size that will be run (TensorRT builds its profile for it). With
    ``streams="auto"`` the ONNX Runtime CPU rows choose per batch size, as ``Session`` does; with a
    number > 1 each ONNX Runtime CPU and OpenVINO row gets a twin that cuts the batch into that
    many concurrent streams of ``threads // streams`` threads (the same cores). ``device_check``:
    each GPU row's session checks its warm-up batch against the CPU provider (``Session``).
    """
    ort_arrangements: list[int | str] = ["auto"] if streams == "auto" else ([1, streams] if streams > 1 else [1])
    arrangements = [1, streams] if isinstance(streams, int) and streams > 1 else [1]
    ov_int8 = openvino_int8_model or int8_model

    def missing(flags: str, precision: str) -> str:
        return f"{flags}, and no {md.variant_path(model, precision).name} beside --model"

    no_int8, no_fp16 = missing("--int8-model", "int8"), missing("--fp16-model", "fp16")
    runners: list[Runner] = [TorchRunner(checkpoint, "cpu", threads), TorchRunner(checkpoint, "cuda", threads)]
    runners += [OrtRunner(model, "cpu", "fp32", threads, streams=n) for n in ort_arrangements]
    runners += [OrtRunner(int8_model, "cpu", "int8", threads, streams=n, missing=no_int8) for n in ort_arrangements]
    gpu = {"device_check": device_check}
    runners.append(OrtRunner(model, "cuda", "fp32", threads, **gpu))
    runners.append(OrtRunner(model, "cuda", "fp32", threads, cuda_tf32=True, **gpu))
    runners.append(OrtRunner(fp16_model, "cuda", "fp16", threads, missing=no_fp16, **gpu))
    runners.append(OrtRunner(model, "tensorrt", "fp32", threads, max_batch=max_batch, **gpu))
    runners.append(OrtRunner(model, "tensorrt", "fp16", threads, trt_fp16=True, max_batch=max_batch, **gpu))
    for hint, precision in ((None, "default"), ("f32", "f32")):
        runners += [OpenVinoRunner(model, hint, precision, threads, streams=n) for n in arrangements]
    no_ov_int8 = missing("--int8-model or --openvino-int8-model", "int8")
    runners += [OpenVinoRunner(ov_int8, None, "int8", threads, streams=n, missing=no_ov_int8) for n in arrangements]
    return runners
