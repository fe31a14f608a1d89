#!/usr/bin/env python3
"""Can the frozen SmolLM2-135M answer presence questions about a TEXT description of a scene?

The measurement behind models/README.md ("Why yes/no is hard here"): with a description such as
"There is a cat on the left and an apple on the right." and "Is there a dog in the image?", score
the LLM's first-token preference of "Yes" over "No" (AUC and accuracy on held-out category pairs),
then train only a 13-token soft prompt in front of the description and score again. Runs in the
training venv (`make train-venv`), about 5 minutes on 2 cores:

    ~/.cache/scenecast/train-venv/bin/python models/experiments/yesno_probe.py
"""
import time

import numpy as np
import torch

from yesno import YesNo
from train_projector import article

yn = YesNo()
cats = yn.categories
held = {frozenset(p) for p in yn.cfg["sets"]["heldout_pairs"]}
rng = np.random.default_rng(0)
prompt = torch.nn.Parameter(yn.text("Answer the question about the image with yes or no.").clone())


def example(heldout: bool, soft: bool) -> tuple[torch.Tensor, bool]:
    while True:
        a, b = rng.choice(cats, 2, replace=False)
        if (frozenset((a, b)) in held) == heldout:
            break
    if rng.random() < 0.5:
        q, shown = (a if rng.random() < 0.5 else b), True
    else:
        q, shown = rng.choice([c for c in cats if c not in (a, b)]), False
    text = f"There is {article(a)} on the left and {article(b)} on the right.\nIs there {article(q)} in the image?"
    pre = yn.text(yn.cfg["model"]["prefix"])
    post = yn.text(yn.cfg["model"]["suffix"].format(question=text))
    return torch.cat([pre, prompt, post] if soft else [pre, post]), shown


def score(soft: bool, n: int = 80) -> tuple[float, float]:
    margins = [(yn.margin(x), shown) for x, shown in (example(True, soft) for _ in range(n))]
    pos = [d for d, s in margins if s]
    neg = [d for d, s in margins if not s]
    auc = sum(p > q for p in pos for q in neg) / max(1, len(pos) * len(neg))
    return auc, sum((d > 0) == s for d, s in margins) / len(margins)


auc, acc = score(False)
print(f"frozen LLM, no prompt: AUC {auc:.2f}, accuracy {acc:.2f} (held-out pairs)")
opt = torch.optim.AdamW([prompt], lr=3e-3)
start = time.monotonic()
for step in range(100):
    seqs, shown = zip(*[example(False, True) for _ in range(16)])
    yn.step(list(seqs), list(shown), opt)
    if (step + 1) % 50 == 0:
        auc, acc = score(True)
        print(f"soft prompt, {step + 1} steps: AUC {auc:.2f}, accuracy {acc:.2f} (held-out pairs; "
              f"{(time.monotonic() - start) / (step + 1):.1f} s/step)", flush=True)
