"""Where the rows go: one ordered file written by the driver, or Parquet parts written by Ray tasks."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from stn_deploy.fileio import atomic_path
from stn_deploy.infer.exits import InferUsageError
from stn_deploy.infer.rows import open_output

from .common import HIDDEN, ROWS_PER_PART, is_uri
from .tasks import RowSpec


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


def parquet_sink_class() -> type:
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


def write_ordered(batches: Iterator[Any], plan: OutputPlan, spec: RowSpec, stdout: IO[str]) -> Tally:
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
