"""stn-bench: the same inputs through every available backend, timed side by side.

``runners``  one class per backend (PyTorch eager, ONNX Runtime per provider, OpenVINO)
``measure``  loading, the interleaved timing rounds, agreement between backends
``report``   the machine, the table, the plot
``cli``      the ``stn-bench`` command
"""

from .cli import main, plan_backends
from .measure import Backend, make_inputs, run_benchmark
from .runners import BackendUnavailable, OpenVinoRunner, OrtRunner, Runner, TorchRunner, plan_runners

__all__ = [
    "Backend",
    "BackendUnavailable",
    "OpenVinoRunner",
    "OrtRunner",
    "Runner",
    "TorchRunner",
    "main",
    "make_inputs",
    "plan_backends",
    "plan_runners",
    "run_benchmark",
]
