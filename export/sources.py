"""What stn-export exports from: a stn-deploy checkpoint (.pt) or a torch.export archive (.pt2).

An :class:`ExportSource` gives the exporter two things per set of outputs: the PyTorch
reference (eval mode) that parity is measured against, and the ``ExportedProgram`` the ONNX
exporter translates. The two differ only where a target asks for it: for ``portable`` the
program samples with :func:`~stn_deploy.export.sampling.portable_grid_sample` while the
reference keeps PyTorch's own ``grid_sample``, so parity measures the decomposition too.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor, nn

from stn_deploy.errors import CheckpointError, StnDeployError, one_line
from stn_deploy.fileio import input_file_problem
from stn_deploy.metadata import LOG_PROBS, THETA, WARPED
from stn_deploy.preprocessing import Preprocessing
from stn_deploy.train.checkpoint import Checkpoint, file_sha256, load_checkpoint
from stn_deploy.train.model import STNClassifier

from .archive import check_archive
from .sampling import portable_grid_sampler_decomposition
from .theta_head import ThetaHead, find_theta_head

ARCHIVE_SUFFIXES = (".pt2",)


class ExportOptionError(StnDeployError):
    """Export options that do not fit the source (e.g. --with-theta for a .pt2 archive)."""


class STNHead(nn.Module):
    """An :class:`STNClassifier` whose forward returns the requested outputs in graph order."""

    def __init__(self, model: STNClassifier, outputs: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.outputs = outputs

    def forward(self, image: Tensor) -> Tensor | tuple[Tensor, ...]:
        warped, theta = self.model.transform(image)
        values = {LOG_PROBS: self.model.classify(warped), THETA: theta, WARPED: warped}
        if self.outputs == (LOG_PROBS,):
            return values[LOG_PROBS]
        return tuple(values[name] for name in self.outputs)


@dataclass
class ExportSource:
    """A model to export, with everything that travels into the ONNX metadata."""

    path: Path
    kind: str  # "checkpoint" | "archive"
    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    class_names: list[str]
    preprocessing: Preprocessing
    sha256: str
    dataset: str = "unknown"
    metrics: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] | None = None
    align_corners: bool | None = None
    checkpoint: Checkpoint | None = None
    archive: Any = None  # torch.export.ExportedProgram for .pt2 sources

    def theta_head(self):
        """The Linear layer that outputs θ, by parameter name (None for a model without one).

        For a checkpoint it is the model's ``fc_loc[-1]`` (under :class:`STNHead`'s ``model.``
        prefix); for an archive it is found by walking back from grid_sample in its graph.
        """
        if self.checkpoint is not None:
            if self.checkpoint.config.arch != "stn":
                return None
            last = max(
                int(k.split(".")[1])
                for k in self.checkpoint.state_dict
                if k.startswith("fc_loc.") and k.endswith(".weight")
            )
            return ThetaHead(f"model.fc_loc.{last}.weight", f"model.fc_loc.{last}.bias")
        return find_theta_head(self.archive)

    # -- the PyTorch reference ---------------------------------------------------------------
    def reference(self, outputs: tuple[str, ...]) -> nn.Module:
        """The eval-mode PyTorch model parity is measured against."""
        if self.checkpoint is not None:
            return STNHead(self.checkpoint.build_model(), outputs).eval()
        return self.archive.module()  # exported in eval mode by the user; .eval() is not allowed here

    # -- what the ONNX exporter translates ---------------------------------------------------
    def exported_program(self, outputs: tuple[str, ...], *, portable: bool) -> torch.export.ExportedProgram:
        if self.checkpoint is not None:
            module = self.reference(outputs)
            if portable:
                from .sampling import portable_grid_sample

                module.model.sampler = portable_grid_sample
            example = torch.zeros((2, *self.input_shape))
            batch = torch.export.Dim("batch", min=1)
            return torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
        program = self.archive
        if portable:
            table = {
                torch.ops.aten.grid_sampler.default: portable_grid_sampler_decomposition,
                torch.ops.aten.grid_sampler_2d.default: portable_grid_sampler_decomposition,
            }
            try:
                program = program.run_decompositions(table)
            except NotImplementedError as exc:
                raise ExportOptionError(f"{self.path}: {' '.join(str(exc).split())[:300]}") from None
        return program


def load_source(
    path: str | Path,
    *,
    preprocessing: Preprocessing | dict[str, Any] | None = None,
    class_names: list[str] | None = None,
    trust_archive: bool = False,
) -> ExportSource:
    """A checkpoint (.pt) or a torch.export archive (.pt2); a bad file is a one-line error.

    ``preprocessing`` and ``class_names`` apply to archives only (a checkpoint carries its own).
    For an archive, ``preprocessing`` may be a full :class:`Preprocessing` or a dict of some of
    its fields; the rest default from the program's input shape (mean/std 0.5).
    ``trust_archive`` skips :func:`.archive.check_archive` (pickles are refused either way).
    """
    path = Path(path)
    if path.suffix in ARCHIVE_SUFFIXES:
        return _load_archive(path, preprocessing, class_names, trust_archive)
    ckpt = load_checkpoint(path)
    ckpt.build_model()  # a state_dict that does not fit its config fails here, before any export
    cfg = ckpt.config
    if preprocessing is not None or class_names is not None:
        raise ExportOptionError(
            f"{path}: a checkpoint carries its own preprocessing and class names "
            "(--image-size/--mean/--std/--channels/--class-names are for .pt2 archives)"
        )
    if ckpt.preprocessing.input_shape != (cfg.in_channels, cfg.image_size, cfg.image_size):
        raise CheckpointError(
            f"{path}: preprocessing produces {ckpt.preprocessing.input_shape} but the model takes "
            f"{(cfg.in_channels, cfg.image_size, cfg.image_size)}"
        )
    return ExportSource(
        path=path,
        kind="checkpoint",
        input_shape=(cfg.in_channels, cfg.image_size, cfg.image_size),
        num_classes=cfg.num_classes,
        class_names=list(ckpt.class_names),
        preprocessing=ckpt.preprocessing,
        sha256=file_sha256(path),
        dataset=ckpt.dataset,
        metrics=dict(ckpt.metrics),
        model_config=cfg.to_dict(),
        align_corners=cfg.align_corners,
        checkpoint=ckpt,
    )


def _load_archive(
    path: Path, preprocessing: Preprocessing | dict | None, class_names: list[str] | None, trust_archive: bool = False
) -> ExportSource:
    if problem := input_file_problem(path, directory="is a directory, not a torch.export archive"):
        raise CheckpointError(f"{path}: {problem}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a torch.export archive (not a zip file)")
    # -- hardening (issue 12): torch.export.load and program.module() run archive text as code
    if not trust_archive:
        check_archive(path)  # before torch reads any of it
    # -- end hardening
    try:
        with _no_code_from_pickles():
            program = torch.export.load(path)
    except _PickleRefused as exc:
        raise CheckpointError(f"{path}: refused: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any failure to deserialize means "not an archive"
        msg = " ".join(str(exc).split())
        if "weights_only" in msg or "Unsupported global" in msg:
            raise CheckpointError(
                f"{path}: refused: unpickling part of the archive would run code (only plain tensors are loaded)"
            ) from None
        raise CheckpointError(f"{path}: not a torch.export archive ({type(exc).__name__}: {msg[:200]})") from None

    inputs = [s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    if len(inputs) != 1:
        raise CheckpointError(f"{path}: the exported program takes {len(inputs)} inputs; stn-export needs one image")
    placeholder = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == inputs[0].arg.name)
    fake = placeholder.meta.get("val")
    if fake is None or fake.dim() != 4:
        raise CheckpointError(f"{path}: the program's input is not an [N, C, H, W] image batch")
    if not isinstance(fake.shape[0], torch.SymInt):
        raise CheckpointError(
            f"{path}: the program's batch dimension is fixed at {fake.shape[0]}; export it with "
            "dynamic_shapes={'<input>': {0: torch.export.Dim('batch')}}"
        )
    try:
        c, h, w = (int(d) for d in fake.shape[1:])
    except TypeError:
        raise CheckpointError(f"{path}: only the batch dimension of the input may be dynamic") from None
    samplers = [n for n in program.graph.nodes if n.op == "call_function" and "grid_sampler" in str(n.target)]
    if not samplers:
        raise CheckpointError(f"{path}: the program calls no grid_sample (not an STN-style model)")

    example = torch.zeros((2, c, h, w))
    try:
        with torch.no_grad():
            out = program.module()(example)
    except Exception as exc:  # noqa: BLE001 - e.g. a batch-dimension guard (min=3) that a batch of 2 breaks
        raise CheckpointError(f"{path}: the program does not run on a batch of 2 ({one_line(exc, 200)})") from None
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 2:
        raise CheckpointError(f"{path}: the program must return one [N, classes] log-probability tensor")
    num_classes = int(out.shape[1])

    if not isinstance(preprocessing, Preprocessing):
        # Defaults from the program's input shape, overridden by the fields the user gave.
        order = {1: "L", 3: "RGB"}.get(c)
        if order is None:
            raise ExportOptionError(f"{path}: {c}-channel input; stn-export handles 1 (L) or 3 (RGB) channels")
        fields = {"image_size": (h, w), "mean": (0.5,) * c, "std": (0.5,) * c, "channel_order": order}
        fields.update(preprocessing or {})
        for key in ("mean", "std"):  # one value stands for every channel (--mean 0.1307)
            if isinstance(fields[key], (tuple, list)) and len(fields[key]) == 1:
                fields[key] = tuple(fields[key]) * c
        try:
            preprocessing = Preprocessing(**fields)
        except (TypeError, ValueError) as exc:
            raise ExportOptionError(f"{path}: bad preprocessing ({exc})") from None
    if preprocessing.input_shape != (c, h, w):
        raise ExportOptionError(
            f"{path}: preprocessing produces {preprocessing.input_shape} but the program takes {(c, h, w)}"
        )
    if class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ExportOptionError(f"{path}: {len(class_names)} class names for a {num_classes}-class model")
    align = {bool(n.args[-1]) for n in samplers if isinstance(n.args[-1], bool)}
    return ExportSource(
        path=path,
        kind="archive",
        input_shape=(c, h, w),
        num_classes=num_classes,
        class_names=list(class_names),
        preprocessing=preprocessing,
        sha256=file_sha256(path),
        dataset="unknown",
        align_corners=align.pop() if len(align) == 1 else None,
        archive=program,
    )


class _PickleRefused(Exception):
    pass


@contextlib.contextmanager
def _no_code_from_pickles():
    """Load a .pt2 archive without letting any pickle inside it import or call code.

    ``torch.export.load`` unpickles some archive members with ``weights_only=False`` (pickled
    weights and constants, and a fallback for the sample inputs) and opaque constants with
    ``pickle.loads``, so a crafted archive could run code on load. For the duration of the
    load, every ``torch.load`` is forced to ``weights_only=True`` (plain tensors and containers
    only) and the two object unpicklers refuse outright; an STN's weights need neither.
    """
    original_load = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original_load(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise _PickleRefused("the archive holds pickled Python objects; unpickling them could run code")

    with (
        mock.patch.object(torch, "load", safe_load),
        mock.patch.object(pickle, "loads", refuse),
        mock.patch.object(torch._C, "_pickle_load_obj", refuse),
    ):
        yield


def parse_class_names(text: str | None) -> list[str] | None:
    """``--class-names``: a comma-separated list, or a path to a text file (one name a line) or JSON list."""
    if text is None:
        return None
    p = Path(text)
    if p.is_file():
        try:
            raw = p.read_text(encoding="utf-8")
            names = json.loads(raw) if p.suffix == ".json" else None
        except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
            raise ExportOptionError(f"{p}: cannot read class names ({' '.join(str(exc).split())[:200]})") from None
        if p.suffix == ".json":
            if not isinstance(names, list):
                raise ExportOptionError(f"{p}: class names must be a JSON list, got {type(names).__name__}")
            return [str(n) for n in names]
        return [line.strip() for line in raw.splitlines() if line.strip()]
    return [n.strip() for n in text.split(",") if n.strip()]
