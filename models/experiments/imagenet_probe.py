#!/usr/bin/env python3
"""What an ImageNet classifier knows of new exemplars that DINOv2-S does not (no LLM).

The second encoder of projector v14 (models/imagenet_to_onnx.py: EfficientNet-Lite0's ImageNet
probabilities per cell, summed into the projector's categories by WordNet) against the reference
encoder, on exemplar_probe.py's views of the held-out exemplars (`tight`: the cut-out filling
75-95 % of the frame; `scene`: as the evaluation shows them) and on the held-out camera photos:

- zero-shot: the category with the most ImageNet probability, from the whole frame's logits (the
  classifier as trained) and from the best cell of the 8 x 8 map (what the projector reads);
- a linear classifier on each encoder's pooled features, trained on views of the training
  exemplars (exemplar_probe.read), and on the classifier's 1000 logits;
- the unknown photos' largest category probability and their `other` mass (ImageNet classes under
  no category), against the held-out photos of known categories.

First it checks the ONNX classifier against the reference implementation (PyPI's
efficientnet-lite-pytorch, the same weights) on sample photos. About 10 minutes on 2 cores; needs
`make models FETCH_ARGS=--train`.

    $(CACHE)/train-venv/bin/python models/experiments/imagenet_probe.py
"""
from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import imagenet_to_onnx as ito  # noqa: E402
import train_projector as tp  # noqa: E402
from exemplar_probe import framings, read, views  # noqa: E402
from fetch import default_cache, log  # noqa: E402


def main() -> int:
    import onnx
    import onnxruntime as ort
    import torch
    from PIL import Image

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=HERE / "projector" / "train-v14.toml", help="training configuration")
    ap.add_argument("--cache", type=Path, default=default_cache(), help="cache root (default: $SCENECAST_CACHE)")
    ap.add_argument("--train-views", type=int, default=4, help="views of each training exemplar")
    ap.add_argument("--test-views", type=int, default=3, help="views of each held-out exemplar")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = args.cache / "models"
    cfg = tp.load_config(args.config)
    spec = tomllib.loads((HERE / "classifier" / "imagenet-categories.toml").read_text())
    names, matrix = ito.category_matrix(models / "classifier" / "wordnet", models / "classifier" / "imagenet1k_to_21k.json", spec)
    weights = ito.read_pth(models / "classifier" / "efficientnet-lite0.pth")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads

    # The classifier alone, on the Lite-normalised 256 x 256 tensor: per-cell scores, pooled logits
    # and the pooled 1280-wide features.
    g = ito.classifier_nodes(weights, matrix, "x", "cells")
    nodes = g.nodes + [onnx.helper.make_node("GlobalAveragePool", [g.features], ["pooled"]),
                       onnx.helper.make_node("Flatten", ["pooled"], ["features"]),
                       onnx.helper.make_node("Gemm", ["features", "fc_w", "fc_b"], ["logits"], transB=1)]
    inits = g.inits + [onnx.numpy_helper.from_array(weights["_fc.weight"], "fc_w"), onnx.numpy_helper.from_array(weights["_fc.bias"], "fc_b")]
    graph = onnx.helper.make_graph(nodes, "classifier", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 3, 256, 256])],
                                   [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("cells", "logits", "features")], inits)
    sess = ort.InferenceSession(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]).SerializeToString(),
                                opts, providers=["CPUExecutionProvider"])

    def run(images: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = [[], [], []]
        for im in images:  # batch 1, as the runtime runs it (the graph's per-cell output is [1, cells, categories])
            a = np.asarray(im.convert("RGB").resize((256, 256), Image.BILINEAR), np.float32)[None]
            for o, r in zip(out, sess.run(None, {"x": ((a - ito.LITE_MEAN) / ito.LITE_STD).transpose(0, 3, 1, 2).copy()})):
                o.append(r)
        return tuple(np.concatenate(o) for o in out)

    # 1. Against the reference implementation, when it is installed.
    photos = models / "photos"
    samples = [Image.open(p) for p in sorted(photos.rglob("*.png"))[:6]]
    try:
        from efficientnet_lite_pytorch import EfficientNet
        net = EfficientNet.from_name("efficientnet-lite0")
        net.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
        net.eval()
        cells, logits, _ = run(samples)
        a = np.stack([np.asarray(im.convert("RGB").resize((256, 256), Image.BILINEAR), np.float32) for im in samples])
        with torch.no_grad():
            x = torch.from_numpy(((a - ito.LITE_MEAN) / ito.LITE_STD).transpose(0, 3, 1, 2).copy())
            ref_logits = net(x).numpy()
            f = net.extract_features(x)
            p = torch.softmax(torch.einsum("bchw,kc->bhwk", f, net._fc.weight) + net._fc.bias, -1).reshape(len(samples), -1, 1000).numpy()
        print(f"ONNX vs efficientnet-lite-pytorch on {len(samples)} photos: logits max abs diff "
              f"{np.abs(logits - ref_logits).max():.2e}, per-cell category scores {np.abs(cells - p @ matrix).max():.2e}")
    except ImportError:
        print("(efficientnet-lite-pytorch not installed: no check against the reference implementation)")

    # 2. Held-out exemplars and photos.
    rng = np.random.default_rng(cfg["seed"] + 7)
    comp = tp.Composer(cfg, photos, rng)
    cats = comp.categories
    if names[:len(cats)] != cats:
        raise SystemExit("error: classifier/imagenet-categories.toml does not list the configuration's categories in order")
    covered = {c for c, col in zip(names, matrix.T) if col.any()}
    held = {n: ps for n, ps in comp.heldout_photos.items() if ps}
    encoder = models / cfg["model"]["encoder"]
    rows = []

    def zero_shot(cells: np.ndarray, logits: np.ndarray, labels: list[int]) -> tuple[float, float]:
        y = np.array(labels)
        whole = (torch.softmax(torch.from_numpy(logits), 1).numpy() @ matrix)[:, :len(cats)].argmax(1)
        best_cell = cells[:, :, :len(cats)].max(1).argmax(1)
        return (whole == y).mean(), (best_cell == y).mean()

    for framing, frame in framings(cfg).items():
        log(f"{framing}: composing and encoding views")
        ti, tl = views(comp, rng, comp.train_photos, args.train_views, frame)
        hi, hl = views(comp, rng, held, args.test_views, frame)
        (_, tlog, tf), (hc, hlog, hf) = run(ti), run(hi)
        whole, cell = zero_shot(hc, hlog, hl)
        dino_t = tp.encode(ti, encoder, cfg["model"]["pool"], args.threads).mean(axis=1)
        dino_h = tp.encode(hi, encoder, cfg["model"]["pool"], args.threads).mean(axis=1)
        n_cov = sum(cats[y] in covered for y in hl)
        rows.append((f"held-out exemplars, {framing} ({len(hl)} views, {n_cov} of covered categories)",
                     whole, cell, read(tf, tl, hf, hl, len(cats), 0)["linear"], read(tlog, tl, hlog, hl, len(cats), 0)["linear"],
                     read(dino_t, tl, dino_h, hl, len(cats), 0)["linear"]))
    imgs, labels = [], []
    for c in cfg["category"]:
        for p in c["photos"]:
            if "stamp" not in p and p.get("heldout"):
                imgs.append(comp.open(p))
                labels.append(cats.index(c["name"]))
    pc, plog, _ = run(imgs)
    whole, cell = zero_shot(pc, plog, labels)
    rows.append((f"held-out camera photos ({len(labels)})", whole, cell, None, None, None))

    print("\nNamed right (the category of the held-out exemplar or photo):\n")
    print("| views | zero-shot, whole frame | zero-shot, best cell | linear on Lite0's 1280 features | linear on its 1000 logits | linear on DINOv2-S's mean patch token |")
    print("|---|---|---|---|---|---|")
    pct = lambda v: "–" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    for title, *vals in rows:
        print(f"| {title} | " + " | ".join(pct(v) for v in vals) + " |")

    # 3. Unknown photos against known ones: the largest category probability of the whole frame.
    unknown = [comp.open(u) for u in comp.unknown_heldout if "crop" in u or ("file" in u and "stamp" not in u)]
    _, ulog, _ = run(unknown)
    known_p = torch.softmax(torch.from_numpy(plog), 1).numpy() @ matrix
    unk_p = torch.softmax(torch.from_numpy(ulog), 1).numpy() @ matrix
    k_best, u_best = known_p[:, :len(cats)].max(1), unk_p[:, :len(cats)].max(1)
    auroc = (u_best[:, None] < k_best[None, :]).mean() + 0.5 * (u_best[:, None] == k_best[None, :]).mean()
    print(f"\nWhole photos, largest category probability: known ({len(k_best)}) median {np.median(k_best):.2f}, "
          f"unknown ({len(u_best)}) median {np.median(u_best):.2f}; AUROC known vs unknown {auroc:.2f}; "
          f"unknown below 0.2: {int((u_best < 0.2).sum())} of {len(u_best)}, known below 0.2: {int((k_best < 0.2).sum())} of {len(k_best)}")
    if spec.get("other"):
        print(f"`{spec['other']}` mass: known median {np.median(known_p[:, -1]):.2f}, unknown median {np.median(unk_p[:, -1]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
