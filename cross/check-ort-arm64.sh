#!/usr/bin/env bash
# Loads ONNX Runtime's aarch64 library (the fetched 1.32.0 wheel's) under qemu-user and asks its
# version through OrtGetApiBase, once per emulated CPU model: Raspberry Pi 4 (cortex-a72), Pi 5
# (cortex-a76), Jetson Orin / Neoverse (neoverse-n1), and QEMU's `max`. Prints one line per CPU.
# Takes a minute (after the packages are installed). `make check-ort-arm64` runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
source cross/qemu.sh
for p in gcc-aarch64-linux-gnu libc6-dev-arm64-cross; do
  dpkg -s "$p" >/dev/null 2>&1 || { SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo; DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$p"; }
done
cache=${SCENECAST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/scenecast}
lib=$cache/models/ort/aarch64/libonnxruntime.so.1.32.0
[ -f "$lib" ] || { echo "cross/check-ort-arm64.sh: $lib is missing; run \`make models FETCH_ARGS='--arch all'\` (or make check-ort-arm64)" >&2; exit 2; }
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cat > "$work/probe.c" <<'C'
#include <dlfcn.h>
#include <stdio.h>
typedef struct { const void *(*GetApi)(unsigned); const char *(*GetVersionString)(void); } OrtApiBase;
int main(int argc, char **argv) {
  void *h = dlopen(argv[1], RTLD_NOW);
  if (!h) { printf("dlopen failed: %s\n", dlerror()); return 1; }
  const OrtApiBase *(*base)(void) = (const OrtApiBase *(*)(void))dlsym(h, "OrtGetApiBase");
  if (!base) { printf("no OrtGetApiBase\n"); return 1; }
  printf("ONNX Runtime %s loaded\n", base()->GetVersionString());
  return 0;
}
C
aarch64-linux-gnu-gcc "$work/probe.c" -o "$work/probe" -ldl
echo "qemu-aarch64-static $(qemu-aarch64-static --version | head -n 1 | sed 's/.*version //')"
status=0
for cpu in cortex-a72 cortex-a76 neoverse-n1 max; do
  if out=$(QEMU_CPU=$cpu qemu-aarch64-static -L /usr/aarch64-linux-gnu "$work/probe" "$lib" 2>&1); then
    echo "  $cpu: $out"
  else
    echo "  $cpu: FAILED: $out"; status=1
  fi
done
exit $status
