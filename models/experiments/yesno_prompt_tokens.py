#!/usr/bin/env python3
"""Do a few learned prompt tokens after the image tokens fix presence (yes/no) questions?

The shipped projector is kept frozen (models/README.md cites the numbers measured with run E's,
which was shipped then and had no adapter); only K image-independent tokens, appended after its 64 image
tokens (where a projector graph could emit them), are trained on yes/no questions about training
scenes, then scored on the held-out pairs that `train_projector.py` composes for its grounding check.
Needs the features `make projector` cached. Runs in the training venv, about 6 minutes on 2 cores:

    ~/.cache/scenecast/train-venv/bin/python models/experiments/yesno_prompt_tokens.py [K]
"""
import sys
import time

import numpy as np
import torch

from yesno import YesNo
from train_projector import YESNO, article

K = int(sys.argv[1]) if len(sys.argv) > 1 else 8
yn = YesNo()
cfg = yn.cfg
feats, metas = yn.cached_scenes()
project = yn.shipped_projector()

rng = np.random.default_rng(0)
prompt = torch.nn.Parameter(yn.text("Answer yes or no about the objects in the image.")[:K].clone())
train_idx = [i for i, m in enumerate(metas) if m["kind"] in ("single", "pair", "empty", "photo")]
check_idx = [i for i, m in enumerate(metas) if m["kind"] == "check"]
prefix = yn.text(cfg["model"]["prefix"])


def example(i: int, soft: bool) -> tuple[torch.Tensor, bool]:
    names = [o["name"] for o in metas[i]["objects"]]
    if names and rng.random() < 0.5:
        q, shown = names[rng.integers(len(names))], True
    else:
        q, shown = rng.choice([c for c in yn.categories if c not in names]), False
    question = YESNO[rng.integers(len(YESNO))].format(a=article(str(q)))
    with torch.no_grad():
        img = project(feats[i])
    suffix = yn.text(cfg["model"]["suffix"].format(question=question))
    return torch.cat([prefix, img, prompt, suffix] if soft else [prefix, img, suffix]), shown


def score(soft: bool) -> float:
    answers = [example(i, soft) for i in check_idx for _ in range(2)]
    return sum((yn.margin(x) > 0) == shown for x, shown in answers) / len(answers)


print(f"shipped projector, no prompt tokens: {score(False):.3f} on held-out pairs", flush=True)
opt = torch.optim.AdamW([prompt], lr=3e-3)
start = time.monotonic()
for step in range(150):
    seqs, shown = zip(*[example(int(i), True) for i in rng.choice(train_idx, 8)])
    loss = yn.step(list(seqs), list(shown), opt)
    if (step + 1) % 50 == 0:
        print(f"{K} prompt tokens, {step + 1} steps: loss {loss:.3f}, {score(True):.3f} on held-out pairs "
              f"({(time.monotonic() - start) / (step + 1):.1f} s/step)", flush=True)
