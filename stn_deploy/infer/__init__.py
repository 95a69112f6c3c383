"""stn-infer: every image file under a directory → one row of predictions (no torch).

``rows``      Prediction, RowWriter: the CSV / JSON Lines output
``pipeline``  decoding ahead of inference, the run loop, the run's summary
``cli``       the ``stn-infer`` command
"""

from .pipeline import InferSummary, iter_decoded, run_inference
from .rows import OUTPUT_FORMATS, Prediction, RowWriter, predictions_for

__all__ = [
    "OUTPUT_FORMATS",
    "InferSummary",
    "Prediction",
    "RowWriter",
    "iter_decoded",
    "predictions_for",
    "run_inference",
]
