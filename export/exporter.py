"""``export_model``: a checkpoint or torch.export archive → one verified ONNX file.

The pipeline, top to bottom:

1. load the source (:mod:`.sources`) and decide the outputs (``log_probs`` [+ ``theta``, ``warped``]);
2. build the ``ExportedProgram`` for the target's sampler form (:mod:`.targets`, :mod:`.sampling`);
3. translate it with the dynamo ONNX exporter, then clean the graph (strip the exporter's
   per-node debug metadata: stack traces with local paths), name the batch dim ``batch``,
   lower the opset where the target asks, and stamp the stn-deploy metadata;
4. write it to a temporary file beside ``output`` and run the named checks (:mod:`.checks`,
   :mod:`.parity`); with ``optimize``, write ONNX Runtime's offline-optimized graph and check
   that file again;
5. only if every check passed, move the file into place. A failed check raises
   :class:`~stn_deploy.errors.ExportCheckError` and leaves nothing at ``output``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import onnx
import torch

from stn_deploy import __version__
from stn_deploy import metadata as md
from stn_deploy.errors import ExportCheckError, StnDeployError, one_line
from stn_deploy.fileio import atomic_path
from stn_deploy.preprocessing import Preprocessing
from stn_deploy.runtime import create_session, session_options
from stn_deploy.train.checkpoint import versions

from . import checks
from .checks import TensorSpec, run_check
from .graph import op_counts
from .graph_rewrites import rewrite_exact
from .parity import measure_parity, parity_verdict
from .report import CheckResult, ExportReport
from .sources import ExportOptionError, ExportSource, load_source
from .targets import EXPORTER_MIN_OPSET, Target, check_target_form, get_target, lower_opset

BATCH_DIM = "batch"


def export_model(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    target: str = "ort",
    opset: int | None = None,
    with_theta: bool = False,
    with_warped: bool = False,
    optimize: bool = True,
    parity_samples: int = 256,
    preprocessing: Preprocessing | dict | None = None,
    class_names: list[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    trust_archive: bool = False,
) -> ExportReport:
    """Export ``source`` (.pt checkpoint or .pt2 archive) to ``output`` and prove the file.

    ``optimize`` (the default) applies the exact rewrites and ONNX Runtime's offline BASIC level
    and runs every check again on the file that is written; rewrites that do not fit the graph are
    skipped with the reason (the ``optimize`` check's message).

    Returns the :class:`ExportReport`; raises :class:`ExportCheckError` (nothing written) when
    a check fails, and another :class:`StnDeployError` for a bad source or bad options.
    """
    started = time.perf_counter()
    output = Path(output)
    try:
        tgt = get_target(target)
        opset = tgt.resolve_opset(opset)
    except ValueError as exc:
        raise ExportOptionError(str(exc)) from None
    if parity_samples < 1:
        raise ExportOptionError(f"--parity-samples must be positive, got {parity_samples}")

    src = load_source(source, preprocessing=preprocessing, class_names=class_names, trust_archive=trust_archive)
    outputs = [md.LOG_PROBS] + ([md.THETA] if with_theta else []) + ([md.WARPED] if with_warped else [])
    if src.kind == "archive" and len(outputs) > 1:
        raise ExportOptionError(
            f"{src.path}: --with-theta/--with-warped need a stn-deploy checkpoint, not a .pt2 archive"
        )

    model, theta_head = _export_onnx(src, tgt, opset, tuple(outputs))
    input_spec, output_specs = _declared_signature(src, outputs)
    reference = src.reference(tuple(outputs))
    has_theta_fn = src.checkpoint is not None and src.checkpoint.config.arch == "stn"
    theta_fn = _theta_fn(reference) if has_theta_fn else None
    parity_kwargs = dict(
        reference=reference,
        preprocessing=src.preprocessing,
        output_names=outputs,
        n_inputs=parity_samples,
        dataset=src.dataset,
        data_dir=Path(data_dir) if data_dir else None,
        theta_fn=theta_fn,
        align_corners=src.align_corners,
        progress=progress,
    )

    report = ExportReport(
        source=src.path, output=output, target=tgt.name, opset=opset, outputs=outputs, optimized=optimize
    )
    with atomic_path(output) as tmp:
        onnx.save(model, tmp)
        report.parity = _verify(tmp, model, tgt, input_spec, output_specs, theta_head, parity_kwargs, report.checks, "")
        _raise_on_failure(report)
        if optimize:
            before = op_counts(model)
            rewrites, skipped = _optimize(tmp, model)
            model = onnx.load(str(tmp))
            report.checks.append(_optimization_summary(before, op_counts(model), rewrites, skipped))
            report.optimized_parity = _verify(
                tmp, model, tgt, input_spec, output_specs, theta_head, parity_kwargs, report.checks, "optimized_"
            )
            _raise_on_failure(report)
        report.op_counts = op_counts(model)
        report.metadata = {p.key: p.value for p in model.metadata_props}
    report.seconds = time.perf_counter() - started
    return report


# -- export ------------------------------------------------------------------------------------
def _export_onnx(src: ExportSource, tgt: Target, opset: int, outputs: tuple[str, ...]):
    """The cleaned, stamped ONNX model and the θ head (for the extreme-θ parity probes)."""
    try:
        program = src.exported_program(outputs, portable=tgt.portable_sampler)
    except StnDeployError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.export failures become one line
        raise ExportCheckError(f"{src.path}: check 'export' failed: torch.export: {one_line(exc)}") from None
    theta_head = src.theta_head()  # its parameter names are the ONNX initializer names

    example = torch.zeros((2, *src.input_shape))
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), warnings.catch_warnings(), _quiet_loggers():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(
                program,
                (example,),
                dynamo=True,
                opset_version=max(opset, EXPORTER_MIN_OPSET),
                input_names=[md.INPUT],
                output_names=list(outputs),
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # noqa: BLE001
        raise ExportCheckError(f"{src.path}: check 'export' failed: torch.onnx.export: {one_line(exc)}") from None
    model = onnx_program.model_proto
    strip_debug_metadata(model)
    rename_batch_dim(model, BATCH_DIM)
    try:
        lower_opset(model, opset)
    except ValueError as exc:
        raise ExportCheckError(f"{src.path}: check 'export' failed: {exc}") from None
    stamp_metadata(model, src, tgt)
    return model, theta_head


@contextlib.contextmanager
def _quiet_loggers():
    """The exporter logs progress and opset notes at WARNING on the ``torch.onnx`` loggers."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def strip_debug_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's debug annotations: per-node stack traces, FX node text, module paths.

    They name local files and directories and make up a large share of a small model's bytes;
    nothing reads them at inference.
    """
    graphs = [model.graph]
    for graph in graphs:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
        for value in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
            del value.metadata_props[:]
        kept = [p for p in graph.metadata_props if not p.key.startswith("pkg.torch.")]
        del graph.metadata_props[:]
        graph.metadata_props.extend(kept)
    kept = [p for p in model.metadata_props if not p.key.startswith("pkg.torch.")]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)


def rename_batch_dim(model: onnx.ModelProto, name: str) -> None:
    """Give the input's symbolic batch dim one readable name everywhere it appears (e.g. ``s45`` → ``batch``)."""
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    old = dim0.dim_param if dim0.HasField("dim_param") else None
    if not old or old == name:
        return
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param == old:
                dim.dim_param = name


def stamp_metadata(model: onnx.ModelProto, src: ExportSource, tgt: Target, precision: str = "fp32") -> None:
    """Producer and the stn-deploy ``metadata_props`` (keys from :mod:`stn_deploy.metadata`)."""
    model.producer_name = md.PRODUCER_NAME
    model.producer_version = __version__
    model.doc_string = f"STN classifier exported by stn-export from {src.path.name} (target {tgt.name})"
    props = {
        md.CLASS_NAMES: json.dumps(src.class_names),
        md.PREPROCESSING: src.preprocessing.to_json(),
        md.CHECKPOINT_SHA256: src.sha256,
        md.METRICS: json.dumps(src.metrics, sort_keys=True, default=str),
        md.VERSIONS: json.dumps(versions(), sort_keys=True),
        md.TARGET: tgt.name,
        md.PRECISION: precision,
        md.DATASET: src.dataset,
    }
    if src.model_config is not None:
        props[md.MODEL_CONFIG] = json.dumps(src.model_config, sort_keys=True)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **props})


def _declared_signature(src: ExportSource, outputs: list[str]) -> tuple[TensorSpec, list[TensorSpec]]:
    c, h, w = src.input_shape
    shapes = {md.LOG_PROBS: (None, src.num_classes), md.THETA: (None, 2, 3), md.WARPED: (None, c, h, w)}
    return TensorSpec(md.INPUT, (None, c, h, w)), [TensorSpec(name, shapes[name]) for name in outputs]


def _theta_fn(reference):
    model = reference.model

    def theta(x: torch.Tensor) -> torch.Tensor:
        return model.theta(x)

    return theta


# -- verification ------------------------------------------------------------------------------
def session_factory(path: Path):
    """``make(overrides)`` → a CPU ONNX Runtime session of ``path``, initializers optionally replaced."""

    def make(overrides: dict | None = None):
        return create_session(path, initializers=overrides)

    return make


def _verify(
    path, model, tgt, input_spec, output_specs, theta_head, parity_kwargs, results: list[CheckResult], prefix: str
):
    """Run the named checks on the file at ``path`` (appended to ``results``); returns parity stats."""
    results.append(run_check(prefix + "onnx_checker", checks.onnx_checker, path))
    results.append(run_check(prefix + "shape_inference", checks.strict_shape_inference, model))
    results.append(run_check(prefix + "signature", checks.graph_signature, model, [input_spec], output_specs))
    results.append(run_check(prefix + "target_form", check_target_form, model, tgt))
    if not all(r.passed for r in results):
        return None
    make = session_factory(path)
    results.append(run_check(prefix + "batch_sizes", checks.batch_sizes, make(None), input_spec, output_specs))
    if not results[-1].passed:
        return None
    initializers = {i.name for i in model.graph.initializer}
    head = theta_head if theta_head and {theta_head.weight, theta_head.bias} <= initializers else None
    stats_box: list = []

    def parity():
        stats = measure_parity(make, theta_head=head, **parity_kwargs)
        if theta_head is not None and head is None:
            stats.notes.append("extreme_theta: θ-head initializers not found in this graph, kind skipped")
        stats_box.append(stats)
        return parity_verdict(stats)

    results.append(run_check(prefix + "parity", parity))
    return stats_box[0] if stats_box else None


def _raise_on_failure(report: ExportReport) -> None:
    """The first failed check as a one-line :class:`ExportCheckError` carrying the report (``.report``)."""
    for r in report.checks:
        if not r.passed:
            error = ExportCheckError(f"{report.output}: check '{r.name}' failed: {r.message} (no file written)")
            error.report = report
            raise error


def _optimize(path: Path, model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, str]]:
    """Rewrite ``path`` in place: the exact graph rewrites, then ONNX Runtime's offline BASIC level.

    The rewrites (:func:`.graph_rewrites.rewrite_exact`: ReLU before MaxPool so Conv+ReLU fuse,
    the affine grid as one MatMul, unread conv rows cropped) are standard operators and change
    no output value, so the file stays valid for every target; parity is re-checked after.

    BASIC applies the graph-level rewrites that keep a standard ONNX graph: constant folding,
    redundant node elimination (Identity, Dropout, ...), and fusions into standard operators
    (Conv+Add, Conv+Mul, ...). EXTENDED and ALL add fusions into ``com.microsoft`` contrib
    operators and layout changes that are specific to the provider they were made for (a
    CPU-fused graph would no longer be valid for the CUDA target or any non-ORT runtime), and
    ONNX Runtime applies them anyway when it loads the model. So BASIC is the level whose
    result stays a portable file for every target.

    Returns the number of places each exact rewrite changed, and why the others changed nothing.
    """
    rewritten, rewrites, skipped = rewrite_exact(model)
    onnx.save(rewritten, str(path))

    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".opt.tmp", dir=path.parent)
    os.close(fd)
    optimized = Path(name)
    try:
        create_session(path, session_options(optimization="basic", optimized_model_path=optimized))
        result = onnx.load(str(optimized))
        result.producer_name = model.producer_name
        result.producer_version = model.producer_version
        result.doc_string = model.doc_string
        onnx.helper.set_model_props(result, {p.key: p.value for p in model.metadata_props})
        onnx.save(result, str(path))
    finally:
        optimized.unlink(missing_ok=True)
    return rewrites, skipped


def _optimization_summary(
    before: dict[str, int], after: dict[str, int], rewrites: dict[str, int], skipped: dict[str, str]
) -> CheckResult:
    """What the offline optimization changed (informational: it passes; the checks after it judge)."""
    changed = {
        op: (before.get(op, 0), after.get(op, 0))
        for op in sorted(set(before) | set(after))
        if before.get(op, 0) != after.get(op, 0)
    }
    n_before, n_after = sum(before.values()), sum(after.values())
    if changed:
        what = ", ".join(f"{op} {a}->{b}" for op, (a, b) in changed.items())
    else:
        what = "no operator changed"
    applied = ", ".join(f"{name} x{n}" for name, n in rewrites.items() if n) or "none applied"
    message = f"exact rewrites: {applied}; then ONNX Runtime BASIC: {n_before} -> {n_after} nodes; {what}"
    if skipped:
        message += "; skipped: " + "; ".join(f"{name} ({why})" for name, why in skipped.items())
    details = {"before": before, "after": after, "rewrites": rewrites, "skipped": skipped}
    return CheckResult("optimize", True, message, details)
