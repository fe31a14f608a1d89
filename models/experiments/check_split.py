#!/usr/bin/env python3
"""What each judge of the caption check does, from a `scenecast eval` report's per-scene record.

The report (`projector/<name>.eval.json.gz`) keeps, per scene, the caption as the LLM wrote it, each
category's support by the image tokens and, with a `category_prefix` detector, its classifier score.
This re-applies the manifest's two thresholds one after the other and prints precision / recall
per row: as written, after the token check, after both (which the published captions must equal,
except where the guide wrote a caption again: `grounding.guide_threshold`), and as published. No
model runs.

    python3 models/experiments/check_split.py models/projector/dinov2s-nanodet-imagenet-smollm2-v15.eval.json.gz
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from grounded_filter import mentions  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path, help="a `scenecast eval` report's .eval.json or .eval.json.gz")
    ap.add_argument("--manifest", type=Path, default=HERE / "reference.toml", help="whose [grounding] thresholds to apply")
    args = ap.parse_args()
    raw = args.report.read_bytes()
    doc = json.loads(gzip.decompress(raw) if args.report.suffix == ".gz" else raw)
    g = tomllib.loads(args.manifest.read_text())["grounding"]
    tokens, classifier = g["threshold"], g.get("classifier_threshold")
    cats = doc["categories"]
    at = {c: i for i, c in enumerate(cats)}
    rows: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    mismatched = 0
    for r in doc["scenes"]:
        written = mentions(r.get("unchecked") or r["caption"], cats)
        kept = [n for n in written if r["support"][at[n]] >= tokens]
        scores = r.get("classifier") or []
        both = [n for n in kept if classifier is None or not scores or scores[at[n]] is None or scores[at[n]] >= classifier]
        mismatched += "guided" not in r and sorted(both) != sorted(r["named"])
        shown = set(r["objects"])
        d = rows[r["kind"]]
        d["n"] += 1
        d["guided"] += "guided" in r
        for key, names in (("written", written), ("tokens", kept), ("both", both), ("published", r["named"])):
            d[key + "tp"] += sum(n in shown for n in names)
            d[key + "fp"] += sum(n not in shown for n in names)
            d[key + "fn"] += len(shown - set(names))

    def pr(d: dict[str, int], key: str) -> str:
        tp, fp, fn = d[key + "tp"], d[key + "fp"], d[key + "fn"]
        pct = lambda a, b: f"{100 * a / b:.1f}" if b else "–"  # noqa: E731
        return f"{pct(tp, tp + fp)} / {pct(tp, tp + fn)}"

    print(f"thresholds: tokens {tokens}, classifier {classifier} ({args.manifest.name})\n")
    print("| scenes | n | as written | tokens | tokens + classifier | published (guided) |\n|---|---|---|---|---|---|")
    for kind, d in rows.items():
        print(f"| {kind} | {d['n']} | {pr(d, 'written')} | {pr(d, 'tokens')} | {pr(d, 'both')} | {pr(d, 'published')} "
              f"({d['guided']}) |")
    if mismatched:
        print(f"\nwarning: {mismatched} scenes' published names differ from the re-applied check "
              "(another manifest's thresholds?)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
