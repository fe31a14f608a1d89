#!/usr/bin/env python3
"""A category head on EfficientNet-Lite0's cells, trained on the projector's own training scenes
(no LLM): does it name new exemplars, and tell unknown things, better than ImageNet's classes
summed by WordNet (the `imagenet ` columns the caption check and the guide read today)?

The shipped detector graph (`detector/nanodet-imagenet.onnx`) computes Lite0's last feature map
(1280 x 8 x 8, one vector per image-token cell) before its ImageNet classifier. This reads that
map for the training scenes of a projector configuration (composed again, seeded: the scenes the
projector trained on) and trains a linear softmax per cell over the configuration's categories
plus "nothing" (background and the unknown objects' cells), from the composer's cell labels.
Then, on the `make eval` set of that configuration, per row: how often the best cell's category
is one shown, and the precision / recall of naming every category whose best cell scores at least
a threshold calibrated on the training rows (kinds `photo` and `heldout-pair`, 95 % of their
names kept), against the same for the ImageNet columns (the report's per-scene `classifier`).

    $(CACHE)/train-venv/bin/python models/experiments/category_head.py
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
import train_projector as tp  # noqa: E402
from fetch import default_cache, log  # noqa: E402


def feature_model(detector: Path) -> bytes:
    """The detector graph cut at the input of Lite0's classifier (the Conv reading `cls_fc.w`)."""
    import onnx
    from onnx import utils

    m = onnx.load(str(detector))
    conv = next(n for n in m.graph.node if n.op_type == "Conv" and "cls_fc.w" in n.input)
    feats = conv.input[0]
    m.graph.value_info.append(onnx.helper.make_tensor_value_info(feats, onnx.TensorProto.FLOAT, None))
    e = utils.Extractor(m)
    return e.extract_model([m.graph.input[0].name], [feats]).SerializeToString()


def lite0_cells(images, cache: Path, det, threads: int) -> np.ndarray:
    """[n, 64, 1280] float16: Lite0's feature map per cell, row-major, from each image
    pre-processed as the detector is (scenecast's Detector)."""
    import onnxruntime as ort
    from PIL import Image

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(feature_model(cache / "models" / det.file), opts, providers=["CPUExecutionProvider"])
    inp, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    mean, std = np.array(det.mean, np.float32), np.array(det.std, np.float32)
    rows = []
    start = time.monotonic()
    for i, image in enumerate(images):
        x = np.asarray(image.convert("RGB").resize((det.size[1], det.size[0]), Image.BILINEAR), np.float32) / 255.0
        if det.channels == "bgr":
            x = x[:, :, ::-1]
        f = sess.run([out], {inp: ((x - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)})[0][0]
        rows.append(f.reshape(f.shape[0], -1).T.astype(np.float16))
        if (i + 1) % 500 == 0:
            rate = (i + 1) / (time.monotonic() - start)
            log(f"    lite0 {i + 1}/{len(images)} ({rate:.1f} img/s)")
    return np.stack(rows)


def main() -> int:
    import torch
    from PIL import Image

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=HERE / "projector" / "train-v15.toml")
    ap.add_argument("--cache", type=Path, default=default_cache())
    ap.add_argument("--report", type=Path, default=HERE / "projector" / "dinov2s-nanodet-imagenet-smollm2-v15-placed.eval.json.gz")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--keep", type=float, default=0.95, help="share of the training rows' right names a threshold keeps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = tp.load_config(args.config)
    work = args.cache / "train" / cfg["name"]
    det = cfg["detector"]["facts"]
    cats = [c["name"] for c in cfg["category"]]
    k = len(cats)

    train_path = work / "lite0-cells-train.npy"
    meta_path = work / "lite0-cells-train.json"
    if train_path.is_file():
        feats, metas = np.load(train_path, mmap_mode="r"), json.loads(meta_path.read_text())
    else:
        _, images, metas = tp.compose_training(cfg, args.cache / "models" / "photos")
        log(f"    {len(images)} training scenes composed")
        feats = lite0_cells(images, args.cache, det, args.threads)
        np.save(train_path, feats)
        meta_path.write_text(json.dumps(metas))
        del images
    labels, _ = tp.cell_labels(metas, cats, cfg["model"]["pool"])

    ev = json.loads((work / "eval" / "eval.json").read_text())
    eval_path = work / "lite0-cells-eval.npy"
    if eval_path.is_file():
        efeats = np.load(eval_path)
    else:
        imgs = [Image.open(p if Path(p).is_absolute() else work / "eval" / p) for p in (s["image"] for s in ev["scenes"])]
        efeats = lite0_cells(imgs, args.cache, det, args.threads)
        np.save(eval_path, efeats)

    # Training cells: every labelled cell (background and unknown objects are class k).
    x = torch.from_numpy(np.asarray(feats, np.float32).reshape(-1, feats.shape[-1]))
    y = torch.from_numpy(labels.reshape(-1))
    keep = y != -100
    x, y = x[keep], y[keep]
    mu, sd = x.mean(0), x.std(0) + 1e-3
    log(f"    {len(y)} labelled cells, {(y < k).sum().item()} on known objects")
    head = torch.nn.Linear(x.shape[1], k + 1)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
    counts = torch.bincount(y, minlength=k + 1).float()
    weight = (counts.sum() / (counts + 1)).clamp(max=50.0) ** 0.5
    for step in range(args.steps):
        idx = torch.randint(0, len(y), (1024,))
        loss = torch.nn.functional.cross_entropy(head((x[idx] - mu) / sd), y[idx], weight=weight, label_smoothing=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0:
            log(f"    step {step} loss {loss.item():.3f}")
    with torch.no_grad():
        ex = torch.from_numpy(efeats.astype(np.float32))
        probs = torch.softmax(head((ex - mu) / sd), dim=-1).numpy()  # [n, 64, k + 1]
    best = probs[:, :, :k].max(axis=1)  # [n, k]: each category's best cell

    report = json.loads(gzip.decompress(args.report.read_bytes()))
    by_image = {Path(s["image"]).name: s for s in report["scenes"]}
    imagenet = np.array([[np.nan if v is None else v for v in by_image[Path(s["image"]).name]["classifier"]]
                         for s in ev["scenes"]], np.float64)

    def threshold(scores: np.ndarray) -> float:
        right = [scores[i, cats.index(o)] for i, s in enumerate(ev["scenes"]) if s["kind"] in ("photo", "heldout-pair")
                 for o in s["objects"] if not np.isnan(scores[i, cats.index(o)])]
        return float(np.quantile(right, 1 - args.keep))

    table = {}
    for name, scores in (("head", best), ("imagenet", imagenet)):
        t = threshold(scores)
        rows = defaultdict(lambda: defaultdict(int))
        for i, s in enumerate(ev["scenes"]):
            r = rows[s["kind"]]
            shown = set(s["objects"])
            sc = np.nan_to_num(scores[i], nan=-1.0)
            named = {cats[c] for c in np.flatnonzero(sc >= t)}
            top = cats[int(np.argmax(sc))]
            r["n"] += 1
            r["top1"] += top in shown
            r["tp"] += len(named & shown)
            r["fp"] += len(named - shown)
            r["fn"] += len(shown - named)
            r["nothing"] += not named
        table[name] = (t, rows)
    kinds = sorted(table["head"][1])
    print(f"thresholds (keep {args.keep:.0%} of the training rows' names): " +
          ", ".join(f"{n} {t:.4f}" for n, (t, _) in table.items()))
    print("| kind | n | head: best right | P / R | named nothing | imagenet: best right | P / R | named nothing |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in kinds:
        cells = []
        for name in ("head", "imagenet"):
            r = table[name][1][kind]
            p = 100 * r["tp"] / max(1, r["tp"] + r["fp"])
            rc = 100 * r["tp"] / max(1, r["tp"] + r["fn"])
            cells += [f"{100 * r['top1'] / r['n']:.1f} %", f"{p:.1f} / {rc:.1f} %", f"{100 * r['nothing'] / r['n']:.1f} %"]
        print(f"| {kind} | {table['head'][1][kind]['n']} | " + " | ".join(cells) + " |")
    np.save(work / "lite0-head-eval-best.npy", best)
    torch.save({"weight": head.weight.detach(), "bias": head.bias.detach(), "mu": mu, "sd": sd}, work / "lite0-head.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
