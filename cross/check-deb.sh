#!/usr/bin/env bash
# Installs a scenecast .deb into a fresh dpkg root (no chroot, no systemd needed), checks its
# files, the example config and the unit (systemd/check.sh), then edits the config, upgrades
# (reinstalls) and removes the package: the user's config must survive both.
set -euo pipefail
deb=${1:?usage: cross/check-deb.sh PATH-TO-scenecast.deb}
here=$(cd "$(dirname "$0")/.." && pwd)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates" "$root/var/lib/dpkg/triggers"
touch "$root/var/lib/dpkg/status"
# The fresh root has no libc package registered, hence --force-depends; nothing runs inside it.
in_root() {
  dpkg --root="$root" --force-depends --force-confold --log=/dev/null "$@" >"$root/dpkg.out" 2>&1 \
    || { cat "$root/dpkg.out" >&2; exit 1; }
}

in_root -i "$deb"
for f in usr/bin/scenecast lib/systemd/system/scenecast.service lib/systemd/system/scenecast-worker.service \
         etc/scenecast/scenecast.toml \
         usr/share/scenecast/models/fetch.py usr/share/scenecast/models/sources.toml \
         usr/share/scenecast/systemd/jetson.conf; do
  test -e "$root/$f" || { echo "cross/check-deb.sh: the package lacks /$f" >&2; exit 1; }
done
# `fetch.py` on the device copies the core parts' repository files (registry "repo": projectors,
# adapters) and runs the tool each derived step needs: all must ship.
models="$root/usr/share/scenecast/models"
for f in $(python3 - "$models/sources.toml" <<'PY'
import sys, tomllib
parts = tomllib.load(open(sys.argv[1], "rb"))["part"]
for p in parts:
    if p.get("group") != "core":
        continue
    if p.get("registry") == "repo":
        print(*(f["member"] for f in p.get("file", [])))
    tools = {"merge": "merge_adapter.py", "convert": "tfjs_to_onnx.py", "tokenizer": "clip_tokenizer.py"}
    print(*(tool for step, tool in tools.items() if step in p))
PY
); do
  test -e "$models/$f" || { echo "cross/check-deb.sh: the package lacks $f, which fetch.py needs for a core part" >&2; exit 1; }
done
"$root/usr/bin/scenecast" --config "$root/etc/scenecast/scenecast.toml" config >/dev/null
bash "$here/systemd/check.sh" "$root/usr/bin/scenecast" "$root/lib/systemd/system/scenecast.service"
bash "$here/systemd/check.sh" "$root/usr/bin/scenecast" "$root/lib/systemd/system/scenecast-worker.service"

echo "# kept across upgrades" >> "$root/etc/scenecast/scenecast.toml"
in_root -i "$deb"
grep -q "# kept across upgrades" "$root/etc/scenecast/scenecast.toml" || { echo "cross/check-deb.sh: an upgrade replaced the user's config" >&2; exit 1; }
in_root -r scenecast
test ! -e "$root/usr/bin/scenecast" || { echo "cross/check-deb.sh: removal left the binary" >&2; exit 1; }
grep -q "# kept across upgrades" "$root/etc/scenecast/scenecast.toml" || { echo "cross/check-deb.sh: removal deleted the config" >&2; exit 1; }
echo "deb verified: $(basename "$deb") installs into a fresh root, its unit verifies, upgrade and removal keep /etc/scenecast/scenecast.toml"
