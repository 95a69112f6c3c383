"""Which ONNX Runtime execution providers a session asks for, in what order, with what options.

``auto`` takes the best provider this onnxruntime build offers, in the order TensorRT, CUDA, CPU;
an explicitly requested provider that the build lacks is a :class:`~stn_deploy.errors.ProviderError`
that says what is missing and how to get it. The list of available providers comes from
:func:`available_providers`, which tests monkeypatch to exercise GPU selection on a CPU-only machine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from stn_deploy.errors import ProviderError

PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
PROVIDER_NAMES = {"cpu": CPU, "cuda": CUDA, "tensorrt": TENSORRT}
GPU_PROVIDERS = (TENSORRT, CUDA)
# auto: the first of these that the build offers.
AUTO_ORDER = (TENSORRT, CUDA, CPU)
CUDA_CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
# ONNX Runtime's own default for trt_op_types_to_exclude (ops with data-dependent output shapes,
# which TensorRT runs slower than CUDA). Setting the option replaces the default, so a list we
# pass starts from these.
TRT_DEFAULT_EXCLUDED_OPS = ("NonMaxSuppression", "NonZero", "RoiAlign")

# Why a GPU provider may be missing from this build, for the error message.
_INSTALL_HINT = {
    CUDA: "install stn-deploy[gpu] (onnxruntime-gpu) on a machine with CUDA and cuDNN",
    TENSORRT: "install stn-deploy[gpu] (onnxruntime-gpu) with the TensorRT libraries on the library path",
}


def available_providers() -> list[str]:
    """The execution providers this onnxruntime build offers (monkeypatched by tests)."""
    return list(ort.get_available_providers())


def display(name: str) -> str:
    """``CUDAExecutionProvider`` → ``CUDA``."""
    return name.removesuffix("ExecutionProvider")


@dataclass(frozen=True)
class ProviderConfig:
    """Options for the GPU providers; each maps onto ONNX Runtime's provider-options keys."""

    device_id: int = 0
    # TensorRT: let the builder pick fp16 kernels where they are faster.
    trt_fp16: bool = False
    # TensorRT: engine and timing cache directory, so a restart does not rebuild the engine.
    trt_engine_cache: str | os.PathLike[str] | None = None
    # TensorRT optimization profile for the batch axis: build one engine for 1..trt_max_batch
    # instead of rebuilding when a partial last batch arrives.
    trt_max_batch: int | None = None
    # cuDNN's convolution algorithm search; None keeps ONNX Runtime's default (EXHAUSTIVE).
    cuda_conv_algo_search: str | None = None
    # TF32 for fp32 convolutions and matmuls on Ampere and later GPUs. ONNX Runtime turns it on by
    # default; off here, because an fp32 model must compute in fp32: with TF32 the reference digits
    # model's log-probs moved by up to 3.5e-3 on an H200 and 0.16% of top-1 answers changed, without
    # it they matched PyTorch's to 4e-6 (benchmarks/GPU.md). True trades that for speed.
    cuda_tf32: bool = False

    def __post_init__(self) -> None:
        if self.device_id < 0:
            raise ProviderError(f"device_id must be >= 0, got {self.device_id}")
        if self.cuda_conv_algo_search is not None and self.cuda_conv_algo_search.upper() not in CUDA_CONV_ALGO_SEARCH:
            raise ProviderError(
                f"cuda_conv_algo_search must be one of {', '.join(CUDA_CONV_ALGO_SEARCH)}, "
                f"got {self.cuda_conv_algo_search!r}"
            )

    def tensorrt_options(
        self,
        input_name: str | None = None,
        input_shape: Sequence[int] | None = None,
        exclude_ops: Sequence[str] = (),
    ) -> dict[str, Any]:
        opts: dict[str, Any] = {"device_id": self.device_id, "trt_fp16_enable": bool(self.trt_fp16)}
        if self.trt_engine_cache is not None:
            cache = Path(self.trt_engine_cache)
            opts["trt_engine_cache_enable"] = True
            opts["trt_engine_cache_path"] = str(cache)
            # The timing cache makes rebuilding an engine for a new shape much faster.
            opts["trt_timing_cache_enable"] = True
            opts["trt_timing_cache_path"] = str(cache)
        if self.trt_max_batch and input_name and input_shape:
            dims = "x".join(str(int(d)) for d in input_shape)
            opts["trt_profile_min_shapes"] = f"{input_name}:1x{dims}"
            opts["trt_profile_opt_shapes"] = f"{input_name}:{int(self.trt_max_batch)}x{dims}"
            opts["trt_profile_max_shapes"] = f"{input_name}:{int(self.trt_max_batch)}x{dims}"
        if exclude_ops:
            ops = dict.fromkeys([*TRT_DEFAULT_EXCLUDED_OPS, *exclude_ops])
            opts["trt_op_types_to_exclude"] = ",".join(ops)
        return opts

    def cuda_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"device_id": self.device_id, "use_tf32": int(bool(self.cuda_tf32))}
        if self.cuda_conv_algo_search is not None:
            opts["cudnn_conv_algo_search"] = self.cuda_conv_algo_search.upper()
        return opts


ProviderChain = list[tuple[str, dict[str, Any]]]


def resolve_providers(
    provider: str,
    config: ProviderConfig | None = None,
    *,
    available: Sequence[str] | None = None,
    input_name: str | None = None,
    input_shape: Sequence[int] | None = None,
    trt_exclude_ops: Sequence[str] = (),
) -> ProviderChain:
    """The ``(name, options)`` list to hand ONNX Runtime, in order of preference.

    ``auto`` → TensorRT, CUDA, CPU, keeping those the build offers (TensorRT falls back to CUDA
    for nodes it cannot take, CUDA to CPU). An explicit provider the build lacks raises
    :class:`ProviderError` naming what is missing and how to get it. ``trt_exclude_ops``: op
    types TensorRT must leave to the next provider (see :mod:`.guards`).
    """
    config = config or ProviderConfig()
    available = list(available_providers() if available is None else available)
    key = provider.lower()
    if key not in PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r} (choose from {', '.join(PROVIDERS)})")
    if key == "auto":
        chain = [name for name in AUTO_ORDER if name in available] or [CPU]
    else:
        wanted = PROVIDER_NAMES[key]
        if wanted not in available:
            hint = _INSTALL_HINT.get(wanted, "")
            have = ", ".join(display(p) for p in available) or "none"
            raise ProviderError(
                f"provider {key!r}: this onnxruntime build ({ort.__version__}) has no {wanted} "
                f"(it offers {have})" + (f"; {hint}" if hint else "")
            )
        chain = {TENSORRT: [TENSORRT, CUDA, CPU], CUDA: [CUDA, CPU], CPU: [CPU]}[wanted]
        chain = [name for name in chain if name in (wanted, CPU) or name in available]
    out: ProviderChain = []
    for name in chain:
        if name == TENSORRT:
            out.append((name, config.tensorrt_options(input_name, input_shape, trt_exclude_ops)))
        elif name == CUDA:
            out.append((name, config.cuda_options()))
        else:
            out.append((name, {}))
    return out
