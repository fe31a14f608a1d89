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


def mlp_nodes(x: str, out: str, p: str) -> list:
    """x @ {p}w1 + {p}b1 -> GELU (erf) -> @ {p}w2 + {p}b2 -> out: the projector's two layers."""
    return [
        helper.make_node("MatMul", [x, f"{p}w1"], [f"{p}h0"]),
        helper.make_node("Add", [f"{p}h0", f"{p}b1"], [f"{p}h1"]),
        # GELU (erf form), spelled out because the Gelu op needs opset 20.
        helper.make_node("Mul", [f"{p}h1", "rsqrt2"], [f"{p}g0"]),
        helper.make_node("Erf", [f"{p}g0"], [f"{p}g1"]),
        helper.make_node("Add", [f"{p}g1", "one"], [f"{p}g2"]),
        helper.make_node("Mul", [f"{p}h1", f"{p}g2"], [f"{p}g3"]),
        helper.make_node("Mul", [f"{p}g3", "half"], [f"{p}h2"]),
        helper.make_node("MatMul", [f"{p}h2", f"{p}w2"], [f"{p}h3"]),
        helper.make_node("Add", [f"{p}h3", f"{p}b2"], [out]),
    ]


def graph_from(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, name: str,
               producer: str, detections: dict | None = None) -> onnx.ModelProto:
    """The projector graph with the given weights: x @ w1 + b1 -> GELU (erf) -> @ w2 + b2.

    `w1` is [in, hidden], `w2` [hidden, out] (the transpose of torch's Linear.weight).

    With `detections` (keys `input`, `mask` [regions, anchors], `w1`, `b1`, `w2`, `b2`, `place`
    [regions, out]), the graph has a second input, the detector's class scores [1, anchors,
    classes]: each vertical strip's maximum score per class (`mask` says which anchors lie in which
    strip) goes through its own two layers, plus a learned embedding of the strip, and these
    `regions` tokens follow the patch tokens: `image_embeds` is [n + regions, out].

    With `detections` keys `input`, `shape` [anchors, classes], `cells` [cells, k] (each pooled
    grid cell's anchor points, train_projector.cell_anchors) and `grid` [h, w], the scores are fused into the patch tokens
    instead: each cell's maximum score per class, that maximum over the cell's 3 x 3 neighbourhood
    and (unless `frame` is false) over the whole frame are appended to the cell's features before
    the two layers (`w1` has `in + 3 * classes` rows, or `in + 2 * classes`), and `image_embeds` is
    [cells, out]. With `global` (keys `tokens`, `w1`, `b1`, `w2`, `b2`) as well, the last `tokens`
    rows of `image_features` are the encoder's leading tokens (CLS) instead of cells: each, next to
    the whole frame's maximum score per class, goes through two layers of its own and follows the
    cells' tokens: `image_embeds` is [cells + tokens, out]."""
    if detections is not None and "cells" in detections:
        return fused_graph_from(w1, b1, w2, b2, name, producer, detections)
    in_width, out_width = w1.shape[0], w2.shape[1]
    inits = mlp_inits(w1, b1, w2, b2)
    inputs = [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["n_tokens", in_width])]
    if detections is None:
        nodes = mlp_nodes("image_features", "image_embeds", "")
        out_tokens = "n_tokens"
    else:
        d = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in detections.items() if k != "input"}
        regions, anchors = d["mask"].shape
        classes = d["w1"].shape[0]
        inits += [numpy_helper.from_array(d["mask"][:, :, None], "det_mask")]
        inits += [numpy_helper.from_array(d[k], f"det_{k}") for k in ("w1", "b1", "w2", "b2", "place")]
        inputs.append(helper.make_tensor_value_info(detections["input"], TensorProto.FLOAT, [1, anchors, classes]))
        nodes = mlp_nodes("image_features", "patch_embeds", "")
        nodes += [
            # [1, anchors, classes] * [regions, anchors, 1] -> each strip's maximum: [regions, classes]
            helper.make_node("Mul", [detections["input"], "det_mask"], ["det_masked"]),
            helper.make_node("ReduceMax", ["det_masked"], ["det_strips"], axes=[1], keepdims=0),
        ]
        nodes += mlp_nodes("det_strips", "det_h", "det_")
        nodes += [
            helper.make_node("Add", ["det_h", "det_place"], ["det_embeds"]),
            helper.make_node("Concat", ["patch_embeds", "det_embeds"], ["image_embeds"], axis=0),
        ]
        out_tokens = f"n_tokens_plus_{regions}"
    return finish(nodes, name, producer, inputs, [out_tokens, out_width], inits)


def mlp_inits(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> list:
    """The two layers' weights (as mlp_nodes names them, no prefix) and GELU's constants."""
    w1, b1, w2, b2 = (np.ascontiguousarray(a, dtype=np.float32) for a in (w1, b1, w2, b2))
    return [numpy_helper.from_array(a, n) for a, n in [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2")]] + [
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(1 / np.sqrt(2), np.float32), "rsqrt2"),
    ]


def finish(nodes: list, name: str, producer: str, inputs: list, out_shape: list, inits: list) -> onnx.ModelProto:
    """The checked opset-14 model of `nodes`, whose output is `image_embeds` of `out_shape`."""
    graph = helper.make_graph(nodes, name, inputs,
                              [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], producer_name=producer)
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def fused_graph_from(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, name: str,
                     producer: str, detections: dict) -> onnx.ModelProto:
    """graph_from's fused form: the detector's scores pooled per grid cell join each cell's
    features (see graph_from)."""
    cells = np.asarray(detections["cells"], np.int64)
    gh, gw = detections["grid"]
    n_cells, k = cells.shape
    if n_cells != gh * gw:
        raise ValueError(f"{n_cells} cells of anchor points for a {gh} x {gw} grid")
    out_width = w2.shape[1]
    inits = mlp_inits(w1, b1, w2, b2) + [
        numpy_helper.from_array(cells.reshape(-1), "det_cells"),
        numpy_helper.from_array(np.array([n_cells, k, -1], np.int64), "det_by_cell"),
        numpy_helper.from_array(np.array([1, gh, gw, -1], np.int64), "det_grid"),
        numpy_helper.from_array(np.array([n_cells, -1], np.int64), "det_flat"),
    ]
    x, scores = "image_features", detections["input"]
    anchors, classes = detections["shape"]
    frame = detections.get("frame", True)
    whole = detections.get("global")
    g = whole["tokens"] if whole else 0
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n_tokens", w1.shape[0] - (3 if frame else 2) * classes]),
              helper.make_tensor_value_info(scores, TensorProto.FLOAT, [1, anchors, classes])]
    nodes = []
    if whole:
        # The cells' rows, then the global rows: [cells + g, in] -> [cells, in], [g, in].
        inits += [numpy_helper.from_array(np.array([n_cells, g], np.int64), "split_rows")]
        inits += [numpy_helper.from_array(np.ascontiguousarray(whole[k], dtype=np.float32), f"glob_{k}") for k in ("w1", "b1", "w2", "b2")]
        inits += [numpy_helper.from_array(np.array([g, classes], np.int64), "glob_shape")]
        nodes.append(helper.make_node("Split", [x, "split_rows"], ["cell_features", "global_features"], axis=0))
        x = "cell_features"
    nodes += [
        # [1, anchors, classes] -> the anchors of each cell [1, cells * k, classes] -> [cells, classes]
        helper.make_node("Gather", [scores, "det_cells"], ["det_gathered"], axis=1),
        helper.make_node("Reshape", ["det_gathered", "det_by_cell"], ["det_by_k"]),
        helper.make_node("ReduceMax", ["det_by_k"], ["det_cell"], axes=[1], keepdims=0),
        # Each cell's 3 x 3 neighbourhood: [cells, classes] -> [1, classes, h, w], max-pooled.
        helper.make_node("Reshape", ["det_cell", "det_grid"], ["det_hwc"]),
        helper.make_node("Transpose", ["det_hwc"], ["det_chw"], perm=[0, 3, 1, 2]),
        helper.make_node("MaxPool", ["det_chw"], ["det_near_chw"], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["det_near_chw"], ["det_near_hwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["det_near_hwc", "det_flat"], ["det_near"]),
    ]
    if frame:
        nodes += [
            # The whole frame's maximum, next to every cell: [1, classes] broadcast by adding zeros.
            helper.make_node("ReduceMax", ["det_cell"], ["det_frame1"], axes=[0], keepdims=1),
            helper.make_node("Sub", ["det_cell", "det_cell"], ["det_zero"]),
            helper.make_node("Add", ["det_zero", "det_frame1"], ["det_frame"]),
        ]
    nodes.append(helper.make_node("Concat", [x, "det_cell", "det_near"] + (["det_frame"] if frame else []), ["fused"], axis=1))
    if not whole:
        nodes += mlp_nodes("fused", "image_embeds", "")
        return finish(nodes, name, producer, inputs, [n_cells, out_width], inits)
    nodes += mlp_nodes("fused", "cell_embeds", "")
    nodes += [
        # The whole frame's maximum per class, next to each global token: [1, classes] -> [g, classes].
        helper.make_node("ReduceMax", ["det_cell"], ["glob_frame1"], axes=[0], keepdims=1),
        helper.make_node("Expand", ["glob_frame1", "glob_shape"], ["glob_frame"]),
        helper.make_node("Concat", ["global_features", "glob_frame"], ["glob_in"], axis=1),
    ]
    nodes += mlp_nodes("glob_in", "global_embeds", "glob_")
    nodes.append(helper.make_node("Concat", ["cell_embeds", "global_embeds"], ["image_embeds"], axis=0))
    return finish(nodes, name, producer, inputs, [n_cells + g, out_width], inits)


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
