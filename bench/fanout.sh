#!/usr/bin/env bash
# Fan-out round trip with the real binaries: start a server and N agents in a private
# collective and database, run `vogeler-runner -c hello -n all` K times, print p50 and max of
# the runner's wall time (connect, publish, all N replies). Needs the stack up
# (scripts/stack.sh up). Not part of the test suite.
#
#   bench/fanout.sh [N agents, default 3] [K runs, default 20]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
n=${1:-3}
k=${2:-20}
cargo build --quiet --release --bins
bin=target/release
run_id=bench$(date +%s)
export VOGELER_AMQP__COLLECTIVE=$run_id VOGELER_COUCHDB__DATABASE=$run_id VOGELER_AMQP__QUEUE_EXPIRES=60s VOGELER_LOG__LEVEL=warn
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  curl -fsS -X DELETE "http://127.0.0.1:5984/$run_id" >/dev/null || true
}
trap cleanup EXIT
keys=$(mktemp -d)
"$bin/vogeler-runner" keygen --out "$keys/keys" >/dev/null
export VOGELER_RUNNER__SIGNING_KEY=$keys/keys/runner.key VOGELER_AGENT__AUTHORIZED_KEYS=$keys/keys/runner.pub VOGELER_AGENT__STATE_DIR=$keys/state
"$bin/vogeler-server" 2>/dev/null &
pids+=($!)
for i in $(seq -w 1 "$n"); do
  "$bin/vogeler-agent" --node "bench-$i" --plugin-dir plugins 2>/dev/null &
  pids+=($!)
done
for _ in $(seq 1 200); do
  got=$(curl -fsS "http://127.0.0.1:5984/$run_id/_all_docs" 2>/dev/null | grep -o '"id":"bench-' | wc -l || true)
  [ "$got" -ge "$n" ] && break
  sleep 0.1
done
times=()
for _ in $(seq 1 "$k"); do
  start=$(date +%s%N)
  "$bin/vogeler-runner" -c hello -n all >/dev/null
  end=$(date +%s%N)
  times+=($(((end - start) / 1000000)))
done
sorted=$(printf '%s\n' "${times[@]}" | sort -n)
p50=$(echo "$sorted" | awk -v k="$k" 'NR == int((k + 1) / 2)')
max=$(echo "$sorted" | tail -1)
printf 'fan-out round trip: %s agents, %s runs of `vogeler-runner -c hello -n all` (release build)\n' "$n" "$k"
printf 'p50 %s ms   max %s ms\n' "$p50" "$max"
