#!/usr/bin/env python3
"""Grounding probe for the 80-category projector (train-v2.toml), without the LLM: how often the
image tokens over an object the projector never saw point at the right category's name, for a few
variants of the projector and its training. The grounding loss is what makes image tokens read like
words (models/README.md), and it is cheap (no LLM), so it is where a recipe for held-out exemplars
can be found before a 35-minute run.

With `--features`, the scenes are recomposed and encoded again keeping every token, so that the
encoder's features can vary too: the 16 x 16 patch grid unpooled (256 image tokens), and the CLS
token (the encoder's summary of the whole image) next to each cell's features.

Each variant trains the projector on the grounding loss alone (as the first stage of
train_projector.py, 1,500 steps of batch 32 on the cached training features) and is scored on
composed scenes of the held-out exemplars (cut-outs never trained on, 4 views each) and, as a
reference, on the same kind of scenes of training exemplars:
  - cells: the share of object cells whose best name (or background) is the right one;
  - scenes: the share of scenes whose object cells' majority name is the right category, close to
    what a caption needs.

    make projector PROJECTOR_CONFIG=models/projector/train-v2.toml   # once: the cached features
    $(CACHE)/train-venv/bin/python models/experiments/grounding_probe.py             # the heads, ~5 min
    $(CACHE)/train-venv/bin/python models/experiments/grounding_probe.py --features  # grid and CLS, ~20 min
"""
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from fetch import default_cache, log  # noqa: E402
from train_projector import FACTS, MEAN, STD, Composer, cell_labels, compose_training, data_paths, encode, load_config, load_frozen_llm  # noqa: E402

VIEWS = 4


def compose(cfg: dict, comp: Composer, exemplars: list[tuple[str, dict]]) -> tuple[list, list[dict]]:
    images, metas = [], []
    for name, photo in exemplars:
        for _ in range(VIEWS):
            img, meta = comp.exemplar_single(name, photo)
            images.append(img)
            metas.append(meta)
    return images, metas


def probe_scenes(cfg: dict, cache: Path) -> dict:
    """The scenes the variants are scored on: every held-out cut-out, and as many training cut-outs
    (seeded), each alone on a fresh background in VIEWS views: {label: (images, metas)}."""
    comp = Composer(cfg, cache / "models" / "photos", np.random.default_rng(cfg["seed"] + 7))
    held = [(c["name"], p) for c in cfg["category"] for p in c["photos"] if p.get("heldout") and "crop" not in p]
    seen = [(c["name"], p) for c in cfg["category"] for p in c["photos"] if not p.get("heldout") and "crop" not in p]
    seen = [seen[i] for i in np.random.default_rng(cfg["seed"] + 8).choice(len(seen), len(held), replace=False)]
    return {label: compose(cfg, comp, exemplars) for label, exemplars in (("held-out exemplars", held), ("training exemplars", seen))}


def name_embeddings(cfg: dict, cache: Path, categories: list[str]):
    """The LLM's input embedding of each category's name (mean over its tokens), unit length."""
    import torch

    model, tok = load_frozen_llm(cache / "models" / cfg["model"]["llm"])
    embed = model.get_input_embeddings()
    with torch.no_grad():
        names = torch.stack([embed(torch.tensor(tok(" " + c, add_special_tokens=False).input_ids)).mean(0) for c in categories])
    return torch.nn.functional.normalize(names, dim=-1)


def encode_tokens(images: list, encoder: Path, threads: int) -> np.ndarray:
    """Every output token of the frozen encoder, CLS first: [n, 1 + grid, width], float16."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(encoder), opts, providers=["CPUExecutionProvider"])
    inp, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    chunks = []
    for i in range(0, len(images), 16):
        batch = np.stack([(np.asarray(im, np.float32) / 255.0 - MEAN) / STD for im in images[i:i + 16]])
        chunks.append(sess.run([out], {inp: batch.transpose(0, 3, 1, 2).copy()})[0].astype(np.float16))
        if (i // 16) % 40 == 0:
            log(f"    encoded {i + len(batch)}/{len(images)}")
    return np.concatenate(chunks)


def feature_sets(tokens: np.ndarray) -> dict:
    """From every token, the features of each variant: {name: (features [n, cells, width], grid)}."""
    n, _, width = tokens.shape
    gh, gw = FACTS.patch_grid
    cls = tokens[:, :1].astype(np.float32)
    grid = tokens[:, FACTS.prefix_tokens:].astype(np.float32).reshape(n, gh, gw, width)
    pooled = grid.reshape(n, 8, gh // 8, 8, gw // 8, width).mean(axis=(2, 4)).reshape(n, 64, width)
    fine = grid.reshape(n, gh * gw, width)
    return {
        "8 x 8 pooled": (pooled, [8, 8]),
        "8 x 8 pooled + CLS": (np.concatenate([pooled, np.repeat(cls, 64, axis=1)], axis=-1), [8, 8]),
        "16 x 16": (fine, [gh, gw]),
        "16 x 16 + CLS": (np.concatenate([fine, np.repeat(cls, gh * gw, axis=1)], axis=-1), [gh, gw]),
    }


def main() -> int:
    import torch

    if "--features" in sys.argv:
        return features_probe()

    cache = default_cache()
    cfg = load_config(HERE.parent / "projector" / "train-v2.toml")
    work = cache / "train" / cfg["name"]
    feats_path, meta_path = data_paths(cfg, work, None)
    if not feats_path.is_file():
        raise SystemExit(f"error: {feats_path} is missing; run `make projector PROJECTOR_CONFIG=models/projector/train-v2.toml` first")
    feats, metas = np.load(feats_path), json.loads(meta_path.read_text())
    categories = [c["name"] for c in cfg["category"]]
    pool, t = cfg["model"]["pool"], cfg["train"]

    sets = {}
    for label, (images, scene_metas) in probe_scenes(cfg, cache).items():
        log(f"encoding {len(images)} scenes of {label}")
        sets[label] = (torch.from_numpy(encode(images, cache / "models" / cfg["model"]["encoder"], pool, t["threads"])),
                       torch.from_numpy(cell_labels(scene_metas, categories, pool)[0]))

    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(t["threads"])
    names = name_embeddings(cfg, cache, categories)
    train_feats = torch.from_numpy(feats)
    train_cells = torch.from_numpy(cell_labels(metas, categories, pool)[0])
    pick = np.array([i for i, m in enumerate(metas) if m["kind"] != "check"])
    hidden = cfg["model"]["hidden"]

    def with_global(x):  # each cell's features next to the mean of all cells: the whole scene's look
        return torch.cat([x, x.mean(dim=1, keepdim=True).expand_as(x)], dim=-1)

    variants = {
        "as trained (MLP)": (lambda w: torch.nn.Sequential(torch.nn.Linear(w, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden)), None, 0.0, 0.0),
        "linear": (lambda w: torch.nn.Linear(w, hidden), None, 0.0, 0.0),
        "MLP, feature dropout 0.3, weight decay 0.05": (lambda w: torch.nn.Sequential(torch.nn.Dropout(0.3), torch.nn.Linear(w, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden)), None, 0.05, 0.0),
        "MLP on cell + scene mean": (lambda w: torch.nn.Sequential(torch.nn.Linear(2 * w, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden)), with_global, 0.0, 0.0),
    }
    results = {}
    for name, (make, transform, decay, _) in variants.items():
        row = train_and_score(cfg, names, train_feats, train_cells, pick, sets, make, t["aux_steps"], decay, transform)
        results[name] = row
        log(f"{name}: " + "; ".join(f"{k}: cells {c:.1%}, scenes {s:.1%}" for k, (c, s) in row.items()))
    print(json.dumps(results, indent=1))
    return 0


def train_and_score(cfg, names, feats, cells, pick, sets, make, steps, decay=0.0, prep=None) -> dict:
    """Trains a head (`make(width)`, on `prep(features)`) on the grounding loss alone; scores it on
    each of `sets`: (share of object cells right, share of scenes whose majority is right)."""
    import torch

    t = cfg["train"]
    proj = make(feats.shape[2])
    prep = prep or (lambda x: x)
    background = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW(list(proj.parameters()) + [background], lr=t["lr"], weight_decay=decay)
    rng = np.random.default_rng(cfg["seed"] + 1)
    categories = names.shape[0]

    def logits_of(x):
        unit = torch.nn.functional.normalize(proj(prep(x)), dim=-1)
        cos = unit @ names.T * t["aux_scale"]
        return torch.cat([cos, background.expand(*cos.shape[:2], 1)], dim=-1)

    for _ in range(steps):
        idx = pick[rng.integers(len(pick), size=t["aux_batch"])]
        logits = logits_of(feats[idx].float())
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), cells[idx].reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    proj.eval()
    row = {}
    with torch.no_grad():
        for label, (x, lab) in sets.items():
            pred = logits_of(x.float()).argmax(-1)
            obj = (lab >= 0) & (lab < categories)
            right, scored = 0, 0
            for s in range(len(x)):
                truth = lab[s][obj[s]]
                if truth.numel() == 0:
                    continue
                scored += 1
                votes = pred[s][obj[s]]
                votes = votes[votes < categories]
                right += int(len(votes) > 0 and int(torch.mode(votes).values) == int(truth[0]))
            row[label] = (float((pred[obj] == lab[obj]).float().mean()), right / max(1, scored))
    return row


def features_probe() -> int:
    import torch

    cache = default_cache()
    cfg = load_config(HERE.parent / "projector" / "train-v2.toml")
    t, categories = cfg["train"], [c["name"] for c in cfg["category"]]
    encoder = cache / "models" / cfg["model"]["encoder"]
    _, images, metas = compose_training(cfg, cache / "models" / "photos")
    log(f"encoding {len(images)} training scenes, every token")
    train_tokens = encode_tokens(images, encoder, t["threads"])
    del images
    probe_sets = {label: (encode_tokens(images, encoder, t["threads"]), scene_metas)
                  for label, (images, scene_metas) in probe_scenes(cfg, cache).items()}

    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(t["threads"])
    names = name_embeddings(cfg, cache, categories)
    hidden = cfg["model"]["hidden"]
    pick = np.arange(len(metas))
    results = {}
    train_sets = feature_sets(train_tokens)
    for variant, (feats, grid) in train_sets.items():
        cells = torch.from_numpy(cell_labels(metas, categories, grid)[0])
        sets = {}
        for label, (tokens, scene_metas) in probe_sets.items():
            x, _ = feature_sets(tokens)[variant]
            sets[label] = (torch.from_numpy(x), torch.from_numpy(cell_labels(scene_metas, categories, grid)[0]))
        mlp = lambda w: torch.nn.Sequential(torch.nn.Linear(w, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))  # noqa: E731
        row = train_and_score(cfg, names, torch.from_numpy(feats).half(), cells, pick, sets, mlp, t["aux_steps"])
        results[variant] = row
        log(f"{variant}: " + "; ".join(f"{k}: cells {c:.1%}, scenes {s:.1%}" for k, (c, s) in row.items()))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
