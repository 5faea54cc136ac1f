#!/usr/bin/env bash
# Build the Debian packages vogeler-agent, vogeler-server and vogeler-runner with cargo-deb
# (installed from crates.io if missing). The .deb files land in target/debian/.
#   deploy/package.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if ! command -v cargo-deb >/dev/null; then
    echo "package: installing cargo-deb from crates.io"
    cargo install cargo-deb --locked --quiet
fi
echo "package: building release binaries"
cargo build --release --quiet -p vogeler-agent -p vogeler-server -p vogeler-runner -p vogeler-dist
echo "package: generating man pages and shell completions"
rm -rf target/assets
target/release/vogeler-dist assets target/assets
for p in vogeler-agent vogeler-server vogeler-runner; do
    # Stripped: the release profile keeps line tables for profiling, which packages do not need.
    cargo deb --no-build --strip --quiet -p "$p"
done
for deb in target/debian/*.deb; do
    echo "package: $deb ($(du -k "$deb" | cut -f1) KiB, $(dpkg-deb -c "$deb" | wc -l) entries)"
done
