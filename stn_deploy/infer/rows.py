"""stn-infer's output: one row per image file, as CSV or JSON Lines.

:class:`Prediction` is one row (a classified file, or a file with its error);
:func:`predictions_for` turns a decoded batch and the model's outputs into rows in the batch's
file order; :class:`RowWriter` streams them to a text file that :func:`open_output` writes
atomically.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from stn_deploy import cells  # hardening (issue 12)
from stn_deploy import metadata as md
from stn_deploy.errors import StnDeployError
from stn_deploy.fileio import atomic_path
from stn_deploy.images import DecodedBatch

OUTPUT_FORMATS = ("csv", "jsonl")


class OutputFormatError(StnDeployError):
    """The output format cannot be told from the path (exit 2, a usage error)."""

    exit_code = 2


@dataclass
class Prediction:
    """One output row: a classified file, or a file with its error."""

    path: str
    label: str | None = None
    index: int | None = None
    confidence: float | None = None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    theta: list[float] | None = None
    log_probs: list[float] | None = None
    error: str | None = None


def predictions_for(
    batch: DecodedBatch,
    outputs: dict[str, np.ndarray],
    class_names: Sequence[str],
    *,
    top_k: int,
    want_log_probs: bool = False,
) -> list[Prediction]:
    """Rows for one decoded batch, in the batch's file order."""
    log_probs = outputs.get(md.LOG_PROBS)
    theta = outputs.get(md.THETA)
    k = min(top_k, len(class_names))
    rows: list[Prediction] = []
    if log_probs is not None and len(log_probs):
        order = np.argsort(-log_probs, axis=1, kind="stable")[:, :k]
        top_lp = np.take_along_axis(log_probs, order, axis=1).astype(np.float64)
        top_p = np.exp(top_lp).tolist()
        order_l = order.tolist()
        theta_l = theta.reshape(len(theta), -1).tolist() if theta is not None else None
        lp_l = log_probs.tolist() if want_log_probs else None
    j = 0
    for result in batch.results:
        path = result.path.as_posix()  # as the user gave it: relative IMAGES give relative paths
        if not result.ok:
            rows.append(Prediction(path=path, error=result.error))
            continue
        idx = order_l[j]
        rows.append(
            Prediction(
                path=path,
                label=class_names[idx[0]],
                index=idx[0],
                confidence=top_p[j][0],
                top_k=[(class_names[c], p) for c, p in zip(idx, top_p[j])],
                theta=theta_l[j] if theta_l is not None else None,
                log_probs=lp_l[j] if lp_l is not None else None,
            )
        )
        j += 1
    return rows


class RowWriter:
    """Streams predictions as CSV or JSON Lines to an open text file."""

    # -- hardening (issue 12): every cell goes through stn_deploy.cells (docs/hardening.md):
    # missing or non-finite numbers are empty cells / JSON null (never a bare NaN), text is
    # UTF-8-safe, CSV text cells a spreadsheet would run as formulas get a leading apostrophe,
    # and records are quoted as RFC 4180 says (cells.csv_line: a \r in a file name splits a
    # row written by Python 3.11's csv.writer).
    def __init__(
        self, stream: IO[str], fmt: str, *, top_k: int, class_names: Sequence[str], theta: bool, log_probs: bool
    ) -> None:
        self.stream = stream
        self.fmt = fmt
        self.k = min(top_k, len(class_names))
        self.theta = theta
        self.log_probs = log_probs
        self.class_names = list(class_names)
        self._label_cells = {name: cells.csv_text_cell(name) for name in self.class_names}
        self._names_safe = all(cells.text(name) == name for name in self.class_names)
        if fmt == "csv":
            stream.write(cells.csv_line([cells.csv_text(c) for c in self.columns()]))

    def columns(self) -> list[str]:
        cols = ["path", "label", "index", "confidence"]
        for i in range(1, self.k + 1):
            cols += [f"top{i}_label", f"top{i}_prob"]
        if self.theta:
            cols += [f"theta_{i}" for i in range(6)]
        if self.log_probs:
            cols += [f"log_prob_{name}" for name in self.class_names]
        cols.append("error")
        return cols

    def write(self, rows: Sequence[Prediction]) -> None:
        if self.fmt == "csv":
            self.stream.write("".join(self._csv_record(r) for r in rows))
        else:
            self.stream.write("".join(self._json_record(r) for r in rows))

    def _label_cell(self, label: str) -> str:
        # Class names repeat on every row: their cells are made once (cells.csv_text_cell).
        cell = self._label_cells.get(label)
        return cell if cell is not None else cells.csv_text_cell(label)

    def _csv_record(self, r: Prediction) -> str:
        number = cells.csv_number  # number cells never need quoting; text cells come quoted
        line = [
            cells.csv_text_cell(r.path),
            "" if r.label is None else self._label_cell(r.label),
            number(r.index),
            number(r.confidence),
        ]
        for i in range(self.k):
            top = r.top_k[i] if i < len(r.top_k) else None
            line += [self._label_cell(top[0]), number(top[1])] if top is not None else ["", ""]
        if self.theta:
            line += [number(v) for v in (r.theta if r.theta is not None else [None] * 6)]
        if self.log_probs:
            values = r.log_probs if r.log_probs is not None else [None] * len(self.class_names)
            line += [number(v) for v in values]
        line.append(cells.csv_text_cell(r.error) if r.error else "")
        return ",".join(line) + "\n"

    def _json_record(self, r: Prediction) -> str:
        obj: dict[str, Any] = {
            "path": cells.text(r.path),
            "label": r.label,
            "index": r.index,
            "confidence": r.confidence,
            "top_k": [{"label": lab, "prob": p} for lab, p in r.top_k],
        }
        if self.theta:
            obj["theta"] = r.theta
        if self.log_probs:
            obj["log_probs"] = r.log_probs
        obj["error"] = r.error
        known = self._label_cells
        if r.error is None and self._names_safe and all(lab in known for lab, _ in r.top_k):
            # the usual row: every text already UTF-8-safe, so only a non-finite number needs json_safe
            try:
                return json.dumps(obj, allow_nan=False) + "\n"
            except ValueError:  # a NaN or an infinity: json_safe writes it as null
                pass
        return json.dumps(cells.json_safe(obj), allow_nan=False) + "\n"

    # -- end hardening


def rate_text(images_per_s: float) -> str:
    """The summary line's images/s: whole numbers, but two digits below 10 (a Ray job of one image
    in 6 s is 0.17 img/s, not "0")."""
    return f"{images_per_s:.2g}" if images_per_s < 10 else f"{images_per_s:.0f}"  # NaN (no time) prints nan


@contextlib.contextmanager
def open_output(output: str) -> Iterator[IO[str]]:
    """``-`` is stdout; a path is written to a temporary file moved into place at the end."""
    if output == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        yield f


def output_format(output: str, fmt: str | None) -> str:
    if fmt:
        return fmt
    if output == "-":
        return "csv"
    ext = Path(output).suffix.lower()
    if ext == ".csv":
        return "csv"
    if ext in (".jsonl", ".ndjson"):
        return "jsonl"
    if ext == ".parquet":
        raise OutputFormatError(f"{output}: Parquet is written by --engine ray; this engine writes .csv or .jsonl")
    if Path(output).is_dir():
        raise OutputFormatError(f"{output}: is a directory; --output takes a file (.csv or .jsonl)")
    raise OutputFormatError(
        f"{output}: cannot tell the output format from the extension (use .csv or .jsonl, or --format)"
    )
