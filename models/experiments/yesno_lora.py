#!/usr/bin/env python3
"""Does a LoRA adapter on the LLM (LLaVA's stage 2, cheaply) fix presence and position questions?

The shipped projector is kept frozen (models/README.md cites the numbers measured with run E's,
which was shipped then and had no adapter); rank-R adapters on the attention projections of every layer
are trained on yes/no and "where" questions about training scenes, then scored on the held-out
pairs that `train_projector.py` composes for its grounding check (yes/no by the first-token margin,
position by the greedy answer). Needs the features `make projector` cached. Runs in the training
venv, about 12 minutes on 2 cores for rank 8, lr 1e-3 and 100 steps of batch 8:

    ~/.cache/scenecast/train-venv/bin/python models/experiments/yesno_lora.py [RANK [LR [STEPS]]]
"""
import sys
import time

import numpy as np
import torch

from yesno import YesNo
from train_projector import POSITIONS, WHERE, YESNO, add_lora, article, pad

R = int(sys.argv[1]) if len(sys.argv) > 1 else 8
yn = YesNo()
cfg = yn.cfg
feats, metas = yn.cached_scenes()
project = yn.shipped_projector()

adapted = add_lora(yn.model, {"rank": R, "alpha": 2 * R, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]})
params = [p for m in adapted.values() for p in (m.a, m.b)]
print(f"LoRA rank {R}: {sum(p.numel() for p in params):,} parameters", flush=True)

rng = np.random.default_rng(0)
train_idx = [i for i, m in enumerate(metas) if m["kind"] in ("single", "pair", "empty", "photo")]
where_idx = [i for i in train_idx if metas[i]["kind"] in ("single", "pair")
             and len({o["name"] for o in metas[i]["objects"]}) == len(metas[i]["objects"])]
check_idx = [i for i, m in enumerate(metas) if m["kind"] == "check"]
prefix = yn.text(cfg["model"]["prefix"])
img_cache = {}


def image(i):
    if i not in img_cache:
        with torch.no_grad():
            img_cache[i] = project(feats[i])
    return img_cache[i]


def seq(i, question):
    return torch.cat([prefix, image(i), yn.text(cfg["model"]["suffix"].format(question=question))])


def yesno(i, rng):
    names = [o["name"] for o in metas[i]["objects"]]
    if names and rng.random() < 0.5:
        q, shown = names[rng.integers(len(names))], True
    else:
        q, shown = rng.choice([c for c in yn.categories if c not in names]), False
    return seq(i, YESNO[rng.integers(len(YESNO))].format(a=article(str(q)))), shown


def where(i, rng):
    o = metas[i]["objects"][rng.integers(len(metas[i]["objects"]))]
    return seq(i, WHERE[rng.integers(len(WHERE))].format(x=o["name"])), POSITIONS[o["position"]].capitalize() + "."


def step(examples, opt):
    """Cross-entropy on every answer token (teacher forcing)."""
    seqs, targets = [], []
    for x, answer in examples:
        a = yn.ids(answer) + yn.ids(cfg["model"]["end"])
        with torch.no_grad():
            seqs.append(torch.cat([x, yn.embed(torch.tensor(a))]))
        targets.append((len(x), a))
    x, mask = pad(seqs)
    logits = yn.model(inputs_embeds=x, attention_mask=mask).logits
    loss = 0
    for r, (start, a) in enumerate(targets):
        loss = loss + torch.nn.functional.cross_entropy(logits[r, start - 1:start - 1 + len(a)], torch.tensor(a))
    loss = loss / len(targets)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def greedy(x, n=6):
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(yn.model(inputs_embeds=x[None]).logits[0, -1].argmax())
            out.append(t)
            x = torch.cat([x, yn.embed(torch.tensor([t]))])
    return yn.tok.decode(out)


def score():
    fixed = np.random.default_rng(1)  # the same questions at every score
    yes = [yesno(i, fixed) for i in check_idx for _ in range(2)]
    pos = [where(i, fixed) for i in check_idx]
    yes_acc = sum((yn.margin(x) > 0) == shown for x, shown in yes) / len(yes)
    pos_acc = sum(greedy(x).strip().startswith(a[:-1]) for x, a in pos) / len(pos)
    return yes_acc, pos_acc, greedy(pos[0][0]), pos[0][1]


print("before: yes/no %.3f, position %.3f (%r for %r)" % score(), flush=True)
opt = torch.optim.AdamW(params, lr=float(sys.argv[2]) if len(sys.argv) > 2 else 1e-3)
start = time.monotonic()
for s in range(int(sys.argv[3]) if len(sys.argv) > 3 else 100):
    batch = []
    for _ in range(8):
        if rng.random() < 0.6:
            x, shown = yesno(int(rng.choice(train_idx)), rng)
            batch.append((x, "Yes." if shown else "No."))
        else:
            batch.append(where(int(rng.choice(where_idx)), rng))
    loss = step(batch, opt)
    if (s + 1) % 50 == 0:
        print(f"rank {R}, {s + 1} steps: loss {loss:.3f}, yes/no %.3f, position %.3f (%r for %r) "
              % score() + f"({(time.monotonic() - start) / (s + 1):.1f} s/step)", flush=True)
