#!/usr/bin/env python3
"""A tiny, RANDOMLY INITIALISED vision-language model of SmolVLM's exact architecture (Idefics3:
SigLIP vision tower + pixel-shuffle connector + a Llama text model with SmolLM2's tokenizer), in the
layout a user downloads: the vision encoder and connector as one ONNX (SmolVLM's published
`vision_encoder.onnx` names: `pixel_values`, `pixel_attention_mask` -> `image_features`) and the text
model as a GGUF made by llama.cpp's own converter (`convert_hf_to_gguf.py`). It knows nothing; it
exists to prove that scenecast runs such a stack exactly as `transformers` does: the same greedy
tokens for the same photo and prompt (tests/tiny_vlm.rs).

Every fact that makes the layout SmolVLM's comes from SmolVLM-256M-Instruct's published files
(models/tiny-vlm/README.md lists where): 512 x 512 images, patch 16, scale factor 4 (64 image
tokens), mean/std 0.5, rescale 1/255, Lanczos resampling, no image splitting for the global image,
`<fake_token_around_image><global-img>` + 64 x `<image>` + `<fake_token_around_image>` inside
`<|im_start|>User:...<end_of_utterance>\\nAssistant:`. The widths and depths are tiny (the real
model: vision 768 x 12 layers, text 576 x 30 layers) so the files stay small enough to commit.

Usage (in the training venv, `make tiny-vlm`):
    python models/make_tiny_vlm.py --cache ~/.cache/scenecast --llama-cpp DIR --out models/tiny-vlm

DIR is llama.cpp's source tree as the `llama-cpp-python` sdist vendors it (`vendor/llama.cpp`),
which has `convert_hf_to_gguf.py` and `gguf-py`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SEED = 20261201
# SmolVLM-256M-Instruct's image layout (preprocessor_config.json, config.json, processor_config.json).
IMAGE_SIZE = 512
PATCH = 16
SCALE_FACTOR = 4
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH) ** 2 // SCALE_FACTOR**2  # 64
MEAN = STD = [0.5, 0.5, 0.5]
# The tokens SmolVLM adds to SmolLM2's vocabulary for images and turns (tokenizer_config.json).
ADDED = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)
]
# chat_template.json of SmolVLM-256M-Instruct.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
QUESTION = "Describe what you see in one sentence."
NEW_TOKENS = 24
# Gain of the text model's random weights (see build_model).
GAIN = 2.0


def log(msg: str) -> None:
    print(msg, flush=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_tokenizer(gguf: Path):
    """SmolLM2's tokenizer, read from its GGUF by transformers, plus SmolVLM's added tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.add_special_tokens({"additional_special_tokens": ADDED})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(tok):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    torch.manual_seed(SEED)
    config = Idefics3Config(
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": IMAGE_SIZE, "patch_size": PATCH, "num_channels": 3,
        },
        text_config={
            # As SmolVLM's config.json: llama.cpp's converter routes its text model by this name.
            "model_type": "llama", "architectures": ["VLlama3ForCausalLM"], "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": len(tok),
            "max_position_embeddings": 2048, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        },
        scale_factor=SCALE_FACTOR,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=True,
    )
    model = Idefics3ForConditionalGeneration(config).eval()
    # The default initialisation (std 0.02) leaves a tiny random text model an identity: its hidden
    # state stays the input embedding, so it repeats the last prompt token whatever the image. With
    # variance-preserving weights (std 1/sqrt(fan-in)) and unit embeddings it is a random function
    # of the whole sequence, image tokens included, with clear margins between greedy choices.
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.model.text_model.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                std = 1.0 if "embed_tokens" in name else GAIN / p.shape[1] ** 0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        conn = model.model.connector.modality_projection.proj.weight
        conn.copy_(torch.randn(conn.shape, generator=gen) / conn.shape[1] ** 0.5)
    return model


class VisionEncoder(torch.nn.Module):
    """SigLIP + connector, as SmolVLM's `vision_encoder.onnx`: [batch, images, 3, H, W] pixels and
    their [batch, images, H, W] mask in, [batch * images, 64, text width] image features out.

    Written out so that torch's exporter can trace it: Idefics3's embeddings bucketise patch
    coordinates per image to support padded images, which does not export. For whole images (the
    mask all true, as scenecast sends them) the positions are 0..1023 and this computes exactly
    what `Idefics3Model.get_image_features` does (checked in main); a padded image's patches are
    still masked out of attention, but its positions are not re-bucketised. (The published export
    also drops all-zero padding images; scenecast never sends any.)"""

    def __init__(self, model):
        super().__init__()
        self.vision = model.model.vision_model
        self.connector = model.model.connector

    def forward(self, pixel_values, pixel_attention_mask):
        b, n, c, h, w = pixel_values.shape
        pixels = pixel_values.reshape(b * n, c, h, w)
        mask = pixel_attention_mask.reshape(b * n, h, w)
        # A patch takes part when any of its pixels is real (Idefics3's unfold, as a reshape).
        side = IMAGE_SIZE // PATCH
        patch_mask = mask.to(torch.int32).reshape(b * n, side, PATCH, side, PATCH).sum(dim=(2, 4)) > 0
        emb = self.vision.embeddings
        x = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)
        x = x + emb.position_embedding.weight[: side * side].unsqueeze(0)
        keep = patch_mask.reshape(b * n, 1, 1, side * side)
        bias = torch.where(keep, 0.0, torch.finfo(x.dtype).min).to(x.dtype)
        for layer in self.vision.encoder.layers:
            x = layer(x, attention_mask=bias)
            x = x[0] if isinstance(x, tuple) else x
        return self.connector(self.vision.post_layernorm(x))


def processor_for(tok):
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    images = Idefics3ImageProcessorPil(
        do_convert_rgb=True, do_resize=True, size={"longest_edge": 4 * IMAGE_SIZE}, resample=Image.LANCZOS,
        do_image_splitting=False, max_image_size={"longest_edge": IMAGE_SIZE}, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=MEAN, image_std=STD, do_pad=True,
    )
    return Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=IMAGE_SEQ_LEN,
                             chat_template=CHAT_TEMPLATE)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, required=True, help="scenecast's cache (models/ inside)")
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree (vendor/llama.cpp)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    models = args.cache / "models"
    gguf = models / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    photo = models / "photos" / "astronaut.png"  # 512 x 512: no resize on either side
    args.out.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer(gguf)
    model = build_model(tok)
    proc = processor_for(tok)
    image = Image.open(photo).convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        raise SystemExit(f"error: {photo} is {image.size}, expected {IMAGE_SIZE} x {IMAGE_SIZE}")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    # do_resize=False: the photo is already 512 x 512, so neither side resamples it (scenecast
    # resizes with a bilinear filter, transformers with Lanczos via a 2048 upscale: equal only for
    # images of the model's size, so parity is checked there).
    inputs = proc(text=prompt, images=[[image]], return_tensors="pt", do_resize=False)

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    log(f"transformers greedy: {new}\n  {tok.decode(new)!r}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # The vision encoder + connector as ONNX, in the published export's names.
        enc = VisionEncoder(model).eval()
        onnx_path = args.out / "vision_encoder.onnx"
        mask = inputs["pixel_attention_mask"].to(torch.bool)  # the published export takes bool
        torch.onnx.export(
            enc, (inputs["pixel_values"], mask), str(onnx_path),
            input_names=["pixel_values", "pixel_attention_mask"], output_names=["image_features"],
            dynamic_axes={"pixel_values": {0: "batch", 1: "images"}, "pixel_attention_mask": {0: "batch", 1: "images"},
                          "image_features": {0: "images"}},
            opset_version=17, dynamo=False,
        )
        import onnxruntime as ort

        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"pixel_values": inputs["pixel_values"].numpy(),
                              "pixel_attention_mask": mask.numpy()})[0]
        with torch.no_grad():
            want = model.model.get_image_features(inputs["pixel_values"], mask).pooler_output[0].numpy()[None]
        diff = float(np.abs(got - want).max())
        log(f"vision_encoder.onnx vs torch: max abs diff {diff:.2e}, shape {list(got.shape)}")
        if diff > 1e-4:
            raise SystemExit("error: the ONNX export differs from torch")

        # The whole model in Hugging Face's layout, then llama.cpp's converter (text model -> GGUF).
        hf = tmp / "hf"
        model.save_pretrained(hf, safe_serialization=True)
        proc.save_pretrained(hf)
        text_gguf = args.out / "text-f32.gguf"
        subprocess.run([sys.executable, str(args.llama_cpp / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f32",
                        "--outfile", str(text_gguf)], check=True,
                       env={"PYTHONPATH": str(args.llama_cpp / "gguf-py"), "PATH": "/usr/bin:/bin"})

    reference = {
        "note": "RANDOM WEIGHTS: a tiny model of SmolVLM's architecture, made by models/make_tiny_vlm.py",
        "photo": "photos/astronaut.png",
        "question": QUESTION,
        "prompt": prompt,
        "input_ids": inputs["input_ids"][0].tolist(),
        "tokens": new,
        "text": tok.decode(new),
        "onnx_max_abs_diff": diff,
        "files": {p.name: sha256(p) for p in (args.out / "vision_encoder.onnx", args.out / "text-f32.gguf")},
    }
    (args.out / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")
    for name, digest in reference["files"].items():
        log(f"{name}: {(args.out / name).stat().st_size} bytes, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
