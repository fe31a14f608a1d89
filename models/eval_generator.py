#!/usr/bin/env python3
"""The generator's round trip through scenecast's own eyes (`make generator-eval`).

Prompts are rendered by the shipped runtime (`scenecast generate`, the reference manifest's
generator) and captioned back by the shipped captioner (`scenecast eval`); a render counts when the
caption names every object the prompt asked for. Rows of the report:
  gen-single-Ks        "a <A> on the left" (each category, each position in turn), K Euler steps;
  gen-heldout-pair-Ks  "a <A> on the left and a <B> on the right" for the category pairs never
                       composed together in training (both orders);
  teacher-*-16s        the undistilled teacher, 16 guided flow steps (torch), as reference;
  composed-*-Npx      real scenes composed from the training photos, downscaled to the generator's
                       size: what the captioner itself manages on real pictures at that size;
  rerender-C-1s        privacy re-rendering: held-out composed scenes described by the LLM and
                       rendered from the description (`generate --from-image`), through the text
                       encoder (C = text) or the LLM's hidden states and the output projector
                       (C = hidden); the objects are those the description named.
Also: the nearest training image of each render (mean absolute pixel difference, against the same
for held-out real scenes) and the spread across seeds of one prompt.

    python models/eval_generator.py --scenecast target/release/scenecast
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fetch import default_cache, log  # noqa: E402
import train_generator as tg  # noqa: E402
import train_projector as tp  # noqa: E402

import torch  # noqa: E402


def render(scenecast: list[str], prompt: str, out: Path, seed: int, steps: int) -> None:
    if out.is_file():  # a rerun of the same generator keeps its renders
        return
    subprocess.run([*scenecast, "generate", prompt, "-o", str(out), "--seed", str(seed), "--steps", str(steps)],
                   check=True, stdout=subprocess.DEVNULL)


def scenecast_manifest_unet(args) -> str:
    """The sha256 of the UNet the renders come from: the candidate's file, else the shipped one."""
    import hashlib
    if args.candidate:
        text = Path(tomllib.loads(args.candidate.read_text())["models"]["manifest"]).read_text()
    else:
        text = (HERE / "reference.toml").read_text()
    unet = tomllib.loads(text)["generator"]["unet"]["file"]
    path = Path(unet["path"]) if "path" in unet else args.cache / "models" / unet["cache"]
    return hashlib.sha256(path.read_bytes()).hexdigest()


def named(text: str, categories: list[str]) -> list[str]:
    low = text.lower()
    return [c for c in categories if re.search(rf"\b{re.escape(c)}(s|es)?\b", low)]


def single_prompts(categories: list[str]) -> list[tuple[str, list[str]]]:
    """"a <name> <position>" for each category, the positions taken in turn, with the objects asked for."""
    positions = list(tp.POSITIONS)
    return [(f"{tp.article(c)} {tp.POSITIONS[positions[i % 3]]}", [c]) for i, c in enumerate(categories)]


def caption_back(scenecast: list[str], out: Path, name: str, scenes: dict, images: list[dict], report: Path) -> None:
    """Caption `images` (`scenecast eval`'s scene entries) with scenecast, through an evaluation set
    written to `out`/eval.json, the composer's categories and caption prompt (`scenes`); the report
    goes to `report`."""
    doc = {"name": name, "categories": [c["name"] for c in scenes["category"]],
           "caption_prompt": scenes["questions"]["caption_prompts"][0], "scenes": images}
    (out / "eval.json").write_text(json.dumps(doc, indent=1))
    subprocess.run([*scenecast, "eval", str(out / "eval.json"), "--report", str(report)], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=HERE / "generator" / "train.toml")
    ap.add_argument("--cache", type=Path, default=default_cache())
    ap.add_argument("--scenecast", type=Path, required=True, help="the scenecast binary")
    ap.add_argument("--candidate", type=Path, help="a config that serves a fresh training run (train_generator.py "
                                                     "writes it); default: the shipped generator")
    ap.add_argument("--report", type=Path, help="the report (default: models/generator/<name>.roundtrip.md)")
    args = ap.parse_args()
    scenecast = [str(args.scenecast)] + (["--config", str(args.candidate)] if args.candidate else [])
    cfg, scenes = tg.load_config(args.config)
    torch.set_num_threads(cfg["train"]["threads"])
    work = args.cache / "train" / cfg["name"]
    out = work / "roundtrip"
    # Renders are kept for a rerun of the same generator (its UNet's bytes), else made afresh.
    unet = scenecast_manifest_unet(args)
    stamp = out / "unet.sha256"
    if out.is_dir() and (not stamp.is_file() or stamp.read_text() != unet):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(unet)
    report = args.report or args.config.parent / f"{cfg['name']}.roundtrip.md"
    categories = [c["name"] for c in scenes["category"]]
    art = tp.article
    seeds = cfg["eval"]["seeds"]
    singles = single_prompts(categories)
    pairs = [(f"{art(a)} on the left and {art(b)} on the right", [a, b])
             for x, y in scenes["sets"]["heldout_pairs"] for a, b in ((x, y), (y, x))]
    evalset: list[dict] = []
    groups: dict[str, list[tuple[str, list[Path]]]] = {}

    def add(kind: str, path: Path, objects: list[str]) -> None:
        evalset.append({"image": str(path), "kind": kind, "objects": objects, "questions": []})

    start = time.time()
    for steps in (1, 2):
        for kind, prompts in (("gen-single", singles), ("gen-heldout-pair", pairs)):
            log(f"rendering {len(prompts)} x {seeds} {kind} prompts at {steps} step(s)")
            for i, (prompt, objects) in enumerate(prompts):
                paths = []
                for seed in range(seeds):
                    path = out / f"{kind}-{steps}s-{i:03}-{seed}.png"
                    render(scenecast, prompt, path, seed, steps)
                    add(f"{kind}-{steps}s", path, objects)
                    paths.append(path)
                groups.setdefault(f"{kind}-{steps}s", []).append((prompt, paths))
    log(f"    {time.time() - start:.0f} s")

    # The teacher, 16 guided flow steps, in torch (when this machine trained it: `make generator`).
    # train_generator.py pickled its models as __main__'s classes.
    import __main__
    for name in ("Model", "TextEncoder", "UNet", "ResBlock", "AttnBlock"):
        setattr(__main__, name, getattr(tg, name))
    teacher = torch.load(work / "teacher.pt", weights_only=False).eval() if (work / "teacher.pt").is_file() else None
    if teacher is None:
        log(f"no teacher in {work} (make generator makes it): the teacher rows are left out")
    tokens = tg.Tokens(args.cache / "models" / "generator" / "clip-tokenizer.json", cfg["model"]["context_tokens"],
                       cfg["model"]["pad_token"])
    r, side = cfg["image"]["unshuffle"], cfg["image"]["size"] // cfg["image"]["unshuffle"]
    uncond = torch.tensor([tokens.ids("")])
    for kind, prompts in (("teacher-single", singles), ("teacher-heldout-pair", pairs)) if teacher else ():
        ids = torch.tensor([tokens.ids(p) for p, _ in prompts for _ in range(seeds)])
        noise = torch.randn((len(ids), 3 * r * r, side, side), generator=torch.Generator().manual_seed(7))
        images = tg.from_latent(tg.sample_teacher(teacher, noise, ids, uncond, 16, cfg["distill"]["guidance"],
                                                cfg["train"].get("shift", 1.0)), r)
        for j, img in enumerate(images):
            path = out / f"{kind}-{j:03}.png"
            Image.fromarray(img).save(path)
            add(f"{kind}-16s", path, prompts[j // seeds][1])
            if j % seeds == 0:
                groups.setdefault(f"{kind}-16s", []).append((prompts[j // seeds][0], []))
            groups[f"{kind}-16s"][-1][1].append(path)

    # Real composed scenes at the generator's size (training photos), and held-out ones for the
    # re-rendering and the nearest-neighbour reference.
    size = cfg["image"]["size"]
    comp = tg.Composer(cfg, scenes, args.cache / "models" / "photos", np.random.default_rng(cfg["seed"] + 9))
    for i in range(len(categories)):
        img, m = comp.single()
        path = out / f"composed-single-{i:03}.png"
        img.resize((size, size), Image.LANCZOS).save(path)
        add(f"composed-single-{size}px", path, [o["name"] for o in m["objects"]])
    held_real = []
    for i in range(len(pairs)):
        img, m = comp.pair(comp.heldout_pairs, "heldout")
        path = out / f"composed-heldout-pair-{i:03}.png"
        img.resize((size, size), Image.LANCZOS).save(path)
        add(f"composed-heldout-pair-{size}px", path, [o["name"] for o in m["objects"]])
        full = out / f"scene-heldout-pair-{i:03}.png"
        img.save(full)
        held_real.append(full)

    # Privacy re-rendering of the full-size held-out scenes.
    log(f"re-rendering {len(held_real)} held-out scenes from their descriptions")
    for i, scene in enumerate(held_real):
        for condition, extra in (("text", []), ("hidden", ["--hidden"])):
            path = out / f"rerender-{condition}-{i:03}.png"
            res = subprocess.run([*scenecast, "generate", "--from-image", str(scene), "-o", str(path), "--json", *extra],
                                 check=True, capture_output=True, text=True)
            description = json.loads(res.stdout)["prompt"]
            add(f"rerender-{condition}-1s", path, named(description, categories))

    log(f"captioning {len(evalset)} images (scenecast eval)")
    caption_back(scenecast, out, f"{cfg['name']}-roundtrip", scenes, evalset, report)

    # Contact sheet: the 1-step renders of the first seed, 16 per row.
    sheet = [Image.open(ps[0]).convert("RGB") for kind in ("gen-single-1s", "gen-heldout-pair-1s") for _, ps in groups[kind]]
    cols = 16
    rows = (len(sheet) + cols - 1) // cols
    grid = Image.new("RGB", (cols * size, rows * size), (255, 255, 255))
    for k, im in enumerate(sheet):
        grid.paste(im, ((k % cols) * size, (k // cols) * size))
    grid.save(args.config.parent / f"{cfg['name']}.contact.jpg", quality=85)
    # Nearest training image and spread across seeds (mean absolute difference of 0-255 pixels), at
    # 64 x 64 whatever the generator's size (20,000 images at 128 pixels would take 4 GB as floats).
    NOVELTY = 64
    train = None
    for p in sorted(work.glob("images-*.npy")):
        imgs = np.load(p, mmap_mode="r")
        if imgs.shape[1] != size:
            continue
        f = size // NOVELTY
        chunks = [np.asarray(imgs[i:i + 1000], np.float32).reshape(-1, NOVELTY, f, NOVELTY, f, 3).mean(axis=(2, 4))
                  for i in range(0, len(imgs), 1000)]
        train = np.concatenate(chunks).reshape(len(imgs), -1)
    if train is None:
        log(f"no training images in {work} (make generator composes them): no novelty table")
        log(f"report: {report}")
        return 0
    def nearest(paths: list[Path]) -> float:
        d = []
        for p in paths:
            x = np.asarray(Image.open(p).convert("RGB").resize((NOVELTY, NOVELTY), Image.BOX), np.float32).reshape(1, -1)
            d.append(float(np.abs(train - x).mean(axis=1).min()))
        return float(np.mean(d))
    lines = ["", "## Novelty and diversity", "",
             "Mean absolute pixel difference (0–255) at 64 × 64: to the nearest of the "
             f"{len(train)} training images, and between renders of one prompt with different seeds.", "",
             "| renders | nearest training image | between seeds |", "|---|---|---|"]
    for kind, items in groups.items():
        paths = [p for _, ps in items for p in ps]
        spread = []
        for _, ps in items:
            arrs = [np.asarray(Image.open(p).convert("RGB").resize((NOVELTY, NOVELTY), Image.BOX), np.float32) for p in ps]
            spread += [float(np.abs(arrs[a] - arrs[b]).mean()) for a in range(len(arrs)) for b in range(a + 1, len(arrs))]
        lines.append(f"| {kind} | {nearest(paths):.1f} | {np.mean(spread):.1f} |")
    lines.append(f"| held-out real scenes (reference) | {nearest([out / f'composed-heldout-pair-{i:03}.png' for i in range(len(pairs))]):.1f} | – |")
    with report.open("a") as f:
        f.write("\n".join(lines) + "\n")

    log(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
