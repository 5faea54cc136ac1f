# Shared by deploy/package-check.sh, deploy/ansible/check.sh and deploy/puppet/check.sh:
# a private collective and database on the local stack, a runner key, a server from the
# build, and the final proof that an installed agent answers a real query.
# Source it after setting `name` (used in queue, node and database names).

: "${name:?set name before sourcing exercise.sh}"
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=${VOGELER_BIN_DIR:-$root/target/release}
amqp_url=${VOGELER_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
couchdb_url=${VOGELER_TEST_COUCHDB_URL:-http://127.0.0.1:5984}
run_id=$(date +%s)-$$
collective=$name-$run_id
database=${name//-/_}_$run_id
node=$name-node
work=$(mktemp -d)
server_pid=

say() { echo "$name: $*"; }
die() { echo "$name: FAILED: $*" >&2; exit 1; }

# Wait up to $1 seconds for the command after it to succeed.
wait_until() {
    local limit=$1
    shift
    local deadline=$((SECONDS + limit))
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

need_stack() {
    curl -fsS "$couchdb_url/" >/dev/null || die "no CouchDB-compatible server at $couchdb_url (scripts/stack.sh up)"
    (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null || die "no RabbitMQ on 127.0.0.1:5672 (scripts/stack.sh up)"
    for p in vogeler-server vogeler-runner; do
        [[ -x $bin/$p ]] || die "$bin/$p is missing; run: cargo build --release"
    done
}

# A runner key pair in $work/keys; its public half goes where the agent is told to look.
make_runner_key() {
    "$bin/vogeler-runner" keygen --out "$work/keys" --comment "$name" >/dev/null
    say "runner key $(cut -d' ' -f2 "$work/keys/runner.pub" | cut -c1-12)… in $work/keys"
}

# The agent's config, as a config-management tool would write it: the local broker, a
# private collective whose queues vanish when unused.
agent_toml() {
    cat <<TOML
[amqp]
url = "$amqp_url"
collective = "$collective"
queue_expires = "10m"

[agent]
node = "$node"
plugin_dir = "/etc/vogeler/plugins.d"
authorized_keys = "/etc/vogeler/keys/authorized_keys"
state_dir = "/var/lib/vogeler"
http_listen = "127.0.0.1:${agent_port:-9188}"
TOML
}

# Run a program with this check's broker, collective and database. `exec`, so that a
# program started in the background is the process whose pid `$!` holds.
common_env() {
    exec env VOGELER_AMQP__URL="$amqp_url" VOGELER_AMQP__COLLECTIVE="$collective" VOGELER_AMQP__QUEUE_EXPIRES=10m \
        VOGELER_COUCHDB__URL="$couchdb_url" VOGELER_COUCHDB__DATABASE="$database" "$@"
}

start_server() {
    (common_env "$bin/vogeler-server") >"$work/server.log" 2>&1 &
    server_pid=$!
    say "server pid $server_pid (log $work/server.log), database $database"
}

# Ask the node for a plugin through the runner; print the runner's table.
query() {
    local plugin=$1
    (common_env VOGELER_RUNNER__SIGNING_KEY="$work/keys/runner.key" \
        "${runner:-$bin/vogeler-runner}" -c "$plugin" -n "$node" --timeout 20s --no-progress)
}

# The node's document holds a value for the plugin.
stored() {
    curl -fsS "$couchdb_url/$database/$node" 2>/dev/null | python3 -c '
import json, sys
doc = json.load(sys.stdin)
sys.exit(0 if doc.get(sys.argv[1]) is not None else 1)' "$1" 2>/dev/null
}

# The proof: the registered node answers $1 through runner -> agent -> server -> CouchDB.
prove_answers() {
    local plugin=$1
    wait_until 30 stored vogeler || die "node $node never registered (server log: $work/server.log)"
    say "node $node registered in $database"
    local out
    out=$(query "$plugin") || { echo "$out"; die "runner query -c $plugin failed"; }
    echo "$out"
    wait_until 15 stored "$plugin" || die "no $plugin value in the document of $node"
    say "CouchDB document $database/$node has key \"$plugin\":"
    curl -fsS "$couchdb_url/$database/$node" | python3 -c '
import json, sys
doc = json.load(sys.stdin)
print("   ", json.dumps(doc[sys.argv[1]])[:200])' "$plugin"
}

cleanup_common() {
    if [[ -n $server_pid ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    curl -fsS -X DELETE "$couchdb_url/$database" >/dev/null 2>&1 || true
    curl -fsS -X DELETE "$couchdb_url/${database}_history" >/dev/null 2>&1 || true
    rm -rf "$work"
}
