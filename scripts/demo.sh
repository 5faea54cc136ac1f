#!/usr/bin/env bash
# The main job, end to end, on this machine: bring up RabbitMQ and Apache CouchDB
# (scripts/stack.sh up), build Vogeler, start a server and three agents using the shipped
# plugins, run real queries with vogeler-runner, and show the resulting node document.
#
#   scripts/demo.sh                 query `dpkg` (installed packages) and `hello`
#   scripts/demo.sh os_release      query another shipped plugin (see plugins/)
#   scripts/demo.sh --keep          leave the server and agents running (for the README's tour);
#                                   scripts/demo.sh --stop stops them
#   scripts/demo.sh --cluster [--keep] [PLUGIN]
#                                   the same on the 3-node RabbitMQ and CouchDB clusters of
#                                   scripts/cluster.sh (started if needed): every program is given
#                                   the three nodes of each, and the results and agent queues
#                                   are quorum queues (its own database and collective, `cluster`)
#
# A demo apart from the default one (its own keys and state, queues and documents), e.g. beside
# another that is running: VOGELER_DEMO_DIR=/tmp/d VOGELER_AMQP__COLLECTIVE=d VOGELER_COUCHDB__DATABASE=d
#
# Without --keep the server and agents stop when the script ends; the documents stay in
# CouchDB (database `system_records`) for you to browse in Fauxton at
# http://127.0.0.1:5984/_utils (user admin, password in ~/.cache/vogeler-stack/couchdb-admin.password)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

cluster=
if [ "${1:-}" = --cluster ]; then
  cluster=yes
  shift
  # Apart from the single-node demo: its own state, keys, queues and database.
  : "${VOGELER_DEMO_DIR:=$HOME/.local/state/vogeler-demo-cluster}"
  export VOGELER_AMQP__COLLECTIVE=${VOGELER_AMQP__COLLECTIVE:-cluster}
  export VOGELER_COUCHDB__DATABASE=${VOGELER_COUCHDB__DATABASE:-cluster_records}
  export VOGELER_AMQP__RESULTS_QUEUE_TYPE=quorum VOGELER_AMQP__AGENT_QUEUE_TYPE=quorum
fi
demo=${VOGELER_DEMO_DIR:-$HOME/.local/state/vogeler-demo}
keep=
case ${1:-} in
  --keep) keep=yes; shift ;;
  --stop)
    if [ -s "$demo/pids" ]; then
      running=$(cat "$demo/pids")
      kill $running 2>/dev/null || true
      # They finish in-flight work first: wait (up to 30 s) until they are gone.
      deadline=$((SECONDS + 30))
      while kill -0 $running 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
      rm -f "$demo/pids"
      echo "demo server and agents stopped"
    else
      echo "no demo running"
    fi
    exit 0
    ;;
esac
plugin=${1:-dpkg}
nodes=(web01 web02 db01)
if [ -s "$demo/pids" ] && kill -0 $(cat "$demo/pids") 2>/dev/null; then
  echo "a demo is still running (scripts/demo.sh --stop first)" >&2
  exit 1
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs), then run scripts/demo.sh again" >&2; exit 1; }
logs=$(mktemp -d)
pids=()
cleanup() {
  if [ -n "$keep" ]; then
    echo "(server and agents keep running, logs in $logs; stop them with: scripts/demo.sh --stop)"
    return
  fi
  ((${#pids[@]})) && kill "${pids[@]}" 2>/dev/null && wait "${pids[@]}" 2>/dev/null
  echo "(server and agents stopped; their logs are in $logs)"
}
trap cleanup EXIT

if [ -n "$cluster" ]; then
  scripts/cluster.sh up
fi
scripts/stack.sh up
# The stack's settings for the programs: CouchDB's URL, and on Apache CouchDB the admin user and
# the file holding its password (VOGELER_COUCHDB__USERNAME, VOGELER_COUCHDB__PASSWORD_FILE).
# The test URL carries the password itself: the demo does not need it in its programs' environment.
if [ -n "$cluster" ]; then
  # VOGELER_AMQP__URL and VOGELER_COUCHDB__URL list the three nodes of each cluster.
  eval "$(scripts/cluster.sh env)"
else
  eval "$(scripts/stack.sh env)"
fi
unset VOGELER_TEST_COUCHDB_URL VOGELER_TEST_AMQP_URL
# curl (below) reads from the first CouchDB node that answers.
couch_urls=${VOGELER_COUCHDB__URL//,/ }
couch_url=${couch_urls%% *}
# The programs' database (VOGELER_COUCHDB__DATABASE picks another, with VOGELER_AMQP__COLLECTIVE
# for a demo apart from the default one).
db=${VOGELER_COUCHDB__DATABASE:-system_records}

# GET a CouchDB path as the stack's admin; the credentials reach curl on stdin, never on its
# command line (where `ps` shows them). Without a password file (a pouchdb-server stack) anonymous.
couch_get() { # PATH
  local u
  for u in $couch_urls; do
    if [ -n "${VOGELER_COUCHDB__PASSWORD_FILE:-}" ]; then
      printf 'user = "%s:%s"\n' "$VOGELER_COUCHDB__USERNAME" "$(cat "$VOGELER_COUCHDB__PASSWORD_FILE")" \
        | curl -fsS -K - "$u$1" && return 0
    else
      curl -fsS "$u$1" && return 0
    fi
  done
  return 1
}

echo "== building" >&2
cargo build --quiet --bins
bin=${CARGO_TARGET_DIR:-target}/debug

# Security is on by default: agents obey only commands signed by a key they trust. The demo
# makes one key pair (kept between runs) and gives each agent its own state directory.
if [ ! -f "$demo/keys/runner.key" ]; then
  echo "== creating the runner's signing key in $demo/keys" >&2
  "$bin/vogeler-runner" keygen --out "$demo/keys" --comment demo@"$(hostname)" >&2
fi
export VOGELER_RUNNER__SIGNING_KEY="$demo/keys/runner.key"

# The server pins each node to the first key that signed for it. These three nodes are the
# demo's own: forget the keys CouchDB pinned for them, so this run's agents get theirs pinned
# (as for reinstalled nodes) even when an earlier run used other keys: another
# VOGELER_DEMO_DIR, or a state directory since removed, on a CouchDB that kept the documents.
for n in "${nodes[@]}"; do
  "$bin/vogeler-runner" nodes forget "$n" >/dev/null 2>&1 || true # a first run: no document yet
done

echo "== starting vogeler-server and agents ${nodes[*]} (plugins from ./plugins)" >&2
"$bin/vogeler-server" >"$logs/server.log" 2>&1 &
pids+=($!)
for n in "${nodes[@]}"; do
  "$bin/vogeler-agent" --node "$n" --plugin-dir plugins \
    --authorized-keys "$demo/keys/runner.pub" --state-dir "$demo/state" >"$logs/agent-$n.log" 2>&1 &
  pids+=($!)
done

[ -n "$keep" ] && mkdir -p "$demo" && echo "${pids[*]}" > "$demo/pids"

# Agents announce themselves; wait (up to 30 s) until the server has registered all three with
# this run's keys pinned (the registry view shows each node's key): before that, the runner
# reports their replies as unverified.
pinned() { # NODE: the registry lists NODE with a pinned key
  couch_get "/$db/_design/vogeler/_view/registry?key=%22$1%22" 2>/dev/null \
    | grep -qE '"key":"[A-Za-z0-9+/]{43}="'
}
deadline=$((SECONDS + 30))
until pinned web01 && pinned web02 && pinned db01; do
  if ((SECONDS >= deadline)); then
    echo "warning: not every agent registered within 30s; see the logs in $logs" >&2
    break
  fi
  sleep 0.1
done

# --wait stored: each query returns only once the server has stored every answer it shows, so
# the document printed below holds the values just collected.
stored=yes
for p in "$plugin" hello; do
  echo
  echo "\$ vogeler-runner -c $p -n all --wait stored"
  if ! "$bin/vogeler-runner" -c "$p" -n all --wait stored; then
    stored=
    echo "warning: not every answer was stored; see $logs/server.log" >&2
    grep -m3 ' WARN ' "$logs/server.log" >&2 || true
  fi
done

echo
if [ -n "${VOGELER_COUCHDB__PASSWORD_FILE:-}" ]; then
  echo "\$ curl -u $VOGELER_COUCHDB__USERNAME $couch_url/$db/web01   (the node document, values shortened)"
else
  echo "\$ curl $couch_url/$db/web01   (the node document, values shortened)"
fi
if ! command -v python3 >/dev/null; then
  couch_get /$db/web01 | head -c 3000
  echo
else
couch_get /$db/web01 | python3 -c '
import json, sys
doc = json.load(sys.stdin)
for k, v in doc.items():
    if isinstance(v, list) and len(v) > 5:
        doc[k] = v[:5] + ["... %d more" % (len(v) - 5)]
print(json.dumps(doc, indent=2))'
fi
echo
echo "Each agent's audit log of the commands it ran: $demo/state/<node>/audit.log"
echo "Browse every node document in CouchDB's web UI (Fauxton): $couch_url/_utils/#database/$db/_all_docs"
if [ -n "${VOGELER_COUCHDB__PASSWORD_FILE:-}" ]; then
  echo "  log in as ${VOGELER_COUCHDB__USERNAME}, password in $VOGELER_COUCHDB__PASSWORD_FILE"
fi
[ -n "$stored" ] || exit 1
