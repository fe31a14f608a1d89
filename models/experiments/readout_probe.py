#!/usr/bin/env python3
"""Which readout of the encoder names new exemplars best, no LLM: the projector reads the mean of
the last layer's patch tokens (pooled 8 x 8); DINOv2's CLS token and earlier layers are the
alternatives. Same views and readers as exemplar_probe.py (held-out exemplars, cut-outs filling
75-95 % of the frame with `tight`, as the scenes show them with `scene`; 4 views of each training
exemplar, 3 of each held-out one): a linear classifier, the nearest class mean and the nearest
training view (1-NN), for the CLS token and the mean patch token of blocks 6, 8-11 and the final
norm. About 4 min on 2 cores.

    $(CACHE)/train-venv/bin/python models/experiments/readout_probe.py [tight|scene]
"""
import sys
import time
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_projector as tp
import onnx, onnxruntime as ort, torch
cfg = tp.load_config(Path(__file__).resolve().parent.parent / 'projector' / 'train-v7.toml')
from fetch import default_cache
cache = default_cache()
rng = np.random.default_rng(cfg['seed'] + 7)
comp = tp.Composer(cfg, cache / 'models' / 'photos', rng)
cats = comp.categories
framing = sys.argv[1] if len(sys.argv) > 1 else 'tight'
scale, positions = {'tight': ((0.75, 0.95), ['centre']), 'scene': (tuple(cfg['data']['single_scale']), list(tp.POSITIONS))}[framing]
def views(ex, n):
    ims, ls = [], []
    for k, name in enumerate(cats):
        for p in ex.get(name, []):
            for _ in range(n):
                c = comp.background(); comp.paste(c, comp.cutout(p), positions[rng.integers(len(positions))], scale)
                ims.append(c); ls.append(k)
    return ims, ls
held = {n: ps for n, ps in comp.heldout_photos.items() if ps}
m = onnx.load(str(cache / 'models' / 'dinov2s' / 'encoder.onnx'))
layers = [6, 8, 9, 10, 11]
for l in layers:
    m.graph.output.append(onnx.helper.make_tensor_value_info(f'/backbone/encoder/layer.{l}/Add_1_output_0', onnx.TensorProto.FLOAT, None))
o = ort.SessionOptions(); o.intra_op_num_threads = 2
sess = ort.InferenceSession(m.SerializeToString(), o, providers=['CPUExecutionProvider'])
names = [x.name for x in sess.get_outputs()]
def enc(ims):
    out = {}
    for i in range(0, len(ims), 16):
        b = np.stack([(np.asarray(im, np.float32) / 255.0 - tp.MEAN) / tp.STD for im in ims[i:i+16]]).transpose(0, 3, 1, 2).copy()
        r = sess.run(names, {sess.get_inputs()[0].name: b})
        for nm, t in zip(['final'] + [f'l{l}' for l in layers], r):
            out.setdefault(nm + '-cls', []).append(t[:, 0]); out.setdefault(nm + '-mean', []).append(t[:, 1:].mean(1))
    return {k: np.concatenate(v) for k, v in out.items()}
t0 = time.time()
tr_i, tr_l = views(comp.train_photos, 4); te_i, te_l = views(held, 3)
ftr, fte = enc(tr_i), enc(te_i)
print('| readout | linear | nearest class mean | 1-NN |\n|---|---|---|---|')
print(f'{framing}: {len(tr_l)} train, {len(te_l)} test views, {time.time()-t0:.0f} s', flush=True)
y, yt = torch.tensor(tr_l), torch.tensor(te_l)
def score(x, xt):
    c = x.mean(0); u = lambda f: torch.from_numpy((f - c) / np.linalg.norm(f - c, axis=1, keepdims=True)).float()
    x, xt = u(x), u(xt)
    torch.manual_seed(0); p = torch.nn.Linear(x.shape[1], len(cats)); opt = torch.optim.AdamW(p.parameters(), 1e-2, weight_decay=1e-4)
    for _ in range(300):
        l = torch.nn.functional.cross_entropy(p(x) * 10, y); opt.zero_grad(); l.backward(); opt.step()
    with torch.no_grad():
        lin = (p(xt).argmax(1) == yt).float().mean().item()
        cen = torch.nn.functional.normalize(torch.stack([x[y == k].mean(0) if (y == k).any() else torch.zeros(x.shape[1]) for k in range(len(cats))]), dim=1)
        ncm = ((xt @ cen.T).argmax(1) == yt).float().mean().item()
        knn = (y[(xt @ x.T).argmax(1)] == yt).float().mean().item()
    return lin, ncm, knn
for k in ftr:
    print(f'| {k} | ' + ' | '.join(f'{100*v:.1f}' for v in score(ftr[k], fte[k])) + ' |', flush=True)
for a in ['final', 'l9', 'l10']:
    print(f'| {a}-cls+mean | ' + ' | '.join(f'{100*v:.1f}' for v in score(np.concatenate([ftr[a+"-cls"], ftr[a+"-mean"]], 1), np.concatenate([fte[a+"-cls"], fte[a+"-mean"]], 1))) + ' |', flush=True)
