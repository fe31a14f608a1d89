#!/usr/bin/env python3
"""Does the generator's UNet learn to use its caption? A short training probe, no export.

scenegen-v1 renders nearly the same picture for every prompt, and a 128-pixel teacher trained for
30 minutes (scenegen-v2's first run) predicted the clean image exactly as well with the right, a
wrong or the empty caption. This trains a fresh `train_generator.Model` for a few hundred steps on
freshly composed scenes and prints, every 100 steps, the clean-image error at high noise (s = 0.98
and 0.9) on a fixed batch with the right captions and with the empty one: a model that reads its
caption has the first clearly below the second.

    python models/experiments/caption_use_probe.py                         # the scenes as trained
    python models/experiments/caption_use_probe.py --background grey       # one grey background
    python models/experiments/caption_use_probe.py --toy                   # the caption decides the colour

`--toy` is the wiring check: four captions, each a solid colour; the model must learn it in ~100 steps.
`--box-weight W` weighs the loss inside the objects' boxes 1 + W times the background's (the caption
only decides those pixels).

`--curriculum N` is a curriculum by background: the first N steps train on single objects on one grey
background (where the caption gain appears), the rest on the scenes `--background` and `--kind` ask
for, half of each batch still grey; the log then reads the gain on both sets of scenes.

    python models/experiments/caption_use_probe.py --shift 3 --kind mixed --curriculum 1000 --steps 2000

`--judge SCENECAST` then draws every trained category ("a <name> on the left/in the centre/on the
right", two seeds, 32 guided flow steps at guidance 3) with the probe's model and captions the
drawings with that scenecast binary (`scenecast eval`), beside as many real scenes of the kind the
probe trained on: whether reading the caption becomes drawing the object.

    python models/experiments/caption_use_probe.py --background grey --categories 8 --shift 3 \
        --steps 2000 --judge "$CARGO_TARGET_DIR/release/scenecast"
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
import eval_generator as eg  # noqa: E402
import train_generator as tg  # noqa: E402
from fetch import default_cache, log  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=HERE / "generator" / "train-v2.toml")
    ap.add_argument("--cache", type=Path, default=default_cache())
    ap.add_argument("--size", type=int, default=64, help="pixels (unshuffled 4x at 64, 8x at 128)")
    ap.add_argument("--scenes", type=int, default=3000)
    ap.add_argument("--background", choices=["trained", "grey"], default="trained")
    ap.add_argument("--kind", choices=["single", "mixed"], default="single", help="single objects, or the training mix")
    ap.add_argument("--scale", type=float, nargs=2, metavar=("MIN", "MAX"),
                    help="a single object's width as a fraction of the frame (default: the config's)")
    ap.add_argument("--categories", type=int, help="only the first N categories (single objects)")
    ap.add_argument("--toy", action="store_true")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--shift", type=float, default=1.0)
    ap.add_argument("--box-weight", type=float, default=0.0,
                    help="the loss weighs the objects' boxes 1 + this much more than the background")
    ap.add_argument("--curriculum", type=int, default=0, metavar="N",
                    help="the first N steps on grey singles, then the asked-for scenes (half grey)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--judge", type=Path, metavar="SCENECAST",
                    help="after training, draw each trained category and caption the drawings with this binary")
    args = ap.parse_args()
    if args.judge and args.toy:
        ap.error("--judge draws the composed scenes' categories; the toy set has none")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg, scenes = tg.load_config(args.config)
    if args.scale:
        scenes["data"]["single_scale"] = list(args.scale)
    cfg["image"]["size"], cfg["image"]["unshuffle"] = args.size, args.size // 16
    r = cfg["image"]["unshuffle"]
    tokens = tg.Tokens(args.cache / "models" / "generator" / "clip-tokenizer.json", 77, tg.EOS)
    rng = np.random.default_rng(1)
    cells = args.size // r
    if args.toy:
        colours = np.array([[255, 0, 0], [0, 0, 255], [0, 255, 0], [255, 255, 0]], np.uint8)
        pick = rng.integers(0, 4, args.scenes)
        images = np.broadcast_to(colours[pick][:, None, None, :], (args.scenes, args.size, args.size, 3)).copy()
        captions = [f"a {['cat', 'dog', 'car', 'cup'][k]}" for k in pick]
        boxes = np.zeros((args.scenes, cells, cells), np.float32)
        sets = [(images, captions, boxes)]
    else:
        comp = tg.Composer(cfg, scenes, args.cache / "models" / "photos", rng)
        if args.categories:
            comp.categories = comp.categories[:args.categories]
        trained_background = comp.background
        grey = lambda: Image.new("RGB", (tg.tp.SIZE, tg.tp.SIZE), (128, 128, 128))  # noqa: E731
        asked = (grey if args.background == "grey" else trained_background, args.kind)
        # The scenes the probe asks for; with a curriculum, first the grey singles it starts on.
        sets = [compose(comp, background, kind, args, cells, cfg, rng)
                for background, kind in ([(grey, "single")] if args.curriculum else []) + [asked]]
    log(f"{args.scenes} scenes ({'toy' if args.toy else args.background + ' background, ' + args.kind}, "
        f"object width {scenes['data']['single_scale']}, {len(comp.categories) if not args.toy else 4} categories), "
        f"{args.size} px, shift {args.shift}, lr {args.lr}, box weight {args.box_weight}"
        + (f", the first {args.curriculum} steps on grey singles" if args.curriculum else ""))
    empty = torch.tensor([tokens.ids("")])
    data = [(torch.from_numpy(images), torch.tensor([tokens.ids(c) for c in captions]), torch.from_numpy(boxes))
            for images, captions, boxes in sets]
    used = set(empty.flatten().tolist()).union(*(set(ids.flatten().tolist()) for _, ids, _ in data))
    model = tg.Model(cfg, tg.Tokens.remap(used))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    # Fixed read-out batches: the first 64 scenes of each set (all, if fewer), with fixed noise.
    fixed = [(tg.to_latent(imgs[:64], r), ids[:64]) for imgs, ids, _ in data]
    pn = torch.randn(fixed[0][0].shape, generator=torch.Generator().manual_seed(5))
    names = ["grey singles", "asked scenes"] if len(data) == 2 else ["scenes"]
    start = time.time()
    for step in range(args.steps + 1):
        # Before the curriculum's switch only the first set; after it half a batch of each.
        parts = [(data[0], 32)] if len(data) == 1 or step < args.curriculum else [(data[0], 16), (data[1], 16)]
        picked = [(d, torch.randint(0, len(d[0]), (m,))) for d, m in parts]
        x = torch.cat([tg.to_latent(d[0][k], r) for d, k in picked])
        ids_k = torch.cat([d[1][k] for d, k in picked])
        box_k = torch.cat([d[2][k] for d, k in picked])
        s = tg.shifted(torch.sigmoid(torch.randn(32)), args.shift)
        n = torch.randn_like(x)
        z = (1 - s)[:, None, None, None] * x + s[:, None, None, None] * n
        cond = torch.where((torch.rand(32) < 0.1)[:, None], empty.expand(32, -1), ids_k)
        weight = 1.0 + args.box_weight * box_k[:, None]
        loss = (weight * (tg.velocity(model, z, s, model.text(cond)) - (n - x)) ** 2).mean() / weight.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            cols = []
            with torch.no_grad():
                for name, (px, ids) in zip(names, fixed):
                    for sv in (0.98, 0.9):
                        z9 = (1 - sv) * px + sv * pn
                        s9 = torch.full((len(px),), sv)
                        err = [F.mse_loss(z9 - sv * tg.velocity(model, z9, s9, model.text(c)), px).item()
                               for c in (ids, empty.expand(len(px), -1))]
                        cols.append(f"{name + ' ' if len(names) > 1 else ''}s={sv}: right {err[0]:.4f} "
                                    f"empty {err[1]:.4f} gain {err[0] - err[1]:+.4f}")
            log(f"  step {step:4}  loss {loss.item():.4f}  " + "  ".join(cols) + f"  ({time.time() - start:.0f} s)")
    if args.judge:
        judge(args, model.eval(), comp, tokens, empty, scenes)
    return 0


def judge(args, model, comp, tokens, empty, scenes) -> None:
    """Draw "a <name> <position>" for each category (two seeds) and caption the drawings with
    `scenecast eval`, beside as many real scenes of the kind the probe trained on (single objects on
    its last background, at its size: the judge's ceiling); the report is `roundtrip.md` beside them."""
    categories = comp.categories
    out = args.cache / "train" / "caption-use-probe"
    out.mkdir(parents=True, exist_ok=True)
    prompts = [p for p in eg.single_prompts(categories) for _ in range(2)]
    ids = torch.tensor([tokens.ids(p) for p, _ in prompts])
    r = args.size // 16
    noise = torch.randn((len(ids), 3 * r * r, 16, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        images = tg.from_latent(tg.sample_teacher(model, noise, ids, empty, 32, 3.0, args.shift), r)
    scenes_out = []
    for j, (img, (_, objects)) in enumerate(zip(images, prompts)):
        path = out / f"drawn-{j:03}.png"
        Image.fromarray(img).save(path)
        scenes_out.append({"image": str(path), "kind": "drawn-single-32s", "objects": objects, "questions": []})
    for j in range(len(prompts)):
        img, m = comp.single()
        path = out / f"real-{j:03}.png"
        img.resize((args.size, args.size), Image.LANCZOS).save(path)
        scenes_out.append({"image": str(path), "kind": f"real-single-{args.size}px",
                           "objects": [o["name"] for o in m["objects"]], "questions": []})
    log(f"captioning {len(scenes_out)} drawings and real scenes of {len(categories)} categories "
        f"(scenecast eval; report {out / 'roundtrip.md'})")
    eg.caption_back([str(args.judge)], out, "caption-use-probe", scenes, scenes_out, out / "roundtrip.md")
    log("  scenes | n | precision | recall | all named | exact | named nothing ...")
    for kind in ("| drawn-", "| real-"):
        log("  " + next(line for line in (out / "roundtrip.md").read_text().splitlines() if line.startswith(kind)))


def compose(comp, background, kind: str, args, cells: int, cfg, rng):
    """`args.scenes` scenes on `background`, single objects or the training mix of singles and pairs:
    the images at the probe's size, their captions, and the objects' boxes on the latent grid."""
    comp.background = background
    images = np.zeros((args.scenes, args.size, args.size, 3), np.uint8)
    boxes = np.zeros((args.scenes, cells, cells), np.float32)
    captions = []
    for i in range(args.scenes):
        if kind == "single" or rng.random() < 0.5:
            img, m = comp.single()
        else:
            img, m = comp.pair(comp.train_pairs, "pair")
        images[i] = np.asarray(img.resize((args.size, args.size), Image.LANCZOS))
        for o in m["objects"]:
            x0, y0, x1, y1 = (round(v * cells) for v in o["box"])
            boxes[i, y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)] = 1.0
        captions.append(tg.captions_for(m, cfg, rng)[0])
    return images, captions, boxes


if __name__ == "__main__":
    sys.exit(main())
