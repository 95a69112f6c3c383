"""Hardening (issue 12): every bad value from a file or a flag is one line with its exit code
(preprocessing, checkpoint configs, --resume state, metadata), JSON is strict JSON, CSV cells
never run in a spreadsheet, and errors quoting huge values are cut short.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from helpers import assert_cli_error
from stn_deploy.console import report_errors, to_json
from stn_deploy.errors import CheckpointError, ModelFileError, PreprocessingError, StnDeployError, shorten
from stn_deploy.export.cli import main as stn_export
from stn_deploy.export.triton_repo import write_triton_repo
from stn_deploy.infer.cli import main as stn_infer
from stn_deploy.infer.rows import Prediction, RowWriter
from stn_deploy.preprocessing import Preprocessing
from stn_deploy.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from stn_deploy.train.cli import main as stn_train
from stn_deploy.train.model import STNConfig, build_model
from stn_deploy.train.trainer import make_optimizer, read_resume_state
from test_outputs import _images, _infer

# -- preprocessing values ---------------------------------------------------------------------------
BAD_PREPROCESSING = {
    "std NaN": ({"std": [math.nan] * 3}, "std[0] must be finite"),
    "std 1e-300 (0 in float32)": ({"std": [1e-300] * 3}, "std[0] 1e-300 (0 in float32)"),
    "std infinite": ({"std": [math.inf] * 3}, "std[0] must be finite"),
    "std negative": ({"std": [-1.0] * 3}, "std[0] -1.0 is out of range"),
    "mean NaN": ({"mean": [0.5, math.nan, 0.5]}, "mean[1] must be finite"),
    "mean '123'": ({"mean": "123"}, "mean must be a list, got '123'"),
    "mean of strings": ({"mean": ["0.5", "0.5", "0.5"]}, "mean[0] must be a number"),
    "mean of bools": ({"mean": [True, False, True]}, "mean[0] must be a number"),
    "two means for RGB": ({"mean": [0.5, 0.5]}, "mean/std need 3 values for channel_order 'RGB', mean has 2"),
    "image_size a float": ({"image_size": [28.5, 28]}, "image_size[0] must be an integer"),
    "image_size huge": ({"image_size": [10**6, 10**6]}, "image_size[0] must be an integer >= 1 and <= 4096"),
    "image_size a string": ({"image_size": "28"}, "image_size must be two positive ints"),
    "channel_order unknown": ({"channel_order": "BGR"}, "channel_order must be one of L, RGB"),
    "resample not a string": ({"resample": 2}, "resample must be a string"),
}


@pytest.mark.parametrize("label", list(BAD_PREPROCESSING))
def test_bad_preprocessing_is_a_one_line_error_naming_the_field_wherever_it_is_read(label):
    change, message = BAD_PREPROCESSING[label]
    good = Preprocessing().to_dict()
    readers = {
        "constructor": lambda: Preprocessing(**{**good, **change}),
        "from_dict": lambda: Preprocessing.from_dict({**good, **change}),
        # json.dumps writes NaN/Infinity (Python's json reads them): the file an attacker writes
        "from_json": lambda: Preprocessing.from_json(json.dumps({**good, **change})),
    }
    for how, read in readers.items():
        with pytest.raises(PreprocessingError) as exc:
            read()
        assert isinstance(exc.value, StnDeployError) and isinstance(exc.value, ValueError)
        text = str(exc.value)
        assert message in text and "\n" not in text, (how, text)


def test_good_preprocessing_round_trips_and_is_written_as_strict_json():
    pre = Preprocessing(image_size=[28, 28], mean=[0.1307], std=[0.3081], channel_order="L")
    assert pre.image_size == (28, 28) and Preprocessing.from_json(pre.to_json()) == pre
    json.loads(pre.to_json(), parse_constant=_no_constants)


def _no_constants(name: str):
    raise AssertionError(f"bare {name} in JSON")


@pytest.fixture(scope="module")
def tiny_archive(tmp_path_factory) -> Path:
    from test_archive import TutorialSTN

    program = torch.export.export(
        TutorialSTN().eval(), (torch.randn(2, 1, 28, 28),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    path = tmp_path_factory.mktemp("pt2") / "tiny.pt2"
    torch.export.save(program, path)
    return path


def test_stn_export_refuses_non_finite_mean_and_std_flags(tiny_archive, tmp_path):
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(stn_export, [str(tiny_archive), "-o", str(out), "--mean", "nan", "--std", "nan"])
    assert result.exit_code == 2 and "expected finite numbers, got 'nan'" in result.output
    result = CliRunner().invoke(stn_export, [str(tiny_archive), "-o", str(out), "--std", "1e-300", "-q"])
    assert_cli_error(result, 1, "std[0] 1e-300 (0 in float32) is out of range")
    result = CliRunner().invoke(stn_export, [str(tiny_archive), "-o", str(out), "--std", "inf", "-q"])
    assert result.exit_code == 2 and "finite" in result.output
    assert not out.exists()


def _with_metadata(src: Path, dst: Path, **changes: str) -> Path:
    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    props.update(changes)
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(dst))
    return dst


def test_stn_infer_refuses_a_model_whose_metadata_std_is_nan_with_one_line(tmp_path, model_path):
    from stn_deploy import metadata as md

    good = {p.key: p.value for p in onnx.load(str(model_path)).metadata_props}[md.PREPROCESSING]
    images = _images(tmp_path / "images", 2)
    for bad, message in (
        (good.replace('"std": [0.25, 0.25, 0.25]', '"std": [NaN, NaN, NaN]'), "std[0] must be finite"),
        (good.replace('"std": [0.25, 0.25, 0.25]', '"std": [1e-300, 1, 1]'), "(0 in float32)"),
        (good.replace('"mean": [0.5, 0.5, 0.5]', '"mean": "123"'), "mean must be a list"),
    ):
        assert bad != good
        model = _with_metadata(model_path, tmp_path / "bad.onnx", **{md.PREPROCESSING: bad})
        result = _infer(images, "-m", model, "-o", tmp_path / "p.csv")
        assert_cli_error(result, 1, message)
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "p.csv").exists()


# -- strict JSON ------------------------------------------------------------------------------------
def test_to_json_writes_null_for_missing_and_non_finite_numbers():
    text = to_json({"nan": math.nan, "inf": [np.float32("inf"), -math.inf], "arr": np.array([1.0, np.nan]), "ok": 0.5})
    assert json.loads(text, parse_constant=_no_constants) == {
        "nan": None,
        "inf": [None, None],
        "arr": [1.0, None],
        "ok": 0.5,
    }


def test_jsonl_and_csv_rows_never_hold_nan(tmp_path):

    rows = [
        Prediction(
            path="a.png",
            label="x",
            index=0,
            confidence=math.nan,
            top_k=[("x", math.nan), ("y", math.inf)],
            theta=[math.nan, 1.0, 0.0, 0.0, 1.0, -math.inf],
            log_probs=[math.nan, -1.0],
        )
    ]
    stream = io.StringIO()
    RowWriter(stream, "jsonl", top_k=2, class_names=["x", "y"], theta=True, log_probs=True).write(rows)
    row = json.loads(stream.getvalue(), parse_constant=_no_constants)
    assert row["confidence"] is None and row["top_k"][0]["prob"] is None and row["theta"][0] is None
    assert row["theta"][5] is None and row["log_probs"] == [None, -1.0]
    stream = io.StringIO()
    RowWriter(stream, "csv", top_k=2, class_names=["x", "y"], theta=True, log_probs=True).write(rows)
    (header, line) = list(csv.reader(io.StringIO(stream.getvalue())))
    cells = dict(zip(header, line))
    assert (
        cells["confidence"] == "" and cells["top1_prob"] == "" and cells["theta_5"] == "" and cells["theta_1"] == "1.0"
    )
    assert "nan" not in stream.getvalue().lower() and "inf" not in stream.getvalue().lower()


def test_csv_cells_a_spreadsheet_would_run_get_an_apostrophe_and_numbers_never_do(tmp_path):
    from stn_deploy.cells import csv_text_value

    names = ["=cmd|' /C calc'!A0", "+1", "@SUM(A1)", "plain"]
    rows = [
        Prediction(path="-2+3.png", label=names[0], index=0, confidence=-0.5, top_k=[(names[1], 0.25)], error="\tTAB"),
        Prediction(path="'quoted.png", error='=HYPERLINK("x")'),
    ]
    stream = io.StringIO()
    RowWriter(stream, "csv", top_k=1, class_names=names, theta=False, log_probs=True).write(rows)
    header, first, second = list(csv.reader(io.StringIO(stream.getvalue())))
    cells = dict(zip(header, first))
    assert cells["path"] == "'-2+3.png" and cells["label"] == "'=cmd|' /C calc'!A0" and cells["top1_label"] == "'+1"
    assert cells["confidence"] == "-0.5" and cells["error"] == "'\tTAB"  # a negative number stays a number
    assert dict(zip(header, second))["path"] == "''quoted.png"
    assert csv_text_value(dict(zip(header, second))["path"]) == "'quoted.png"
    assert all(
        not cell.startswith(("=", "+", "-", "@"))
        for line in (first, second)
        for cell in line
        if cell and not _is_number(cell)
    )


def _is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def test_stn_infer_help_documents_the_csv_and_json_cell_policy():
    text = CliRunner().invoke(stn_infer, ["--help"]).output
    assert "apostrophe" in text and "null" in text


# -- checkpoint config values ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "image_size, message",
    [
        (math.inf, "image_size must be an integer, got inf"),
        (32.0, "image_size must be an integer, got 32.0"),
        (2000, "image_size must be an integer >= 1 and <= 1024, got 2000"),
        (10**6, "image_size must be an integer >= 1 and <= 1024, got 1000000"),
        (True, "image_size must be an integer, got True"),
    ],
)
def test_a_checkpoint_config_that_would_allocate_gigabytes_is_a_one_line_error(
    image_size, message, tmp_path, checkpoint_path
):
    payload = torch.load(checkpoint_path, weights_only=True)
    payload["config"]["image_size"] = image_size
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(bad)
    result = CliRunner().invoke(stn_export, [str(bad), "-o", str(tmp_path / "m.onnx"), "-q"])
    assert_cli_error(result, 1, message)
    assert time.perf_counter() - started < 30  # refused before anything is allocated


def test_a_config_within_the_size_bound_but_over_the_parameter_bound_is_refused(tmp_path, checkpoint_path):
    payload = torch.load(checkpoint_path, weights_only=True)
    payload["config"]["image_size"] = 512
    payload["preprocessing"]["image_size"] = [512, 512]
    torch.save(payload, tmp_path / "big.pt")
    with pytest.raises(CheckpointError, match="parameters .limit 268,435,456"):
        load_checkpoint(tmp_path / "big.pt")
    assert STNConfig(image_size=269).parameter_count() <= 1 << 28  # the largest the reference layers allow
    with pytest.raises(ValueError, match="parameters"):
        STNConfig(image_size=270)


def test_class_names_must_be_a_list_of_strings(tmp_path, checkpoint_path):
    payload = torch.load(checkpoint_path, weights_only=True)
    payload["class_names"] = "0123456789"  # ten characters: ten classes, silently
    torch.save(payload, tmp_path / "names.pt")
    with pytest.raises(CheckpointError, match="class_names must be a list"):
        load_checkpoint(tmp_path / "names.pt")


# -- --resume state ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resumable(tmp_path_factory) -> Path:
    """A checkpoint with the training state stn-train writes after one epoch (real optimizer state)."""
    config = STNConfig(in_channels=1, image_size=28, num_classes=3)
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = make_optimizer(model, "adam", 1e-3, 0.5)
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    optimizer.step()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt = Checkpoint(
        config=config,
        state_dict=weights,
        class_names=["a", "b", "c"],
        preprocessing=Preprocessing(image_size=(28, 28), mean=(0.5,), std=(0.5,), channel_order="L"),
        dataset="digits",
        train_state={
            "epoch": 1,
            "epochs": 3,
            "recipe": {
                "dataset": "digits",
                "arch": "stn",
                "batch_size": 32,
                "lr": 1e-3,
                "optimizer": "adam",
                "warmup": 0.05,
                "loc_lr_scale": 0.5,
                "clip_grad": 5.0,
                "label_smoothing": 0.1,
                "seed": 0,
            },
            "model_config": config.to_dict(),
            "optimizer": optimizer.state_dict(),
            "last_state_dict": weights,
            "best_state_dict": weights,
            "best_accuracy": 0.5,
            "best_epoch": 1,
            "seconds": 1.5,
            "history": [
                {"epoch": 1, "train_loss": 1.0, "test_loss": 1.1, "test_accuracy": 0.5, "lr": 1e-3, "seconds": 1.5}
            ],
        },
    )
    return save_checkpoint(ckpt, tmp_path_factory.mktemp("resume") / "run.pt")


def _shrink_adam_buffer(state: dict) -> None:
    first = next(iter(state["optimizer"]["state"].values()))
    first["exp_avg"] = first["exp_avg"].flatten()[:3].clone()


BAD_RESUME = {
    "batch size 0": (lambda s: s["recipe"].update(batch_size=0), "recipe batch_size must be an integer >= 1"),
    "non-numeric lr": (lambda s: s["recipe"].update(lr="fast"), "recipe lr must be a number, got 'fast'"),
    "NaN lr": (lambda s: s["recipe"].update(lr=math.nan), "recipe lr must be finite"),
    "unknown optimizer": (lambda s: s["recipe"].update(optimizer="lion"), "recipe optimizer must be one of adam, sgd"),
    "recipe not a mapping": (lambda s: s.update(recipe=["lr"]), "recipe must be a mapping"),
    "history not a list": (lambda s: s.update(history="1"), "history must be a list"),
    "history entry missing fields": (lambda s: s["history"][0].pop("lr"), "history[0] must have the fields"),
    "history of the wrong length": (
        lambda s: s.update(epoch=4, best_epoch=1),
        "history has 1 epochs, the state says 4",
    ),
    "history value not a number": (
        lambda s: s["history"][0].update(train_loss="low"),
        "history[0].train_loss must be a number",
    ),
    "epoch negative": (lambda s: s.update(epoch=-1), "epoch must be an integer >= 0"),
    "best_epoch after epoch": (lambda s: s.update(best_epoch=7), "best_epoch must be an integer >= 0 and <= 1"),
    "model config image_size inf": (
        lambda s: s["model_config"].update(image_size=math.inf),
        "image_size must be an integer",
    ),
    "weights of another model": (
        lambda s: s.update(last_state_dict={"x": torch.zeros(1)}),
        "last_state_dict does not fit",
    ),
    "optimizer of another model": (
        lambda s: s["optimizer"].update(param_groups=s["optimizer"]["param_groups"][:1]),
        "optimizer state does not fit the model",
    ),
    "optimizer buffer of another shape": (
        _shrink_adam_buffer,
        "optimizer exp_avg of shape [3] for a parameter of shape",
    ),
}


@pytest.mark.parametrize("label", list(BAD_RESUME))
def test_malformed_resume_state_is_a_one_line_checkpoint_error(label, resumable, tmp_path):
    edit, message = BAD_RESUME[label]
    payload = torch.load(resumable, weights_only=True)
    edit(payload["train_state"])
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    with pytest.raises(CheckpointError) as exc:
        read_resume_state(bad)
    text = str(exc.value)
    assert message in text and text.startswith(f"{bad}: cannot resume") and "\n" not in text, text


def test_stn_train_resume_of_a_malformed_state_exits_1_with_one_line(resumable, tmp_path):
    read_resume_state(resumable)  # the good one is fine
    payload = torch.load(resumable, weights_only=True)
    payload["train_state"]["recipe"]["batch_size"] = 0
    torch.save(payload, tmp_path / "bad.pt")
    result = CliRunner().invoke(stn_train, ["--resume", str(tmp_path / "bad.pt"), "--no-progress"])
    assert_cli_error(result, 1, "recipe batch_size must be an integer >= 1")
    assert len(result.stderr.strip().splitlines()) == 1


# -- unreadable models, huge values ---------------------------------------------------------------------
def test_an_unreadable_model_exits_1_as_the_readme_says(tmp_path):
    images = _images(tmp_path / "images", 1)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a model" * 10)
    directory = tmp_path / "dir.onnx"
    directory.mkdir()
    fifo = tmp_path / "fifo.onnx"
    os.mkfifo(fifo)
    for model in (garbage, directory, fifo, tmp_path / "missing.onnx", Path("/proc/self/mem")):
        result = _infer(images, "-m", model, "-o", tmp_path / "p.csv")
        assert result.exit_code == 1, (model, result.output)
        assert [line for line in result.stderr.splitlines() if line.startswith("Error:")] == [
            result.stderr.strip().splitlines()[-1]
        ], result.stderr
        assert str(model) in result.stderr


def test_a_file_onnx_runtime_cannot_load_gives_one_stderr_line_and_no_runtime_log(tmp_path):
    """ONNX Runtime logs from C++ straight to file descriptor 2, which CliRunner never sees: a
    session that failed to load with the placement profiler on used to add "[E:onnxruntime:, ...]
    Could not write a profile because no model was loaded" above our one-line error."""
    import subprocess
    import sys

    images = _images(tmp_path / "images", 1)
    model = tmp_path / "checkpoint.pt"
    model.write_bytes(b"PK\x03\x04 a zip, not a protobuf" * 8)
    proc = subprocess.run(
        [sys.executable, "-m", "stn_deploy.infer", str(images), "--model", str(model), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr  # exactly one line
    assert proc.stderr.startswith(f"Error: {model}: onnxruntime cannot load it (") and "onnxruntime:" not in proc.stderr


def test_a_fifo_given_as_checkpoint_archive_or_model_is_refused_at_once_not_waited_on(tmp_path):
    """Opening a FIFO for reading blocks until a writer comes: every reader checks the file first
    (fileio.input_file_problem)."""
    fifos = {}
    for name in ("model.pt", "model.pt2", "model.onnx"):
        fifos[name] = tmp_path / name
        os.mkfifo(fifos[name])
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(fifos["model.pt"])
    for source, extra in (
        (fifos["model.pt"], []),
        (fifos["model.pt2"], []),
        (fifos["model.onnx"], ["--precision", "fp16"]),
    ):
        result = CliRunner().invoke(stn_export, [str(source), "-o", str(tmp_path / "out.onnx"), *extra])
        assert_cli_error(result, 1, "not a regular file")
    resume = CliRunner().invoke(stn_train, ["--resume", str(fifos["model.pt"]), "--no-progress"])
    assert_cli_error(resume, 1, "not a regular file")
    with pytest.raises(ModelFileError, match="not a regular file"):
        write_triton_repo(fifos["model.onnx"], tmp_path / "models")


def test_errors_quoting_huge_values_are_cut_to_a_readable_length(tmp_path, checkpoint_path):
    with pytest.raises(PreprocessingError) as exc:
        Preprocessing(mean=["x" * 10**6] * 3)
    assert len(str(exc.value)) < 200 and str(exc.value).endswith("…")
    assert shorten(list(range(10**6))) == "list of 1000000 items"
    payload = torch.load(checkpoint_path, weights_only=True)
    payload["config"]["arch"] = "y" * 10**6
    torch.save(payload, tmp_path / "huge.pt")
    result = CliRunner().invoke(stn_export, [str(tmp_path / "huge.pt"), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and len(result.stderr) < 600 and "arch must be one of stn, cnn" in result.stderr

    @report_errors
    def command() -> None:
        raise StnDeployError("z" * 10**6)

    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
        command()
    assert len(err.getvalue()) < 1100 and err.getvalue().rstrip().endswith("…")
