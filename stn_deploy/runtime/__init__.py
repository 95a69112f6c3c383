"""The torch-free runtime: ONNX Runtime sessions for stn-deploy models.

A deployment host needs onnxruntime, numpy and pillow; nothing here imports torch, training or
export code (an import-linter contract in pyproject.toml holds it). The modules, in the order an
image batch meets them:

``providers``   which execution providers, in what order, with what options
``graph_info``  facts about the ONNX graph read without the ``onnx`` package (opset, ops, precision)
``guards``      TensorRT's GridSample-20 guard and the device-vs-CPU check at session start
``factory``     the one place an ``onnxruntime.InferenceSession`` is built
``session``     :class:`Session`: metadata, signature checks, warm-up, batches, streams
``placement``   which node ran on which provider, from ONNX Runtime's profiler trace
"""

from .factory import GRAPH_OPTIMIZATION, create_session, session_options
from .graph_info import GraphInfo, read_graph_info, try_read_graph_info
from .guards import DeviceCheck, compare_devices, tensorrt_excluded_ops
from .placement import NodePlacement, PlacementReport, parse_profile
from .providers import (
    AUTO_ORDER,
    CPU,
    CUDA,
    GPU_PROVIDERS,
    PROVIDER_NAMES,
    PROVIDERS,
    TENSORRT,
    ProviderConfig,
    available_providers,
    resolve_providers,
)
from .session import STREAM_CHUNK, STREAMS_MIN_BATCH, Session

__all__ = [
    "AUTO_ORDER",
    "CPU",
    "CUDA",
    "GPU_PROVIDERS",
    "GRAPH_OPTIMIZATION",
    "PROVIDERS",
    "PROVIDER_NAMES",
    "STREAMS_MIN_BATCH",
    "STREAM_CHUNK",
    "TENSORRT",
    "DeviceCheck",
    "GraphInfo",
    "NodePlacement",
    "PlacementReport",
    "ProviderConfig",
    "Session",
    "available_providers",
    "compare_devices",
    "create_session",
    "parse_profile",
    "read_graph_info",
    "resolve_providers",
    "session_options",
    "tensorrt_excluded_ops",
    "try_read_graph_info",
]
