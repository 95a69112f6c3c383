"""Datasets for stn-train: the offline ``digits`` benchmark, torchvision's MNIST and CIFAR-10, and
image folders. Every loader returns a :class:`LoadedDataset` with the
:class:`~stn_deploy.preprocessing.Preprocessing` that the checkpoint records: image folders are
decoded and resized by it exactly as stn-infer does, and every dataset is normalized with its
statistics.

``digits`` is the default and needs no network: the 1,797 real handwritten 8×8 digits bundled
with scikit-learn, rendered on a 3×32×32 canvas under random rotation, scale and translation with
light clutter and noise (the rotated-translated-scaled setting of the STN paper). Training images
are distorted afresh each epoch (:meth:`DigitsDataset.set_epoch`, seeded); the test split is a
fixed, disjoint 20% of the base digits under fixed distortions.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from stn_deploy.errors import DatasetError, ImageError
from stn_deploy.images import IMAGE_EXTENSIONS, decode, find_images, open_image
from stn_deploy.preprocessing import Preprocessing

DATASETS = ("digits", "cifar10", "mnist", "imagefolder:PATH")
# Datasets a name alone identifies. A model file's metadata may name one of these for stn-export's
# parity inputs, its int8 gate and stn-bench's inputs; an imagefolder:PATH or any path in a file
# is never read on the file's say-so (only the user's own flags choose paths on the host).
BUILTIN_DATASETS = ("digits", "cifar10", "mnist")
SPLITS = ("train", "test")
DEFAULT_DATA_DIR = Path("data")

# Standard per-channel statistics of the torchvision datasets (training split).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


@dataclass
class LoadedDataset:
    """One split of a dataset, ready for a DataLoader."""

    name: str
    split: str
    dataset: Dataset  # yields (normalized float32 CHW tensor, int label)
    class_names: list[str]
    preprocessing: Preprocessing

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


def load_dataset(
    name: str = "digits",
    split: str = "train",
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    seed: int = 0,
) -> LoadedDataset:
    """Load ``split`` (``"train"`` or ``"test"``) of dataset ``name``.

    ``seed`` drives the per-epoch training distortions of ``digits``; test splits never depend
    on it. Missing data raises :class:`DatasetError` with a one-line message.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if name == "digits":
        return _load_digits(split, seed)
    if name in ("cifar10", "mnist"):
        return _load_torchvision(name, split, Path(data_dir or DEFAULT_DATA_DIR), download)
    if name.startswith("imagefolder:"):
        return _load_imagefolder(Path(name.split(":", 1)[1]), split)
    raise DatasetError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")


def load_samples(
    name: str, n: int, *, split: str = "test", data_dir: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first ``n`` images (normalized float32 [n,C,H,W]) and labels (int64 [n]) of a split.

    Returns ``None`` when the dataset is not available offline; this never downloads. The
    exporter uses it for parity on real inputs and int8 calibration.
    """
    try:
        loaded = load_dataset(name, split, data_dir=data_dir, download=False)
    except DatasetError:
        return None
    count = min(n, len(loaded))
    if count == 0:
        return None
    pairs = [loaded.dataset[i] for i in range(count)]
    images = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in pairs])
    labels = torch.tensor([int(y) for _, y in pairs], dtype=torch.int64)
    return images, labels


@dataclass
class Samples:
    """Preprocessed images [N, C, H, W] float32, labels [N] int64 or None, and where they came from."""

    images: np.ndarray
    labels: np.ndarray | None
    source: str


def load_image_samples(
    spec: str | os.PathLike[str],
    preprocessing: Preprocessing,
    *,
    n: int = 512,
    split: str = "train",
    class_names: list[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
) -> Samples:
    """Up to ``n`` preprocessed images, with labels when known, from a dataset name (``digits``,
    ``cifar10``, ``mnist``, ``imagefolder:PATH``; its ``split``) or an image directory: the one
    loader behind int8 calibration and its accuracy gate, parity's dataset inputs and stn-bench's.

    A directory is decoded with the model's own :class:`Preprocessing`; when its sub-folders are
    named after ``class_names``, the images get those labels. Raises :class:`DatasetError`.
    """
    path = Path(spec)
    if path.is_dir():
        return _load_directory(path, preprocessing, n, class_names)
    name = str(spec)
    folder = name.startswith("imagefolder:")
    if not folder and (os.sep in name or path.suffix):
        raise DatasetError(f"{spec}: no such image directory (and not a dataset name)")
    if name not in DATASETS and not folder:
        raise DatasetError(f"{spec}: not a directory, nor a dataset name ({', '.join(DATASETS)})")
    loaded = load_samples(name, n, split=split, data_dir=data_dir)
    if loaded is None:
        raise DatasetError(f"dataset '{name}': not available on this machine (split {split})")
    images, labels = loaded
    images = images.numpy().astype(np.float32)
    if tuple(images.shape[1:]) != tuple(preprocessing.input_shape):
        raise DatasetError(
            f"dataset '{name}': samples are {list(images.shape[1:])}, the model takes {list(preprocessing.input_shape)}"
        )
    return Samples(images, labels.numpy().astype(np.int64), f"{name}:{split}")


def _load_directory(root: Path, preprocessing: Preprocessing, n: int, class_names: list[str] | None) -> Samples:
    files = find_images(root).files
    index = {name: i for i, name in enumerate(class_names or [])}
    labelled = bool(index) and all(
        f.relative_to(root).parts[0] in index for f in files if len(f.relative_to(root).parts) > 1
    )
    labelled = labelled and all(len(f.relative_to(root).parts) > 1 for f in files)
    if len(files) > n:  # an even spread over the (sorted) files, so every class folder contributes
        files = [files[int(i)] for i in np.linspace(0, len(files) - 1, n)]
    arrays, labels = [], []
    for f in files:
        result = decode(f, preprocessing)
        if result.ok:
            arrays.append(preprocessing.normalize(result.array))
            if labelled:
                labels.append(index[f.relative_to(root).parts[0]])
    if not arrays:
        raise DatasetError(f"{root}: none of its {len(files)} image files could be decoded")
    return Samples(np.stack(arrays).astype(np.float32), np.asarray(labels, np.int64) if labelled else None, str(root))


# ---------------------------------------------------------------------------------------------
# digits: scikit-learn's handwritten digits under rotation, scale, translation and clutter
# ---------------------------------------------------------------------------------------------

DIGITS_CLASSES = [str(i) for i in range(10)]
DIGITS_SPLIT_SEED = 20150605  # fixes which base digits are held out (never --seed)
DIGITS_TEST_SEED = 1506  # fixes the test distortions
DIGITS_STATS_SEED = 2025  # fixes the rendering the normalization statistics come from


@dataclass(frozen=True)
class Distortion:
    """How a base digit is placed on the canvas (the STN paper's RTS setting plus clutter).

    ``scale`` is the digit's side as a fraction of the canvas side (the 8×8 digit spans
    ``scale * canvas`` pixels before rotation); ``translation`` is the largest shift of its
    centre as a fraction of the free margin ``1 - scale`` (1.0: the glyph box may touch the edge).
    """

    canvas: int = 32
    rotation: float = 60.0  # degrees, uniform in ±rotation
    scale: tuple[float, float] = (0.55, 0.9)
    translation: float = 0.8
    clutter: int = 4  # fragments of other digits scattered over the canvas
    clutter_size: float = 0.22  # fragment side as a fraction of the canvas
    noise: float = 0.04  # std of additive Gaussian pixel noise (pixels in [0, 1])


DEFAULT_DISTORTION = Distortion()


def render_digits(
    digits: torch.Tensor, generator: torch.Generator, distortion: Distortion | None = None
) -> torch.Tensor:
    """Render base digits [N,8,8] (values in [0,1]) as distorted RGB canvases [N,3,S,S] in [0,1].

    Everything random comes from ``generator``, so a seed fixes the output exactly.
    """
    distortion = distortion or DEFAULT_DISTORTION
    n, size = digits.shape[0], distortion.canvas
    glyphs = digits.unsqueeze(1).float()

    def uniform(low: float, high: float, count: int = n) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, generator=generator)

    # The digit: rotation φ, scale z, centre t. affine_grid maps each canvas point p to the
    # glyph point R(φ)ᵀ(p − t)/z, i.e. the glyph appears rotated by φ, scaled by z, moved by t.
    angle = uniform(-distortion.rotation, distortion.rotation) * (math.pi / 180)
    zoom = uniform(*distortion.scale)
    reach = distortion.translation * (1 - zoom).clamp(min=0)
    shift = torch.stack([uniform(-1, 1), uniform(-1, 1)], 1) * reach.unsqueeze(1)
    canvas = _place(glyphs, angle, zoom, shift, size)

    # Clutter: fragments cut from other digits placed at random, as in cluttered MNIST.
    k = distortion.clutter
    if k > 0:
        donors = glyphs[torch.randint(0, n, (n * k,), generator=generator)]
        f_angle = uniform(-math.pi, math.pi, n * k)
        f_zoom = uniform(*distortion.scale, n * k)
        f_shift = torch.stack([uniform(-1, 1, n * k), uniform(-1, 1, n * k)], 1)
        pieces = _place(donors, f_angle, f_zoom, f_shift, size)
        side = max(1, round(distortion.clutter_size * size))
        top = torch.randint(0, size - side + 1, (n * k,), generator=generator)
        left = torch.randint(0, size - side + 1, (n * k,), generator=generator)
        rows = torch.arange(size)
        inside_r = (rows[None, :] >= top[:, None]) & (rows[None, :] < top[:, None] + side)
        inside_c = (rows[None, :] >= left[:, None]) & (rows[None, :] < left[:, None] + side)
        mask = (inside_r[:, :, None] & inside_c[:, None, :]).unsqueeze(1)
        pieces = (pieces * mask).view(n, k, 1, size, size).amax(dim=1)
        canvas = torch.maximum(canvas, pieces * 0.8)

    # Colour: each image gets a random ink colour; then light pixel noise.
    ink = uniform(0.55, 1.0, n * 3).view(n, 3, 1, 1)
    rgb = canvas * ink
    if distortion.noise > 0:
        rgb = rgb + distortion.noise * torch.randn(rgb.shape, generator=generator)
    return rgb.clamp_(0, 1)


def _place(
    glyphs: torch.Tensor, angle: torch.Tensor, zoom: torch.Tensor, shift: torch.Tensor, size: int
) -> torch.Tensor:
    """Warp glyphs [N,1,h,w] onto [N,1,size,size] canvases: rotate by angle, scale by zoom, move by shift."""
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # inverse map p -> A⁻¹(p - t) with A = zoom·R(angle): A⁻¹ = R(-angle)/zoom
    a = torch.stack([cos, sin, -sin, cos], 1).view(-1, 2, 2)
    b = -(a @ shift.unsqueeze(2))
    theta = torch.cat([a, b], 2)
    grid = F.affine_grid(theta, [glyphs.shape[0], 1, size, size], align_corners=False)
    return F.grid_sample(glyphs, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class DigitsDataset(Dataset):
    """Distorted renderings of base digits.

    With ``fixed=True`` (the test split) the renderings are made once from ``seed``. Otherwise
    (training) :meth:`set_epoch` re-renders every digit from ``seed`` and the epoch number, so
    each epoch sees new distortions and a run is reproducible (and resumable) exactly.
    """

    def __init__(
        self,
        digits: torch.Tensor,
        labels: torch.Tensor,
        preprocessing: Preprocessing,
        *,
        seed: int,
        fixed: bool,
        copies: int = 1,
        distortion: Distortion | None = None,
    ) -> None:
        self.digits = digits.repeat(copies, 1, 1)
        self.labels = labels.repeat(copies)
        self.seed = seed
        self.fixed = fixed
        self.distortion = distortion or DEFAULT_DISTORTION
        self.mean = torch.tensor(preprocessing.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(preprocessing.std).view(1, -1, 1, 1)
        self.epoch = -1
        self.images = torch.empty(0)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if self.fixed and self.images.numel():
            return
        if epoch == self.epoch:
            return
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        canvases = render_digits(self.digits, generator, self.distortion)
        self.images = ((canvases - self.mean) / self.std).contiguous()
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) into ``load_digits()``: a fixed, class-stratified 80/20 split."""
    from sklearn.datasets import load_digits

    labels = load_digits().target
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    train, test = [], []
    for c in range(10):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(math.ceil(0.2 * len(members)))
        test.extend(members[:n_test])
        train.extend(members[n_test:])
    return np.sort(np.array(train)), np.sort(np.array(test))


_DIGITS_CACHE: dict[str, object] = {}


def _digits_base() -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray, Preprocessing]:
    if "base" not in _DIGITS_CACHE:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)
        labels = torch.from_numpy(bunch.target.astype(np.int64))
        train_idx, test_idx = digits_split()
        # Normalization statistics: per-channel mean/std over one fixed rendering of the
        # training digits (never the test digits).
        canvases = render_digits(images[train_idx], torch.Generator().manual_seed(DIGITS_STATS_SEED))
        mean = canvases.mean(dim=(0, 2, 3)).tolist()
        std = canvases.std(dim=(0, 2, 3)).tolist()
        preprocessing = Preprocessing(
            image_size=(32, 32),
            mean=tuple(round(v, 4) for v in mean),
            std=tuple(round(v, 4) for v in std),
            channel_order="RGB",
        )
        _DIGITS_CACHE["base"] = (images, labels, train_idx, test_idx, preprocessing)
    return _DIGITS_CACHE["base"]  # type: ignore[return-value]


DIGITS_TEST_COPIES = 4  # fixed distortions per held-out digit (364 digits: 1,456 test images)


def _load_digits(split: str, seed: int) -> LoadedDataset:
    images, labels, train_idx, test_idx, preprocessing = _digits_base()
    if split == "train":
        data = DigitsDataset(images[train_idx], labels[train_idx], preprocessing, seed=seed, fixed=False)
    else:
        data = DigitsDataset(
            images[test_idx],
            labels[test_idx],
            preprocessing,
            seed=DIGITS_TEST_SEED,
            fixed=True,
            copies=DIGITS_TEST_COPIES,
        )
    return LoadedDataset("digits", split, data, list(DIGITS_CLASSES), preprocessing)


# ---------------------------------------------------------------------------------------------
# torchvision: MNIST and CIFAR-10 (real download code; --data-dir / --download)
# ---------------------------------------------------------------------------------------------


class PreprocessedImages(Dataset):
    """Wrap a dataset of (PIL image, label) so each image goes through ``preprocessing``."""

    def __init__(self, base: Dataset, preprocessing: Preprocessing) -> None:
        self.base = base
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return torch.from_numpy(self.preprocessing(image)), int(label)


def _load_torchvision(name: str, split: str, root: Path, download: bool) -> LoadedDataset:
    from torchvision import datasets

    if name == "mnist":
        cls, where = datasets.MNIST, root / "MNIST" / "raw"
        preprocessing = Preprocessing(image_size=(28, 28), mean=MNIST_MEAN, std=MNIST_STD, channel_order="L")
    else:
        cls, where = datasets.CIFAR10, root / "cifar-10-batches-py"
        preprocessing = Preprocessing(image_size=(32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD, channel_order="RGB")
    try:
        base = cls(root=str(root), train=(split == "train"), download=download)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        if download and detail.startswith("Error downloading"):  # torchvision wraps MNIST's URLError
            raise DatasetError(f"{name}: could not download into {root} ({detail})") from None
        if download:
            raise DatasetError(f"{name} under {root} is unreadable after download ({detail})") from None
        raise DatasetError(f"{name} not found under {where}; pass --download (or --data-dir DIR)") from None
    except OSError as exc:  # network failures (URLError is an OSError) and unreadable files
        reason = getattr(exc, "reason", None) or exc.strerror or exc
        raise DatasetError(f"{name}: could not download into {root} ({reason})") from None
    class_names = [str(c) for c in base.classes]
    if name == "mnist":
        class_names = [c.split(" - ")[0] for c in class_names]  # "0 - zero" -> "0"
    return LoadedDataset(name, split, PreprocessedImages(base, preprocessing), class_names, preprocessing)


# ---------------------------------------------------------------------------------------------
# imagefolder:PATH — one sub-folder per class
# ---------------------------------------------------------------------------------------------

IMAGEFOLDER_SPLIT_SEED = 7
IMAGEFOLDER_SIZE = (32, 32)


class ImageFiles(Dataset):
    """Image files with labels, decoded and preprocessed exactly as ``stn-infer`` will."""

    def __init__(self, files: list[Path], labels: list[int], preprocessing: Preprocessing) -> None:
        self.files = files
        self.labels = labels
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.files)

    def pixels(self, index: int) -> np.ndarray:
        path = self.files[index]
        try:
            with open_image(path) as image:
                return self.preprocessing.to_uint8(image)
        except ImageError as exc:
            raise DatasetError(str(exc)) from None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.preprocessing.normalize(self.pixels(index))), self.labels[index]


def _class_files(root: Path) -> tuple[list[str], list[list[Path]]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = [
        sorted(p for p in (root / c).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        for c in classes
    ]
    return classes, files


def _load_imagefolder(root: Path, split: str) -> LoadedDataset:
    """``root/<class>/*.png`` (split 80/20 per class, fixed) or ``root/{train,test}/<class>/…``."""
    if not root.is_dir():
        raise DatasetError(f"{root}: no such directory (imagefolder:PATH needs one sub-folder per class)")
    has_splits = (root / "train").is_dir() and ((root / "test").is_dir() or (root / "val").is_dir())
    if has_splits:
        classes, train_files = _class_files(root / "train")
        test_root = root / "test" if (root / "test").is_dir() else root / "val"
        test_classes, test_files = _class_files(test_root)
        if test_classes != classes:
            raise DatasetError(f"{test_root}: class folders {test_classes} differ from {root / 'train'}: {classes}")
    else:
        classes, all_files = _class_files(root)
        rng = np.random.default_rng(IMAGEFOLDER_SPLIT_SEED)
        train_files, test_files = [], []
        for files in all_files:
            order = rng.permutation(len(files))
            n_test = int(math.ceil(0.2 * len(files))) if len(files) > 1 else 0
            test_files.append([files[i] for i in sorted(order[:n_test])])
            train_files.append([files[i] for i in sorted(order[n_test:])])
    if len(classes) < 2:
        raise DatasetError(f"{root}: found {len(classes)} class folder(s); need at least 2 (one sub-folder per class)")
    empty = [c for c, f in zip(classes, train_files) if not f]
    if empty:
        raise DatasetError(f"{root}: no images in class folder(s) {', '.join(empty)}")

    def flatten(groups: list[list[Path]]) -> tuple[list[Path], list[int]]:
        """Round-robin over the classes, so the first n images of a split (load_samples: parity
        and int8 calibration) cover every class instead of the first one."""
        pairs = [(g[k], i) for k in range(max(map(len, groups), default=0)) for i, g in enumerate(groups) if k < len(g)]
        return [p for p, _ in pairs], [i for _, i in pairs]

    train_paths, train_labels = flatten(train_files)
    # Normalization statistics from (up to 512 of) the training images, in the model's colour
    # order and size: the same conversion and resize that inference applies.
    probe = ImageFiles(train_paths, train_labels, Preprocessing(image_size=IMAGEFOLDER_SIZE))
    step = math.ceil(len(train_paths) / 512)
    pixels = np.stack([probe.pixels(i) for i in range(0, len(train_paths), step)]).astype(np.float64) / 255.0
    mean = pixels.mean(axis=(0, 1, 2))
    std = np.maximum(pixels.std(axis=(0, 1, 2)), 1e-3)
    preprocessing = Preprocessing(
        image_size=IMAGEFOLDER_SIZE,
        mean=tuple(round(float(v), 4) for v in mean),
        std=tuple(round(float(v), 4) for v in std),
        channel_order="RGB",
    )
    paths, labels = (train_paths, train_labels) if split == "train" else flatten(test_files)
    if not paths:
        raise DatasetError(f"{root}: the {split} split has no images")
    return LoadedDataset(f"imagefolder:{root}", split, ImageFiles(paths, labels, preprocessing), classes, preprocessing)
