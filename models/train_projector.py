#!/usr/bin/env python3
"""Trains the input projector (DINOv2-S patch features -> SmolLM2 embeddings) and exports it to ONNX.

LLaVA stage 1 + 2 on one CPU: the encoder is frozen; the projector (pooled patch tokens -> Linear ->
GELU -> Linear) learns in front of the frozen LLM, then, from `[adapter] start` on, together with a
small LoRA adapter on the LLM's attention, on scenes composed from real photos (captions) and on
visual questions (presence yes/no, position, count) about the same scenes. Scenes are composed
from photos with a box and from cut-outs with alpha (Tux Paint's stamps): one object, two, none,
an object of no known category ("No known object."), a known next to an unknown one; exemplars and
unknown objects marked `heldout` never appear in training and make their own evaluation rows. The composer knows what
each image token shows, so a grounding loss (no LLM needed) also points every token over an object at
the LLM's embedding of the object's name: the tokens read like words, and composed scenes generalise.
With `[detector]` in the configuration, the projector also reads a second encoder, the COCO
detector of the manifest's `[detector]`: its class scores, pooled per cell of the patch grid, join
each cell's features (`cells = true`, v5, the reference), or, pooled per vertical third of the
frame, become three more image tokens after the patch tokens (`regions = 3`, v4).

    python models/train_projector.py                         # data, features, training, export, eval set
    python models/train_projector.py --user-data DIR         # add your own photos (DIR/x.jpg + DIR/x.txt)

Steps, each cached under $SCENECAST_CACHE/train/<name>/ so a rerun skips what is done:
  1. compose the training images and the held-out evaluation set (seeded; train.toml says how);
  2. encode them with the frozen ONNX encoder (ONNX Runtime) and average-pool the patch grid;
  3. load the GGUF backbone as a frozen float model (transformers, gguf_file=) and train the projector;
  4. export the projector as ONNX (models/make_projector.py's graph) and check it against torch, and
     the adapter as the LoRA GGUF llama.cpp applies to the unchanged backbone (`<output stem>.lora.gguf`).
The evaluation then runs through the shipped Rust pipeline: `scenecast eval <cache>/train/<name>/eval/eval.json`.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import re
import sys
import time
import tomllib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fetch import default_cache, log  # noqa: E402  (the same cache and log lines as the fetch)
import manifest  # noqa: E402  (model facts from models/reference.toml, as scenecast reads them)

FACTS = manifest.facts()
if FACTS.size[0] != FACTS.size[1]:
    raise SystemExit(f"error: the composer makes square scenes; models/reference.toml has encoder.preprocess.size {FACTS.size}")
SIZE = FACTS.size[0]
POSITIONS = {"left": "on the left", "centre": "in the centre", "right": "on the right"}
# Horizontal centre of an object at each named position, as a fraction of the width.
CENTRES = {"left": (0.2, 0.32), "centre": (0.44, 0.56), "right": (0.68, 0.8)}
# Bumped when composition changes in code (not in train.toml), so cached features are not reused.
DATA_VERSION = 2
MEAN = np.array(FACTS.mean, np.float32)
STD = np.array(FACTS.std, np.float32)


def read_config(path: Path) -> dict:
    """A training configuration's TOML; with `extends = "FILE"` (relative to it), FILE's, with this
    file's tables merged in key by key and its other values in place of FILE's."""
    cfg = tomllib.loads(path.read_text())
    base = cfg.pop("extends", None)
    if base is None:
        return cfg

    def merge(a: dict, b: dict) -> dict:
        return {**a, **{k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
                        for k, v in b.items()}}

    return merge(read_config((path.parent / base).resolve()), cfg)


def load_config(path: Path) -> dict:
    """train.toml with its [model] section filled from the manifest scenecast serves with (the
    frozen files, pooling, width and chat layout never come from train.toml)."""
    cfg = read_config(path)
    # `llm` may be set: the manifest serves a GGUF with an earlier adapter merged in, while training
    # starts from the base GGUF that adapter was trained on.
    doubled = sorted(set(cfg.get("model", {})) & set(FACTS.model_section()) - {"llm"})
    if doubled:
        raise SystemExit(f"error: {path}: [model] {', '.join(doubled)} come from models/reference.toml; remove them")
    cfg["model"] = {**FACTS.model_section(), **cfg.get("model", {})}
    if "detector" in cfg:
        # The detector's facts (file, input size, channels, strides) come from the manifest that
        # serves it, `[detector] manifest`, relative to this file (default: the reference).
        src = (path.parent / cfg["detector"]["manifest"]).resolve() if "manifest" in cfg["detector"] else manifest.REFERENCE
        cfg["detector"]["manifest"] = src
        cfg["detector"]["facts"] = manifest.facts(src).detector
        if cfg["detector"]["facts"] is None:
            raise SystemExit(f"error: {path}: [detector] reads the detector of {src}, which has no [detector] section")
    for c in cfg.get("category", []):
        c["photos"] = [exemplar(p) for p in c["photos"]]
    if "sets" in cfg:
        cfg["sets"]["unknown"] = [exemplar(u) for u in cfg["sets"].get("unknown", [])]
    return cfg


def article(name: str, capital: bool = False) -> str:
    a = "an" if name[0] in "aeiou" else "a"
    return f"{a.capitalize() if capital else a} {name}"


# ---------------------------------------------------------------------------------------------
# Composing scenes


def exemplar(e) -> dict:
    """An exemplar as a dict: `{file, box, crop?}` (a photo in photos/, the object in `box`, the
    photo itself `crop` of the file), or `{stamp}` (a cut-out with alpha in stamps/). A bare string
    is a whole photo, and so is a `{file}` without a box. `{cifar: [split, index]}` is one of
    CIFAR-10's photos (`Cifar`), whole."""
    if isinstance(e, str):
        return {"file": e, "box": [0.0, 0.0, 1.0, 1.0]}
    return {"box": [0.0, 0.0, 1.0, 1.0], **e} if "file" in e or "cifar" in e else e


class Cifar:
    """CIFAR-10's real 32 x 32 photos (part `photos-cifar10` of models/sources.toml: PNG sheets,
    one photo per row, and the labels as JSON lists), named by the configuration's `[cifar10]
    names` (label i -> one of our categories). The training split gives training exemplars; the
    test split, never trained on, gives evaluation rows of its own."""

    def __init__(self, root: Path, spec: dict):
        self.root, self.spec = root / "cifar10", spec
        self.names = spec["names"]
        self._splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Photos [n, 32, 32, 3] uint8 and labels [n] of `train` or `test`."""
        if split not in self._splits:
            sheets = self.spec["train_sheets"] if split == "train" else ["test_batch.png"]
            for f in sheets + [f"{split}_labels.json"]:
                if not (self.root / f).is_file():
                    raise SystemExit(f"error: {self.root / f} is missing; [cifar10] reads CIFAR-10 from the fetch's "
                                     f"part photos-cifar10 (`make projector`, or models/fetch.py --train)")
            photos = np.concatenate([np.asarray(Image.open(self.root / f).convert("RGB")).reshape(-1, 32, 32, 3)
                                     for f in sheets])
            labels = np.asarray(json.loads((self.root / f"{split}_labels.json").read_text()))[:len(photos)]
            self._splits[split] = photos, labels
        return self._splits[split]

    def photo(self, split: str, index: int) -> Image.Image:
        return Image.fromarray(self.split(split)[0][index])

    def exemplars(self, split: str, per_class: int, skip: int = 0) -> dict[str, list[dict]]:
        """The first `per_class` photos of each class after the first `skip` (the split's own
        order: deterministic), as exemplars by category name."""
        labels = self.split(split)[1]
        for k, name in enumerate(self.names):
            if (labels == k).sum() < skip + per_class:
                raise SystemExit(f"error: [cifar10]: the {split} split has {(labels == k).sum()} photos of {name}, "
                                 f"fewer than the {skip + per_class} asked for; lower the count or add train_sheets")
        return {name: [exemplar({"cifar": [split, int(i)]}) for i in np.flatnonzero(labels == k)[skip:skip + per_class]]
                for k, name in enumerate(self.names)}


class Composer:
    def __init__(self, cfg: dict, photos: Path, rng: np.random.Generator, cifar: bool = False):
        """`cifar`: also pick CIFAR-10's training photos for its categories (the training
        composer; the evaluation's composers do not, so their rows stay those of earlier runs)."""
        self.cfg, self.rng, self.photos = cfg, rng, photos
        self.cifar = Cifar(photos.parent, cfg["cifar10"]) if "cifar10" in cfg else None
        self.cifar_train = self.cifar.exemplars("train", cfg["cifar10"]["per_class"]) if cifar and self.cifar else {}
        self._open = lru_cache(maxsize=None)(self._load)
        self.categories = [c["name"] for c in cfg["category"]]
        self.train_photos = {c["name"]: [p for p in c["photos"] if not p.get("heldout")] for c in cfg["category"]}
        self.heldout_photos = {c["name"]: [p for p in c["photos"] if p.get("heldout")] for c in cfg["category"]}
        unknown = [exemplar(u) for u in cfg["sets"]["unknown"]]
        self.unknown_train = [u for u in unknown if not u.get("heldout")]
        self.unknown_heldout = [u for u in unknown if u.get("heldout")]
        # Categories with a real photo (not only cut-outs) to show as a whole camera frame.
        self.photo_categories = [n for n, ps in self.train_photos.items() if any("stamp" not in p for p in ps)]
        d = cfg["data"]
        self.edge_cut = d.get("edge_cut", 0.0)
        # A v2 configuration composes unknown objects as their own kind ("No known object."), and
        # `empty` is then a background alone; v1's empty scenes paste one half of the time.
        self.v2 = "unknown" in d
        held = {frozenset(p) for p in cfg["sets"]["heldout_pairs"]}
        self.heldout_pairs = [tuple(p) for p in cfg["sets"]["heldout_pairs"]]
        self.train_pairs = [(a, b) for i, a in enumerate(self.categories) for b in self.categories[i + 1:]
                            if frozenset((a, b)) not in held]

    def _load(self, key: tuple) -> Image.Image:
        """A photo (RGB, cropped to `crop`) or a stamp (RGBA, cut to its alpha's bounding box)."""
        kind, name, crop = key
        if kind == "cifar":
            return self.cifar.photo(name, crop)
        if kind == "stamp":
            img = Image.open(self.photos.parent / "stamps" / name).convert("RGBA")
            return img.crop(img.getchannel("A").point(lambda a: 255 if a > 16 else 0).getbbox())
        img = Image.open(self.photos / name).convert("RGB")
        if crop:
            w, h = img.size
            img = img.crop((int(crop[0] * w), int(crop[1] * h), int(crop[2] * w), int(crop[3] * h)))
        return img

    def open(self, e: dict) -> Image.Image:
        e = exemplar(e)
        if "stamp" in e:
            return self._open(("stamp", e["stamp"], None))
        if "cifar" in e:
            return self._open(("cifar", *e["cifar"]))
        return self._open(("file", e["file"], tuple(e["crop"]) if "crop" in e else None))

    def uniform(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    def background(self) -> Image.Image:
        r = self.rng.random()
        if r < 0.2:
            colour = tuple(int(v) for v in self.rng.integers(0, 256, 3))
            return Image.new("RGB", (SIZE, SIZE), colour)
        if r < 0.35:
            a, b = self.rng.integers(0, 256, (2, 3)).astype(np.float32)
            t = np.linspace(0, 1, SIZE, dtype=np.float32)[:, None, None]
            grad = a + (b - a) * t
            img = np.broadcast_to(grad, (SIZE, SIZE, 3)) if self.rng.random() < 0.5 else np.broadcast_to(
                grad.transpose(1, 0, 2), (SIZE, SIZE, 3))
            return Image.fromarray(np.ascontiguousarray(img).astype(np.uint8))
        if r < 0.5:
            base = self.rng.integers(0, 256, 3)
            noise = self.rng.normal(0, self.uniform(10, 60), (SIZE, SIZE, 3))
            return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        photo = self.open(self.cfg["sets"]["backgrounds"][self.rng.integers(len(self.cfg["sets"]["backgrounds"]))])
        w, h = photo.size
        side = self.uniform(0.4, 1.0) * min(w, h)
        x0, y0 = self.uniform(0, w - side), self.uniform(0, h - side)
        img = photo.crop((int(x0), int(y0), int(x0 + side), int(y0 + side))).resize((SIZE, SIZE), Image.BILINEAR)
        return self.jitter(img)

    def jitter(self, img: Image.Image) -> Image.Image:
        if img.mode == "RGBA":  # jitter the colours, keep the cut-out's alpha
            alpha = img.getchannel("A")
            out = self.jitter(img.convert("RGB")).convert("RGBA")
            out.putalpha(alpha)
            return out
        img = ImageEnhance.Brightness(img).enhance(self.uniform(0.75, 1.25))
        img = ImageEnhance.Contrast(img).enhance(self.uniform(0.75, 1.25))
        img = ImageEnhance.Color(img).enhance(self.uniform(0.7, 1.3))
        if self.rng.random() < 0.15:
            img = img.filter(ImageFilter.GaussianBlur(self.uniform(0.5, 1.5)))
        return img

    def cutout(self, photo: dict) -> Image.Image:
        photo = exemplar(photo)
        if "stamp" in photo:
            out = self.open(photo)
            if self.rng.random() < 0.5:
                out = out.transpose(Image.FLIP_LEFT_RIGHT)
            return self.jitter(out)
        img = self.open(photo)
        w, h = img.size
        x0, y0, x1, y1 = photo["box"]
        j = lambda v: v + self.uniform(-0.04, 0.04)  # noqa: E731
        box = (max(0.0, j(x0)) * w, max(0.0, j(y0)) * h, min(1.0, j(x1)) * w, min(1.0, j(y1)) * h)
        out = img.crop(tuple(int(v) for v in box))
        if self.rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return self.jitter(out)

    def paste(self, canvas: Image.Image, obj: Image.Image, position: str, scale: tuple[float, float]) -> list[float]:
        """Pastes `obj` at a named position; returns where it landed as fractions [x0, y0, x1, y1]."""
        width = int(self.uniform(*scale) * SIZE)
        aspect = obj.height / obj.width
        height = min(int(width * aspect), int(SIZE * 0.95))
        width = max(8, int(height / aspect)) if height == int(SIZE * 0.95) else width
        obj = obj.resize((width, max(8, height)), Image.BILINEAR)
        cx = self.uniform(*CENTRES[position]) * SIZE
        x = int(np.clip(cx - width / 2, 0, SIZE - width))
        y = int(self.uniform(0, max(1, SIZE - obj.height)))
        if self.edge_cut and self.rng.random() < self.edge_cut:
            # Partly cut by the frame's top or bottom edge, as a camera frames things (at most a
            # third of the object; left and right stay, the position words depend on them).
            cut = int(self.uniform(0.1, 0.33) * obj.height)
            y = -cut if self.rng.random() < 0.5 else SIZE - obj.height + cut
        canvas.paste(obj, (x, y), obj if obj.mode == "RGBA" else None)
        box = [x / SIZE, y / SIZE, (x + obj.width) / SIZE, (y + obj.height) / SIZE]
        return [float(np.clip(v, 0.0, 1.0)) for v in box]

    def pick_photo(self, name: str) -> dict:
        """A training exemplar of `name`: one of CIFAR-10's photos `[cifar10] share` of the time
        when it is one of CIFAR's classes (the training composer), else one of the configuration's."""
        many = self.cifar_train.get(name)
        if many and self.rng.random() < self.cfg["cifar10"]["share"]:
            return many[self.rng.integers(len(many))]
        ps = self.train_photos[name]
        return ps[self.rng.integers(len(ps))]

    def cifar_frame(self) -> tuple[Image.Image, dict]:
        """A CIFAR-10 training photo as a whole camera frame."""
        names = list(self.cifar_train)
        name = names[self.rng.integers(len(names))]
        img, box = self.photo_view(self.cifar_train[name][self.rng.integers(len(self.cifar_train[name]))])
        return img, {"kind": "photo", "objects": [{"name": name, "box": box}]}

    def lowres(self, img: Image.Image) -> Image.Image:
        """The scene as a small or distant camera delivers it: `[data] lowres` of the time, down
        to 32-96 pixels and back (so blur is no cue for CIFAR's classes, and 64-pixel renders of
        the generator are read as they are)."""
        if self.rng.random() >= self.cfg["data"].get("lowres", 0.0):
            return img
        side = int(self.rng.integers(32, 97))
        return img.resize((side, side), Image.BILINEAR).resize((SIZE, SIZE), Image.BILINEAR)

    def single(self) -> tuple[Image.Image, dict]:
        name = self.categories[self.rng.integers(len(self.categories))]
        position = list(POSITIONS)[self.rng.integers(3)]
        canvas = self.background()
        box = self.paste(canvas, self.cutout(self.pick_photo(name)), position, tuple(self.cfg["data"]["single_scale"]))
        return canvas, {"kind": "single", "objects": [{"name": name, "position": position, "box": box}]}

    def pair(self, pairs: list[tuple[str, str]], kind: str) -> tuple[Image.Image, dict]:
        if kind == "pair" and self.rng.random() < self.cfg["data"]["same_pair"]:
            a = self.categories[self.rng.integers(len(self.categories))]
            a, b = a, a
        else:
            a, b = pairs[self.rng.integers(len(pairs))]
            if self.rng.random() < 0.5:
                a, b = b, a
        canvas = self.background()
        scale = tuple(self.cfg["data"]["pair_scale"])
        left = self.paste(canvas, self.cutout(self.pick_photo(a)), "left", scale)
        right = self.paste(canvas, self.cutout(self.pick_photo(b)), "right", scale)
        return canvas, {"kind": kind, "objects": [{"name": a, "position": "left", "box": left},
                                                  {"name": b, "position": "right", "box": right}]}

    def empty(self, pool: list[dict] | None = None) -> tuple[Image.Image, dict]:
        """A scene with nothing known: a background with one object of no category from `pool`
        (default: the training unknowns). Configurations without `data.unknown` (v1) paste one
        half of the time, as they were trained."""
        canvas = self.background()
        pool = self.unknown_train if pool is None else pool
        if not self.v2:
            if self.rng.random() < 0.5:
                obj = self.open(pool[self.rng.integers(len(pool))])
                position = list(POSITIONS)[self.rng.integers(3)]
                self.paste(canvas, self.jitter(obj), position, tuple(self.cfg["data"]["single_scale"]))
            return canvas, {"kind": "empty", "objects": []}
        obj = exemplar(pool[self.rng.integers(len(pool))])
        if "stamp" not in obj and self.rng.random() < self.cfg["data"].get("unknown_frame", 0.0):
            # A real photo of nothing known, as a camera frames it.
            return self.photo_view(obj)[0], {"kind": "unknown", "objects": []}
        position = list(POSITIONS)[self.rng.integers(3)]
        self.paste(canvas, self.cutout(obj), position, tuple(self.cfg["data"]["single_scale"]))
        return canvas, {"kind": "unknown", "objects": []}

    def plain(self) -> tuple[Image.Image, dict]:
        """A background alone."""
        return self.background(), {"kind": "empty", "objects": []}

    def half(self, pool: list[dict] | None = None, photos: dict | None = None) -> tuple[Image.Image, dict]:
        """A known object and an unknown one: the caption names the known one only."""
        pool = self.unknown_train if pool is None else pool
        photos = self.train_photos if photos is None else photos
        names = [n for n in self.categories if photos[n]]
        name = names[self.rng.integers(len(names))]
        sides = ["left", "right"] if self.rng.random() < 0.5 else ["right", "left"]
        canvas = self.background()
        scale = tuple(self.cfg["data"]["pair_scale"])
        box = self.paste(canvas, self.cutout(photos[name][self.rng.integers(len(photos[name]))]), sides[0], scale)
        self.paste(canvas, self.cutout(pool[self.rng.integers(len(pool))]), sides[1], scale)
        return canvas, {"kind": "half", "objects": [{"name": name, "position": sides[0], "box": box}]}

    def exemplar_single(self, name: str, photo: dict) -> tuple[Image.Image, dict]:
        position = list(POSITIONS)[self.rng.integers(3)]
        canvas = self.background()
        box = self.paste(canvas, self.cutout(photo), position, tuple(self.cfg["data"]["single_scale"]))
        return canvas, {"kind": "exemplar-heldout", "objects": [{"name": name, "position": position, "box": box}]}

    def photo_view(self, photo: dict) -> tuple[Image.Image, list[float]]:
        """A real photo as a camera would frame it (the whole photo, or a crop around the object),
        and where the object is in it as fractions [x0, y0, x1, y1]."""
        img = self.open(photo)
        w, h = img.size
        x0, y0, x1, y1 = photo["box"]
        crop = (0, 0, w, h)
        if self.rng.random() > 0.25:
            m = lambda: self.uniform(0.0, 0.35)  # noqa: E731
            crop = tuple(int(v) for v in (max(0.0, x0 - m()) * w, max(0.0, y0 - m()) * h,
                                          min(1.0, x1 + m()) * w, min(1.0, y1 + m()) * h))
            img = img.crop(crop)
        cw, ch = crop[2] - crop[0], crop[3] - crop[1]
        box = [float(np.clip(v, 0.0, 1.0)) for v in ((x0 * w - crop[0]) / cw, (y0 * h - crop[1]) / ch,
                                                     (x1 * w - crop[0]) / cw, (y1 * h - crop[1]) / ch)]
        if self.rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            box = [1.0 - box[2], box[1], 1.0 - box[0], box[3]]
        return self.jitter(img.resize((SIZE, SIZE), Image.BILINEAR)), box

    def photo(self) -> tuple[Image.Image, dict]:
        name = self.photo_categories[self.rng.integers(len(self.photo_categories))]
        photos = [p for p in self.train_photos[name] if "stamp" not in p]
        img, box = self.photo_view(photos[self.rng.integers(len(photos))])
        return img, {"kind": "photo", "objects": [{"name": name, "box": box}]}


# ---------------------------------------------------------------------------------------------
# Questions and answers


def caption(meta: dict, cfg: dict, rng: np.random.Generator) -> str:
    objs = meta["objects"]
    if meta.get("caption"):
        return meta["caption"]
    if not objs:
        return cfg["questions"]["empty_caption"]
    if meta["kind"] == "photo":
        return f"A photo of {article(objs[0]['name'])}."
    if len(objs) == 1:
        o = objs[0]
        t = rng.integers(2)
        return (f"{article(o['name'], True)} {POSITIONS[o['position']]}." if t == 0
                else f"There is {article(o['name'])} {POSITIONS[o['position']]}.")
    a, b = objs[0]["name"], objs[1]["name"]
    if a == b:
        return f"Two {a}s, one on the left and one on the right."
    t = rng.integers(2)
    return (f"{article(a, True)} on the left and {article(b)} on the right." if t == 0
            else f"There is {article(a)} on the left and {article(b)} on the right.")


YESNO = ["Is there {a} in the image?", "Do you see {a}?", "Is there {a}?", "Can you see {a} here?"]
WHERE = ["Where is the {x}?", "Where is the {x} in the image?"]
COUNT = ["How many objects are there?", "How many things can you see?"]


def question(meta: dict, cfg: dict, categories: list[str], rng: np.random.Generator,
             general: list[tuple[str, str]] | None = None, confusable: list[str] = ()) -> tuple[str, str]:
    """One (question, answer) about the scene `meta`. `confusable`: absent categories the image
    tokens point at most, most first; a "No" question asks about one of them `hard_negative` of
    the time (questions.hard_negative), instead of a category drawn at random."""
    q = cfg["questions"]
    if general and rng.random() < q.get("general", 0.0):
        return general[rng.integers(len(general))]
    kinds = ["caption", "yesno", "where", "count"]
    names = [o["name"] for o in meta["objects"]]
    if meta.get("caption"):  # a user's own photo: captions only
        kinds = ["caption"]
    weights = np.array([q[k] for k in kinds], np.float64)
    if "where" in kinds and not (meta["kind"] in ("single", "pair", "half") and len(set(names)) == len(names)):
        weights[kinds.index("where")] = 0
    kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
    if kind == "caption":
        prompts = q["caption_prompts"]
        prompt = prompts[0] if rng.random() < 0.35 else prompts[rng.integers(len(prompts))]
        return prompt, caption(meta, cfg, rng)
    if kind == "yesno":
        if names and rng.random() < 0.5:
            name, answer = names[rng.integers(len(names))], "Yes."
        else:
            absent = [c for c in categories if c not in names]
            hard = [c for c in confusable if c not in names]
            if hard and rng.random() < q.get("hard_negative", 0.0):
                absent = hard
            name, answer = absent[rng.integers(len(absent))], "No."
        return YESNO[rng.integers(len(YESNO))].format(a=article(name)), answer
    if kind == "where":
        o = meta["objects"][rng.integers(len(names))]
        return WHERE[rng.integers(len(WHERE))].format(x=o["name"]), POSITIONS[o["position"]].capitalize() + "."
    n = len(names)
    return COUNT[rng.integers(len(COUNT))], ["None.", "One.", "Two."][n]


# ---------------------------------------------------------------------------------------------
# Grounding: what each image token shows


def cell_labels(metas: list[dict], categories: list[str], pool: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """For every scene and pooled grid cell (row-major, like the image tokens): the index of the
    category pasted over it (at least half the cell covered; a later paste hides an earlier one),
    len(categories) for background (at most a tenth covered), or -100 where it is unclear or
    unknown (partly covered cells, the user's own photos); and the index in POSITIONS of that
    object's named position (-100 for background, unclear cells and photos)."""
    ph, pw = pool
    out = np.full((len(metas), ph * pw), -100, np.int64)
    where = np.full((len(metas), ph * pw), -100, np.int64)
    for n, meta in enumerate(metas):
        if meta["kind"] == "user":
            continue
        for i in range(ph):
            for j in range(pw):
                cy0, cy1, cx0, cx1 = i / ph, (i + 1) / ph, j / pw, (j + 1) / pw
                label, unclear, position = len(categories), False, None
                for o in meta["objects"]:
                    x0, y0, x1, y1 = o["box"]
                    cover = max(0.0, min(x1, cx1) - max(x0, cx0)) * max(0.0, min(y1, cy1) - max(y0, cy0)) * ph * pw
                    if cover >= 0.5:
                        label, unclear, position = categories.index(o["name"]), False, o.get("position")
                    elif cover > 0.1 and label == len(categories):
                        unclear = True
                out[n, i * pw + j] = -100 if unclear else label
                if position and not unclear:
                    where[n, i * pw + j] = list(POSITIONS).index(position)
    return out, where


# ---------------------------------------------------------------------------------------------
# Features


def encode(images: list[Image.Image], encoder: Path, pool: list[int], threads: int, keep: int = 0) -> np.ndarray:
    """Frozen encoder features, average-pooled like scenecast's projector.rs: [n, pool_h * pool_w, width],
    followed, with `keep`, by the encoder's first `keep` leading tokens (CLS) as they are:
    [n, pool_h * pool_w + keep, width], the rows a projector with `global_tokens` reads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(encoder), opts, providers=["CPUExecutionProvider"])
    inp, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    feats = []
    start = time.monotonic()
    for i in range(0, len(images), 16):
        batch = np.stack([(np.asarray(im, np.float32) / 255.0 - MEAN) / STD for im in images[i:i + 16]])
        # Drop the leading tokens (CLS), then pool the patch grid as the manifest says.
        full = sess.run([out], {inp: batch.transpose(0, 3, 1, 2).copy()})[0]
        tokens = full[:, FACTS.prefix_tokens:]
        n, _, width = tokens.shape
        gh, gw = FACTS.patch_grid
        grid = tokens.reshape(n, gh, gw, width)
        ph, pw = pool
        pooled = grid.reshape(n, ph, gh // ph, pw, gw // pw, width).mean(axis=(2, 4))
        rows = pooled.reshape(n, ph * pw, width)
        if keep:
            rows = np.concatenate([rows, full[:, :keep]], axis=1)
        feats.append(rows.astype(np.float32))
        done = min(i + 16, len(images))
        if done % 320 == 0 or done == len(images):
            rate = done / (time.monotonic() - start)
            log(f"    encoded {done}/{len(images)} ({rate:.1f} img/s, {(len(images) - done) / rate:.0f} s left)")
    return np.concatenate(feats)


def region_mask(det, regions: int) -> np.ndarray:
    """[regions, anchors] 0/1: which of the detector's anchor points (its grids row-major, finest
    first, as `detector.strides` says) has its centre in each vertical strip of the frame, left to
    right. The projector takes each strip's maximum class score (scores are >= 0, so masking with a
    product and taking the maximum is the same as a maximum over the strip)."""
    h, w = det.size
    cols = []
    for stride in det.strides:
        gh, gw = h // stride, w // stride
        x = (np.arange(gw) + 0.5) * stride / w  # centre of each column, as a fraction of the width
        strip = np.minimum((x * regions).astype(np.int64), regions - 1)
        cols.append(np.tile(strip, gh))
    strip = np.concatenate(cols)
    return (strip[None, :] == np.arange(regions)[:, None]).astype(np.float32)


def cell_anchors(det, pool: list[int]) -> np.ndarray:
    """[cells, k] int64: for each pooled grid cell (row-major, like the patch tokens), the
    detector's anchor points (its grids row-major, finest first) whose centre lies in it, padded
    to the same count k by repeating the cell's first one (a maximum is unchanged by repeats)."""
    h, w = det.size
    ph, pw = pool
    cell_of = []
    for stride in det.strides:
        gh, gw = h // stride, w // stride
        y = np.minimum(((np.arange(gh) + 0.5) * stride / h * ph).astype(np.int64), ph - 1)
        x = np.minimum(((np.arange(gw) + 0.5) * stride / w * pw).astype(np.int64), pw - 1)
        cell_of.append((y[:, None] * pw + x[None, :]).reshape(-1))
    cell_of = np.concatenate(cell_of)
    members = [np.nonzero(cell_of == c)[0] for c in range(ph * pw)]
    k = max(len(m) for m in members)
    return np.stack([np.concatenate([m, np.full(k - len(m), m[0])]) for m in members])


def anchor_count(det) -> int:
    """The detector's anchor points: one per cell of each stride's grid."""
    return sum((det.size[0] // s) * (det.size[1] // s) for s in det.strides)


def cell_detections(scores: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """[n, anchors, classes] scores -> [n, cells, classes], each grid cell's maximum per class
    (`idx`: cell_anchors)."""
    return scores[:, idx.reshape(-1), :].reshape(scores.shape[0], *idx.shape, scores.shape[2]).max(axis=2)


def pool_detections(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[n, anchors, classes] scores -> [n, regions, classes], each strip's maximum."""
    return (scores[:, None, :, :] * mask[None, :, :, None]).max(axis=2)


def detector(cache: Path, det, threads: int = 0):
    """The detector (`det`, manifest.Detector) as a function: image -> its raw class scores
    [1, anchors, classes], pre-processed as the manifest says (scenecast's Detector does the same)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(cache / "models" / det.file), opts, providers=["CPUExecutionProvider"])
    inp, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    mean, std = np.array(det.mean, np.float32), np.array(det.std, np.float32)

    def scores(image: Image.Image) -> np.ndarray:
        x = np.asarray(image.convert("RGB").resize((det.size[1], det.size[0]), Image.BILINEAR), np.float32) / 255.0
        if det.channels == "bgr":
            x = x[:, :, ::-1]
        return sess.run([out], {inp: ((x - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)})[0]

    return scores


def detect(images: list[Image.Image], cache: Path, det, regions: int | None, threads: int,
           pool: list[int] | None = None) -> np.ndarray:
    """The detector's (`det`, manifest.Detector) class scores of every image, pooled to `regions`
    strips ([n, regions, classes]) or, with `pool`, to the pooled patch grid's cells ([n, cells,
    classes], float16: 64 x 80 per image)."""
    scores = detector(cache, det, threads)
    mask = None if pool else region_mask(det, regions)
    idx = cell_anchors(det, pool) if pool else None
    pooled = []
    start = time.monotonic()
    for i, im in enumerate(images):
        raw = scores(im)
        pooled.append(cell_detections(raw, idx).astype(np.float16) if pool else pool_detections(raw, mask))
        done = i + 1
        if done % 400 == 0 or done == len(images):
            rate = done / (time.monotonic() - start)
            log(f"    detected {done}/{len(images)} ({rate:.1f} img/s, {(len(images) - done) / rate:.0f} s left)")
    return np.concatenate(pooled)


# ---------------------------------------------------------------------------------------------
# Data set (steps 1 and 2)


def data_paths(cfg: dict, work: Path, user_data: Path | None) -> tuple[Path, Path]:
    """Where the features and scene descriptions of this data configuration are cached."""
    # The global tokens are cached next to the patch features (`global<n>-<key>.npy`), under the same key.
    model = {k: v for k, v in cfg["model"].items() if k != "global_tokens"}
    key = hashlib.sha256(json.dumps([DATA_VERSION, cfg["seed"], cfg["data"], cfg["category"], cfg["sets"], model,
                                     str(user_data)] + ([cfg["cifar10"]] if "cifar10" in cfg else []),
                                    sort_keys=True).encode()).hexdigest()[:16]
    return work / f"features-{key}.npy", work / f"meta-{key}.json"


def compose_training(cfg: dict, photos: Path) -> tuple["Composer", list[Image.Image], list[dict]]:
    """The training scenes of `cfg` (seeded: the same images every time), and the composer."""
    rng = np.random.default_rng(cfg["seed"])
    comp = Composer(cfg, photos, rng, cifar=True)
    d = cfg["data"]
    images, metas = [], []
    total = sum(d.get(k, 0) for k in ("single", "pair", "empty", "photo", "unknown", "half", "cifar_frames"))
    log(f"[1/4] composing {total} training images")
    for _ in range(d["single"]):
        im, m = comp.single(); images.append(im); metas.append(m)  # noqa: E702
    for _ in range(d["pair"]):
        im, m = comp.pair(comp.train_pairs, "pair"); images.append(im); metas.append(m)  # noqa: E702
    for _ in range(d["empty"]):
        im, m = comp.plain() if comp.v2 else comp.empty(); images.append(im); metas.append(m)  # noqa: E702
    for _ in range(d["photo"]):
        im, m = comp.photo(); images.append(im); metas.append(m)  # noqa: E702
    # v2: unknown objects alone ("No known object."), a known and an unknown object (only the
    # known one is named); `empty` above is then a background alone.
    for _ in range(d.get("unknown", 0)):
        im, m = comp.empty(); images.append(im); metas.append(m)  # noqa: E702
    for _ in range(d.get("half", 0)):
        im, m = comp.half(); images.append(im); metas.append(m)  # noqa: E702
    for _ in range(d.get("cifar_frames", 0)):
        im, m = comp.cifar_frame(); images.append(im); metas.append(m)  # noqa: E702
    if d.get("lowres"):
        images = [comp.lowres(im) for im in images]
    return comp, images, metas


def scenes(cfg: dict, cache: Path, user_data: Path | None) -> tuple[list[Image.Image], list[dict]]:
    """Every image the features are computed from, in order, with its description: the training
    scenes, the user's photos (8 jittered views each) and the held-out pairs of the grounding check."""
    photos = cache / "models" / "photos"
    comp, images, metas = compose_training(cfg, photos)
    if user_data:
        user = sorted(p for p in user_data.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        for p in user:
            text = p.with_suffix(".txt")
            if not text.is_file():
                raise SystemExit(f"error: {p} has no caption file {text.name} (one line of text)")
            cap = text.read_text().strip()
            for _ in range(8):
                img = Image.open(p).convert("RGB")
                img = comp.jitter(img.resize((SIZE, SIZE), Image.BILINEAR))
                images.append(img)
                metas.append({"kind": "user", "objects": [], "caption": cap})
        log(f"    + {len(user)} user photos x 8 views from {user_data}")
    # Held-out pairs for a grounding check during training (never trained on; own random stream).
    check = Composer(cfg, photos, np.random.default_rng(cfg["seed"] + 3))
    for _ in range(cfg["data"]["eval_pairs"]):
        im, m = check.pair(check.heldout_pairs, "check"); images.append(im); metas.append(m)  # noqa: E702
    return images, metas


def build_data(cfg: dict, cache: Path, work: Path, user_data: Path | None) -> tuple[np.ndarray, np.ndarray | None, list[dict]]:
    """Patch features [n, tokens, width] (with `[model] global_tokens`, the encoder's leading
    tokens after them), detector scores per strip [n, regions, classes] or, with `[detector]
    cells`, per pooled grid cell [n, tokens, classes] (None without `[detector]` in the training
    configuration) and scene descriptions, cached."""
    feats_path, meta_path = data_paths(cfg, work, user_data)
    regions = cfg.get("detector", {}).get("regions")
    cells = cfg.get("detector", {}).get("cells", False)
    # The detector's scores are cached per detector file: the same scenes read by another detector
    # (NanoDet alone, or with the ImageNet classifier) are other columns.
    det_stem = Path(cfg["detector"]["facts"].file).stem if "detector" in cfg else ""
    dets_path = feats_path.with_name(feats_path.name.replace("features-", f"detcells-{det_stem}-" if cells else f"detections{regions}-{det_stem}-"))
    keep = int(cfg["model"].get("global_tokens", 0))
    global_path = feats_path.with_name(feats_path.name.replace("features-", f"global{keep}-"))
    if keep > FACTS.prefix_tokens:
        raise SystemExit(f"error: model.global_tokens is {keep}, but the encoder has {FACTS.prefix_tokens} leading "
                         f"token(s) before its patch grid (encoder.prefix_tokens); expected at most that")
    have_feats = feats_path.is_file() and meta_path.is_file()
    have_global = not keep or global_path.is_file()
    if have_feats and have_global and (not (regions or cells) or dets_path.is_file()):
        log(f"[2/4] features cached: {feats_path}")
        dets = np.load(dets_path).astype(np.float32) if regions or cells else None
        return with_global(np.load(feats_path), global_path, keep), dets, json.loads(meta_path.read_text())
    images, metas = scenes(cfg, cache, user_data)
    write_eval(cfg, cache, work)
    encoder = cache / "models" / cfg["model"]["encoder"]
    if have_feats:
        feats = np.load(feats_path)
        if len(feats) != len(images):
            raise SystemExit(f"error: {feats_path} has {len(feats)} images, the configuration composes {len(images)}; delete it")
        log(f"[2/4] features cached: {feats_path}")
        if not have_global:
            log(f"[2/4] encoding {len(images)} images again for the encoder's {keep} leading token(s)")
            np.save(global_path, encode(images, encoder, cfg["model"]["pool"], cfg["train"]["threads"], keep)[:, -keep:])
    else:
        log(f"[2/4] encoding {len(images)} images with the frozen encoder")
        both = encode(images, encoder, cfg["model"]["pool"], cfg["train"]["threads"], keep)
        feats = both[:, :both.shape[1] - keep]
        np.save(feats_path, feats)
        if keep:
            np.save(global_path, both[:, -keep:])
        meta_path.write_text(json.dumps(metas))
    dets = None
    if (regions or cells) and dets_path.is_file() and have_feats:
        dets = np.load(dets_path).astype(np.float32)
    elif regions or cells:
        det = cfg["detector"]["facts"]
        log(f"[2/4] detecting in {len(images)} images with the frozen detector ({det.file})")
        dets = detect(images, cache, det, regions, cfg["train"]["threads"], cfg["model"]["pool"] if cells else None)
        np.save(dets_path, dets)
        dets = dets.astype(np.float32)
    return with_global(feats, global_path, keep), dets, metas


def with_global(feats: np.ndarray, path: Path, keep: int) -> np.ndarray:
    """The patch features with the cached global tokens (`path`, [n, keep, width]) after them."""
    if not keep:
        return feats
    rows = np.load(path)
    if rows.shape[0] != feats.shape[0] or rows.shape[1] != keep:
        raise SystemExit(f"error: {path} holds {rows.shape[:2]} global tokens, expected ({feats.shape[0]}, {keep}); delete it")
    return np.concatenate([feats, rows], axis=1)


# Words in the unknown things' file names that say which GCompris activity or which view a photo
# is, not what it shows ("erase-giraffe", "cat-chair", "gnu-sitting", "inukshuk-photo").
NAME_NOISE = {"world", "erase", "cat", "jigzo", "photo", "sitting", "stand", "eating", "small", "large", "black"}


def thing_words(u: dict) -> list[str]:
    """The words of an unknown thing's file name, lower-case: "cat-measuringTape4.webp" ->
    ["measuring", "tape"], "sea_lion.png" -> ["sea", "lion"]."""
    stem = Path(u.get("stamp") or u.get("file") or "").stem
    words = re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])", stem)
    return [w.lower() for w in words if w.lower() not in NAME_NOISE]


class Lookalikes:
    """For an unknown thing, the known category nearest to it in WordNet 3.0's noun hierarchy: the
    one whose synsets (`models/classifier/imagenet-categories.toml`) share the most specific
    hypernym with the thing (the deepest common ancestor; then the fewest steps between them).
    What a captioner that does not know a giraffe is likely to call it: a hard negative for
    presence questions about unknown things that no model chose ("Is there a deer?")."""

    def __init__(self, cache: Path, categories: list[str]):
        import imagenet_to_onnx as ito

        spec = tomllib.loads((HERE / "classifier" / "imagenet-categories.toml").read_text())
        self.wn = ito.WordNet(cache / "models" / "classifier" / "wordnet")
        self.categories = [(c["name"], {o: self.wn.ancestors(o) for o in self.wn.synsets(c)})
                           for c in spec["category"] if c["name"] in categories]
        # Things, not what they are made of or do: senses under whole.n.02 (living things, artifacts).
        self.whole = self.wn.index["whole"][1]
        self.depth = lru_cache(maxsize=None)(lambda o: max(self.wn.ancestors(o).values()))
        # Nearer than any two animals or any two artifacts: the common hypernym deeper than
        # animal.n.01 (a giraffe and a deer are ruminants, a caterpillar and a dog only animals).
        self.min_depth = self.depth(self.wn.index["animal"][0]) + 1

    def synset(self, words: list[str]) -> str | None:
        """The first noun sense that is a whole thing (an otter, not its fur) of the longest run of
        `words` WordNet knows (the whole name first, then shorter runs from the front; a plural
        as its singular)."""
        for n in range(len(words), 0, -1):
            for i in range(len(words) - n + 1):
                lemma = "_".join(words[i:i + n])
                for form in (lemma, lemma.removesuffix("s"), lemma.removesuffix("es")):
                    things = [o for o in self.wn.index.get(form, []) if self.whole in self.wn.ancestors(o)]
                    if things:
                        return things[0]
        return None

    def of(self, u: dict) -> str | None:
        """The category nearest to the unknown thing `u`; None when WordNet does not know its
        name as a whole thing, or files it under a category (a pitcher is also a person)."""
        off = self.synset(thing_words(u))
        if off is None:
            return None
        up = self.wn.ancestors(off)
        if any(s in up for _, synsets in self.categories for s in synsets):
            return None
        best = None
        for name, synsets in self.categories:
            for down in synsets.values():
                for a in up.keys() & down.keys():
                    key = (-self.depth(a), up[a] + down[a], name)
                    best = key if best is None or key < best else best
        return best[2] if best and -best[0] >= self.min_depth else None


def write_eval(cfg: dict, cache: Path, work: Path) -> None:
    """The evaluation set for `scenecast eval`: held-out pair scenes, empty scenes, whole real photos.

    It has its own random stream (seed + 2), so it can be written without composing the training set."""
    out = work / "eval"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg["seed"] + 2)
    comp = Composer(cfg, cache / "models" / "photos", rng)
    scenes = []
    # Unknown things are also asked about their nearest known category (kind `lookalike`, not drawn
    # from `rng`: every other question stays as it was). Needs WordNet (part `wordnet`).
    lookalikes = None
    if (cache / "models" / "classifier" / "wordnet" / "data.noun").is_file():
        lookalikes = Lookalikes(cache, comp.categories)
    else:
        log("    no WordNet in the cache (make models): the set has no lookalike questions")

    def ask_lookalike(u: dict) -> None:
        """Adds to the last scene, which shows the unknown thing `u` alone, the question about
        its nearest known category, when it has one."""
        near = lookalikes.of(u) if lookalikes else None
        if near:
            scenes[-1]["questions"].append(
                {"kind": "lookalike", "question": f"Is there {article(near)} in the image?", "expect": "no"})

    def questions(names: list[str], positions: dict[str, str]) -> list[dict]:
        qs = []
        for n in names:
            qs.append({"kind": "yesno", "question": f"Is there {article(n)} in the image?", "expect": "yes"})
        absent = [c for c in comp.categories if c not in names]
        for n in rng.choice(absent, size=max(1, len(names)), replace=False):
            qs.append({"kind": "yesno", "question": f"Is there {article(str(n))} in the image?", "expect": "no"})
        for n, p in positions.items():
            qs.append({"kind": "position", "question": f"Where is the {n}?", "expect": p})
        return qs

    for i in range(cfg["data"]["eval_pairs"]):
        img, m = comp.pair(comp.heldout_pairs, "heldout-pair")
        name = f"pair-{i:03}.png"
        img.save(out / name)
        names = [o["name"] for o in m["objects"]]
        scenes.append({"image": name, "kind": m["kind"], "objects": names,
                       "questions": questions(names, {o["name"]: o["position"] for o in m["objects"]})})
    def add(img: Image.Image, m: dict, name: str) -> None:
        img.save(out / name)
        names = [o["name"] for o in m["objects"]]
        positions = {o["name"]: o["position"] for o in m["objects"] if "position" in o} if len(set(names)) == len(names) else {}
        scenes.append({"image": name, "kind": m["kind"], "objects": names, "questions": questions(names, positions)})

    v2 = comp.v2
    for i in range(cfg["data"]["eval_empty"]):
        img, m = comp.plain() if v2 else comp.empty()
        add(img, {**m, "kind": "empty"}, f"empty-{i:03}.png")
    if v2:
        # Held out by exemplar: every held-out cut-out alone (a few views each), held-out cut-outs
        # in pairs, unknown objects never trained on alone and next to a known held-out object.
        held = [(c["name"], p) for c in cfg["category"] for p in c["photos"] if p.get("heldout") and "crop" not in p]
        for k, (name, p) in enumerate(held):
            for v in range(cfg["data"]["eval_exemplar_views"]):
                img, m = comp.exemplar_single(name, p)
                add(img, m, f"exemplar-{k:03}-{v}.png")
        for i in range(cfg["data"]["eval_exemplar_pairs"]):
            (a, pa), (b, pb) = [held[j] for j in rng.choice(len(held), 2, replace=False)]
            while a == b:
                (a, pa), (b, pb) = [held[j] for j in rng.choice(len(held), 2, replace=False)]
            canvas = comp.background()
            scale = tuple(cfg["data"]["pair_scale"])
            left = comp.paste(canvas, comp.cutout(pa), "left", scale)
            right = comp.paste(canvas, comp.cutout(pb), "right", scale)
            add(canvas, {"kind": "exemplar-heldout-pair", "objects": [{"name": a, "position": "left", "box": left},
                                                                      {"name": b, "position": "right", "box": right}]},
                f"exemplar-pair-{i:03}.png")
        unknown = [u for u in comp.unknown_heldout if "stamp" in u or "crop" not in u]
        for k, u in enumerate(unknown):
            for v in range(cfg["data"]["eval_exemplar_views"]):
                img, m = comp.empty([u])
                add(img, {**m, "kind": "unknown-heldout"}, f"unknown-{k:03}-{v}.png")
                ask_lookalike(u)
        for i in range(cfg["data"]["eval_half"]):
            img, m = comp.half(comp.unknown_heldout, comp.heldout_photos)
            add(img, {**m, "kind": "half-heldout"}, f"half-{i:03}.png")
    for c in cfg["category"]:
        for p in c["photos"]:
            if "stamp" in p:
                continue
            kind = "photo-heldout" if p.get("heldout") else "photo"
            if "crop" in p:  # a photo inside a larger file: the crop, as the camera would deliver it
                name = f"{kind}-{Path(p['file']).stem}.png"
                comp.open(p).save(out / name)
            else:  # whole photos as the camera delivers them: the Rust pipeline resizes them itself
                name = str(cache / "models" / "photos" / p["file"])
            scenes.append({"image": name, "kind": kind, "objects": [c["name"]], "questions": questions([c["name"]], {})})
    def unknown_photos(pool: list[dict], kind: str, prefix: str) -> None:
        # Whole photos of nothing known (the pool's photos, not its cut-outs).
        for u in pool:
            if "crop" in u or ("file" in u and "stamp" not in u):
                name = f"{prefix}-{Path(u['file']).stem}.png"
                comp.open(u).save(out / name)
                scenes.append({"image": name, "kind": kind, "objects": [], "questions": questions([], {})})
                ask_lookalike(u)

    if v2:
        unknown_photos(comp.unknown_heldout, "unknown-photo-heldout", "unknown-photo")
    if "cifar10" in cfg:
        # CIFAR-10's test photos (never trained on): whole frames, and pasted into scenes as one
        # object at the training scale. Their own random stream, after every other row.
        spec = cfg["cifar10"]
        cc = Composer(cfg, cache / "models" / "photos", np.random.default_rng(cfg["seed"] + 5))
        frames = cc.cifar.exemplars("test", spec["eval_frames"])
        pasted = cc.cifar.exemplars("test", spec["eval_pasted"], skip=spec["eval_frames"])
        for name in cc.cifar.names:
            for k, e in enumerate(frames[name]):
                img, box = cc.photo_view(e)
                add(img, {"kind": "cifar-photo-heldout", "objects": [{"name": name, "box": box}]}, f"cifar-{name}-{k:02}.png")
            for k, e in enumerate(pasted[name]):
                img, m = cc.exemplar_single(name, e)
                add(img, {**m, "kind": "cifar-heldout"}, f"cifar-pasted-{name}-{k:02}.png")
    if v2:
        # Whole photos of unknown things the projector trained on ("No known object."): not
        # scored as held out, they calibrate the caption check's classifier threshold against the
        # training photos of known things (`scenecast calibrate --unknown-kind unknown-photo`).
        # Last, so every scene before them stays as it was.
        unknown_photos(comp.unknown_train, "unknown-photo", "unknown-photo-train")
    doc = {"name": cfg["name"], "categories": comp.categories, "caption_prompt": cfg["questions"]["caption_prompts"][0],
           "scenes": scenes}
    (out / "eval.json").write_text(json.dumps(doc, indent=1))
    log(f"    evaluation set: {len(scenes)} scenes in {out / 'eval.json'}")


# ---------------------------------------------------------------------------------------------
# Training (step 3) and export (step 4)


def load_frozen_llm(gguf: Path):
    """The GGUF backbone as a frozen float model (transformers, gguf_file=) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.requires_grad_(False)
    model.eval()
    return model, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def pad(seqs: list):
    """Embedded sequences of different lengths as one zero-padded batch [b, length, width] and its mask."""
    import torch

    length = max(len(s) for s in seqs)
    x = torch.zeros(len(seqs), length, seqs[0].shape[1])
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for r, s in enumerate(seqs):
        x[r, :len(s)], mask[r, :len(s)] = s, 1
    return x, mask


# The LLM's linear layers that a LoRA adapter may adapt: transformers' name -> llama.cpp's.
LORA_TARGETS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def add_lora(model, spec: dict, gate: dict | None = None) -> dict:
    """Wraps the `spec["targets"]` projections of every layer of `model` in rank-`spec["rank"]` LoRA
    adapters (B starts at zero: the model is unchanged until trained). Returns {gguf tensor name: module}.
    With `gate`, the adapters' change is multiplied by `gate["mask"]` ([b, length, 1], or None for
    everywhere): `[adapter] scope = "scene"` sets it to 1 on the scene prefix (chat prefix and image
    tokens) and 0 after, as the runtime applies such an adapter (llama.cpp, while it decodes the
    scene prefix only); `"prompt"` to 1 up to the end of each row's question ("questions": a caption row's
    to the end of the scene prefix)."""
    import torch

    class Lora(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear):
            super().__init__()
            self.base, self.scale = base, spec["alpha"] / spec["rank"]
            self.a = torch.nn.Parameter(torch.randn(spec["rank"], base.in_features) / base.in_features ** 0.5)
            self.b = torch.nn.Parameter(torch.zeros(base.out_features, spec["rank"]))

        def forward(self, x):
            delta = (x @ self.a.T @ self.b.T) * self.scale
            if gate is not None and gate.get("mask") is not None:
                delta = delta * gate["mask"]
            return self.base(x) + delta

    adapted = {}
    for i, layer in enumerate(model.model.layers):
        for name in spec["targets"]:
            if name not in LORA_TARGETS:
                raise SystemExit(f"error: adapter.targets: {name!r} is not one of {', '.join(LORA_TARGETS)}")
            parent = layer.self_attn if LORA_TARGETS[name].startswith("attn_") else layer.mlp
            module = Lora(getattr(parent, name))
            setattr(parent, name, module)
            adapted[f"blk.{i}.{LORA_TARGETS[name]}.weight"] = module
    return adapted


def export_adapter(cfg: dict, adapted: dict, model_config, dest: Path) -> None:
    """Writes the LoRA adapter as the GGUF llama.cpp loads next to the unchanged backbone
    (`llama_adapter_lora_init`): lora_a [rank, in] and lora_b [out, rank] per weight, f16.
    transformers un-permutes the GGUF's q/k rows on load (rotary layout), so B's rows of q and k
    are permuted back here, as llama.cpp's convert_lora_to_gguf.py does."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    heads = {"num_attention_heads": model_config.num_attention_heads, "num_key_value_heads": model_config.num_key_value_heads}
    loader = LlamaTensorProcessor(config=heads)  # what transformers does to q/k rows on load

    def permute(w, n):
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(str(dest), arch="llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg["adapter"]["alpha"]))
    writer.add_name(f"{cfg['name']} LoRA")
    for name, module in adapted.items():
        a, b = module.a.detach().numpy(), module.b.detach().numpy()
        if ".attn_q." in name or ".attn_k." in name:
            trained = b
            b = permute(b, heads["num_attention_heads" if ".attn_q." in name else "num_key_value_heads"])
            if not np.array_equal(loader.process(b, name).weights, trained):
                raise SystemExit(f"error: {name}: the rotary row order does not round-trip through transformers' GGUF loader")
        writer.add_tensor(name + ".lora_a", a.astype(np.float16))
        writer.add_tensor(name + ".lora_b", b.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def global_targets(metas: list[dict], categories: list[str], pairs: bool = True) -> np.ndarray:
    """For every scene, what a global image token (the whole frame's) should point at: [n,
    len(categories) + 1], the known categories shown, equally (a pair: half each), or the last
    column, background, when none is; all zeros (no target) for the user's own photos and, without
    `pairs`, for scenes of two or more known categories."""
    out = np.zeros((len(metas), len(categories) + 1), np.float32)
    for n, meta in enumerate(metas):
        if meta["kind"] == "user":
            continue
        shown = sorted({categories.index(o["name"]) for o in meta["objects"]})
        if len(shown) > 1 and not pairs:
            continue
        if shown:
            out[n, shown] = 1.0 / len(shown)
        else:
            out[n, -1] = 1.0
    return out


def strip_labels(metas: list[dict], categories: list[str], regions: int) -> np.ndarray:
    """For every scene and vertical strip (left to right, as the detection tokens): the index of the
    known category whose box covers at least half of the strip's width or has its centre in it (a
    later paste wins), len(categories) for a strip no object reaches (at most a tenth of its width),
    or -100 where it is unclear: partly covered strips, and every strip without a known object in
    scenes that show an unknown one (the composer does not record where) or a user's photo."""
    out = np.full((len(metas), regions), -100, np.int64)
    for n, meta in enumerate(metas):
        if meta["kind"] == "user":
            continue
        unknown_somewhere = meta["kind"] in ("unknown", "half")
        for r in range(regions):
            x0, x1 = r / regions, (r + 1) / regions
            label, unclear = len(categories), False
            for o in meta["objects"]:
                bx0, _, bx1, _ = o["box"]
                cover = max(0.0, min(bx1, x1) - max(bx0, x0)) * regions
                if cover >= 0.5 or x0 <= (bx0 + bx1) / 2 < x1:
                    label, unclear = categories.index(o["name"]), False
                elif cover > 0.1 and label == len(categories):
                    unclear = True
            if unclear or (unknown_somewhere and label == len(categories)):
                label = -100
            out[n, r] = label
    return out


def adapter_scope(cfg: dict) -> str:
    """`[adapter] scope`: "all" (the adapter computes on every token: every request pays for it
    unless it is merged), "scene" (only on the scene prefix, like CogVLM's visual expert: the
    question, the answer and text-only requests run the base model unchanged) or "prompt" (the
    scene prefix and the question, everything the model reads about an image, so the answer's
    first token is the adapter's; the rest of the answer runs the base model) or "questions" (as
    "prompt" for questions, as "scene" for captions: the caption prompt runs the base model)."""
    scope = (cfg.get("adapter") or {}).get("scope", "all")
    if scope not in ("all", "scene", "prompt", "questions"):
        raise SystemExit(f"error: adapter.scope is {scope!r}; expected \"all\", \"scene\", \"prompt\" or \"questions\"")
    return scope


def fuse_detections(feats, dets, grid: list[int], frame: bool):
    """What each cell of a fused projector (`[detector] cells`) reads: [b, cells, width] features
    and [b, cells, classes] detector scores -> [b, cells, width + 2 or 3 classes], each cell's
    features, the scores in the cell, their maximum over its 3 x 3 neighbourhood and (with
    `frame`) over the whole frame (torch tensors)."""
    import torch

    b, n, c = dets.shape
    g = dets.reshape(b, grid[0], grid[1], c).permute(0, 3, 1, 2)
    near = torch.nn.functional.max_pool2d(g, 3, 1, 1).permute(0, 2, 3, 1).reshape(b, n, c)
    if not frame:
        return torch.cat([feats, dets, near], dim=-1)
    whole = dets.max(dim=1, keepdim=True).values.expand(b, n, c)
    return torch.cat([feats, dets, near, whole], dim=-1)


def make_projector(width: int, hidden: int, classes: int, regions: int, grid: list[int] | None = None,
                   frame: bool = True, global_tokens: int = 0):
    """The projector: two layers over each pooled patch token, and, with `regions`, two layers over
    each vertical strip's detector class scores plus a learned embedding of the strip, whose
    `regions` tokens follow the patch tokens. With `grid` (`[detector] cells`), the detector's
    scores are fused into the patch tokens instead: each cell's two layers read its patch features
    next to the detector's scores in the cell, their maximum over the cell's 3 x 3 neighbourhood
    and (with `frame`) over the whole frame, and no token is added (make_projector.graph_from
    writes the same graph).

    With `global_tokens` (only with `grid`), the last that many rows of the input are the encoder's
    leading tokens (CLS), not patch cells: each goes through two layers of its own, reading it next
    to the whole frame's maximum detector score per class, and becomes an image token after the
    cells' (a view of the whole image, which reads new exemplars better than the pooled patches)."""
    import torch

    if global_tokens and not grid:
        raise SystemExit("error: model.global_tokens needs the detector fused into the cells ([detector] cells = true); "
                         "the global tokens read the whole frame's detector scores")

    class Projector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.grid = grid
            inputs = width + (3 if frame else 2) * classes if grid else width
            self.patches = torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
            self.regions = 0 if grid else regions
            if self.regions:
                self.detections = torch.nn.Sequential(torch.nn.Linear(classes, hidden), torch.nn.GELU(),
                                                      torch.nn.Linear(hidden, hidden))
                self.place = torch.nn.Parameter(torch.zeros(regions, hidden))
            self.global_tokens = global_tokens
            if global_tokens:
                self.whole = torch.nn.Sequential(torch.nn.Linear(width + classes, hidden), torch.nn.GELU(),
                                                 torch.nn.Linear(hidden, hidden))

        def forward(self, feats, dets=None):
            if self.global_tokens:
                g = self.global_tokens
                cells, whole = feats[:, :-g], feats[:, -g:]
                frame_max = dets.max(dim=1, keepdim=True).values.expand(-1, g, -1)
                whole = torch.cat([whole, frame_max], dim=-1)
                return torch.cat([self.patches(fuse_detections(cells, dets, grid, frame)), self.whole(whole)], dim=-2)
            if self.grid:
                return self.patches(fuse_detections(feats, dets, grid, frame))
            tokens = self.patches(feats)
            if self.regions:
                tokens = torch.cat([tokens, self.detections(dets) + self.place], dim=-2)
            return tokens

    return Projector()


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (x86's AVX512-BF16 or AMX, Arm's BF16), where
    PyTorch's bfloat16 matrix products are faster than float32 ones rather than emulated."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in info.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def llm_precision(cfg: dict):
    """The context the LLM's forward and backward passes run in (`[train] autocast`): "bf16" runs
    the frozen LLM's matrix products in bfloat16 (1.6 times faster here) where the CPU has bfloat16
    instructions and in float32 elsewhere, with a warning; the projector, the adapter's weights,
    the optimiser and the losses stay float32."""
    import torch

    mode = cfg["train"].get("autocast", "none")
    if mode not in ("none", "bf16"):
        raise SystemExit(f"error: train.autocast is {mode!r}; expected \"none\" or \"bf16\"")
    if mode == "bf16" and not cpu_has_bf16():
        log("    warning: train.autocast = \"bf16\", but this CPU has no bfloat16 instructions: the LLM runs in float32 "
            "(slower, and not the numbers of a bfloat16 run)")
        mode = "none"
    if mode == "bf16":
        log("    the LLM's matrix products run in bfloat16 (train.autocast)")
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def train(cfg: dict, cache: Path, feats: np.ndarray, dets: np.ndarray | None, metas: list[dict]):
    import torch

    t = cfg["train"]
    # `[train] seed`: the training's own randomness (initialisation, batches, questions, dropout),
    # apart from `seed`, which also composes the scenes and the evaluation set: a second run of a
    # recipe on the same data and judged on the same scenes differs by this alone.
    seed = int(t.get("seed", cfg["seed"]))
    torch.manual_seed(seed)
    torch.set_num_threads(t["threads"])
    llm = cache / "models" / cfg["model"]["llm"]
    log(f"[3/4] loading {llm.name} as a frozen float model")
    model, tok = load_frozen_llm(llm)
    precision = llm_precision(cfg)
    embed = model.get_input_embeddings()
    hidden = cfg["model"]["hidden"]
    if embed.weight.shape[1] != hidden:
        raise SystemExit(f"error: model.hidden in the training configuration is {hidden}, but {llm.name} has "
                         f"width {embed.weight.shape[1]}; set model.hidden to {embed.weight.shape[1]}")

    cells = cfg.get("detector", {}).get("cells", False)
    regions = 0 if dets is None or cells else dets.shape[1]
    m = cfg["model"]
    proj = make_projector(feats.shape[2], hidden, 0 if dets is None else dets.shape[2], regions,
                          cfg["model"]["pool"] if cells else None, cfg.get("detector", {}).get("frame", True),
                          int(m.get("global_tokens", 0)))
    opt = torch.optim.AdamW(proj.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])

    def lr_at(step: int) -> float:
        if step < t["warmup"]:
            return t["lr"] * (step + 1) / t["warmup"]
        p = (step - t["warmup"]) / max(1, t["steps"] - t["warmup"])
        return t["lr_min"] + 0.5 * (t["lr"] - t["lr_min"]) * (1 + math.cos(math.pi * p))

    @lru_cache(maxsize=None)
    def ids(text: str) -> tuple[int, ...]:
        return tuple(tok(text, add_special_tokens=False).input_ids)

    prefix = torch.tensor(ids(m["prefix"]))
    general = general_answers(cfg, model, tok, ids)  # the frozen LLM's own answers, before any adapter
    adapter = cfg.get("adapter")
    if adapter and not 0 <= adapter["start"] < t["steps"]:
        log(f"    warning: adapter.start {adapter['start']} is not below train.steps {t['steps']}: the adapter does "
            f"not train and is written unchanged (it changes nothing); lower adapter.start for a trained one")
    scope = adapter_scope(cfg)
    gate = {"mask": None}
    adapted = add_lora(model, adapter, gate) if adapter else {}

    def scene_gate(length: int, image_tokens: int, prompts) -> None:
        """Limits a scoped adapter: "scene" to the first len(prefix) + image_tokens positions of the
        batch, "prompt" and "questions" to each row's first `prompts[row]` positions (its prompt,
        before the answer; the caller gives a caption row of "questions" the scene prefix's length)."""
        if scope == "scene":
            gate["mask"] = (torch.arange(length) < len(prefix) + image_tokens).float()[None, :, None]
        elif scope in ("prompt", "questions"):
            gate["mask"] = (torch.arange(length)[None, :] < torch.as_tensor(prompts)[:, None]).float()[:, :, None]
    adapter_params = [p for m in adapted.values() for p in (m.a, m.b)]
    rng = np.random.default_rng(seed + 1)
    categories = [c["name"] for c in cfg["category"]]
    feats_t = torch.from_numpy(feats)
    dets_t = None if dets is None else torch.from_numpy(dets)

    # Feature dropout (`[train] feature_dropout`): that share of the training scenes shows the
    # projector the detector's scores without the patch features (zeros), so it learns to name
    # what the second encoder's category columns say on their own. The patch features of a few
    # exemplars per category are enough to learn those exemplars, and a projector that leans on
    # them says "nothing" for a new photo that the classifier names with certainty. Only scenes
    # whose every known object has a category column that scores it (`detector.category_prefix`;
    # a column of zeros scores nothing) are dropped: without features and scores a scene would
    # teach guessing.
    drop_p = float(t.get("feature_dropout", 0.0))
    if not 0.0 <= drop_p <= 1.0:
        raise SystemExit(f"error: train.feature_dropout is {drop_p}; expected a share of the scenes in [0, 1]")
    droppable = torch.zeros(len(metas), dtype=torch.bool)
    if drop_p > 0:
        facts = cfg.get("detector", {}).get("facts")
        if dets is None or facts is None or not facts.category_prefix:
            raise SystemExit("error: train.feature_dropout needs a [detector] whose manifest names the columns that "
                             "score the categories (detector.category_prefix); without them a scene without its "
                             "patch features carries nothing to name")
        pre = facts.category_prefix
        column = {c[len(pre):]: j for j, c in enumerate(facts.classes) if c.startswith(pre)}
        covered = {name for name, j in column.items() if name in categories and float(dets[:, :, j].max()) > 0}
        droppable = torch.tensor([all(o["name"] in covered for o in m["objects"]) for m in metas])
        log(f"    feature dropout: {drop_p:.0%} of the {int(droppable.sum())} scenes whose known objects the "
            f"detector's category columns score ({len(covered)} of {len(categories)} categories) see no patch features")
    drop_rng = torch.Generator().manual_seed(seed + 5)

    def project(idx, dropout: bool = False):
        """Image tokens of the scenes `idx`: [b, tokens (+ regions), hidden]; with `dropout`, a
        training step's, feature dropout applies."""
        f = feats_t[idx]
        if dropout and drop_p > 0:
            drop = droppable[idx] & (torch.rand(len(idx), generator=drop_rng) < drop_p)
            f = f * (~drop).to(f.dtype)[:, None, None]
        return proj(f, None if dets_t is None else dets_t[idx])

    # Grounding: each image token over an object should point where the LLM's own embedding of
    # the object's name points, and a background token away from every name. Image tokens then
    # read like words to the frozen LLM, one per cell, so what it learns about a cat on the left
    # carries over to pairs it never saw together.
    # With aux_position, an object's tokens also lean towards the word of its position (left,
    # centre, right), so "Where is the cat?" finds the answer where it finds the cat.
    cells, wheres = (torch.from_numpy(a) for a in cell_labels(metas, categories, m["pool"]))
    if regions:
        # The detection tokens are grounded like patch tokens: each strip's token points at the name
        # of the known object in that strip, or away from every name.
        cells = torch.cat([cells, torch.from_numpy(strip_labels(metas, categories, regions))], dim=1)
        wheres = torch.cat([wheres, torch.full((len(metas), regions), -100)], dim=1)
    with torch.no_grad():
        names = torch.stack([embed(torch.tensor(ids(" " + c))).mean(0) for c in categories])
        places = torch.stack([embed(torch.tensor(ids(" " + p))).mean(0) for p in POSITIONS])
    names = torch.nn.functional.normalize(names, dim=-1)
    places = torch.nn.functional.normalize(places, dim=-1)
    background = torch.nn.Parameter(torch.zeros(1))

    def labelled_ce(logits, labels):
        """Cross-entropy over the labelled rows (label != -100); 0 when a batch has none (a batch of
        eight scenes can hold no object with a position: cross_entropy's mean over nothing is NaN,
        which would poison every weight through the optimiser)."""
        keep = labels.reshape(-1) != -100
        if not bool(keep.any()):
            return logits.sum() * 0.0
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1])[keep], labels.reshape(-1)[keep])

    # A global token (the whole frame's) points at every known object shown, or at background.
    # With `[train] global_pairs = false`, not in scenes of two known categories (a blend of both).
    wholes = torch.from_numpy(global_targets(metas, categories, t.get("global_pairs", True)))

    def grounding(img, idx):
        unit = torch.nn.functional.normalize(img, dim=-1)
        lab = cells[idx]
        logits = torch.cat([unit @ names.T * t["aux_scale"], background.expand(*unit.shape[:2], 1)], dim=-1)
        whole, logits, unit = logits[:, lab.shape[1]:], logits[:, :lab.shape[1]], unit[:, :lab.shape[1]]
        loss = labelled_ce(logits, lab)
        if whole.shape[1]:
            target = wholes[idx][:, None, :].expand(-1, whole.shape[1], -1)
            per_token = -(target * torch.log_softmax(whole, dim=-1)).sum(-1)
            loss = loss + (per_token * (target.sum(-1) > 0)).sum() / (target.sum(-1) > 0).sum().clamp(min=1)
        if t.get("aux_position", 0.0) > 0:
            loss = loss + t["aux_position"] * labelled_ce(unit @ places.T * t["aux_scale"], wheres[idx])
        known = lab != -100
        acc = (logits.argmax(-1)[known] == lab[known]).float().mean() if bool(known.any()) else torch.tensor(0.0)
        return loss, float(acc)

    pick = np.array([i for i, m in enumerate(metas) if m["kind"] != "check"])
    check = np.array([i for i, m in enumerate(metas) if m["kind"] == "check"])

    def check_grounding() -> float:
        with torch.no_grad():
            return grounding(project(check), check)[1]

    # Yes/no on the held-out pairs, as the LLM's first-token preference of "Yes" over "No": one
    # question about an object shown and one about a category not shown, per scene.
    ask_rng = np.random.default_rng(cfg["seed"] + 4)
    asked = []
    for i in check:
        present = [o["name"] for o in metas[i]["objects"]]
        absent = [c for c in categories if c not in present]
        for name, shown in ((present[0], True), (absent[ask_rng.integers(len(absent))], False)):
            q = YESNO[ask_rng.integers(len(YESNO))].format(a=article(name))
            asked.append((i, torch.tensor(ids(m["suffix"].format(question=q))), shown))
    yes, no = ids("Yes")[0], ids("No")[0]

    def check_yesno() -> float:
        right = 0
        with torch.no_grad():
            for c in range(0, len(asked), 50):
                chunk = asked[c:c + 50]
                img = project([i for i, _, _ in chunk])
                x, mask = pad([torch.cat([embed(prefix), img[r], embed(suf)]) for r, (_, suf, _) in enumerate(chunk)])
                scene_gate(x.shape[1], img.shape[1], mask.sum(1))
                with precision():
                    states = model.model(inputs_embeds=x, attention_mask=mask).last_hidden_state
                    logits = model.lm_head(states[torch.arange(len(chunk)), mask.sum(1) - 1]).float()
                right += sum((float(l[yes] - l[no]) > 0) == shown for l, (_, _, shown) in zip(logits, chunk))
        return right / len(asked)

    if t.get("aux_steps", 0) > 0:
        log(f"    grounding: {t['aux_steps']} steps on image tokens alone (no LLM), batch {t['aux_batch']}")
        aux_opt = torch.optim.AdamW(list(proj.parameters()) + [background], lr=t["lr"])
        for step in range(t["aux_steps"]):
            idx = pick[rng.integers(len(pick), size=t["aux_batch"])]
            loss, acc = grounding(project(idx, dropout=True), idx)
            aux_opt.zero_grad()
            loss.backward()
            aux_opt.step()
            if (step + 1) % 100 == 0:
                log(f"    grounding step {step + 1}/{t['aux_steps']}  loss {float(loss):.3f}  cell accuracy {acc:.3f}, "
                    f"on held-out pairs {check_grounding():.3f}")
    opt.add_param_group({"params": [background]})
    history = []
    start = time.monotonic()
    for step in range(t["steps"]):
        if adapter and step == adapter["start"]:
            # LLaVA's stage 2, cheaply: the LLM's weights move too, through a small adapter, so it
            # learns to compare a question's words with the image tokens (presence, position).
            log(f"    adapter: from step {step + 1} on, LoRA rank {adapter['rank']} on {', '.join(adapter['targets'])} "
                f"of every layer ({sum(p.numel() for p in adapter_params):,} parameters) trains too")
            opt.add_param_group({"params": adapter_params})
        idx = pick[rng.integers(len(pick), size=t["batch"])]
        img = project(idx, dropout=True)  # [b, tokens, hidden]
        confusable = [[]] * len(idx)
        if cfg["questions"].get("hard_negative", 0.0) > 0:
            # Hard negatives: the absent categories the image tokens point at most now (their best
            # cell's cosine with the name), so "No" is learned where the tokens mislead.
            with torch.no_grad():
                ranked = (torch.nn.functional.normalize(img, dim=-1) @ names.T).amax(1).argsort(dim=-1, descending=True)
            confusable = []
            for row, i in zip(ranked.tolist(), idx):
                shown = {o["name"] for o in metas[i]["objects"]}
                confusable.append([categories[c] for c in row if categories[c] not in shown][:cfg["questions"].get("hard_top", 3)])
        seqs, labels, prompts, gated = [], [], [], []
        for row, i in enumerate(idx):
            q, a = question(metas[i], cfg, categories, rng, general, confusable[row])
            suffix = torch.tensor(ids(m["suffix"].format(question=q)))
            answer = torch.tensor(ids(a) + ids(m["end"]))
            with torch.no_grad():
                pre, suf, ans = embed(prefix), embed(suffix), embed(answer)
            seqs.append(torch.cat([pre, img[row], suf, ans]))
            prompts.append(len(prefix) + img.shape[1] + len(suffix))
            labels.append(torch.cat([torch.full((prompts[-1],), -100), answer]))
            # Scope "questions": a caption's prompt runs the base model, as the runtime's captions do.
            caption_row = scope == "questions" and q in cfg["questions"]["caption_prompts"]
            gated.append(len(prefix) + img.shape[1] if caption_row else prompts[-1])
        x, mask = pad(seqs)
        scene_gate(x.shape[1], img.shape[1], gated)
        y = torch.full(mask.shape, -100)
        for r, lab in enumerate(labels):
            y[r, :len(lab)] = lab
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        # How much each example weighs (train.example_weight): "example", every example the same
        # however long its answer; "token", every answer token the same (a two-token "Yes." then
        # counts for little against a twelve-token caption); "sqrt", in between.
        # The LM head only where there is a target: most positions are image and prompt tokens.
        target = y[:, 1:]
        valid = target != -100
        with precision():
            states = model.model(inputs_embeds=x, attention_mask=mask).last_hidden_state[:, :-1]
            logits = model.lm_head(states[valid])
        ce = torch.zeros(target.shape)
        ce[valid] = torch.nn.functional.cross_entropy(logits.float(), target[valid], reduction="none")
        valid = valid.float()
        n = valid.sum(1).clamp(min=1)
        weighting = t.get("example_weight", "example")
        weight = {"example": torch.ones_like(n), "sqrt": n.sqrt(), "token": n}[weighting]
        loss = ((ce * valid).sum(1) / n * weight).sum() / weight.sum()
        if t.get("norm_penalty", 0.0) > 0:
            # Keep image tokens near the scale of text embeddings, so they inform attention
            # instead of swamping it.
            excess = (img.norm(dim=-1) - t["norm_target"]).clamp(min=0)
            loss = loss + t["norm_penalty"] * (excess ** 2).mean()
        if t.get("aux_weight", 0.0) > 0:
            aux, _ = grounding(img, idx)
            loss = loss + t["aux_weight"] * aux
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(proj.parameters(), t["clip"])
        if adapter and step >= adapter["start"]:
            torch.nn.utils.clip_grad_norm_(adapter_params, t["clip"])
        opt.step()
        history.append(float(loss))
        if (step + 1) % 20 == 0 or step == 0:
            el = time.monotonic() - start
            recent = sum(history[-20:]) / len(history[-20:])
            log(f"    step {step + 1}/{t['steps']}  loss {recent:.3f}  lr {lr_at(step):.2e}  "
                f"{el / (step + 1):.2f} s/step, {el / (step + 1) * (t['steps'] - step - 1) / 60:.1f} min left"
                + (f"  on held-out pairs: grounding {check_grounding():.3f}, yes/no {check_yesno():.3f}"
                   if (step + 1) % 100 == 0 else ""))
    log(f"    trained; on held-out pairs (torch): grounding {check_grounding():.3f}, yes/no {check_yesno():.3f}")
    return proj, adapted, model.config, history, time.monotonic() - start


def general_answers(cfg: dict, model, tok, ids) -> list[tuple[str, str]]:
    """The frozen LLM's own answers to questions that are not about the image, asked without an
    image. Trained with an image in front, they teach the projector to leave the LLM's other
    abilities alone (LLaVA mixes in text-only data for the same reason)."""
    import torch

    questions = cfg["questions"].get("general_questions", [])
    m = cfg["model"]
    out = []
    for q in questions:
        prompt = torch.tensor([ids(m["prefix"]) + ids(m["suffix"].format(question=q))])
        with torch.no_grad():
            gen = model.generate(prompt, max_new_tokens=48, do_sample=False, eos_token_id=ids(m["end"])[0],
                                 pad_token_id=ids(m["end"])[0])
        answer = tok.decode(gen[0, prompt.shape[1]:], skip_special_tokens=True).strip()
        if answer:
            out.append((q, answer))
    log(f"    {len(out)} general questions answered by the frozen LLM (kept as targets)")
    return out


def export(cfg: dict, proj, feats: np.ndarray, dets: np.ndarray | None, dest: Path, cache: Path) -> float:
    """Writes the projector's ONNX graph and returns its largest difference from torch. With a
    detector, the graph reads the detector's raw scores and pools them itself, so the check runs
    the detector on real photos and compares against torch on the same scores pooled in numpy."""
    import onnxruntime as ort
    import torch

    from make_projector import graph_from

    p = proj.patches
    w1, b1 = p[0].weight.detach().numpy().T, p[0].bias.detach().numpy()
    w2, b2 = p[2].weight.detach().numpy().T, p[2].bias.detach().numpy()
    detections = None
    cells = cfg.get("detector", {}).get("cells", False)
    if dets is not None and cells:
        facts = cfg["detector"]["facts"]
        detections = {"input": cfg["detector"]["input"], "cells": cell_anchors(facts, cfg["model"]["pool"]),
                      "grid": cfg["model"]["pool"], "shape": [anchor_count(facts), dets.shape[2]],
                      "frame": cfg["detector"].get("frame", True)}
        if proj.global_tokens:
            w = proj.whole
            detections["global"] = {"tokens": proj.global_tokens, "w1": w[0].weight.detach().numpy().T, "b1": w[0].bias.detach().numpy(),
                                    "w2": w[2].weight.detach().numpy().T, "b2": w[2].bias.detach().numpy()}
    elif dets is not None:
        d = proj.detections
        mask = region_mask(cfg["detector"]["facts"], dets.shape[1])
        detections = {"input": cfg["detector"]["input"], "mask": mask,
                      "w1": d[0].weight.detach().numpy().T, "b1": d[0].bias.detach().numpy(),
                      "w2": d[2].weight.detach().numpy().T, "b2": d[2].bias.detach().numpy(),
                      "place": proj.place.detach().numpy()}
    model = graph_from(w1, b1, w2, b2, cfg["name"], "scenecast/models/train_projector.py", detections)
    dest.write_bytes(model.SerializeToString())
    sess = ort.InferenceSession(str(dest), providers=["CPUExecutionProvider"])
    worst = 0.0
    scores = None if dets is None else detector(cache, cfg["detector"]["facts"])
    for n in range(4):
        x = feats[n]
        feed = {"image_features": x}
        raw = None
        if dets is not None:
            photo = ["chelsea.png", "coffee.png", "motorcycle_left.png", "astronaut.png"][n]
            raw = scores(Image.open(cache / "models" / "photos" / photo))
            feed[cfg["detector"]["input"]] = raw
        with torch.no_grad():
            if raw is None:
                pooled = None
            elif cells:
                pooled = torch.from_numpy(cell_detections(raw, detections["cells"]))
            else:
                pooled = torch.from_numpy(pool_detections(raw, detections["mask"]))
            ref = proj(torch.from_numpy(x)[None], pooled)[0].numpy()
        got = sess.run(["image_embeds"], feed)[0]
        if got.shape != ref.shape:
            raise SystemExit(f"error: the exported projector gives {got.shape}, torch {ref.shape}")
        worst = max(worst, float(np.abs(ref - got).max()))
    return worst


def adapter_path(projector: Path) -> Path:
    """The LoRA adapter trained with the projector at `projector`: next to it, `<stem>.lora.gguf`."""
    return projector.with_suffix(".lora.gguf")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=HERE / "projector" / "train-v15.toml", help="training configuration")
    ap.add_argument("--cache", type=Path, default=default_cache(), help="cache root (default: $SCENECAST_CACHE)")
    ap.add_argument("--user-data", type=Path, help="folder of your own photos, each with a same-named .txt caption")
    ap.add_argument("--steps", type=int, help="override train.steps (for a quick trial)")
    ap.add_argument("--output", type=Path, help="where to write the ONNX projector (default: from the config); its LoRA adapter goes next to it as <stem>.lora.gguf")
    ap.add_argument("--eval-set-only", action="store_true",
                    help="only write the evaluation set (needs numpy and pillow, not torch)")
    args = ap.parse_args()

    cfg = load_config(args.config)
    if args.steps:
        cfg["train"]["steps"] = args.steps
    work = args.cache / "train" / cfg["name"]
    work.mkdir(parents=True, exist_ok=True)
    def where(e: dict) -> Path:
        e = exemplar(e)
        return args.cache / "models" / ("stamps/" + e["stamp"] if "stamp" in e else "photos/" + e["file"])

    missing = [where(p) for c in cfg["category"] for p in c["photos"]] + [where(u) for u in cfg["sets"]["unknown"]]
    missing = [m for m in missing if not m.is_file()]
    if missing:
        raise SystemExit(f"error: {missing[0]} is missing; run `make models` (`make projector` fetches the training photos) first")
    if args.eval_set_only:
        write_eval(cfg, args.cache, work)
        return 0
    total = time.monotonic()
    feats, dets, metas = build_data(cfg, args.cache, work, args.user_data)
    proj, adapted, model_config, history, train_s = train(cfg, args.cache, feats, dets, metas)
    dest = args.output or args.config.parent / cfg["output"]
    diff = export(cfg, proj, feats, dets, dest, args.cache)
    log(f"[4/4] wrote {dest} ({dest.stat().st_size} B, sha256 {hashlib.sha256(dest.read_bytes()).hexdigest()}); "
        f"ONNX Runtime vs torch max abs diff {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit(f"error: the exported projector differs from torch by {diff:.2e} (> 1e-4)")
    if adapted:
        lora = adapter_path(dest)
        export_adapter(cfg, adapted, model_config, lora)
        log(f"      wrote {lora} ({lora.stat().st_size} B, sha256 {hashlib.sha256(lora.read_bytes()).hexdigest()})")
    summary = {"name": cfg["name"], "steps": cfg["train"]["steps"], "adapter": cfg.get("adapter"), "train_seconds": round(train_s),
               "total_seconds": round(time.monotonic() - total), "images": sum(m["kind"] != "check" for m in metas),
               "loss_every_20": [round(sum(history[i:i + 20]) / len(history[i:i + 20]), 4) for i in range(0, len(history), 20)],
               "onnx_vs_torch_max_abs": diff, "image_token_norm": float(np.linalg.norm(
                   proj(__import__("torch").from_numpy(feats[:8]), None if dets is None else __import__("torch").from_numpy(dets[:8]))
                   .detach().numpy(), axis=-1).mean())}
    dest.with_suffix(".train.json").write_text(json.dumps(summary, indent=1) + "\n")
    config = write_candidate(dest, adapter_path(dest) if adapted else None, work, cfg["model"]["llm"], cfg.get("detector"),
                             adapter_scope(cfg), int(cfg["model"].get("global_tokens", 0)))
    log(f"done in {summary['total_seconds'] / 60:.1f} min; evaluate the new projector with: "
        f"scenecast --config {config} eval {work / 'eval' / 'eval.json'}   (or `make eval`)")
    return 0


def write_candidate(projector: Path, adapter: Path | None, work: Path, llm: str, detector: dict | None = None,
                    scope: str = "all", global_tokens: int = 0) -> Path:
    """A manifest and a config that use the freshly trained projector (and adapter) in place of the
    shipped ones, so `scenecast eval` and `make eval` can judge a run before it is shipped: the
    LLM is the one trained on (`llm`, in the cache), with the new adapter unmerged (on the scene
    prefix only with `scope` "scene"), and the projector reads the detector when it was trained
    with one (`detector`: the training configuration's [detector]). Returns the config's path
    (`<work>/candidate.toml`)."""
    base = detector["manifest"] if detector else manifest.REFERENCE
    text = base.read_text()
    section = re.search(r"^\[projector\]\n(?:(?!\[).*\n)*", text, re.M)
    if section:
        # The projector's wiring to the detector is the trained projector's, not the reference's.
        kept = "".join(line for line in section.group(0).splitlines(keepends=True)
                       if not line.startswith(("detections_input", "detection_tokens", "global_tokens")))
        if detector:
            kept = kept.rstrip("\n") + (f'\ndetections_input = "{detector["input"]}"\n'
                                       f'detection_tokens = {detector.get("regions", 0)}\n\n')
        if global_tokens:
            kept = kept.rstrip("\n") + f"\nglobal_tokens = {global_tokens}\n\n"
        text = text.replace(section.group(0), kept)
    # The caption check's threshold is the shipped projector's; a new one is calibrated on its own
    # scenes (`make eval` runs `scenecast calibrate --write` on the candidate).
    text = re.sub(r"^\[grounding\]\n(?:(?!\[).*\n)*", "", text, flags=re.M)
    if not detector:
        # A projector trained without the detector does not read it, whatever the base serves.
        text = re.sub(r"^\[detector(?:\.preprocess)?\]\n(?:(?!\[).*\n)*", "", text, flags=re.M)
    key = lambda p: f'{{ path = "{p.resolve()}" }}'  # noqa: E731
    projector_line = re.search(r'^file = \{ cache = "projector/[^"]+\.onnx".*\}$', text, re.M)
    llm_line = re.search(r'^file = \{ cache = "smollm2/[^"]+\.gguf".*\}$', text, re.M)
    adapter_line = re.search(r'^adapter = \{ cache = "projector/[^"]+\.lora\.gguf".*\}\n', text, re.M)
    if not projector_line or not llm_line:
        raise SystemExit(f"error: {base} has no [projector] or [llm] file line to replace")
    text = text.replace(projector_line.group(0), f"file = {key(projector)}")
    if adapter_line:
        text = text.replace(adapter_line.group(0), "")
    llm_file = f'file = {{ cache = "{llm}" }}'
    text = re.sub(r"^adapter_scope = .*\n", "", text, flags=re.M)
    # The shipped LLM's split files and scene model are the shipped adapter's: the candidate's
    # adapter runs unmerged on the whole GGUF it was trained on.
    text = re.sub(r"^(splits|scene_model) = .*\n", "", text, flags=re.M)
    text = text.replace(llm_line.group(0), llm_file + (f"\nadapter = {key(adapter)}" if adapter else "")
                        + (f'\nadapter_scope = "{scope}"' if adapter and scope != "all" else ""))
    # The base's description is of the base's projector (v4 for the detector's manifest).
    text = re.sub(r"^description = .*$", lambda _: f'description = "a candidate from models/train_projector.py: '
                  f'projector {projector.name}' + (f", adapter {adapter.name} (scope {scope})" if adapter else "")
                  + ', not shipped"', text, count=1, flags=re.M)
    (work / "candidate-manifest.toml").write_text(text)
    config = work / "candidate.toml"
    config.write_text(f'[models]\nmanifest = "{(work / "candidate-manifest.toml").resolve()}"\n')
    return config


if __name__ == "__main__":
    sys.exit(main())
