#!/usr/bin/env bash
# Whole-stack fault scenarios, one at a time (they stop the shared RabbitMQ, kill processes,
# or run long), each printing its numbers. Needs the stack up (scripts/stack.sh up) and root
# (rabbitmqctl). Not part of scripts/test.sh; takes about 6 minutes.
#
#   scripts/faults.sh            every scenario
#   scripts/faults.sh NAME...    some: broker_restart server_kill db_down silence hostile
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
scripts/stack.sh up >&2
scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=(broker_restart server_kill db_down silence hostile)

run() { # TEST-FILE FILTER [ENV=VALUE...] -- extra test args
  local file=$1 filter=$2
  shift 2
  env "$@" cargo test --quiet -p vogeler-e2e --test "$file" -- --exact "$filter" \
    --include-ignored --test-threads=1 --nocapture 2>&1 |
    grep -E '^(broker|database|server|silent|answered|[0-9]+ malformed)|panicked|test result' || true
}

status=0
for s in "${scenarios[@]}"; do
  echo "== $s"
  case $s in
    broker_restart) out=$(run faults_serial broker_restart_loses_nothing) ;;
    server_kill) out=$(run faults_serial a_server_killed_mid_batch_20_times_stores_every_result_once) ;;
    db_down) out=$(run store a_database_outage_loses_nothing_and_stores_nothing_twice VOGELER_FAULT_DB_DOWN_SECS=30) ;;
    silence) out=$(run faults a_silent_broker_link_is_detected_by_heartbeat_and_nothing_is_lost VOGELER_FAULT_SILENCE_SECS=90) ;;
    hostile) out=$(run hostile malformed_messages_crash_nothing_and_are_all_refused VOGELER_HOSTILE_MESSAGES=5000) ;;
    *) echo "unknown scenario $s" >&2; exit 2 ;;
  esac
  echo "$out"
  grep -q 'test result: ok. 1 passed' <<<"$out" || status=1
done
exit $status
