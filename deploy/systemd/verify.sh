#!/usr/bin/env bash
# Check the unit files with `systemd-analyze verify` (works without systemd running).
# verify also checks that ExecStart= programs exist: where they are not installed in
# /usr/bin yet, copies of the units pointing at the build's binaries are checked instead.
#   deploy/systemd/verify.sh [BIN_DIR]      (default: target/release, else target/debug)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${1:-}
[[ -z $bin ]] || bin=$(cd "$bin" && pwd)
if [[ -z $bin ]]; then
    for d in "$root/target/release" "$root/target/debug"; do
        [[ -x $d/vogeler-agent ]] && { bin=$d; break; }
    done
fi
command -v systemd-analyze >/dev/null || { echo "verify: systemd-analyze is missing (apt-get install systemd)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for unit in "$here"/*.service; do
    name=$(basename "$unit")
    if [[ -x /usr/bin/vogeler-agent && -x /usr/bin/vogeler-server ]]; then
        cp "$unit" "$work/$name"
    else
        [[ -n $bin ]] || { echo "verify: no vogeler binaries in /usr/bin or target/; run cargo build" >&2; exit 1; }
        sed "s|/usr/bin/vogeler-|$bin/vogeler-|g" "$unit" > "$work/$name"
    fi
done
systemd-analyze verify --man=no "$work"/*.service
echo "verify: $(cd "$work" && ls *.service | tr '\n' ' ')ok"
for unit in "$work"/*.service; do
    printf 'verify: %s exposure %s\n' "$(basename "$unit")" \
        "$(systemd-analyze security --offline=true "$unit" 2>/dev/null | sed -n 's/.*Overall exposure level for [^:]*: //p')"
done
