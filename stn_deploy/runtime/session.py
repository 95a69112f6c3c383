"""The ONNX Runtime session wrapper a deployment imports: numpy, onnxruntime and pillow only.

:class:`Session` is built from an ONNX file written by ``stn-export``. The file's metadata says
how to preprocess images and what the classes are called; the wrapper picks the execution
provider (:mod:`.providers`), applies its options, guards the GPU paths (:mod:`.guards`), runs
batches (a partial last batch included, optionally cut over concurrent streams), and reports
where ONNX Runtime placed every node (:mod:`.placement`)::

    with Session("model.onnx", provider="auto", threads=2) as session:
        for out in session.predict(images, batch_size=64):
            out["log_probs"]            # [n, classes]
        print(session.placement().summary())
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from stn_deploy import metadata as md
from stn_deploy.errors import ModelFileError, ProviderError
from stn_deploy.fileio import input_file_problem
from stn_deploy.metadata import ModelMetadata
from stn_deploy.preprocessing import Preprocessing

from .factory import GRAPH_OPTIMIZATION, create_session, session_options
from .graph_info import GraphInfo, try_read_graph_info
from .guards import DeviceCheck, compare_devices, tensorrt_excluded_ops
from .placement import PlacementReport, parse_profile
from .providers import GPU_PROVIDERS, TENSORRT, ProviderChain, ProviderConfig, display, resolve_providers

# Images per run call when a batch is shared out over streams: small calls keep each chunk's
# activations in its core's cache, and taking chunks in turn lets a thread on a slower core take
# fewer (benchmarks/INT8.md measures chunk sizes and fixed halves against it).
STREAM_CHUNK = 16
# streams="auto" on the CPU: one intra-op thread per stream (every thread its own stream), and
# streams only for batches of at least STREAMS_MIN_BATCH (two chunks). On the project's 2-core
# machine streams were slower at batch 1, about even at 8 and faster from 64 on
# (benchmarks/results/bench_table.md); batch 1 keeps one stream of all threads.
AUTO_THREADS_PER_STREAM = 1
STREAMS_MIN_BATCH = 2 * STREAM_CHUNK
# The largest single image a model file may ask for (C·H·W elements, float32): an STN's input
# is small, and a file's metadata must not make every decoded image allocate gigabytes.
MAX_INPUT_ELEMENTS = 3 * 2048 * 2048
_TRT_GUARD_SAID: set[str] = set()  # models whose TensorRT guard was announced (say it once)


class Session:
    """An ONNX Runtime session for an stn-deploy model: preprocessing, classes, providers, batches.

    Args:
        model_path: the ``.onnx`` file ``stn-export`` wrote.
        provider: ``auto`` | ``cpu`` | ``cuda`` | ``tensorrt``.
        provider_config: GPU provider options (:class:`ProviderConfig`: device, TensorRT fp16,
            engine cache and batch profile, cuDNN algorithm search).
        threads: ONNX Runtime intra-op threads (None: ONNX Runtime's default, one per core).
        streams: CPU only. Run each batch on this many concurrent threads of ``threads //
            streams`` intra-op threads each, which take chunks of ``STREAM_CHUNK`` images in turn.
            Parts of the graph do not scale with intra-op threads (GridSample builds each
            image's sampling plan on one thread; max-pool, concat and small transposes barely
            scale), and concurrent chunks run those parts in parallel too. ``"auto"``: on the
            CPU provider with 2 or more threads, batches of ``STREAMS_MIN_BATCH`` or more run on
            one stream per thread and smaller ones on one stream of all threads; one stream on a
            GPU provider. An int is used as given.
        spin: let ONNX Runtime's idle intra-op threads spin-wait. On a machine whose cores are
            shared with image decoding, spinning threads steal the decoder's time; ``False``
            makes them sleep.
        graph_optimization: ``disable`` | ``basic`` | ``extended`` | ``all``.
        io_binding: bind the input to the device and outputs to host memory (default: on for
            GPU providers, off on CPU, where a plain ``run`` is already zero-copy).
        warmup: warm-up runs at construction; with record_placement or device_check at least one.
        warmup_batch: batch size of the warm-up input (a fixed deterministic pattern).
        record_placement: record which node runs on which provider during the first warm-up run.
        device_check: on a GPU provider, run the warm-up batch on the CPU provider too and raise
            :class:`ProviderError` if the log-probabilities disagree (:mod:`.guards`).
        graph: the file's graph facts (:func:`.graph_info.try_read_graph_info`) when the caller has
            read them already, so the file is not read and parsed twice (stn-infer reads them
            first for ``--batch-size auto``).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        provider: str = "auto",
        *,
        provider_config: ProviderConfig | None = None,
        threads: int | None = None,
        streams: int | str = "auto",
        spin: bool | None = None,
        graph_optimization: str = "all",
        io_binding: bool | None = None,
        warmup: int = 1,
        warmup_batch: int = 1,
        record_placement: bool = True,
        device_check: bool = True,
        graph: GraphInfo | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        if problem := input_file_problem(self.model_path, missing="no such model file"):
            raise ModelFileError(f"{self.model_path}: {problem}")
        if threads is not None and threads < 0:
            raise ProviderError(f"threads must be >= 0 (0: onnxruntime's default), got {threads}")
        if streams != "auto" and (not isinstance(streams, int) or streams < 1):
            raise ProviderError(f"streams must be >= 1 or 'auto', got {streams!r}")
        if isinstance(streams, int) and streams > 1 and threads and threads < streams:
            raise ProviderError(f"{streams} streams need at least {streams} threads, got {threads}")
        if graph_optimization not in GRAPH_OPTIMIZATION:
            raise ProviderError(
                f"graph_optimization must be one of {', '.join(GRAPH_OPTIMIZATION)}, got {graph_optimization!r}"
            )
        self.requested_provider = provider
        self.provider_config = provider_config or ProviderConfig()
        self.threads = threads
        self.requested_streams = streams
        self._graph_optimization = graph_optimization
        self._spin = spin
        self._stream_pool: ThreadPoolExecutor | None = None
        self._stream_session: ort.InferenceSession | None = None
        self._placement: PlacementReport | None = None
        self._record_placement = record_placement
        self.device_check: DeviceCheck | None = None
        self._closed = False
        if graph is None:  # not read by the caller (stn-infer reads it for --batch-size auto)
            graph = try_read_graph_info(self.model_path)
        self.graph = graph if graph is not None else GraphInfo()  # unreadable: onnxruntime's load says why

        self._profile_dir = tempfile.mkdtemp(prefix="stn-placement-") if record_placement else None
        try:
            chain = self._provider_chain(provider)
            self._start(chain, io_binding)
            runs = max(1, warmup) if (record_placement or device_check) else warmup
            self.warmup(runs, batch=warmup_batch)
            if device_check and self.device == "cuda":
                self.device_check = self._check_device(warmup_batch)
        except BaseException:
            self.close()
            raise
        finally:
            self._remove_profile_dir()

    # -- construction ---------------------------------------------------------------------------
    def _provider_chain(self, provider: str) -> ProviderChain:
        """The provider chain, with the TensorRT guard and the batch profile read from the file."""
        exclude = tensorrt_excluded_ops(self.graph)
        chain = resolve_providers(provider, self.provider_config, trt_exclude_ops=exclude)
        if not any(name == TENSORRT for name, _ in chain):
            return chain
        if exclude and str(self.model_path) not in _TRT_GUARD_SAID:
            _TRT_GUARD_SAID.add(str(self.model_path))
            warnings.warn(
                f"{self.model_path}: GridSample at opset {self.graph.opset} runs on CUDA, not TensorRT "
                "(TensorRT samples opset-20 GridSample as nearest-neighbour); export with --target cuda "
                "to run it all on TensorRT",
                RuntimeWarning,
                stacklevel=3,
            )
        if self.provider_config.trt_max_batch:
            # The input's name and shape come from the file before any provider is chosen, so the
            # TensorRT optimization profile can name them.
            first = create_session(self.model_path, session_options(optimization="disable")).get_inputs()[0]
            chain = resolve_providers(
                provider,
                self.provider_config,
                input_name=first.name,
                input_shape=first.shape[1:],
                trt_exclude_ops=exclude,
            )
        return chain

    def _options(self, threads: int | None, *, profile: bool = False) -> ort.SessionOptions:
        # Only the first session records the placement (its profiler stops after the first run);
        # any other session built with the profiler on would keep every run's events in memory.
        prefix = os.path.join(self._profile_dir, "profile") if profile and self._profile_dir else None
        return session_options(
            threads=threads, optimization=self._graph_optimization, spin=self._spin, profile_prefix=prefix
        )

    def _start(self, chain: ProviderChain, io_binding: bool | None) -> None:
        streams = self.requested_streams
        threads = self.threads
        if isinstance(streams, int) and streams > 1:
            threads = max(1, (threads or os.cpu_count() or 1) // streams)
        self.session_options = self._options(threads, profile=True)
        while True:
            try:
                self._session = create_session(self.model_path, self.session_options, chain)
                break
            except ProviderError as exc:  # a GPU provider that could not start (engine build, options)
                if self.requested_provider.lower() != "auto" or len(chain) == 1:
                    raise
                warnings.warn(f"{exc}; auto: trying {display(chain[1][0])}", RuntimeWarning, stacklevel=3)
                chain = chain[1:]
        self.provider_chain = chain
        self.providers: list[str] = list(self._session.get_providers())
        self._check_providers_took(chain)
        self._read_signature()
        self.device = "cuda" if self.providers and self.providers[0] in GPU_PROVIDERS else "cpu"
        self.io_binding = (self.device == "cuda") if io_binding is None else bool(io_binding)
        if isinstance(streams, int) and streams > 1 and self.device != "cpu":
            raise ProviderError(
                f"{self.model_path}: streams apply to the CPU provider; {display(self.provider)} runs one"
            )
        self.streams = self._resolve_streams()

    def _resolve_streams(self) -> int:
        """The streams a large batch runs on (``"auto"`` decided for this provider and thread count)."""
        if self.requested_streams != "auto":
            return int(self.requested_streams)
        threads = self.threads or os.cpu_count() or 1
        if self.device != "cpu" or threads < 2:
            return 1
        return max(1, threads // AUTO_THREADS_PER_STREAM)

    def _read_signature(self) -> None:
        """Metadata and the graph's signature: one float image input, a float [N, classes] output."""
        try:
            self.metadata = ModelMetadata.from_props(
                dict(self._session.get_modelmeta().custom_metadata_map), source=str(self.model_path)
            )
        except ValueError as exc:
            raise ModelFileError(str(exc)) from None
        where = self.model_path
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ModelFileError(f"{where}: expected one image input, found {len(inputs)}")
        image = inputs[0]
        if image.type != "tensor(float)" or len(image.shape) != 4:
            raise ModelFileError(
                f"{where}: input '{image.name}' is {image.type} of rank {len(image.shape)}; "
                "stn-deploy models take a float32 [N, C, H, W] batch"
            )
        self.input_name: str = image.name
        outputs = self._session.get_outputs()
        self.output_names: list[str] = [o.name for o in outputs]
        if md.LOG_PROBS not in self.output_names:
            raise ModelFileError(f"{where}: no '{md.LOG_PROBS}' output (outputs: {', '.join(self.output_names)})")
        log_probs = outputs[self.output_names.index(md.LOG_PROBS)]
        if log_probs.type != "tensor(float)" or len(log_probs.shape) != 2:
            raise ModelFileError(
                f"{where}: output '{md.LOG_PROBS}' is {log_probs.type} of rank {len(log_probs.shape)}; "
                "expected float32 [N, classes]"
            )
        classes = log_probs.shape[-1]
        if isinstance(classes, int) and classes != len(self.class_names):
            raise ModelFileError(
                f"{where}: '{md.LOG_PROBS}' has {classes} classes but the metadata names {len(self.class_names)}"
            )
        want = tuple(self.preprocessing.input_shape)
        got = tuple(image.shape[1:])
        if any(isinstance(d, int) and d != w for d, w in zip(got, want)):
            raise ModelFileError(
                f"{where}: input shape {list(got)} disagrees with the preprocessing metadata {list(want)}"
            )
        if int(np.prod(want)) > MAX_INPUT_ELEMENTS:
            raise ModelFileError(
                f"{where}: the preprocessing metadata asks for {list(want)} inputs "
                f"({int(np.prod(want)):,} values per image, limit {MAX_INPUT_ELEMENTS:,})"
            )

    def _check_providers_took(self, chain: ProviderChain) -> None:
        """A requested GPU provider that ONNX Runtime silently dropped (missing CUDA/cuDNN libraries)."""
        wanted = chain[0][0]
        if wanted in self.providers:
            return
        reason = (
            f"{display(wanted)} is in this onnxruntime build but failed to initialise "
            f"(its CUDA/cuDNN/TensorRT libraries are missing or do not match); "
            f"session runs on {', '.join(map(display, self.providers))}"
        )
        if self.requested_provider.lower() == "auto":
            warnings.warn(f"{self.model_path}: {reason}", RuntimeWarning, stacklevel=4)
        else:
            raise ProviderError(f"{self.model_path}: {reason}")

    def _check_device(self, batch: int) -> DeviceCheck:
        """The warm-up batch on this GPU provider against the CPU provider (:mod:`.guards`)."""
        x = self._warmup_input(max(batch, 8))
        got = self.run(x, [md.LOG_PROBS])[md.LOG_PROBS]
        try:
            cpu = create_session(self.model_path, session_options(optimization=self._graph_optimization))
            want = cpu.run([md.LOG_PROBS], {self.input_name: x})[0]
        except Exception as exc:  # noqa: BLE001 - e.g. an fp16 graph with no CPU kernel for one op
            warnings.warn(
                f"{self.model_path}: device check skipped: the CPU provider cannot run this model ({exc})",
                RuntimeWarning,
                stacklevel=3,
            )
            return DeviceCheck(self.provider, self.compute_precision, 0, 0.0, 0, 0.0)
        check = compare_devices(self.provider, self.compute_precision, got, want)
        if not check.passed:
            raise ProviderError(
                f"{self.model_path}: device check failed: {check.describe()} "
                "(Session(device_check=False) / --no-device-check turns the check off)"
            )
        return check

    def _remove_profile_dir(self) -> None:
        if self._profile_dir is not None:
            shutil.rmtree(self._profile_dir, ignore_errors=True)
            self._profile_dir = None

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
    def compute_precision(self) -> str:
        """The precision the provider computes in: the file's, unless a provider option lowers an
        fp32 file's math on the GPU: TensorRT's fp16 kernels (``fp16``) or CUDA's TF32
        (``tf32``: 10-bit mantissas in convolutions and matmuls; on an H200 the digits model's
        log-probs moved by up to 3.5e-3, benchmarks/GPU.md). The device check's bound follows it,
        so a session the user asked to run in reduced precision is not refused for doing so."""
        precision = self.graph.precision
        if precision != "fp32" or self.device != "cuda":
            return precision
        if self.provider == TENSORRT and self.provider_config.trt_fp16:
            return "fp16"
        if self.provider_config.cuda_tf32:
            return "tf32"
        return precision

    @property
    def precision(self) -> str:
        """``fp32``, ``fp16`` or ``int8``, read from the graph itself (not from the metadata)."""
        return self.graph.precision

    @property
    def has_theta(self) -> bool:
        return md.THETA in self.output_names

    @property
    def has_warped(self) -> bool:
        return md.WARPED in self.output_names

    def streams_for(self, batch_size: int) -> int:
        """How many streams a batch of ``batch_size`` images runs on."""
        if self.streams <= 1 or batch_size <= 1:
            return 1
        if self.requested_streams == "auto" and batch_size < STREAMS_MIN_BATCH:
            return 1
        return self.streams

    def describe(self) -> dict[str, Any]:
        return {
            "model": str(self.model_path),
            "requested_provider": self.requested_provider,
            "providers": list(self.providers),
            "provider_options": {n: o for n, o in self.provider_chain},
            "threads": self.threads,
            "streams": self.streams,
            "requested_streams": self.requested_streams,
            "io_binding": self.io_binding,
            "precision": self.precision,
            "input": self.input_name,
            "outputs": list(self.output_names),
            "input_shape": list(self.preprocessing.input_shape),
            "classes": len(self.class_names),
            "device_check": self.device_check.to_dict() if self.device_check else None,
        }

    # -- running --------------------------------------------------------------------------------
    def run(self, batch: np.ndarray, output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """One batch [N, C, H, W] float32 → ``{output name: array}`` (host memory)."""
        if self._closed:
            raise ProviderError(f"{self.model_path}: session is closed")
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        names = list(output_names or self.output_names)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != tuple(self.preprocessing.input_shape):
            shape = ", ".join(map(str, self.preprocessing.input_shape))
            raise ValueError(f"expected a [N, {shape}] batch, got {list(batch.shape)}")
        if self.streams_for(len(batch)) > 1:
            values = self._run_streams(batch, names)
        elif self.io_binding:
            binding = self._session.io_binding()
            if self.device == "cuda":
                value = ort.OrtValue.ortvalue_from_numpy(batch, "cuda", self.provider_config.device_id)
                binding.bind_ortvalue_input(self.input_name, value)
            else:
                binding.bind_cpu_input(self.input_name, batch)
            for name in names:
                binding.bind_output(name, "cpu")
            self._session.run_with_iobinding(binding)
            values = dict(zip(names, binding.copy_outputs_to_cpu()))
        else:
            values = dict(zip(names, self._session.run(names, {self.input_name: batch})))
        for name, value in values.items():
            if value.ndim == 0 or len(value) != len(batch):
                raise ModelFileError(
                    f"{self.model_path}: output '{name}' has {len(value) if value.ndim else 0} rows "
                    f"for a batch of {len(batch)}"
                )
        return values

    def _streamed_session(self) -> ort.InferenceSession:
        """The session the streams share: ``threads // streams`` intra-op threads each."""
        if self.requested_streams != "auto":
            return self._session  # built with threads // streams already
        if self._stream_session is None:
            threads = max(1, (self.threads or os.cpu_count() or 1) // self.streams)
            self._stream_session = create_session(self.model_path, self._options(threads), self.provider_chain)
        return self._stream_session

    def _run_streams(self, batch: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        """The batch cut into chunks of about ``STREAM_CHUNK`` images (at least one per stream),
        which the ``streams`` threads take in turn until none is left (ONNX Runtime's ``run`` is
        thread-safe and releases the GIL); the calling thread is one of them. A thread on a core
        that runs slower takes fewer chunks instead of holding up a fixed half."""
        session = self._streamed_session()
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
                parts[i] = session.run(names, {self.input_name: chunks[i]})

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

    def _warmup_input(self, batch: int) -> np.ndarray:
        """Deterministic, varied images in [-2, 2): all-zero inputs would make every row of the
        device check identical. A Weyl sequence (index × Knuth's multiplicative constant, mod 2³²)
        rather than numpy.random, whose import alone costs ~6.5 MB of RSS that a one-image
        stn-infer run would otherwise pay."""
        shape = (batch, *self.preprocessing.input_shape)
        index = np.arange(int(np.prod(shape)), dtype=np.uint64)
        hashed = (index * np.uint64(2654435761)) % np.uint64(2**32)
        return (hashed.astype(np.float32) * np.float32(4 / 2**32) - np.float32(2)).reshape(shape)

    def warmup(self, runs: int = 1, *, batch: int = 1) -> float:
        """Run a batch ``runs`` times; returns the seconds taken. Records the placement first."""
        if runs <= 0:
            return 0.0
        x = self._warmup_input(batch)
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
            raise ProviderError(f"{self.model_path}: no placement recorded (session built with record_placement=False)")
        return self._placement

    def check_placement(self, strict: bool = False, warn: Callable[[str], None] | None = None) -> PlacementReport:
        """Warn (or, with ``strict``, raise :class:`ProviderError`) when a GPU run left compute on the CPU."""
        report = self.placement()
        fallback = report.cpu_fallback
        if fallback:
            ops = ", ".join(sorted({n.op_type for n in fallback}))
            msg = (
                f"{self.model_path}: {len(fallback)} of {len(report.nodes)} nodes run on the CPU under "
                f"{display(self.provider)} ({ops}); each costs a host/device copy"
            )
            if strict:
                raise ProviderError(msg + " (--strict-placement)")
            (warn or (lambda m: warnings.warn(m, RuntimeWarning, stacklevel=2)))(msg)
        return report

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the stream threads and release ONNX Runtime's sessions (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._stream_pool is not None:
            self._stream_pool.shutdown(wait=True)
            self._stream_pool = None
        self._session = None  # type: ignore[assignment]
        self._stream_session = None
        self._remove_profile_dir()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        providers = getattr(self, "providers", [])
        return f"Session({str(self.model_path)!r}, providers={providers})"
