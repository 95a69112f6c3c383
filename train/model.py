"""The Spatial Transformer Network classifier and its plain-CNN baseline, built from a config.

An STN (Jaderberg et al., 2015) regresses θ, the 2×3 affine parameters, with a localization
network; ``affine_grid`` turns θ into a sampling grid and ``grid_sample`` warps the input with
differentiable bilinear sampling; an ordinary CNN classifies the warped image.

The default :class:`STNConfig` is the reference model (3×32×32 input, 10 classes)::

    >>> print(build_model(STNConfig()))   # doctest: +SKIP
    STNClassifier(
      (conv1): Conv2d(3, 16, kernel_size=(5, 5), stride=(1, 1))
      (conv2): Conv2d(16, 32, kernel_size=(5, 5), stride=(1, 1))
      (conv2_drop): Dropout2d(p=0.5, inplace=False)
      (fc1): Linear(in_features=800, out_features=1024, bias=True)
      (fc2): Linear(in_features=1024, out_features=10, bias=True)
      (localization): Sequential(...)
      (fc_loc): Sequential(...)
    )
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ARCHS = ("stn", "cnn")

# Sampler signature: (images [N,C,H,W], grid [N,H,W,2], align_corners) -> warped images.
GridSampler = Callable[[Tensor, Tensor, bool], Tensor]


def torch_grid_sample(x: Tensor, grid: Tensor, align_corners: bool) -> Tensor:
    """Bilinear sampling with zeros padding: PyTorch's own ``grid_sample``."""
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)


@dataclass(frozen=True)
class STNConfig:
    """Everything needed to rebuild the model. Flatten sizes are derived, never stored."""

    in_channels: int = 3
    image_size: int = 32
    num_classes: int = 10
    arch: Literal["stn", "cnn"] = "stn"
    # classifier: conv1 -> pool -> relu -> conv2 -> drop -> pool -> relu -> fc1 -> fc2
    conv_channels: tuple[int, int] = (16, 32)
    conv_kernel: int = 5
    fc_hidden: int = 1024
    dropout: float = 0.5
    # localization: conv -> pool -> relu -> conv -> pool -> relu -> fc_loc
    loc_channels: tuple[int, int] = (64, 128)
    loc_kernels: tuple[int, int] = (7, 5)
    loc_hidden: int = 256
    # affine_grid / grid_sample convention (PyTorch's default is False)
    align_corners: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        object.__setattr__(self, "conv_channels", tuple(self.conv_channels))
        object.__setattr__(self, "loc_channels", tuple(self.loc_channels))
        object.__setattr__(self, "loc_kernels", tuple(self.loc_kernels))
        if self.classifier_features <= 0 or (self.arch == "stn" and self.localization_features <= 0):
            raise ValueError(f"image_size {self.image_size} is too small for these kernels")

    @property
    def classifier_spatial(self) -> int:
        return _conv_pool_size(self.image_size, (self.conv_kernel, self.conv_kernel))

    @property
    def classifier_features(self) -> int:
        """Input width of fc1 (800 for the reference model)."""
        return self.conv_channels[1] * self.classifier_spatial**2

    @property
    def localization_features(self) -> int:
        """Input width of fc_loc (2048 for the reference model)."""
        return self.loc_channels[1] * _conv_pool_size(self.image_size, self.loc_kernels) ** 2

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> STNConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


def _conv_pool_size(size: int, kernels: tuple[int, int]) -> int:
    """Spatial size after two (valid conv -> 2×2 max-pool) stages."""
    for k in kernels:
        size = (size - k + 1) // 2
    return size


class STNClassifier(nn.Module):
    """STN classifier (``arch="stn"``) or the same classifier without a transformer (``"cnn"``).

    ``forward`` returns log-probabilities. :meth:`transform` returns the warped image and θ,
    which visualization and export use.
    """

    def __init__(self, config: STNConfig, sampler: GridSampler = torch_grid_sample) -> None:
        super().__init__()
        self.config = config
        self.sampler = sampler
        c1, c2 = config.conv_channels
        self.conv1 = nn.Conv2d(config.in_channels, c1, kernel_size=config.conv_kernel)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=config.conv_kernel)
        self.conv2_drop = nn.Dropout2d(config.dropout)
        self.fc1 = nn.Linear(config.classifier_features, config.fc_hidden)
        self.fc2 = nn.Linear(config.fc_hidden, config.num_classes)
        if config.arch == "stn":
            l1, l2 = config.loc_channels
            k1, k2 = config.loc_kernels
            self.localization = nn.Sequential(
                nn.Conv2d(config.in_channels, l1, kernel_size=k1),
                nn.MaxPool2d(2, stride=2),
                nn.ReLU(True),
                nn.Conv2d(l1, l2, kernel_size=k2),
                nn.MaxPool2d(2, stride=2),
                nn.ReLU(True),
            )
            self.fc_loc = nn.Sequential(
                nn.Linear(config.localization_features, config.loc_hidden),
                nn.ReLU(True),
                nn.Linear(config.loc_hidden, 6),
            )
            self.reset_theta()
        else:
            self.localization = None
            self.fc_loc = None

    @property
    def has_transformer(self) -> bool:
        return self.localization is not None

    def reset_theta(self) -> None:
        """Initialise the θ head to the identity transform (zero weights, identity bias)."""
        last = self.fc_loc[-1]
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.copy_(torch.tensor([1, 0, 0, 0, 1, 0], dtype=last.bias.dtype))

    def theta(self, x: Tensor) -> Tensor:
        """θ [N, 2, 3] for a batch; the identity for the plain CNN."""
        if not self.has_transformer:
            eye = torch.eye(2, 3, dtype=x.dtype, device=x.device)
            return eye.unsqueeze(0).expand(x.shape[0], 2, 3)
        xs = self.localization(x)
        return self.fc_loc(torch.flatten(xs, 1)).view(-1, 2, 3)

    def warp(self, x: Tensor, theta: Tensor) -> Tensor:
        """Sample ``x`` on the grid that θ describes."""
        grid = F.affine_grid(theta, list(x.shape), align_corners=self.config.align_corners)
        return self.sampler(x, grid, self.config.align_corners)

    def transform(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(warped image, θ). For the plain CNN the image passes through untouched."""
        theta = self.theta(x)
        if not self.has_transformer:
            return x, theta
        return self.warp(x, theta), theta

    def classify(self, x: Tensor) -> Tensor:
        """Log-probabilities of the classifier on an (already warped) image."""
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, p=self.config.dropout, training=self.training)
        return F.log_softmax(self.fc2(x), dim=1)

    def forward(self, x: Tensor) -> Tensor:
        warped, _ = self.transform(x)
        return self.classify(warped)


def build_model(config: STNConfig | None = None, **overrides) -> STNClassifier:
    """The public factory: ``build_model()`` is the reference STN; keyword overrides edit the config."""
    config = config or STNConfig()
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return STNClassifier(config)
