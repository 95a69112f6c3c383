"""Parity: the exported file against the PyTorch reference, on three kinds of input.

``random``
    Standard-normal images in the model's normalized input space.
``dataset``
    Test-split samples of the checkpoint's dataset (``stn_deploy.train.data.load_image_samples``),
    when it is a built-in dataset available on this machine (a checkpoint's metadata never makes
    the export read a path of its choosing).
``extreme_theta``
    Inputs whose θ samples outside the image, so that zeros padding and the out-of-range
    neighbours of bilinear sampling are exercised. A trained (or freshly initialised) θ head
    rarely produces such θ on its own, so the *same* exported file is run with its θ-head
    weights replaced: ONNX Runtime's ``SessionOptions.add_initializer`` overrides the two
    initializers of the Linear layer that produces θ, and PyTorch runs the reference with the
    same replacement (``torch.func.functional_call``). With ``W' = s·W`` and ``b' = s·b + t``,
    every input gets ``θ' = s·θ + t`` (zoom by ``s``, shift by ``t`` with ``|t| > 1``), a grid
    that lies partly or wholly outside [-1, 1]². The graph, the operators and the sampler are
    exactly those of the shipped file; only two initializer values differ.

The thresholds are the project's parity bar: max |Δ log-prob| ≤ 1e-4 and identical top-1.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stn_deploy.errors import StnDeployError, one_line
from stn_deploy.metadata import LOG_PROBS
from stn_deploy.preprocessing import Preprocessing
from stn_deploy.train.data import BUILTIN_DATASETS, load_image_samples

from .report import OutputDiff, ParityStats
from .theta_head import ThetaHead

MAX_ABS_DIFF = 1e-4
CHUNK = 64
# Each kind of input starts with these batch sizes (1, odd), then goes on in CHUNKs (large).
FIRST_BATCHES = (1, 7)

# (scale s, shift tx, shift ty): θ' = s·θ + [[0, 0, tx], [0, 0, ty]].
THETA_PROBES = ((1.0, 1.5, 0.0), (2.0, -1.2, 1.3), (0.5, 0.6, -1.8), (1.5, 2.5, 2.5))


def _dataset_samples(
    dataset: str, preprocessing: Preprocessing, n: int, data_dir: Path | None
) -> tuple[np.ndarray | None, str]:
    """Up to ``n`` preprocessed test samples of a built-in dataset, or (None, why not)."""
    if dataset not in BUILTIN_DATASETS:  # a file's metadata never chooses a path to read
        return None, f"dataset '{dataset}' is not a built-in dataset ({', '.join(BUILTIN_DATASETS)})"
    try:
        samples = load_image_samples(dataset, preprocessing, n=n, split="test", data_dir=data_dir)
    except StnDeployError as exc:  # a missing dataset only means this input kind is skipped
        return None, f"dataset '{dataset}' not loaded ({one_line(exc, 120)})"
    return samples.images[:n], ""


def _outside_fraction(theta: torch.Tensor, shape: tuple[int, ...], align_corners: bool) -> torch.Tensor:
    """Per input: the fraction of sampling points that fall outside the image."""
    grid = F.affine_grid(theta, [theta.shape[0], *shape], align_corners=align_corners)
    return (grid.abs() > 1).any(dim=-1).flatten(1).float().mean(dim=1)


def measure_parity(
    session_factory: Callable[[dict[str, np.ndarray] | None], object],
    reference: nn.Module,
    *,
    preprocessing: Preprocessing,
    output_names: list[str],
    n_inputs: int,
    dataset: str = "unknown",
    data_dir: Path | None = None,
    theta_head: ThetaHead | None = None,
    theta_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    align_corners: bool | None = None,
    seed: int = 0,
    progress: bool = True,
) -> ParityStats:
    """Compare ONNX Runtime against ``reference`` on ``n_inputs`` inputs of each available kind.

    ``session_factory(overrides)`` returns an ONNX Runtime session of the file under test with
    the given initializers replaced (``None``: as shipped).
    """
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    input_shape = preprocessing.input_shape
    notes: list[str] = []
    n_extreme = min(n_inputs, max(len(THETA_PROBES), n_inputs // 4)) if theta_head is not None else 0
    if theta_head is None:
        notes.append("extreme_theta: no Linear θ head found before grid_sample, kind skipped")
    n_dataset = (n_inputs - n_extreme) // 2
    samples, why = _dataset_samples(dataset, preprocessing, n_dataset, data_dir) if n_dataset else (None, "")
    if samples is None:
        notes.append(f"dataset: {why}")
        samples = np.zeros((0, *input_shape), np.float32)
    n_random = n_inputs - n_extreme - len(samples)

    # (kind, images, overrides for ORT / for torch, θ transform for the outside fraction)
    plan: list[tuple[str, np.ndarray, dict | None, dict | None, tuple[float, float, float] | None]] = []
    plan.append(("random", rng.standard_normal((n_random, *input_shape), dtype=np.float32), None, None, None))
    if len(samples):
        plan.append(("dataset", samples, None, None, None))
    if theta_head is not None:
        state = dict(reference.named_parameters())
        w = state[theta_head.weight].detach()
        b = state[theta_head.bias].detach()
        per_probe = np.array_split(np.arange(n_extreme), len(THETA_PROBES))
        for (s, tx, ty), idx in zip(THETA_PROBES, per_probe, strict=True):
            t = torch.tensor([0.0, 0.0, tx, 0.0, 0.0, ty], dtype=b.dtype)
            w2, b2 = w * s, b * s + t
            onnx_over = {theta_head.weight: w2.numpy().copy(), theta_head.bias: b2.numpy().copy()}
            torch_over = {theta_head.weight: w2, theta_head.bias: b2}
            images = rng.standard_normal((len(idx), *input_shape), dtype=np.float32)
            plan.append(("extreme_theta", images, onnx_over, torch_over, (s, tx, ty)))

    diffs: dict[str, list[np.ndarray]] = {name: [] for name in output_names}
    top1: list[np.ndarray] = []
    kinds: list[np.ndarray] = []
    outside: dict[str, list[float]] = {}
    batch_sizes: dict[str, set[int]] = {}
    total = sum(len(p[1]) for p in plan)
    bar = tqdm(total=total, desc="parity", unit="img", disable=not progress, leave=False)
    try:
        for kind, images, onnx_over, torch_over, probe in plan:
            if not len(images):
                continue
            session = session_factory(onnx_over)
            for start, stop in _batches(len(images)):
                x = images[start:stop]
                got = session.run(output_names, {"image": x})
                xt = torch.from_numpy(x)
                with torch.no_grad():
                    if torch_over:
                        want = torch.func.functional_call(reference, torch_over, (xt,), strict=False)
                    else:
                        want = reference(xt)
                want = [want] if isinstance(want, torch.Tensor) else list(want)
                for name, g, w_ in zip(output_names, got, want, strict=True):
                    diffs[name].append(np.abs(g.astype(np.float64) - w_.numpy().astype(np.float64)).reshape(len(x), -1))
                i_lp = output_names.index(LOG_PROBS)
                top1.append(got[i_lp].argmax(1) == want[i_lp].numpy().argmax(1))
                kinds.append(np.array([kind] * len(x)))
                batch_sizes.setdefault(kind, set()).add(len(x))
                if theta_fn is not None and align_corners is not None:
                    with torch.no_grad():
                        theta = theta_fn(xt)
                        if probe is not None:
                            s, tx, ty = probe
                            theta = theta * s + torch.tensor([[0.0, 0.0, tx], [0.0, 0.0, ty]])
                        outside.setdefault(kind, []).extend(
                            _outside_fraction(theta, input_shape, align_corners).tolist()
                        )
                bar.update(len(x))
    finally:
        bar.close()

    kind_arr = np.concatenate(kinds)
    top1_arr = np.concatenate(top1)
    per_output = {name: np.concatenate(v) for name, v in diffs.items()}
    outputs = {name: _diff(v) for name, v in per_output.items()}
    by_kind: dict[str, dict] = {}
    for kind in dict.fromkeys(kind_arr.tolist()):
        mask = kind_arr == kind
        entry = {
            "n": int(mask.sum()),
            "max_abs_diff": float(per_output[LOG_PROBS][mask].max()),
            "mean_abs_diff": float(per_output[LOG_PROBS][mask].mean()),
            "top1_agreement": float(top1_arr[mask].mean()),
            "batch_sizes": sorted(batch_sizes[kind]),
        }
        if kind in outside:
            entry["mean_outside_fraction"] = float(np.mean(outside[kind]))
        by_kind[kind] = entry
    return ParityStats(
        n_inputs=int(len(kind_arr)),
        inputs_by_kind={k: v["n"] for k, v in by_kind.items()},
        outputs=outputs,
        top1_agreement=float(top1_arr.mean()),
        by_kind=by_kind,
        notes=notes,
    )


def _batches(n: int) -> list[tuple[int, int]]:
    """(start, stop) of each batch: FIRST_BATCHES, then CHUNKs, the last one partial."""
    out, start = [], 0
    sizes = iter(FIRST_BATCHES)
    while start < n:
        stop = min(n, start + next(sizes, CHUNK))
        out.append((start, stop))
        start = stop
    return out


def _diff(values: np.ndarray) -> OutputDiff:
    return OutputDiff(
        max_abs=float(values.max()), mean_abs=float(values.mean()), p99_abs=float(np.quantile(values, 0.99))
    )


def parity_verdict(stats: ParityStats, tolerance: float = MAX_ABS_DIFF) -> tuple[bool, str, dict]:
    """The parity bar on every compared output, and identical top-1."""
    failures = [  # "not <=": a NaN difference fails too
        f"{name} max |Δ| {d.max_abs:.3g} > {tolerance:g}"
        for name, d in stats.outputs.items()
        if not d.max_abs <= tolerance
    ]
    if stats.top1_agreement < 1.0:
        failures.append(f"top-1 agreement {stats.top1_agreement:.4%} < 100%")
    kinds = ", ".join(f"{k} {v}" for k, v in stats.inputs_by_kind.items())
    message = (
        f"max |Δ log-prob| {stats.max_abs_diff:.3g}, mean {stats.mean_abs_diff:.3g}, "
        f"top-1 {stats.top1_agreement:.2%} on {stats.n_inputs} inputs ({kinds})"
    )
    if failures:
        message = "; ".join(failures) + f" [{message}]"
    return not failures, message, stats.to_dict()
