#!/usr/bin/env bash
# Whole-stack fault scenarios, one at a time (they stop the shared RabbitMQ, kill processes,
# or run long), each printing its numbers. Needs the stack up (scripts/stack.sh up) and root
# (rabbitmqctl). Not part of scripts/test.sh; takes about 6 minutes.
#
#   scripts/faults.sh            every scenario but cluster
#   scripts/faults.sh NAME...    some: broker_restart server_kill db_down silence hostile cluster
#
# cluster (e2e/tests/cluster_faults.rs, named only, never in the default list): kills nodes of
# the 3-node RabbitMQ and CouchDB clusters of scripts/cluster.sh, never the stack's services on
# 5672/5984. It runs `scripts/cluster.sh up`, takes its settings (`scripts/cluster.sh env`, in
# a subshell, so the other scenarios keep the stack's), then runs four scenarios one at a time
# under a stream of `-n all` queries to 200 in-process agents: rabbit_node (rabbit2 down 20 s),
# couch_node (couch2 down 20 s), both (rabbit2 and couch3 down 20 s), rolling_restart
# (rabbit1, rabbit2, rabbit3 killed and started one after another). It prints one Markdown
# table, a row per scenario, and writes the whole output, the programs' warnings included, to
# ${TMPDIR:-/tmp}/vogeler-cluster-faults.log. `cluster.NAME` runs one of the four. It ends with
# `scripts/cluster.sh up` again, which starts any node a failed scenario left down, and leaves
# the cluster running (scripts/cluster.sh down stops it). 3 to 5 minutes a scenario on a busy
# 2-core machine (a debug build: one query to 200 agents took 17 s there). In the environment:
# VOGELER_CLUSTER_AGENTS (200) and VOGELER_CLUSTER_TIMEOUT (the runner's, 5 s).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=(broker_restart server_kill db_down silence hostile)
stack=no
for s in "${scenarios[@]}"; do
  case $s in
    cluster | cluster.rabbit_node | cluster.couch_node | cluster.both | cluster.rolling_restart) ;;
    cluster.*) echo "unknown cluster scenario ${s#cluster.} (rabbit_node couch_node both rolling_restart)" >&2; exit 2 ;;
    *) stack=yes ;;
  esac
done
[ $stack = no ] || scripts/stack.sh up >&2

run() { # TEST-FILE FILTER [ENV=VALUE...] -- extra test args
  local file=$1 filter=$2
  shift 2
  env "$@" cargo test --quiet -p vogeler-e2e --test "$file" -- --exact "$filter" \
    --include-ignored --test-threads=1 --nocapture 2>&1 |
    grep -E '^(broker|database|server|silent|answered|[0-9]+ malformed)|panicked|test result' || true
}

# The cluster scenarios: one table, a header and a row per scenario.
cluster() { # SCENARIO...
  local log=${TMPDIR:-/tmp}/vogeler-cluster-faults.log t failed=0
  scripts/cluster.sh up >&2 || return 1
  eval "$(scripts/cluster.sh env)" || return 1
  : >"$log"
  for t in "$@"; do
    echo "-- cluster $t (output in $log)" >&2
    cargo test --quiet -p vogeler-e2e --test cluster_faults -- --exact "$t" --include-ignored \
      --test-threads=1 --nocapture >>"$log" 2>&1 || failed=1
  done
  scripts/cluster.sh up >&2 || failed=1
  grep -E '^cluster |panicked|test result' "$log" || true
  echo
  awk '/^\|/ && !seen[$0]++' "$log"
  return $failed
}

status=0
for s in "${scenarios[@]}"; do
  echo "== $s"
  case $s in
    cluster)
      (cluster rabbit_node couch_node both rolling_restart) || status=1
      continue
      ;;
    cluster.*)
      (cluster "${s#cluster.}") || status=1
      continue
      ;;
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
