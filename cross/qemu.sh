# Sourced by the cross scripts: makes sure qemu-aarch64-static is QEMU >= 8 (Debian 12's 7.2
# segfaults while ONNX Runtime's aarch64 library loads; bookworm-backports has 10.x, which loads it).
# Installs it from bookworm-backports when needed (adds that apt source); needs root or sudo.
qemu_major() { qemu-aarch64-static --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -n 1; }
if [ "$(qemu_major || echo 0)" -lt 8 ] 2>/dev/null || ! command -v qemu-aarch64-static >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  if [ "$codename" = bookworm ] && ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "deb http://deb.debian.org/debian bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
  fi
  $SUDO apt-get update -qq
  if [ "$codename" = bookworm ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq -t bookworm-backports qemu-user-static
  else
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq qemu-user-static
  fi
fi
if [ "$(qemu_major || echo 0)" -lt 8 ]; then
  echo "cross/qemu.sh: qemu-aarch64-static $(qemu_major) is older than 8: ONNX Runtime's aarch64 library crashes under it" >&2
  exit 2
fi
