#!/usr/bin/env python3
"""What the round trip's judge manages on real pictures: the shipped captioner on scenes composed
from the generator's training photos (one per category; the held-out category pairs, both orders),
downscaled to 64, 128 and 224 pixels, through `scenecast eval`. A generator cannot score above these
rows (models/generator/README.md, "Why it ignores its prompt"). About 4 min on 2 cores.

    $(CACHE)/train-venv/bin/python models/experiments/judge_ceiling.py --scenecast target/release/scenecast
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
import train_generator as tg  # noqa: E402
from fetch import default_cache  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=HERE / "generator" / "train.toml")
    ap.add_argument("--cache", type=Path, default=default_cache())
    ap.add_argument("--scenecast", type=Path, required=True, help="the scenecast binary")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224])
    args = ap.parse_args()
    cfg, scenes = tg.load_config(args.config)
    categories = [c["name"] for c in scenes["category"]]
    comp = tg.Composer(cfg, scenes, args.cache / "models" / "photos", np.random.default_rng(cfg["seed"] + 9))
    n_pairs = 2 * len(scenes["sets"]["heldout_pairs"])
    items = [comp.single() for _ in categories] + [comp.pair(comp.heldout_pairs, "heldout") for _ in range(n_pairs)]
    out = Path(tempfile.mkdtemp(prefix="judge-ceiling-"))
    rows = []
    for i, (img, meta) in enumerate(items):
        kind = "single" if i < len(categories) else "pair"
        for size in args.sizes:
            path = out / f"{kind}-{size}-{i:03}.png"
            img.resize((size, size), Image.LANCZOS).save(path)
            rows.append({"image": str(path), "kind": f"composed-{kind}-{size}px",
                         "objects": [o["name"] for o in meta["objects"]], "questions": []})
    doc = {"name": "judge-ceiling", "categories": categories,
           "caption_prompt": scenes["questions"]["caption_prompts"][0], "scenes": rows}
    (out / "eval.json").write_text(json.dumps(doc))
    report = out / "report.md"
    subprocess.run([str(args.scenecast), "eval", str(out / "eval.json"), "--report", str(report)], check=True,
                   stdout=subprocess.DEVNULL)
    print("\n".join(report.read_text().splitlines()[:3 + 2 + 2 * len(args.sizes) + 1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
