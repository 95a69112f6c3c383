"""The one way stn-deploy builds an ``onnxruntime.InferenceSession``.

Every ONNX Runtime session in the project comes from :func:`create_session` with options from
:func:`session_options`: the runtime's :class:`~stn_deploy.runtime.Session`, the export checks
(batch sizes, parity with replaced initializers, the offline optimization), int8 quantization's
accuracy gate and the fp16 check. So the rules live in one place:

* ONNX Runtime's own provider fallback is off (``enable_fallback=0``): it prints to stdout, where
  stn-infer may be writing rows, and retries on other providers without their options; a
  provider that cannot start is ours to report (and ``auto`` tries the next one itself);
* its log is reduced to fatal messages: every error ONNX Runtime logs also reaches us as an
  exception, which we report in one line; its own log line would be a second, raw copy (and a
  session that failed to load with the profiler on adds "Could not write a profile because no
  model was loaded" on its way out);
* a failure is a one-line :class:`~stn_deploy.errors.ModelFileError` (the file cannot be loaded)
  or :class:`~stn_deploy.errors.ProviderError` (a GPU provider failed to start).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

from stn_deploy.errors import ModelFileError, ProviderError, one_line

from .providers import CPU, GPU_PROVIDERS, ProviderChain, display

GRAPH_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_FATAL_ONLY = 4  # ort's log severity: 0 verbose ... 3 error, 4 fatal


def session_options(
    *,
    threads: int | None = None,
    optimization: str = "all",
    spin: bool | None = None,
    profile_prefix: str | os.PathLike[str] | None = None,
    optimized_model_path: str | os.PathLike[str] | None = None,
) -> ort.SessionOptions:
    """SessionOptions with stn-deploy's conventions.

    Args:
        threads: intra-op threads (None or 0: ONNX Runtime's default, one per core).
        optimization: ``disable`` | ``basic`` | ``extended`` | ``all`` (ONNX Runtime's default).
        spin: let idle intra-op threads spin-wait (None: ONNX Runtime's default, spinning).
        profile_prefix: record the first run's kernel events (placement) under this prefix.
        optimized_model_path: write the optimized graph here when the session is created.
    """
    if optimization not in GRAPH_OPTIMIZATION:
        raise ProviderError(f"graph_optimization must be one of {', '.join(GRAPH_OPTIMIZATION)}, got {optimization!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = GRAPH_OPTIMIZATION[optimization]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = _FATAL_ONLY
    if threads:
        options.intra_op_num_threads = int(threads)
    if spin is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    return options


def create_session(
    model: str | os.PathLike[str] | bytes,
    options: ort.SessionOptions | None = None,
    chain: ProviderChain | None = None,
    *,
    initializers: Mapping[str, np.ndarray] | None = None,
) -> ort.InferenceSession:
    """An ONNX Runtime session of ``model`` (a path or serialized bytes) on ``chain`` (default CPU).

    ``initializers`` replace the named initializers of the file in this session only (ONNX
    Runtime's ``add_initializer``; the parity check's extreme-θ probes use it).
    """
    options = options or session_options()
    chain = chain or [(CPU, {})]
    keep = []
    for name, array in (initializers or {}).items():
        value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
        keep.append(value)  # ONNX Runtime reads it during the session's life: it must outlive it
        options.add_initializer(name, value)
    names = [n for n, _ in chain]
    provider_options = [o for _, o in chain]
    source = "<in-memory model>" if isinstance(model, bytes) else str(model)
    try:
        session = ort.InferenceSession(
            model if isinstance(model, bytes) else str(model),
            sess_options=options,
            providers=names,
            provider_options=provider_options,
            enable_fallback=0,
        )
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
        msg = " ".join(str(exc).split())
        about = msg.replace(source, "").lower()  # not the file's name: stn.cuda.onnx is one
        if any(n in GPU_PROVIDERS for n in names) and ("provider" in about or "cuda" in about):
            raise ProviderError(f"{source}: {display(names[0])} failed to start: {msg[:300]}") from None
        raise ModelFileError(f"{source}: onnxruntime cannot load it ({one_line(exc)})") from None
    session._stn_keep_alive = keep  # type: ignore[attr-defined]
    return session
