#!/usr/bin/env python3
"""Writes a copy of a GGUF with every weight of one quantisation type re-quantised to another
(gguf-py's reference quantisers, as ggml's `quantize_row_*_ref`); metadata and every other tensor
are copied unchanged. The README's "Benchmarks" times SmolLM2-135M's Q4_1 weights as Q8_0 (Q4_1
values are exact on Q8_0's finer grid but for rounding, so the model is the same to within it).

    $(CACHE)/train-venv/bin/python models/experiments/requantize.py IN.gguf OUT.gguf [FROM] [TO]

FROM and TO are ggml type names (default Q4_1 and Q8_0). Then point a manifest's `[llm] file` at
OUT (`{ cache = "..." }` without sha256 and size).
"""
from __future__ import annotations

import sys
from collections import Counter

import numpy as np


def main() -> int:
    import gguf

    if len(sys.argv) not in (3, 5):
        print(__doc__, file=sys.stderr)
        return 2
    src, dst = sys.argv[1], sys.argv[2]
    old, new = (gguf.GGMLQuantizationType[t.upper()] for t in (sys.argv[3:5] or ["Q4_1", "Q8_0"]))
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch=r.fields["general.architecture"].contents(), endianess=r.endianess)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == gguf.Keys.General.ARCHITECTURE:
            continue
        kind = f.types[0]
        w.add_key_value(f.name, f.contents(), kind, sub_type=f.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    tensors = []
    for t in r.tensors:
        if t.tensor_type == old:
            x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            tensors.append((t.name, gguf.quants.quantize(x, new), new))
        else:
            tensors.append((t.name, t.data, t.tensor_type))
    for name, data, qtype in tensors:
        w.add_tensor_info(name, data.shape, data.dtype, data.nbytes, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, data, _ in tensors:
        w.write_tensor_data(data)
    w.close()
    print(f"{dst}: {dict(Counter(q.name for _, _, q in tensors))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
