"""The Ray job: connect or start Ray, size the actor pool, stream the dataset through it, tally the rows."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import click

from stn_deploy.decoders import DecodeSpec
from stn_deploy.errors import StnDeployError, one_line
from stn_deploy.fileio import check_writable
from stn_deploy.images import (
    DEFAULT_MAX_PIXELS,
)
from stn_deploy.infer.exits import InferUsageError
from stn_deploy.infer.pipeline import InferSummary
from stn_deploy.preprocessing import Preprocessing
from stn_deploy.runtime import Session

from .common import ACTOR_START_TIMEOUT_S, FAULT_ENV, MAX_RESTARTS, RayEngineError, is_uri
from .output import OutputPlan, Tally, parquet_sink_class, plan_output, write_ordered
from .sources import SourceListing, list_source, uri_filesystem
from .tasks import InferenceActor, RowSpec, decode_block


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
            InferenceActor,
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
        return write_ordered(ds.iter_batches(batch_size=None, batch_format="pyarrow"), plan, spec, stdout), actors
    fs, final, local = _output_filesystem(plan.target)
    sink = parquet_sink_class()(fs, final, local=local, schema=spec.schema())
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
        fs, path = uri_filesystem(target)
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
