#!/usr/bin/env bash
# Vogeler's benchmarks, one command: fan-out round trips with simulated fleets of 10, 100,
# 1,000 and 5,000 nodes (replies, and documents stored), fact-filter targeting over 5,000
# registered nodes, server ingest against the database's raw _bulk_docs rate, and the
# footprint of an idle agent, an agent in a burst and the server while ingesting.
# Prints one table and writes it as JSON to bench/results/<what>-<time>.json.
#
#   bench/run.sh                    everything (about 8 minutes on 2 cores)
#   bench/run.sh fanout --nodes 1000 --runs 3
#   bench/run.sh ingest | targeting | footprint      (see: bench/run.sh --help)
#
# Runs on the stack scripts/stack.sh brings up (RabbitMQ and Apache CouchDB) and says which
# database it measured, in its table and in the JSON ("couchdb": the database's GET / answer).
# Not part of the test suite; numbers depend on the machine, so compare runs made on the same
# one.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
scripts/stack.sh up >&2
# The benchmark reaches the stack through VOGELER_TEST_AMQP_URL and VOGELER_TEST_COUCHDB_URL.
eval "$(scripts/stack.sh env | grep '^export VOGELER_TEST_')"
cargo build --release --quiet -p vogeler-agent -p vogeler-server -p vogeler-runner -p vogeler-bench
exec target/release/vogeler-bench "$@"
