"""The training loop behind ``stn-train``: read it top to bottom.

    setup (seeds, determinism, device) -> data -> model -> optimizer -> [resume] ->
    for each epoch: fresh distortions, train one pass, evaluate on the test split,
                    keep the best checkpoint (by test accuracy) -> summary

The defaults of :class:`TrainConfig` are the recipe that ``benchmarks/train_digits.py`` measures
on ``digits``. On CPU a run is deterministic for a fixed seed: every epoch reseeds its shuffling,
dropout and distortions from ``(seed, epoch)``, so a resumed run continues exactly where the
original would have.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from stn_deploy import fields
from stn_deploy.errors import CheckpointError, StnDeployError, clip, shorten
from stn_deploy.fileio import check_writable

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint, versions
from .data import LoadedDataset, load_dataset
from .model import STNClassifier, STNConfig, build_model

OPTIMIZERS = ("adam", "sgd")
DEVICES = ("auto", "cpu", "cuda")


class TrainError(StnDeployError):
    """A training run that cannot start or continue (bad arguments, unusable --resume file)."""


@dataclass
class TrainConfig:
    """One training run. The defaults are the measured ``digits`` recipe."""

    dataset: str = "digits"
    arch: str = "stn"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3  # peak learning rate of the one-cycle schedule
    optimizer: str = "adam"
    warmup: float = 0.05  # fraction of the steps spent warming up to the peak lr
    loc_lr_scale: float = 0.5  # the localization network (θ regressor) learns this much slower
    clip_grad: float = 5.0  # max gradient norm (keeps θ from jumping off the image early on)
    label_smoothing: float = 0.1
    seed: int = 0
    device: str = "auto"
    output: Path = Path("model.pt")
    data_dir: Path | None = None
    download: bool = False

    # Fields that define the run; a resumed run must keep them (epochs may grow).
    RECIPE = (
        "dataset",
        "arch",
        "batch_size",
        "lr",
        "optimizer",
        "warmup",
        "loc_lr_scale",
        "clip_grad",
        "label_smoothing",
        "seed",
    )

    def recipe(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.RECIPE}


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    test_loss: float
    test_accuracy: float
    lr: float
    seconds: float


@dataclass
class TrainResult:
    output: Path
    arch: str
    dataset: str
    epochs: int
    best_epoch: int
    test_accuracy: float
    seconds: float
    history: list[EpochStats] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "test_accuracy": self.test_accuracy,
            "test_error": 1.0 - self.test_accuracy,
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "seconds": round(self.seconds, 2),
            "output": str(self.output),
            "arch": self.arch,
            "dataset": self.dataset,
            "history": [dataclasses.asdict(h) for h in self.history],
        }


def resolve_device(name: str) -> torch.device:
    if name not in DEVICES:
        raise TrainError(f"unknown device {name!r}; expected one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    return torch.device(name)


def lr_at(step: int, total_steps: int, peak: float, warmup: float) -> float:
    """One-cycle schedule: linear warm-up to ``peak``, then cosine decay to ``peak / 1000``."""
    warmup_steps = max(1, int(warmup * total_steps))
    if step < warmup_steps:
        return peak * (0.04 + 0.96 * step / warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: STNClassifier, name: str, lr: float, loc_lr_scale: float) -> torch.optim.Optimizer:
    """Two parameter groups: the classifier at ``lr``, the localization network at
    ``lr * loc_lr_scale`` (each group's ``lr_scale`` is applied by the schedule)."""
    loc = [p for n, p in model.named_parameters() if n.startswith(("localization.", "fc_loc."))]
    rest = [p for n, p in model.named_parameters() if not n.startswith(("localization.", "fc_loc."))]
    groups = [{"params": rest, "lr_scale": 1.0}]
    if loc:
        groups.append({"params": loc, "lr_scale": loc_lr_scale})
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    raise TrainError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


@torch.no_grad()
def evaluate(model: STNClassifier, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` over ``loader``."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        log_probs = model(images)
        loss_sum += F.nll_loss(log_probs, labels, reduction="sum").item()
        correct += (log_probs.argmax(1) == labels).sum().item()
        count += labels.numel()
    return loss_sum / max(count, 1), correct / max(count, 1)


def set_epoch(data: LoadedDataset, epoch: int) -> None:
    """Fresh training distortions for datasets that render them (``digits``)."""
    hook = getattr(data.dataset, "set_epoch", None)
    if hook is not None:
        hook(epoch)


def train(
    config: TrainConfig,
    *,
    resume: str | os.PathLike[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a model as ``config`` says and keep the best checkpoint at ``config.output``."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    # -- resume: the recorded recipe wins; --epochs may extend the run ----------------------
    state: dict[str, Any] = {}
    if resume is not None:
        state = read_resume_state(resume)
        config = dataclasses.replace(config, **state["recipe"])

    # -- setup -------------------------------------------------------------------------------
    check_writable(config.output)  # an unusable --output fails now, not after the first epoch
    device = resolve_device(config.device)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(config.seed)

    # -- data --------------------------------------------------------------------------------
    train_data = load_dataset(
        config.dataset, "train", data_dir=config.data_dir, download=config.download, seed=config.seed
    )
    test_data = load_dataset(config.dataset, "test", data_dir=config.data_dir, download=False, seed=config.seed)
    loader_generator = torch.Generator()
    train_loader = DataLoader(
        train_data.dataset, batch_size=config.batch_size, shuffle=True, drop_last=True, generator=loader_generator
    )
    if len(train_loader) == 0:
        raise TrainError(
            f"{config.dataset}: {len(train_data)} training images is fewer than one batch of {config.batch_size}"
        )
    test_loader = DataLoader(test_data.dataset, batch_size=512)

    # -- model -------------------------------------------------------------------------------
    height, width = train_data.preprocessing.image_size
    if height != width:
        raise TrainError(f"{config.dataset}: the model needs square inputs, got {height}×{width}")
    model_config = STNConfig(
        in_channels=train_data.preprocessing.channels,
        image_size=height,
        num_classes=train_data.num_classes,
        arch=config.arch,
    )
    model = build_model(model_config).to(device)
    optimizer = make_optimizer(model, config.optimizer, config.lr, config.loc_lr_scale)

    start_epoch, best_accuracy, best_epoch, seconds = 0, -1.0, 0, 0.0
    history: list[EpochStats] = []
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if state:
        if state["model_config"] != model_config.to_dict():
            raise TrainError(f"{resume}: its model config does not match dataset {config.dataset!r}")
        model.load_state_dict(state["last_state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"]
        best_accuracy, best_epoch = state["best_accuracy"], state["best_epoch"]
        best_state = state["best_state_dict"]
        seconds = state["seconds"]
        history = [EpochStats(**h) for h in state["history"]]
        if start_epoch >= config.epochs:
            raise TrainError(
                f"{resume}: already trained {start_epoch} epochs; pass --epochs N > {start_epoch} to continue"
            )

    total_steps = config.epochs * len(train_loader)
    log(
        f"training {config.arch} on {config.dataset} ({len(train_data)} train / {len(test_data)} test images, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters) on {device}, "
        f"{config.epochs} epochs from epoch {start_epoch + 1}"
    )

    # -- the loop ----------------------------------------------------------------------------
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(config.seed * 1_000_003 + epoch)  # dropout of this epoch
        loader_generator.manual_seed(config.seed * 1_000_033 + epoch)  # shuffling of this epoch
        set_epoch(train_data, epoch)  # distortions of this epoch

        model.train()
        loss_sum, batches = 0.0, 0
        bar = _progress(train_loader, f"epoch {epoch + 1}/{config.epochs}", enabled=progress)
        for step_in_epoch, (images, labels) in enumerate(bar):
            step = epoch * len(train_loader) + step_in_epoch
            lr = lr_at(step, total_steps, config.lr, config.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            images, labels = images.to(device), labels.to(device)

            # The model outputs log-probabilities; cross_entropy applies log_softmax to them again,
            # which changes nothing (log_softmax is idempotent: its output's logsumexp is 0), so this
            # is (1-ε)·NLL + ε·mean(−log p) with the smoothing PyTorch implements and tests.
            loss = F.cross_entropy(model(images), labels, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
            optimizer.step()

            loss_sum += loss.item()
            batches += 1
            if progress and step_in_epoch % 5 == 0:
                bar.set_postfix(loss=f"{loss_sum / batches:.3f}", lr=f"{lr:.2e}")

        test_loss, test_accuracy = evaluate(model, test_loader, device)
        seconds += time.perf_counter() - t0
        stats = EpochStats(
            epoch + 1, loss_sum / max(batches, 1), test_loss, test_accuracy, lr, round(time.perf_counter() - t0, 2)
        )
        history.append(stats)
        improved = test_accuracy > best_accuracy
        if improved:
            best_accuracy, best_epoch = test_accuracy, epoch + 1
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        log(
            f"epoch {epoch + 1:3d}/{config.epochs}  train loss {stats.train_loss:.4f}  test loss {test_loss:.4f}  "
            f"test acc {100 * test_accuracy:6.2f}%  {stats.seconds:5.1f}s{'  *best' if improved else ''}"
        )

        # Every epoch rewrites the checkpoint: the best weights to deploy, plus the last
        # weights and optimizer state so --resume continues this exact run.
        save_checkpoint(
            Checkpoint(
                config=model_config,
                state_dict=best_state,
                class_names=train_data.class_names,
                preprocessing=train_data.preprocessing,
                dataset=config.dataset,
                metrics={
                    "test_accuracy": best_accuracy,
                    "test_error": 1.0 - best_accuracy,
                    "best_epoch": best_epoch,
                    "epochs": epoch + 1,
                    "seconds": round(seconds, 2),
                    "test_images": len(test_data),
                    "train_images": len(train_data),
                    "device": str(device),
                },
                versions=versions(),
                train_state={
                    "epoch": epoch + 1,
                    "epochs": config.epochs,  # the run's total: a resume without --epochs keeps its schedule
                    "recipe": config.recipe(),
                    "model_config": model_config.to_dict(),
                    "optimizer": optimizer.state_dict(),
                    "last_state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "best_state_dict": best_state,
                    "best_accuracy": best_accuracy,
                    "best_epoch": best_epoch,
                    "seconds": seconds,
                    "history": [dataclasses.asdict(h) for h in history],
                },
            ),
            config.output,
        )

    if not history:
        raise TrainError(f"nothing to train: --epochs {config.epochs}")
    return TrainResult(
        output=Path(config.output),
        arch=config.arch,
        dataset=config.dataset,
        epochs=len(history),
        best_epoch=best_epoch,
        test_accuracy=best_accuracy,
        seconds=seconds,
        history=history,
    )


# The training state a checkpoint must hold to be resumed ("epochs", the run's total, is optional:
# without it a resumed run takes --epochs).
RESUME_FIELDS = (
    "epoch",
    "recipe",
    "model_config",
    "optimizer",
    "last_state_dict",
    "best_state_dict",
    "best_accuracy",
    "best_epoch",
    "seconds",
    "history",
)


def read_resume_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The training state stored in a checkpoint written by :func:`train`."""
    ckpt = load_checkpoint(path)  # CheckpointError (one line) for anything that is not one
    state = ckpt.train_state
    missing = [k for k in RESUME_FIELDS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: cannot resume, the checkpoint has no training state ({', '.join(missing)})")
    # -- hardening (issue 12): every field of the state is checked before training starts
    try:
        _check_resume_state(state)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot resume, malformed training state ({clip(str(exc))})") from None
    # -- end hardening
    return state


# -- hardening (issue 12) -----------------------------------------------------------------------
# The recipe fields a resumed run reads, with the checks --resume applies (the CLI's own ranges).
_RECIPE_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "dataset": lambda v, n: fields.string(v, n),
    "arch": lambda v, n: fields.string(v, n, choices=("stn", "cnn")),
    "batch_size": lambda v, n: fields.integer(v, n, low=1, high=1 << 20),
    "lr": lambda v, n: fields.real(v, n, low=0.0, low_open=True, high=1e3),
    "optimizer": lambda v, n: fields.string(v, n, choices=OPTIMIZERS),
    "warmup": lambda v, n: fields.real(v, n, low=0.0, high=1.0),
    "loc_lr_scale": lambda v, n: fields.real(v, n, low=0.0, high=1e3),
    "clip_grad": lambda v, n: fields.real(v, n, low=0.0, high=1e6),
    "label_smoothing": lambda v, n: fields.real(v, n, low=0.0, high=1.0),
    # seed * 1_000_033 + epoch seeds torch each epoch; it must stay a 64-bit integer
    "seed": lambda v, n: fields.integer(v, n, low=-(1 << 40), high=1 << 40),
}
_OPTIMIZER_BUFFERS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def _check_resume_state(state: dict[str, Any]) -> None:
    """Raise ValueError/TypeError naming the first field of ``state`` that a resumed run could not use."""
    recipe = fields.mapping(state["recipe"], "recipe")
    unknown = [k for k in recipe if k not in TrainConfig.RECIPE]
    if unknown:
        raise ValueError(f"unknown recipe keys {shorten(sorted(map(str, unknown)))}")
    for key, value in recipe.items():
        _RECIPE_CHECKS[key](value, f"recipe {key}")
    epoch = fields.integer(state["epoch"], "epoch", low=0, high=1 << 20)
    if "epochs" in state:
        fields.integer(state["epochs"], "epochs", low=1, high=1 << 20)
    fields.real(state["best_accuracy"], "best_accuracy", low=-1.0, high=1.0)
    fields.integer(state["best_epoch"], "best_epoch", low=0, high=epoch)
    fields.real(state["seconds"], "seconds", low=0.0)
    history = fields.sequence(state["history"], "history")
    if len(history) != epoch:
        raise ValueError(f"history has {len(history)} epochs, the state says {epoch}")
    names = [f.name for f in dataclasses.fields(EpochStats)]
    for i, h in enumerate(history):
        if not isinstance(h, dict) or sorted(h) != sorted(names):
            raise ValueError(f"history[{i}] must have the fields {', '.join(names)}, got {shorten(h)}")
        for key, value in h.items():  # a diverged run's NaN loss is a number too
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"history[{i}].{key} must be a number, got {shorten(value)}")

    # The weights and the optimizer state must fit the model the recorded config builds.
    model = build_model(STNConfig.from_dict(state["model_config"]))
    for key in ("last_state_dict", "best_state_dict"):
        weights = fields.mapping(state[key], key)
        try:
            model.load_state_dict(weights, strict=True)
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise ValueError(f"{key} does not fit the model config ({clip(str(exc), 200)})") from None
    optimizer_state = fields.mapping(state["optimizer"], "optimizer")
    optimizer = make_optimizer(model, recipe.get("optimizer", "adam"), 1e-3, recipe.get("loc_lr_scale", 1.0))
    try:
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError, IndexError) as exc:
        detail = f"{type(exc).__name__}: {clip(str(exc), 200)}"
        raise ValueError(f"optimizer state does not fit the model ({detail})") from None
    for group in optimizer.param_groups:
        for param in group["params"]:
            for buffer, value in optimizer.state.get(param, {}).items():
                if buffer in _OPTIMIZER_BUFFERS and (not isinstance(value, torch.Tensor) or value.shape != param.shape):
                    shape = list(value.shape) if isinstance(value, torch.Tensor) else shorten(value)
                    raise ValueError(
                        f"optimizer {buffer} of shape {shape} for a parameter of shape {list(param.shape)}"
                    )


# -- end hardening


def _progress(loader: DataLoader, desc: str, *, enabled: bool):
    if not enabled:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=desc, unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True)
