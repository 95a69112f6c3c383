"""stn-export: a checkpoint (or a torch.export archive) → one verified ONNX file per target runtime.

    >>> from stn_deploy.export import export_model
    >>> report = export_model("stn.pt", "stn.onnx", target="cuda")   # doctest: +SKIP
    >>> report.parity.max_abs_diff, report.parity.top1_agreement      # doctest: +SKIP

Every export runs the named checks (:mod:`.checks`, :mod:`.parity`) before the file appears.
"""

from .exporter import export_model
from .report import CheckResult, ExportReport, ParityStats
from .targets import TARGETS

__all__ = ["export_model", "ExportReport", "CheckResult", "ParityStats", "TARGETS"]
