#!/usr/bin/env python3
"""Writes the small deterministic *untrained* input projectors used until a trained one ships.

The graph is the projector layout every scenecast projector has: `image_features` [n, in] f32 ->
Linear(in -> out) -> GELU -> Linear(out -> out) -> `image_embeds` [n, out] f32, with n dynamic
(pooling happens before it, in Rust, as the manifest says). The weights come from integer
arithmetic, not a random generator, so the file is byte-identical on every machine and CPU.
They carry no knowledge: captions through this projector are fluent nonsense by design.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# (in_width, out_width): DINOv2-S features to SmolLM2-135M (576) and Gemma-3-270M (640).
WIDTHS = [(384, 576), (384, 640)]


def weights(rows: int, cols: int, salt: int) -> np.ndarray:
    """A deterministic matrix with entries in [-1, 1] scaled like Kaiming init for `rows` inputs."""
    i = np.arange(rows, dtype=np.int64)[:, None]
    j = np.arange(cols, dtype=np.int64)[None, :]
    vals = ((i * 7919 + j * 104729 + salt * 1299709) % 2001 - 1000).astype(np.float32) / np.float32(1000)
    return vals * np.float32(np.sqrt(3.0 / rows))


def build(in_width: int, out_width: int) -> onnx.ModelProto:
    w1 = weights(in_width, out_width, 1)
    b1 = np.zeros(out_width, dtype=np.float32)
    w2 = weights(out_width, out_width, 2) * np.float32(0.1)  # text embeddings have norms of ~3
    b2 = np.zeros(out_width, dtype=np.float32)
    return graph_from(w1, b1, w2, b2, f"projector_untrained_{in_width}_{out_width}",
                      "scenecast/models/make_projector.py")


def graph_from(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, name: str,
               producer: str) -> onnx.ModelProto:
    """The projector graph with the given weights: x @ w1 + b1 -> GELU (erf) -> @ w2 + b2.

    `w1` is [in, hidden], `w2` [hidden, out] (the transpose of torch's Linear.weight)."""
    in_width, out_width = w1.shape[0], w2.shape[1]
    w1, b1, w2, b2 = (np.ascontiguousarray(a, dtype=np.float32) for a in (w1, b1, w2, b2))
    inits = [numpy_helper.from_array(a, n) for a, n in [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2")]]
    inits += [
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(1 / np.sqrt(2), np.float32), "rsqrt2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["image_features", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        # GELU (erf form), spelled out because the Gelu op needs opset 20.
        helper.make_node("Mul", ["h1", "rsqrt2"], ["g0"]),
        helper.make_node("Erf", ["g0"], ["g1"]),
        helper.make_node("Add", ["g1", "one"], ["g2"]),
        helper.make_node("Mul", ["h1", "g2"], ["g3"]),
        helper.make_node("Mul", ["g3", "half"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], ["image_embeds"]),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["n_tokens", in_width])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["n_tokens", out_width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)],
                              producer_name=producer)
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def path_for(root: Path, out_width: int) -> Path:
    return root / "projector" / f"untrained-384x{out_width}.onnx"


def ensure(root: Path) -> list[Path]:
    """Writes the projectors under `root` (idempotent: rewrites only when the bytes differ)."""
    written = []
    for in_width, out_width in WIDTHS:
        path = path_for(root, out_width)
        data = build(in_width, out_width).SerializeToString()
        if not path.is_file() or path.read_bytes() != data:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in ensure(Path(sys.argv[1])):
        print(p)
