#!/usr/bin/env bash
# Builds scenecast for aarch64-unknown-linux-gnu (Raspberry Pi 4/5 64-bit, Jetson Orin) on an
# x86_64 Debian host, and runs the library's unit tests under qemu-aarch64-static.
#
#   cross/build-aarch64.sh            build + unit tests under qemu
#   cross/build-aarch64.sh --no-test  build only
#   cross/build-aarch64.sh --armv8 [--no-test]
#                                     the plain Armv8.0-A build for a Raspberry Pi 4 (Cortex-A72),
#                                     in its own target directory ($CARGO_TARGET_DIR-armv8)
#
# Needs the aarch64 Rust standard library (`rustup target add aarch64-unknown-linux-gnu`); when it
# cannot be installed the script says so and exits 2. Debian's cross gcc/g++ and qemu are installed
# when missing. Output: $CARGO_TARGET_DIR/aarch64-unknown-linux-gnu/release/scenecast.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
run_tests=1
armv8=0
for arg in "$@"; do
  case "$arg" in
    --no-test) run_tests=0 ;;
    --armv8) armv8=1 ;;
    *) echo "cross/build-aarch64.sh: unknown option $arg (expected --no-test, --armv8)" >&2; exit 2 ;;
  esac
done

if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
  if ! rustup target add "$target"; then
    echo "cross/build-aarch64.sh: the Rust standard library for $target cannot be installed on this host" >&2
    echo "  (rustup target add $target failed); the aarch64 build cannot run here." >&2
    exit 2
  fi
fi

missing=""
for p in gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross cmake clang libclang-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing
fi

source "$(dirname "$0")/qemu.sh"

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${SCENECAST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/scenecast}/target}
if [ "$armv8" = 1 ]; then
  # The plain Armv8.0-A kernels (no dotprod, no fp16), in a target directory of its own so that
  # llama.cpp's CMake cache of the default build is not reused.
  export SCENECAST_ARM_ARCH=armv8-a
  export CARGO_TARGET_DIR=$CARGO_TARGET_DIR-armv8
fi
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64-static -L /usr/aarch64-linux-gnu"
export BINDGEN_EXTRA_CLANG_ARGS_aarch64_unknown_linux_gnu="--sysroot=/usr/aarch64-linux-gnu -I/usr/aarch64-linux-gnu/include"
# llama.cpp's CPU kernels: see cross/README.md for why armv8.2-a with dotprod and fp16.
export CMAKE_TOOLCHAIN_FILE_aarch64_unknown_linux_gnu="$PWD/cross/aarch64-toolchain.cmake"

cargo build --release --target "$target"
echo "built $CARGO_TARGET_DIR/$target/release/scenecast"
if [ "$run_tests" = 1 ]; then
  cargo test --release --target "$target" --lib
fi
