#!/usr/bin/env python3
"""Which readout of the encoder names new exemplars best, no LLM: the projector reads the mean of
the last layer's patch tokens (pooled 8 x 8); DINOv2's CLS token and earlier layers are the
alternatives. exemplar_probe.py's views and readers (held-out exemplars; cut-outs filling 75-95 %
of the frame with `tight`, as the scenes show them with `scene`): a linear classifier, the nearest
class mean and the nearest training view, for the CLS token and the mean patch token of blocks 6,
8-11 and the final norm. About 4 min on 2 cores.

    $(CACHE)/train-venv/bin/python models/experiments/readout_probe.py [--framing tight|scene]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_projector as tp  # noqa: E402
from exemplar_probe import framings, read, views  # noqa: E402
from fetch import default_cache, log  # noqa: E402

BLOCKS = [6, 8, 9, 10, 11]


def main() -> int:
    import onnx
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=HERE / "projector" / "train-v7.toml", help="training configuration")
    ap.add_argument("--cache", type=Path, default=default_cache(), help="cache root (default: $SCENECAST_CACHE)")
    ap.add_argument("--framing", choices=("tight", "scene"), default="tight")
    ap.add_argument("--train-views", type=int, default=4, help="views of each training exemplar")
    ap.add_argument("--test-views", type=int, default=3, help="views of each held-out exemplar")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    cfg = tp.load_config(args.config)
    rng = np.random.default_rng(cfg["seed"] + 7)
    comp = tp.Composer(cfg, args.cache / "models" / "photos", rng)
    held = {n: ps for n, ps in comp.heldout_photos.items() if ps}

    # The encoder with the residual stream after each block in BLOCKS as extra outputs.
    model = onnx.load(str(args.cache / "models" / cfg["model"]["encoder"]))
    for b in BLOCKS:
        model.graph.output.append(
            onnx.helper.make_tensor_value_info(f"/backbone/encoder/layer.{b}/Add_1_output_0", onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    readouts = ["final"] + [f"block {b}" for b in BLOCKS]

    def encode(images: list) -> dict[str, np.ndarray]:
        out: dict[str, list] = {}
        for i in range(0, len(images), 16):
            batch = np.stack([(np.asarray(im, np.float32) / 255.0 - tp.MEAN) / tp.STD for im in images[i:i + 16]])
            for readout, tokens in zip(readouts, sess.run(names, {sess.get_inputs()[0].name: batch.transpose(0, 3, 1, 2).copy()})):
                out.setdefault(f"{readout}, CLS", []).append(tokens[:, 0])
                out.setdefault(f"{readout}, mean patch", []).append(tokens[:, 1:].mean(axis=1))
        return {k: np.concatenate(v) for k, v in out.items()}

    frame = framings(cfg)[args.framing]
    train_images, labels = views(comp, rng, comp.train_photos, args.train_views, frame)
    test_images, test_labels = views(comp, rng, held, args.test_views, frame)
    log(f"{args.framing}: encoding {len(train_images)} training and {len(test_images)} held-out views")
    train, test = encode(train_images), encode(test_images)
    for readout in ("final", "block 9", "block 10"):
        train[f"{readout}, CLS + mean patch"] = np.concatenate([train[f"{readout}, CLS"], train[f"{readout}, mean patch"]], 1)
        test[f"{readout}, CLS + mean patch"] = np.concatenate([test[f"{readout}, CLS"], test[f"{readout}, mean patch"]], 1)
    print("\n| readout | linear | nearest class mean | 1-NN |\n|---|---|---|---|")
    for key in train:
        scores = read(train[key], labels, test[key], test_labels, len(comp.categories), 0)
        print(f"| {key} | " + " | ".join(f"{100 * scores[k]:.1f} %" for k in ("linear", "nearest", "1-nn")) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
