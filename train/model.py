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

from stn_deploy import fields
from stn_deploy.errors import shorten

ARCHS = ("stn", "cnn")
# Bounds on a config read from a checkpoint (hardening, issue 12). The weights are allocated
# before the checkpoint's tensors are compared with them, and fc1 and fc_loc grow with
# image_size²: the reference layers at image_size 2,000 would ask for 65 GB of float32
# weights, at 10**6 for 16 PB. So: at most 2**28 parameters (1 GiB of float32 weights; the
# reference model has 1.6 M), an image_size of at most 1024 (a small-image classifier; with the
# reference layers the parameter limit already stops it at 269 px), layer widths and kernels of
# at most 65,536.
MAX_PARAMETERS = 1 << 28
MAX_IMAGE_SIZE = 1024
MAX_WIDTH = 1 << 16

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
        # -- hardening (issue 12): a config read from a checkpoint decides how much memory
        # build_model allocates, so every field is type- and range-checked (ValueError naming it;
        # load_checkpoint turns it into a one-line CheckpointError) before anything is built.
        fields.string(self.arch, "arch", choices=ARCHS)
        for name in ("in_channels", "num_classes", "conv_kernel", "fc_hidden", "loc_hidden"):
            fields.integer(getattr(self, name), name, low=1, high=MAX_WIDTH)
        fields.integer(self.image_size, "image_size", low=1, high=MAX_IMAGE_SIZE)
        for name in ("conv_channels", "loc_channels", "loc_kernels"):
            values = fields.sequence(getattr(self, name), name, length=2)
            object.__setattr__(
                self,
                name,
                tuple(fields.integer(v, f"{name}[{i}]", low=1, high=MAX_WIDTH) for i, v in enumerate(values)),
            )
        fields.real(self.dropout, "dropout", low=0.0, high=1.0)
        if not isinstance(self.align_corners, bool):
            raise ValueError(f"align_corners must be true or false, got {shorten(self.align_corners)}")
        if self.classifier_features <= 0 or (self.arch == "stn" and self.localization_features <= 0):
            raise ValueError(f"image_size {self.image_size} is too small for these kernels")
        if self.parameter_count() > MAX_PARAMETERS:
            raise ValueError(
                f"image_size {self.image_size} with these layer widths needs {self.parameter_count():,} parameters "
                f"(limit {MAX_PARAMETERS:,}, {MAX_PARAMETERS * 4 >> 30} GiB of float32 weights)"
            )
        # -- end hardening

    def parameter_count(self) -> int:
        """Weights and biases of the model this config builds (exact; no torch needed)."""
        c1, c2 = self.conv_channels
        k = self.conv_kernel
        count = c1 * (self.in_channels * k * k + 1) + c2 * (c1 * k * k + 1)
        count += self.fc_hidden * (self.classifier_features + 1) + self.num_classes * (self.fc_hidden + 1)
        if self.arch == "stn":
            l1, l2 = self.loc_channels
            k1, k2 = self.loc_kernels
            count += l1 * (self.in_channels * k1 * k1 + 1) + l2 * (l1 * k2 * k2 + 1)
            count += self.loc_hidden * (self.localization_features + 1) + 6 * (self.loc_hidden + 1)
        return count

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
        fields.mapping(d, "model config")
        unknown = [k for k in d if k not in names]
        if unknown:
            raise ValueError(f"unknown model config keys: {shorten(sorted(map(str, unknown)))}")
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
