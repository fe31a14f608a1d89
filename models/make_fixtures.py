#!/usr/bin/env python3
"""Writes the committed pre-processing fixture, computed independently of scenecast with Pillow
and numpy: tests/fixtures/preprocess_input.png (a 320x240 crop of scikit-image's chelsea.png)
and tests/fixtures/preprocess_expected.f32 (its 1x3x224x224 NCHW tensor, little-endian f32):
Pillow BILINEAR resize to 224x224 in float ("F" mode, per channel: the exact filter, no 8-bit
rounding), /255, the manifest's mean/std (models/reference.toml, read by models/manifest.py);
and tests/fixtures/projector-global.onnx, a projector with a global token (`[projector]
global_tokens = 1`) in the fused-detector layout of v7 (NanoDet's 80 COCO columns,
models/dinov2s-nanodet.toml's detector) whose weights make its output readable:
each cell's token carries GELU of the first 8 values of the cell's pooled features in dims 0..8,
the global token GELU of the first 8 values of the encoder's CLS token in dims 8..16, zeros
elsewhere, so a test can check what the runtime feeds it (tests/vision.rs).

Usage: python models/make_fixtures.py CACHE_DIR   (after `make models`)
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import manifest  # noqa: E402

FACTS = manifest.facts()
MEAN = np.array(FACTS.mean, dtype=np.float64)
STD = np.array(FACTS.std, dtype=np.float64)


def main() -> None:
    cache = Path(sys.argv[1])
    out = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
    out.mkdir(parents=True, exist_ok=True)
    photo = Image.open(cache / "models" / "photos" / "chelsea.png").convert("RGB")
    crop = photo.crop((60, 20, 380, 260))  # 320x240, the cat's face
    crop.save(out / "preprocess_input.png", optimize=True)
    pixels = np.asarray(crop, dtype=np.float32)
    resized = np.stack(
        [np.asarray(Image.fromarray(pixels[:, :, c], mode="F").resize(FACTS.size[::-1], Image.Resampling.BILINEAR)) for c in range(3)],
        axis=-1,
    ).astype(np.float64) / 255.0
    tensor = ((resized - MEAN) / STD).transpose(2, 0, 1)[None].astype("<f4")
    tensor.tofile(out / "preprocess_expected.f32")
    print(out / "preprocess_expected.f32", tensor.shape)
    write_global_projector(out / "projector-global.onnx")


def write_global_projector(dest: Path, probe: int = 8) -> None:
    """The readable global-token projector of the module docstring (hidden width `probe`)."""
    import train_projector as tp
    from make_projector import graph_from

    import tomllib

    # NanoDet alone (80 columns), as the fixture was made for v7; tests/vision.rs pairs it with that detector.
    det = manifest.facts(manifest.REFERENCE.parent / "dinov2s-nanodet.toml").detector
    spec = tomllib.loads(manifest.REFERENCE.read_text())["projector"]
    width, out_width, classes = spec["in_width"], spec["out_width"], len(det.classes)
    w1 = np.zeros((width + 2 * classes, probe), np.float32)  # the cell's features, its scores, its 3 x 3 maximum
    w1[:probe, :probe] = np.eye(probe)
    w2 = np.zeros((probe, out_width), np.float32)
    w2[:, :probe] = np.eye(probe)
    g1 = np.zeros((width + classes, probe), np.float32)  # CLS, the frame's maximum scores
    g1[:probe, :probe] = np.eye(probe)
    g2 = np.zeros((probe, out_width), np.float32)
    g2[:, probe:2 * probe] = np.eye(probe)
    zeros = lambda n: np.zeros(n, np.float32)  # noqa: E731
    detections = {"input": "detections", "cells": tp.cell_anchors(det, list(FACTS.pool)), "grid": list(FACTS.pool),
                  "shape": [tp.anchor_count(det), classes], "frame": False,
                  "global": {"tokens": 1, "w1": g1, "b1": zeros(probe), "w2": g2, "b2": zeros(out_width)}}
    model = graph_from(w1, zeros(probe), w2, zeros(out_width), "projector_global_fixture",
                       "scenecast/models/make_fixtures.py", detections)
    dest.write_bytes(model.SerializeToString())
    print(dest, dest.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
