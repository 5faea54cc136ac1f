#!/usr/bin/env bash
# Run Vogeler's checks and tests on this machine: start the stack if needed (RabbitMQ and
# Apache CouchDB), then format,
# lint, and run every test (unit, integration against the real broker and database, and
# end-to-end with the real binaries). This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

scripts/stack.sh up
# The tests reach the stack through VOGELER_TEST_AMQP_URL and VOGELER_TEST_COUCHDB_URL (the
# latter with the admin credentials: Apache CouchDB refuses anonymous requests).
eval "$(scripts/stack.sh env | grep '^export VOGELER_TEST_')"
# The welcome is public: the log says which database and version the tests ran on.
couch_host=${VOGELER_TEST_COUCHDB_URL#*://}
couch_host=${couch_host#*@}
echo "== database: $(curl -s "http://${couch_host%%/*}/")" >&2

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== shipped plugin files" >&2
cargo run --quiet -p vogeler-agent -- plugins check plugins
echo "== deploy scripts (shell syntax) and example configs" >&2
for f in deploy/*.sh deploy/*/*.sh deploy/lib/*.sh deploy/debian/*/* scripts/*.sh; do
    bash -n "$f"
done
sh -n deploy/bin/vogeler-service
echo "== cargo test" >&2
cargo test --workspace
# The unit files need the binaries the tests just built; systemd-analyze comes with systemd.
if command -v systemd-analyze >/dev/null; then
    echo "== systemd units" >&2
    deploy/systemd/verify.sh target/debug
else
    echo "== systemd units: systemd-analyze is not installed here, not verified" >&2
fi
