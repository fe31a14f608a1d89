#!/usr/bin/env python3
"""Builds CLIP's `tokenizer.json` (the Hugging Face `tokenizers` format, as SD-Turbo exports ship it)
from the BPE merge list that the open_clip package carries (`bpe_simple_vocab_16e6.txt.gz`).

CLIP's vocabulary is derived, not stored: the 256 byte symbols, the same with `</w>`, one token per
merge (48,894), then `<|startoftext|>` and `<|endoftext|>` = 49,408 tokens. The JSON below is the
layout of `openai/clip-vit-large-patch14`'s tokenizer.json: NFC + whitespace squeeze + lowercase,
CLIP's split regex, byte-level BPE with the `</w>` suffix, BOS/EOS added around each text.
Pure Python (json, gzip), so the fetch step needs nothing heavier.

    python models/clip_tokenizer.py bpe_simple_vocab_16e6.txt.gz tokenizer.json
"""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

N_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build(bpe_gz: bytes) -> dict:
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = lines[1:N_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    bos, eos = len(vocab) - 2, len(vocab) - 1
    special = lambda i, t: {"id": i, "content": t, "single_word": False, "lstrip": False,  # noqa: E731
                            "rstrip": False, "normalized": False, "special": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [special(bos, "<|startoftext|>"), special(eos, "<|endoftext|>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
            {"type": "Lowercase"},
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"},
             "behavior": "Removed", "invert": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ]},
        "post_processor": {"type": "RobertaProcessing", "sep": ["<|endoftext|>", eos], "cls": ["<|startoftext|>", bos],
                           "trim_offsets": False, "add_prefix_space": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<|endoftext|>", "continuing_subword_prefix": "",
                  "end_of_word_suffix": "</w>", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(vocab)}, "merges": [m.split() for m in merges]},
    }


def write(bpe_gz: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Fixed separators and insertion order: the same bytes on every machine, so a checksum can pin it.
    dest.write_text(json.dumps(build(bpe_gz.read_bytes()), ensure_ascii=False, separators=(",", ":")))


if __name__ == "__main__":
    write(Path(sys.argv[1]), Path(sys.argv[2]))
