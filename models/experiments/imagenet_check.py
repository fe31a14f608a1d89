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

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from grounded_filter import CALIBRATE, print_rows  # noqa: E402

sys.path.insert(0, str(HERE))
import imagenet_to_onnx as ito  # noqa: E402
import manifest  # noqa: E402
from fetch import default_cache  # noqa: E402
from PIL import Image  # noqa: E402
from train_projector import anchor_count, detector  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=HERE / "projector" / "dinov2s-nanodet-smollm2-v7.eval.json.gz",
                    help="per-scene results of `scenecast eval --report` (.json or .json.gz)")
    ap.add_argument("--images", type=Path, required=True, help="the directory of the evaluation set's scenes (eval.json's)")
    ap.add_argument("--cache", type=Path, default=default_cache(), help="cache root (default: $SCENECAST_CACHE)")
    ap.add_argument("--keep", type=float, default=0.95, help="share of the calibration rows' correct names to keep")
    args = ap.parse_args()
    raw = args.results.read_bytes()
    doc = json.loads(gzip.decompress(raw) if args.results.suffix == ".gz" else raw)
    models = args.cache / "models"
    det = manifest.facts(HERE / "dinov2s-nanodet-imagenet.toml").detector
    spec = tomllib.loads((HERE / "classifier" / "imagenet-categories.toml").read_text())
    names, matrix = ito.category_matrix(models / "classifier" / "wordnet", models / "classifier" / "imagenet1k_to_21k.json", spec)
    # The classifier's columns come last, its cells after the detector's anchors (the manifest's last stride).
    first, cells = len(det.classes) - len(names), anchor_count(det) - (det.size[0] // det.strides[-1]) ** 2
    scores = detector(args.cache, det, threads=2)
    covered = {n for n, col in zip(names, matrix.T) if col.any()} - {spec.get("other")}

    results = doc["scenes"]
    for r in results:
        image = Path(r["image"])
        best = scores(Image.open(image if image.is_file() else args.images / image.name))[0, cells:, first:].max(axis=0)
        r["imagenet"] = dict(zip(names, best.tolist()))
    right = sorted(r["imagenet"][n] for r in results if r["kind"] in CALIBRATE for n in r["named"] if n in r["objects"] and n in covered)
    threshold = right[int((1 - args.keep) * len(right))]
    print(f"{len(covered)} categories covered by ImageNet; threshold {threshold:.3f}: keeps {args.keep:.0%} of the "
          f"{len(right)} correct covered names on rows {', '.join(CALIBRATE)} (calibration, not a measurement)\n")
    print_rows(results, lambda r: [n for n in r["named"] if n not in covered or r["imagenet"][n] >= threshold], list(CALIBRATE),
               ("P / R published", "P / R after the ImageNet check", "named nothing published", "after"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
