#!/usr/bin/env python3
"""What the training data allows: a linear probe on the projector's own inputs, scored on the held-out rows.

A projector can only generalise as far as its training scenes let any reader of the same features
generalise. This tool trains the simplest such reader, a linear classifier per image-token cell (the
frozen encoder's pooled patch features, with the detector's scores fused in as the configuration's
projector reads them), on the grounding labels of the training
scenes: each cell's category, or background. No LLM. It then names, for every scene of the
evaluation set `make eval` scores, the categories some cell gives a probability above `--threshold`,
and prints object precision, recall and "named nothing" per row, like `scenecast eval`'s report.

Where the probe is no better than the captions, the projector and LLM read what the data holds and
more of them will not help: only more (or more varied) exemplars of a category will. Where the probe
is far better, the projector or the LLM loses what the features hold.

A sibling of grounding_probe.py (which trains the grounding stage on held-out cut-outs of v2's
set): this one scores every row of any configuration's evaluation set, CIFAR-10's and the unknown
objects' included, at the threshold a caption needs.

    make projector PROJECTOR_CONFIG=models/projector/train-v8.toml   # once: the cached features
    $(CACHE)/train-venv/bin/python models/experiments/linear_probe.py --config models/projector/train-v8.toml
    $(CACHE)/train-venv/bin/python models/experiments/linear_probe.py --inputs detector   # v7's: NanoDet's scores only
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
import train_projector as tp  # noqa: E402  (the same configuration, cache, encoder and labels)
from fetch import default_cache, log  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=HERE / "projector" / "train-v7.toml", help="training configuration")
    ap.add_argument("--cache", type=Path, default=default_cache(), help="cache root (default: $SCENECAST_CACHE)")
    ap.add_argument("--threshold", type=float, default=0.5, help="a category is named when a cell's probability exceeds this")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--inputs", choices=("both", "encoder", "detector"), default="both",
                    help="what each cell's classifier reads: the encoder's features and the detector's scores "
                         "(as the projector does), or one of the two alone")
    args = ap.parse_args()
    import torch

    cfg = tp.load_config(args.config)
    work = args.cache / "train" / cfg["name"]
    feats_path, meta_path = tp.data_paths(cfg, work, None)
    if not (feats_path.is_file() and meta_path.is_file()):
        raise SystemExit(f"error: no cached training features for {args.config.name} ({feats_path}); "
                         f"run `make projector PROJECTOR_CONFIG={args.config}` first (its step 2 writes them)")
    feats, dets, metas = tp.build_data(cfg, args.cache, work, None)
    cells = cfg.get("detector", {}).get("cells", False)
    if dets is not None and not cells:
        raise SystemExit(f"error: {args.config.name} reads the detector as strips ([detector] regions); the probe reads cells")
    grid = cfg["model"]["pool"]
    frame = cfg.get("detector", {}).get("frame", True)

    if args.inputs != "both" and dets is None:
        raise SystemExit(f"error: --inputs {args.inputs}: {args.config.name} has no detector")

    def cell_inputs(feats: np.ndarray, dets: np.ndarray | None) -> torch.Tensor:
        """What each cell of the projector reads (train_projector.fuse_detections), or the part of it
        `--inputs` names."""
        width = feats.shape[-1]
        feats = torch.from_numpy(feats)
        if dets is None:
            return feats
        fused = tp.fuse_detections(feats, torch.from_numpy(dets), grid, frame)
        return {"both": fused, "encoder": fused[..., :width], "detector": fused[..., width:]}[args.inputs]

    categories = [c["name"] for c in cfg["category"]]
    labels, _ = tp.cell_labels(metas, categories, grid)
    train = np.array([m["kind"] != "check" for m in metas])
    x = cell_inputs(feats[train], None if dets is None else dets[train]).flatten(0, 1)
    y = torch.from_numpy(labels[train]).flatten()
    keep = y != -100
    x, y = x[keep], y[keep]
    log(f"probe: a linear classifier over {x.shape[1]} inputs per cell, {len(y):,} labelled cells "
        f"({int((y < len(categories)).sum()):,} on objects), {args.epochs} epochs")
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(cfg["train"]["threads"])
    probe = torch.nn.Linear(x.shape[1], len(categories) + 1)
    opt = torch.optim.AdamW(probe.parameters(), 1e-3, weight_decay=0.05)
    for epoch in range(args.epochs):
        for batch in torch.randperm(len(y)).split(1024):
            loss = torch.nn.functional.cross_entropy(probe(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        log(f"    epoch {epoch + 1}/{args.epochs}  loss {loss.item():.3f}")

    ev = work / "eval"
    scenes = json.loads((ev / "eval.json").read_text())["scenes"]
    images = [Image.open(ev / s["image"]).convert("RGB").resize((tp.SIZE, tp.SIZE), Image.BILINEAR) for s in scenes]
    log(f"probe: encoding the {len(scenes)} evaluation scenes of {ev / 'eval.json'}")
    ef = tp.encode(images, args.cache / "models" / cfg["model"]["encoder"], grid, cfg["train"]["threads"])
    ed = None if dets is None else tp.detect(images, args.cache, cfg["detector"]["facts"], None,
                                             cfg["train"]["threads"], grid).astype(np.float32)
    with torch.no_grad():
        p = probe(cell_inputs(ef, ed)).softmax(-1)[..., :len(categories)].amax(1).numpy()

    # right, named, shown, named nothing, scenes, one-object scenes, of them best category right
    rows = collections.defaultdict(lambda: [0, 0, 0, 0, 0, 0, 0])
    for scene, prob in zip(scenes, p):
        named = {categories[i] for i in np.nonzero(prob > args.threshold)[0]}
        shown = set(scene["objects"])
        for kind in (scene["kind"], "all"):
            r = rows[kind]
            r[0] += len(named & shown)
            r[1] += len(named)
            r[2] += len(shown)
            r[3] += not named
            r[4] += 1
            if len(shown) == 1:
                r[5] += 1
                r[6] += categories[int(prob.argmax())] in shown

    def pct(a: int, b: int) -> str:
        return f"{100 * a / b:.1f} %" if b else "–"

    print(f"\nLinear probe ({args.inputs}) on the training cells of {cfg['name']} (threshold {args.threshold}), "
          f"scored on {ev / 'eval.json'}:\n")
    print("| scenes | n | object precision | object recall | named nothing | one object: best category right |")
    print("|---|---|---|---|---|---|")
    for kind in sorted(rows, key=lambda k: (k == "all", k)):
        right, named, shown, nothing, n, single, best = rows[kind]
        print(f"| {kind} | {n} | {pct(right, named)} | {pct(right, shown)} | {pct(nothing, n)} | {pct(best, single)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
