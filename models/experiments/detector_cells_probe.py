#!/usr/bin/env python3
"""Detector-per-cell probe (v5's design question), without the LLM: does the COCO detector's
knowledge reach the image tokens when its class scores are pooled onto the same 8 x 8 grid as the
patch tokens and fused into each cell's token, rather than given to the LLM as separate tokens
(v4, which the LLM did not learn to read)?

The grounding loss (a cell over an object points at the LLM's embedding of its name; background
away from every name) needs no LLM, so each head is trained on it alone, on v3's cached training
features (1,500 steps of batch 32, as the first stage of train_projector.py) plus the detector's
scores of the same recomposed scenes, and is scored on v3's whole held-out evaluation set
(`eval.json`: held-out cut-outs alone and in pairs, held-out camera photos, unknown objects and
photos) by scene: the categories a scene's cells name (at least `--min-cells` cells) against the
scene's objects, the way `scenecast eval` scores captions.

    make projector PROJECTOR_CONFIG=models/projector/train-v3.toml    # once: the cached features
    $(CACHE)/train-venv/bin/python models/experiments/detector_cells_probe.py   # ~15 min the first time
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from fetch import default_cache, log  # noqa: E402
from train_projector import Composer, cell_labels, compose_training, data_paths, detect, encode, load_config, load_frozen_llm  # noqa: E402


def detect_cells(images, cache: Path, det, pool, threads: int) -> np.ndarray:
    return detect(images, cache, det, None, threads, pool)


def main() -> int:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--min-cells", type=int, default=2)
    ap.add_argument("--steps", type=int, default=0)
    args = ap.parse_args()
    cache = default_cache()
    cfg = load_config(HERE.parent / "projector" / "train-v4.toml")
    det = cfg["detector"]["facts"]
    work = cache / "train" / "dinov2s-smollm2-v3"
    feats_path, meta_path = data_paths(cfg, work, None)
    feats, metas = np.load(feats_path), json.loads(meta_path.read_text())
    pool, t = cfg["model"]["pool"], cfg["train"]
    categories = [c["name"] for c in cfg["category"]]
    threads = t["threads"]

    dets_path = work / f"detcells-{feats_path.stem.split('-')[1]}.npy"
    if not dets_path.is_file():
        _, images, _ = compose_training(cfg, cache / "models" / "photos")
        check = Composer(cfg, cache / "models" / "photos", np.random.default_rng(cfg["seed"] + 3))
        for _ in range(cfg["data"]["eval_pairs"]):
            images.append(check.pair(check.heldout_pairs, "check")[0])
        log(f"detecting in {len(images)} training scenes")
        np.save(dets_path, detect_cells(images, cache, det, pool, threads))
        del images
    dets = np.load(dets_path)
    assert len(dets) == len(feats), (dets.shape, feats.shape)

    doc = json.loads((work / "eval" / "eval.json").read_text())
    eval_cache = work / "eval-probe.npz"
    if not eval_cache.is_file():
        images = []
        for s in doc["scenes"]:
            p = Path(s["image"]) if Path(s["image"]).is_absolute() else work / "eval" / s["image"]
            images.append(Image.open(p).convert("RGB"))
        small = [im.resize((224, 224), Image.BILINEAR) for im in images]
        log(f"encoding {len(images)} evaluation scenes")
        ef = encode(small, cache / "models" / cfg["model"]["encoder"], pool, threads)
        ed = detect_cells(images, cache, det, pool, threads)
        np.savez(eval_cache, feats=ef, dets=ed)
    z = np.load(eval_cache)
    ef, ed = torch.from_numpy(z["feats"]).float(), torch.from_numpy(z["dets"]).float()

    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(threads)
    model, tok = load_frozen_llm(cache / "models" / cfg["model"]["llm"])
    embed = model.get_input_embeddings()
    with torch.no_grad():
        names = torch.stack([embed(torch.tensor(tok(" " + c, add_special_tokens=False).input_ids)).mean(0) for c in categories])
    names = torch.nn.functional.normalize(names, dim=-1)
    hidden = names.shape[1]
    cells = torch.from_numpy(cell_labels(metas, categories, pool)[0])
    pick = np.array([i for i, m in enumerate(metas) if m["kind"] != "check"])
    tf, td = torch.from_numpy(feats).float(), torch.from_numpy(dets).float()

    def spread(d):  # each cell's scores and its 3 x 3 neighbourhood's maximum
        g = d.reshape(d.shape[0], pool[0], pool[1], -1).permute(0, 3, 1, 2)
        m = torch.nn.functional.max_pool2d(g, 3, 1, 1).permute(0, 2, 3, 1).reshape(d.shape)
        return torch.cat([d, m], -1)

    def mlp(w):
        return torch.nn.Sequential(torch.nn.Linear(w, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))

    variants = {
        "patches only (v3)": (lambda f, d: f, 384),
        "detector cells only": (lambda f, d: d, 80),
        "patches + detector cells": (lambda f, d: torch.cat([f, d], -1), 464),
        "patches + detector cells + 3x3 max": (lambda f, d: torch.cat([f, spread(d)], -1), 544),
        "patches + detector cells + 3x3 max + frame max": (
            lambda f, d: torch.cat([f, spread(d), d.max(1, keepdim=True).values.expand_as(d)], -1), 624),
    }
    steps = args.steps or t["aux_steps"]
    results = {}
    for vname, (prep, width) in variants.items():
        torch.manual_seed(cfg["seed"])
        proj = mlp(width)
        background = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW(list(proj.parameters()) + [background], lr=t["lr"])
        rng = np.random.default_rng(cfg["seed"] + 1)

        def logits_of(f, d):
            unit = torch.nn.functional.normalize(proj(prep(f, d)), dim=-1)
            cos = unit @ names.T * t["aux_scale"]
            return torch.cat([cos, background.expand(*cos.shape[:2], 1)], -1)

        for _ in range(steps):
            idx = pick[rng.integers(len(pick), size=t["aux_batch"])]
            logits = logits_of(tf[idx], td[idx])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), cells[idx].reshape(-1), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            pred = logits_of(ef, ed).argmax(-1)
        rows = {}
        for s, scene in enumerate(doc["scenes"]):
            counts = np.bincount(pred[s].numpy(), minlength=len(categories) + 1)[:len(categories)]
            named = {categories[c] for c in np.nonzero(counts >= args.min_cells)[0]}
            truth = set(scene["objects"])
            r = rows.setdefault(scene["kind"], [0, 0, 0, 0, 0])  # right, named, shown, scenes, named nothing
            r[0] += len(named & truth)
            r[1] += len(named)
            r[2] += len(truth)
            r[3] += 1
            r[4] += not named
        results[vname] = rows
        log(f"{vname}:")
        for kind, (right, named, shown, n, nothing) in sorted(rows.items()):
            log(f"    {kind:28} P {right / max(1, named):6.1%}  R {right / max(1, shown):6.1%}  named nothing {nothing / n:6.1%}  ({n})")
    (work / "detector-cells-probe.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
