"""The work Ray runs: decode tasks (the local engine's decoders) and inference actors holding a Session."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stn_deploy import metadata as md
from stn_deploy.decoders import DecodeSpec, decode_data, decode_file
from stn_deploy.images import (
    DecodedBatch,
    DecodeResult,
)
from stn_deploy.infer.rows import Prediction, RowWriter, predictions_for
from stn_deploy.preprocessing import Preprocessing
from stn_deploy.runtime import ProviderConfig, Session

from .common import HIDDEN


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


class InferenceActor:
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
