#!/usr/bin/env python3
"""Trains scenecast's generator: a small text-conditioned diffusion model, distilled to 1-2 steps,
exported in SD-Turbo's ONNX layout (text encoder, UNet, decoder) so the runtime that loads a real
SD-Turbo export loads this one. `make generator` (about 55 min on 2 cores); models/generator/README.md.

    python models/train_generator.py                    # data, teacher, pairs, student, export
    python models/train_generator.py --bench            # steps/s of this configuration, then stop

The recipe (models/generator/train.toml holds every number):
  1. compose scenes the way the input projector's are (its categories, real photos and cut-outs; the
     projector's held-out exemplars and held-out category pairs never appear), downscale to 64 x 64,
     caption them ("a dog on the left and a cup on the right");
  2. train the teacher by rectified flow (z = (1-s)x + s n, the loss on v = n - x, which the UNet
     predicts or derives from its clean image, `[model] predicts`; logit-normal s, `[train] shift`) in
     pixel space: the "latent" is the image pixel-unshuffled to 12 x 32 x 32, so the decoder is an
     exact pixel shuffle. A UNet with self- and cross-attention at 16 and 8 pixels reads the text
     encoder's token sequence (never only its mean: left and right must survive); 10 % empty captions for
     classifier-free guidance;
  3. sample noise -> image pairs from the guided teacher (12 Euler steps, guidance 3);
  4. distil a student (initialised from the teacher) to the runtime's trailing Euler timesteps for
     one step (t = 999) and two (999, 499), guidance baked in: the runtime runs it at guidance 0;
  5. export ONNX: the UNet graph takes SD's VP inputs (x_t scaled by the Euler sampler, integer
     timestep), converts them to this model's flow time inside, and returns epsilon, so diffusers'
     Euler and LCM steps give the model's own clean estimate; check each graph against torch.
Each stage is cached under $SCENECAST_CACHE/train/<name>/, so a rerun skips what is done.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fetch import default_cache, log  # noqa: E402
import train_projector as tp  # noqa: E402  (the scene composer and its configuration)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

BOS, EOS = 49406, 49407
DATA_VERSION = 1


def load_config(path: Path) -> tuple[dict, dict]:
    """train.toml (with `extends`, as the projector's configurations) and the composer's
    configuration it names, with the object sizes and edge cuts of train.toml's [data] in place of
    the projector's."""
    cfg = tp.read_config(path)
    if cfg["model"]["pad_token"] != EOS:
        raise SystemExit(f"error: {path}: model.pad_token must be CLIP's end of text ({EOS}); the text encoder pads with it")
    scenes = tp.load_config((path.parent / cfg["scenes"]).resolve())
    for key in ("single_scale", "pair_scale", "edge_cut"):
        scenes["data"][key] = cfg["data"][key]
    return cfg, scenes


class Composer(tp.Composer):
    """The projector's composer with calmer backgrounds: a 64-pixel model spends its few
    parameters on the objects, not on gravel and noise. Plain colours, gradients, and photo
    crops blurred to their large shapes, in the shares of [data] backgrounds."""

    def __init__(self, cfg: dict, scenes: dict, photos: Path, rng: np.random.Generator):
        super().__init__(scenes, photos, rng)
        self.shares = cfg["data"]["backgrounds"]

    def background(self) -> Image.Image:
        from PIL import ImageFilter
        r = self.rng.random()
        plain, gradient = self.shares["plain"], self.shares["gradient"]
        size = tp.SIZE
        if r < plain:
            return Image.new("RGB", (size, size), tuple(int(v) for v in self.rng.integers(0, 256, 3)))
        if r < plain + gradient:
            a, b = self.rng.integers(0, 256, (2, 3)).astype(np.float32)
            t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
            grad = np.broadcast_to(a + (b - a) * t, (size, size, 3))
            if self.rng.random() < 0.5:
                grad = grad.transpose(1, 0, 2)
            return Image.fromarray(np.ascontiguousarray(grad).astype(np.uint8))
        while True:  # a photo crop (the projector's kinds), blurred
            img = super().background()
            if len(np.unique(np.asarray(img)[::16, ::16].reshape(-1, 3), axis=0)) > 8:
                return img.filter(ImageFilter.GaussianBlur(self.shares["photo_blur"]))


def alphas_cumprod(s: dict) -> np.ndarray:
    """SD's "scaled_linear" schedule, as src/generate/diffusion.rs computes it."""
    betas = np.linspace(math.sqrt(s["beta_start"]), math.sqrt(s["beta_end"]), s["num_train_timesteps"]) ** 2
    return np.cumprod(1.0 - betas)


def flow_time(ac: np.ndarray, t: int) -> float:
    """The flow time s of the runtime's timestep t: VP x = a x0 + b n is (a+b) times the flow's
    z = (1-s) x0 + s n with s = b/(a+b)."""
    a, b = math.sqrt(ac[t]), math.sqrt(1 - ac[t])
    return b / (a + b)


def trailing(n: int, steps: int) -> list[int]:
    """diffusers' trailing timesteps (the runtime's Euler)."""
    ratio = n / steps
    return [min(n - 1, max(0, round(n - i * ratio) - 1)) for i in range(steps)]


# ---------------------------------------------------------------------------------------------
# Data


def captions_for(meta: dict, cfg: dict, rng: np.random.Generator) -> tuple[str, str]:
    """The caption of a scene and of its mirror image (left and right swapped)."""
    objs = meta["objects"]
    art = tp.article
    if meta["kind"] == "photo":
        c = f"a photo of {art(objs[0]['name'])}"
        return c, c
    if len(objs) == 1:
        o = objs[0]
        if rng.random() < cfg["data"]["unplaced"]:
            return art(o["name"]), art(o["name"])
        mirror = {"left": "right", "right": "left", "centre": "centre"}
        return (f"{art(o['name'])} {tp.POSITIONS[o['position']]}",
                f"{art(o['name'])} {tp.POSITIONS[mirror[o['position']]]}")
    a, b = objs[0]["name"], objs[1]["name"]
    if a == b:
        c = f"two {a}s, one on the left and one on the right"
        return c, c
    return (f"{art(a)} on the left and {art(b)} on the right", f"{art(b)} on the left and {art(a)} on the right")


def build_data(cfg: dict, scenes: dict, cache: Path, work: Path) -> tuple[np.ndarray, list[list[str]]]:
    d = cfg["data"]
    key = hashlib.sha256(json.dumps([DATA_VERSION, cfg["seed"], d, cfg["image"], scenes["category"], scenes["sets"]],
                                    sort_keys=True).encode()).hexdigest()[:16]
    images_path, caps_path = work / f"images-{key}.npy", work / f"captions-{key}.json"
    if images_path.is_file() and caps_path.is_file():
        log(f"[1/5] scenes cached: {images_path}")
        return np.load(images_path), json.loads(caps_path.read_text())
    rng = np.random.default_rng(cfg["seed"])
    comp = Composer(cfg, scenes, cache / "models" / "photos", rng)
    size = cfg["image"]["size"]
    total = d["single"] + d["pair"] + d["photo"]
    log(f"[1/5] composing {total} training scenes at {size} x {size}")
    images = np.zeros((total, size, size, 3), np.uint8)
    caps = []
    start = time.time()
    kinds = ["single"] * d["single"] + ["pair"] * d["pair"] + ["photo"] * d["photo"]
    for i, kind in enumerate(kinds):
        if kind == "single":
            img, m = comp.single()
        elif kind == "pair":
            img, m = comp.pair(comp.train_pairs, "pair")
        else:
            img, m = comp.photo()
        images[i] = np.asarray(img.resize((size, size), Image.LANCZOS))
        caps.append(list(captions_for(m, cfg, rng)))
        if (i + 1) % 2000 == 0:
            log(f"    {i + 1}/{total} ({time.time() - start:.0f} s)")
    np.save(images_path, images)
    caps_path.write_text(json.dumps(caps))
    return images, caps


class Tokens:
    """CLIP BPE ids (the generator's tokenizer.json, as the runtime tokenizes) padded to the
    context, and the compact vocabulary: the ids the training captions use, the rest one row."""

    def __init__(self, tokenizer: Path, context: int, pad: int):
        from tokenizers import Tokenizer
        self.tok = Tokenizer.from_file(str(tokenizer))
        self.context, self.pad = context, pad

    def ids(self, text: str) -> list[int]:
        ids = self.tok.encode(text).ids
        if len(ids) > self.context:
            ids = ids[: self.context - 1] + [ids[-1]]
        return ids + [self.pad] * (self.context - len(ids))

    @staticmethod
    def remap(used: set[int]) -> np.ndarray:
        """49408 -> compact index; unused ids share the last row."""
        used = sorted(used)
        table = np.full(49408, len(used), np.int64)
        table[used] = np.arange(len(used))
        return table


# ---------------------------------------------------------------------------------------------
# Models


def attention(q, k, v, heads: int):
    b, n, c = q.shape
    m = k.shape[1]
    q = q.reshape(b, n, heads, c // heads).transpose(1, 2)
    k = k.reshape(b, m, heads, c // heads).transpose(1, 2)
    v = v.reshape(b, m, heads, c // heads).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // heads), dim=-1)
    return (w @ v).transpose(1, 2).reshape(b, n, c)


class TextEncoder(nn.Module):
    """CLIP ids -> [b, context, width]: compact embedding + positions, pre-norm transformer layers."""

    def __init__(self, remap: np.ndarray, width: int, layers: int, heads: int, context: int):
        super().__init__()
        self.register_buffer("remap", torch.from_numpy(remap))
        self.emb = nn.Embedding(int(remap.max()) + 1, width)
        self.pos = nn.Parameter(torch.randn(context, width) * 0.02)
        self.heads = heads
        self.layers = nn.ModuleList(
            nn.ModuleDict({"n1": nn.LayerNorm(width), "qkv": nn.Linear(width, 3 * width), "o": nn.Linear(width, width),
                           "n2": nn.LayerNorm(width), "ff": nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                                                          nn.Linear(4 * width, width))})
            for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, ids):
        # Ids outside the training vocabulary (a caption's "there is", its full stop) are dropped and
        # the rest moved up, so the encoder reads the words it knows at the positions it learned;
        # the freed tail is padding (EOS, as the tokenizer pads).
        idx = self.remap[ids.long()].long()
        n, unk = idx.shape[1], self.emb.num_embeddings - 1
        keep = idx < unk
        order = torch.argsort((~keep).long() * n + torch.arange(n)[None], dim=1)
        idx = torch.where(torch.arange(n)[None] < keep.long().sum(1, keepdim=True), torch.gather(idx, 1, order),
                          self.remap[EOS].long())
        x = self.emb(idx) + self.pos
        for layer in self.layers:
            q, k, v = layer["qkv"](layer["n1"](x)).chunk(3, dim=-1)
            x = x + layer["o"](attention(q, k, v, self.heads))
            x = x + layer["ff"](layer["n2"](x))
        return self.norm(x)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.t = nn.Linear(tdim, cout)
        self.n2, self.c2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, t):
        h = self.c1(F.silu(self.n1(x))) + self.t(t)[:, :, None, None]
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class AttnBlock(nn.Module):
    """Self-attention over the pixels, cross-attention to the text tokens, a feed-forward layer."""

    def __init__(self, c: int, ctx: int, heads: int):
        super().__init__()
        self.heads = heads
        self.n0 = nn.GroupNorm(8, c)
        self.n1, self.qkv, self.o1 = nn.LayerNorm(c), nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.n2, self.q, self.kv, self.o2 = nn.LayerNorm(c), nn.Linear(c, c), nn.Linear(ctx, 2 * c), nn.Linear(c, c)
        self.n3, self.ff = nn.LayerNorm(c), nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))

    def forward(self, x, ctx):
        b, c, h, w = x.shape
        y = self.n0(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(self.n1(y)).chunk(3, dim=-1)
        y = y + self.o1(attention(q, k, v, self.heads))
        k, v = self.kv(ctx).chunk(2, dim=-1)
        y = y + self.o2(attention(self.q(self.n2(y)), k, v, self.heads))
        y = y + self.ff(self.n3(y))
        return x + y.transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
    """The rectified flow's denoiser at flow time s in [0, 1]: its output is the velocity or the
    clean image (Model.predicts). With `pooled`, the text tokens' mean joins the time embedding
    too (every ResBlock reads it), as SDXL adds its pooled text embedding: the prompt reaches
    every resolution, and the cross-attention still tells left from right."""

    def __init__(self, cin: int, channels: list[int], ctx: int, heads: int, tdim: int, pooled: bool = False):
        super().__init__()
        c0, c1, c2 = channels
        self.tfreq = 64
        self.temb = nn.Sequential(nn.Linear(self.tfreq, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.pool = nn.Sequential(nn.Linear(ctx, tdim), nn.SiLU(), nn.Linear(tdim, tdim)) if pooled else None
        self.inp = nn.Conv2d(cin, c0, 3, padding=1)
        self.d0 = ResBlock(c0, c0, tdim)
        self.down0 = nn.Conv2d(c0, c0, 3, stride=2, padding=1)
        self.d1, self.a1 = ResBlock(c0, c1, tdim), AttnBlock(c1, ctx, heads)
        self.down1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        self.d2, self.a2 = ResBlock(c1, c2, tdim), AttnBlock(c2, ctx, heads)
        self.m1, self.ma, self.m2 = ResBlock(c2, c2, tdim), AttnBlock(c2, ctx, heads), ResBlock(c2, c2, tdim)
        self.u2, self.ua2 = ResBlock(2 * c2, c2, tdim), AttnBlock(c2, ctx, heads)
        self.up2 = nn.Conv2d(c2, c1, 3, padding=1)
        self.u1, self.ua1 = ResBlock(2 * c1, c1, tdim), AttnBlock(c1, ctx, heads)
        self.up1 = nn.Conv2d(c1, c0, 3, padding=1)
        self.u0 = ResBlock(2 * c0, c0, tdim)
        self.out = nn.Sequential(nn.GroupNorm(8, c0), nn.SiLU(), nn.Conv2d(c0, cin, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, z, s, ctx):
        half = self.tfreq // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        arg = (s * 1000.0)[:, None] * freqs[None]
        t = self.temb(torch.cat([torch.cos(arg), torch.sin(arg)], dim=1))
        if getattr(self, "pool", None) is not None:
            t = t + self.pool(ctx.mean(dim=1))
        h0 = self.d0(self.inp(z), t)
        h1 = self.a1(self.d1(self.down0(h0), t), ctx)
        h2 = self.a2(self.d2(self.down1(h1), t), ctx)
        m = self.m2(self.ma(self.m1(h2, t), ctx), t)
        u = self.ua2(self.u2(torch.cat([m, h2], 1), t), ctx)
        u = self.up2(F.interpolate(u, scale_factor=2.0, mode="nearest"))
        u = self.ua1(self.u1(torch.cat([u, h1], 1), t), ctx)
        u = self.up1(F.interpolate(u, scale_factor=2.0, mode="nearest"))
        return self.out(self.u0(torch.cat([u, h0], 1), t))


class Model(nn.Module):
    def __init__(self, cfg: dict, remap: np.ndarray):
        super().__init__()
        m, r = cfg["model"], cfg["image"]["unshuffle"]
        self.text = TextEncoder(remap, m["text_width"], m["text_layers"], m["heads"], m["context_tokens"])
        self.unet = UNet(3 * r * r, m["channels"], m["text_width"], m["heads"], m["time_dim"], m.get("pooled", False))
        # "v": the UNet's output is the velocity n - x; "x0": the clean image (JiT's x-prediction:
        # a pixel-unshuffled patch has more values than the narrowest layer has channels, so
        # predicting the noise in it would have to pass full-rank noise through that layer).
        self.predicts = m.get("predicts", "v")


# Flow times below this divide the velocity of an x-predicting model (v = (z - x)/s) by no less.
S_MIN = 0.05


def velocity(model: Model, z, s, ctx):
    """The flow's velocity n - x at z, s (s: [b]) with text context ctx, whatever the UNet predicts."""
    out = model.unet(z, s, ctx)
    if getattr(model, "predicts", "v") == "x0":
        return (z - out) / s.clamp(min=S_MIN)[:, None, None, None]
    return out


def to_latent(images: torch.Tensor, r: int) -> torch.Tensor:
    """uint8 [b, h, w, 3] -> [-1, 1] pixel-unshuffled [b, 3 r r, h/r, w/r]."""
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return F.pixel_unshuffle(x, r)


def from_latent(z: torch.Tensor, r: int) -> np.ndarray:
    x = F.pixel_shuffle(z, r).clamp(-1, 1)
    return ((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def shifted(u, shift: float):
    """SD3's time shift: more of the flow's time at high noise, where the prompt decides the
    picture. A pixel-unshuffled image stays visible under much noise (the noise averages out over
    an object's many pixels), so at shift 1 most training steps are spent where the caption no
    longer matters. (It did not make scenegen-v2 read its caption: models/generator/README.md.)"""
    return shift * u / (1 + (shift - 1) * u)


@torch.no_grad()
def sample_teacher(model: Model, noise, ids, uncond, steps: int, guidance: float, shift: float = 1.0):
    """Euler on the rectified flow from s = 1 to 0 (the time grid shifted as in training),
    classifier-free guided."""
    ctx = model.text(ids)
    ctx_u = model.text(uncond.expand(ids.shape[0], -1))
    z = noise
    for i in range(steps):
        s, s_next = shifted(1.0 - i / steps, shift), shifted(1.0 - (i + 1) / steps, shift)
        sv = torch.full((z.shape[0],), s)
        v = velocity(model, torch.cat([z, z]), torch.cat([sv, sv]), torch.cat([ctx_u, ctx]))
        vu, vc = v.chunk(2)
        z = z + (s_next - s) * (vu + guidance * (vc - vu))
    return z


# ---------------------------------------------------------------------------------------------
# Training


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_teacher(cfg: dict, model: Model, images: torch.Tensor, ids: torch.Tensor, uncond: torch.Tensor,
                  work: Path, steps: int | None = None) -> Model:
    """Rectified flow on the uint8 images [n, h, w, 3] (made latents a batch at a time: at 128
    pixels the whole set in float32 would take 4 GB), half of them mirrored with their mirrored
    caption. The loss is on the velocity whatever the UNet predicts."""
    t = cfg["train"]
    steps = steps or t["steps"]
    gen = torch.Generator().manual_seed(cfg["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    ema = copy.deepcopy(model).eval()
    n, r = images.shape[0], cfg["image"]["unshuffle"]
    # How much the caption helps: the clean image's error at high noise (s = 0.98 and 0.9) on a fixed
    # batch with the right captions, minus with the empty one (negative: the caption helps). The
    # probes (experiments/caption_use_probe.py) show it sooner and steadier at 0.9 than at 0.98.
    probe = torch.randint(0, n, (32,), generator=torch.Generator().manual_seed(cfg["seed"] + 3))
    probe_x = to_latent(images[probe], r)
    probe_n = torch.randn(probe_x.shape, generator=torch.Generator().manual_seed(cfg["seed"] + 4))

    @torch.no_grad()
    def caption_gain(m: Model, level: float) -> float:
        sv = torch.full((32,), level)
        zv = (1 - level) * probe_x + level * probe_n
        err = [F.mse_loss(zv - level * velocity(m, zv, sv, m.text(c)), probe_x).item()
               for c in (ids[probe, 0], uncond.expand(32, -1))]
        return err[0] - err[1]

    log(f"[2/5] teacher: {steps} steps of {t['batch']} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters)")
    start, avg = time.time(), None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, t["lr"], t["warmup"])
        idx = torch.randint(0, n, (t["batch"],), generator=gen)
        flip = torch.rand(t["batch"], generator=gen) < 0.5
        x = images[idx]
        x = to_latent(torch.where(flip[:, None, None, None], x.flip(2), x), r)
        cond = ids[idx, flip.long()]
        drop = torch.rand(t["batch"], generator=gen) < t["cond_drop"]
        cond = torch.where(drop[:, None], uncond.expand_as(cond), cond)
        s = shifted(torch.sigmoid(torch.randn(t["batch"], generator=gen)), t.get("shift", 1.0))
        noise = torch.randn(x.shape, generator=gen)
        z = (1 - s)[:, None, None, None] * x + s[:, None, None, None] * noise
        loss = F.mse_loss(velocity(model, z, s, model.text(cond)), noise - x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 1 - t["ema"])
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            el = time.time() - start
            gain = (f"  caption gain {caption_gain(ema, 0.98):+.4f} (s=0.98) {caption_gain(ema, 0.9):+.4f} (s=0.9)"
                    if step % 500 == 0 or step == steps - 1 else "")
            log(f"    step {step}/{steps}  loss {avg:.4f}  {(step + 1) / el:.2f} steps/s  {el / 60:.1f} min{gain}")
    return ema


def make_pairs(cfg: dict, teacher: Model, ids: torch.Tensor, uncond: torch.Tensor, r: int, side: int):
    d = cfg["distill"]
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    n = ids.shape[0]
    pick = torch.randint(0, n, (d["pairs"],), generator=gen)
    cond = ids[pick, torch.randint(0, 2, (d["pairs"],), generator=gen)]
    noise = torch.randn((d["pairs"], 3 * r * r, side, side), generator=gen)
    out = torch.zeros_like(noise)
    log(f"[3/5] {d['pairs']} teacher pairs ({d['teacher_steps']} steps, guidance {d['guidance']})")
    start = time.time()
    for i in range(0, d["pairs"], 64):
        out[i:i + 64] = sample_teacher(teacher, noise[i:i + 64], cond[i:i + 64], uncond, d["teacher_steps"], d["guidance"],
                                       cfg["train"].get("shift", 1.0))
        if i % 640 == 0:
            log(f"    {i + 64}/{d['pairs']} ({time.time() - start:.0f} s)")
    return noise, cond, out


def distil(cfg: dict, teacher: Model, noise, cond, target) -> Model:
    """The student at the runtime's trailing Euler timesteps: t = 999 from pure noise (what the
    runtime feeds: b n), then t = 499 from the VP mix of the clean estimate and the epsilon the
    first step implies; both must give the teacher's image."""
    d = cfg["distill"]
    ac = alphas_cumprod(cfg["schedule"])
    t1, t2 = trailing(len(ac), 2)
    (a1, b1), (a2, b2) = [(math.sqrt(ac[t]), math.sqrt(1 - ac[t])) for t in (t1, t2)]
    s1, s2 = b1 / (a1 + b1), b2 / (a2 + b2)
    # The student predicts the clean image itself: through z - s v it would have to cancel the
    # input noise exactly, and what it misses stays in the picture as grain. A teacher that
    # predicts x0 already hands it a head of the right kind; a v-teacher's head has to be relearnt.
    student = copy.deepcopy(teacher).train()
    student.predicts = "x0"
    opt = torch.optim.AdamW(student.parameters(), lr=d["lr"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg["seed"] + 2)
    log(f"[4/5] student: {d['steps']} steps at t = {t1} (s = {s1:.3f}) and t = {t2} (s = {s2:.3f})")
    start, avg = time.time(), None
    for step in range(d["steps"]):
        idx = torch.randint(0, noise.shape[0], (d["batch"],), generator=gen)
        n, x0, ids = noise[idx], target[idx], cond[idx]
        ctx = student.text(ids)
        # Step 1: the runtime's input is b1 n; z = input / (a1 + b1).
        z1 = s1 * n
        x1 = student.unet(z1, torch.full((len(idx),), s1), ctx)
        # Step 2: the input is a2 x0 + b2 eps with the teacher's x0 and the eps step 1 implies.
        eps = (b1 * n - a1 * x0) / b1
        z2 = (a2 * x0 + b2 * eps) / (a2 + b2)
        x2 = student.unet(z2, torch.full((len(idx),), s2), ctx)
        loss = F.mse_loss(x1, x0) + F.mse_loss(x2, x0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, d["steps"], d["lr"], 50)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % 100 == 0 or step == d["steps"] - 1:
            el = time.time() - start
            log(f"    step {step}/{d['steps']}  loss {avg:.4f}  {(step + 1) / el:.2f} steps/s")
    return student.eval()


# ---------------------------------------------------------------------------------------------
# The output projector (NExT-GPT / GILL style)


class OutputProjector(nn.Module):
    """The LLM's hidden states at the signal tokens [n, n_embd] -> the text encoder's token
    sequence [1, context, width]: learned queries, one per conditioning token, attend to the
    projected states; trained by per-token regression on the text encoder's output for the same
    description."""

    def __init__(self, n_embd: int, width: int, context: int, d: int = 256, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.inp = nn.Sequential(nn.LayerNorm(n_embd), nn.Linear(n_embd, d))
        self.queries = nn.Parameter(torch.randn(context, d) * 0.02)
        self.q, self.kv, self.o = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, width))

    def forward(self, signal_states):
        k, v = self.kv(self.inp(signal_states))[None].chunk(2, dim=-1)
        x = self.queries[None]
        x = x + self.o(attention(self.q(x), k, v, self.heads))
        return self.out(x + self.ff(x))


def signal_data(cfg: dict, scenes: dict, cache: Path, work: Path, tool: Path, signal: str) -> list[dict]:
    """Composed training scenes (training exemplars and pairs) through the shipped stack: its
    caption of each and the LLM's states at the signal tokens after it (examples/signal_states.rs)."""
    o = cfg["output_projector"]
    path = work / f"signal-states-{o['scenes']}.jsonl"
    if not path.is_file():
        rng = np.random.default_rng(cfg["seed"] + 5)
        comp = Composer(cfg, scenes, cache / "models" / "photos", rng)
        folder = work / "signal-scenes"
        folder.mkdir(exist_ok=True)
        names = []
        for i in range(o["scenes"]):
            img, _ = comp.single() if i % 2 == 0 else comp.pair(comp.train_pairs, "pair")
            name = folder / f"{i:04}.png"
            img.save(name)
            names.append(str(name))
        (work / "signal-scenes.txt").write_text("\n".join(names) + "\n")
        log(f"    captioning {len(names)} scenes and reading the states at {signal!r} ({tool.name})")
        import subprocess
        subprocess.run([str(tool), str(work / "signal-scenes.txt"), str(path) + ".part", signal], check=True)
        (Path(str(path) + ".part")).rename(path)
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_output_projector(cfg: dict, student: Model, tokens: Tokens, rows: list[dict]) -> tuple[OutputProjector, dict]:
    o = cfg["output_projector"]
    gen = torch.Generator().manual_seed(cfg["seed"] + 6)
    n_embd = rows[0]["n_embd"]
    states = [torch.tensor(r["states"], dtype=torch.float32).reshape(-1, n_embd) for r in rows]
    with torch.no_grad():
        targets = student.text(torch.tensor([tokens.ids(r["caption"]) for r in rows]))
    order = torch.randperm(len(rows), generator=gen)
    n_val = max(1, len(rows) // 10)
    val, train = order[:n_val].tolist(), order[n_val:].tolist()
    proj = OutputProjector(n_embd, cfg["model"]["text_width"], cfg["model"]["context_tokens"])
    opt = torch.optim.AdamW(proj.parameters(), lr=o["lr"], weight_decay=0.01)
    log(f"[op] output projector: {len(train)} training and {len(val)} validation descriptions, {o['steps']} steps")

    def loss_on(idx: list[int]) -> torch.Tensor:
        return torch.stack([F.mse_loss(proj(states[i]), targets[i:i + 1]) for i in idx]).mean()

    for step in range(o["steps"]):
        batch = [train[j] for j in torch.randint(0, len(train), (o["batch"],), generator=gen).tolist()]
        loss = loss_on(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == o["steps"] - 1:
            with torch.no_grad():
                log(f"    step {step}  train {loss.item():.4f}  validation {loss_on(val).item():.4f}")
    with torch.no_grad():
        # Reference: how far apart the text encoder puts two different descriptions.
        spread = F.mse_loss(targets[val], targets[val].roll(1, 0)).item()
        result = {"validation_mse": loss_on(val).item(), "between_descriptions_mse": spread,
                  "train": len(train), "validation": len(val)}
    return proj.eval(), result


# ---------------------------------------------------------------------------------------------
# Export


class UnetGraph(nn.Module):
    """SD's UNet interface around the flow model: VP sample and integer timestep in, epsilon out."""

    def __init__(self, unet: UNet, ac: np.ndarray, predicts: str):
        super().__init__()
        self.unet, self.predicts_x0 = unet, predicts == "x0"
        self.register_buffer("a", torch.tensor(np.sqrt(ac), dtype=torch.float32))
        self.register_buffer("b", torch.tensor(np.sqrt(1 - ac), dtype=torch.float32))

    def forward(self, sample, timestep, encoder_hidden_states):
        a = self.a[timestep][:, None, None, None]
        b = self.b[timestep][:, None, None, None]
        s = b / (a + b)
        z = sample / (a + b)
        out = self.unet(z, s.flatten(), encoder_hidden_states)
        x0 = out if self.predicts_x0 else z - s * out
        return (sample - a * x0) / b


class TextGraph(nn.Module):
    def __init__(self, text: TextEncoder):
        super().__init__()
        self.text = text

    def forward(self, input_ids):
        return self.text(input_ids)


class DecoderGraph(nn.Module):
    def __init__(self, r: int):
        super().__init__()
        self.r = r

    def forward(self, latent_sample):
        return F.pixel_shuffle(latent_sample, self.r)


def store_int8(path: Path, min_elements: int = 4096) -> None:
    """Stores the large float weights as int8, symmetric per output channel (axis 0), with a
    DequantizeLinear to float32 in front: a quarter of the file (the UNet fits the repository's
    8 MiB limit), float32 in and out and in the arithmetic. Small tensors (the noise schedule,
    norms, biases) stay float32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    model = onnx.load(str(path))
    graph = model.graph
    inits, nodes = [], []
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and len(init.dims) >= 2 and int(np.prod(init.dims)) >= min_elements:
            w = numpy_helper.to_array(init)
            scale = np.abs(w.reshape(w.shape[0], -1)).max(axis=1) / 127.0
            scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
            q = np.clip(np.round(w / scale.reshape(-1, *[1] * (w.ndim - 1))), -127, 127).astype(np.int8)
            inits += [numpy_helper.from_array(q, init.name + "_q"), numpy_helper.from_array(scale, init.name + "_scale")]
            nodes.append(helper.make_node("DequantizeLinear", [init.name + "_q", init.name + "_scale"], [init.name], axis=0))
        else:
            inits.append(init)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def export(cfg: dict, model: Model, out: Path) -> dict:
    r, side = cfg["image"]["unshuffle"], cfg["image"]["size"] // cfg["image"]["unshuffle"]
    ctx_n, width = cfg["model"]["context_tokens"], cfg["model"]["text_width"]
    ac = alphas_cumprod(cfg["schedule"])
    model = copy.deepcopy(model)
    model.text.remap = model.text.remap.int()  # 49,408 entries: int32 halves them
    # "There is a dog." with words the encoder never learned ("there", the full stop).
    example = torch.full((2, ctx_n), EOS, dtype=torch.long)
    example[0, :7] = torch.tensor([BOS, 997, 533, 320, 1929, 269, EOS])
    graphs = {
        "text_encoder/model.onnx": (TextGraph(model.text), (example,),
                                    ["input_ids"], ["last_hidden_state"], {"input_ids": {0: "b"}, "last_hidden_state": {0: "b"}}),
        "unet/model.onnx": (UnetGraph(model.unet, ac, getattr(model, "predicts", "v")),
                            (torch.randn(2, 3 * r * r, side, side), torch.tensor([999, 499]), torch.randn(2, ctx_n, width)),
                            ["sample", "timestep", "encoder_hidden_states"], ["out_sample"],
                            {"sample": {0: "b", 2: "h", 3: "w"}, "timestep": {0: "b"}, "encoder_hidden_states": {0: "b"},
                             "out_sample": {0: "b", 2: "h", 3: "w"}}),
        "vae_decoder/model.onnx": (DecoderGraph(r), (torch.randn(1, 3 * r * r, side, side),), ["latent_sample"], ["sample"],
                                   {"latent_sample": {0: "b", 2: "h", 3: "w"}, "sample": {0: "b", 2: "H", 3: "W"}}),
    }
    return run_export(graphs, out)


def run_export(graphs: dict, out: Path) -> dict:
    import onnxruntime as ort
    files = {}
    for name, (module, args, inputs, outputs, dynamic) in graphs.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        module.eval()
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=dynamic,
                          opset_version=17, dynamo=False, do_constant_folding=True)
        store_int8(path)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            want = module(*args).numpy()
        got = sess.run(None, {k: v.numpy() for k, v in zip(inputs, args)})[0]
        diff = float(np.abs(got - want).max())
        # The int8 weights round at 1/254 of each channel's largest weight.
        if diff > 2e-2 * (1 + float(np.abs(want).max())):
            raise SystemExit(f"error: {name}: ONNX differs from torch by {diff}")
        data = path.read_bytes()
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "max_abs_diff": diff}
        log(f"    {path} ({len(data)} B), ONNX vs torch max |diff| {diff:.2e}")
    return files


def write_candidate(cfg: dict, out: Path, files: dict, work: Path) -> Path:
    """A manifest and a config that serve the freshly exported generator (the reference manifest
    with its [generator] section rewritten to these files by path), so `scenecast generate` and
    eval_generator.py can judge a run before it is shipped. Returns the config's path."""
    import manifest
    text = manifest.REFERENCE.read_text()
    section = text[text.index("\n[generator]"):]
    head = text[: len(text) - len(section)]
    m = cfg["model"]
    path = lambda name: f'{{ path = "{(out / name).resolve()}" }}'  # noqa: E731
    gen = f"""
[generator]
description = "candidate {cfg['name']} (not shipped)"
tokenizer = {{ cache = "generator/clip-tokenizer.json" }}
pad_token = {m['pad_token']}
text_encoder = {{ file = {path('text_encoder/model.onnx')}, input = "input_ids", output = "last_hidden_state" }}
unet = {{ file = {path('unet/model.onnx')}, sample = "sample", timestep = "timestep", context = "encoder_hidden_states", output = "out_sample" }}
vae_decoder = {{ file = {path('vae_decoder/model.onnx')}, input = "latent_sample", output = "sample" }}
context_tokens = {m['context_tokens']}
text_width = {m['text_width']}
latent_channels = {3 * cfg['image']['unshuffle'] ** 2}
vae_scale = {cfg['image']['unshuffle']}
latent_scaling = 1.0
size_multiple = {4 * cfg['image']['unshuffle']}
schedule = {{ num_train_timesteps = {cfg['schedule']['num_train_timesteps']}, beta_start = {cfg['schedule']['beta_start']}, beta_end = {cfg['schedule']['beta_end']} }}
sampler = "euler"
steps = 1
guidance = 0.0
size = [{cfg['image']['size']}, {cfg['image']['size']}]
"""
    if "output_projector.onnx" in files:
        gen += f"""
[generator.output_projector]
file = {path('output_projector.onnx')}
input = "signal_states"
output = "conditioning"
signal = "{cfg['output_projector']['signal']}"
"""
    (work / "candidate-manifest.toml").write_text(head + "\n" + gen)
    config = work / "candidate.toml"
    config.write_text(f'[models]\nmanifest = "{(work / "candidate-manifest.toml").resolve()}"\n')
    return config


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=HERE / "generator" / "train.toml")
    ap.add_argument("--cache", type=Path, default=default_cache())
    ap.add_argument("--bench", action="store_true", help="print the training speed of this configuration and stop")
    ap.add_argument("--signal-states", type=Path, metavar="TOOL",
                    help="also train the output projector, reading the LLM's states with this build of "
                         "examples/signal_states.rs")
    args = ap.parse_args()
    cfg, scenes = load_config(args.config)
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(cfg["train"]["threads"])
    work = args.cache / "train" / cfg["name"]
    work.mkdir(parents=True, exist_ok=True)
    tokens = Tokens(args.cache / "models" / "generator" / "clip-tokenizer.json", cfg["model"]["context_tokens"],
                    cfg["model"]["pad_token"])
    r, side = cfg["image"]["unshuffle"], cfg["image"]["size"] // cfg["image"]["unshuffle"]

    if args.bench:
        remap = Tokens.remap({BOS, EOS})
        model = Model(cfg, remap)
        size = cfg["image"]["size"]
        imgs = torch.randint(0, 256, (256, size, size, 3), dtype=torch.uint8)
        ids = torch.full((256, 2, cfg["model"]["context_tokens"]), EOS)
        t0 = time.time()
        train_teacher(cfg, model, imgs, ids, ids[0, 0], work, steps=20)
        print(f"{20 / (time.time() - t0):.2f} steps/s at batch {cfg['train']['batch']}")
        return 0

    images, caps = build_data(cfg, scenes, args.cache, work)
    all_ids = [[tokens.ids(c) for c in pair] for pair in caps]
    uncond_ids = tokens.ids("")
    used = {i for pair in all_ids for seq in pair for i in seq} | set(uncond_ids)
    remap = Tokens.remap(used)
    log(f"    {len(used)} distinct token ids in the captions")
    ids = torch.tensor(all_ids, dtype=torch.long)
    uncond = torch.tensor(uncond_ids, dtype=torch.long)[None]
    images_t = torch.from_numpy(images)

    teacher_path = work / "teacher.pt"
    if teacher_path.is_file():
        teacher = torch.load(teacher_path, weights_only=False)
        log(f"[2/5] teacher cached: {teacher_path}")
    else:
        teacher = train_teacher(cfg, Model(cfg, remap), images_t, ids, uncond, work)
        torch.save(teacher, teacher_path)
    pairs_path = work / "pairs.pt"
    if pairs_path.is_file():
        noise, cond, target = torch.load(pairs_path)
        log(f"[3/5] teacher pairs cached: {pairs_path}")
    else:
        noise, cond, target = make_pairs(cfg, teacher, ids, uncond, r, side)
        torch.save((noise, cond, target), pairs_path)
        sheet = from_latent(target[:64], r)
        grid = sheet.reshape(8, 8, *sheet.shape[1:]).transpose(0, 2, 1, 3, 4).reshape(8 * sheet.shape[1], 8 * sheet.shape[2], 3)
        Image.fromarray(grid).save(work / "teacher-pairs.png")
    student_path = work / "student.pt"
    if student_path.is_file():
        student = torch.load(student_path, weights_only=False)
        log(f"[4/5] student cached: {student_path}")
    else:
        student = distil(cfg, teacher, noise, cond, target)
        torch.save(student, student_path)
    log("[5/5] export")
    out = (args.config.parent / cfg["output"]).resolve()
    files = export(cfg, student, out)
    if args.signal_states:
        o = cfg["output_projector"]
        rows = signal_data(cfg, scenes, args.cache, work, args.signal_states, o["signal"])
        proj, result = train_output_projector(cfg, student, tokens, rows)
        n_embd = rows[0]["n_embd"]
        files |= run_export({"output_projector.onnx": (proj, (torch.tensor(rows[0]["states"]).reshape(-1, n_embd),),
                                                       ["signal_states"], ["conditioning"], {"signal_states": {0: "n"}})}, out)
        files["output_projector.onnx"]["fit"] = result
    (work / "export.json").write_text(json.dumps(files, indent=1))
    config = write_candidate(cfg, out, files, work)
    log(f"done: {out}")
    log(f"    to judge it: python models/eval_generator.py --config {args.config} --scenecast target/release/scenecast "
        f"--candidate {config}")
    log("    to ship it: put these in models/reference.toml's [generator] and models/sources.toml:")
    for name, f in files.items():
        log(f"      {cfg['output']}/{name}  sha256 {f['sha256']}  size {f['size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
