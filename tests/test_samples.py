"""python -m stn_deploy.train.samples: dataset images written as files decode back to the same inputs."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner
from PIL import Image

from stn_deploy.train.data import load_dataset
from stn_deploy.train.samples import main as samples_cli


def test_written_samples_decode_to_the_dataset_tensors(tmp_path):
    result = CliRunner().invoke(samples_cli, [str(tmp_path), "--count", "12", "--no-progress"])
    assert result.exit_code == 0, result.output
    files = sorted(tmp_path.rglob("*.png"))
    assert len(files) == 12
    test = load_dataset("digits", "test")
    pre = test.preprocessing
    # One 8-bit rounding step at most: half a grey level, in normalized units.
    tolerance = 0.5 / 255 / min(pre.std) + 1e-6
    for path in files:
        index = int(path.stem.split("_")[1])
        image, label = test.dataset[index]
        assert path.parent.name == test.class_names[label]
        with Image.open(path) as im:
            decoded = pre(im)
        assert decoded.shape == tuple(image.shape)
        assert np.abs(decoded - image.numpy()).max() <= tolerance


def test_unknown_dataset_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(samples_cli, [str(tmp_path), "--dataset", "nope", "--no-progress"])
    assert result.exit_code == 1
    assert result.output.strip().startswith("Error: unknown dataset 'nope'")
    assert isinstance(result.exception, SystemExit), repr(result.exception)
