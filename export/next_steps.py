"""What to run after ``stn-export``: the ``stn-infer`` line for the file it wrote and, for an fp32
CPU file, the ``--quantize int8`` line with the speed-up int8 brings on this machine.

The speed-up is measured, not quoted: the fp32 file and an int8 copy (the one this run wrote, or
a quick one quantized for the measurement only, calibrated on a few images, its accuracy not
judged) run the same batch in turns on the CPU provider, and the median times are compared.
"""

from __future__ import annotations

import shlex
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stn_deploy import metadata as md
from stn_deploy.errors import StnDeployError
from stn_deploy.runtime import Session
from stn_deploy.train.data import BUILTIN_DATASETS, load_image_samples

from .quantize import FAST_CPU, quantize_int8

PROBE_BATCH = 64  # a throughput-sized batch: where int8's gain shows
PROBE_RUNS = 7  # timed runs of each file, in turns; the median is reported
PROBE_CALIBRATION = 16  # images the measurement-only int8 copy is calibrated on
CPU_TARGETS = ("ort", "portable")


@dataclass(frozen=True)
class Int8Speedup:
    fp32_ms: float  # median time per batch
    int8_ms: float
    batch: int
    runs: int
    int8_file: str  # the int8 file measured ("a measurement-only copy" when none was written)

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.int8_ms if self.int8_ms > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": round(self.speedup, 3)}


def measure_int8_speedup(fp32: Path, int8: Path | None = None, *, dataset: str = "") -> Int8Speedup:
    """fp32 against int8, batch :data:`PROBE_BATCH`, on the CPU provider with ONNX Runtime's default threads."""
    with tempfile.TemporaryDirectory(prefix="stn-int8-probe-") as tmp:
        label = str(int8) if int8 is not None else "a measurement-only int8 copy"
        if int8 is None:
            int8 = Path(tmp) / "probe.int8.onnx"
            with Session(fp32, "cpu", warmup=0, record_placement=False, device_check=False) as session:
                calibration = _calibration_images(session.preprocessing, dataset)
            quantize_int8(fp32, int8, calibration, max_accuracy_drop=None, config=FAST_CPU)
        with (
            Session(fp32, "cpu", streams=1, warmup=1, warmup_batch=PROBE_BATCH, record_placement=False) as a,
            Session(int8, "cpu", streams=1, warmup=1, warmup_batch=PROBE_BATCH, record_placement=False) as b,
        ):
            x = np.random.default_rng(0).standard_normal((PROBE_BATCH, *a.preprocessing.input_shape), dtype=np.float32)
            times: dict[str, list[float]] = {"fp32": [], "int8": []}
            for _ in range(PROBE_RUNS):  # in turns, so a burst of load elsewhere hits both alike
                for name, session in (("fp32", a), ("int8", b)):
                    start = time.perf_counter()
                    session.run(x, [md.LOG_PROBS])
                    times[name].append((time.perf_counter() - start) * 1000)
    return Int8Speedup(float(np.median(times["fp32"])), float(np.median(times["int8"])), PROBE_BATCH, PROBE_RUNS, label)


def _calibration_images(preprocessing, dataset: str) -> np.ndarray:
    """A few images of the model's built-in dataset when it is on this machine, else noise (the
    measurement only needs the int8 graph, not its accuracy)."""
    if dataset in BUILTIN_DATASETS:
        try:
            return load_image_samples(dataset, preprocessing, n=PROBE_CALIBRATION, split="train").images
        except StnDeployError:
            pass
    shape = (PROBE_CALIBRATION, *preprocessing.input_shape)
    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)


def next_steps(
    output: Path, *, target: str, dataset: str, int8_written: Path | None = None, measure: bool = True
) -> dict[str, Any]:
    """The commands to run next, as strings, with the measured int8 speed-up where it applies."""
    model = shlex.quote(str(output))
    steps: dict[str, Any] = {}
    if target in CPU_TARGETS:
        steps["infer"] = f"stn-infer IMAGES_DIR --model {model} --output predictions.csv"
        calibration = dataset if dataset in BUILTIN_DATASETS else "CALIBRATION_IMAGES_DIR"
        if int8_written is not None:
            steps["infer_int8"] = (
                f"stn-infer IMAGES_DIR --model {shlex.quote(str(int8_written))} --output predictions.csv"
            )
        else:
            steps["quantize"] = f"stn-export {model} --quantize int8 --calibration {calibration}"
        if measure:
            try:
                steps["int8_speedup"] = measure_int8_speedup(output, int8_written, dataset=dataset).to_dict()
            except StnDeployError as exc:
                steps["int8_speedup"] = {"error": str(exc)}
    else:
        steps["infer"] = f"stn-infer IMAGES_DIR --model {model} --provider cuda --output predictions.csv"
        steps["fp16"] = f"stn-export {model} --precision fp16"
    return steps


def format_next_steps(steps: dict[str, Any]) -> str:
    lines = ["Next:", f"  {steps['infer']}"]
    speed = steps.get("int8_speedup", {})
    if "speedup" in speed:
        measured = (
            f"int8 ran {speed['speedup']:.2f}x as fast as fp32 here "
            f"({speed['int8_ms']:.2f} vs {speed['fp32_ms']:.2f} ms per batch of {speed['batch']}, "
            f"median of {speed['runs']}, CPU provider)"
        )
    else:
        measured = f"int8 speed-up not measured ({speed['error']})" if "error" in speed else ""
    if "infer_int8" in steps:
        lines.append(f"  {steps['infer_int8']}" + (f"   # {measured}" if measured else ""))
    if "quantize" in steps:
        lines.append(f"  {steps['quantize']}" + (f"   # {measured}" if measured else ""))
    if "fp16" in steps:
        lines.append(f"  {steps['fp16']}   # half precision for the GPU (stn-bench --fp16-model measures it)")
    return "\n".join(lines)
