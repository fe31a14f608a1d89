#!/usr/bin/env python3
"""What a caption filter by the image tokens would give: names the tokens do not support removed.

`scenecast eval --report R.md` writes, next to the report, the per-scene results as JSON (`R.json`),
and with them each category's *support*: the largest cosine of an image token with the category's
name direction in the LLM's input space (`eval::support`), the similarity the projector's grounding
loss trains (tokens over an object point at its name, background tokens away from every name).

This tool reads such a file and re-scores the captions as if every named category whose support is
below a threshold had been dropped (a caption left with no name says "nothing known"). The threshold
is calibrated on the rows whose objects the projector trained on (`--calibrate`, by default the
training photos and the held-out pairs of training objects): the highest threshold that keeps
`--keep` of their correctly named categories. It is then applied, unchanged, to the held-out rows
(new exemplars, whole photos, unknown objects), which therefore measure it. No LLM is run: the
captions are the ones in the file.

    scenecast eval SET.json --report /tmp/vN.eval.md        # or `make eval`: models/projector/<name>.eval.json
    python3 models/experiments/grounded_filter.py /tmp/vN.eval.json
    python3 models/experiments/grounded_filter.py models/projector/dinov2s-nanodet-smollm2-v10.eval.json.gz
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
from pathlib import Path

CALIBRATE = ("photo", "heldout-pair")


def mentions(text: str, categories: list[str]) -> list[str]:
    """The categories named in `text`, as `llm::mentions` finds them: the name, or the plural of its
    last word (-s, -es), as whole words, case-insensitive."""
    words = [w for w in re.split(r"[^0-9A-Za-z]+", text.lower()) if w]
    found = []
    for name in categories:
        *head, last = name.lower().split(" ")
        n = len(head) + 1
        if any(words[i:i + n - 1] == head and words[i + n - 1] in (last, last + "s", last + "es")
               for i in range(len(words) - n + 1)):
            found.append(name)
    return found


def print_rows(results: list[dict], kept, calibrate: list[str], headers: tuple[str, str, str, str]) -> None:
    """Prints, per scene kind, precision / recall and the share of scenes named nothing, of each
    scene's `named` categories and of those `kept(scene)` returns (the calibration rows marked)."""
    rows = collections.defaultdict(lambda: collections.Counter())
    for r in results:
        shown = set(r["objects"])
        after = kept(r)
        for kind in (r["kind"], "all"):
            c = rows[kind]
            for name, named in (("before", r["named"]), ("after", after)):
                c[name + "_right"] += len(set(named) & shown)
                c[name + "_named"] += len(set(named))
                c[name + "_nothing"] += not named
            c["shown"] += len(shown)
            c["scenes"] += 1

    def pct(a: int, b: int) -> str:
        return f"{100 * a / b:.1f}" if b else "–"

    print(f"| scenes | n | {' | '.join(headers)} |")
    print("|---|---|---|---|---|---|")
    for kind in sorted(rows, key=lambda k: (k == "all", k in calibrate, k)):
        c = rows[kind]
        mark = " (calibration)" if kind in calibrate else ""
        print(f"| {kind}{mark} | {c['scenes']} | {pct(c['before_right'], c['before_named'])} / {pct(c['before_right'], c['shown'])} "
              f"| {pct(c['after_right'], c['after_named'])} / {pct(c['after_right'], c['shown'])} "
              f"| {pct(c['before_nothing'], c['scenes'])} | {pct(c['after_nothing'], c['scenes'])} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="per-scene results of `scenecast eval --report` (the .json next to the .md, or it gzipped)")
    ap.add_argument("--calibrate", nargs="+", default=list(CALIBRATE), help="scene kinds to calibrate the threshold on")
    ap.add_argument("--keep", type=float, default=0.95, help="share of the calibration rows' correct names to keep")
    args = ap.parse_args()

    raw = args.results.read_bytes()
    doc = json.loads(gzip.decompress(raw) if args.results.suffix == ".gz" else raw)
    results = doc["scenes"]
    categories = doc.get("categories", [])
    if not categories or any(len(r.get("support", [])) != len(categories) for r in results):
        raise SystemExit(f"error: {args.results} has no categories or no support per category for every scene; "
                         f"expected the JSON of `scenecast eval --report` from a scenecast with eval::support")
    index = {c: i for i, c in enumerate(categories)}
    for r in results:
        # With the manifest's [grounding], the caption in the file is already checked; this tool
        # re-scores the caption as the LLM wrote it.
        if r.get("unchecked"):
            r["named"] = mentions(r["unchecked"], categories)

    right = [r["support"][index[n]] for r in results if r["kind"] in args.calibrate for n in r["named"] if n in r["objects"]]
    if not right:
        raise SystemExit(f"error: no correctly named category in rows {args.calibrate}")
    right.sort()
    threshold = right[int((1 - args.keep) * len(right))]
    print(f"threshold {threshold:.3f}: keeps {args.keep:.0%} of the {len(right)} correct names on rows "
          f"{', '.join(args.calibrate)} (calibration, not a measurement)\n")

    print_rows(results, lambda r: [n for n in r["named"] if r["support"][index[n]] >= threshold], args.calibrate,
               ("P / R before", "P / R after", "named nothing before", "after"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
