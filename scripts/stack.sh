#!/usr/bin/env bash
# Bring up what Vogeler needs on this machine: RabbitMQ on 127.0.0.1:5672 and a
# CouchDB-compatible server on 127.0.0.1:5984 (pouchdb-server from npm; Apache CouchDB is not
# packaged for Debian 12). Anything already answering on those ports is used as it is.
#
#   scripts/stack.sh up       install what is missing, start, wait until both answer
#   scripts/stack.sh status   say what answers
#   scripts/stack.sh down     stop the CouchDB-compatible server this script started
#
# Environment: VOGELER_STACK_DIR (default ~/.cache/vogeler-stack) holds pouchdb-server, its
# data and logs. RabbitMQ is a system service: `down` leaves it running.
set -euo pipefail

STACK_DIR=${VOGELER_STACK_DIR:-$HOME/.cache/vogeler-stack}
POUCHDB_VERSION=4.2.0
AMQP_PORT=5672
COUCH_PORT=5984

say() { printf 'stack: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

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

couch_up() {
  if answers $COUCH_PORT; then
    say "CouchDB-compatible server answers on 127.0.0.1:$COUCH_PORT"
    return
  fi
  command -v npm >/dev/null || apt_install nodejs npm
  local bin="$STACK_DIR/pouchdb/node_modules/.bin/pouchdb-server"
  if [ ! -x "$bin" ]; then
    say "installing pouchdb-server $POUCHDB_VERSION from npm into $STACK_DIR/pouchdb (about a minute)"
    mkdir -p "$STACK_DIR/pouchdb"
    npm install --prefix "$STACK_DIR/pouchdb" --no-audit --no-fund --loglevel=error \
      "pouchdb-server@$POUCHDB_VERSION" >"$STACK_DIR/npm-install.log" 2>&1 \
      || { tail -20 "$STACK_DIR/npm-install.log" >&2; die "npm install pouchdb-server failed"; }
  fi
  mkdir -p "$STACK_DIR/couchdb-data"
  say "starting pouchdb-server (data in $STACK_DIR/couchdb-data, log in $STACK_DIR/pouchdb-server.log)"
  # pouchdb-server exits on some uncaught errors under Node 20: a small loop restarts it.
  (
    cd "$STACK_DIR/couchdb-data"
    nohup setsid bash -c "
      echo \$\$ > '$STACK_DIR/supervisor.pid'
      while true; do
        '$bin' --host 127.0.0.1 --port $COUCH_PORT --dir '$STACK_DIR/couchdb-data'
        echo \"pouchdb-server exited with \$?; restarting\"
        sleep 1
      done" >>"$STACK_DIR/pouchdb-server.log" 2>&1 </dev/null &
  )
  wait_for $COUCH_PORT pouchdb-server 60
  say "CouchDB-compatible server started; web UI at http://127.0.0.1:$COUCH_PORT/_utils"
}

couch_down() {
  local pidfile="$STACK_DIR/supervisor.pid"
  if [ -f "$pidfile" ]; then
    local pid
    pid=$(cat "$pidfile")
    # The supervisor leads its own session: kill the whole group.
    kill -TERM -- "-$pid" 2>/dev/null || true
    rm -f "$pidfile"
    say "stopped pouchdb-server"
  else
    say "no pouchdb-server started by this script"
  fi
}

status() {
  answers $AMQP_PORT && say "RabbitMQ: up on 127.0.0.1:$AMQP_PORT" || say "RabbitMQ: down"
  answers $COUCH_PORT && say "CouchDB-compatible server: up on 127.0.0.1:$COUCH_PORT" || say "CouchDB-compatible server: down"
}

case "${1:-up}" in
  up) rabbitmq_up; couch_up ;;
  down) couch_down ;;
  status) status ;;
  *) die "usage: $0 up|status|down" ;;
esac
