"""stn-train end to end on tiny real runs: JSON summary, checkpoint, resume, determinism, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from stn_deploy.train.checkpoint import load_checkpoint
from stn_deploy.train.cli import main
from stn_deploy.train.trainer import TrainConfig, lr_at, train


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A small image folder: bright squares vs crosses at random positions (learnable quickly)."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for name in ("cross", "square"):
        (root / name).mkdir()
        for i in range(30):
            img = np.zeros((32, 32, 3), np.uint8)
            r, c = rng.integers(4, 20, 2)
            if name == "square":
                img[r : r + 9, c : c + 9] = 255
            else:
                img[r + 4, c : c + 9] = 255
                img[r : r + 9, c + 4] = 255
            Image.fromarray(img).save(root / name / f"{i}.png")
    return f"imagefolder:{root}"


def _run(args):
    result = CliRunner().invoke(main, [*args, "--no-progress"], catch_exceptions=False)
    return result


def test_cli_trains_writes_checkpoint_json_and_resumes(tmp_path, shapes):
    out = tmp_path / "model.pt"
    result = _run(["--dataset", shapes, "--epochs", "2", "--batch-size", "16", "--output", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["epochs"] == 2 and summary["arch"] == "stn" and summary["dataset"] == shapes
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["test_error"] == pytest.approx(1 - summary["test_accuracy"])
    assert summary["seconds"] > 0 and summary["output"] == str(out)
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert "epoch   2/2" in result.stderr and "test acc" in result.stderr

    ckpt = load_checkpoint(out)
    assert ckpt.class_names == ["cross", "square"]
    assert ckpt.dataset == shapes
    assert ckpt.metrics["test_accuracy"] == summary["test_accuracy"]
    assert ckpt.metrics["best_epoch"] == summary["best_epoch"]
    assert ckpt.train_state["epoch"] == 2
    model = ckpt.build_model()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)

    resumed = _run(["--resume", str(out), "--epochs", "3", "--json"])  # writes back to the resumed file
    assert resumed.exit_code == 0, resumed.output
    summary3 = json.loads(resumed.stdout)
    assert summary3["epochs"] == 3
    assert [h["epoch"] for h in summary3["history"]] == [1, 2, 3]
    assert summary3["history"][:2] == summary["history"]  # the first two epochs are kept, not redone
    assert load_checkpoint(out).train_state["epoch"] == 3

    clash = _run(["--resume", str(out), "--epochs", "4", "--arch", "cnn", "--output", str(out)])
    assert clash.exit_code != 0
    assert "different recipe" in clash.stderr and len(clash.stderr.strip().splitlines()) == 1


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, shapes):
    common = TrainConfig(dataset=shapes, epochs=3, batch_size=16, seed=3)
    full = train(TrainConfig(**{**common.__dict__, "output": tmp_path / "full.pt"}), progress=False)
    # "interrupt" after epoch 2 by copying the checkpoint of an identical run at that point
    part = tmp_path / "part.pt"
    cfg = TrainConfig(**{**common.__dict__, "output": part})
    import stn_deploy.train.trainer as trainer

    original = trainer.save_checkpoint
    calls = []

    def save_then_stop(ckpt, path):
        original(ckpt, path)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    trainer.save_checkpoint = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, progress=False)
    finally:
        trainer.save_checkpoint = original
    assert load_checkpoint(part).train_state["epoch"] == 2
    # stn-train --resume without --epochs: the interrupted run's total (3) and so its lr schedule
    result = _run(["--resume", str(part), "--json"])
    assert result.exit_code == 0, result.output
    resumed = json.loads(result.stdout)
    assert resumed["epochs"] == 3 and "3 epochs from epoch 3" in result.stderr
    a = load_checkpoint(tmp_path / "full.pt").train_state["last_state_dict"]
    b = load_checkpoint(part).train_state["last_state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert resumed["test_accuracy"] == full.test_accuracy
    # A finished run has nothing left: an error, and the checkpoint stays as it is.
    before = part.read_bytes()
    again = _run(["--resume", str(part), "-o", str(tmp_path / "other.pt")])
    assert again.exit_code != 0 and again.stderr.strip().splitlines() == [
        f"Error: {part}: already trained 3 epochs; pass --epochs N > 3 to continue"
    ]
    assert part.read_bytes() == before and not (tmp_path / "other.pt").exists()


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, shapes):
    def weights(seed, name):
        train(TrainConfig(dataset=shapes, epochs=1, batch_size=16, seed=seed, output=tmp_path / name), progress=False)
        return load_checkpoint(tmp_path / name).train_state["last_state_dict"]

    a, b, c = weights(0, "a.pt"), weights(0, "b.pt"), weights(1, "c.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_visualize_flag_writes_the_warp_figure(tmp_path, shapes):
    out, png = tmp_path / "model.pt", tmp_path / "warps.png"
    result = _run(
        [
            "--dataset",
            shapes,
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--output",
            str(out),
            "--visualize",
            str(png),
            "--json",
        ]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["visualization"] == str(png)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 2 * 4 * 32 and im.height > 3 * 32


def test_digits_checkpoint_visualization(tmp_path, monkeypatch):
    """The figure for a digits model: test images through the model's own transform()."""
    from stn_deploy.train import visualization
    from stn_deploy.train.checkpoint import Checkpoint, save_checkpoint
    from stn_deploy.train.data import load_dataset
    from stn_deploy.train.model import build_model

    drawn = []
    real_save = visualization.save_warp_grid

    def save(inputs, warped, path, **options):
        drawn.append((inputs.astype(int), warped.astype(int)))
        return real_save(inputs, warped, path, **options)

    monkeypatch.setattr(visualization, "save_warp_grid", save)
    test = load_dataset("digits", "test")
    torch.manual_seed(0)
    for name, bias in (("identity", [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]), ("zoom", [0.5, 0.0, 0.0, 0.0, 0.5, 0.0])):
        model = build_model()
        with torch.no_grad():  # the θ head's output is its bias when its weights are zero (the init)
            model.fc_loc[-1].bias.copy_(torch.tensor(bias))
        path = save_checkpoint(
            Checkpoint(model.config, model.state_dict(), test.class_names, test.preprocessing, "digits"),
            tmp_path / f"{name}.pt",
        )
        png = visualization.visualize_checkpoint(path, tmp_path / f"{name}.png", count=16)
        with Image.open(png) as im:
            assert im.format == "PNG" and im.height > 4 * 32
    (inputs, same), (inputs_again, zoomed) = drawn
    assert inputs.shape == (16, 32, 32, 3) and np.array_equal(inputs, inputs_again)
    assert np.abs(same - inputs).max() <= 1  # identity θ: the warped half is the input
    assert np.abs(zoomed - inputs).mean() > 10  # a 2× zoom changes it visibly


def test_bad_resume_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"definitely not a checkpoint")
    result = _run(["--resume", str(bad)])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(bad) in lines[0]
    missing = _run(["--resume", str(tmp_path / "nope.pt")])
    assert missing.exit_code != 0 and "no such file" in missing.stderr


def test_unusable_output_paths_fail_before_training(tmp_path, shapes):
    (tmp_path / "a_file").write_text("x")
    base = ["--dataset", shapes, "--epochs", "1", "--batch-size", "16"]
    for extra, bad in (
        (["--output", str(tmp_path / "a_file" / "m.pt")], tmp_path / "a_file"),
        (["--output", str(tmp_path / "m.pt"), "--visualize", str(tmp_path / "a_file" / "w.png")], tmp_path / "a_file"),
    ):
        result = _run([*base, *extra])
        assert result.exit_code == 1
        assert result.stderr.strip().splitlines() == [f"Error: {bad}: a part of this path is a file, not a directory"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # no checkpoint: nothing was trained


def test_missing_dataset_is_a_one_line_error(tmp_path):
    result = _run(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--output", str(tmp_path / "m.pt")])
    assert result.exit_code != 0
    assert result.stderr.strip().splitlines() == [
        f"Error: cifar10 not found under {tmp_path / 'cifar-10-batches-py'}; pass --download (or --data-dir DIR)"
    ]
    assert not (tmp_path / "m.pt").exists()


def test_help_lists_the_flags():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for flag in (
        "--dataset",
        "--epochs",
        "--batch-size",
        "--lr",
        "--optimizer",
        "--seed",
        "--device",
        "--arch",
        "--output",
        "--resume",
        "--json",
        "--visualize",
        "--data-dir",
        "--download",
    ):
        assert flag in result.output


def test_lr_schedule_warms_up_then_decays():
    peak, total = 1e-3, 100
    lrs = [lr_at(s, total, peak, 0.1) for s in range(total)]
    assert lrs[0] < 0.1 * peak and max(lrs) == pytest.approx(peak) and lrs[-1] < 0.01 * peak
    assert np.argmax(lrs) == 10


def test_warp_grid_layout_and_validation(tmp_path):
    from stn_deploy.visualize import save_warp_grid, warp_figure

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)  # N×H×W (1-channel models)
    path = save_warp_grid(gray, gray[:, ::-1], tmp_path / "sub" / "g.png", columns=3, zoom=2)
    with Image.open(path) as im:
        # two panels of 3 columns × 2 rows of 56-pixel tiles, plus borders, gaps and titles
        assert im.mode == "RGB" and im.width >= 2 * 3 * 56 and im.height >= 2 * 56
    rgb = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    figure = warp_figure(rgb, rgb, columns=2, zoom=1)
    tile = np.asarray(figure)[22 + 2 : 22 + 2 + 32, 12 + 2 : 12 + 2 + 32]
    np.testing.assert_array_equal(tile, rgb[0])  # pixels are copied, not resampled
    with pytest.raises(ValueError, match="differ in shape"):
        warp_figure(rgb, rgb[:2])
    with pytest.raises(ValueError, match="uint8"):
        warp_figure(rgb.astype(np.float32), rgb)
    assert not list(tmp_path.glob("sub/.*.tmp"))


def test_the_training_loss_is_label_smoothed_nll_of_the_models_log_probs():
    """cross_entropy on log-probabilities = (1-ε)·NLL + ε·mean(−log p), values and gradients w.r.t.
    the logits (log_softmax is idempotent), so the library loss replaces the hand-written one exactly."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    for eps in (0.0, 0.1, 0.3):
        logits = (torch.randn(32, 10) * 8).requires_grad_()
        labels = torch.randint(0, 10, (32,))
        log_probs = F.log_softmax(logits, dim=1)
        by_hand = (1 - eps) * F.nll_loss(log_probs, labels) - eps * log_probs.mean(dim=1).mean()
        library = F.cross_entropy(log_probs, labels, label_smoothing=eps)
        assert abs(by_hand.item() - library.item()) < 1e-5
        g_hand = torch.autograd.grad(by_hand, logits, retain_graph=True)[0]
        g_lib = torch.autograd.grad(library, logits)[0]
        assert (g_hand - g_lib).abs().max().item() < 1e-6
