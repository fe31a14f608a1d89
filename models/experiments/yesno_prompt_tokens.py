#!/usr/bin/env python3
"""Do a few learned prompt tokens after the image tokens fix presence (yes/no) questions?

The shipped projector is kept frozen; only K image-independent tokens, appended after its 64 image
tokens (where a projector graph could emit them), are trained on yes/no questions about training
scenes, then scored on the held-out pairs that `train_projector.py` composes for its grounding check.
Needs the features `make projector` cached. Runs in the training venv, about 6 minutes on 2 cores:

    ~/.cache/scenecast/train-venv/bin/python models/experiments/yesno_prompt_tokens.py [K]
"""
import json
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
from fetch import default_cache  # noqa: E402
from train_projector import YESNO, article  # noqa: E402

K = int(sys.argv[1]) if len(sys.argv) > 1 else 8
cfg = tomllib.loads((HERE / "projector" / "train.toml").read_text())
cache = default_cache()
work = cache / "train" / cfg["name"]
feats_path = max(work.glob("features-*.npy"), key=lambda p: p.stat().st_mtime)
feats = torch.from_numpy(np.load(feats_path))
metas = json.loads(feats_path.with_name(feats_path.name.replace("features-", "meta-").replace(".npy", ".json")).read_text())
w = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy())
     for i in onnx.load(HERE / "projector" / cfg["output"]).graph.initializer}


def project(x):
    h = x @ w["w1"] + w["b1"]
    return torch.nn.functional.gelu(h) @ w["w2"] + w["b2"]


llm = cache / "models" / cfg["model"]["llm"]
torch.set_num_threads(2)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(llm.parent, gguf_file=llm.name, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(llm.parent, gguf_file=llm.name)
model.requires_grad_(False)
embed = model.get_input_embeddings()
cats = [c["name"] for c in cfg["category"]]
rng = np.random.default_rng(0)


def ids(s: str) -> list[int]:
    return tok(s, add_special_tokens=False).input_ids


YES, NO = ids("Yes.")[0], ids("No.")[0]
prompt = torch.nn.Parameter(embed(torch.tensor(ids("Answer yes or no about the objects in the image."))).detach()[:K].clone())
train_idx = [i for i, m in enumerate(metas) if m["kind"] in ("single", "pair", "empty", "photo")]
check_idx = [i for i, m in enumerate(metas) if m["kind"] == "check"]
prefix = embed(torch.tensor(ids(cfg["model"]["prefix"]))).detach()


def example(i: int, soft: bool) -> tuple[torch.Tensor, bool]:
    names = [o["name"] for o in metas[i]["objects"]]
    if names and rng.random() < 0.5:
        q, shown = names[rng.integers(len(names))], True
    else:
        q, shown = rng.choice([c for c in cats if c not in names]), False
    question = YESNO[rng.integers(len(YESNO))].format(a=article(str(q)))
    with torch.no_grad():
        img = project(feats[i])
    suffix = embed(torch.tensor(ids(cfg["model"]["suffix"].format(question=question)))).detach()
    return torch.cat([prefix, img, prompt, suffix] if soft else [prefix, img, suffix]), shown


def score(soft: bool) -> float:
    ok = 0
    with torch.no_grad():
        for i in check_idx:
            for _ in range(2):
                x, shown = example(i, soft)
                logits = model(inputs_embeds=x[None]).logits[0, -1]
                ok += bool(logits[YES] > logits[NO]) == shown
    return ok / (2 * len(check_idx))


print(f"shipped projector, no prompt tokens: {score(False):.3f} on held-out pairs", flush=True)
opt = torch.optim.AdamW([prompt], lr=3e-3)
start = time.monotonic()
for step in range(150):
    xs, ys = zip(*[example(int(i), True) for i in rng.choice(train_idx, 8)])
    x = torch.stack(xs) if len({len(e) for e in xs}) == 1 else None
    if x is None:
        length = max(len(e) for e in xs)
        x = torch.zeros(len(xs), length, embed.weight.shape[1])
        mask = torch.zeros(len(xs), length, dtype=torch.long)
        for r, e in enumerate(xs):
            x[r, :len(e)], mask[r, :len(e)] = e, 1
    else:
        mask = torch.ones(x.shape[:2], dtype=torch.long)
    states = model.model(inputs_embeds=x, attention_mask=mask).last_hidden_state
    last = states[torch.arange(len(xs)), mask.sum(1) - 1]
    loss = torch.nn.functional.cross_entropy(model.lm_head(last), torch.tensor([YES if y else NO for y in ys]))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if (step + 1) % 50 == 0:
        print(f"{K} prompt tokens, {step + 1} steps: loss {loss.item():.3f}, {score(True):.3f} on held-out pairs "
              f"({(time.monotonic() - start) / (step + 1):.1f} s/step)", flush=True)
