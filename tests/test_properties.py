"""Property-based tests (hypothesis): every reader of values that come from a file, and the row
writer, either works or raises the project's one-line error type (a StnDeployError), never
another exception; what they accept is usable (finite preprocessing), and rows round-trip
through Python's csv and json modules.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from helpers import make_checkpoint
from stn_deploy import cells
from stn_deploy import metadata as md
from stn_deploy.errors import CheckpointError, StnDeployError
from stn_deploy.infer.rows import Prediction, RowWriter
from stn_deploy.preprocessing import Preprocessing
from stn_deploy.train import trainer
from stn_deploy.train.checkpoint import load_checkpoint
from stn_deploy.train.model import MAX_PARAMETERS
from test_values import resumable  # noqa: F401 - the fixture: a real one-epoch training state

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON-like values as files hold them: NaN and ±Infinity included (Python's json reads them),
# huge integers, bools (which are ints to Python), strings of digits.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-5, 5000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e-300, 1e-45, 1e300, -0.0, 0.5, 0.25, 28, 32, "123", "RGB", "L", "bilinear", "nan", ""]),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10,
)
GOOD_PRE = Preprocessing().to_dict()
GOOD_GRAY = Preprocessing(image_size=(28, 28), mean=(0.1307,), std=(0.3081,), channel_order="L").to_dict()


@st.composite
def preprocessing_dicts(draw) -> dict:
    """Mostly-valid dicts with a few fields replaced, so the checks past the first are reached too."""
    base = dict(draw(st.sampled_from([GOOD_PRE, GOOD_GRAY])))
    if draw(st.integers(0, 3)) == 0:
        return base
    plausible = st.one_of(st.floats(-3, 3), st.floats(1e-7, 10), scalars)
    for key in draw(st.lists(st.sampled_from([*base, "extra"]), max_size=2, unique=True)):
        kind = draw(st.integers(0, 2))
        if kind < 2 and key in ("mean", "std", "image_size"):
            n = len(base[key])
            items = st.integers(-2, 5000) if key == "image_size" else plausible
            base[key] = draw(st.lists(items if kind == 0 else scalars, min_size=n, max_size=n))  # right length
        else:
            base[key] = draw(values)
    if draw(st.integers(0, 5)) == 0:
        base.pop(draw(st.sampled_from(sorted(base))))
    return base


def _usable(pre: Preprocessing) -> None:
    """Accepted preprocessing turns every pixel value into a finite model input."""
    pixels = np.stack(
        [
            np.zeros((*pre.image_size[:1], 1, pre.channels), np.uint8),
            np.full((*pre.image_size[:1], 1, pre.channels), 255, np.uint8),
        ]
    )
    assert np.isfinite(pre.normalize(pixels)).all(), pre
    assert all(math.isfinite(v) and v > 0 for v in pre.std) and all(math.isfinite(v) for v in pre.mean)


@SETTINGS
@given(st.one_of(preprocessing_dicts(), values))
def test_preprocessing_from_dict_and_json_work_or_raise_a_one_line_error(d):
    for read in (lambda: Preprocessing.from_dict(d), lambda: Preprocessing.from_json(json.dumps(d))):
        try:
            pre = read()
        except StnDeployError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 400
        else:
            _usable(pre)
            assert Preprocessing.from_json(pre.to_json()) == pre


@SETTINGS
@given(st.dictionaries(st.sampled_from(["image_size", "mean", "std", "channel_order", "resample"]), values, max_size=5))
def test_the_preprocessing_constructor_works_or_raises_a_one_line_error(kwargs):
    try:
        pre = Preprocessing(**kwargs)
    except StnDeployError as exc:
        assert "\n" not in str(exc)
    else:
        _usable(pre)


@SETTINGS
@given(st.text(max_size=60) | st.binary(max_size=60))
def test_preprocessing_from_any_text_works_or_raises_a_one_line_error(text):
    try:
        _usable(Preprocessing.from_json(text))
    except StnDeployError as exc:
        assert "\n" not in str(exc)


@st.composite
def metadata_props(draw) -> object:
    if draw(st.integers(0, 9)) == 0:
        return draw(values)  # not even a dict
    props: dict = {}
    if draw(st.integers(0, 3)) == 0:  # a good file, with extra keys
        return {
            md.PREPROCESSING: json.dumps(draw(st.sampled_from([GOOD_PRE, GOOD_GRAY]))),
            md.CLASS_NAMES: json.dumps(draw(st.lists(st.text(max_size=10), max_size=5))),
            **draw(st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3)),
        }
    if draw(st.integers(0, 5)):
        pre = draw(st.one_of(preprocessing_dicts(), values))
        props[md.PREPROCESSING] = draw(st.sampled_from(["json", "raw"])) == "json" and json.dumps(pre) or pre
    if draw(st.integers(0, 5)):
        names = draw(st.one_of(st.lists(st.text(max_size=10), max_size=5), values))
        props[md.CLASS_NAMES] = json.dumps(names) if draw(st.booleans()) else names
    props.update(draw(st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3)))
    return props


@SETTINGS
@given(metadata_props())
def test_model_metadata_from_any_props_works_or_raises_a_one_line_error(props):
    try:
        meta = md.ModelMetadata.from_props(props, source="model.onnx")
    except StnDeployError as exc:
        assert isinstance(exc, ValueError)  # MetadataError is both, for the callers that catch ValueError
        assert "\n" not in str(exc) and len(str(exc)) < 600
    else:
        _usable(meta.preprocessing)
        assert all(isinstance(n, str) for n in meta.class_names)


# -- checkpoint fields, through real files ---------------------------------------------------------
@pytest.fixture(scope="module")
def good_payload(tmp_path_factory) -> dict:
    path = make_checkpoint(tmp_path_factory.mktemp("prop") / "good.pt")
    return torch.load(path, weights_only=True)


@st.composite
def config_dicts(draw, good: dict) -> object:
    config = dict(good)
    if draw(st.integers(0, 3)) == 0:
        return config
    for key in draw(st.lists(st.sampled_from([*config, "extra"]), max_size=3, unique=True)):
        config[key] = draw(st.one_of(values, st.integers(0, 5000), st.lists(st.integers(0, 300), max_size=3)))
    return config if draw(st.integers(0, 9)) else draw(values)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_a_checkpoint_with_any_field_values_loads_or_is_a_one_line_checkpoint_error(good_payload, data):
    payload = dict(good_payload)
    payload["config"] = data.draw(config_dicts(good_payload["config"]))
    if data.draw(st.booleans()):
        payload["preprocessing"] = data.draw(st.one_of(preprocessing_dicts(), values))
    for key in data.draw(
        st.lists(
            st.sampled_from(["class_names", "metrics", "versions", "train_state", "dataset", "format_version"]),
            max_size=2,
            unique=True,
        )
    ):
        payload[key] = data.draw(values)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt.pt"
        torch.save(payload, path)
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 600
            event("refused")
        else:
            event("loaded")
            assert ckpt.config.parameter_count() <= MAX_PARAMETERS
            assert len(ckpt.class_names) == ckpt.config.num_classes and all(
                isinstance(n, str) for n in ckpt.class_names
            )
            _usable(ckpt.preprocessing)


# -- the row writer -------------------------------------------------------------------------------------
floats = st.floats(allow_nan=True, allow_infinity=True) | st.none()
# Paths as a file system hands them over: any text, and bytes that are not UTF-8 (os.fsdecode
# carries them as lone surrogates).
paths = st.one_of(
    st.text(),
    st.binary(min_size=1, max_size=40).map(os.fsdecode),
    st.sampled_from(["=1+1.png", "-x.png", "@a", "\tt", "\rr", "'q", 'a,"b"\n.png', "ü/ß.jpg", "a\x00b"]),
)
labels = st.text(max_size=12) | st.sampled_from(["=SUM(A1)", "+1", "-", "@", "'"])


@st.composite
def predictions(draw, k: int, n_classes: int) -> Prediction:
    if draw(st.booleans()):
        return Prediction(path=draw(paths), error=draw(st.text(min_size=1) | paths))
    top = [(draw(labels), draw(floats)) for _ in range(draw(st.integers(0, k)))]
    return Prediction(
        path=draw(paths),
        label=draw(labels),
        index=draw(st.integers(-5, 10**6) | st.none()),
        confidence=draw(floats),
        top_k=top,
        theta=draw(st.lists(floats, min_size=6, max_size=6) | st.none()),
        log_probs=draw(st.lists(floats, min_size=n_classes, max_size=n_classes) | st.none()),
    )


def _same_number(cell: str, value) -> bool:
    n = cells.number(value)
    return cell == "" if n is None else float(cell) == n


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_rows_round_trip_through_csv_and_json_and_no_cell_is_a_formula(data):
    class_names = data.draw(st.lists(labels, min_size=1, max_size=4))
    k = data.draw(st.integers(1, 3))
    rows = data.draw(st.lists(predictions(min(k, len(class_names)), len(class_names)), max_size=5))
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("csv", "jsonl"):
            path = Path(tmp) / f"rows.{fmt}"
            with open(path, "w", encoding="utf-8", newline="") as stream:  # as stn-infer opens its output
                writer = RowWriter(stream, fmt, top_k=k, class_names=class_names, theta=True, log_probs=True)
                writer.write(rows)
            if fmt == "csv":
                with open(path, encoding="utf-8", newline="") as f:
                    header, *lines = list(csv.reader(f))
                assert [cells.csv_text_value(h) for h in header] == [cells.text(c) for c in writer.columns()]
                assert len(lines) == len(rows)
                for row, line in zip(rows, lines):
                    assert len(line) == len(header)
                    got = dict(zip(writer.columns(), line))
                    assert cells.csv_text_value(got["path"]) == cells.text(row.path)
                    assert _same_number(got["confidence"], row.confidence) and _same_number(got["index"], row.index)
                    if row.theta is not None:
                        assert all(_same_number(got[f"theta_{i}"], v) for i, v in enumerate(row.theta))
                    for cell in line:  # no text cell starts as a formula; numbers are numbers
                        assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")) or _is_number(cell), cell
            else:
                lines = path.read_text(encoding="utf-8").split("\n")
                assert lines[-1] == "" and len(lines) == len(rows) + 1
                for row, line in zip(rows, lines):
                    obj = json.loads(line, parse_constant=_refuse_constant)
                    assert obj["path"] == cells.text(row.path) and obj["error"] == (
                        None if row.error is None else cells.text(row.error)
                    )
                    assert obj["confidence"] == cells.number(row.confidence)
                    assert [t["prob"] for t in obj["top_k"]] == [cells.number(p) for _, p in row.top_k]


def _is_number(cell: str) -> bool:
    try:
        return math.isfinite(float(cell))
    except ValueError:
        return False


def _refuse_constant(name: str):
    raise AssertionError(f"bare {name} in a JSON line")


@SETTINGS
@given(st.text() | st.binary(max_size=30).map(os.fsdecode) | st.sampled_from(["\ud800", "a\udcffb", "\udfff"]))
def test_any_text_becomes_utf8_and_csv_escapes_undo(value):
    text = cells.text(value)
    text.encode("utf-8")  # never raises
    assert cells.csv_text_value(cells.csv_text(value)) == text
    if value.encode("utf-8", "surrogatepass") == text.encode("utf-8", "surrogatepass"):
        assert text == value  # valid text is left alone


# -- --resume state -------------------------------------------------------------------------------

RESUME_FIELDS = [*trainer.RESUME_FIELDS, "epochs"]  # every field of the state, the optional one too
RECIPE_FIELDS = list(trainer.TrainConfig.RECIPE)  # the fields a resumed run must keep


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_resume_state_is_usable_or_a_one_line_checkpoint_error(resumable, data):  # noqa: F811
    payload = torch.load(resumable, weights_only=True)
    state = payload["train_state"]
    mutate = data.draw(st.integers(0, 3)) > 0
    for key in data.draw(st.lists(st.sampled_from(RESUME_FIELDS), max_size=2 * mutate, unique=True)):
        state[key] = data.draw(values)
    for key in data.draw(st.lists(st.sampled_from(RECIPE_FIELDS), max_size=2, unique=True)):
        if isinstance(state.get("recipe"), dict):
            state["recipe"][key] = data.draw(st.one_of(values, st.floats(-1, 2), st.integers(-2, 64)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.pt"
        torch.save(payload, path)
        try:
            trainer.read_resume_state(path)
        except CheckpointError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 700
            event("refused")
        else:
            event("usable")
