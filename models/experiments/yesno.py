"""What the yes/no experiments share: the frozen LLM of the training configuration, the cached
training scenes and the shipped projector, and one training step and one score on the LLM's
first-token preference of "Yes." over "No."."""
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

MODELS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(MODELS))
from fetch import default_cache  # noqa: E402
from train_projector import data_paths, load_config, load_frozen_llm, pad  # noqa: E402


class YesNo:
    def __init__(self):
        self.cfg = load_config(MODELS / "projector" / "train-v3.toml")
        self.cache = default_cache()
        torch.set_num_threads(2)
        torch.manual_seed(0)
        self.model, self.tok = load_frozen_llm(self.cache / "models" / self.cfg["model"]["llm"])
        self.embed = self.model.get_input_embeddings()
        self.categories = [c["name"] for c in self.cfg["category"]]
        self.yes, self.no = self.ids("Yes.")[0], self.ids("No.")[0]

    def cached_scenes(self) -> tuple[torch.Tensor, list[dict]]:
        """The pooled encoder features and scene descriptions `make projector` cached for the
        training configuration (training scenes and the held-out "check" pairs)."""
        feats_path, meta_path = data_paths(self.cfg, self.cache / "train" / self.cfg["name"], None)
        if not (feats_path.is_file() and meta_path.is_file()):
            raise SystemExit(f"error: no cached features for this training configuration ({feats_path}); "
                             "run `make projector` first")
        return torch.from_numpy(np.load(feats_path)), json.loads(meta_path.read_text())

    def shipped_projector(self):
        """The shipped projector (models/projector/, make_projector.graph_from's graph) as a frozen
        torch function of pooled features."""
        w = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy())
             for i in onnx.load(MODELS / "projector" / self.cfg["output"]).graph.initializer}

        def project(x: torch.Tensor) -> torch.Tensor:
            h = x @ w["w1"] + w["b1"]
            return torch.nn.functional.gelu(h) @ w["w2"] + w["b2"]
        return project

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def text(self, text: str) -> torch.Tensor:
        """`text` as frozen input embeddings [tokens, width]."""
        with torch.no_grad():
            return self.embed(torch.tensor(self.ids(text)))

    def margin(self, x: torch.Tensor) -> float:
        """The logit of "Yes." minus that of "No." after one embedded sequence [tokens, width]."""
        with torch.no_grad():
            logits = self.model(inputs_embeds=x[None]).logits[0, -1]
        return float(logits[self.yes] - logits[self.no])

    def step(self, seqs: list[torch.Tensor], shown: list[bool], opt: torch.optim.Optimizer) -> float:
        """One optimiser step on the answers "Yes." (shown) / "No." at the end of each sequence."""
        x, mask = pad(seqs)
        states = self.model.model(inputs_embeds=x, attention_mask=mask).last_hidden_state
        last = states[torch.arange(len(seqs)), mask.sum(1) - 1]
        target = torch.tensor([self.yes if s else self.no for s in shown])
        loss = torch.nn.functional.cross_entropy(self.model.lm_head(last), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()
