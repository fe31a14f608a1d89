#!/usr/bin/env bash
# The real stack on emulated aarch64 next to x86-64: the cross-built scenecast (the armv8.2-a +
# dotprod + fp16 build, for Pi 5 and Jetson) runs `models check`, captions two photos and answers
# one question under qemu-user as a Cortex-A76, with the aarch64 ONNX Runtime library and the
# same model files; the host build does the same. Greedy decoding: the same words are expected.
# About 5 minutes after the cross build (cross/build-aarch64.sh, ~6 min on 2 cores when not built).
# `make check-arm64` runs it; exit 1 when a text differs.
set -euo pipefail
cd "$(dirname "$0")/.."
source cross/qemu.sh
cache=${SCENECAST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/scenecast}
target_dir=${CARGO_TARGET_DIR:-$cache/target}
arm=$target_dir/aarch64-unknown-linux-gnu/release/scenecast
host=$target_dir/release/scenecast
[ -x "$arm" ] || bash cross/build-aarch64.sh --no-test
[ -x "$host" ] || cargo build --release
[ -f "$cache/models/ort/aarch64/libonnxruntime.so.1.32.0" ] || {
  echo "cross/check-arm64.sh: the aarch64 ONNX Runtime is not fetched; run make check-arm64" >&2; exit 2; }
emulated() { QEMU_CPU=cortex-a76 qemu-aarch64-static -L /usr/aarch64-linux-gnu "$arm" "$@"; }
text() { python3 -c 'import json, sys; print(json.loads(sys.stdin.readline())["text"])'; }

start=$(date +%s)
echo "== models check on emulated aarch64 (Cortex-A76)"
emulated models check 2>/dev/null
photos=("$cache/models/photos/chelsea.png" "$cache/models/photos/gcompris/farm-cow.webp")
question="Is there a cat in the image?"
differ=0
compare() {  # what, aarch64 text, x86-64 text
  local same="same"; [ "$2" = "$3" ] || { same="DIFFERENT"; differ=1; }
  printf '%-28s aarch64: %-40s x86-64: %-40s %s\n' "$1" "\"$2\"" "\"$3\"" "$same"
}
echo "== captions and an answer, aarch64 (emulated) next to x86-64"
for photo in "${photos[@]}"; do
  a=$(emulated caption "$photo" --json 2>/dev/null | text)
  x=$("$host" caption "$photo" --json 2>/dev/null | text)
  compare "caption $(basename "$photo")" "$a" "$x"
done
a=$(emulated ask "${photos[0]}" "$question" --json 2>/dev/null | text)
x=$("$host" ask "${photos[0]}" "$question" --json 2>/dev/null | text)
compare "ask $(basename "${photos[0]}")" "$a" "$x"
echo "wall time $(( $(date +%s) - start )) s"
exit $differ
