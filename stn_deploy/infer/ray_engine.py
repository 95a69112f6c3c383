"""``stn-infer --engine ray``: the same rows as ``stn-infer``, computed on a Ray cluster with Ray Data.

The pipeline is one streamed Ray Data dataset::

    listing (driver: a local directory, or s3:// gs:// file:// ... through pyarrow/fsspec)
      -> blocks of paths
      -> decode tasks      map_batches(function): the single-process decoder and its guards
      -> inference actors  map_batches(callable class holding a Session), an ActorPoolStrategy
      -> rows              a Parquet directory written by write tasks (a Datasink), or one
                           CSV / JSON Lines / Parquet file written by the driver in path order

The rows are :func:`stn_deploy.infer.predictions_for`'s, so they have the single-process
command's columns and values; Parquet keeps the CSV's column names. Bad files stay rows, as in the
single-process command: a local file is decoded by :func:`stn_deploy.images.decode` itself (the
same stat, open and decode checks, so a dangling link or a named pipe is an error row, not a
failed or hung read task), and a file in an object store is read as bytes by a pyarrow
filesystem in the decode task and decoded by :func:`stn_deploy.decoders.decode_data` (the same
checks and texts). Ray Data's own ``read_binary_files`` is not used for that reason: one file it
cannot open fails its whole read task, and with it the job.

Faults: inference actors are restarted by Ray (``max_restarts``) and the task they were running
is retried on the new actor (``max_task_retries``); a task's output counts only once it has
finished, and the Parquet parts are named by task index, so a retried task replaces its part.
The rows come out once each (tests/test_infer_ray.py kills an actor mid-run to show it).

Nothing here is imported unless ``--engine ray`` is chosen (``pip install stn-deploy[ray]``), and
like the rest of the runtime it imports no torch.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import click
import numpy as np
from PIL import Image

from stn_deploy import metadata as md
from stn_deploy.console import to_json
from stn_deploy.decoders import DecodeSpec, decode_data, decode_file
from stn_deploy.errors import StnDeployError, one_line
from stn_deploy.fileio import atomic_path, check_writable
from stn_deploy.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    DecodedBatch,
    DecodeResult,
    ImageDirectoryError,
    find_images,
)
from stn_deploy.preprocessing import Preprocessing
from stn_deploy.runtime import ProviderConfig, Session

from .exits import EXIT_OK, EXIT_SOME_FAILED, InferUsageError
from .pipeline import InferSummary
from .rows import Prediction, RowWriter, open_output, predictions_for

# pyarrow and ray are imported inside functions: they are the optional [ray] extra, and nothing
# else in stn_deploy may need them (import stn_deploy.infer.ray_engine must work without them).

FAULT_ENV = "STN_RAY_FAULT"  # test hook, "N:MARKER": the actor on its Nth batch exits once (see _InferenceActor)
HIDDEN = ("__node", "__provider")  # side-channel columns: where each row was inferred; never written
# An actor that dies is restarted and its batch retried, this many times; a batch that keeps killing
# its actor (a crashing provider) then fails the job instead of looping forever.
MAX_RESTARTS = 3
ACTOR_START_TIMEOUT_S = 600  # an autoscaling cluster may take minutes to add the nodes for the pool
ROWS_PER_PART = 50_000  # Parquet part size: rows gathered into one write task (and one file)
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class RayEngineError(StnDeployError):
    """The Ray job as a whole failed (cluster unreachable, actors cannot start, a stage crashed)."""


def is_uri(source: str) -> bool:
    return bool(URI.match(source))


# -- listing -------------------------------------------------------------------------------------
@dataclass
class SourceListing:
    """The image files of SOURCE in the single-process command's order."""

    paths: list[str]  # the row's path: as stn-infer writes it, or the URI of an object
    locations: list[str]  # what the decode task opens: an absolute local path, or a path in ``filesystem``
    filesystem: Any = None  # a pyarrow FileSystem for URIs; None: local files, decoded by path
    skipped: int = 0


def list_source(source: str) -> SourceListing:
    """List SOURCE: a local directory or file (exactly :func:`find_images`), or a URI pyarrow or fsspec
    understands (``s3://bucket/prefix``, ``gs://...``, ``file:///...``), filtered and ordered the same way."""
    if not is_uri(source):
        listing = find_images(source)
        return SourceListing(
            paths=[p.as_posix() for p in listing.files],
            locations=[os.path.abspath(p) for p in listing.files],  # workers need not share the driver's cwd
            skipped=listing.skipped,
        )
    import pyarrow.fs as pafs  # optional [ray] extra

    fs, root = _filesystem(source)
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise ImageDirectoryError(f"{source}: no such file or directory")
        if info.type == pafs.FileType.File:
            if os.path.splitext(root)[1].lower() not in IMAGE_EXTENSIONS:
                raise ImageDirectoryError(
                    f"{source}: not an image file (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            return SourceListing(paths=[source], locations=[root], filesystem=fs)
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as exc:
        raise RayEngineError(f"{source}: cannot list it ({one_line(exc, 300)})") from None
    base = root.rstrip("/")
    found: list[str] = []
    skipped = 0
    for entry in infos:
        if entry.type != pafs.FileType.File:
            continue
        rel = entry.path[len(base) + 1 :] if entry.path.startswith(base + "/") else entry.base_name
        if any(part.startswith(".") for part in rel.split("/")):
            continue  # hidden, as find_images skips them
        if os.path.splitext(rel)[1].lower() in IMAGE_EXTENSIONS:
            found.append(rel)
        else:
            skipped += 1
    if not found:
        extra = f" ({skipped} other files)" if skipped else ""
        raise ImageDirectoryError(
            f"{source}: no image files{extra} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, recursively)"
        )
    found.sort()
    prefix = source.rstrip("/")
    return SourceListing(
        paths=[f"{prefix}/{r}" for r in found], locations=[f"{base}/{r}" for r in found], filesystem=fs, skipped=skipped
    )


def _filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) for a URI: pyarrow's own (s3, gs, hdfs, file), else fsspec's."""
    import pyarrow as pa  # optional [ray] extra
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        pass
    except OSError as exc:  # a known scheme whose filesystem could not start (credentials, region)
        raise RayEngineError(f"{uri}: {one_line(exc, 300)}") from None
    try:
        import fsspec  # schemes pyarrow lacks (az://, abfs://, ...): fsspec and that scheme's package

        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        raise InferUsageError(f"{uri}: no filesystem for this URI ({one_line(exc, 200)})") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


# -- decode tasks --------------------------------------------------------------------------------
def pixel_shape(preprocessing: Preprocessing) -> tuple[int, ...]:
    """The shape of :meth:`Preprocessing.to_uint8`'s array: HWC, or HW for one channel."""
    h, w = preprocessing.image_size
    return (h, w) if preprocessing.channels == 1 else (h, w, preprocessing.channels)


def decode_block(batch: dict[str, np.ndarray], *, spec: DecodeSpec, filesystem: Any) -> dict[str, np.ndarray]:
    """A Ray Data batch of ``path``/``location`` → ``path``, ``pixels`` (uint8, zeros where it
    failed), ``error``, ``decoder``: each file through the local engine's decoders
    (:mod:`stn_deploy.decoders`, ``--decode``), so both engines give the same pixels and errors."""
    if spec.max_pixels is not None:  # as stn-infer's main sets it: PIL's own limit behind the explicit check
        Image.MAX_IMAGE_PIXELS = spec.max_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    pre = spec.preprocessing
    paths, locations = batch["path"], batch["location"]
    pixels = np.zeros((len(paths), *pixel_shape(pre)), dtype=np.uint8)
    errors = np.empty(len(paths), dtype=object)
    decoders = np.empty(len(paths), dtype=object)
    for i, (path, location) in enumerate(zip(paths, locations)):
        out = pixels[i].reshape(*pre.image_size, pre.channels)  # a view: the decoders write into it
        if filesystem is None:
            result = decode_file(Path(location), spec, out)
        else:
            data, problem = _read(filesystem, location)
            result = decode_data(data, path, spec, out) if problem is None else DecodeResult(Path(path), error=problem)
        if not result.ok:
            pixels[i] = 0
        errors[i] = result.error or ""
        decoders[i] = result.decoder
    return {"path": paths, "pixels": pixels, "error": errors, "decoder": decoders}


def _read(filesystem: Any, location: str) -> tuple[bytes, str | None]:
    """A file's bytes from a pyarrow filesystem, or the problem in one line (the row's error)."""
    try:
        with filesystem.open_input_stream(location) as f:
            return f.read(), None
    except Exception as exc:  # noqa: BLE001 - one unreadable object is its row's error, not the job's
        return b"", f"cannot read ({' '.join(str(exc).split())[:300] or type(exc).__name__})"


# -- inference actors ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RowSpec:
    """What a row holds: the single-process command's columns for this model and these options."""

    class_names: tuple[str, ...]
    top_k: int
    theta: bool
    log_probs: bool

    @property
    def k(self) -> int:
        return min(self.top_k, len(self.class_names))

    def writer(self, stream: Any, fmt: str) -> RowWriter:
        return RowWriter(
            stream, fmt, top_k=self.top_k, class_names=self.class_names, theta=self.theta, log_probs=self.log_probs
        )

    def columns(self) -> list[str]:
        return self.writer(io.StringIO(), "jsonl").columns()  # the CSV header's names

    def schema(self, hidden: bool = False) -> Any:
        import pyarrow as pa  # optional [ray] extra

        def kind(name: str) -> Any:
            if name == "index":
                return pa.int64()
            if name == "confidence" or name.endswith("_prob") or name.startswith(("theta_", "log_prob_")):
                return pa.float64()
            return pa.string()

        fields = [pa.field(name, kind(name)) for name in self.columns()]
        if hidden:
            fields += [pa.field(name, pa.string()) for name in HIDDEN]
        return pa.schema(fields)

    def table(self, rows: Sequence[Prediction], node: str, provider: str) -> Any:
        """Rows → an Arrow table with :meth:`schema` (nulls where the CSV leaves a cell empty)."""
        import pyarrow as pa  # optional [ray] extra

        cols: dict[str, list[Any]] = {name: [] for name in self.columns()}
        for r in rows:
            cols["path"].append(r.path)
            cols["label"].append(r.label)
            cols["index"].append(r.index)
            cols["confidence"].append(r.confidence)
            for i in range(self.k):
                lab, p = r.top_k[i] if i < len(r.top_k) else (None, None)
                cols[f"top{i + 1}_label"].append(lab)
                cols[f"top{i + 1}_prob"].append(p)
            if self.theta:
                for i in range(6):
                    cols[f"theta_{i}"].append(r.theta[i] if r.theta is not None else None)
            if self.log_probs:
                for i, name in enumerate(self.class_names):
                    cols[f"log_prob_{name}"].append(r.log_probs[i] if r.log_probs is not None else None)
            cols["error"].append(r.error)
        cols[HIDDEN[0]] = [node] * len(rows)
        cols[HIDDEN[1]] = [provider] * len(rows)
        return pa.table(cols, schema=self.schema(hidden=True))

    def predictions(self, table: Any) -> list[Prediction]:
        """An Arrow table of rows → the Predictions :class:`RowWriter` writes (the inverse of :meth:`table`)."""
        d = table.to_pydict()
        out: list[Prediction] = []
        for j in range(table.num_rows):
            top = [(d[f"top{i}_label"][j], d[f"top{i}_prob"][j]) for i in range(1, self.k + 1)]
            ok = d["error"][j] is None
            out.append(
                Prediction(
                    path=d["path"][j],
                    label=d["label"][j],
                    index=d["index"][j],
                    confidence=d["confidence"][j],
                    top_k=top if ok else [],
                    theta=[d[f"theta_{i}"][j] for i in range(6)] if self.theta and ok else None,
                    log_probs=[d[f"log_prob_{n}"][j] for n in self.class_names] if self.log_probs and ok else None,
                    error=d["error"][j],
                )
            )
        return out


class _InferenceActor:
    """One Ray actor: a :class:`Session` on the model's bytes, run on decoded batches.

    The model's bytes travel through the object store (``model`` is ``[ObjectRef]``: in a list, so
    the reference stays small in the actor's arguments and a restarted actor fetches it again), so
    a worker node needs no shared file system; they are written to a private temporary file for
    ONNX Runtime and removed once loaded.
    """

    def __init__(
        self,
        *,
        model: list[Any],
        model_name: str,
        spec: RowSpec,
        provider: str,
        device_id: int,
        threads: int,
        spin: bool,
        batch_size: int,
        fault: str | None = None,
    ) -> None:
        import ray  # optional [ray] extra; this runs in a Ray worker

        tmp = tempfile.mkdtemp(prefix="stn-ray-model-")
        try:
            path = Path(tmp, model_name)
            path.write_bytes(ray.get(model[0]))
            # threads is explicit: Ray sets OMP_NUM_THREADS to the worker's CPUs (1 when none), and
            # ONNX Runtime's own default would ignore the CPUs this actor reserved.
            self.session = Session(
                path,
                provider,
                provider_config=ProviderConfig(device_id=device_id, trt_max_batch=batch_size),
                threads=threads,
                streams=1,  # an actor is one stream: Ray runs as many actors as the CPUs hold
                spin=spin,
                warmup=1,
                warmup_batch=batch_size,
                record_placement=False,
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.spec = spec
        self.node = ray.get_runtime_context().get_node_id()
        self.outputs = [md.LOG_PROBS] + [n for n in (md.THETA,) if n in self.session.output_names]
        self.fault = fault
        self.calls = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        self.calls += 1
        self._maybe_crash()
        errors = batch["error"]
        ok = np.array([not e for e in errors], dtype=bool)
        results = [DecodeResult(Path(), error=e or None) for e in errors]  # paths come from the batch below
        inputs = (
            self.session.preprocessing.normalize(batch["pixels"][ok])
            if ok.any()
            else np.zeros((0, *self.session.preprocessing.input_shape), np.float32)
        )
        outputs = self.session.run(inputs, self.outputs) if len(inputs) else {}
        rows = predictions_for(
            DecodedBatch(results, inputs),
            outputs,
            self.spec.class_names,
            top_k=self.spec.top_k,
            want_log_probs=self.spec.log_probs,
        )
        for row, path in zip(rows, batch["path"]):
            row.path = str(path)  # the listing's string: Path() would fold the '//' of a URI
        return self.spec.table(rows, self.node, self.session.provider)

    def _maybe_crash(self) -> None:
        """The test hook: with ``STN_RAY_FAULT=N:MARKER`` on the driver, the first actor to reach its
        Nth batch creates MARKER and exits the process, as a crashed worker would (once: the marker);
        with ``N:always`` every actor exits on its Nth batch, as on a batch that crashes the runtime."""
        if not self.fault:
            return
        nth, marker = self.fault.split(":", 1)
        if self.calls != int(nth):
            return
        if marker != "always":
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os._exit(1)


# -- writing -------------------------------------------------------------------------------------
@dataclass
class Tally:
    """Counts over written rows: the summary line's numbers and where inference ran."""

    ok: int = 0
    failed: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    nodes: Counter = field(default_factory=Counter)
    providers: Counter = field(default_factory=Counter)

    def add(self, table: Any) -> None:
        errors = table.column("error").to_pylist()
        paths = table.column("path").to_pylist()
        for path, error in zip(paths, errors):
            if error is None:
                self.ok += 1
            else:
                self.failed += 1
                self.errors.append({"path": path, "error": error})
        self.nodes.update(table.column(HIDDEN[0]).to_pylist())
        self.providers.update(table.column(HIDDEN[1]).to_pylist())

    def merge(self, other: Tally) -> None:
        self.ok += other.ok
        self.failed += other.failed
        self.errors += other.errors
        self.nodes.update(other.nodes)
        self.providers.update(other.providers)


def _parquet_sink_class() -> type:
    """The Datasink class, built on first use so that importing this module needs no ray."""
    from ray.data import Datasink  # optional [ray] extra
    from ray.data.block import BlockAccessor

    class ParquetPartsSink(Datasink):
        """A directory of Parquet files, one per write task (``part-<task>.parquet``), staged and
        committed: a local directory is written under a hidden name beside it and renamed into place
        at the end (nothing at the path until every row is written); on an object store, where there
        is no rename, the parts go straight to the prefix and ``_SUCCESS`` is written last."""

        def __init__(self, fs: Any, final: str, *, local: bool, schema: Any) -> None:
            self.fs, self.final, self.local, self.schema = fs, final.rstrip("/"), local, schema
            parent, name = os.path.split(self.final)
            self.staging = os.path.join(parent, f".{name}.{uuid.uuid4().hex[:8]}.tmp") if local else self.final
            self.tally = Tally()

        @property
        def min_rows_per_write(self) -> int:
            return ROWS_PER_PART

        @property
        def supports_distributed_writes(self) -> bool:
            return not self.local  # a local directory is on the driver's node: write it there

        def on_write_start(self, schema: Any = None) -> None:
            self.fs.create_dir(self.staging, recursive=True)

        def write(self, blocks: Iterable[Any], ctx: Any) -> Tally:
            import pyarrow.parquet as pq

            tally, writer = Tally(), None
            path = f"{self.staging}/part-{ctx.task_idx:05d}.parquet"  # a retried task replaces its own part
            try:
                for block in blocks:
                    table = BlockAccessor.for_block(block).to_arrow()
                    if not table.num_rows:
                        continue
                    tally.add(table)
                    if writer is None:
                        writer = pq.ParquetWriter(path, self.schema, filesystem=self.fs)
                    writer.write_table(table.drop_columns(list(HIDDEN)).cast(self.schema))
            finally:
                if writer is not None:
                    writer.close()
            return tally

        def on_write_complete(self, write_result: Any) -> None:
            for part in write_result.write_returns:
                self.tally.merge(part)
            if self.local:
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(self.final)  # an empty directory may be replaced (checked at the start)
                os.replace(self.staging, self.final)
            else:
                with self.fs.open_output_stream(f"{self.final}/_SUCCESS"):
                    pass

        def on_write_failed(self, error: Exception) -> None:
            self.discard()

        def discard(self) -> None:
            if self.local:
                shutil.rmtree(self.staging, ignore_errors=True)

    return ParquetPartsSink


@dataclass(frozen=True)
class OutputPlan:
    """Where the rows go: ``kind`` is csv, jsonl or parquet (one file, or ``directory``)."""

    target: str
    kind: str
    directory: bool = False

    @property
    def ordered(self) -> bool:
        """A single file is written by the driver in path order, as the single-process command writes it."""
        return not self.directory


def plan_output(output: str, fmt: str | None) -> OutputPlan:
    """``-`` (stdout) and ``.csv``/``.jsonl``/``.ndjson``/``.parquet`` are one file; a path ending in
    ``/``, an existing directory or a path without a suffix is a Parquet directory."""
    if fmt:
        if output != "-" and (output.endswith("/") or os.path.isdir(output)):
            raise InferUsageError(f"{output}: --format {fmt} writes one file; give a file name")
        return OutputPlan(output, fmt)
    if output == "-":
        return OutputPlan(output, "csv")
    ext = os.path.splitext(output.rstrip("/"))[1].lower()
    directory = output.endswith("/") or (not is_uri(output) and os.path.isdir(output)) or not ext
    if directory:
        if not is_uri(output) and os.path.isdir(output) and any(os.scandir(output)):
            raise InferUsageError(
                f"{output}: directory exists and is not empty (the Parquet parts need a new or empty one)"
            )
        return OutputPlan(output, "parquet", directory=True)
    kinds = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
    if ext not in kinds:
        raise InferUsageError(
            f"{output}: cannot tell the output format from the extension (use .csv, .jsonl, .parquet or a directory/)"
        )
    if is_uri(output):
        raise InferUsageError(
            f"{output}: a single output file is written by this machine; give a local path, "
            "or a directory URI ending in / for Parquet parts"
        )
    return OutputPlan(output, kinds[ext])


def _write_ordered(batches: Iterator[Any], plan: OutputPlan, spec: RowSpec, stdout: IO[str]) -> Tally:
    """The driver writes one file in path order: CSV/JSON Lines through :class:`RowWriter`, or Parquet;
    ``-`` is ``stdout``."""
    tally = Tally()
    if plan.kind == "parquet":
        import pyarrow.parquet as pq  # optional [ray] extra

        schema = spec.schema()
        with atomic_path(plan.target) as tmp, pq.ParquetWriter(tmp, schema) as writer:
            for table in batches:
                tally.add(table)
                writer.write_table(table.drop_columns(list(HIDDEN)).cast(schema))
        return tally
    with contextlib.nullcontext(stdout) if plan.target == "-" else open_output(plan.target) as stream:
        writer = spec.writer(stream, plan.kind)
        for table in batches:
            tally.add(table)
            writer.write(spec.predictions(table))
    return tally


# -- the job -------------------------------------------------------------------------------------
@dataclass
class RayOptions:
    """How the job runs on Ray; the CLI's ``--engine ray`` options."""

    address: str | None = (
        None  # None: start a local instance sized to this machine; "auto", "ray://host:10001", "host:port"
    )
    actors: int | None = None  # None: one per `threads` CPUs of the cluster
    threads: int = 1  # ONNX Runtime intra-op threads of each actor (and the CPUs it reserves)
    provider: str = "auto"
    device_id: int = 0
    spin: bool = False
    batch_size: int = 64
    top_k: int = 5
    log_probs: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    decode: str = "auto"  # --decode, as the local engine (stn_deploy.decoders)
    progress: bool = True
    decode_cpus: float = 0.0  # CPUs each decode task reserves (see _run)
    paths_per_block: int | None = None  # None: about four blocks per actor, 8..1024 paths each


@dataclass
class RaySummary(InferSummary):
    """:class:`InferSummary` plus what the cluster did."""

    init_seconds: float = 0.0  # connecting to / starting Ray: not in ``seconds``
    rows_per_node: dict[str, int] = field(default_factory=dict)
    provider: str = ""
    actors: int = 0
    threads: int = 0
    cluster_cpus: float = 0.0
    nodes: int = 0
    format: str = ""  # csv, jsonl, parquet (one file), parquet-directory


@contextlib.contextmanager
def ray_connection(address: str | None) -> Iterator[float]:
    """Ray for this job: the instance this process already has (a test, a notebook; left running),
    else ``address``'s cluster, else a local instance sized to the machine. Yields the seconds that
    connecting took; disconnects (stopping a local instance) at the end if it connected."""
    import ray  # optional [ray] extra

    if ray.is_initialized():
        yield 0.0
        return
    start = time.perf_counter()
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address:
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            # "local": start one, never join a `ray start` cluster found on this machine. Its workers run
            # at the command's own priority: Ray's default niceness of 15 (which keeps a busy cluster
            # node's raylet responsive) would make this job yield to every other process on the machine,
            # which the single-process command does not.
            ray.init(address="local", include_dashboard=False, _system_config={"worker_niceness": 0}, **kwargs)
    except Exception as exc:  # noqa: BLE001 - ray raises ConnectionError, RuntimeError, ValueError, ...
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        hint = ""
        if address and "RAY_AUTH_MODE" not in os.environ:  # Ray 2.60 clusters started with a token require it
            hint = " (a cluster with token authentication needs RAY_AUTH_MODE=token and its token on this machine)"
        raise RayEngineError(f"cannot start or reach {where}: {one_line(exc, 300)}{hint}") from None
    try:
        yield time.perf_counter() - start
    finally:
        ray.shutdown()


def _address_host_port(address: str) -> tuple[str, int] | None:
    """``--ray-address`` checked before anything starts: None for ``auto``, else the head's (host, port)."""
    if address == "auto":
        return None  # Ray looks it up (RAY_ADDRESS, or the cluster `ray start` left on this machine) and says if none
    scheme, _, hostport = address.rpartition("://")
    if scheme == "ray":
        # Ray Data 2.60 fails under Ray Client (its executor needs a driver's core worker, and it
        # will not place writes on the client's node), so the driver must run on the cluster.
        raise InferUsageError(
            f"--ray-address {address}: Ray Data does not run through Ray Client; run stn-infer on the cluster: on "
            "the head node with --ray-address auto, or as a Ray job (ray job submit --address http://HEAD:8265 -- "
            "stn-infer ... --engine ray --ray-address auto)"
        )
    host, _, port = hostport.rpartition(":")
    if scheme or not host or not port.isdigit():
        raise InferUsageError(f"--ray-address {address}: expected auto or HOST:PORT (the head node's GCS address)")
    return host.strip("[]"), int(port)


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail in seconds on a cluster address nothing answers at: ray.init itself retries for minutes."""
    where = _address_host_port(address)
    if where is None:
        return
    try:
        socket.create_connection(where, timeout=timeout).close()
    except OSError as exc:
        raise RayEngineError(
            f"cannot start or reach the Ray cluster at {address}: {exc.strerror or exc or 'no answer'}"
        ) from None


def infer_on_ray(
    source: str, model_path: Path, output: str, fmt: str | None, options: RayOptions, *, stdout: IO[str] | None = None
) -> RaySummary:
    """List, decode, classify and write every image of ``source`` on Ray; the engine behind
    ``stn-infer --engine ray``. Bad files are rows; a whole-job failure raises :class:`StnDeployError`.
    Rows for ``-`` go to ``stdout`` (default: sys.stdout)."""
    try:
        import pyarrow  # noqa: F401 - both are the optional [ray] extra
        import ray
    except ImportError as exc:
        raise InferUsageError(f"--engine ray needs Ray Data: pip install 'stn-deploy[ray]' ({exc})") from None
    if options.address:
        _address_host_port(options.address)  # a malformed address: exit 2 before any work
    plan = plan_output(output, fmt)
    if plan.ordered and plan.target != "-":
        check_writable(plan.target)  # before the job, not after it
    elif plan.directory and not is_uri(plan.target):
        _check_directory_writable(plan.target)
    listing = list_source(source)  # missing/empty source: exit 2 before loading the model
    # The driver reads the model once to fail fast on an unreadable file and to learn the columns;
    # the actors load it themselves with the provider asked for (their nodes may have GPUs this one lacks).
    probe = Session(model_path, "cpu", threads=1, warmup=0, record_placement=False, device_check=False)
    spec = RowSpec(tuple(probe.class_names), options.top_k, probe.has_theta, options.log_probs)
    preprocessing = probe.preprocessing
    del probe
    model = Path(model_path).read_bytes()

    with ray_connection(options.address) as init_seconds:
        summary = RaySummary(
            images=len(listing.paths),
            skipped_files=listing.skipped,
            init_seconds=init_seconds,
            format=plan.kind + ("-directory" if plan.directory else ""),
        )
        start = time.perf_counter()
        try:
            tally, actors = _run(
                ray,
                listing,
                model,
                Path(model_path).name,
                spec,
                preprocessing,
                plan,
                options,
                summary,
                stdout or sys.stdout,
            )
        except StnDeployError:
            raise
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed stage: one line, exit 1
            raise RayEngineError(
                f"the Ray job failed: {_root_cause(exc)} (Ray Data's log: ray-data.log in the Ray session's logs)"
            ) from None
        summary.seconds = time.perf_counter() - start
    summary.ok, summary.failed, summary.errors = tally.ok, tally.failed, tally.errors
    summary.rows_per_node = dict(sorted(tally.nodes.items()))
    summary.provider = tally.providers.most_common(1)[0][0] if tally.providers else ""
    summary.actors, summary.threads = actors, options.threads
    return summary


def _run(
    ray: Any,
    listing: SourceListing,
    model: bytes,
    model_name: str,
    spec: RowSpec,
    preprocessing: Preprocessing,
    plan: OutputPlan,
    options: RayOptions,
    summary: RaySummary,
    stdout: IO[str],
) -> tuple[Tally, int]:
    import pyarrow as pa

    resources = ray.cluster_resources()
    cpus = float(resources.get("CPU", 0))
    summary.cluster_cpus = cpus
    summary.nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    gpu = _wants_gpu(options.provider, resources)
    actors = _actor_count(options, resources, local=options.address is None)

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = options.progress
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = plan.ordered
    # Start every actor before the first batch: otherwise the first actor up takes the work while a
    # worker node is still starting its own (a short job may then never reach that node), and a pool
    # the cluster cannot place waits for ever instead of failing.
    ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    _quiet_ray_data_console(options.progress)

    n = len(listing.paths)
    # About four blocks per actor, so every actor and decode slot has work and a slow block does not
    # hold the tail; at most 1024 paths (a decode task of a few tenths of a second) per block.
    per_block = options.paths_per_block or min(1024, max(8, math.ceil(n / (4 * actors))))
    tables = [
        pa.table({"path": listing.paths[i : i + per_block], "location": listing.locations[i : i + per_block]})
        for i in range(0, n, per_block)
    ]
    ds = ray.data.from_arrow(tables)
    ds = ds.map_batches(
        decode_block,
        fn_kwargs={
            "spec": DecodeSpec(preprocessing, mode=options.decode, max_pixels=options.max_pixels),
            "filesystem": listing.filesystem,
        },
        batch_size=None,  # a whole block of paths per task
        batch_format="numpy",
        # Decode tasks reserve no CPU and at most one runs per actor: decoding a 32x32 PNG costs about
        # a quarter of classifying it on one thread (0.28 against 1.15 ms on the project's 2-CPU
        # machine), and like the single-process command's decode threads it shares the cores that
        # the ONNX Runtime threads (which sleep when idle) reserved. Reserving a whole CPU per task
        # would leave a 2-CPU node one actor, or none for the decoder.
        num_cpus=options.decode_cpus,
        compute=ray.data.TaskPoolStrategy(size=actors),
    )
    model_ref = [ray.put(model)]  # held here until the job ends: restarted actors fetch it again
    with warnings.catch_warnings():
        # max_restarts/max_task_retries go through map_batches' **ray_remote_args, which Ray 2.60
        # deprecates without a named replacement (hence ray<2.64 in the [ray] extra); Ray Data's
        # own default would restart and retry forever.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ds.map_batches(
            _InferenceActor,
            fn_constructor_kwargs={
                "model": model_ref,
                "model_name": model_name,
                "spec": spec,
                "provider": options.provider,
                "device_id": options.device_id,
                "threads": options.threads,
                "spin": options.spin,
                "batch_size": options.batch_size,
                "fault": os.environ.get(FAULT_ENV),
            },
            batch_size=options.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=options.threads,
            num_gpus=1 if gpu else None,
            max_restarts=MAX_RESTARTS,
            max_task_retries=MAX_RESTARTS,
        )
    if plan.ordered:
        return _write_ordered(ds.iter_batches(batch_size=None, batch_format="pyarrow"), plan, spec, stdout), actors
    fs, final, local = _output_filesystem(plan.target)
    sink = _parquet_sink_class()(fs, final, local=local, schema=spec.schema())
    try:
        # Writing a part is light work: like the decode tasks, the write tasks reserve no CPU, or on a
        # node whose CPUs the actors hold they would wait (holding every row) until the actors finish.
        ds.write_datasink(sink, ray_remote_args={"num_cpus": 0})
    except BaseException:
        sink.discard()
        raise
    return sink.tally, actors


class _RayDataConsole(logging.Filter):
    """What Ray Data may print on the console during a job: warnings, and with the progress bar on,
    its progress lines (Ray Data logs progress instead of drawing bars when the terminal is not
    interactive); not its INFO lines on each execution's start and end, nor its hint on how to turn
    the bars back on after --no-progress, nor its errors: each comes with stack traces and ends the
    job, which the command then reports in one line (ray-data.log keeps them)."""

    def __init__(self, progress: bool) -> None:
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return False
        if record.levelno >= logging.WARNING:
            return not record.getMessage().startswith("Progress bars disabled")
        return self.progress and record.name.startswith("ray.data._internal.progress")


def _quiet_ray_data_console(progress: bool) -> None:
    """Keep Ray Data's console handler to :class:`_RayDataConsole`'s records (the session's
    ray-data.log file still gets everything): the single-process command prints only its progress
    bar and summary line."""
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            for old in [f for f in handler.filters if isinstance(f, _RayDataConsole)]:
                handler.removeFilter(old)
            handler.addFilter(_RayDataConsole(progress))


def _wants_gpu(provider: str, resources: dict[str, float]) -> bool:
    """Each actor reserves a GPU (num_gpus=1; Ray then shows it only that device) for cuda and
    tensorrt, and for auto on a cluster that has GPUs; otherwise actors reserve CPUs only."""
    return provider in ("cuda", "tensorrt") or (provider == "auto" and resources.get("GPU", 0) > 0)


def _actor_count(options: RayOptions, resources: dict[str, float], *, local: bool) -> int:
    """--actors, or by default one per GPU with a GPU provider, and on CPUs as many as the cluster's
    CPUs hold: the decode tasks reserve no CPU and share the cores, as the single-process command's
    decode threads do (on the project's 2-CPU machine, 2 actors of 1 thread beat 1 actor in both
    rounds on 100,000 images: benchmarks/results/ray_infer.md). A pool that cannot be placed is
    refused on a local instance (it would wait for ever) and warned about on a cluster (an
    autoscaler may add the nodes)."""
    gpu = _wants_gpu(options.provider, resources)
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    if options.actors is None:
        fit = int(gpus) if gpu else int(cpus // options.threads)
        return max(1, fit)
    need_cpu = options.actors * options.threads
    short = []
    if need_cpu > cpus:
        short.append(f"{need_cpu} CPUs ({options.actors} actors x {options.threads} threads) but it has {cpus:g}")
    if gpu and options.actors > gpus:
        short.append(f"{options.actors} GPUs but it has {gpus:g}")
    if short:
        msg = f"--actors {options.actors}: the Ray cluster needs " + "; ".join(short)
        if local:
            raise InferUsageError(msg)
        click.echo(f"Warning: {msg}; the job waits for the cluster to grow", err=True)
    return options.actors


def _check_directory_writable(target: str) -> None:
    """Raise now the error the Parquet sink would meet at the end: its staging directory is created
    beside ``target`` (a PermissionError or NotADirectoryError naming the path: exit 1, one line)."""
    parent = os.path.dirname(os.path.abspath(target.rstrip("/")))
    try:
        os.makedirs(parent, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(20, "a part of this path is a file, not a directory", parent) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".stn-infer-probe-", dir=parent)
    except OSError as exc:  # name the user's directory, not the probe
        raise type(exc)(exc.errno, exc.strerror, parent) from None
    os.close(fd)
    os.unlink(probe)


def _output_filesystem(target: str) -> tuple[Any, str, bool]:
    if is_uri(target):
        fs, path = _filesystem(target)
        return fs, path, False
    import pyarrow.fs as pafs  # optional [ray] extra

    return pafs.LocalFileSystem(), os.path.abspath(target), True


def _root_cause(exc: BaseException) -> str:
    """The error behind a failed Ray job, in one line: an StnDeployError raised in a task or actor
    keeps its text; otherwise the first exception of the chain (Ray's ``cause``, ``__cause__``,
    ``__context__``) that says something, skipping Ray Data's empty wrappers, by its first line."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and all(cur is not seen for seen in chain):
        chain.append(cur)
        cur = getattr(cur, "cause", None) or cur.__cause__ or cur.__context__
    for err in chain:
        if isinstance(err, StnDeployError):
            return str(err)
    for err in chain:
        text = str(err).strip()
        if text and type(err).__name__ not in ("SystemException", "UserCodeException"):
            return f"{type(err).__name__}: {text.splitlines()[0][:300]}"
    return one_line(exc, 300)


# -- the command ---------------------------------------------------------------------------------
# stn-infer options that only the local engine has: given with --engine ray, they are a usage error
# rather than silently ignored (Ray schedules decoding itself and assigns each actor its GPU).
LOCAL_ONLY = (
    "streams",
    "decode_workers",
    "decode_pool",
    "visualize",
    "strict_placement",
    "device_id",
    "trt_fp16",
    "trt_engine_cache",
    "cuda_tf32",
    "device_check",
)


def main_ray(ctx: click.Context) -> int:
    """``stn-infer ... --engine ray``, from the stn-infer command's parsed options; returns the exit status."""
    from click.core import ParameterSource

    p = ctx.params
    given = [name for name in LOCAL_ONLY if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise InferUsageError(f"{flags}: not available with --engine ray (the local engine's options)")
    options = RayOptions(
        address=p["ray_address"],
        actors=p["actors"],
        threads=p["threads"] or 1,
        provider=p["provider"],
        spin=p["ort_spin"],
        batch_size=p["batch_size"],
        top_k=p["top_k"],
        log_probs=p["log_probs"],
        max_pixels=p["max_pixels"],
        decode=p["decode_mode"],
        progress=p["progress"],
    )
    return run_command(p["images"], p["model_path"], p["output"], p["fmt"], options, as_json=p["as_json"])


def run_command(
    source: str, model_path: Path, output: str, fmt: str | None, options: RayOptions, *, as_json: bool
) -> int:
    """``stn-infer --engine ray``: run, print the summary line (and ``--json``), return the exit status."""
    with _ray_prints_to_stderr() as stdout:
        return _run_command(source, model_path, output, fmt, options, as_json=as_json, stdout=stdout)


@contextlib.contextmanager
def _ray_prints_to_stderr() -> Iterator[IO[str]]:
    """Ray's driver prints cluster messages (a task retried after its actor died, ...) on sys.stdout,
    where rows (``-o -``) and ``--json`` go: point sys.stdout at stderr while the job runs, and yield
    the real stdout for the rows and the summary."""
    real = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield real
    finally:
        real.flush()
        sys.stdout = real


def _run_command(
    source: str, model_path: Path, output: str, fmt: str | None, options: RayOptions, *, as_json: bool, stdout: IO[str]
) -> int:
    summary = infer_on_ray(source, model_path, output, fmt, options, stdout=stdout)
    where = "stdout" if output == "-" else output
    line = (
        f"stn-infer: {summary.ok} ok, {summary.failed} failed of {summary.images} images "
        f"in {summary.seconds:.2f} s ({summary.images_per_s:.0f} img/s, {summary.provider}) -> {where}"
    )
    click.echo(line, err=True)
    if as_json:
        click.echo(
            to_json(
                {
                    "engine": "ray",
                    "images": summary.images,
                    "ok": summary.ok,
                    "failed": summary.failed,
                    "skipped_non_image_files": summary.skipped_files,
                    "seconds": round(summary.seconds, 4),
                    "images_per_s": round(summary.images_per_s, 1),
                    "ray_init_seconds": round(summary.init_seconds, 4),
                    "output": str(output),
                    "format": summary.format,
                    "batch_size": options.batch_size,
                    "provider": summary.provider,
                    "ray": {
                        "address": options.address or "local",
                        "nodes": summary.nodes,
                        "cluster_cpus": summary.cluster_cpus,
                        "actors": summary.actors,
                        "threads_per_actor": summary.threads,
                        "rows_per_node": summary.rows_per_node,
                    },
                    "errors": summary.errors,
                }
            ),
            file=stdout,
        )
    return EXIT_SOME_FAILED if summary.failed else EXIT_OK
