# Shared by deploy/package-check.sh, deploy/ansible/check.sh and deploy/puppet/check.sh:
# a private collective and database on the local stack, a runner key, a server from the
# build, and the final proof that an installed agent answers a real query.
# Source it after setting `name` (used in queue, node and database names).
#
# The stack comes from VOGELER_TEST_AMQP_URL and VOGELER_TEST_COUCHDB_URL (as the test suite
# reads them; the CouchDB URL carries an admin's credentials, since Apache CouchDB refuses
# anonymous requests and the check creates and deletes its own database), else from
# `scripts/stack.sh env`. The credentials never reach a command line: the server and runner
# get the URL without them plus VOGELER_COUCHDB__USERNAME and VOGELER_COUCHDB__PASSWORD_FILE
# (a 0600 file in $work), and curl reads them from stdin (-K -).

: "${name:?set name before sourcing exercise.sh}"
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=${VOGELER_BIN_DIR:-$root/target/release}
if [[ -z ${VOGELER_TEST_COUCHDB_URL:-} ]]; then
    eval "$("$root/scripts/stack.sh" env | grep '^export VOGELER_TEST_')"
fi
amqp_url=${VOGELER_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
couchdb_test_url=${VOGELER_TEST_COUCHDB_URL:-http://127.0.0.1:5984}
# Nothing this check starts (the agent under dpkg, Ansible or Puppet included) inherits a
# VOGELER_* variable: not the admin's URL, not an outer shell's CouchDB account or broker (the
# server and runner get theirs below), not VOGELER_BIN_DIR, which would make vogeler-service
# start the build's agent instead of the installed one.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^VOGELER_' || true)
run_id=$(date +%s)-$$
collective=$name-$run_id
database=${name//-/_}_$run_id
node=$name-node
work=$(mktemp -d)
# The password file lives in $work: gone even when the check stops before it sets its own trap
# (whose cleanup calls cleanup_common).
trap 'rm -rf "$work"' EXIT
server_pid=

say() { echo "$name: $*"; }
die() { echo "$name: FAILED: $*" >&2; exit 1; }

# One deployment check at a time on a machine: each installs and purges vogeler-agent, listens
# on 127.0.0.1:9188 and takes dpkg's lock, so a second one (someone else's, or a second CI job)
# waits here instead of purging the first one's package under it. The lock is held on fd 9
# until the check exits; start_server closes it for the server.
machine_lock=/run/lock/vogeler-deploy-check.lock
{ exec 9>>"$machine_lock"; } 2>/dev/null || die "cannot open $machine_lock: run as root"
if ! flock -n 9; then
    say "another deployment check is running on this machine: waiting for it (up to 15 minutes)"
    flock -w 900 9 || die "$machine_lock is still held after 15 minutes; see who holds it: fuser -v $machine_lock"
fi

# A %XX-encoded URL part, decoded.
url_decode() { printf '%b' "${1//%/\\x}"; }

# Split scheme://user:password@host:port/path into the URL without credentials
# ($couchdb_url), the user ($couchdb_user) and the password, which goes into a 0600 file
# ($couchdb_password_file) and is written with printf, a builtin: never an argument of a process.
couchdb_scheme=${couchdb_test_url%%://*}
couchdb_rest=${couchdb_test_url#*://}
couchdb_authority=${couchdb_rest%%/*}
couchdb_path=${couchdb_rest#"$couchdb_authority"}
couchdb_user=
couchdb_password_file=
if [[ $couchdb_authority == *@* ]]; then
    couchdb_userinfo=${couchdb_authority%@*}
    couchdb_authority=${couchdb_authority##*@}
    couchdb_user=$(url_decode "${couchdb_userinfo%%:*}")
    couchdb_password_file=$work/couchdb.password
    (umask 077 && url_decode "${couchdb_userinfo#*:}" >"$couchdb_password_file")
    unset couchdb_userinfo
fi
couchdb_url=$couchdb_scheme://$couchdb_authority${couchdb_path%/}
unset couchdb_test_url couchdb_rest couchdb_scheme couchdb_authority couchdb_path

# curl against CouchDB as the check's account. The credentials go to curl as a config file on
# stdin (-K -), with backslash and double quote escaped as curl's config syntax wants.
couch_curl() {
    local auth=
    if [[ -n $couchdb_user ]]; then
        auth="$couchdb_user:$(<"$couchdb_password_file")"
        auth=${auth//\\/\\\\}
        auth="user = \"${auth//\"/\\\"}\""
    fi
    printf '%s\n' "$auth" | curl -K - "$@"
}

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
    local session
    session=$(couch_curl -fsS --max-time 10 "$couchdb_url/_session") \
        || die "no CouchDB at $couchdb_url, or it refused ${couchdb_user:-anonymous} (scripts/stack.sh up; eval \"\$(scripts/stack.sh env)\")"
    # The check creates and deletes its database, and the server creates it: a server admin's work.
    python3 -c 'import json, sys; sys.exit(0 if "_admin" in json.load(sys.stdin)["userCtx"]["roles"] else 1)' \
        <<<"$session" \
        || die "CouchDB at $couchdb_url: ${couchdb_user:-anonymous} is no server admin; set VOGELER_TEST_COUCHDB_URL=http://ADMIN:PASSWORD@HOST:PORT (scripts/stack.sh env prints it)"
    say "CouchDB $(curl -fsS --max-time 10 "$couchdb_url/" | python3 -c 'import json, sys; print(json.load(sys.stdin).get("version", "?"))') at $couchdb_url as ${couchdb_user:-anonymous}"
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

# Run a program with this check's broker, collective, database and CouchDB account. `exec`,
# so that a program started in the background is the process whose pid `$!` holds.
common_env() {
    local account=()
    if [[ -n $couchdb_user ]]; then
        account=(VOGELER_COUCHDB__USERNAME="$couchdb_user" VOGELER_COUCHDB__PASSWORD_FILE="$couchdb_password_file")
    fi
    exec env VOGELER_AMQP__URL="$amqp_url" VOGELER_AMQP__COLLECTIVE="$collective" VOGELER_AMQP__QUEUE_EXPIRES=10m \
        VOGELER_COUCHDB__URL="$couchdb_url" VOGELER_COUCHDB__DATABASE="$database" "${account[@]}" "$@"
}

start_server() {
    (common_env "$bin/vogeler-server") >"$work/server.log" 2>&1 9>&- &
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
    couch_curl -fsS "$couchdb_url/$database/$node" 2>/dev/null | python3 -c '
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
    couch_curl -fsS "$couchdb_url/$database/$node" | python3 -c '
import json, sys
doc = json.load(sys.stdin)
print("   ", json.dumps(doc[sys.argv[1]])[:200])' "$plugin"
}

# Stop the server and delete the check's databases (a missing one answers 404: fine).
cleanup_common() {
    if [[ -n $server_pid ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    local db status
    for db in "$database" "${database}_history"; do
        status=$(couch_curl -sS -o /dev/null -w '%{http_code}' -X DELETE "$couchdb_url/$db" 2>/dev/null) || true
        case $status in
            200 | 202 | 404) ;;
            *) echo "$name: could not delete database $db (HTTP ${status:-none}): delete it by hand" >&2 ;;
        esac
    done
    rm -rf "$work"
}
