"""Preprocessing, defined once: how an image file becomes the model's input tensor.

Image files go through :class:`Preprocessing` wherever they are read: imagefolder training,
int8 calibration from a directory, stn-infer, stn-bench on an image directory. Datasets that
come as arrays (digits' rendered canvases, torchvision's CIFAR-10/MNIST) use its normalization
statistics, which travel in the checkpoint and the ONNX metadata. This module needs numpy and
pillow only (no torch).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import fields
from .errors import PreprocessingError, clip, shorten

CHANNEL_ORDERS = {"RGB": 3, "L": 1}
RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "bicubic": Image.Resampling.BICUBIC,
}


# Bounds on what a checkpoint or ONNX file may ask for. A side of 4096 px is already a 201 MB
# float32 input per RGB image; nothing this toolkit trains comes near it. mean/std: pixels are
# scaled to [0, 1] first, so normalized values stay within (1 + 1000) / 1e-6 ~ 1e9, finite in
# float32 (a std of 1e-300 is 0 there and makes every confidence NaN).
MAX_IMAGE_SIDE = 4096
MAX_MEAN_STD = 1000.0
MIN_STD = 1e-6


@dataclass(frozen=True)
class Preprocessing:
    """Decode → convert to ``channel_order`` → resize to ``image_size`` → scale to [0, 1] →
    normalize with ``mean``/``std`` → CHW float32.

    ``image_size`` is (height, width). ``channel_order`` is a PIL mode: ``"RGB"`` for 3-channel
    models, ``"L"`` for 1-channel (grayscale) models.
    """

    image_size: tuple[int, int] = (32, 32)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    channel_order: str = "RGB"
    resample: str = "bilinear"

    def __post_init__(self) -> None:
        # -- hardening (issue 12): every field from a file is checked for type, finiteness and
        # range; a bad one is a one-line PreprocessingError naming it (never a silent
        # conversion: tuple("123") would be ('1', '2', '3'), and a NaN or 1e-300 std labels
        # every image with confidence nan).
        err = PreprocessingError
        order = fields.string(self.channel_order, "channel_order", choices=sorted(CHANNEL_ORDERS), error=err)
        fields.string(self.resample, "resample", choices=sorted(RESAMPLE), error=err)
        size = self.image_size
        if isinstance(size, (str, bytes, dict)) or not isinstance(size, Sequence) or len(size) != 2:
            raise err(f"image_size must be two positive ints (height, width), got {shorten(size)}")
        size = [
            fields.integer(v, f"image_size[{i}]", low=1, high=MAX_IMAGE_SIDE, error=err) for i, v in enumerate(size)
        ]
        n = CHANNEL_ORDERS[order]
        mean = [
            fields.real(v, f"mean[{i}]", low=-MAX_MEAN_STD, high=MAX_MEAN_STD, float32=True, error=err)
            for i, v in enumerate(self._per_channel(self.mean, "mean", n, order))
        ]
        std = [
            fields.real(v, f"std[{i}]", low=MIN_STD, high=MAX_MEAN_STD, float32=True, error=err)
            for i, v in enumerate(self._per_channel(self.std, "std", n, order))
        ]
        object.__setattr__(self, "image_size", tuple(size))
        object.__setattr__(self, "mean", tuple(mean))
        object.__setattr__(self, "std", tuple(std))
        # -- end hardening

    @staticmethod
    def _per_channel(values: object, name: str, n: int, order: str) -> list:
        """``values`` as a list of ``n`` items (a str, a dict or a scalar is refused, not split)."""
        items = fields.sequence(values, name, error=PreprocessingError)
        if len(items) != n:
            raise PreprocessingError(f"mean/std need {n} values for channel_order {order!r}, {name} has {len(items)}")
        return items

    @property
    def channels(self) -> int:
        return CHANNEL_ORDERS[self.channel_order]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one preprocessed image."""
        return (self.channels, *self.image_size)

    # -- serialization (checkpoint and ONNX metadata) ---------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """From a checkpoint's or the ONNX metadata's dict; anything malformed is a PreprocessingError."""
        fields.mapping(d, "preprocessing", error=PreprocessingError)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in names]
        if unknown:
            raise PreprocessingError(f"unknown preprocessing keys: {shorten(sorted(map(str, unknown)))}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        if not isinstance(text, (str, bytes, bytearray)):
            raise PreprocessingError(f"preprocessing must be JSON text, got {shorten(text)}")
        try:
            d = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, nesting
            detail = f"{type(exc).__name__}: {clip(str(exc), 120)}"
            raise PreprocessingError(f"preprocessing is not JSON ({detail})") from None
        return cls.from_dict(d)

    # -- the transform itself ---------------------------------------------------------------
    def convert(self, image: Image.Image) -> Image.Image:
        """Bring any decoded PIL image (L, LA, P, RGBA, I;16, CMYK, …) to ``channel_order``."""
        mode = image.mode
        if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            # 16/32-bit integer grayscale: rescale to 8 bits rather than letting PIL clip.
            arr = np.asarray(image, dtype=np.float64)
            peak = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
            image = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        elif mode == "F":
            arr = np.asarray(image, dtype=np.float64)
            scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
            image = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), "L")
        elif mode in ("P", "PA") or "A" in mode:
            # Palette images may carry transparency; composite alpha onto black like RGBA.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            image = Image.alpha_composite(background, rgba)
        if image.mode != self.channel_order:
            image = image.convert(self.channel_order)
        return image

    def resize(self, image: Image.Image) -> Image.Image:
        h, w = self.image_size
        if image.size != (w, h):
            image = image.resize((w, h), RESAMPLE[self.resample])
        return image

    def to_uint8(self, image: Image.Image) -> np.ndarray:
        """The converted, resized image as an HWC (or HW) uint8 array."""
        return np.asarray(self.resize(self.convert(image)), dtype=np.uint8)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 HWC/HW (or NHWC) pixels → float32 CHW (or NCHW), scaled and normalized."""
        x = pixels.astype(np.float32) / np.float32(255.0)
        if x.ndim == 2:
            x = x[:, :, None]
        elif x.ndim == 3 and self.channels == 1 and x.shape[-1] != 1:
            x = x[..., None]
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        x = (x - mean) / std
        return np.ascontiguousarray(np.moveaxis(x, -1, -3))

    def denormalize(self, x: np.ndarray) -> np.ndarray:
        """float32 CHW/NCHW model input → uint8 HWC/NHWC pixels (for visualization)."""
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        hwc = np.moveaxis(np.asarray(x, dtype=np.float32), -3, -1) * std + mean
        return np.clip(hwc * 255.0 + 0.5, 0, 255).astype(np.uint8)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """A decoded PIL image → float32 CHW model input."""
        return self.normalize(self.to_uint8(image))

    def batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.stack([self(im) for im in images]) if images else np.zeros((0, *self.input_shape), np.float32)
