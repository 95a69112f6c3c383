"""stn-deploy: Spatial Transformer Network classifiers from PyTorch training to verified ONNX inference.

The package root imports nothing heavy: the deployment part (``stn_deploy.runtime``,
``stn_deploy.infer``, ``stn_deploy.serve`` and the core modules beside them) must work on a host
that has onnxruntime, numpy and pillow but no torch. Training (``stn_deploy.train``: the model, the
checkpoint format, datasets) and export (``stn_deploy.export``) import torch themselves.
docs/ARCHITECTURE.md maps the layers and the contracts that hold them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
