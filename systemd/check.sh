#!/usr/bin/env bash
# Checks the service unit: `systemd-analyze verify`, and `systemd-analyze security --offline=yes`
# must rate its exposure 2.0 or lower. The unit's ExecStart names /usr/bin/scenecast (where the
# package installs it); for the check it points at the freshly built binary.
set -euo pipefail
bin=${1:?usage: systemd/check.sh PATH-TO-BUILT-scenecast [UNIT-FILE]}
here=$(cd "$(dirname "$0")" && pwd)
unit=${2:-$here/scenecast.service}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s|/usr/bin/scenecast|$(realpath "$bin")|" "$unit" > "$tmp/scenecast.service"
systemd-analyze verify --man=no "$tmp/scenecast.service"
report=$(systemd-analyze security --offline=yes "$tmp/scenecast.service")
score=$(printf '%s\n' "$report" | sed -n 's/.*Overall exposure level for scenecast.service: \([0-9.]*\).*/\1/p')
if [ -z "$score" ]; then
  printf '%s\n' "$report" >&2
  echo "systemd/check.sh: could not read the exposure level" >&2
  exit 1
fi
if ! awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }'; then
  printf '%s\n' "$report" >&2
  echo "systemd/check.sh: exposure $score is above 2.0" >&2
  exit 1
fi
echo "systemd unit verified; exposure $score (<= 2.0)"
