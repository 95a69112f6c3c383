"""stn-deploy: Spatial Transformer Network classifiers from PyTorch training to verified ONNX inference.

The package root imports nothing heavy: the runtime (``stn_deploy.runtime``, ``stn-infer``) must
work on a deployment host that has onnxruntime, numpy and pillow but no torch. The model
(``stn_deploy.model``), the checkpoint format (``stn_deploy.checkpoint``), training
(``stn_deploy.train``) and export (``stn_deploy.export``) import torch themselves.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
