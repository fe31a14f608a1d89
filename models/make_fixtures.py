#!/usr/bin/env python3
"""Writes the committed pre-processing fixture, computed independently of scenecast with Pillow
and numpy: tests/fixtures/preprocess_input.png (a 320x240 crop of scikit-image's chelsea.png)
and tests/fixtures/preprocess_expected.f32 (its 1x3x224x224 NCHW tensor, little-endian f32):
Pillow BILINEAR resize to 224x224 in float ("F" mode, per channel: the exact filter, no 8-bit
rounding), /255, the manifest's mean/std (models/reference.toml, read by models/manifest.py).

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


if __name__ == "__main__":
    main()
