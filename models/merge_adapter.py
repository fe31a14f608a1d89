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

`split` writes the base instead as two llama.cpp splits, split 0 with every metadata key and the
weights the adapter changes, split 1 with every other tensor, plus a second split 0 with the adapter
folded into those weights: the reference's scene model (`[llm] scene_model`), which loads its split
0 with the base's split 1, so the two models share every unchanged tensor.

Usage: python models/merge_adapter.py BASE.gguf ADAPTER.gguf OUT.gguf [TYPE]
       python models/merge_adapter.py split BASE.gguf ADAPTER.gguf BASE-0.gguf FOLDED-0.gguf SHARED-1.gguf [TYPE]
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


def _read_adapter(adapter: Path) -> tuple[float, dict[str, dict[str, np.ndarray]]]:
    """The adapter's (alpha, {weight: {"lora_a": A, "lora_b": B}})."""
    import gguf

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
    return alpha, pairs


def _folded(base: Path, adapter: Path, out_type: str | None):
    """The base's reader and, for each of its tensors in order, (tensor, data, type, folded):
    the adapter's weights folded in and quantised to `out_type` (default: the weight's own)."""
    import gguf

    target = gguf.GGMLQuantizationType[out_type.upper()] if out_type else None
    alpha, pairs = _read_adapter(adapter)
    reader = gguf.GGUFReader(str(base))
    tensors = []
    for t in reader.tensors:
        if t.name not in pairs:
            tensors.append((t, t.data, t.tensor_type, False))
            continue
        ab = pairs.pop(t.name)
        if set(ab) != {"lora_a", "lora_b"}:
            raise MergeError(f"{adapter}: {t.name} lacks one of lora_a, lora_b")
        a, b = ab["lora_a"], ab["lora_b"]  # [rank, in], [out, rank]
        w = gguf.quants.dequantize(t.data, t.tensor_type)  # [out, in]
        if b.shape[0] != w.shape[0] or a.shape[1] != w.shape[1] or a.shape[0] != b.shape[1]:
            raise MergeError(f"{t.name}: adapter shapes {a.shape}, {b.shape} do not fit the weight {w.shape}")
        merged = w + np.float32(alpha / a.shape[0]) * (b @ a)
        qtype = target or t.tensor_type
        tensors.append((t, gguf.quants.quantize(merged.astype(np.float32), qtype), qtype, True))
    if pairs:
        raise MergeError(f"{adapter}: weights not in {base.name}: {', '.join(sorted(pairs)[:5])}")
    return reader, tensors


def _writer(reader, dest: Path, metadata: bool):
    """A GGUF writer for `dest` with the base's architecture and, with `metadata`, every key."""
    import gguf

    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dest), arch=arch, endianess=reader.endianess)
    if metadata:
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
                continue
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    return writer


def _write(writer, tensors) -> None:
    for t, data, qtype, _ in tensors:
        writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data, _, _ in tensors:
        writer.write_tensor_data(data)
    writer.close()


def _merge(base: Path, adapter: Path, dest: Path, out_type: str | None) -> int:
    reader, tensors = _folded(base, adapter, out_type)
    writer = _writer(reader, dest, metadata=True)
    writer.add_string("general.merged_adapter", adapter.name)
    _write(writer, tensors)
    return sum(folded for *_, folded in tensors)


def split(base: Path, adapter: Path, dests: tuple[Path, Path, Path], out_type: str | None = None) -> int:
    """Writes two models that share one file: `dests` = (the base's split 0, the folded model's
    split 0, their shared split 1). Split 0 of each holds every metadata key and the weights the
    adapter changes, as they are in the base or with the adapter folded in (`out_type`); split 1
    every other tensor, byte for byte, once. llama.cpp loads each model from [its split 0, split 1]
    (`llama_model_load_from_splits`), so the two map the shared file's pages once: the folded model
    costs its changed weights, not a second copy of the GGUF. Returns how many weights changed.
    Raises MergeError, naming the file, for anything the files lack."""
    try:
        reader, tensors = _folded(base, adapter, out_type)
    except KeyError as exc:
        raise MergeError(f"{base.name} / {adapter.name}: metadata key or type {exc} missing or unknown") from exc
    import gguf

    folded = [entry for entry in tensors if entry[3]]
    if not folded:
        raise MergeError(f"{adapter}: changes no weight of {base.name}")
    originals = [(t, t.data, t.tensor_type, True) for t, *_ in folded]
    shared = [entry for entry in tensors if not entry[3]]
    for dest, part, no in ((dests[0], originals, 0), (dests[1], folded, 0), (dests[2], shared, 1)):
        writer = _writer(reader, dest, metadata=no == 0)
        writer.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_NO, no)
        writer.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, 2)
        writer.add_int32(gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, len(tensors))
        if dest == dests[1]:
            writer.add_string("general.merged_adapter", adapter.name)
        _write(writer, part)
    return len(folded)


def main() -> int:
    args = sys.argv[1:]
    usage = __doc__.strip().splitlines()[-2:]
    try:
        if args[:1] == ["split"] and len(args) in (6, 7):
            paths = [Path(a) for a in args[1:6]]
            n = split(paths[0], paths[1], (paths[2], paths[3], paths[4]), args[6] if len(args) == 7 else None)
            print(f"folded {n} weights into {paths[3]}; {paths[2]} and {paths[4]} are the base's splits")
            return 0
        if args[:1] != ["split"] and len(args) in (3, 4):
            n = merge(Path(args[0]), Path(args[1]), Path(args[2]), args[3] if len(args) == 4 else None)
            print(f"merged {n} weights into {args[2]}")
            return 0
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(usage), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
