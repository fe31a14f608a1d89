#!/usr/bin/env python3
"""The Python peer of `make bench-peer`: the caption scenecast writes, as a user would write it in
Python with `onnxruntime` and `llama-cpp-python` — the same encoder ONNX, projector ONNX and GGUF
(read from models/reference.toml and the model cache), the image tokens injected as embeddings
through llama.cpp's batch API, greedy decoding with the same repeat penalty, the same prompt.

    python benches/peer/caption.py --cache DIR --threads N IMAGE... [--json] [--tensors DIR]

--tensors DIR reads each image's pre-processed encoder (and detector) input from the files
scenecast's `preprocess_dump` example wrote there instead of decoding and resizing it here.

Prints one line per image (one JSON object with --json: image, text, tokens, timings_ms), each as
soon as it is done, so the caller can time the cold start to the first caption.
"""
import argparse
import ctypes
import json
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

import llama_cpp

REPO = Path(__file__).resolve().parents[2]


def cached(cache: Path, entry: dict) -> str:
    return str(cache / "models" / entry["file"]["cache"])


class Peer:
    def __init__(self, cache: Path, threads: int, tensors: Path | None = None):
        m = tomllib.loads((REPO / "models" / "reference.toml").read_text())
        enc, proj, llm, chat = m["encoder"], m["projector"], m["llm"], m["llm"]["chat"]
        pre = enc["preprocess"]
        self.size = pre["size"]  # [height, width]
        self.mean = np.array(pre["mean"], np.float64)
        self.std = np.array(pre["std"], np.float64)
        self.prefix_tokens = enc["prefix_tokens"]
        self.grid = enc["patch_grid"]
        self.pool = proj["pool"]
        self.chat = chat
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.encoder = ort.InferenceSession(cached(cache, enc), options, providers=["CPUExecutionProvider"])
        self.enc_in, self.enc_out = enc["input"], enc["output"]
        self.projector = ort.InferenceSession(cached(cache, proj), options, providers=["CPUExecutionProvider"])
        self.proj_in, self.proj_out = proj["input"], proj["output"]
        # The second encoder (the COCO detector), when the manifest has one: its raw class scores
        # are the projector's second input.
        self.detector = None
        if "detector" in m:
            det = m["detector"]
            self.det_size, self.det_pre = det["preprocess"]["size"], det["preprocess"]
            self.detector = ort.InferenceSession(cached(cache, det), options, providers=["CPUExecutionProvider"])
            self.det_in, self.det_out, self.det_proj_in = det["input"], det["output"], proj["detections_input"]
        # The GGUF as fetched, with the adapter applied at run time as a user would: scenecast
        # loads the same tensors as two split files and decodes the scene prefix with the adapter
        # folded in (`llm.splits`, `llm.scene_model`), the peer does not.
        sys.path.insert(0, str(REPO / "models"))
        import manifest as facts  # noqa: E402

        self.llm = llama_cpp.Llama(
            model_path=str(cache / "models" / facts.facts().llm),
            n_ctx=1024,  # scenecast's default `llm.context`: the same KV cache on both sides
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.ctx = self.llm.ctx
        self.tensors = tensors  # read scenecast's pre-processed tensors from here (--tensors)
        # The manifest's LoRA adapter, if any: on every token, or (`adapter_scope = "scene"`) only
        # while the chat prefix and the image tokens are decoded (also with `"questions"`, which
        # leaves the caption prompt to the base model), or (`"prompt"`) also while the caption
        # prompt is, as scenecast applies it.
        self.adapter, self.scope = None, llm.get("adapter_scope", "all")
        if "adapter" in llm:
            self.adapter = llama_cpp.llama_adapter_lora_init(self.llm.model, cached(cache, {"file": llm["adapter"]}).encode())
            if not self.adapter:
                raise RuntimeError(f"llama.cpp could not load the adapter {llm['adapter']}")
            self.use_adapter(self.scope == "all")
        self.n_embd = self.llm.n_embd()
        self.n_vocab = self.llm.n_vocab()
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)

    def use_adapter(self, on: bool) -> None:
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.adapter)
        scales = (ctypes.c_float * 1)(1.0)
        if llama_cpp.llama_set_adapters_lora(self.ctx, adapters if on else None, 1 if on else 0, scales if on else None) != 0:
            raise RuntimeError("llama.cpp refused the adapter")

    @staticmethod
    def resize(image: Image.Image, size, mean, std, bgr: bool = False) -> np.ndarray:
        # Bilinear resize of the whole frame in float, per channel (no 8-bit rounding), then
        # normalisation, NCHW (BGR for the detector).
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        h, w = size
        resized = np.stack(
            [np.asarray(Image.fromarray(pixels[:, :, c], mode="F").resize((w, h), Image.Resampling.BILINEAR)) for c in range(3)],
            axis=-1,
        ).astype(np.float64) / 255.0
        if bgr:
            resized = resized[:, :, ::-1]
        return ((resized - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)

    def preprocess(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
        if self.tensors is not None:
            return self.dumped(Path(image.filename).name)
        tensor = self.resize(image, self.size, self.mean, self.std)
        if self.detector is None:
            return tensor, None
        p = self.det_pre
        return tensor, self.resize(image, self.det_size, np.array(p["mean"]), np.array(p["std"]), p.get("channels") == "bgr")

    def dumped(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """scenecast's own pre-processed tensors for the image `name` (see --tensors)."""
        read = lambda what, size: np.fromfile(self.tensors / f"{name}.{what}.f32", np.float32).reshape(1, 3, *size)
        return read("encoder", self.size), (read("detector", self.det_size) if self.detector is not None else None)

    def image_tokens(self, tensors: tuple[np.ndarray, np.ndarray | None]) -> np.ndarray:
        tensor, det_tensor = tensors
        features = self.encoder.run([self.enc_out], {self.enc_in: tensor})[0][0]  # [tokens, width]
        patches = features[self.prefix_tokens:]
        gh, gw = self.grid
        ph, pw = self.pool
        grid = patches.reshape(ph, gh // ph, pw, gw // pw, -1).mean(axis=(1, 3))  # average-pool
        feed = {self.proj_in: grid.reshape(ph * pw, -1).astype(np.float32)}
        if self.detector is not None:
            feed[self.det_proj_in] = self.detector.run([self.det_out], {self.det_in: det_tensor})[0]
        return self.projector.run([self.proj_out], feed)[0]

    def clear(self) -> None:
        if hasattr(llama_cpp, "llama_memory_clear"):
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        else:
            llama_cpp.llama_kv_self_clear(self.ctx)

    def decode_tokens(self, tokens: list[int], pos: int, logits_last: bool) -> int:
        batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
        try:
            batch.n_tokens = len(tokens)
            for i, t in enumerate(tokens):
                batch.token[i] = t
                batch.pos[i] = pos + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = logits_last and i == len(tokens) - 1
            if llama_cpp.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed on tokens")
        finally:
            llama_cpp.llama_batch_free(batch)
        return pos + len(tokens)

    def decode_embeddings(self, embeddings: np.ndarray, pos: int) -> int:
        n = embeddings.shape[0]
        batch = llama_cpp.llama_batch_init(n, self.n_embd, 1)
        try:
            batch.n_tokens = n
            flat = np.ascontiguousarray(embeddings, dtype=np.float32).ravel()
            ctypes.memmove(batch.embd, flat.ctypes.data, flat.nbytes)
            for i in range(n):
                batch.pos[i] = pos + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = False
            if llama_cpp.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed on the image embeddings")
        finally:
            llama_cpp.llama_batch_free(batch)
        return pos + n

    def caption(self, path: Path, question: str, max_tokens: int = 96, repeat_penalty: float = 1.1, last_n: int = 64) -> dict:
        t0 = time.perf_counter()
        image = Image.open(path)
        tensor = self.preprocess(image)
        t1 = time.perf_counter()
        tokens_img = self.image_tokens(tensor)
        t2 = time.perf_counter()
        self.clear()
        prefix = self.llm.tokenize(self.chat["prefix"].encode(), add_bos=True, special=True)
        if self.adapter and self.scope != "all":
            self.use_adapter(True)
        pos = self.decode_tokens(prefix, 0, False)
        pos = self.decode_embeddings(tokens_img, pos)
        if self.adapter and self.scope in ("scene", "questions"):
            self.use_adapter(False)
        suffix = self.llm.tokenize(self.chat["suffix"].replace("{question}", question).encode(), add_bos=False, special=True)
        pos = self.decode_tokens(suffix, pos, True)
        if self.adapter and self.scope == "prompt":
            self.use_adapter(False)
        t3 = time.perf_counter()
        generated: list[int] = []
        text = b""
        stop = self.chat["stop"][0].encode()
        while len(generated) < max_tokens:
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,)).copy()
            for t in set(generated[-last_n:]):
                logits[t] = logits[t] / repeat_penalty if logits[t] > 0 else logits[t] * repeat_penalty
            token = int(np.argmax(logits))
            if llama_cpp.llama_vocab_is_eog(self.vocab, token):
                break
            generated.append(token)
            text += self.llm.detokenize([token], special=True)
            if stop in text:
                text = text[: text.index(stop)]
                break
            pos = self.decode_tokens([token], pos, True)
        t4 = time.perf_counter()
        return {
            "image": str(path),
            "text": text.decode("utf-8", "replace").strip(),
            "tokens": len(generated),
            "timings_ms": {
                "preprocess": (t1 - t0) * 1e3,
                "encode_project": (t2 - t1) * 1e3,
                "prefill": (t3 - t2) * 1e3,
                "decode": (t4 - t3) * 1e3,
                "total": (t4 - t0) * 1e3,
            },
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("images", nargs="+", type=Path)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--question", default="Describe what you see in one sentence.")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--tensors", type=Path, help="read the pre-processed tensors scenecast wrote here")
    args = ap.parse_args()
    peer = Peer(args.cache, args.threads, args.tensors)
    for path in args.images:
        result = peer.caption(path, args.question)
        print(json.dumps(result) if args.json else f"{path}: {result['text']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
