#!/usr/bin/env python3
"""Can the frozen SmolLM2-135M answer presence questions about a TEXT description of a scene?

The measurement behind models/README.md ("Why yes/no is hard here"): with a description such as
"There is a cat on the left and an apple on the right." and "Is there a dog in the image?", score
the LLM's first-token preference of "Yes" over "No" (AUC and accuracy on held-out category pairs),
then train only a 13-token soft prompt in front of the description and score again. Runs in the
training venv (`make train-venv`), about 5 minutes on 2 cores:

    ~/.cache/scenecast/train-venv/bin/python models/experiments/yesno_probe.py
"""
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
from fetch import default_cache  # noqa: E402

cfg = tomllib.loads((HERE / "projector" / "train.toml").read_text())
llm = default_cache() / "models" / cfg["model"]["llm"]
torch.set_num_threads(2)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(llm.parent, gguf_file=llm.name, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(llm.parent, gguf_file=llm.name)
model.requires_grad_(False)
embed = model.get_input_embeddings()
cats = [c["name"] for c in cfg["category"]]
held = {frozenset(p) for p in cfg["sets"]["heldout_pairs"]}
rng = np.random.default_rng(0)


def ids(s: str) -> list[int]:
    return tok(s, add_special_tokens=False).input_ids


def art(n: str) -> str:
    return ("an " if n[0] in "aeiou" else "a ") + n


YES, NO = ids("Yes.")[0], ids("No.")[0]
prompt = torch.nn.Parameter(embed(torch.tensor(ids("Answer the question about the image with yes or no."))).detach().clone())


def example(heldout: bool, soft: bool) -> tuple[torch.Tensor, bool]:
    while True:
        a, b = rng.choice(cats, 2, replace=False)
        if (frozenset((a, b)) in held) == heldout:
            break
    if rng.random() < 0.5:
        q, shown = (a if rng.random() < 0.5 else b), True
    else:
        q, shown = rng.choice([c for c in cats if c not in (a, b)]), False
    text = f"There is {art(a)} on the left and {art(b)} on the right.\nIs there {art(q)} in the image?"
    pre = embed(torch.tensor(ids(cfg["model"]["prefix"])))
    post = embed(torch.tensor(ids("\n" + cfg["model"]["suffix"].format(question=text).lstrip("\n"))))
    return torch.cat([pre, prompt, post] if soft else [pre, post]), shown


def score(soft: bool, n: int = 80) -> tuple[float, float]:
    margins = []
    with torch.no_grad():
        for _ in range(n):
            x, shown = example(True, soft)
            logits = model(inputs_embeds=x[None]).logits[0, -1]
            margins.append((float(logits[YES] - logits[NO]), shown))
    pos = [d for d, s in margins if s]
    neg = [d for d, s in margins if not s]
    auc = sum(p > q for p in pos for q in neg) / max(1, len(pos) * len(neg))
    return auc, sum((d > 0) == s for d, s in margins) / len(margins)


auc, acc = score(False)
print(f"frozen LLM, no prompt: AUC {auc:.2f}, accuracy {acc:.2f} (held-out pairs)")
opt = torch.optim.AdamW([prompt], lr=3e-3)
start = time.monotonic()
for step in range(100):
    xs, ys = zip(*[example(False, True) for _ in range(16)])
    length = max(len(x) for x in xs)
    x = torch.zeros(len(xs), length, embed.weight.shape[1])
    mask = torch.zeros(len(xs), length, dtype=torch.long)
    for i, e in enumerate(xs):
        x[i, :len(e)], mask[i, :len(e)] = e, 1
    states = model.model(inputs_embeds=x, attention_mask=mask).last_hidden_state
    last = states[torch.arange(len(xs)), mask.sum(1) - 1]
    loss = torch.nn.functional.cross_entropy(model.lm_head(last), torch.tensor([YES if y else NO for y in ys]))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if (step + 1) % 50 == 0:
        auc, acc = score(True)
        print(f"soft prompt, {step + 1} steps: AUC {auc:.2f}, accuracy {acc:.2f} (held-out pairs; "
              f"{(time.monotonic() - start) / (step + 1):.1f} s/step)", flush=True)
