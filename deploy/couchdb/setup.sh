#!/usr/bin/env bash
# CouchDB setup for Vogeler: the node and history databases, readable only by Vogeler's
# users, writable only by the server. For Apache CouchDB 3.x (it uses only the documented
# HTTP API: _users, PUT /{db}, /{db}/_security, a validate_doc_update design document).
# Idempotent: config management can run it on every pass.
#
#   COUCHDB_ADMIN_PASSWORD_FILE=/root/couchdb-admin.password \
#     deploy/couchdb/setup.sh [--url http://127.0.0.1:5984] [--admin admin] \
#       [--database system_records] [--user-prefix vogeler] [--secrets-dir /etc/vogeler/secrets]
#
# Creates:
#   users   <prefix>-server (role vogeler-writer) and <prefix>-runner (role vogeler-reader),
#           passwords in <secrets-dir>/couchdb-<role>.password (0600, generated when missing)
#   dbs     <database> and <database>_history, each with a _security object: admins are
#           the vogeler-writer role (the server installs design documents), members the
#           vogeler-reader role; nobody else, not even anonymous readers, gets in
#   ddoc    _design/readonly with a validate_doc_update that refuses writes from anyone but
#           server admins and vogeler-writer (members could write otherwise)
# Passwords never appear on a command line: curl reads credentials from stdin (-K -).
#
# Check it on Apache CouchDB (the CouchDB-compatible server of the test suite does not
# enforce _security, so this is not tested here):
#   curl -u vogeler-runner:PW $URL/system_records/_all_docs           -> 200
#   curl -u vogeler-runner:PW -X PUT $URL/system_records/x -d '{}'    -> 403 forbidden
#   curl $URL/system_records/_all_docs                                -> 401 unauthorized
# Point the server at it with couchdb.username = "vogeler-server" and couchdb.password_file,
# and runners with couchdb.username = "vogeler-runner". `vogeler-runner nodes forget` writes,
# so run it with the server's credentials.
set -euo pipefail

url=http://127.0.0.1:5984 admin=admin db=system_records prefix=vogeler secrets=/etc/vogeler/secrets
while [ $# -gt 0 ]; do
  case $1 in
    --url) url=${2%/}; shift 2 ;;
    --admin) admin=$2; shift 2 ;;
    --database) db=$2; shift 2 ;;
    --user-prefix) prefix=$2; shift 2 ;;
    --secrets-dir) secrets=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
: "${COUCHDB_ADMIN_PASSWORD_FILE:?set COUCHDB_ADMIN_PASSWORD_FILE to a file holding the CouchDB admin password}"
umask 077
mkdir -p "$secrets"
admin_pw=$(tr -d '\n' <"$COUCHDB_ADMIN_PASSWORD_FILE")

# curl as the admin, credentials on stdin; prints the HTTP status, body to $out.
out=$(mktemp)
trap 'rm -f "$out"' EXIT
call() { # METHOD PATH [JSON]
  local args=(-sS -o "$out" -w '%{http_code}' -X "$1" -H 'Content-Type: application/json' -K -)
  [ $# -ge 3 ] && args+=(--data-binary "$3")
  printf 'user = "%s:%s"\n' "$admin" "$admin_pw" | curl "${args[@]}" "$url$2"
}
need() { # STATUS... -- what
  local got=$1; shift
  for ok in "$@"; do [ "$got" = "$ok" ] && return 0; done
  echo "setup.sh: unexpected HTTP $got: $(cat "$out")" >&2
  exit 1
}

status=$(call GET /)
need "$status" 200

for role in server runner; do
  file="$secrets/couchdb-$role.password"
  if [ ! -s "$file" ]; then
    head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$file"
    echo "generated a password for $prefix-$role in $file" >&2
  fi
  pw=$(tr -d '\n' <"$file")
  [ "$role" = server ] && r=vogeler-writer || r=vogeler-reader
  id="org.couchdb.user:$prefix-$role"
  rev=""
  if [ "$(call GET "/_users/$id")" = 200 ]; then
    rev=$(sed -n 's/.*"_rev":"\([^"]*\)".*/\1/p' "$out")
  fi
  doc="{\"name\":\"$prefix-$role\",\"password\":\"$pw\",\"roles\":[\"$r\"],\"type\":\"user\"${rev:+,\"_rev\":\"$rev\"}}"
  need "$(call PUT "/_users/$id" "$doc")" 201 202
done

security='{"admins":{"names":[],"roles":["vogeler-writer"]},"members":{"names":[],"roles":["vogeler-reader","vogeler-writer"]}}'
readonly_ddoc='{"language":"javascript","validate_doc_update":"function(newDoc, oldDoc, userCtx) { var r = userCtx.roles; if (r.indexOf(\"_admin\") === -1 && r.indexOf(\"vogeler-writer\") === -1) { throw({forbidden: \"read-only: only vogeler-server writes here\"}); } }"}'
for d in "$db" "${db}_history"; do
  need "$(call PUT "/$d")" 201 202 412
  need "$(call PUT "/$d/_security" "$security")" 200
  rev=""
  if [ "$(call GET "/$d/_design/readonly")" = 200 ]; then
    rev=$(sed -n 's/.*"_rev":"\([^"]*\)".*/\1/p' "$out")
  fi
  body=${readonly_ddoc%\}}${rev:+,\"_rev\":\"$rev\"}\}
  need "$(call PUT "/$d/_design/readonly" "$body")" 201 202
done
echo "databases $db and ${db}_history ready at $url: writer $prefix-server, reader $prefix-runner (passwords in $secrets)"
