#!/usr/bin/env python3
"""Writes the tiny generator test models and the sampler fixtures (run in the training venv:
`make generator-models`; the outputs are committed under models/generator/).

Real text-conditioned distilled diffusion weights (SD-Turbo) cannot be fetched on these machines.
These are RANDOMLY INITIALISED models with SD-Turbo's layout and ONNX interface (input/output names,
ranks, dtypes, the 8x VAE, 77-token CLIP context, 4 latent channels) but tiny widths, so the whole
pipeline (tokenizer, text encoder, UNet, sampler, VAE decoder, output projector) runs end to end in a
test. Their images are noise-like by construction; only shapes, determinism and plumbing are real.

The names are those of an Optimum export of stabilityai/sd-turbo (see models/generator/README.md):
  text_encoder/model.onnx  input_ids int32 [b, 77] -> last_hidden_state f32 [b, 77, d], pooler_output
  unet/model.onnx          sample f32 [b, 4, h, w], timestep i64 [b], encoder_hidden_states f32 [b, 77, d]
                           -> out_sample f32 [b, 4, h, w]
  vae_decoder/model.onnx   latent_sample f32 [b, 4, h, w] -> sample f32 [b, 3, 8h, 8w]
plus scenecast's output projector: signal_states f32 [n, n_embd] -> conditioning f32 [1, 77, d].

Fixtures (sampler.json) come from diffusers' own schedulers: EulerDiscreteScheduler with SD-Turbo's
configuration (trailing spacing) and LCMScheduler, their timesteps, sigmas and one update on fixed tensors.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parent / "generator"
SEED = 20261126
D = 32  # text width (SD-Turbo: 1024)
N_EMBD = 576  # SmolLM2-135M's width, for the output projector


def export(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], dynamic: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=dynamic,
                      opset_version=17, dynamo=False, do_constant_folding=True)
    print(f"wrote {path} ({path.stat().st_size} B)")


class TextEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids.long())
        return out.last_hidden_state, out.pooler_output


class Unet(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.model(sample, timestep, encoder_hidden_states).sample


class VaeDecoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, latent_sample):
        return self.model.decode(latent_sample).sample


class OutputProjector(torch.nn.Module):
    """GILL/NExT-GPT style, tiny: mean of the signal-token states -> 77 conditioning tokens."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(N_EMBD, D)
        self.queries = torch.nn.Parameter(torch.randn(77, D) * 0.1)

    def forward(self, signal_states):
        pooled = self.proj(signal_states).mean(dim=0, keepdim=True)  # [1, d]
        return (self.queries + pooled).unsqueeze(0)  # [1, 77, d]


def models() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=77, projection_dim=D,
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=D,
                                attention_head_dim=4, norm_num_groups=8).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                        block_out_channels=(8, 16, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).eval()
    outproj = OutputProjector().eval()
    ids = torch.full((1, 77), 49407, dtype=torch.int32)
    with torch.no_grad():
        export(TextEncoder(text), (ids,), OUT / "tiny/text_encoder/model.onnx", ["input_ids"],
               ["last_hidden_state", "pooler_output"], {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"},
                                                        "pooler_output": {0: "batch"}})
        lat = torch.zeros(1, 4, 8, 8)
        export(Unet(unet), (lat, torch.tensor([999], dtype=torch.int64), torch.zeros(1, 77, D)),
               OUT / "tiny/unet/model.onnx", ["sample", "timestep", "encoder_hidden_states"], ["out_sample"],
               {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
                "encoder_hidden_states": {0: "batch"}, "out_sample": {0: "batch", 2: "height", 3: "width"}})
        export(VaeDecoder(vae), (lat,), OUT / "tiny/vae_decoder/model.onnx", ["latent_sample"], ["sample"],
               {"latent_sample": {0: "batch", 2: "height", 3: "width"}, "sample": {0: "batch", 2: "h", 3: "w"}})
        export(outproj, (torch.zeros(4, N_EMBD),), OUT / "tiny/output_projector.onnx", ["signal_states"],
               ["conditioning"], {"signal_states": {0: "n"}})


def fixtures() -> None:
    from diffusers import EulerDiscreteScheduler, LCMScheduler

    # stabilityai/sd-turbo's scheduler_config.json (the fields that matter to the math).
    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="epsilon")
    rng = np.random.default_rng(SEED)
    sample = rng.standard_normal((1, 4, 2, 2)).astype(np.float32)
    model_out = rng.standard_normal((1, 4, 2, 2)).astype(np.float32)
    fx: dict = {"config": common, "sample": sample.ravel().tolist(), "model_output": model_out.ravel().tolist(),
                "shape": list(sample.shape), "euler": {}, "lcm": {}}
    for steps in (1, 2, 4):
        s = EulerDiscreteScheduler(**common, timestep_spacing="trailing")
        s.set_timesteps(steps)
        t0 = s.timesteps[0]
        scaled = s.scale_model_input(torch.from_numpy(sample), t0)
        out = s.step(torch.from_numpy(model_out), t0, torch.from_numpy(sample))
        fx["euler"][str(steps)] = {
            "timesteps": [float(t) for t in s.timesteps], "sigmas": [float(x) for x in s.sigmas],
            "init_noise_sigma": float(s.init_noise_sigma), "scaled_input": scaled.numpy().ravel().tolist(),
            "prev_sample": out.prev_sample.numpy().ravel().tolist(),
            "denoised": out.pred_original_sample.numpy().ravel().tolist()}
    for steps in (1, 2, 4):
        s = LCMScheduler(**common, original_inference_steps=50, timestep_scaling=10.0)
        s.set_timesteps(steps)
        t0 = s.timesteps[0]
        g = torch.Generator().manual_seed(7)
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(7))
        out = s.step(torch.from_numpy(model_out), t0, torch.from_numpy(sample), generator=g)
        fx["lcm"][str(steps)] = {
            "timesteps": [int(t) for t in s.timesteps], "init_noise_sigma": float(s.init_noise_sigma),
            "noise": noise.numpy().ravel().tolist(), "prev_sample": out.prev_sample.numpy().ravel().tolist(),
            "denoised": out.denoised.numpy().ravel().tolist()}
    path = OUT / "sampler.json"
    path.write_text(json.dumps(fx, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    what = sys.argv[1:] or ["models", "fixtures"]
    if "models" in what:
        models()
    if "fixtures" in what:
        fixtures()
