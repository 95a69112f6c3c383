"""The accuracy rule for reduced-scale JPEG decoding (issue 13): same answers as the full decode?

The digits test split (1,456 images, 32×32) is scaled up to 4× and 16× the model's size
(128×128 and 512×512, bicubic; other sizes, square or ``WxH``, with ``--sizes``) and written as
JPEG (quality 90), one folder per class. Each set
is classified twice by the same ONNX model, once with ``--decode exact`` (full decode, then the
model's resize: what training does) and once with ``--decode fast`` (the JPEG decoded at 1/2,
1/4 or 1/8 scale in the DCT domain, no smaller than ``gap`` × the model's size, then the same
resize). The rule: top-1 agreement with exact ≥ 99.5% and accuracy within 0.2 points. A fast
path that fails it is not the default for that input (stn_deploy.decoders.AUTO_MODES).

Each gap in ``--gaps`` is measured (the reduced image at least gap × the model's size in both
directions; the default, ``stn_deploy.decoders.JPEG_DRAFT_GAP``, is the smallest at which every
measured size met the rule), on the fp32 and the int8 file.

Run:  .venv/bin/python benchmarks/decode_accuracy.py --model build/stn_digits.onnx \
          --int8-model build/stn_digits.int8.onnx
(the models: stn-train --dataset digits, then stn-export --optimize --quantize int8 --calibration digits)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from stn_deploy.decode_pool import DecodePool
from stn_deploy.decoders import JPEG_DRAFT_GAP, DecodeSpec
from stn_deploy.fileio import atomic_write_text
from stn_deploy.images import find_images
from stn_deploy.runtime import Session

REPO = Path(__file__).resolve().parents[1]
MIN_AGREEMENT = 0.995
MAX_ACCURACY_DELTA = 0.2  # points


def write_digits_jpegs(directory: Path, size: tuple[int, int], quality: int = 90) -> tuple[list[Path], list[int]]:
    """The digits test split at ``size`` = (width, height) as JPEG files under ``directory/<label>/``."""
    from stn_deploy.train.data import load_dataset  # torch: only to render the split

    loaded = load_dataset("digits", "test")
    pre = loaded.preprocessing
    labels = []
    for i in range(len(loaded)):
        image, label = loaded.dataset[i]
        pixels = pre.denormalize(image.numpy())
        path = directory / str(int(label)) / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).resize(size, Image.Resampling.BICUBIC).save(path, quality=quality)
        labels.append(int(label))
    files = find_images(directory).files
    by_path = {p.relative_to(directory).as_posix(): int(p.parent.name) for p in files}
    return files, [by_path[p.relative_to(directory).as_posix()] for p in files]


def predictions(session: Session, files: list[Path], spec: DecodeSpec) -> tuple[np.ndarray, dict[str, int]]:
    tops, decoders = [], {}
    with DecodePool(spec, batch_size=256, workers=2, pool="thread") as pool:
        for batch in pool.batches(files):
            assert all(r.ok for r in batch.results)
            for r in batch.results:
                decoders[r.decoder] = decoders.get(r.decoder, 0) + 1
            tops.append(session.run(batch.inputs, ["log_probs"])["log_probs"].argmax(1))
    return np.concatenate(tops), decoders


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", type=Path, required=True, help="fp32 digits model (stn-export of stn-train --dataset digits)"
    )
    ap.add_argument("--int8-model", type=Path, default=None)
    ap.add_argument(
        "--sizes", default="128,512", help="image sizes to write, N or WxH (default: 4x and 16x a 32x32 model)"
    )
    ap.add_argument("--gaps", default="2,3,4,5", help="reduced decode no smaller than gap x the model's size")
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--json-out", type=Path, default=REPO / "benchmarks" / "results" / "decode_accuracy.json")
    args = ap.parse_args()

    models = {"fp32": args.model, **({"int8": args.int8_model} if args.int8_model else {})}
    rows = []
    with tempfile.TemporaryDirectory(prefix="stn-decode-acc-") as tmp:
        for text in args.sizes.split(","):
            width, _, height = text.partition("x")
            size = (int(width), int(height or width))
            files, labels = write_digits_jpegs(Path(tmp) / f"s{text}", size, args.quality)
            truth = np.array(labels)
            for precision, model in models.items():
                session = Session(model, "cpu", threads=2, warmup=0, record_placement=False)
                exact, exact_dec = predictions(session, files, DecodeSpec(session.preprocessing, mode="exact"))
                for gap in map(float, args.gaps.split(",")):
                    fast, fast_dec = predictions(
                        session, files, DecodeSpec(session.preprocessing, mode="fast", jpeg_gap=gap)
                    )
                    acc_exact, acc_fast = float(100 * (exact == truth).mean()), float(100 * (fast == truth).mean())
                    agreement = float((fast == exact).mean())
                    row = {
                        "size": size[0] if size[0] == size[1] else f"{size[0]}x{size[1]}",
                        "scale_vs_model": min(s // m for s, m in zip(size[::-1], session.preprocessing.image_size)),
                        "model": precision,
                        "gap": int(gap) if gap.is_integer() else gap,
                        "images": len(files),
                        "accuracy_exact": round(acc_exact, 2),
                        "accuracy_fast": round(acc_fast, 2),
                        "accuracy_delta_points": round(acc_fast - acc_exact, 2),
                        "top1_agreement": round(100 * agreement, 2),
                        "disagreements": int((fast != exact).sum()),
                        "meets_rule": bool(
                            agreement >= MIN_AGREEMENT and abs(acc_fast - acc_exact) <= MAX_ACCURACY_DELTA
                        ),
                        "decoders_fast": fast_dec,
                        "decoders_exact": exact_dec,
                    }
                    rows.append(row)
                    print(
                        f"{text:>7s}px {precision} gap {gap:g}: exact {acc_exact:.2f}%  fast {acc_fast:.2f}%  "
                        f"agreement {100 * agreement:.2f}% ({row['disagreements']} differ)  rule "
                        f"{'met' if row['meets_rule'] else 'FAILED'}  "
                        f"{fast_dec}",
                        file=sys.stderr,
                    )
    result = {
        "benchmark": "reduced-scale JPEG decode vs full decode on the digits test split (issue 13's accuracy rule)",
        "rule": {"min_top1_agreement": MIN_AGREEMENT, "max_accuracy_delta_points": MAX_ACCURACY_DELTA},
        "jpeg_quality": args.quality,
        "upscale": "bicubic from the 32x32 test images",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "rows": rows,
        "command": " ".join(["benchmarks/decode_accuracy.py", *sys.argv[1:]]),
        "default_gap": JPEG_DRAFT_GAP,
        "default_gap_meets_rule_everywhere": all(r["meets_rule"] for r in rows if r["gap"] == JPEG_DRAFT_GAP),
    }
    atomic_write_text(args.json_out, json.dumps(result, indent=2) + "\n")
    print(f"-> {args.json_out}", file=sys.stderr)


if __name__ == "__main__":
    main()
