#!/usr/bin/env python3
"""Folds a LoRA adapter GGUF into its base GGUF, so that llama.cpp runs one model and no request pays
for applying the adapter at run time (README "Benchmarks").

For every weight W the adapter names (`<name>.lora_a` A [rank, in], `<name>.lora_b` B [out, rank]):

    W' = dequantise(W) + (alpha / rank) * B @ A          (llama.cpp's own scale for an adapter at 1.0)

then W' is quantised with gguf-py's reference quantisers (as ggml's `quantize_row_*_ref`) to TYPE,
or to W's own type without one. Every other tensor and every metadata key is copied unchanged (plus
`general.merged_adapter`). Measured on the projector's adapter: its changes are 10-25x smaller than
a Q4_1 quantisation step, so merging back into Q4_1 erases them; Q8_0 keeps them (the reference
stack's merged GGUF, derived by `fetch.py` from `sources.toml`'s `merge` entry, sha256 checked). The
result is deterministic.

Usage: python models/merge_adapter.py BASE.gguf ADAPTER.gguf OUT.gguf [TYPE]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


class MergeError(Exception):
    pass


def merge(base: Path, adapter: Path, dest: Path, out_type: str | None = None) -> int:
    """Writes the merged GGUF to `dest`; returns how many weights changed. `out_type` (a ggml type
    name such as "Q8_0") is the type of the merged weights; default: each weight's own type.
    Raises MergeError, naming the file, for anything the files lack."""
    try:
        return _merge(base, adapter, dest, out_type)
    except KeyError as exc:
        raise MergeError(f"{base.name} / {adapter.name}: metadata key or type {exc} missing or unknown") from exc


def _merge(base: Path, adapter: Path, dest: Path, out_type: str | None) -> int:
    import gguf

    target = gguf.GGMLQuantizationType[out_type.upper()] if out_type else None

    lora = gguf.GGUFReader(str(adapter))
    kind = lora.fields.get("general.type")
    if kind is None or kind.contents() != "adapter":
        raise MergeError(f"{adapter}: not a LoRA adapter GGUF (general.type is not 'adapter')")
    alpha = float(lora.fields["adapter.lora.alpha"].contents())
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for t in lora.tensors:
        name, _, part = t.name.rpartition(".")
        if part not in ("lora_a", "lora_b"):
            raise MergeError(f"{adapter}: tensor {t.name} is neither lora_a nor lora_b")
        pairs.setdefault(name, {})[part] = np.asarray(t.data, dtype=np.float32)

    reader = gguf.GGUFReader(str(base))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dest), arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    writer.add_string("general.merged_adapter", adapter.name)

    changed = 0
    tensors = []
    for t in reader.tensors:
        data = t.data
        if t.name in pairs:
            ab = pairs.pop(t.name)
            if set(ab) != {"lora_a", "lora_b"}:
                raise MergeError(f"{adapter}: {t.name} lacks one of lora_a, lora_b")
            a, b = ab["lora_a"], ab["lora_b"]  # [rank, in], [out, rank]
            w = gguf.quants.dequantize(t.data, t.tensor_type)  # [out, in]
            if b.shape[0] != w.shape[0] or a.shape[1] != w.shape[1] or a.shape[0] != b.shape[1]:
                raise MergeError(f"{t.name}: adapter shapes {a.shape}, {b.shape} do not fit the weight {w.shape}")
            merged = w + np.float32(alpha / a.shape[0]) * (b @ a)
            qtype = target or t.tensor_type
            data = gguf.quants.quantize(merged.astype(np.float32), qtype)
            changed += 1
            tensors.append((t, data, qtype))
            continue
        tensors.append((t, data, t.tensor_type))
    if pairs:
        raise MergeError(f"{adapter}: weights not in {base.name}: {', '.join(sorted(pairs)[:5])}")
    for t, data, qtype in tensors:
        writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data, _ in tensors:
        writer.write_tensor_data(data)
    writer.close()
    return changed


def main() -> int:
    if len(sys.argv) not in (4, 5):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    try:
        n = merge(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] if len(sys.argv) == 5 else None)
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged {n} weights into {sys.argv[3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
