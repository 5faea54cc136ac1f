#!/usr/bin/env bash
# A 3-node RabbitMQ cluster and a 3-node Apache CouchDB 3.4.3 cluster on loopback, for tests of
# what Vogeler does when a node goes away. They run NEXT TO the single-node stack of
# scripts/stack.sh (system RabbitMQ on 127.0.0.1:5672, CouchDB on 127.0.0.1:5984), which this
# script never stops, signals or reconfigures.
#
#   scripts/cluster.sh up          install what is missing, start all six nodes, form both
#                                  clusters, wait until RabbitMQ lists 3 running nodes and
#                                  CouchDB's _membership 3 nodes with _users and _replicator
#                                  (running it again on a running cluster changes nothing)
#   scripts/cluster.sh env         shell-quoted `export` lines:  eval "$(scripts/cluster.sh env)"
#                                  VOGELER_TEST_AMQP_URL and VOGELER_TEST_COUCHDB_URL are
#                                  comma-separated lists of the three nodes, with credentials;
#                                  VOGELER_AMQP__URL and VOGELER_COUCHDB__URL (what the programs
#                                  read) list the three nodes too
#   scripts/cluster.sh status      one line per node (name, ports, pid, up/down);
#                                  exits 1 when any node is down or out of its cluster
#   scripts/cluster.sh kill NODE   SIGKILL one node (its recorded process group): a crash
#   scripts/cluster.sh start NODE  start one node again, wait until it has rejoined its cluster
#   scripts/cluster.sh down        stop all six nodes by their recorded pids (data is kept:
#                                  the next `up` brings back the same clusters and databases)
#
# NODE is rabbit1, rabbit2, rabbit3, couch1, couch2 or couch3:
#
#   node     Erlang node          listens on              Erlang distribution
#   rabbit1  rabbit1@localhost    AMQP 127.0.0.1:5681     127.0.0.1:25681
#   rabbit2  rabbit2@localhost    AMQP 127.0.0.1:5682     127.0.0.1:25682
#   rabbit3  rabbit3@localhost    AMQP 127.0.0.1:5683     127.0.0.1:25683
#   couch1   node1@127.0.0.1      HTTP 127.0.0.1:25984    127.0.0.1:29101
#   couch2   node2@127.0.0.1      HTTP 127.0.0.1:25985    127.0.0.1:29102
#   couch3   node3@127.0.0.1      HTTP 127.0.0.1:25986    127.0.0.1:29103
#   (this script's rabbitmqctl calls use distribution ports 35690-35699; all nodes register
#   with the epmd already on 127.0.0.1:4369)
#
# Credentials, the stack's convention:
#   RabbitMQ  guest / guest (administrator on vhost /; RabbitMQ lets guest in from loopback only)
#   CouchDB   admin / a password generated into STATE/couchdb-admin.password (letters and digits)
# Management plugin: off (it costs memory and slows joining; see ../shared/rabbitmq-cluster).
#
# State (STATE = $VOGELER_CLUSTER_DIR, default ~/.cache/vogeler-cluster, beside the stack's
# ~/.cache/vogeler-stack; private, mode 0700):
#   rabbitN/   pid (the node's process group), beam.pid, rabbitmq.conf, mnesia/, log/, server.log
#   couchN/    pid (beam.smp, leading its process group), vm.args, local.ini, data/, couchdb.log
#   couchdb/   the Apache CouchDB release all three CouchDB nodes run (unpacked once)
#   rabbit-home/.erlang.cookie   the RabbitMQ nodes' Erlang cookie
#   couchdb-admin.password, couchdb.cookie, couchdb.uuid, couchdb.secret
# To start from nothing: scripts/cluster.sh down && rm -rf ~/.cache/vogeler-cluster
#
# Environment:
#   VOGELER_CLUSTER_DIR       the state directory above (no spaces: CouchDB splits its list of
#                             ini files on them)
#   VOGELER_COUCHDB_HOME      an unpacked Apache CouchDB release to run instead of STATE/couchdb
#   VOGELER_COUCHDB_TARBALL   the release tarball to install (default: ../shared/couchdb/
#                             couchdb-3.4.3-debian12-x86_64.tar.gz beside this checkout)
# Times measured on a 2-core machine: `up` from nothing (CouchDB unpacked, clusters formed)
# 31-33 s; after `down`, with the data kept, 17 s; on a running cluster 3-4 s. `start NODE`:
# CouchDB 1.5 s, RabbitMQ 5-7 s. `down` 5 s. Six idle nodes take about 0.6 GB of memory (RSS).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
CLUSTER_DIR=${VOGELER_CLUSTER_DIR:-$HOME/.cache/vogeler-cluster}
NODES=(rabbit1 rabbit2 rabbit3 couch1 couch2 couch3)
RABBIT_BIN=/usr/lib/rabbitmq/bin # not /usr/sbin: Debian's wrappers switch to the rabbitmq user and its cookie
RABBIT_PORTS=(5681 5682 5683)
RABBIT_DIST_PORTS=(25681 25682 25683)
RABBIT_CTL_DIST_PORTS=(35690 35699) # the system broker's CLI uses 35672-35682
RABBIT_USER=guest
RABBIT_PASSWORD=guest
COUCH_PORTS=(25984 25985 25986)
COUCH_DIST_PORTS=(29101 29102 29103)
COUCH_ADMIN='admin'
PASSWORD_FILE="$CLUSTER_DIR/couchdb-admin.password"
DEFAULT_TARBALL="$here/../shared/couchdb/couchdb-3.4.3-debian12-x86_64.tar.gz"
COUCH_LIBS=(libicu72 libssl3 libstdc++6 libgcc-s1 libtinfo6 zlib1g libsystemd0)
# The nodes' environments start empty (env -i): nothing the caller exported (RABBITMQ_*,
# ERL_FLAGS, a HOME with another cookie) reaches them.
BASE_ENV=(PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin LANG=C.UTF-8 LC_ALL=C.UTF-8)

say() { printf 'cluster: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
usage_error() { say "error: $*"; say "usage: $0 up|down|status|env|kill NODE|start NODE (see --help)"; exit 2; }

# The state directory holds the admin password, the Erlang cookies and the _users shards.
umask 077
answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
shq() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

# Repeats CMD every quarter second until it succeeds; false after SECONDS.
poll() { # SECONDS CMD...
  local limit=$1 i
  shift
  for ((i = 0; i < limit * 4; i++)); do
    "$@" && return 0
    sleep 0.25
  done
  return 1
}

apt_install() {
  command -v apt-get >/dev/null || die "apt-get not found: install $* by hand"
  if [ -z "${APT_UPDATED:-}" ]; then
    say "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    APT_UPDATED=1
  fi
  say "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

random_alnum() { # LENGTH; head closes the pipe early, tr's SIGPIPE is expected
  { tr -dc 'A-Za-z0-9' </dev/urandom || true; } | head -c "$1"
}

# A secret kept in the state directory, made once.
secret_file() { # FILE LENGTH
  if [ ! -s "$1" ]; then
    mkdir -p "$CLUSTER_DIR"
    random_alnum "$2" >"$1"
  fi
  chmod 600 "$1"
  cat "$1"
}
password() { secret_file "$PASSWORD_FILE" 24; }

# --- nodes, pids ------------------------------------------------------------------------------

node_kind() { # NODE -> rabbit|couch, or a usage error
  case $1 in
    rabbit[123]) echo rabbit ;;
    couch[123]) echo couch ;;
    *) usage_error "no node named '$1': the nodes are ${NODES[*]}" ;;
  esac
}
node_index() { echo "${1: -1}"; }
node_dir() { echo "$CLUSTER_DIR/$1"; }
node_port() { # NODE: the port clients use
  local i
  i=$(node_index "$1")
  case $1 in rabbit*) echo "${RABBIT_PORTS[i - 1]}" ;; *) echo "${COUCH_PORTS[i - 1]}" ;; esac
}
node_dist_port() {
  local i
  i=$(node_index "$1")
  case $1 in rabbit*) echo "${RABBIT_DIST_PORTS[i - 1]}" ;; *) echo "${COUCH_DIST_PORTS[i - 1]}" ;; esac
}
erlang_name() { # NODE
  case $1 in rabbit*) echo "$1@localhost" ;; *) echo "node$(node_index "$1")@127.0.0.1" ;; esac
}
# Every process a node runs carries this variable (env -i puts it there): it tells our
# processes from anything else, the system broker's beam.smp included.
marker() { echo "VOGELER_CLUSTER_NODE=$(node_dir "$1")"; }

recorded_pid() { # NODE: the pid in its pid file, or nothing
  local pid
  pid=$(cat "$(node_dir "$1")/pid" 2>/dev/null) || return 1
  case $pid in '' | *[!0-9]*) return 1 ;; esac
  echo "$pid"
}

# True while the recorded process, or the process group it leads, is still ours. After a
# crash or a reboot the number may belong to anything: that must never be signalled.
running() { # NODE
  local pid
  pid=$(recorded_pid "$1") || return 1
  if kill -0 "$pid" 2>/dev/null; then
    # Before `env -i` has run, the marker is in the command line; after, in the environment.
    grep -qzxF "$(marker "$1")" "/proc/$pid/cmdline" "/proc/$pid/environ" 2>/dev/null
    return
  fi
  # The leader is gone but members of its group live on: a group keeps its number from
  # being reused, so they are ours.
  kill -0 -- "-$pid" 2>/dev/null
}

gone() { ! kill -0 -- "-$1" 2>/dev/null && ! kill -0 "$1" 2>/dev/null; }

# Signals the node's process group and waits until all of it has exited.
stop_node() { # NODE SIGNAL SECONDS
  local node=$1 sig=$2 limit=$3 pid
  running "$node" || return 0
  pid=$(recorded_pid "$node")
  kill "-$sig" -- "-$pid" 2>/dev/null || kill "-$sig" "$pid" 2>/dev/null || true
  if ! poll "$limit" gone "$pid"; then
    say "$node (pid $pid) is still running ${limit}s after SIG$sig: sending SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    poll 10 gone "$pid" || die "$node (process group $pid) survived SIGKILL: look at ps -g $pid"
  fi
}

# Processes of a node that are not in its process group (erl_child_setup and inet_gethost
# make their own) should end with it; report any that do not.
leftovers() { # NODE -> pids
  local m f pid
  m=$(marker "$1")
  for f in /proc/[0-9]*/environ; do
    pid=${f#/proc/}
    pid=${pid%/environ}
    [ "$pid" = $$ ] && continue
    grep -qzxF "$m" "$f" 2>/dev/null && echo "$pid"
  done
  return 0
}

# Before a node starts: its ports must be free (the stack's 5672 and 5984 are not among them).
ports_free_or_die() { # NODE
  local client=HTTP port what
  [[ $1 == rabbit* ]] && client=AMQP
  for port in "$(node_port "$1")" "$(node_dist_port "$1")"; do
    what="$1's $client port"
    [ "$port" = "$(node_port "$1")" ] || what="$1's Erlang distribution port"
    answers "$port" && die "127.0.0.1:$port ($what) is taken by a process this script did not start: free it (ss -ltnp 'sport = :$port' shows who holds it), then try again"
  done
  return 0
}

# --- RabbitMQ ---------------------------------------------------------------------------------

rabbit_env() { # NODE: into the array renv, the environment of the node and of its rabbitmqctl
  local node=$1 d i
  d=$(node_dir "$node")
  i=$(node_index "$node")
  local loopback='-kernel inet_dist_use_interface {127,0,0,1}'
  renv=(
    "${BASE_ENV[@]}"
    "$(marker "$node")"
    "HOME=$CLUSTER_DIR/rabbit-home"
    # An empty file: /etc/rabbitmq/rabbitmq-env.conf names the system node and must stay out.
    "RABBITMQ_CONF_ENV_FILE=$CLUSTER_DIR/rabbitmq-env.conf"
    "RABBITMQ_NODENAME=$(erlang_name "$node")"
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    "RABBITMQ_NODE_PORT=${RABBIT_PORTS[i - 1]}"
    "RABBITMQ_DIST_PORT=${RABBIT_DIST_PORTS[i - 1]}"
    "RABBITMQ_MNESIA_BASE=$d/mnesia"
    "RABBITMQ_LOG_BASE=$d/log"
    "RABBITMQ_PID_FILE=$d/beam.pid"
    "RABBITMQ_CONFIG_FILE=$d/rabbitmq.conf"
    "RABBITMQ_ENABLED_PLUGINS_FILE=$d/enabled_plugins"
    "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=$loopback"
    "RABBITMQ_CTL_ERL_ARGS=$loopback"
    "RABBITMQ_CTL_DIST_PORT_MIN=${RABBIT_CTL_DIST_PORTS[0]}"
    "RABBITMQ_CTL_DIST_PORT_MAX=${RABBIT_CTL_DIST_PORTS[1]}"
    ERL_EPMD_ADDRESS=127.0.0.1
  )
}

rabbitctl() { # NODE ARGS...: rabbitmqctl against NODE, with that node's cookie and ports
  local node=$1
  shift
  rabbit_env "$node"
  timeout 120 env -i "${renv[@]}" "$RABBIT_BIN/rabbitmqctl" -q -n "$(erlang_name "$node")" "$@"
}

rabbit_prepare() {
  [ -x "$RABBIT_BIN/rabbitmq-server" ] || apt_install rabbitmq-server
  [ -x "$RABBIT_BIN/rabbitmq-server" ] || die "$RABBIT_BIN/rabbitmq-server not found after installing rabbitmq-server: is this Debian's package?"
  mkdir -p "$CLUSTER_DIR/rabbit-home"
  : >"$CLUSTER_DIR/rabbitmq-env.conf"
  # One cookie for the three nodes and their rabbitmqctl; Erlang wants it readable by the owner only.
  local cookie="$CLUSTER_DIR/rabbit-home/.erlang.cookie"
  if [ ! -s "$cookie" ]; then
    random_alnum 32 >"$cookie"
  fi
  chmod 400 "$cookie"
}

rabbit_launch() { # NODE: start it in the background, in its own session; no wait
  local node=$1 d
  d=$(node_dir "$node")
  ports_free_or_die "$node"
  mkdir -p "$d/mnesia" "$d/log"
  printf 'listeners.tcp.1 = 127.0.0.1:%s\n' "$(node_port "$node")" >"$d/rabbitmq.conf"
  echo '[].' >"$d/enabled_plugins"
  # `rabbitmqctl wait` would read a dead node's pid from a stale file.
  rm -f "$d/beam.pid"
  rabbit_env "$node"
  say "starting $node ($(erlang_name "$node"), AMQP 127.0.0.1:$(node_port "$node"), log in $d/log)"
  # setsid: the node leads its own process group, so down and kill reach the start script
  # and the Erlang VM under it with one signal, and a Ctrl-C in this shell reaches neither.
  setsid env -i "${renv[@]}" "$RABBIT_BIN/rabbitmq-server" >>"$d/server.log" 2>&1 </dev/null &
  echo $! >"$d/pid"
}

rabbit_await_boot() { # NODE
  local node=$1 d
  d=$(node_dir "$node")
  # Waits for the pid file, then for the broker inside to have started (a node whose peers
  # are all down waits for them: 30 s x 10).
  if ! rabbitctl "$node" wait --timeout 180 "$d/beam.pid" >/dev/null 2>&1; then
    running "$node" || { tail -20 "$d/server.log" >&2; die "$node exited during start-up (log above; more in $d/log)"; }
    die "$node did not start within 180s (see $d/log): when all three were down, start them together with: $0 up"
  fi
}

# The cluster as NODE sees it: "disk_nodes" and "running_nodes" lists, as JSON.
rabbit_cluster_json() { # NODE
  rabbitctl "$1" cluster_status --formatter json 2>/dev/null
}
rabbit_running_nodes() { # NODE -> one Erlang node name a line
  rabbit_cluster_json "$1" | jq -r '.running_nodes[]?' 2>/dev/null
}
rabbit_all_running() { # VIEWER: true when VIEWER sees all three running
  [ "$(rabbit_running_nodes "$1" | grep -c '^rabbit[123]@localhost$')" = 3 ]
}
rabbit_sees_running() { # VIEWER NODE
  rabbit_running_nodes "$1" | grep -qxF "$(erlang_name "$2")"
}

rabbit_join() { # NODE: make it a member of rabbit1's cluster, unless it is one
  local node=$1
  if rabbit_cluster_json rabbit1 | jq -e --arg n "$(erlang_name "$node")" '.disk_nodes | index($n)' >/dev/null; then
    return 0
  fi
  say "joining $node to rabbit1's cluster"
  rabbitctl "$node" stop_app >/dev/null
  rabbitctl "$node" reset >/dev/null
  # Prints harmless warnings (feature_flags file, tracked connection table).
  rabbitctl "$node" join_cluster rabbit1@localhost >/dev/null 2>&1 \
    || die "$node could not join rabbit1@localhost: see $(node_dir "$node")/log"
  rabbitctl "$node" start_app >/dev/null
}

rabbit_user() {
  # A fresh node has guest/guest; make sure it is still there with its rights.
  if rabbitctl rabbit1 authenticate_user "$RABBIT_USER" "$RABBIT_PASSWORD" >/dev/null 2>&1; then
    return 0
  fi
  say "creating RabbitMQ user $RABBIT_USER"
  rabbitctl rabbit1 add_user "$RABBIT_USER" "$RABBIT_PASSWORD" >/dev/null 2>&1 \
    || rabbitctl rabbit1 change_password "$RABBIT_USER" "$RABBIT_PASSWORD" >/dev/null
  rabbitctl rabbit1 set_user_tags "$RABBIT_USER" administrator >/dev/null
  rabbitctl rabbit1 set_permissions -p / "$RABBIT_USER" '.*' '.*' '.*' >/dev/null
}

# --- CouchDB ----------------------------------------------------------------------------------

couch_home() {
  if [ -n "${VOGELER_COUCHDB_HOME:-}" ]; then
    [ -x "$VOGELER_COUCHDB_HOME/bin/couchdb" ] || die "VOGELER_COUCHDB_HOME=$VOGELER_COUCHDB_HOME holds no bin/couchdb: point it at an unpacked Apache CouchDB release"
    echo "$VOGELER_COUCHDB_HOME"
  else
    echo "$CLUSTER_DIR/couchdb"
  fi
}

couch_install() {
  [ -x "$CLUSTER_DIR/couchdb/bin/couchdb" ] && return 0
  local tarball=${VOGELER_COUCHDB_TARBALL:-$DEFAULT_TARBALL}
  [ -f "$tarball" ] || die "no Apache CouchDB release at $tarball: set VOGELER_COUCHDB_TARBALL to the release tarball, or VOGELER_COUCHDB_HOME to an unpacked release"
  local missing=() lib
  for lib in "${COUCH_LIBS[@]}"; do
    dpkg-query -W -f='${Status}' "$lib" 2>/dev/null | grep -q 'ok installed' || missing+=("$lib")
  done
  ((${#missing[@]} == 0)) || apt_install "${missing[@]}"
  say "installing Apache CouchDB from $tarball into $CLUSTER_DIR/couchdb"
  rm -rf "$CLUSTER_DIR/couchdb.new"
  mkdir -p "$CLUSTER_DIR/couchdb.new"
  tar -xzf "$tarball" -C "$CLUSTER_DIR/couchdb.new" --strip-components=1
  [ -x "$CLUSTER_DIR/couchdb.new/bin/couchdb" ] || die "$tarball holds no bin/couchdb: is it an Apache CouchDB release?"
  mv "$CLUSTER_DIR/couchdb.new" "$CLUSTER_DIR/couchdb"
}

couch_prepare() {
  command -v curl >/dev/null || apt_install curl
  [ "$(couch_home)" = "$CLUSTER_DIR/couchdb" ] && couch_install
  [ -f "$(couch_home)/etc/default.ini" ] || die "$(couch_home)/etc/default.ini is missing: reinstall with rm -rf $CLUSTER_DIR/couchdb && $0 up"
  mkdir -p "$CLUSTER_DIR/couch-home"
  password >/dev/null
}

# One release, three nodes: each its own vm.args (node name, distribution port) and local.ini
# (HTTP port, data folder); the same cookie, uuid and auth secret on all three.
couch_configure() { # NODE
  local node=$1 d i
  d=$(node_dir "$node")
  i=$(node_index "$node")
  mkdir -p "$d/data"
  # Rewritten on every start, from the release's own.
  {
    sed -e "s/^-name .*/-name $(erlang_name "$node")/" "$(couch_home)/etc/vm.args"
    echo "-setcookie $(secret_file "$CLUSTER_DIR/couchdb.cookie" 32)"
    echo "-kernel inet_dist_listen_min ${COUCH_DIST_PORTS[i - 1]}"
    echo "-kernel inet_dist_listen_max ${COUCH_DIST_PORTS[i - 1]}"
  } >"$d/vm.args"
  # Written once: CouchDB keeps its own changes here (the admin's password hash, which
  # finish_cluster makes the same on all nodes, and what enable_cluster sets).
  [ -s "$d/local.ini" ] && return 0
  cat >"$d/local.ini" <<EOF
; written by vogeler scripts/cluster.sh for $node ($(erlang_name "$node")); CouchDB adds its own changes
[couchdb]
uuid = $(secret_file "$CLUSTER_DIR/couchdb.uuid" 32)
database_dir = $d/data
view_index_dir = $d/data

[chttpd]
port = ${COUCH_PORTS[i - 1]}
bind_address = 127.0.0.1

; finish_cluster cannot sync the admins without it, and 3.4.3 sets none
[chttpd_auth]
secret = $(secret_file "$CLUSTER_DIR/couchdb.secret" 32)

[log]
level = warning

[admins]
$COUCH_ADMIN = $(password)
EOF
}

couch_launch() { # NODE: start it in the background, in its own session; no wait
  local node=$1 d home
  d=$(node_dir "$node")
  home=$(couch_home)
  ports_free_or_die "$node"
  couch_configure "$node"
  say "starting $node ($(erlang_name "$node"), HTTP 127.0.0.1:$(node_port "$node"), log in $d/couchdb.log)"
  # bin/couchdb execs the Erlang VM: $! is beam.smp itself, leading its own process group
  # (couchjs processes included).
  setsid env -i "${BASE_ENV[@]}" "$(marker "$node")" "HOME=$CLUSTER_DIR/couch-home" \
    "COUCHDB_ARGS_FILE=$d/vm.args" "COUCHDB_INI_FILES=$home/etc/default.ini $d/local.ini" \
    "$home/bin/couchdb" >>"$d/couchdb.log" 2>&1 </dev/null &
  echo $! >"$d/pid"
}

couch_is_up() { # NODE
  curl -s --max-time 2 "http://127.0.0.1:$(node_port "$1")/_up" 2>/dev/null | grep -q '"status":"ok"'
}

couch_await_boot() { # NODE
  local node=$1 i
  for ((i = 0; i < 240; i++)); do
    couch_is_up "$node" && return 0
    running "$node" || { tail -20 "$(node_dir "$node")/couchdb.log" >&2; die "$node exited during start-up (log above)"; }
    sleep 0.25
  done
  die "$node did not answer on 127.0.0.1:$(node_port "$node") within 60s (see $(node_dir "$node")/couchdb.log)"
}

# curl as the admin; the credentials go through stdin, never the command line.
# Prints the HTTP status; the body lands in $CLUSTER_DIR/last-response.
admin_curl() { # NODE METHOD PATH [JSON]
  local args=(-s --max-time 30 -o "$CLUSTER_DIR/last-response" -w '%{http_code}' -X "$2" -H 'Content-Type: application/json' -K -)
  [ $# -ge 4 ] && args+=(--data-binary "$4")
  printf 'user = "%s:%s"\n' "$COUCH_ADMIN" "$(password)" | curl "${args[@]}" "http://127.0.0.1:$(node_port "$1")$3" || echo 000
}
response() { cat "$CLUSTER_DIR/last-response" 2>/dev/null; }

# A _cluster_setup request whose body carries the password: through a 0600 file.
cluster_setup() { # NODE JSON WHAT
  (umask 077 && printf '%s' "$2" >"$CLUSTER_DIR/setup-body.json")
  local status
  status=$(admin_curl "$1" POST /_cluster_setup "@$CLUSTER_DIR/setup-body.json")
  rm -f "$CLUSTER_DIR/setup-body.json"
  case $status in
    200 | 201) ;;
    *) die "$3 on $1: _cluster_setup answered $status: $(response)" ;;
  esac
}

setup_state() { # NODE -> cluster_disabled, cluster_enabled, cluster_finished, ...
  [ "$(admin_curl "$1" GET /_cluster_setup)" = 200 ] || return 0
  response | jq -r '.state // empty'
}
membership() { # NODE FIELD(all_nodes|cluster_nodes) -> one Erlang node name a line
  [ "$(admin_curl "$1" GET /_membership)" = 200 ] || return 0
  response | jq -r --arg f "$2" '.[$f][]?'
}
couch_sees() { # VIEWER NODE: VIEWER is connected to NODE and has it as a member
  membership "$1" all_nodes | grep -qxF "$(erlang_name "$2")" &&
    membership "$1" cluster_nodes | grep -qxF "$(erlang_name "$2")"
}

couch_form() {
  local pw node state
  pw=$(password)
  # _cluster_setup refuses 127.0.0.1 and ::1; the IPv4-mapped loopback stays on loopback.
  for node in couch1 couch2 couch3; do
    state=$(setup_state "$node")
    if [ "$state" = cluster_disabled ]; then
      say "enable_cluster on $node"
      cluster_setup "$node" "{\"action\":\"enable_cluster\",\"bind_address\":\"::ffff:127.0.0.1\",\"port\":$(node_port "$node"),\"username\":\"$COUCH_ADMIN\",\"password\":\"$pw\",\"node_count\":\"3\"}" enable_cluster
      poll 30 couch_is_up "$node" || die "$node stopped answering after enable_cluster (see $(node_dir "$node")/couchdb.log)"
    fi
  done
  for node in couch2 couch3; do
    membership couch1 cluster_nodes | grep -qxF "$(erlang_name "$node")" && continue
    say "add_node $node from couch1"
    # Without "name" CouchDB guesses couchdb@127.0.0.1.
    cluster_setup couch1 "{\"action\":\"add_node\",\"host\":\"127.0.0.1\",\"port\":$(node_port "$node"),\"name\":\"node$(node_index "$node")\",\"username\":\"$COUCH_ADMIN\",\"password\":\"$pw\"}" add_node
  done
  if [ "$(setup_state couch1)" != cluster_finished ]; then
    say "finish_cluster on couch1 (creates _users and _replicator)"
    cluster_setup couch1 '{"action":"finish_cluster"}' finish_cluster
  fi
}

couch_node_ready() { # NODE: three members connected, setup finished, system databases there
  [ "$(membership "$1" all_nodes | grep -c '^node[123]@127\.0\.0\.1$')" = 3 ] || return 1
  [ "$(membership "$1" cluster_nodes | grep -c '^node[123]@127\.0\.0\.1$')" = 3 ] || return 1
  [ "$(setup_state "$1")" = cluster_finished ] || return 1
  [ "$(admin_curl "$1" GET /_users)" = 200 ] && [ "$(admin_curl "$1" GET /_replicator)" = 200 ]
}

# --- subcommands ------------------------------------------------------------------------------

preflight() {
  case $CLUSTER_DIR in *[[:space:]]*) die "VOGELER_CLUSTER_DIR=$CLUSTER_DIR has a space: CouchDB splits its ini file list on spaces, choose another directory" ;; esac
  command -v jq >/dev/null || apt_install jq
  mkdir -p "$CLUSTER_DIR"
  if [ "$(stat -c %a "$CLUSTER_DIR")" != 700 ]; then chmod -R go-rwx "$CLUSTER_DIR"; fi
  answers 4369 || say "note: no epmd answers on 127.0.0.1:4369; the first node starts one, and it outlives down (it is not one of the nodes)"
}

up() {
  local node started=() t0=$SECONDS
  preflight
  rabbit_prepare
  couch_prepare
  # Everything that is down starts at once: a RabbitMQ node whose peers are all down waits
  # for them, so after `down` the three must come up together.
  for node in "${NODES[@]}"; do
    running "$node" || ports_free_or_die "$node"
  done
  for node in "${NODES[@]}"; do
    running "$node" && continue
    case $node in rabbit*) rabbit_launch "$node" ;; couch*) couch_launch "$node" ;; esac
    started+=("$node")
  done
  for node in couch1 couch2 couch3; do couch_await_boot "$node"; done
  for node in rabbit1 rabbit2 rabbit3; do
    # A node that was running already answers at once; one just started is checked the long way.
    if [[ " ${started[*]} " == *" $node "* ]]; then rabbit_await_boot "$node"; fi
  done

  rabbit_join rabbit2
  rabbit_join rabbit3
  poll 60 rabbit_all_running rabbit1 || die "rabbit1 does not list 3 running nodes within 60s: $(rabbitctl rabbit1 cluster_status 2>&1 | tr '\n' ' ')"
  rabbit_user

  couch_form
  for node in couch1 couch2 couch3; do
    poll 60 couch_node_ready "$node" || die "$node does not show a finished 3-node cluster within 60s: $(admin_curl "$node" GET /_membership) $(response)"
  done
  if ((${#started[@]} > 0)); then
    say "started ${started[*]} in $((SECONDS - t0))s"
  fi
  say "up: RabbitMQ cluster rabbit1-3 (AMQP 127.0.0.1:${RABBIT_PORTS[0]}-${RABBIT_PORTS[2]}, 3 running) and CouchDB cluster couch1-3 (HTTP 127.0.0.1:${COUCH_PORTS[0]}-${COUCH_PORTS[2]}, 3 members, _users and _replicator)"
  say "credentials: RabbitMQ $RABBIT_USER/$RABBIT_PASSWORD, CouchDB $COUCH_ADMIN with the password in $PASSWORD_FILE; eval \"\$($0 env)\""
}

down() {
  local node pid pids=() stray
  for node in "${NODES[@]}"; do
    if running "$node"; then
      pid=$(recorded_pid "$node")
      # SIGTERM: both Erlang VMs stop cleanly on it (RabbitMQ's start script passes it on).
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      pids+=("$node:$pid")
    fi
  done
  ((${#pids[@]} > 0)) || say "no node started by this script is running"
  for node in "${pids[@]}"; do
    stop_node "${node%%:*}" TERM 60
    say "stopped ${node%%:*} (pid ${node#*:})"
  done
  for node in "${NODES[@]}"; do
    rm -f "$(node_dir "$node")/pid"
    stray=$(leftovers "$node" | tr '\n' ' ')
    [ -z "$stray" ] || say "warning: processes of $node outlived it: $stray(ps -o pid,args -p ${stray// /,})"
  done
  return 0
}

status() {
  local node line state bad=0 rabbit_view=() couch_view=() viewer
  # One view of each cluster, from the first node that answers.
  for viewer in rabbit1 rabbit2 rabbit3; do
    if running "$viewer" && answers "$(node_port "$viewer")"; then
      mapfile -t rabbit_view < <(rabbit_running_nodes "$viewer")
      break
    fi
  done
  for viewer in couch1 couch2 couch3; do
    if running "$viewer" && couch_is_up "$viewer" && [ -s "$PASSWORD_FILE" ]; then
      mapfile -t couch_view < <(membership "$viewer" all_nodes)
      break
    fi
  done
  for node in "${NODES[@]}"; do
    local pid=- kind port
    kind=$(node_kind "$node")
    port=$(node_port "$node")
    running "$node" && pid=$(recorded_pid "$node")
    if [ "$pid" = - ]; then
      state=down
    elif [ "$kind" = rabbit ] && ! answers "$port"; then
      state="down (pid alive, AMQP port closed)"
    elif [ "$kind" = couch ] && ! couch_is_up "$node"; then
      state="down (pid alive, /_up does not answer ok)"
    else
      local view=()
      if [ "$kind" = rabbit ]; then view=("${rabbit_view[@]}"); else view=("${couch_view[@]}"); fi
      if printf '%s\n' "${view[@]}" | grep -qxF "$(erlang_name "$node")"; then
        state=up
      else
        state="up but not running in the cluster"
      fi
    fi
    [ "$state" = up ] || bad=1
    case $kind in rabbit) line="amqp 127.0.0.1:$port" ;; couch) line="http 127.0.0.1:$port" ;; esac
    printf '%-8s %-18s %-22s dist %-6s pid %-8s %s\n' "$node" "$(erlang_name "$node")" "$line" "$(node_dist_port "$node")" "$pid" "$state"
  done
  return $bad
}

print_env() {
  [ -s "$PASSWORD_FILE" ] || die "no cluster set up in $CLUSTER_DIR yet: run $0 up"
  local pw amqp=() couch=() i
  pw=$(cat "$PASSWORD_FILE")
  for i in 0 1 2; do
    amqp+=("amqp://$RABBIT_USER:$RABBIT_PASSWORD@127.0.0.1:${RABBIT_PORTS[i]}/%2f")
    couch+=("http://$COUCH_ADMIN:$pw@127.0.0.1:${COUCH_PORTS[i]}")
  done
  local IFS=,
  printf 'export VOGELER_COUCHDB__USERNAME=%s\n' "$(shq "$COUCH_ADMIN")"
  printf 'export VOGELER_COUCHDB__PASSWORD_FILE=%s\n' "$(shq "$PASSWORD_FILE")"
  printf 'export VOGELER_TEST_AMQP_URL=%s\n' "$(shq "${amqp[*]}")"
  printf 'export VOGELER_TEST_COUCHDB_URL=%s\n' "$(shq "${couch[*]}")"
  # The programs' settings: every node, in order (the password comes from the file above).
  local plain=()
  for i in 0 1 2; do plain+=("http://127.0.0.1:${COUCH_PORTS[i]}"); done
  printf 'export VOGELER_AMQP__URL=%s\n' "$(shq "${amqp[*]}")"
  printf 'export VOGELER_COUCHDB__URL=%s\n' "$(shq "${plain[*]}")"
}

kill_node() { # NODE
  local node=$1 pid
  node_kind "$node" >/dev/null
  running "$node" || die "$node is not running, nothing to kill (scripts/cluster.sh status shows the nodes)"
  pid=$(recorded_pid "$node")
  stop_node "$node" KILL 10
  say "killed $node (process group $pid, SIGKILL); bring it back with: $0 start $node"
}

start_node() { # NODE
  local node=$1 kind t0=$SECONDS viewer=
  kind=$(node_kind "$node")
  preflight
  if running "$node"; then
    say "$node is running already (pid $(recorded_pid "$node")); checking it is in its cluster"
  else
    case $kind in
      rabbit) rabbit_prepare; rabbit_launch "$node"; rabbit_await_boot "$node" ;;
      couch) couch_prepare; couch_launch "$node"; couch_await_boot "$node" ;;
    esac
  fi
  # It has rejoined when another running node of its cluster sees it (or itself, when alone).
  for viewer in "${kind}1" "${kind}2" "${kind}3"; do
    [ "$viewer" != "$node" ] && running "$viewer" && break
    viewer=
  done
  viewer=${viewer:-$node}
  case $kind in
    rabbit) poll 60 rabbit_sees_running "$viewer" "$node" || die "$viewer does not list $node as running within 60s: see $(node_dir "$node")/log" ;;
    couch) poll 60 couch_sees "$viewer" "$node" || die "$viewer's _membership does not list $node within 60s: see $(node_dir "$node")/couchdb.log" ;;
  esac
  say "$node is up and in its cluster (as $viewer sees it) after $((SECONDS - t0))s"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) print_env ;;
  kill) [ $# -eq 2 ] || usage_error "kill takes one node: ${NODES[*]}"; kill_node "$2" ;;
  start) [ $# -eq 2 ] || usage_error "start takes one node: ${NODES[*]}"; start_node "$2" ;;
  -h | --help | help | '') sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
  *) usage_error "unknown subcommand '$1'" ;;
esac
