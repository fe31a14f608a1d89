#!/usr/bin/env python3
"""What a caption check by the ImageNet classifier would give the shipped projector (no LLM run).

`grounded_filter.py`'s question with another judge: the published captions of a `scenecast eval`
run (the `.eval.json.gz` next to a report; the shipped v7's by default, already checked by its image
tokens) re-scored as if every named category that ImageNet covers (one or more of its classes under
the category, `classifier/imagenet-categories.toml`) were dropped when the classifier's best cell
gives it less than a threshold (a caption left with no name says "nothing known"). The classifier
reads each scene as the runtime would (the combined detector ONNX, `dinov2s-nanodet-imagenet.toml`,
on the 416 x 416 squashed frame). The threshold is calibrated on the rows of objects the projector
trained on (training photos, held-out pairs of training objects: the highest that keeps `--keep` of
their correct names) and applied unchanged to the held-out rows, which measure it.

    $(CACHE)/train-venv/bin/python models/experiments/imagenet_check.py \\
        --images $(CACHE)/train/<run>/eval   # the evaluation set's scenes (`make eval` writes them)
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import tomllib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from grounded_filter import CALIBRATE, print_rows  # noqa: E402

sys.path.insert(0, str(HERE))
from fetch import default_cache  # noqa: E402


def main() -> int:
    import onnxruntime as ort
    from PIL import Image

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=HERE / "projector" / "dinov2s-nanodet-smollm2-v7.eval.json.gz",
                    help="per-scene results of `scenecast eval --report` (.json or .json.gz)")
    ap.add_argument("--images", type=Path, required=True, help="the directory of the evaluation set's scenes (eval.json's)")
    ap.add_argument("--cache", type=Path, default=default_cache(), help="cache root (default: $SCENECAST_CACHE)")
    ap.add_argument("--keep", type=float, default=0.95, help="share of the calibration rows' correct names to keep")
    args = ap.parse_args()
    raw = args.results.read_bytes()
    doc = json.loads(gzip.decompress(raw) if args.results.suffix == ".gz" else raw)
    manifest = tomllib.loads((HERE / "dinov2s-nanodet-imagenet.toml").read_text())["detector"]
    columns = [c.removeprefix("imagenet ") for c in manifest["classes"] if c.startswith("imagenet ")]
    first = len(manifest["classes"]) - len(columns)
    cells = sum((manifest["preprocess"]["size"][0] // s) ** 2 for s in manifest["strides"][:-1])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(args.cache / "models" / manifest["file"]["cache"]), opts, providers=["CPUExecutionProvider"])
    mean, std = np.array(manifest["preprocess"]["mean"], np.float32), np.array(manifest["preprocess"]["std"], np.float32)
    side = manifest["preprocess"]["size"]

    def best_cells(path: Path) -> dict[str, float]:
        rgb = np.asarray(Image.open(path).convert("RGB").resize((side[1], side[0]), Image.BILINEAR), np.float32) / 255.0
        x = ((rgb[:, :, ::-1] - mean) / std).transpose(2, 0, 1)[None].copy()
        scores = sess.run(None, {manifest["input"]: x})[0][0, cells:, first:]
        return dict(zip(columns, scores.max(axis=0).tolist()))

    spec = tomllib.loads((HERE / "classifier" / "imagenet-categories.toml").read_text())
    # A category "covered" by ImageNet: one of its synsets holds an ImageNet class. Read off the
    # scores: a category ImageNet never covers scores exactly 0 in every cell of every scene.
    results = doc["scenes"]
    for r in results:
        image = Path(r["image"])
        r["imagenet"] = best_cells(image if image.is_file() else args.images / image.name)
    covered = {c for c in columns if any(r["imagenet"][c] > 0 for r in results)} - {spec.get("other")}
    right = sorted(r["imagenet"][n] for r in results if r["kind"] in CALIBRATE for n in r["named"] if n in r["objects"] and n in covered)
    threshold = right[int((1 - args.keep) * len(right))]
    print(f"{len(covered)} categories covered by ImageNet; threshold {threshold:.3f}: keeps {args.keep:.0%} of the "
          f"{len(right)} correct covered names on rows {', '.join(CALIBRATE)} (calibration, not a measurement)\n")
    print_rows(results, lambda r: [n for n in r["named"] if n not in covered or r["imagenet"][n] >= threshold], list(CALIBRATE),
               ("P / R published", "P / R after the ImageNet check", "named nothing published", "after"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
