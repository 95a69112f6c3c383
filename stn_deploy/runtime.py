"""The ONNX Runtime session wrapper a deployment imports: numpy, onnxruntime and pillow only.

:class:`Session` is built from an ONNX file written by ``stn-export``. The file's metadata says
how to preprocess images and what the classes are called; the wrapper picks the execution
provider, applies its options, runs batches (a partial last batch included), and reports where
ONNX Runtime placed every node::

    session = Session("model.onnx", provider="auto", threads=2)
    for out in session.predict(images, batch_size=64):
        out["log_probs"]            # [n, classes]
    print(session.placement().summary())

Provider choice. ``auto`` takes the best provider this onnxruntime build offers, in the order
TensorRT, CUDA, CPU; an explicitly requested provider that the build lacks, or that fails to
initialise, is a :class:`~stn_deploy.errors.ProviderError` that says why. The list of available
providers comes from :func:`available_providers`, which tests monkeypatch to exercise GPU
selection on a CPU-only machine.

Placement. ONNX Runtime assigns each node of the optimized graph to one provider; a GPU run with
nodes left on the CPU pays a copy each way. The first (warm-up) run executes with ONNX Runtime's
profiler on: every kernel event in its trace carries ``args.provider``, ``args.op_name`` and the
output types, and the profiler switches itself off after :meth:`~onnxruntime.InferenceSession.end_profiling`,
so later runs pay nothing. This works on every provider and every onnxruntime version
stn-deploy supports (CPU included, where every node is on ``CPUExecutionProvider``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from . import metadata as md
from .errors import ModelFileError, ProviderError
from .metadata import ModelMetadata
from .preprocessing import Preprocessing

PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
PROVIDER_NAMES = {"cpu": CPU, "cuda": CUDA, "tensorrt": TENSORRT}
GPU_PROVIDERS = (TENSORRT, CUDA)
# auto: the first of these that the build offers.
AUTO_ORDER = (TENSORRT, CUDA, CPU)
# Images per run call when a batch is shared out over streams. On the project's 2-core machine,
# int8, 256 images on one thread took 38.8 ms in chunks of 16 against 39.9 in chunks of 128
# (their activations stay in the core's cache), and 2 streams taking chunks of 16 in turn ran
# a batch of 256 in 20.2 ms p50 against 21.0 for two fixed halves (benchmarks/INT8.md).
STREAM_CHUNK = 16

GRAPH_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
CUDA_CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")

# Why a GPU provider may be missing from this build, for the error message.
_INSTALL_HINT = {
    CUDA: "install stn-deploy[gpu] (onnxruntime-gpu) on a machine with CUDA and cuDNN",
    TENSORRT: "install stn-deploy[gpu] (onnxruntime-gpu) with the TensorRT libraries on the library path",
}


def available_providers() -> list[str]:
    """The execution providers this onnxruntime build offers (monkeypatched by tests)."""
    return list(ort.get_available_providers())


def _display(name: str) -> str:
    return name.removesuffix("ExecutionProvider")


# -- provider selection -------------------------------------------------------------------------
@dataclass(frozen=True)
class ProviderConfig:
    """Options for the GPU providers; each maps onto ONNX Runtime's provider-options keys."""

    device_id: int = 0
    trt_fp16: bool = False
    trt_engine_cache: str | os.PathLike[str] | None = None
    # TensorRT optimization profile for the batch axis: build one engine for 1..trt_max_batch
    # instead of rebuilding when a partial last batch arrives.
    trt_max_batch: int | None = None
    cuda_conv_algo_search: str | None = None

    def tensorrt_options(self, input_name: str | None = None, input_shape: Sequence[int] | None = None) -> dict[str, Any]:
        opts: dict[str, Any] = {"device_id": self.device_id, "trt_fp16_enable": bool(self.trt_fp16)}
        if self.trt_engine_cache is not None:
            cache = Path(self.trt_engine_cache)
            opts["trt_engine_cache_enable"] = True
            opts["trt_engine_cache_path"] = str(cache)
            # The timing cache makes rebuilding an engine for a new shape much faster.
            opts["trt_timing_cache_enable"] = True
            opts["trt_timing_cache_path"] = str(cache)
        if self.trt_max_batch and input_name and input_shape:
            dims = "x".join(str(int(d)) for d in input_shape)
            opts["trt_profile_min_shapes"] = f"{input_name}:1x{dims}"
            opts["trt_profile_opt_shapes"] = f"{input_name}:{int(self.trt_max_batch)}x{dims}"
            opts["trt_profile_max_shapes"] = f"{input_name}:{int(self.trt_max_batch)}x{dims}"
        return opts

    def cuda_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"device_id": self.device_id}
        if self.cuda_conv_algo_search is not None:
            algo = self.cuda_conv_algo_search.upper()
            if algo not in CUDA_CONV_ALGO_SEARCH:
                raise ProviderError(
                    f"cuda_conv_algo_search must be one of {', '.join(CUDA_CONV_ALGO_SEARCH)}, got {self.cuda_conv_algo_search!r}"
                )
            opts["cudnn_conv_algo_search"] = algo
        return opts


def resolve_providers(
    provider: str,
    config: ProviderConfig | None = None,
    *,
    available: Sequence[str] | None = None,
    input_name: str | None = None,
    input_shape: Sequence[int] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """The ``(name, options)`` list to hand ONNX Runtime, in order of preference.

    ``auto`` → TensorRT, CUDA, CPU, keeping those the build offers (TensorRT falls back to CUDA
    for nodes it cannot take, CUDA to CPU). An explicit provider the build lacks raises
    :class:`ProviderError` naming what is missing and how to get it.
    """
    config = config or ProviderConfig()
    available = list(available_providers() if available is None else available)
    key = provider.lower()
    if key not in PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r} (choose from {', '.join(PROVIDERS)})")
    if key == "auto":
        chain = [name for name in AUTO_ORDER if name in available] or [CPU]
    else:
        wanted = PROVIDER_NAMES[key]
        if wanted not in available:
            hint = _INSTALL_HINT.get(wanted, "")
            have = ", ".join(_display(p) for p in available) or "none"
            raise ProviderError(
                f"provider {key!r}: this onnxruntime build ({ort.__version__}) has no {wanted} "
                f"(it offers {have})" + (f"; {hint}" if hint else "")
            )
        chain = {TENSORRT: [TENSORRT, CUDA, CPU], CUDA: [CUDA, CPU], CPU: [CPU]}[wanted]
        chain = [name for name in chain if name == wanted or name in available or name == CPU]
    out: list[tuple[str, dict[str, Any]]] = []
    for name in chain:
        if name == TENSORRT:
            out.append((name, config.tensorrt_options(input_name, input_shape)))
        elif name == CUDA:
            out.append((name, config.cuda_options()))
        else:
            out.append((name, {}))
    return out


# -- placement -----------------------------------------------------------------------------------
# Node events whose outputs are all integer shape tensors: ONNX Runtime deliberately keeps these
# small shape computations on the CPU under GPU providers; they are reported, not failed on.
_INT_TYPES = {"int64", "int32"}


@dataclass
class NodePlacement:
    name: str
    op_type: str
    provider: str
    output_types: tuple[str, ...] = ()

    @property
    def shape_only(self) -> bool:
        """True for a node that only computes integer shape tensors."""
        return bool(self.output_types) and all(t in _INT_TYPES for t in self.output_types)


@dataclass
class PlacementReport:
    """Which node of the optimized graph ran on which execution provider."""

    providers: list[str]
    nodes: list[NodePlacement] = field(default_factory=list)
    method: str = "onnxruntime profiler (args.provider of each kernel event)"

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(n.provider for n in self.nodes))

    @property
    def gpu(self) -> bool:
        return any(p in GPU_PROVIDERS for p in self.providers)

    @property
    def cpu_nodes(self) -> list[NodePlacement]:
        return [n for n in self.nodes if n.provider == CPU]

    @property
    def cpu_fallback(self) -> list[NodePlacement]:
        """Tensor-computing nodes left on the CPU in a GPU run (each one costs copies each way)."""
        if not self.gpu:
            return []
        return [n for n in self.cpu_nodes if not n.shape_only]

    @property
    def copies(self) -> int:
        """Host/device copy nodes ONNX Runtime inserted (MemcpyToHost / MemcpyFromHost)."""
        return sum(1 for n in self.nodes if n.op_type.startswith("Memcpy"))

    def summary(self) -> str:
        parts = ", ".join(f"{_display(p)}: {c}" for p, c in sorted(self.counts.items(), key=lambda kv: -kv[1]))
        line = f"{len(self.nodes)} nodes ({parts})"
        if self.gpu:
            fb = self.cpu_fallback
            if fb:
                ops = ", ".join(sorted({n.op_type for n in fb}))
                line += f"; {len(fb)} compute node(s) fell back to CPU: {ops}"
            if self.copies:
                line += f"; {self.copies} host/device copies"
        return line

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "providers": list(self.providers),
            "counts": self.counts,
            "cpu_fallback": [{"name": n.name, "op_type": n.op_type} for n in self.cpu_fallback],
            "copies": self.copies,
            "nodes": [{"name": n.name, "op_type": n.op_type, "provider": n.provider} for n in self.nodes],
        }


def parse_profile(events: list[dict[str, Any]], providers: Sequence[str]) -> PlacementReport:
    """A placement report from an ONNX Runtime profiler trace (the JSON ``end_profiling`` writes)."""
    seen: dict[str, NodePlacement] = {}
    for ev in events:
        args = ev.get("args") or {}
        if ev.get("cat") != "Node" or "provider" not in args:
            continue
        name = str(ev.get("name", "")).removesuffix("_kernel_time").removesuffix("_fence_before").removesuffix("_fence_after")
        if name in seen:
            continue
        types = tuple(next(iter(o)) for o in args.get("output_type_shape", []) if isinstance(o, dict) and o)
        seen[name] = NodePlacement(name=name, op_type=str(args.get("op_name", "?")), provider=str(args["provider"]), output_types=types)
    return PlacementReport(providers=list(providers), nodes=list(seen.values()))


# -- the session ---------------------------------------------------------------------------------
class Session:
    """An ONNX Runtime session for an stn-deploy model: preprocessing, classes, providers, batches.

    Args:
        model_path: the ``.onnx`` file ``stn-export`` wrote.
        provider: ``auto`` | ``cpu`` | ``cuda`` | ``tensorrt``.
        device_id: GPU ordinal for CUDA and TensorRT.
        threads: ONNX Runtime intra-op threads (None: ONNX Runtime's default, one per core).
        graph_optimization: ``disable`` | ``basic`` | ``extended`` | ``all``.
        trt_fp16, trt_engine_cache, trt_max_batch: TensorRT options (fp16 kernels; engine and
            timing cache directory; batch-axis optimization profile 1..trt_max_batch).
        cuda_conv_algo_search: ``EXHAUSTIVE`` | ``HEURISTIC`` | ``DEFAULT`` (cuDNN).
        io_binding: bind the input to the device and outputs to host memory (default: on for
            GPU providers, off on CPU, where a plain ``run`` is already zero-copy).
        warmup: warm-up runs at construction; with record_placement at least one, which also
            records the placement.
        warmup_batch: batch size of the warm-up input.
        spin: let ONNX Runtime's idle intra-op threads spin-wait. On a machine whose cores are
            shared with image decoding, spinning threads steal the decoder's time; ``False``
            makes them sleep (see benchmarks/infer_throughput.py for the numbers).
        streams: CPU only. Run each batch on this many concurrent threads, each with
            ``threads // streams`` intra-op threads (OpenVINO calls these streams), which take
            chunks of ``STREAM_CHUNK`` images in turn until the batch is done. Parts of the
            graph do not scale with intra-op threads (GridSample builds each image's sampling
            plan on one thread; max-pool, concat and small transposes barely scale), and
            concurrent chunks run those parts in parallel too. On the project's 2-core machine,
            2 streams of 1 thread ran int8 batches of 256 about 28% faster than 1 stream of 2
            threads. A batch of 1 cannot be cut and runs on one stream's threads, so
            latency-bound use keeps the default of 1 (benchmarks/INT8.md).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        provider: str = "auto",
        *,
        device_id: int = 0,
        threads: int | None = None,
        graph_optimization: str = "all",
        trt_fp16: bool = False,
        trt_engine_cache: str | os.PathLike[str] | None = None,
        trt_max_batch: int | None = None,
        cuda_conv_algo_search: str | None = None,
        io_binding: bool | None = None,
        warmup: int = 1,
        warmup_batch: int = 1,
        spin: bool | None = None,
        record_placement: bool = True,
        streams: int = 1,
    ) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ModelFileError(f"{self.model_path}: no such model file")
        if threads is not None and threads < 0:
            raise ProviderError(f"threads must be >= 0 (0: onnxruntime's default), got {threads}")
        if streams < 1:
            raise ProviderError(f"streams must be >= 1, got {streams}")
        if streams > 1 and threads and threads < streams:
            raise ProviderError(f"{streams} streams need at least {streams} threads, got {threads}")
        if graph_optimization not in GRAPH_OPTIMIZATION:
            raise ProviderError(
                f"graph_optimization must be one of {', '.join(GRAPH_OPTIMIZATION)}, got {graph_optimization!r}"
            )
        self.requested_provider = provider
        self.threads = threads
        self.streams = streams
        self._stream_pool: ThreadPoolExecutor | None = None
        self.provider_config = ProviderConfig(
            device_id=device_id,
            trt_fp16=trt_fp16,
            trt_engine_cache=trt_engine_cache,
            trt_max_batch=trt_max_batch,
            cuda_conv_algo_search=cuda_conv_algo_search,
        )

        options = ort.SessionOptions()
        options.graph_optimization_level = GRAPH_OPTIMIZATION[graph_optimization]
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if streams > 1:
            options.intra_op_num_threads = max(1, (threads or os.cpu_count() or 1) // streams)
        elif threads:
            options.intra_op_num_threads = int(threads)
        if spin is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        options.log_severity_level = 3  # errors only; placement is reported by us, not the log
        self._profile_dir: str | None = None
        if record_placement:
            self._profile_dir = tempfile.mkdtemp(prefix="stn-placement-")
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(self._profile_dir, "profile")
        self.session_options = options
        try:
            self._init_session(provider, trt_max_batch, io_binding)
            self._placement: PlacementReport | None = None
            self._record_placement = record_placement
            self.warmup(max(1, warmup) if record_placement else warmup, batch=warmup_batch)
        finally:
            self._remove_profile_dir()

    def _init_session(self, provider: str, trt_max_batch: int | None, io_binding: bool | None) -> None:
        # The input's name and shape come from the file before any provider is chosen, so the
        # TensorRT optimization profile can name them.
        chain = resolve_providers(provider, self.provider_config)
        if trt_max_batch and any(name == TENSORRT for name, _ in chain):
            bare = ort.SessionOptions()
            bare.graph_optimization_level = GRAPH_OPTIMIZATION["disable"]
            first = self._create(bare, [(CPU, {})]).get_inputs()[0]
            chain = resolve_providers(
                provider, self.provider_config, input_name=first.name, input_shape=first.shape[1:]
            )
        while True:
            try:
                self._session = self._create(self.session_options, chain)
                break
            except ProviderError as exc:  # a GPU provider that could not start (engine build, options)
                if self.requested_provider.lower() != "auto" or len(chain) == 1:
                    raise
                warnings.warn(f"{exc}; auto: trying {_display(chain[1][0])}", RuntimeWarning, stacklevel=3)
                chain = chain[1:]
        self.provider_chain = chain
        self.providers: list[str] = list(self._session.get_providers())
        self._check_providers_took(chain)

        try:
            self.metadata = ModelMetadata.from_props(
                dict(self._session.get_modelmeta().custom_metadata_map), source=str(self.model_path)
            )
        except ValueError as exc:
            raise ModelFileError(str(exc)) from None
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ModelFileError(f"{self.model_path}: expected one image input, found {len(inputs)}")
        self.input_name: str = inputs[0].name
        self.output_names: list[str] = [o.name for o in self._session.get_outputs()]
        if md.LOG_PROBS not in self.output_names:
            raise ModelFileError(f"{self.model_path}: no '{md.LOG_PROBS}' output (outputs: {', '.join(self.output_names)})")
        classes = self._session.get_outputs()[self.output_names.index(md.LOG_PROBS)].shape[-1]
        if isinstance(classes, int) and classes != len(self.class_names):
            raise ModelFileError(
                f"{self.model_path}: '{md.LOG_PROBS}' has {classes} classes but the metadata names {len(self.class_names)}"
            )
        want = tuple(self.preprocessing.input_shape)
        got = tuple(inputs[0].shape[1:])
        if all(isinstance(d, int) for d in got) and got != want:
            raise ModelFileError(
                f"{self.model_path}: input shape {list(got)} disagrees with the preprocessing metadata {list(want)}"
            )

        self.device = "cuda" if self.providers and self.providers[0] in GPU_PROVIDERS else "cpu"
        self.io_binding = (self.device == "cuda") if io_binding is None else bool(io_binding)
        if self.streams > 1 and self.device != "cpu":
            raise ProviderError(f"{self.model_path}: streams apply to the CPU provider; {_display(self.provider)} runs one")

    def _remove_profile_dir(self) -> None:
        if self._profile_dir is not None:
            shutil.rmtree(self._profile_dir, ignore_errors=True)
            self._profile_dir = None

    # -- construction helpers -----------------------------------------------------------------
    def _create(self, options: ort.SessionOptions, chain: list[tuple[str, dict[str, Any]]]) -> ort.InferenceSession:
        names = [n for n, _ in chain]
        opts = [o for _, o in chain]
        try:
            # enable_fallback=0: ONNX Runtime's own fallback prints to stdout (where stn-infer may be
            # writing rows) and retries on other providers without their options; a failure here is
            # ours to report, and "auto" tries the next provider itself (_init_session).
            return ort.InferenceSession(
                str(self.model_path), sess_options=options, providers=names, provider_options=opts, enable_fallback=0
            )
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
            msg = " ".join(str(exc).split())
            about = msg.replace(str(self.model_path), "").lower()  # not the file's name: stn.cuda.onnx is one
            if any(n in GPU_PROVIDERS for n in names) and ("provider" in about or "cuda" in about):
                raise ProviderError(f"{self.model_path}: {_display(names[0])} failed to start: {msg[:300]}") from None
            raise ModelFileError(f"{self.model_path}: onnxruntime cannot load it ({type(exc).__name__}: {msg[:300]})") from None

    def _check_providers_took(self, chain: list[tuple[str, dict[str, Any]]]) -> None:
        """A requested GPU provider that ONNX Runtime silently dropped (missing CUDA/cuDNN libraries)."""
        wanted = chain[0][0]
        if wanted in self.providers:
            return
        reason = (
            f"{_display(wanted)} is in this onnxruntime build but failed to initialise "
            f"(its CUDA/cuDNN/TensorRT libraries are missing or do not match); session runs on {', '.join(map(_display, self.providers))}"
        )
        if self.requested_provider.lower() == "auto":
            warnings.warn(f"{self.model_path}: {reason}", RuntimeWarning, stacklevel=4)
        else:
            raise ProviderError(f"{self.model_path}: {reason}")

    # -- what the model is ----------------------------------------------------------------------
    @property
    def preprocessing(self) -> Preprocessing:
        return self.metadata.preprocessing

    @property
    def class_names(self) -> list[str]:
        return self.metadata.class_names

    @property
    def provider(self) -> str:
        """The provider that runs the model's nodes first (``CPUExecutionProvider`` on CPU)."""
        return self.providers[0]

    @property
    def has_theta(self) -> bool:
        return md.THETA in self.output_names

    @property
    def has_warped(self) -> bool:
        return md.WARPED in self.output_names

    def describe(self) -> dict[str, Any]:
        return {
            "model": str(self.model_path),
            "requested_provider": self.requested_provider,
            "providers": list(self.providers),
            "provider_options": {n: o for n, o in self.provider_chain},
            "threads": self.threads,
            "streams": self.streams,
            "io_binding": self.io_binding,
            "input": self.input_name,
            "outputs": list(self.output_names),
            "input_shape": list(self.preprocessing.input_shape),
            "classes": len(self.class_names),
        }

    # -- running --------------------------------------------------------------------------------
    def run(self, batch: np.ndarray, output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """One batch [N, C, H, W] float32 → ``{output name: array}`` (host memory)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        names = list(output_names or self.output_names)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != tuple(self.preprocessing.input_shape):
            raise ValueError(f"expected a [N, {', '.join(map(str, self.preprocessing.input_shape))}] batch, got {list(batch.shape)}")
        if self.streams > 1 and len(batch) > 1:
            return self._run_streams(batch, names)
        if self.io_binding:
            binding = self._session.io_binding()
            if self.device == "cuda":
                value = ort.OrtValue.ortvalue_from_numpy(batch, "cuda", self.provider_config.device_id)
                binding.bind_ortvalue_input(self.input_name, value)
            else:
                binding.bind_cpu_input(self.input_name, batch)
            for name in names:
                binding.bind_output(name, "cpu")
            self._session.run_with_iobinding(binding)
            values = binding.copy_outputs_to_cpu()
        else:
            values = self._session.run(names, {self.input_name: batch})
        return dict(zip(names, values))

    def _run_streams(self, batch: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        """The batch cut into chunks of about ``STREAM_CHUNK`` images (at least one per stream),
        which the ``streams`` threads take in turn until none is left (ONNX Runtime's ``run`` is
        thread-safe and releases the GIL); the calling thread is one of them. A thread on a core
        that runs slower takes fewer chunks instead of holding up a fixed half."""
        if self._stream_pool is None:
            self._stream_pool = ThreadPoolExecutor(self.streams - 1, thread_name_prefix="stn-stream")
        count = max(min(self.streams, len(batch)), -(-len(batch) // STREAM_CHUNK))
        chunks = np.array_split(batch, count)
        parts: list[Any] = [None] * count
        todo = deque(range(count))  # popleft is atomic: each chunk is taken by one thread

        def work() -> None:
            while True:
                try:
                    i = todo.popleft()
                except IndexError:
                    return
                parts[i] = self._session.run(names, {self.input_name: chunks[i]})

        helpers = [self._stream_pool.submit(work) for _ in range(min(self.streams, count) - 1)]
        try:
            work()
        finally:
            wait(helpers)  # never leave a helper running into the next call
        for helper in helpers:
            helper.result()  # re-raises a helper's error
        return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(names)}

    def predict(
        self, images: np.ndarray, batch_size: int = 64, output_names: Sequence[str] | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Run ``images`` [N, C, H, W] in batches of ``batch_size``; the last batch may be partial."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(images), batch_size):
            yield self.run(images[start : start + batch_size], output_names)

    def warmup(self, runs: int = 1, *, batch: int = 1) -> float:
        """Run a zero batch ``runs`` times; returns the seconds taken. Records the placement first."""
        if runs <= 0:
            return 0.0
        x = np.zeros((batch, *self.preprocessing.input_shape), dtype=np.float32)
        start = time.perf_counter()
        for _ in range(runs):
            self.run(x)
            self._finish_profiling()
        return time.perf_counter() - start

    def _finish_profiling(self) -> None:
        if self._placement is not None or not self._record_placement:
            return
        path = self._session.end_profiling()  # also switches the profiler off for later runs
        try:
            events = json.loads(Path(path).read_text()) if path else []
        finally:
            if path:
                Path(path).unlink(missing_ok=True)
            self._remove_profile_dir()
        self._placement = parse_profile(events, self.providers)

    def placement(self) -> PlacementReport:
        """Which node ran on which provider (recorded by the first warm-up run)."""
        if self._placement is None:
            if not self._record_placement:
                raise ProviderError(f"{self.model_path}: session built with record_placement=False")
            self.warmup(1)
        assert self._placement is not None
        return self._placement

    def check_placement(self, strict: bool = False, warn: Callable[[str], None] | None = None) -> PlacementReport:
        """Warn (or, with ``strict``, raise :class:`ProviderError`) when a GPU run left compute on the CPU."""
        report = self.placement()
        fallback = report.cpu_fallback
        if fallback:
            ops = ", ".join(sorted({n.op_type for n in fallback}))
            msg = (
                f"{self.model_path}: {len(fallback)} of {len(report.nodes)} nodes run on the CPU under "
                f"{_display(self.provider)} ({ops}); each costs a host/device copy"
            )
            if strict:
                raise ProviderError(msg + " (--strict-placement)")
            (warn or (lambda m: warnings.warn(m, RuntimeWarning, stacklevel=2)))(msg)
        return report

    def __repr__(self) -> str:
        return f"Session({str(self.model_path)!r}, providers={self.providers})"
