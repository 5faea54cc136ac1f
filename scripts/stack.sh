#!/usr/bin/env bash
# Bring up what Vogeler needs on this machine: RabbitMQ on 127.0.0.1:5672 and Apache CouchDB 3
# on 127.0.0.1:5984, with an admin account whose password this script generates and keeps.
#
#   scripts/stack.sh up       install what is missing, start, wait until both answer
#   scripts/stack.sh env      print shell-quoted `export` lines for the stack:  eval "$(scripts/stack.sh env)"
#   scripts/stack.sh status   say what answers
#   scripts/stack.sh down     stop what this script started (never anything else)
#
# CouchDB, in this order:
#   1. an Apache CouchDB 3 already answering on the port whose admin password this script knows;
#      (a pouchdb-server an earlier version of this script started is stopped first; anything
#      else on the port is an error)
#   2. an installed Apache CouchDB release: $VOGELER_COUCHDB_HOME, else /opt/couchdb
#   3. the release tarball $VOGELER_COUCHDB_TARBALL (default: ../shared/couchdb/
#      couchdb-3.4.3-debian12-x86_64.tar.gz beside this checkout), unpacked into the stack dir
#   4. only when none of these exists: pouchdb-server from npm, which does NOT enforce
#      _security (every account reads and writes everything): for a quick look, not for tests
#      of access control
#
# Environment:
#   VOGELER_STACK_DIR          state: CouchDB's data (couchdb3-data; older versions kept
#                              pouchdb-server's in couchdb-data), logs, pid files, the admin password
#                              (default ~/.cache/vogeler-stack)
#   VOGELER_STACK_COUCHDB_PORT CouchDB's port (default 5984)
#   VOGELER_COUCHDB_HOME       an unpacked Apache CouchDB release to start
#   VOGELER_COUCHDB_TARBALL    an Apache CouchDB release tarball to install
# RabbitMQ is a system service: `down` leaves it running.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
STACK_DIR=${VOGELER_STACK_DIR:-$HOME/.cache/vogeler-stack}
POUCHDB_VERSION=4.2.0
AMQP_PORT=5672
AMQP_URL="amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f"
COUCH_PORT=${VOGELER_STACK_COUCHDB_PORT:-5984}
COUCH_ADMIN=admin
PASSWORD_FILE="$STACK_DIR/couchdb-admin.password"
COUCH_PID="$STACK_DIR/couchdb.pid"
POUCH_PID="$STACK_DIR/supervisor.pid" # the name earlier versions of this script used
DEFAULT_TARBALL="$here/../shared/couchdb/couchdb-3.4.3-debian12-x86_64.tar.gz"
COUCH_LIBS=(libicu72 libssl3 libstdc++6 libgcc-s1 libtinfo6 zlib1g libsystemd0)

say() { printf 'stack: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# The stack directory holds the admin password, the Erlang cookie and CouchDB's data files
# (the _users shard with password hashes): nobody else on the machine reads them.
umask 077
answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# A recorded pid counts only while it is still the program we started: after a crash or a
# reboot the number may belong to anything, and down must not signal that.
alive() { # PIDFILE
  local pid what
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  case $pid in '' | *[!0-9]*) return 1 ;; esac
  kill -0 "$pid" 2>/dev/null || return 1
  what=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  case $1 in
    # bin/couchdb until it has exec'd the Erlang VM
    "$COUCH_PID") [[ $what == *beam.smp* || $what == */bin/couchdb* ]] ;;
    "$POUCH_PID") [[ $what == *pouchdb-server* ]] ;;
    *) return 0 ;;
  esac
}

wait_for() { # port what seconds
  local port=$1 what=$2 limit=$3 i
  for ((i = 0; i < limit * 4; i++)); do
    answers "$port" && return 0
    sleep 0.25
  done
  die "$what did not answer on 127.0.0.1:$port within ${limit}s"
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

rabbitmq_up() {
  if answers $AMQP_PORT; then
    say "RabbitMQ answers on 127.0.0.1:$AMQP_PORT"
    return
  fi
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  say "starting RabbitMQ"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_for $AMQP_PORT RabbitMQ 120
  # The port opens before the broker takes connections; await_startup waits for that.
  timeout 60 rabbitmqctl await_startup >/dev/null 2>&1 || true
  say "RabbitMQ started"
}

# --- CouchDB ----------------------------------------------------------------------------------

password() {
  if [ ! -s "$PASSWORD_FILE" ]; then
    mkdir -p "$STACK_DIR"
    # Letters and digits only, so it can stand in a URL unquoted.
    # head closes the pipe early; tr's SIGPIPE is expected, not a failure.
    (umask 077 && { tr -dc 'A-Za-z0-9' </dev/urandom || true; } | head -c 24 >"$PASSWORD_FILE")
    say "generated the CouchDB admin password into $PASSWORD_FILE"
  fi
  chmod 600 "$PASSWORD_FILE"
  cat "$PASSWORD_FILE"
}

# curl as the admin; the credentials go through stdin, never the command line.
# Prints the HTTP status; the body lands in $STACK_DIR/last-response.
admin_curl() { # METHOD PATH [JSON]
  local args=(-s -o "$STACK_DIR/last-response" -w '%{http_code}' -X "$1" -H 'Content-Type: application/json' -K -)
  [ $# -ge 3 ] && args+=(--data-binary "$3")
  printf 'user = "%s:%s"\n' "$COUCH_ADMIN" "$(password)" | curl "${args[@]}" "http://127.0.0.1:$COUCH_PORT$2" || echo 000
}

# What answers on the port: apache (Apache CouchDB 3.x), pouchdb, other.
couch_kind() {
  local welcome
  welcome=$(curl -s --max-time 5 "http://127.0.0.1:$COUCH_PORT/" || true)
  case $welcome in
    *'"couchdb":"Welcome"'*'"version":"3.'*) echo apache ;;
    *'"express-pouchdb"'* | *'"pouchdb'*) echo pouchdb ;;
    *) echo other ;;
  esac
}

couch_version() {
  curl -s --max-time 5 "http://127.0.0.1:$COUCH_PORT/" | sed -n 's/.*"version":"\([^"]*\)".*/\1/p'
}

# An unpacked release to start: ours, an operator's, or the system's.
couch_home() {
  local d
  for d in "${VOGELER_COUCHDB_HOME:-}" "$STACK_DIR/couchdb" /opt/couchdb; do
    [ -n "$d" ] && [ -x "$d/bin/couchdb" ] && { echo "$d"; return 0; }
  done
  return 1
}

couch_install() {
  local tarball=${VOGELER_COUCHDB_TARBALL:-}
  if [ -z "$tarball" ] && [ -f "$DEFAULT_TARBALL" ]; then
    tarball=$DEFAULT_TARBALL
  fi
  [ -n "$tarball" ] || return 1
  [ -f "$tarball" ] || die "VOGELER_COUCHDB_TARBALL=$tarball does not exist"
  local missing=() lib
  for lib in "${COUCH_LIBS[@]}"; do
    dpkg-query -W -f='${Status}' "$lib" 2>/dev/null | grep -q 'ok installed' || missing+=("$lib")
  done
  ((${#missing[@]} == 0)) || apt_install "${missing[@]}"
  say "installing Apache CouchDB from $tarball into $STACK_DIR/couchdb"
  rm -rf "$STACK_DIR/couchdb.new"
  mkdir -p "$STACK_DIR/couchdb.new"
  tar -xzf "$tarball" -C "$STACK_DIR/couchdb.new" --strip-components=1
  [ -x "$STACK_DIR/couchdb.new/bin/couchdb" ] || die "$tarball holds no bin/couchdb: is it an Apache CouchDB release?"
  # An Erlang node name of its own, so a second stack (another VOGELER_STACK_DIR and port) or
  # a cluster node can run beside it. Set once: a single node's shards are recorded under it.
  sed -i "s/^-name couchdb@127.0.0.1\$/-name stack$(head -c4 /dev/urandom | od -An -tx1 | tr -d ' \n')@127.0.0.1/" \
    "$STACK_DIR/couchdb.new/etc/vm.args"
  mv "$STACK_DIR/couchdb.new" "$STACK_DIR/couchdb"
}

# Our settings go into one file of the release's local.d, rewritten on every start.
couch_configure() { # HOME
  local home=$1 pw
  pw=$(password)
  mkdir -p "$home/etc/local.d" "$STACK_DIR/couchdb3-data"
  (
    umask 077
    cat >"$home/etc/local.d/90-vogeler-stack.ini" <<EOF
; written by vogeler scripts/stack.sh: loopback only, one admin, data in the stack directory
[chttpd]
port = $COUCH_PORT
bind_address = 127.0.0.1

[couchdb]
database_dir = $STACK_DIR/couchdb3-data
view_index_dir = $STACK_DIR/couchdb3-data
single_node = true

; one node can hold one copy: with the default n = 3 every database is created asking for
; three (docs/operations.md, 'single node')
[cluster]
n = 1

[log]
level = warning

[admins]
$COUCH_ADMIN = $pw
EOF
  )
  # A stack directory made before the umask above was set: close it once. CouchDB inherits
  # the umask, so what it writes later is private already.
  if [ "$(stat -c %a "$STACK_DIR")" != 700 ]; then chmod -R go-rwx "$STACK_DIR"; fi
  # A cookie of our own: the release ships with none, and Erlang refuses to start without one.
  # Whoever reads it can run code inside CouchDB through Erlang distribution.
  chmod 600 "$home/etc/vm.args"
  if ! grep -q '^-setcookie' "$home/etc/vm.args"; then
    echo "-setcookie $(head -c16 /dev/urandom | od -An -tx1 | tr -d ' \n')" >>"$home/etc/vm.args"
  fi
}

couch_start() { # HOME
  local home=$1 i
  couch_configure "$home"
  mkdir -p "$STACK_DIR"
  say "starting Apache CouchDB from $home (data in $STACK_DIR/couchdb3-data, log in $STACK_DIR/couchdb.log)"
  # One simple command, so $! is beam.smp itself and `down` can stop it.
  nohup "$home/bin/couchdb" >>"$STACK_DIR/couchdb.log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$COUCH_PID"
  for ((i = 0; i < 240; i++)); do
    curl -s --max-time 2 "http://127.0.0.1:$COUCH_PORT/_up" | grep -q '"status":"ok"' && return 0
    # Our own child: its command line is still this shell's until nohup and couchdb exec.
    kill -0 "$pid" 2>/dev/null || { tail -20 "$STACK_DIR/couchdb.log" >&2; die "CouchDB exited during start-up (log above)"; }
    sleep 0.25
  done
  die "CouchDB did not answer on 127.0.0.1:$COUCH_PORT within 60s (see $STACK_DIR/couchdb.log)"
}

# enable_single_node creates _users and _replicator; only needed once per data directory.
couch_setup() {
  if [ "$(admin_curl GET /_users)" = 200 ]; then
    return 0
  fi
  local pw body
  pw=$(password)
  body="{\"action\":\"enable_single_node\",\"username\":\"$COUCH_ADMIN\",\"password\":\"$pw\",\"bind_address\":\"127.0.0.1\",\"port\":$COUCH_PORT}"
  # The body carries the password: hand it to curl through a 0600 file, not its arguments.
  (umask 077 && printf '%s' "$body" >"$STACK_DIR/setup-body.json")
  local status
  status=$(admin_curl POST /_cluster_setup "@$STACK_DIR/setup-body.json")
  rm -f "$STACK_DIR/setup-body.json"
  case $status in
    200 | 201) say "CouchDB set up as a single node (_users, _replicator created)" ;;
    *) die "CouchDB's _cluster_setup answered $status: $(cat "$STACK_DIR/last-response")" ;;
  esac
}

pouchdb_stop() {
  if alive "$POUCH_PID"; then
    # The supervisor leads its own session: kill the whole group.
    kill -TERM -- "-$(cat "$POUCH_PID")" 2>/dev/null || true
    local i
    for ((i = 0; i < 40; i++)); do answers "$COUCH_PORT" || break; sleep 0.25; done
    say "stopped the pouchdb-server this script started earlier"
  fi
  rm -f "$POUCH_PID"
}

pouchdb_start() {
  say "WARNING: no Apache CouchDB found (no $STACK_DIR/couchdb, /opt/couchdb, VOGELER_COUCHDB_HOME or"
  say "WARNING: VOGELER_COUCHDB_TARBALL): falling back to pouchdb-server, which does NOT enforce"
  say "WARNING: _security. Every account can read and write everything. Do not test access control on it."
  command -v npm >/dev/null || apt_install nodejs npm
  local bin="$STACK_DIR/pouchdb/node_modules/.bin/pouchdb-server"
  if [ ! -x "$bin" ]; then
    say "installing pouchdb-server $POUCHDB_VERSION from npm into $STACK_DIR/pouchdb (about a minute)"
    mkdir -p "$STACK_DIR/pouchdb"
    npm install --prefix "$STACK_DIR/pouchdb" --no-audit --no-fund --loglevel=error \
      "pouchdb-server@$POUCHDB_VERSION" >"$STACK_DIR/npm-install.log" 2>&1 \
      || { tail -20 "$STACK_DIR/npm-install.log" >&2; die "npm install pouchdb-server failed"; }
  fi
  mkdir -p "$STACK_DIR/pouchdb-data"
  # pouchdb-server exits on some uncaught errors under Node 20: a small loop restarts it.
  (
    cd "$STACK_DIR/pouchdb-data"
    nohup setsid bash -c "
      echo \$\$ > '$POUCH_PID'
      while true; do
        '$bin' --host 127.0.0.1 --port $COUCH_PORT --dir '$STACK_DIR/pouchdb-data'
        echo \"pouchdb-server exited with \$?; restarting\"
        sleep 1
      done" >>"$STACK_DIR/pouchdb-server.log" 2>&1 </dev/null &
  )
  wait_for "$COUCH_PORT" pouchdb-server 60
  say "pouchdb-server started on 127.0.0.1:$COUCH_PORT (no _security!)"
}

couch_up() {
  mkdir -p "$STACK_DIR"
  if answers "$COUCH_PORT"; then
    case $(couch_kind) in
      apache)
        if [ "$(admin_curl GET /_session)" = 200 ] && grep -q '"_admin"' "$STACK_DIR/last-response"; then
          couch_setup
          say "Apache CouchDB $(couch_version) answers on 127.0.0.1:$COUCH_PORT (admin password in $PASSWORD_FILE)"
          return
        fi
        die "an Apache CouchDB answers on 127.0.0.1:$COUCH_PORT but not to the admin password in $PASSWORD_FILE: stop it, or set VOGELER_STACK_COUCHDB_PORT to another port"
        ;;
      pouchdb)
        if [ -s "$POUCH_PID" ]; then
          pouchdb_stop
        elif ! couch_home >/dev/null && ! couch_install_possible; then
          say "WARNING: a pouchdb-server answers on 127.0.0.1:$COUCH_PORT; it does NOT enforce _security"
          return
        else
          die "a pouchdb-server this script did not start answers on 127.0.0.1:$COUCH_PORT: stop it, or set VOGELER_STACK_COUCHDB_PORT to another port"
        fi
        ;;
      *) die "something other than CouchDB answers on 127.0.0.1:$COUCH_PORT: free the port, or set VOGELER_STACK_COUCHDB_PORT to another port" ;;
    esac
    answers "$COUCH_PORT" && die "127.0.0.1:$COUCH_PORT is still taken"
  fi
  local home
  if ! home=$(couch_home); then
    if couch_install; then
      home=$STACK_DIR/couchdb
    else
      pouchdb_start
      return
    fi
  fi
  couch_start "$home"
  couch_setup
  say "Apache CouchDB $(couch_version) started on 127.0.0.1:$COUCH_PORT; web UI (Fauxton) at http://127.0.0.1:$COUCH_PORT/_utils (user $COUCH_ADMIN, password in $PASSWORD_FILE)"
}

couch_install_possible() {
  [ -n "${VOGELER_COUCHDB_TARBALL:-}" ] || [ -f "$DEFAULT_TARBALL" ]
}

couch_down() {
  pouchdb_stop
  if alive "$COUCH_PID"; then
    local pid i
    pid=$(cat "$COUCH_PID")
    kill -TERM "$pid"
    for ((i = 0; i < 120; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    say "stopped Apache CouchDB (pid $pid)"
  else
    say "no CouchDB started by this script is running"
  fi
  rm -f "$COUCH_PID"
}

# Shell-quoted exports: the test suite reads VOGELER_TEST_*, the programs VOGELER_COUCHDB__*.
print_env() {
  local url="http://127.0.0.1:$COUCH_PORT"
  local test_url=$url
  if [ -s "$PASSWORD_FILE" ] && [ "$(couch_kind)" = apache ]; then
    test_url="http://$COUCH_ADMIN:$(cat "$PASSWORD_FILE")@127.0.0.1:$COUCH_PORT"
    printf 'export VOGELER_COUCHDB__USERNAME=%q\n' "$COUCH_ADMIN"
    printf 'export VOGELER_COUCHDB__PASSWORD_FILE=%q\n' "$PASSWORD_FILE"
  fi
  printf 'export VOGELER_TEST_AMQP_URL=%q\n' "$AMQP_URL"
  printf 'export VOGELER_TEST_COUCHDB_URL=%q\n' "$test_url"
  printf 'export VOGELER_AMQP__URL=%q\n' "$AMQP_URL"
  printf 'export VOGELER_COUCHDB__URL=%q\n' "$url"
}

status() {
  if answers $AMQP_PORT; then say "RabbitMQ: up on 127.0.0.1:$AMQP_PORT"; else say "RabbitMQ: down"; fi
  if answers "$COUCH_PORT"; then
    case $(couch_kind) in
      apache) say "CouchDB: Apache CouchDB $(couch_version) up on 127.0.0.1:$COUCH_PORT$(alive "$COUCH_PID" && echo " (started by this script, pid $(cat "$COUCH_PID"))")" ;;
      pouchdb) say "CouchDB: pouchdb-server up on 127.0.0.1:$COUCH_PORT (no _security)" ;;
      *) say "CouchDB: something else answers on 127.0.0.1:$COUCH_PORT" ;;
    esac
  else
    say "CouchDB: down"
  fi
}

case "${1:-up}" in
  up) rabbitmq_up; couch_up ;;
  down) couch_down ;;
  env) print_env ;;
  status) status ;;
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
  *) die "usage: $0 up|env|status|down (see --help)" ;;
esac
