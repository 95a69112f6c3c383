"""A Triton Inference Server model repository for an exported model (onnx + stn_deploy.metadata only).

``write_triton_repo("stn.onnx", "models/")`` writes::

    models/stn/config.pbtxt      backend onnxruntime, max_batch_size, dims without the batch axis,
                                 dynamic_batching, instance_group, the stn-deploy metadata as
                                 parameters, and for the cuda target a TensorRT accelerator block
    models/stn/1/model.onnx      the model file, unchanged
    models/stn/labels.txt        the class names, one per line (log_probs' label_filename, so
                                 Triton's classification extension answers with names)

Then ``tritonserver --model-repository=models`` serves it over the same protocol as stn-serve.

Why each choice:

* ``backend: "onnxruntime"``: the ONNX Runtime backend runs the file as stn-infer does.
* ``max_batch_size`` > 0 and ``dims`` without the batch axis: the exported graphs have a dynamic
  batch axis, so Triton may batch requests; the model config states per-request shapes.
* ``dynamic_batching { max_queue_delay_microseconds }`` without ``preferred_batch_size``:
  Triton's guide advises against preferred sizes for most models; the delay bounds the wait.
* ``instance_group``: KIND_GPU for the ``cuda`` target (its GridSample-16 form is what ONNX
  Runtime's CUDA provider and TensorRT run; TensorRT maps GridSample-20's ``linear`` mode to
  nearest, so the opset-20 ``ort`` form stays off TensorRT), KIND_CPU for ``ort`` and ``portable``.
* TensorRT (cuda target): ``precision_mode`` FP16 for an fp16 variant, else FP32, and a 1 GiB
  workspace. Only parameters the onnxruntime backend has documented for years are written.
* The ``stn_deploy.*`` metadata (class names, preprocessing, versions) as string parameters:
  the ONNX file carries it too, but config.pbtxt is what Triton's model-config API shows.

Every config written is valid text format for Triton's ``ModelConfig`` message; the tests parse
it with protobuf into ``model_config_pb2.ModelConfig`` from the tritonclient wheel.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import click
import onnx

from stn_deploy import metadata as md
from stn_deploy.console import report_errors
from stn_deploy.errors import StnDeployError
from stn_deploy.fileio import atomic_path, atomic_write_text

from .checks import load_onnx

VERSION = "1"
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_QUEUE_DELAY_US = 1000
TRT_WORKSPACE_BYTES = 1 << 30
LABELS_FILE = "labels.txt"
# A Triton model name is a directory name; stn-serve accepts the same set.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}


class TritonRepoError(StnDeployError):
    """The Triton model repository cannot be written (bad name, unusable model, unwritable DIR)."""


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str
    dims: tuple[int, ...]  # without the batch axis; -1 for a variable dimension


def _tensors(values: list[onnx.ValueInfoProto], source: Path) -> list[Tensor]:
    out = []
    for value in values:
        t = value.type.tensor_type
        if t.elem_type not in _ONNX_TO_TRITON:
            raise TritonRepoError(
                f"{source}: tensor '{value.name}' has an element type Triton's config cannot name ({t.elem_type})"
            )
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if not dims:
            raise TritonRepoError(f"{source}: tensor '{value.name}' has no batch axis")
        out.append(Tensor(value.name, _ONNX_TO_TRITON[t.elem_type], tuple(dims[1:])))
    return out


def _string(text: str) -> str:
    """A protobuf text-format string literal: printable ASCII as is, everything else as octal bytes."""
    out = []
    for byte in text.encode("utf-8"):
        ch = chr(byte)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 32 <= byte < 127:
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _dims(dims: tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def config_text(
    model: onnx.ModelProto,
    name: str,
    *,
    source: Path,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    instance_count: int = 1,
    labels: bool = True,
) -> str:
    """config.pbtxt for ``model`` (an ONNX file stn-export wrote) served as ``name``."""
    props = {p.key: p.value for p in model.metadata_props}
    try:
        md.ModelMetadata.from_props(props, source=str(source))  # refuse a file without stn-deploy's metadata
    except ValueError as exc:
        raise TritonRepoError(str(exc)) from None
    target = props.get(md.TARGET, "ort")
    precision = props.get(md.PRECISION, "fp32")
    initializers = {i.name for i in model.graph.initializer}
    inputs = _tensors([v for v in model.graph.input if v.name not in initializers], source)
    outputs = _tensors(list(model.graph.output), source)
    gpu = target == "cuda"

    lines = [
        f"name: {_string(name)}",
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size}",
        "",
    ]
    for kind, tensors in (("input", inputs), ("output", outputs)):
        lines.append(f"{kind} [")
        for i, t in enumerate(tensors):
            lines += [
                "  {",
                f"    name: {_string(t.name)}",
                f"    data_type: {t.data_type}",
                f"    dims: {_dims(t.dims)}",
            ]
            if kind == "output" and labels and t.name == md.LOG_PROBS:
                lines.append(f"    label_filename: {_string(LABELS_FILE)}")
            lines.append("  }" + ("," if i < len(tensors) - 1 else ""))
        lines += ["]", ""]
    lines += [
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
        "",
        "instance_group [",
        "  {",
        f"    count: {instance_count}",
        f"    kind: {'KIND_GPU' if gpu else 'KIND_CPU'}",
        "  }",
        "]",
        "",
    ]
    if gpu:
        lines += [
            "optimization {",
            "  execution_accelerators {",
            "    gpu_execution_accelerator: [",
            "      {",
            '        name: "tensorrt"',
            f'        parameters {{ key: "precision_mode" value: "{"FP16" if precision == "fp16" else "FP32"}" }}',
            f'        parameters {{ key: "max_workspace_size_bytes" value: "{TRT_WORKSPACE_BYTES}" }}',
            "      }",
            "    ]",
            "  }",
            "}",
            "",
        ]
    for key in sorted(props):
        if key.startswith("stn_deploy."):
            lines.append(f"parameters {{ key: {_string(key)} value: {{ string_value: {_string(props[key])} }} }}")
    return "\n".join(lines) + "\n"


def write_triton_repo(
    model_path: str | os.PathLike[str],
    repo: str | os.PathLike[str],
    *,
    name: str | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    instance_count: int = 1,
) -> Path:
    """Write ``repo/<name>/config.pbtxt``, ``repo/<name>/1/model.onnx`` and ``labels.txt``; returns ``repo/<name>``.

    ``name`` defaults to the model file's stem (``stn.cuda.onnx`` -> ``stn.cuda``). Each file is
    written atomically; other files in the directory are left alone.
    """
    model_path = Path(model_path)
    name = name or model_path.stem
    if not _NAME.match(name) or ".." in name:
        raise TritonRepoError(
            f"Triton model name {name!r}: use letters, digits, '.', '_' or '-' (it becomes a directory name)"
        )
    if max_batch_size < 1 or instance_count < 1 or max_queue_delay_us < 0:
        raise TritonRepoError("max_batch_size and instance_count must be >= 1, max_queue_delay_us >= 0")
    model = load_onnx(Path(model_path), load_external_data=False)  # one-line ModelFileError when unusable
    text = config_text(
        model,
        name,
        source=model_path,
        max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us,
        instance_count=instance_count,
    )
    meta = md.ModelMetadata.from_props({p.key: p.value for p in model.metadata_props}, source=str(model_path))
    directory = Path(repo) / name
    try:
        (directory / VERSION).mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / VERSION / "model.onnx") as tmp:
            shutil.copyfile(model_path, tmp)
        labels = "".join(" ".join(label.splitlines()) + "\n" for label in meta.class_names)
        atomic_write_text(directory / LABELS_FILE, labels)
        atomic_write_text(directory / "config.pbtxt", text)
    except OSError as exc:
        where = exc.filename or directory
        raise TritonRepoError(f"{where}: cannot write the Triton model repository ({exc.strerror or exc})") from None
    return directory


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("repo", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default=None, help="Model name (the directory under REPO). Default: MODEL's file stem.")
@click.option("--max-batch-size", default=DEFAULT_MAX_BATCH_SIZE, show_default=True, type=click.IntRange(min=1))
@click.option("--max-queue-delay-us", default=DEFAULT_QUEUE_DELAY_US, show_default=True, type=click.IntRange(min=0))
@click.option("--instances", default=1, show_default=True, type=click.IntRange(min=1), help="instance_group count.")
@report_errors
def main(
    model: Path, repo: Path, name: str | None, max_batch_size: int, max_queue_delay_us: int, instances: int
) -> None:
    """Write a Triton model repository entry for MODEL (an .onnx file stn-export wrote) under REPO:
    REPO/NAME/config.pbtxt, REPO/NAME/1/model.onnx and REPO/NAME/labels.txt.
    (stn-export --triton-repo REPO does the same right after an export.)"""
    directory = write_triton_repo(
        model,
        repo,
        name=name,
        max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us,
        instance_count=instances,
    )
    click.echo(
        f"Wrote Triton model {directory.name!r} to {directory} (tritonserver --model-repository={repo})", err=True
    )


if __name__ == "__main__":  # pragma: no cover
    main()
