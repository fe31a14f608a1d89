#!/usr/bin/env python3
"""What the encoder's features allow for new exemplars, two probes, no LLM.

1. Would an object-centred crop carry recognition to new exemplars?

The linear probe (linear_probe.py) names the right category of a held-out cut-out alone in a scene
only about a third of the time from the encoder's cells: the object covers a few of the 16 x 16
patches among a background's. Before building a second, cropped view into the pipeline (a box from
the detector or a saliency map, encoded again at full resolution, as LLaVA-NeXT's tiles), this
measures what such a view could give at best: each exemplar's cut-out filling most of the frame
("tight": 75-95 % of the width, centred, the crop a perfect box would give) against the same
exemplars as the scenes show them ("scene": `[data] single_scale`, anywhere). The same reader for
both: a linear classifier on the mean of the encoder's patch tokens, trained on views of the
training exemplars, scored on views of the held-out ones (exemplars never seen), and a nearest
class mean for comparison.

2. Do whole photos of unknown things stand apart from new photos of known categories? The caption
check by the image tokens leaves the names given to unknown animals' photos (their tokens point
at "cow" and "sheep" as firmly as a cow's do). A gate on the whole frame would need the two kinds
of new photo to differ in how close they come to the training scenes: the highest cosine of a
photo's mean patch token with any training scene's of known objects (and that minus the highest
with the scenes of unknown objects), as an AUROC over the evaluation set's held-out photos of
known categories against its unknown photos, and what a threshold keeping 95 % of the training
photos would keep of each.

    $(CACHE)/train-venv/bin/python models/experiments/exemplar_probe.py [--config models/projector/train-v7.toml]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
import train_projector as tp  # noqa: E402  (the same configuration, composer and encoder)
from fetch import default_cache, log  # noqa: E402


def framings(cfg: dict) -> dict[str, tuple[tuple[float, float], list[str]]]:
    """Object width as a fraction of the frame, and the positions, of each framing."""
    return {"tight": ((0.75, 0.95), ["centre"]), "scene": (tuple(cfg["data"]["single_scale"]), list(tp.POSITIONS))}


def views(comp, rng: np.random.Generator, exemplars: dict[str, list[dict]], n: int,
          framing: tuple[tuple[float, float], list[str]]) -> tuple[list, list[int]]:
    """`n` scenes of each exemplar alone in the framing, and their category indices."""
    scale, positions = framing
    images, labels = [], []
    for k, name in enumerate(comp.categories):
        for p in exemplars.get(name, []):
            for _ in range(n):
                canvas = comp.background()
                comp.paste(canvas, comp.cutout(p), positions[rng.integers(len(positions))], scale)
                images.append(canvas)
                labels.append(k)
    return images, labels


def read(train: np.ndarray, labels: list[int], test: np.ndarray, test_labels: list[int], n_categories: int,
         seed: int) -> dict[str, float]:
    """Share of the test views named right from one feature vector each by a linear classifier
    trained on the training views, by the nearest class mean and by the nearest training view."""
    import torch
    # Centred on the training views' mean (DINOv2's tokens share a large common part, which would
    # decide a nearest mean by the means' norms), then unit length.
    centre = train.mean(axis=0)
    unit = lambda f: torch.from_numpy((f - centre) / np.linalg.norm(f - centre, axis=1, keepdims=True))  # noqa: E731
    x, xt, y, yt = unit(train), unit(test), torch.tensor(labels), torch.tensor(test_labels)
    torch.manual_seed(seed)
    probe = torch.nn.Linear(x.shape[1], n_categories)
    opt = torch.optim.AdamW(probe.parameters(), 1e-2, weight_decay=1e-4)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(probe(x) * 10.0, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        linear = (probe(xt).argmax(1) == yt).float().mean().item()
        # Unit-length class means: a category of one exemplar has a tighter, longer mean, which
        # would otherwise win every comparison.
        centroids = torch.nn.functional.normalize(torch.stack(
            [x[y == k].mean(0) if (y == k).any() else torch.zeros(x.shape[1]) for k in range(n_categories)]), dim=1)
        nearest = ((xt @ centroids.T).argmax(1) == yt).float().mean().item()
        one_nn = (y[(xt @ x.T).argmax(1)] == yt).float().mean().item()
    return {"linear": linear, "nearest": nearest, "1-nn": one_nn}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=HERE / "projector" / "train-v7.toml", help="training configuration")
    ap.add_argument("--cache", type=Path, default=default_cache(), help="cache root (default: $SCENECAST_CACHE)")
    ap.add_argument("--train-views", type=int, default=6, help="views of each training exemplar per framing")
    ap.add_argument("--test-views", type=int, default=3, help="views of each held-out exemplar per framing")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    cfg = tp.load_config(args.config)
    rng = np.random.default_rng(cfg["seed"] + 7)
    comp = tp.Composer(cfg, args.cache / "models" / "photos", rng)
    categories = comp.categories
    held = {n: ps for n, ps in comp.heldout_photos.items() if ps}
    log(f"crop probe: {len(categories)} categories, {sum(map(len, comp.train_photos.values()))} training exemplars, "
        f"{sum(map(len, held.values()))} held-out exemplars of {len(held)} categories")
    encoder = args.cache / "models" / cfg["model"]["encoder"]
    results = {}
    for framing, frame in framings(cfg).items():
        data = {}
        for split, exemplars, n in (("train", comp.train_photos, args.train_views), ("test", held, args.test_views)):
            images, labels = views(comp, rng, exemplars, n, frame)
            log(f"  {framing}: encoding {len(images)} {split} views")
            data[split] = (tp.encode(images, encoder, cfg["model"]["pool"], args.threads).mean(axis=1), labels)
        scores = read(*data["train"], *data["test"], len(categories), cfg["seed"])
        results[framing] = (scores["linear"], scores["nearest"], len(data["test"][1]))
    print(f"\nHeld-out exemplars named right by the mean patch token of {cfg['model']['encoder']} "
          f"({args.config.name}; {args.train_views} views of each training exemplar, {args.test_views} of each held-out one):\n")
    print("| framing | views | linear classifier | nearest class mean |")
    print("|---|---|---|---|")
    for framing, (linear, nearest, n) in results.items():
        print(f"| {framing} | {n} | {100 * linear:.1f} % | {100 * nearest:.1f} % |")
    unknown_photos(cfg, args, encoder)
    return 0


def unknown_photos(cfg: dict, args, encoder: Path) -> None:
    """Probe 2: the evaluation set's whole photos against the cached training scenes."""
    import json

    from PIL import Image

    work = args.cache / "train" / cfg["name"]
    feats_path, meta_path = tp.data_paths(cfg, work, None)
    if not (feats_path.is_file() and (work / "eval" / "eval.json").is_file()):
        log(f"unknown photos: no cached training features or evaluation set under {work}; run `make eval` first")
        return
    kinds = np.array([m["kind"] for m in json.loads(meta_path.read_text())])
    train = np.asarray(np.load(feats_path, mmap_mode="r")[kinds != "check"]).mean(axis=1)
    kinds = kinds[kinds != "check"]
    ev = work / "eval"
    rows = ("photo", "photo-heldout", "unknown-photo-heldout")
    scenes = [s for s in json.loads((ev / "eval.json").read_text())["scenes"] if s["kind"] in rows]
    images = [Image.open(ev / s["image"]).convert("RGB").resize((tp.SIZE, tp.SIZE), Image.BILINEAR) for s in scenes]
    log(f"unknown photos: encoding the evaluation set's {len(images)} whole photos")
    photos = tp.encode(images, encoder, cfg["model"]["pool"], args.threads).mean(axis=1)
    centre = train.mean(axis=0)
    unit = lambda f: (f - centre) / np.linalg.norm(f - centre, axis=-1, keepdims=True)  # noqa: E731
    near = unit(photos) @ unit(train).T
    known = near[:, np.isin(kinds, ["single", "pair", "half", "photo"])].max(axis=1)
    unknown = near[:, kinds == "unknown"].max(axis=1)
    kind = np.array([s["kind"] for s in scenes])
    print(f"\nWhole photos: held-out photos of known categories ({(kind == rows[1]).sum()}) against photos of "
          f"unknown things ({(kind == rows[2]).sum()}), by their nearest training scene:\n")
    print("| score | AUROC | kept at the threshold keeping 95 % of training photos: known / unknown |")
    print("|---|---|---|")
    for name, score in (("best cosine with a known scene", known), ("that minus the best with an unknown scene", known - unknown)):
        pos, neg = score[kind == rows[1]], score[kind == rows[2]]
        auroc = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
        threshold = np.quantile(score[kind == rows[0]], 0.05)
        print(f"| {name} | {auroc:.2f} | {100 * (pos >= threshold).mean():.0f} % / {100 * (neg >= threshold).mean():.0f} % |")


if __name__ == "__main__":
    sys.exit(main())
