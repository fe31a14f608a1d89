#!/usr/bin/env python3
"""The model facts the Python tools share with the Rust runtime, read from a model manifest
(default: models/reference.toml, the one compiled into scenecast), so that training, fixtures and
serving cannot drift: the encoder's input size, mean/std, patch grid and leading tokens, the
projector's pooling, the LLM's width, its file names and the chat layout around the image tokens.

Usage: python models/manifest.py [MANIFEST]   (prints the facts)
"""
import json
import sys
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

REFERENCE = Path(__file__).resolve().parent / "reference.toml"


@dataclass(frozen=True)
class Facts:
    """What the tools need from a manifest; field names follow the manifest's keys."""

    size: tuple[int, int]  # encoder.preprocess.size, [height, width]
    mean: tuple[float, float, float]  # encoder.preprocess.mean, RGB in [0, 1]
    std: tuple[float, float, float]  # encoder.preprocess.std
    patch_grid: tuple[int, int]  # encoder.patch_grid
    prefix_tokens: int  # encoder.prefix_tokens (CLS) before the patch grid
    pool: tuple[int, int]  # projector.pool: the grid the patches are average-pooled to
    hidden: int  # llm.n_embd
    encoder: str  # encoder.file.cache
    llm: str  # llm.file.cache: a whole GGUF (for split files, the GGUF sources.toml splits)
    prefix: str  # llm.chat.prefix: before the image tokens
    suffix: str  # llm.chat.suffix: after them, with {question}
    end: str  # llm.chat.stop[0]: ends the answer
    detector: "Detector | None" = None  # [detector], the second encoder, when the manifest has one


    def model_section(self) -> dict:
        """The keys of train.toml's [model] section that come from the manifest."""
        return {"encoder": self.encoder, "llm": self.llm, "pool": list(self.pool), "hidden": self.hidden,
                "prefix": self.prefix, "suffix": self.suffix, "end": self.end}


@dataclass(frozen=True)
class Detector:
    """The second modality encoder ([detector]): an object detector whose class scores the projector
    reads next to the patch features."""

    file: str  # detector.file.cache
    size: tuple[int, int]  # detector.preprocess.size, [height, width]
    channels: str  # detector.preprocess.channels: "rgb" or "bgr", the tensor's channel order
    mean: tuple[float, float, float]  # detector.preprocess.mean, in [0, 1], in `channels` order
    std: tuple[float, float, float]
    strides: tuple[int, ...]  # detector.strides: its output's anchor grids, row-major, finest first
    classes: tuple[str, ...]  # detector.classes: the names of its output's class columns
    # detector.category_prefix: the columns "<prefix><category>" score the categories themselves
    category_prefix: str | None = None


def _cache_file(section: dict, key: str) -> str:
    file = section["file"]
    if "cache" not in file:
        raise SystemExit(f"error: manifest {key}.file must name a `cache` file for the training tools, got {file}")
    return file["cache"]


def _whole_llm(llm: dict) -> str:
    """The LLM as one GGUF in the cache: `llm.file`, or, when the manifest gives the model as split
    files (`llm.splits`), the GGUF that sources.toml's `split` writes them from (the tools read
    every tensor of one file)."""
    file = _cache_file(llm, "llm")
    if not llm.get("splits"):
        return file
    sources = tomllib.loads((REFERENCE.parent / "sources.toml").read_text())
    for part in sources["part"]:
        split = part.get("split")
        if split and split["files"][0]["dest"] == file:
            return split["base"]
    raise SystemExit(f"error: llm.file {file} is a split GGUF that no `split` of models/sources.toml writes")


def facts(path: Path = REFERENCE) -> Facts:
    """Reads `path` and returns its facts; a missing key is named."""
    m = tomllib.loads(path.read_text())
    try:
        enc, pre, proj, llm = m["encoder"], m["encoder"]["preprocess"], m["projector"], m["llm"]
        f = Facts(
            size=tuple(pre["size"]), mean=tuple(pre["mean"]), std=tuple(pre["std"]),
            patch_grid=tuple(enc["patch_grid"]), prefix_tokens=int(enc.get("prefix_tokens", 0)),
            pool=tuple(proj["pool"]), hidden=int(llm["n_embd"]),
            encoder=_cache_file(enc, "encoder"), llm=_whole_llm(llm),
            prefix=llm["chat"]["prefix"], suffix=llm["chat"]["suffix"], end=llm["chat"]["stop"][0],
        )
        if "detector" in m:
            det, dpre = m["detector"], m["detector"]["preprocess"]
            f = Facts(**{**asdict(f), "detector": Detector(
                file=_cache_file(det, "detector"), size=tuple(dpre["size"]), channels=dpre.get("channels", "rgb"),
                mean=tuple(dpre["mean"]), std=tuple(dpre["std"]), strides=tuple(det["strides"]),
                classes=tuple(det["classes"]), category_prefix=det.get("category_prefix"))})
    except KeyError as e:
        raise SystemExit(f"error: manifest {path}: key {e} is missing") from None
    gh, gw = f.patch_grid
    if gh % f.pool[0] or gw % f.pool[1]:
        raise SystemExit(f"error: manifest {path}: projector.pool {f.pool} does not divide encoder.patch_grid {f.patch_grid}")
    return f


if __name__ == "__main__":
    print(json.dumps(asdict(facts(Path(sys.argv[1]) if len(sys.argv) > 1 else REFERENCE)), indent=2))
