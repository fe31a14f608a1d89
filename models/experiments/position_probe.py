#!/usr/bin/env python3
"""Where the detector places the object of a position question, against the image tokens' guide.

For every "Where is the X?" of an evaluation set, runs the reference's detector ONNX (NanoDet with
the ImageNet classifier's 8 x 8 cells, `[detector]` of models/reference.toml) on the scene and
takes three places for X: the best cell of the classifier's column "imagenet X", the best anchor of
NanoDet's own COCO class "X" (when X is one), and, from a `scenecast eval` report of the same set,
whether the published answer (the image tokens' guide) was right. Prints the accuracy per row of
the published answers, and of the answers with each of the detector's places substituted where it
has one. The frame is squashed to the detector's size with Pillow (scenecast's own resize differs
by less than a level).

    python models/experiments/position_probe.py --cache ~/.cache/scenecast \\
        --set ~/.cache/scenecast/train/dinov2s-nanodet-imagenet-smollm2-v15/eval/eval.json \\
        --report models/projector/dinov2s-nanodet-imagenet-smollm2-v15-scene-model.eval.json.gz

(train venv: onnxruntime, Pillow, numpy; 40 s for the 404 questions of v15's set.)
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

REFERENCE = Path(__file__).resolve().parent.parent / "reference.toml"


def side(x: float, band: tuple[float, float]) -> str:
    return "left" if x < band[0] else ("right" if x > band[1] else "centre")


class Detector:
    """The reference's detector ONNX (`[detector]` of reference.toml) on whole frames: `scores(path)`
    is its `[anchors, classes]` output for the image at `path`, squashed to its input with Pillow;
    `x` the horizontal centre of each anchor (a fraction of the width), `n_nanodet` how many of the
    anchors are NanoDet's (the classifier's cells follow)."""

    def __init__(self, cache: Path):
        self.spec = det = tomllib.loads(REFERENCE.read_text())["detector"]
        self.classes = det["classes"]
        self.height, self.width = det["preprocess"]["size"]
        self.mean = np.array(det["preprocess"]["mean"], np.float32)
        self.std = np.array(det["preprocess"]["std"], np.float32)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(cache / "models" / det["file"]["cache"]), options,
                                            providers=["CPUExecutionProvider"])
        h, w = self.height, self.width
        self.x = np.array([(c + 0.5) * s / w for s in det["strides"] for _ in range(h // s) for c in range(w // s)])
        self.n_nanodet = sum((h // s) * (w // s) for s in det["strides"][:-1])

    def scores(self, path: Path) -> np.ndarray:
        image = Image.open(path).convert("RGB").resize((self.width, self.height), Image.BILINEAR)
        a = np.asarray(image, np.float32) / 255.0
        if self.spec["preprocess"].get("channels", "rgb") == "bgr":
            a = a[:, :, ::-1]
        tensor = ((a - self.mean) / self.std).transpose(2, 0, 1)[None].astype(np.float32)
        return self.session.run(None, {self.spec["input"]: tensor})[0][0]


def probe_args(doc: str) -> argparse.Namespace:
    """The probes' command line: the model cache, an evaluation set and a report of it."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--set", type=Path, required=True, help="the evaluation set's eval.json")
    ap.add_argument("--report", type=Path, required=True, help="`scenecast eval`'s .eval.json(.gz) of that set")
    return ap.parse_args()


def published(report: Path) -> dict[str, dict]:
    """A `scenecast eval` report's per-scene records, by image file name."""
    opener = gzip.open if report.suffix == ".gz" else open
    with opener(report, "rt") as f:
        return {Path(s["image"]).name: s for s in json.load(f)["scenes"]}


def main() -> int:
    args = probe_args(__doc__)
    band = tuple(tomllib.loads(REFERENCE.read_text())["grounding"].get("centre", [0.375, 0.625]))
    detector = Detector(args.cache)
    classes, xs, n_nanodet = detector.classes, detector.x, detector.n_nanodet
    records = published(args.report)
    scenes = json.loads(args.set.read_text())["scenes"]
    rows: list[dict] = []
    for scene in scenes:
        questions = [q for q in scene["questions"] if q["kind"] == "position"]
        if not questions:
            continue
        scores = detector.scores(args.set.parent / scene["image"])
        answers = {q: right for q, _, right in records[scene["image"]]["answers"]}
        for q in questions:
            name = re.match(r"Where (?:is|are) the (.+)\?", q["question"]).group(1)
            row = {"kind": scene["kind"], "expect": q["expect"], "published": answers[q["question"]]}
            if f"imagenet {name}" in classes:
                cells = scores[n_nanodet:, classes.index(f"imagenet {name}")]
                if cells.max() > 0:
                    row["classifier"] = side(xs[n_nanodet + int(cells.argmax())], band)
            if name in classes[:80]:
                row["coco"] = side(xs[int(scores[:n_nanodet, classes.index(name)].argmax())], band)
            rows.append(row)
    kinds = sorted({r["kind"] for r in rows}) + ["all"]
    print(f"{'answers':<40}" + "".join(f"{k:>24}" for k in kinds))
    for label, place in [("published (the image tokens' guide)", None), ("classifier's best cell where it has one", "classifier"),
                         ("NanoDet's COCO class where it has one", "coco")]:
        cells = []
        for k in kinds:
            rr = [r for r in rows if k == "all" or r["kind"] == k]
            right = sum((r[place] == r["expect"]) if place and place in r else r["published"] for r in rr)
            cells.append(f"{right}/{len(rr)} ({100 * right / len(rr):.1f} %)")
        print(f"{label:<40}" + "".join(f"{c:>24}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
