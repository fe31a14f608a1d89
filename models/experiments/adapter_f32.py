#!/usr/bin/env python3
"""Copies a LoRA adapter GGUF with its tensors stored as f32 (metadata unchanged), to time what the
storage type costs llama.cpp (README, Benchmarks: `SCENECAST_BENCH_ADAPTER=<copy> cargo bench --bench
backbone`). With the projector v7 adapter it changed nothing measurable.

    $(CACHE)/train-venv/bin/python models/experiments/adapter_f32.py \\
        models/projector/dinov2s-nanodet-smollm2-v7.lora.gguf /tmp/v7-f32.lora.gguf
"""
from __future__ import annotations

import sys

import gguf
import numpy as np


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    src, dst = sys.argv[1], sys.argv[2]
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, arch=reader.fields["general.architecture"].contents())
    adders = {gguf.GGUFValueType.STRING: writer.add_string, gguf.GGUFValueType.FLOAT32: writer.add_float32,
              gguf.GGUFValueType.UINT32: writer.add_uint32}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        add = adders.get(field.types[0])
        if add is None:
            raise SystemExit(f"error: {src}: metadata {key} has type {field.types[0].name}, expected a string, f32 or u32")
        add(key, field.contents())
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data).astype(np.float32).reshape([int(x) for x in reversed(t.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"{dst}: {len(reader.tensors)} tensors as f32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
