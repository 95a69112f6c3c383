"""Placement and parity of exported STN models on an execution provider: the GPU check's Python half.

``benchmarks/gpu_check.sh`` calls this script for the parts of issue 16 that are measured in
Python (see ``benchmarks/GPU.md``). It has four sub-commands:

``probe-ort``
    Imports onnxruntime (and nothing that loads CUDA for it, such as torch), prints its version,
    file and providers, and runs a tiny graph on the requested provider with the profiler on, so
    that "CUDA is available" means a node really ran on it. Exit 0 only then.
``probe-provider MODEL``
    Opens MODEL through :class:`stn_deploy.runtime.Session` on one provider (TensorRT, say) and
    reports whether it started; run in its own process, so that a provider whose libraries are
    missing cannot take the parity run down with it.
``check MODEL...``
    For each ONNX file: the placement report of ``Session(MODEL, provider)`` (which node ran on
    which provider; the ``cuda`` target wants every compute node, GridSample included, on CUDA),
    then parity of that session's ``log_probs`` against PyTorch (the checkpoint's model) on the
    CPU and, where torch sees a GPU, on CUDA twice: with torch's default math (cuDNN may use TF32
    for fp32 convolutions on Ampere and later) and with TF32 off (IEEE fp32). On CUDA a second
    ONNX Runtime session with the provider option ``use_tf32=0`` is compared too, so a TF32
    difference is told apart from a kernel bug. Inputs: random images, the model's dataset test
    split (real digits), and "extreme θ" inputs whose θ samples outside the image (the θ head's
    initializers replaced, as ``stn-export``'s own parity check does), in batches of 1, an odd
    size, then large ones (256, 1024 by default). fp32 models are held to max |Δ log-prob| ≤ 1e-4
    and identical top-1; fp16 models to the fp16 bounds of ``stn_deploy.export.precision``.
``summarize RESULTS``
    Reads the JSON files the other steps left in RESULTS and writes ``summary.md``: the step
    table, placement, parity, stn-infer and the stn-bench rows against the issue's targets.

The comparison and summary logic is plain numpy and is unit-tested on the CPU
(tests/test_gpu_parity.py); ``check --provider cpu`` runs the whole path on a CPU-only machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

FP32_MAX_ABS_DIFF = 1e-4  # the project's parity bar (export/parity.py)
# fp16 bounds: the ones stn-export's fp16 gate uses (export/precision.py); copied so that this module
# and its tests import no torch; tests/test_gpu_parity.py checks they are still equal.
FP16_MAX_ABS_DIFF = 5e-2
FP16_MIN_TOP1_AGREEMENT = 99.0
FP16_VISIBLE_LOG_PROB = -10.0
DEFAULT_BATCHES = (1, 7, 256, 1024)
# θ' = s·θ + [[0, 0, tx], [0, 0, ty]] (scale s, shift tx, ty): grids partly or wholly outside the image.
THETA_PROBES = ((1.0, 1.5, 0.0), (2.0, -1.2, 1.3), (0.5, 0.6, -1.8), (1.5, 2.5, 2.5))
# Issue 16's targets, judged by `summarize` on stn-bench's rows.
TARGET_FP32_VS_EAGER_256 = 1.0
TARGET_FP16_VS_FP32_256 = 1.5
TARGET_BATCH1_P50_MS = 0.3

CPU_EP = "CPUExecutionProvider"
PROVIDER_NAMES = {"cpu": CPU_EP, "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


# -- comparison (numpy only) -----------------------------------------------------------------------
def batch_plan(n: int, batches: tuple[int, ...] = DEFAULT_BATCHES) -> list[tuple[int, int]]:
    """(start, stop) slices over ``n`` inputs: one batch of each size in ``batches`` in turn, then
    batches of the largest size, the last one partial."""
    out: list[tuple[int, int]] = []
    start = 0
    sizes = list(batches)
    while start < n:
        size = sizes.pop(0) if sizes else batches[-1]
        out.append((start, min(n, start + size)))
        start = out[-1][1]
    return out


def compare(got: np.ndarray, want: np.ndarray, *, visible_floor: float | None = None) -> dict[str, Any]:
    """``got`` against ``want`` (log-probabilities [N, classes]): max and mean |Δ|, top-1 agreement (%).

    With ``visible_floor``, ``max_abs`` only counts classes whose reference log-prob is at least
    that (fp16: a probability under e^-10 is reported with a relative, not an absolute, error);
    ``max_abs_all`` counts every class. A NaN anywhere makes the differences NaN (never a pass).
    """
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape or got.ndim != 2:
        raise ValueError(f"shapes differ or are not [N, classes]: {got.shape} vs {want.shape}")
    diff = np.abs(got - want)
    nan = bool(np.isnan(diff).any())
    if visible_floor is not None:
        mask = want >= visible_floor
        seen = diff[mask] if mask.any() else np.zeros(1)
    else:
        seen = diff
    return {
        "n": len(got),
        "max_abs": math.nan if nan else float(seen.max()),
        "max_abs_all": math.nan if nan else float(diff.max()),
        "mean_abs": math.nan if nan else float(diff.mean()),
        "top1_agreement": float((got.argmax(1) == want.argmax(1)).mean() * 100.0),
        "nan": nan,
    }


def bounds_for(precision: str) -> dict[str, float]:
    if precision == "fp16":
        return {
            "max_abs": FP16_MAX_ABS_DIFF,
            "min_top1": FP16_MIN_TOP1_AGREEMENT,
            "visible_floor": FP16_VISIBLE_LOG_PROB,
        }
    return {"max_abs": FP32_MAX_ABS_DIFF, "min_top1": 100.0}


def verdict(stats: dict[str, Any], precision: str) -> bool:
    """Within the bounds of ``precision`` ("not >": a NaN difference fails)."""
    b = bounds_for(precision)
    return bool(stats["max_abs"] <= b["max_abs"] and stats["top1_agreement"] >= b["min_top1"] and not stats["nan"])


def compare_kinds(got: dict[str, np.ndarray], want: dict[str, np.ndarray], precision: str) -> dict[str, Any]:
    """Compare per input kind and over all kinds together; adds the verdict and the bounds."""
    floor = bounds_for(precision).get("visible_floor")
    kinds = [k for k in got if k in want]
    by_kind = {k: compare(got[k], want[k], visible_floor=floor) for k in kinds}
    total = compare(
        np.concatenate([got[k] for k in kinds]), np.concatenate([want[k] for k in kinds]), visible_floor=floor
    )
    total["by_kind"] = by_kind
    total["bounds"] = bounds_for(precision)
    total["passed"] = verdict(total, precision)
    return total


def placement_verdict(report: dict[str, Any], provider: str) -> dict[str, Any]:
    """From a ``PlacementReport.to_dict()``: where GridSample ran, which compute nodes fell back to
    the CPU, and whether every compute node ran on ``provider``'s EP."""
    wanted = PROVIDER_NAMES.get(provider, provider)
    nodes = report.get("nodes", [])
    grid = sorted({n["provider"] for n in nodes if n["op_type"] == "GridSample"})
    fallback = report.get("cpu_fallback", [])
    return {
        "provider": wanted,
        "nodes": len(nodes),
        "counts": report.get("counts", {}),
        "gridsample_on": grid,
        "cpu_fallback_ops": sorted({n["op_type"] for n in fallback}),
        "cpu_fallback": len(fallback),
        "copies": report.get("copies", 0),
        "all_compute_on_provider": bool(nodes) and not fallback and any(n["provider"] == wanted for n in nodes),
    }


# -- running models (onnxruntime; torch only for the references) --------------------------------------
def _ort():
    import onnxruntime as ort

    return ort


def _provider_chain(provider: str, *, ieee: bool = False) -> list[Any]:
    """Providers for a raw InferenceSession, like stn_deploy.runtime's chain; ``ieee`` turns CUDA's
    TF32 math off (the ``use_tf32`` provider option)."""
    if provider == "cpu":
        return [CPU_EP]
    # HEURISTIC: these extra sessions see a handful of shapes each, and cuDNN's default EXHAUSTIVE search
    # would time every convolution algorithm for each of them (the Session under test keeps the default).
    opts: dict[str, str] = {"device_id": "0", "cudnn_conv_algo_search": "HEURISTIC"}
    if ieee:
        opts["use_tf32"] = "0"
    return [(PROVIDER_NAMES[provider], opts), CPU_EP]


def raw_session(path: Path, provider: str, *, ieee: bool = False, overrides: dict[str, np.ndarray] | None = None):
    """A plain ONNX Runtime session (θ-head initializers optionally replaced).

    The replaced initializers go into a copy of the model (the session is built from its bytes),
    not through ``SessionOptions.add_initializer``: on the first H200 run (ONNX Runtime 1.31.1)
    the CUDA sessions built with add_initializer gave extreme-θ outputs that agreed with PyTorch's
    on 19-38% of inputs, while every other input kind agreed to 4e-6 (benchmarks/GPU.md).
    """
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    model: str | bytes = str(path)
    if overrides:
        import onnx
        from onnx import numpy_helper

        proto = onnx.load(str(path))
        replaced = set()
        for tensor in proto.graph.initializer:
            if tensor.name in overrides:
                tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(overrides[tensor.name]), tensor.name))
                replaced.add(tensor.name)
        if replaced != set(overrides):
            raise RuntimeError(f"{path}: initializers {sorted(set(overrides) - replaced)} not in the graph")
        model = proto.SerializeToString()
    session = ort.InferenceSession(model, options, providers=_provider_chain(provider, ieee=ieee))
    want = PROVIDER_NAMES[provider]
    if session.get_providers()[0] != want:
        raise RuntimeError(f"{path}: {want} did not start (session providers {session.get_providers()})")
    return session


def run_batches(fn, images: np.ndarray, batches: tuple[int, ...]) -> np.ndarray:
    return np.concatenate([fn(images[a:b]) for a, b in batch_plan(len(images), batches)])


class TorchReference:
    """The checkpoint's model in PyTorch on one device, outputs cached per input kind.

    On CUDA, ``ieee`` None keeps torch's default fp32 math (as found when this object was made),
    True runs convolutions and matmuls in IEEE fp32 (TF32 off); each run sets its own mode, so
    the references can be used in any order.
    """

    def __init__(self, checkpoint: Path, device: str, ieee: bool | None) -> None:
        import torch

        try:  # the layout of issue 11 first, then the current one
            from stn_deploy.train.checkpoint import load_checkpoint
        except ImportError:
            from stn_deploy.checkpoint import load_checkpoint

        self.torch = torch
        self.device, self.ieee = device, ieee
        ckpt = load_checkpoint(checkpoint)
        self.dataset = str(getattr(ckpt, "dataset", "") or "")
        self.model = ckpt.build_model().to(device).eval()
        self.name = f"torch-{device}" + ("-ieee" if ieee else "")
        self._math = (ieee_math(torch) if ieee else fp32_math(torch)) if device == "cuda" else {}
        self._cache: dict[str, np.ndarray] = {}

    def math(self) -> dict[str, Any]:
        return dict(self._math)

    def run(self, kind: str, images: np.ndarray, batches: tuple[int, ...], overrides: dict | None = None) -> np.ndarray:
        if kind not in self._cache:
            torch = self.torch
            apply_math(torch, self._math)

            def fn(x: np.ndarray) -> np.ndarray:
                with torch.inference_mode():
                    xt = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
                    if overrides:
                        params = {k: v.to(self.device) for k, v in overrides.items()}
                        out = torch.func.functional_call(self.model, params, (xt,), strict=False)
                    else:
                        out = self.model(xt)
                    return out.float().cpu().numpy()  # .cpu() waits for the GPU

            self._cache[kind] = run_batches(fn, images, batches)
        return self._cache[kind]


# torch's fp32 math switches for CUDA: the torch >= 2.9 names, else the older allow_tf32 flags.
_NEW_MATH = ("cudnn.conv.fp32_precision", "cuda.matmul.fp32_precision")
_OLD_MATH = ("cudnn.allow_tf32", "cuda.matmul.allow_tf32")


def _attr_path(torch, dotted: str):
    obj = torch.backends
    *parents, leaf = dotted.split(".")
    for part in parents:
        obj = getattr(obj, part)
    return obj, leaf


def fp32_math(torch) -> dict[str, Any]:
    """torch's current fp32 math settings for CUDA convolutions and matmuls (readable on any build)."""
    try:
        out = {}
        for key in _NEW_MATH:
            obj, leaf = _attr_path(torch, key)
            out[key] = str(getattr(obj, leaf))
        return out
    except AttributeError:  # older torch
        return {key: bool(getattr(*_attr_path(torch, key))) for key in _OLD_MATH}


def ieee_math(torch) -> dict[str, Any]:
    """The settings that turn TF32 off, in the names this torch uses."""
    return {k: ("ieee" if isinstance(v, str) else False) for k, v in fp32_math(torch).items()}


def apply_math(torch, settings: dict[str, Any]) -> None:
    for key, value in settings.items():
        obj, leaf = _attr_path(torch, key)
        setattr(obj, leaf, value)


FLOAT = 1  # onnx.TensorProto.FLOAT


def theta_head(model, initializers: dict[str, tuple[tuple[int, ...], int]]) -> dict[str, str] | None:
    """{PyTorch parameter name: ONNX initializer name} of the θ head's weight and bias, when the graph
    keeps them as fp32 initializers of the same shapes (stn-export names them ``model.<parameter>``).
    ``initializers``: name -> (dims, data type). Otherwise (``--optimize`` may fold them) None, and
    the extreme-θ kind is skipped."""
    if getattr(model, "fc_loc", None) is None:
        return None
    index = len(model.fc_loc) - 1
    params = dict(model.named_parameters())
    found = {}
    for name in (f"fc_loc.{index}.weight", f"fc_loc.{index}.bias"):
        matches = [n for n in initializers if n == name or n.endswith("." + name)]
        if len(matches) != 1 or initializers[matches[0]] != (tuple(params[name].shape), FLOAT):
            return None
        found[name] = matches[0]
    return found


def load_inputs(metadata_dataset: str, shape: tuple[int, ...], n_random: int, n_dataset: int, seed: int = 0):
    """{kind: images}: standard-normal images and the dataset's test split (when it is on this machine)."""
    rng = np.random.default_rng(seed)
    kinds: dict[str, np.ndarray] = {"random": rng.standard_normal((n_random, *shape), dtype=np.float32)}
    notes: list[str] = []
    if n_dataset and metadata_dataset:
        try:
            from stn_deploy.train.data import load_samples

            loaded = load_samples(metadata_dataset, n_dataset, split="test")
        except Exception as exc:  # noqa: BLE001 - a missing dataset only drops this kind
            loaded, notes = None, [f"dataset {metadata_dataset!r} not loaded: {exc}"]
        if loaded is not None:
            kinds["dataset"] = np.ascontiguousarray(loaded[0].numpy(), dtype=np.float32)
        elif not notes:
            notes.append(f"dataset {metadata_dataset!r} not on this machine")
    return kinds, notes


def check_model(
    path: Path,
    provider: str,
    refs: list[TorchReference],
    inputs: dict[str, np.ndarray],
    batches: tuple[int, ...],
    n_extreme: int,
) -> dict[str, Any]:
    """Placement and parity of one ONNX file (see the module docstring)."""
    import onnx

    from stn_deploy.runtime import Session

    started = time.perf_counter()
    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    precision = props.get("stn_deploy.precision", "fp32")
    out: dict[str, Any] = {
        "model": str(path),
        "target": props.get("stn_deploy.target", "?"),
        "precision": precision,
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "ops": sorted({n.op_type for n in model.graph.node}),
        "provider": provider,
    }
    from stn_deploy.errors import ProviderError

    t = time.perf_counter()
    try:  # as users run it: the device check at session start (issue 16) is on
        session = Session(path, provider=provider, warmup=1)
        device_check = session.device_check.to_dict() if session.device_check else None
    except ProviderError as exc:  # the check refused the provider: record why, then measure anyway
        device_check = {"error": str(exc)[:600]}
        session = Session(path, provider=provider, warmup=1, device_check=False)
    out["session"] = {
        "providers": session.providers,
        "io_binding": session.io_binding,
        "start_seconds": round(time.perf_counter() - t, 3),
        "device_check": device_check,
    }
    placement = session.placement().to_dict()
    out["placement"] = placement_verdict(placement, provider)
    out["placement_nodes"] = placement["nodes"]

    def session_fn(x: np.ndarray) -> np.ndarray:
        return session.run(x, ["log_probs"])["log_probs"]

    onnx_runs: dict[str, dict[str, np.ndarray]] = {
        "session": {k: run_batches(session_fn, v, batches) for k, v in inputs.items()}
    }
    if provider == "cuda":  # the extra sessions are diagnostics: if one cannot run, the rest is still measured
        try:
            ieee = raw_session(path, provider, ieee=True)
            onnx_runs["use_tf32=0"] = {
                k: run_batches(lambda x: ieee.run(["log_probs"], {"image": x})[0], v, batches)
                for k, v in inputs.items()
            }
        except Exception as exc:  # noqa: BLE001
            out["use_tf32=0"] = f"failed: {_one_line(exc)}"

    # Extreme θ: the same file with the θ head's initializers replaced, on the same provider.
    initializers = {i.name: (tuple(i.dims), i.data_type) for i in model.graph.initializer}
    head = theta_head(refs[0].model, initializers) if refs else None
    ref_extra: dict[str, dict[str, np.ndarray]] = {r.name: {} for r in refs}
    if head is None:
        out["extreme_theta"] = "skipped: the θ head's initializers are not in this graph under their PyTorch names"
    elif n_extreme:
        try:
            out["extreme_theta"] = _extreme_theta(
                path, provider, refs, head, inputs, batches, n_extreme, onnx_runs, ref_extra
            )
        except Exception as exc:  # noqa: BLE001
            for runs in (*onnx_runs.values(), *ref_extra.values()):
                for kind in [k for k in runs if k.startswith("extreme_theta")]:
                    del runs[kind]
            out["extreme_theta"] = f"failed: {_one_line(exc)}"

    comparisons = []
    for label, got in onnx_runs.items():
        for r in refs:
            want = {k: r.run(k, v, batches) for k, v in inputs.items()} | ref_extra[r.name]
            stats = compare_kinds(got, want, precision)
            comparisons.append({"onnx": label, "reference": r.name, **stats})
    out["comparisons"] = comparisons
    out["n_inputs"] = {k: len(v) for k, v in onnx_runs["session"].items()}
    out["batches"] = list(batches)
    out["seconds"] = round(time.perf_counter() - started, 2)
    if hasattr(session, "close"):  # Session gains close() in the runtime refactor (issue 11)
        session.close()
    return out


def _one_line(exc: BaseException, limit: int = 300) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:limit]


def _extreme_theta(path, provider, refs, head, inputs, batches, n_extreme, onnx_runs, ref_extra) -> str:
    """Run the extreme-θ probes (θ head's initializers replaced) on every ONNX label and reference;
    adds the ``extreme_theta_<i>`` kinds to ``onnx_runs`` and ``ref_extra`` in place."""
    import torch

    params = dict(refs[0].model.named_parameters())
    (w_name, w_onnx), (b_name, b_onnx) = head.items()
    w, b = params[w_name].detach().cpu(), params[b_name].detach().cpu()
    rng = np.random.default_rng(1)
    per_probe = max(1, n_extreme // len(THETA_PROBES))
    probe_batches = tuple(s for s in batches if s < per_probe) + (per_probe,)
    for i, (s, tx, ty) in enumerate(THETA_PROBES):
        kind = f"extreme_theta_{i}"
        shift = torch.tensor([0.0, 0.0, tx, 0.0, 0.0, ty], dtype=b.dtype)
        w2, b2 = (w * s).contiguous(), (b * s + shift).contiguous()
        images = rng.standard_normal((per_probe, *inputs["random"].shape[1:]), dtype=np.float32)
        over_onnx = {w_onnx: w2.numpy().astype(np.float32), b_onnx: b2.numpy().astype(np.float32)}
        for label, runs in onnx_runs.items():
            # "session" stands for stn_deploy's Session, which runs fp32 without TF32 (ProviderConfig)
            sess = raw_session(path, provider, ieee=label in ("session", "use_tf32=0"), overrides=over_onnx)
            runs[kind] = run_batches(
                lambda x, sess=sess: sess.run(["log_probs"], {"image": x})[0], images, probe_batches
            )
        for r in refs:
            ref_extra[r.name][kind] = r.run(kind, images, probe_batches, overrides={w_name: w2, b_name: b2})
    return f"{len(THETA_PROBES)} probes x {per_probe} inputs"


def headline(result: dict[str, Any]) -> dict[str, Any] | None:
    """The comparison the issue's target names: the user's session against PyTorch on the GPU in
    IEEE fp32 (else PyTorch on the CPU, for a CPU run)."""
    comps = result.get("comparisons", [])
    for ref in ("torch-cuda-ieee", "torch-cpu"):
        for c in comps:
            if c["onnx"] == "session" and c["reference"] == ref:
                return c
    return None


def format_check(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"{result['model']}: ERROR {result['error']}"
    p = result["placement"]
    head = (
        f"{result['model']}  (target {result['target']}, {result['precision']}, opset {result['opset']}) on "
        f"{', '.join(result['session']['providers'])}"
    )
    where = (
        f"  placement: {p['nodes']} nodes {p['counts']}; GridSample on {p['gridsample_on'] or '-'}; CPU fallback: "
        f"{', '.join(p['cpu_fallback_ops']) or 'none'}; all compute on {p['provider']}: {p['all_compute_on_provider']}"
    )
    lines = [head, where]
    for c in result["comparisons"]:
        lines.append(
            f"  {c['onnx']:<11} vs {c['reference']:<16} max|Δ| {c['max_abs']:.3g}  mean {c['mean_abs']:.3g}  "
            f"top-1 {c['top1_agreement']:.2f}%  n={c['n']}  {'PASS' if c['passed'] else 'FAIL'}"
        )
    return "\n".join(lines)


def cmd_check(args: argparse.Namespace) -> int:
    import torch

    batches = tuple(int(v) for v in args.batches.split(","))
    refs_spec: list[tuple[str, bool | None]] = [("cpu", None)]
    gpu = torch.cuda.is_available()
    if gpu and not args.no_torch_cuda:
        refs_spec += [("cuda", None), ("cuda", True)]  # torch's default math, then IEEE fp32
    refs, ref_errors = [], {}
    for device, ieee in refs_spec:
        try:
            refs.append(TorchReference(args.checkpoint, device, ieee))
        except Exception as exc:  # a GPU reference that cannot start leaves the others
            if device == "cpu":
                raise
            ref_errors[f"torch-{device}" + ("-ieee" if ieee else "")] = " ".join(
                f"{type(exc).__name__}: {exc}".split()
            )[:400]
    report: dict[str, Any] = {
        "provider": args.provider,
        "checkpoint": str(args.checkpoint),
        "torch": torch.__version__,
        "torch_cuda": gpu,
        "onnxruntime": _ort().__version__,
        "onnxruntime_file": _ort().__file__,
        "references": [r.name for r in refs],
        "reference_errors": ref_errors,
        "models": [],
    }
    if any(r.device == "cuda" for r in refs):
        report["gpu"] = torch.cuda.get_device_name(0)
        report["torch_fp32_math_default"] = fp32_math(torch)
    first = refs[0]
    config = first.model.config
    shape = (config.in_channels, config.image_size, config.image_size)
    inputs, notes = load_inputs(args.dataset or first.dataset, shape, args.random, args.dataset_count)
    report["notes"] = notes
    report["inputs"] = {k: len(v) for k, v in inputs.items()}
    # torch-cuda vs torch-cpu: how far PyTorch itself moves between devices (context for the rows).
    if len(refs) > 1:
        cpu_out = {k: first.run(k, v, batches) for k, v in inputs.items()}
        report["torch_devices"] = []
        for r in list(refs[1:]):
            try:
                got = {k: r.run(k, v, batches) for k, v in inputs.items()}
            except Exception as exc:  # noqa: BLE001 - a GPU reference that cannot run is dropped, not fatal
                report["reference_errors"][r.name] = _one_line(exc)
                refs.remove(r)
                continue
            report["torch_devices"].append({"a": r.name, "b": first.name, **compare_kinds(got, cpu_out, "fp32")})
        report["references"] = [r.name for r in refs]
    report["torch_fp32_math_used"] = {r.name: r.math() for r in refs[1:]}
    placement: dict[str, Any] = {}
    for path in args.models:  # the files are rewritten after each model: a run cut short keeps what it did
        try:
            result = check_model(Path(path), args.provider, refs, inputs, batches, args.extreme)
        except Exception as exc:  # noqa: BLE001 - one model's failure is recorded, the others go on
            result = {
                "model": str(path),
                "error": " ".join(f"{type(exc).__name__}: {exc}".split())[:500],
                "traceback": traceback.format_exc()[-2000:],
            }
        placement[result["model"]] = {"summary": result.get("placement"), "nodes": result.pop("placement_nodes", None)}
        report["models"].append(result)
        print(format_check(result), flush=True)
        _write_json(args.json, report)
        if args.placement:
            _write_json(args.placement, placement)
    failed = [m for m in report["models"] if "error" in m or not (headline(m) or {}).get("passed", False)]
    return 1 if failed else 0


# -- probes --------------------------------------------------------------------------------------------
def tiny_model_bytes() -> bytes:
    """A two-node float graph (Mul, Relu) at opset 17."""
    from onnx import TensorProto, helper, numpy_helper

    two = numpy_helper.from_array(np.full((1,), 2.0, dtype=np.float32), "two")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"], name="mul"), helper.make_node("Relu", ["y"], ["z"], name="relu")],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 256])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 256])],
        [two],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


class CaptureStderr:
    """File descriptor 2 into a temporary file for the block (C++ libraries write there directly);
    what was captured is written back to the real stderr afterwards, and ``lines()`` returns it."""

    def __enter__(self):
        import tempfile

        sys.stderr.flush()
        self._file = tempfile.TemporaryFile(mode="w+b")
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc) -> None:
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self._text = self._file.read().decode("utf-8", "replace")
        self._file.close()
        sys.stderr.write(self._text)

    def lines(self) -> list[str]:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", self._text)
        return [" ".join(ln.split())[:800] for ln in plain.splitlines() if ln.strip()]


def cmd_probe_ort(args: argparse.Namespace) -> int:
    """Does a node really run on ``args.provider``? Imports no torch (it would load CUDA for onnxruntime)."""
    if args.import_torch:
        import torch  # noqa: F401 - loads torch's CUDA and cuDNN libraries into the process first
    ort = _ort()
    if args.preload:
        ort.preload_dlls()
    info: dict[str, Any] = {
        "version": ort.__version__,
        "file": ort.__file__,
        "device": ort.get_device(),
        "available_providers": ort.get_available_providers(),
        "torch_imported": "torch" in sys.modules,
        "preload_dlls": bool(args.preload),
        "LD_LIBRARY_PATH": os.environ.get("LD_LIBRARY_PATH", ""),
    }
    want = PROVIDER_NAMES[args.provider]
    ok = False
    try:
        import tempfile

        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="gpu-probe-"), "p")
        with CaptureStderr() as log:  # onnxruntime's C++ log says why a provider did not load
            session = ort.InferenceSession(tiny_model_bytes(), options, providers=[want, CPU_EP])
        info["onnxruntime_log"] = [ln for ln in log.lines() if "onnxruntime" in ln or "error" in ln.lower()][-6:]
        info["session_providers"] = session.get_providers()
        x = np.linspace(-1, 1, 4 * 256, dtype=np.float32).reshape(4, 256)
        z = session.run(None, {"x": x})[0]
        trace = json.loads(Path(session.end_profiling()).read_text())
        ran = sorted(
            {e["args"]["provider"] for e in trace if e.get("cat") == "Node" and "provider" in e.get("args", {})}
        )
        info["nodes_ran_on"] = ran
        info["output_correct"] = bool(np.allclose(z, np.maximum(2 * x, 0)))
        ok = ran == [want] and info["output_correct"]
        if not ok:
            why = next((ln for ln in reversed(info["onnxruntime_log"]) if "Failed to load" in ln), "")
            why = why[why.find("Failed to load") :] if why else "see onnxruntime_log"
            why = re.sub(r"Failed to load library \S*/(\S+) with error: ", r"\1 did not load: ", why)
            short = ", ".join(r.removesuffix("ExecutionProvider") for r in ran)
            info["error"] = f"nodes ran on {short}, not {want.removesuffix('ExecutionProvider')}: {why}"
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        info["error"] = " ".join(f"{type(exc).__name__}: {exc}".split())[:600]
    info["ok"] = ok
    if args.expect_version and ort.__version__ != args.expect_version:
        info["ok"] = ok = False
        info["error"] = f"onnxruntime {ort.__version__} imported from {ort.__file__}, expected {args.expect_version}"
    print(json.dumps(info, indent=1))
    if args.json:
        _write_json(args.json, info)
    return 0 if ok else 1


def cmd_probe_provider(args: argparse.Namespace) -> int:
    """Open a model on one provider through stn_deploy.runtime.Session; 0 if it started, 3 if it was
    refused with a ProviderError (reported as 'skipped'), 1 on anything else."""
    from stn_deploy.errors import ProviderError
    from stn_deploy.runtime import Session

    info: dict[str, Any] = {"model": str(args.model), "provider": args.provider}
    code = 1
    try:
        session = Session(args.model, provider=args.provider, warmup=1)
        info.update(
            status="ok",
            providers=session.providers,
            placement=session.placement().summary(),
            device_check=session.device_check.to_dict() if session.device_check else None,
        )
        code = 0
    except ProviderError as exc:
        info.update(status="skipped", reason=str(exc)[:600])
        code = 3
    except Exception as exc:  # noqa: BLE001
        info.update(status="failed", reason=" ".join(f"{type(exc).__name__}: {exc}".split())[:600])
    print(json.dumps(info, indent=1))
    if args.json:
        _write_json(args.json, info)
    return code


# -- summary -----------------------------------------------------------------------------------------
def bench_targets(bench: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 16's speed targets from an stn-bench --json report (rows missing: 'not measured')."""
    rows = {(r["backend"], r["batch_size"]): r for r in bench.get("results", [])}

    def tp(name: str, bs: int) -> float | None:
        r = rows.get((name, bs))
        return r["throughput"] if r else None

    out = []
    fp32, eager, fp16 = tp("ort-cuda-fp32", 256), tp("pytorch-eager-cuda", 256), tp("ort-cuda-fp16", 256)
    ratio = fp32 / eager if fp32 and eager else None
    out.append(
        {
            "target": f"ORT CUDA fp32 >= {TARGET_FP32_VS_EAGER_256:g}x PyTorch eager CUDA @256",
            "value": ratio,
            "text": f"{ratio:.2f}x" if ratio else "not measured",
            "met": None if ratio is None else ratio >= TARGET_FP32_VS_EAGER_256,
        }
    )
    ratio = fp16 / fp32 if fp16 and fp32 else None
    out.append(
        {
            "target": f"ORT CUDA fp16 >= {TARGET_FP16_VS_FP32_256:g}x fp32 @256",
            "value": ratio,
            "text": f"{ratio:.2f}x" if ratio else "not measured",
            "met": None if ratio is None else ratio >= TARGET_FP16_VS_FP32_256,
        }
    )
    b1 = [
        (name, rows[(name, 1)]["p50_ms"])
        for name in ("ort-cuda-fp32", "ort-cuda-tf32", "ort-cuda-fp16")
        if (name, 1) in rows
    ]
    best = min(b1, key=lambda kv: kv[1]) if b1 else None
    out.append(
        {
            "target": f"batch-1 p50 <= {TARGET_BATCH1_P50_MS:g} ms (ORT CUDA)",
            "value": best[1] if best else None,
            "text": f"{best[1]:.3f} ms ({best[0]})" if best else "not measured",
            "met": None if best is None else best[1] <= TARGET_BATCH1_P50_MS,
        }
    )
    return out


def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else format(v, spec)
    return str(v)


def _yes(met: bool | None) -> str:
    return "-" if met is None else ("yes" if met else "NO")


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_steps(work: Path) -> list[dict[str, Any]]:
    """steps.jsonl: one JSON object per finished step (gpu_check.sh appends them)."""
    steps = []
    try:
        text = (work / "steps.jsonl").read_text()
    except OSError:
        return steps
    for line in text.splitlines():
        try:
            steps.append(json.loads(line))
        except ValueError:
            continue
    return steps


def read_pytest(xml_path: Path) -> dict[str, Any] | None:
    """Outcome of each test in a pytest --junitxml file."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return None
    tests = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome, message = (
                    {"failure": "failed", "error": "error", "skipped": "skipped"}[tag],
                    el.get("message", ""),
                )
                break
        tests.append(
            {
                "test": f"{case.get('classname', '')}::{case.get('name', '')}",
                "outcome": outcome,
                "message": " ".join(message.split())[:300],
                "seconds": float(case.get("time", 0) or 0),
            }
        )
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return {"counts": counts, "tests": tests}


def read_export(path: Path) -> dict[str, Any]:
    """The headline of an ``stn-export --json`` report (a checkpoint export or an fp16 derivation)."""
    d = _read(path)
    if not isinstance(d, dict):
        return {"file": path.name, "passed": False, "message": "no JSON report (see log.txt)"}
    out: dict[str, Any] = {"file": path.name, "passed": bool(d.get("passed", False))}
    checks = d.get("checks") or []
    failed = [c for c in checks if not c.get("passed")]
    parity = [c["message"] for c in checks if c.get("name") in ("parity", "optimized_parity")]
    if failed:
        out["message"] = f"{failed[0]['name']}: {failed[0].get('message', '')}"[:300]
    elif parity:
        out["message"] = parity[-1][:300]
    for key in ("output", "target", "opset", "optimized", "seconds"):
        if key in d:
            out[key] = d[key]
    fp16 = d.get("fp16") or next((v for v in d.values() if isinstance(v, dict) and v.get("checked_with")), None)
    if isinstance(fp16, dict):
        out["passed"] = bool(fp16.get("passed", out["passed"]))
        out["output"] = fp16.get("output", out.get("output"))
        out["message"] = (
            f"fp16 max |Δ| {_fmt(fp16.get('max_abs_diff'))}, top-1 {_fmt(fp16.get('top1_agreement'), '.2f')}% "
            f"on {fp16.get('n_inputs')} inputs ({fp16.get('checked_with')})"
        )
    return out


def collect(work: Path) -> dict[str, Any]:
    """Everything a gpu_check.sh run left in ``work``, as one JSON-able dict (results.json)."""
    bench = _read(work / "bench.json") or {}
    parity = _read(work / "parity.json") or {}
    return {
        "steps": read_steps(work),
        "machine": _read(work / "machine.json") or {},
        "probes": {p.stem: _read(p) for p in sorted(work.glob("probe-*.json"))},
        "exports": [read_export(p) for p in sorted(work.glob("export-*.json"))],
        "pytest": read_pytest(work / "pytest-cuda.xml"),
        "parity": {
            "provider": parity.get("provider"),
            "references": parity.get("references"),
            "reference_errors": parity.get("reference_errors"),
            "torch_devices": parity.get("torch_devices"),
            "models": [
                {k: v for k, v in m.items() if k not in ("comparisons",)} | {"headline": headline(m)}
                for m in parity.get("models", [])
            ],
        },
        "infer": {p.stem: _read(p) for p in sorted(work.glob("infer-*.json"))},
        "bench_targets": bench_targets(bench) if bench else [],
        "bench_backends": bench.get("backends", []),
    }


def summarize(work: Path) -> str:
    """summary.md from the files a gpu_check.sh run left in ``work`` (any of them may be missing)."""
    info = collect(work)
    parity = _read(work / "parity.json") or {}
    bench = _read(work / "bench.json") or {}
    machine = info["machine"]
    lines = ["# gpu_check summary", ""]
    if machine:
        lines.append(
            f"machine: {machine.get('gpu', '?')}; driver {machine.get('driver', '?')}; "
            f"{machine.get('cpus', '?')} CPUs; python {machine.get('python', '?')}; torch {machine.get('torch', '?')}; "
            f"onnxruntime {machine.get('onnxruntime', '?')}; onnx {machine.get('onnx', '?')}; "
            f"mode {machine.get('mode', '?')}; provider {machine.get('provider', '?')}"
        )
        lines.append("")
    lines += ["| step | status | rc | seconds | note |", "|---|---|---:|---:|---|"]
    for s in info["steps"]:
        lines.append(
            f"| {s['name']} | {s['status']} | {s.get('rc', '')} | {s.get('seconds', '')} | {s.get('note', '')} |"
        )
    if info["probes"]:
        lines.append("")
        for name, p in info["probes"].items():
            if not isinstance(p, dict):
                continue
            if "status" in p:  # probe-provider
                text = f"{p['status']}: {p.get('providers') or p.get('reason', '')}"
            else:  # probe-ort
                ran = p.get("nodes_ran_on")
                text = f"ok={p.get('ok')} onnxruntime {p.get('version')} ran on {ran} {p.get('error', '')}"
            lines.append(f"- {name}: {' '.join(str(text).split())[:400]}")
    if info["exports"]:
        lines.append("")
        for e in info["exports"]:
            lines.append(f"- {e['file']}: {'PASS' if e['passed'] else 'FAIL'} {e.get('message', '')}")
    if info["pytest"]:
        lines.append("")
        lines.append(f"pytest -m cuda: {info['pytest']['counts']}")
        for t in info["pytest"]["tests"]:
            lines.append(f"- {t['test']}: {t['outcome']} {t['message'][:200]}")
    if parity.get("models"):
        refs = ", ".join(parity.get("references", []))
        lines += [
            "",
            f"## Placement and parity (ONNX Runtime on {parity.get('provider')}; references {refs})",
            "",
            (
                "| model | prec | GridSample on; CPU fallback | all on EP | vs torch-cuda-ieee "
                "| vs torch-cuda | vs torch-cpu | use_tf32=0 vs torch-cuda-ieee | verdict |"
            ),
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for m in parity["models"]:
            name = Path(m["model"]).name
            if "error" in m:
                lines.append(f"| {name} | | ERROR: {m['error'][:200]} | | | | | | FAIL |")
                continue
            p = m["placement"]
            cells = {
                (c["onnx"], c["reference"]): f"{_fmt(c['max_abs'])} / {c['top1_agreement']:.2f}%"
                for c in m["comparisons"]
            }
            h = headline(m)
            grid = "/".join(x.removesuffix("ExecutionProvider") for x in p["gridsample_on"]) or "-"
            lines.append(
                f"| {name} | {m['precision']} | {grid}; "
                f"{', '.join(p['cpu_fallback_ops']) or 'none'} | {_yes(p['all_compute_on_provider'])} | "
                f"{cells.get(('session', 'torch-cuda-ieee'), '-')} | {cells.get(('session', 'torch-cuda'), '-')} | "
                f"{cells.get(('session', 'torch-cpu'), '-')} | {cells.get(('use_tf32=0', 'torch-cuda-ieee'), '-')} | "
                f"{'PASS' if h and h['passed'] else 'FAIL'} |"
            )
        lines.append(
            "(cells: max |Δ log-prob| / top-1 agreement over all input kinds; fp32 bound 1e-4 and 100%, "
            "fp16 5e-2 on log-probs >= -10 and 99%)"
        )
        for d in parity.get("torch_devices", []):
            lines.append(
                f"PyTorch itself, {d['a']} vs {d['b']}: max |Δ| {_fmt(d['max_abs'])}, top-1 {d['top1_agreement']:.2f}%"
            )
        for ref, err in (parity.get("reference_errors") or {}).items():
            lines.append(f"reference {ref} could not run: {err}")
    for name, r in info["infer"].items():
        if isinstance(r, dict):
            pl = r.get("placement") or {}
            lines.append(
                f"{name}: {r.get('ok', '?')} ok, {r.get('failed', '?')} failed of {r.get('images', '?')}; "
                f"providers {(r.get('session') or {}).get('providers')}; {_fmt(r.get('images_per_s'), '.0f')} img/s; "
                f"CPU fallback nodes {len(pl.get('cpu_fallback', []))}"
            )
    if bench.get("results"):
        rows = bench["results"]
        names = list(dict.fromkeys(r["backend"] for r in rows))
        sizes = sorted({r["batch_size"] for r in rows})
        lines += [
            "",
            f"## stn-bench (img/s at p50, p50 ms in brackets; {bench.get('iterations')} timed calls per cell)",
            "",
            "| backend | " + " | ".join(f"b{s}" for s in sizes) + " |",
            "|---|" + "---:|" * len(sizes),
        ]
        by = {(r["backend"], r["batch_size"]): r for r in rows}
        for n in names:
            cells = [
                f"{by[(n, s)]['throughput']:.0f} ({by[(n, s)]['p50_ms']:.3f})" if (n, s) in by else "-" for s in sizes
            ]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        for b in bench.get("backends", []):
            if b.get("status") != "ok":
                lines.append(f"- {b['name']}: {b['status']}: {b.get('reason', '')[:200]}")
    if bench:
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        for t in info["bench_targets"]:
            lines.append(f"| {t['target']} | {t['text']} | {_yes(t['met'])} |")
    return "\n".join(lines) + "\n"


def cmd_summarize(args: argparse.Namespace) -> int:
    out = args.out or args.work
    out.mkdir(parents=True, exist_ok=True)
    text = summarize(args.work)
    (out / "summary.md").write_text(text)
    _write_json(out / "results.json", collect(args.work))
    print(text)
    return 0


def _write_json(path: Path, data: Any) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str, allow_nan=True))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="placement and parity of ONNX files on a provider")
    c.add_argument("models", nargs="+", type=Path)
    c.add_argument("--checkpoint", type=Path, required=True)
    c.add_argument("--provider", choices=["cpu", "cuda"], default="cuda")
    c.add_argument(
        "--dataset", default=None, help="dataset of the real inputs (default: the checkpoint's); its test split"
    )
    c.add_argument(
        "--random", type=int, default=1288, help="random inputs (default: one batch each of 1, 7, 256, 1024)"
    )
    c.add_argument(
        "--dataset-count",
        type=int,
        default=1288,
        help="dataset test images (default: one batch each of 1, 7, 256, 1024)",
    )
    c.add_argument("--extreme", type=int, default=256, help="extreme-θ inputs (split over the 4 probes)")
    c.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)))
    c.add_argument("--no-torch-cuda", action="store_true", help="PyTorch reference on the CPU only")
    c.add_argument("--json", type=Path, required=True)
    c.add_argument("--placement", type=Path, default=None)
    c.set_defaults(func=cmd_check)
    p = sub.add_parser("probe-ort", help="does a node really run on the provider?")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--preload", action="store_true", help="call onnxruntime.preload_dlls() first")
    p.add_argument("--import-torch", action="store_true", help="import torch first (it loads CUDA libraries)")
    p.add_argument("--expect-version", default=None)
    p.add_argument("--json", type=Path, default=None)
    p.set_defaults(func=cmd_probe_ort)
    q = sub.add_parser("probe-provider", help="open a model on one provider through stn_deploy's Session")
    q.add_argument("model", type=Path)
    q.add_argument("--provider", choices=["cpu", "cuda", "tensorrt", "auto"], default="tensorrt")
    q.add_argument("--json", type=Path, default=None)
    q.set_defaults(func=cmd_probe_provider)
    s = sub.add_parser("summarize", help="write summary.md and results.json from a gpu_check work folder")
    s.add_argument("work", type=Path)
    s.add_argument("--out", type=Path, default=None, help="where to write them (default: the work folder)")
    s.set_defaults(func=cmd_summarize)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
