#!/usr/bin/env bash
# The real stack on emulated aarch64 next to x86-64, for both ARM builds, each under the CPU it is
# made for: the armv8.2-a + dotprod + fp16 build (Raspberry Pi 5, Jetson Orin) as a Cortex-A76, and
# the plain armv8.0-a build (Raspberry Pi 4) as a Cortex-A72. Each runs `models check`, captions two
# photos and answers one question under qemu-user with the aarch64 ONNX Runtime library and the
# same model files; the host build does the same. Greedy decoding: the same words are expected.
# About 6 minutes after the cross builds (cross/build-aarch64.sh [--armv8], ~6 min each on 2 cores
# when not built). `make check-arm64` runs it; exit 1 when a text differs.
set -euo pipefail
cd "$(dirname "$0")/.."
source cross/qemu.sh
cache=${SCENECAST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/scenecast}
target_dir=${CARGO_TARGET_DIR:-$cache/target}
host=$target_dir/release/scenecast
dotprod=$target_dir/aarch64-unknown-linux-gnu/release/scenecast
plain=$target_dir-armv8/aarch64-unknown-linux-gnu/release/scenecast
# Always (incrementally) rebuilt: a binary built from older sources embeds an older reference
# manifest and would check another stack than the one in this tree.
bash cross/build-aarch64.sh --no-test
bash cross/build-aarch64.sh --armv8 --no-test
cargo build --release
[ -f "$cache/models/ort/aarch64/libonnxruntime.so.1.32.0" ] || {
  echo "cross/check-arm64.sh: the aarch64 ONNX Runtime is not fetched; run make check-arm64" >&2; exit 2; }
text() { python3 -c 'import json, sys; print(json.loads(sys.stdin.readline())["text"])'; }

photos=("$cache/models/photos/chelsea.png" "$cache/models/photos/gcompris/farm-cow.webp")
question="Is there a cat in the image?"
x_captions=()
for photo in "${photos[@]}"; do x_captions+=("$("$host" caption "$photo" --json 2>/dev/null | text)"); done
x_answer=$("$host" ask "${photos[0]}" "$question" --json 2>/dev/null | text)

differ=0
compare() {  # what, aarch64 text, x86-64 text
  local same="same"; [ "$2" = "$3" ] || { same="DIFFERENT"; differ=1; }
  printf '  %-24s aarch64: %-24s x86-64: %-24s %s\n' "$1" "\"$2\"" "\"$3\"" "$same"
}
start=$(date +%s)
for build in "dotprod cortex-a76 $dotprod" "armv8.0 cortex-a72 $plain"; do
  read -r name cpu bin <<<"$build"
  emulated() { QEMU_CPU=$cpu qemu-aarch64-static -L /usr/aarch64-linux-gnu "$bin" "$@"; }
  echo "== the $name build as a ${cpu^}: models check, then captions and an answer next to x86-64"
  emulated models check 2>/dev/null | grep -v "^manifest"
  for i in "${!photos[@]}"; do
    compare "caption $(basename "${photos[$i]}")" "$(emulated caption "${photos[$i]}" --json 2>/dev/null | text)" "${x_captions[$i]}"
  done
  compare "ask $(basename "${photos[0]}")" "$(emulated ask "${photos[0]}" "$question" --json 2>/dev/null | text)" "$x_answer"
done
echo "wall time $(( $(date +%s) - start )) s"
exit $differ
