#!/usr/bin/env bash
# CouchDB setup for Vogeler: the node, history and enrollment databases, readable only by Vogeler's
# users, writable only by the server. For Apache CouchDB 3.x (it uses only the documented
# HTTP API: _session, _users, PUT /{db}, /{db}/_security, a validate_doc_update design
# document). Idempotent: config management can run it on every pass.
#
#   COUCHDB_ADMIN_PASSWORD_FILE=/root/couchdb-admin.password \
#     deploy/couchdb/setup.sh [--url http://127.0.0.1:5984] [--admin admin] \
#       [--database system_records] [--user-prefix vogeler] [--secrets-dir /etc/vogeler/secrets]
#
# Creates (or brings back to this state):
#   users   <prefix>-server (role vogeler-writer) and <prefix>-runner (role vogeler-reader),
#           passwords in <secrets-dir>/couchdb-<role>.password (0600, generated when missing;
#           an existing file is kept and its password set again)
#   dbs     <database>, <database>_history and <database>_enrollment (every database
#           vogeler-server uses, so it
#           never needs to create one), each with a _security object: admins are the
#           vogeler-writer role (the server installs its design documents), members the
#           vogeler-reader and vogeler-writer roles; nobody else, not even anonymous
#           readers, gets in
#   ddoc    _design/readonly with a validate_doc_update that refuses writes from anyone but
#           server admins and vogeler-writer (members could write otherwise)
# Passwords never appear on a command line: curl reads the admin's credentials from stdin
# (-K -) and request bodies, which carry the generated passwords, from a 0600 file
# (--data-binary @file).
#
# e2e/tests/couchdb_accounts.rs runs this script against Apache CouchDB and checks the result:
#   vogeler-server stores results as <prefix>-server and vogeler-runner reads as <prefix>-runner;
#   curl -u vogeler-runner:PW $URL/system_records/_all_docs           -> 200
#   curl -u vogeler-runner:PW -X PUT $URL/system_records/x -d '{}'    -> 403 forbidden
#   curl $URL/system_records/_all_docs                                -> 401 unauthorized
# Point the server at it with couchdb.username = "vogeler-server" and couchdb.password_file,
# and runners with couchdb.username = "vogeler-runner". `vogeler-runner nodes forget` writes,
# so run it with the server's credentials; so do `nodes accept` and `nodes reject`.
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

# The value of a double-quoted string in a curl config file, or of a JSON string: backslash
# and double quote escaped.
quoted() {
  local s=${1//\\/\\\\}
  printf '%s' "${s//\"/\\\"}"
}

# One URL path segment: everything but unreserved characters percent-encoded (database names
# may hold / + $ ( ), user names almost anything).
segment() {
  local LC_ALL=C s=$1 c i out=""
  for ((i = 0; i < ${#s}; i++)); do
    c=${s:i:1}
    case $c in
      [A-Za-z0-9._~-]) out+=$c ;;
      *) printf -v c '%02X' "'$c"; out+=%${c: -2} ;;
    esac
  done
  printf '%s' "$out"
}

auth="user = \"$(quoted "$admin"):$(quoted "$(tr -d '\n' <"$COUCHDB_ADMIN_PASSWORD_FILE")")\""

# Scratch files, 0600 under the umask: the last response, and the request body, which may
# carry a password and so is handed to curl by name, never on its command line.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
out=$tmp/response body=$tmp/request

call() { # METHOD PATH [JSON]: prints the HTTP status (000: no answer), the body goes to $out
  local args=(-sS -o "$out" -w '%{http_code}' -X "$1" -H 'Content-Type: application/json' -K -)
  if [ $# -ge 3 ]; then
    printf '%s' "$3" >"$body"
    args+=(--data-binary "@$body")
  fi
  : >"$out"
  printf '%s\n' "$auth" | curl "${args[@]}" "$url$2" || true
}
need() { # STATUS OK... : exit unless STATUS is one of the OKs
  local got=$1; shift
  for ok in "$@"; do [ "$got" = "$ok" ] && return 0; done
  if [ "$got" = 000 ]; then
    echo "setup.sh: no answer from CouchDB at $url" >&2
  else
    echo "setup.sh: unexpected HTTP $got: $(cat "$out")" >&2
  fi
  exit 1
}
rev_of() { # PATH: sets rev to the document's current revision, empty when there is none
  local status
  status=$(call GET "$1")
  need "$status" 200 404
  rev=""
  if [ "$status" = 200 ]; then
    rev=$(sed -n 's/.*"_rev":"\([^"]*\)".*/\1/p' "$out")
  fi
}

need "$(call GET /_session)" 200
if ! grep -q '"roles":\[[^]]*"_admin"' "$out"; then
  echo "setup.sh: $admin is not a server admin at $url (is the password in $COUCHDB_ADMIN_PASSWORD_FILE right?): $(cat "$out")" >&2
  exit 1
fi
# A single node set up by hand may lack the users database (CouchDB 3 does not create it).
need "$(call PUT /_users)" 201 202 412

for role in server runner; do
  file="$secrets/couchdb-$role.password"
  if [ ! -s "$file" ]; then
    head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$file"
    echo "generated a password for $prefix-$role in $file" >&2
  fi
  [ "$role" = server ] && r=vogeler-writer || r=vogeler-reader
  name=$prefix-$role
  path=/_users/$(segment "org.couchdb.user:$name")
  rev_of "$path"
  doc="{\"name\":\"$(quoted "$name")\",\"password\":\"$(quoted "$(tr -d '\n' <"$file")")\",\"roles\":[\"$r\"],\"type\":\"user\"${rev:+,\"_rev\":\"$rev\"}}"
  need "$(call PUT "$path" "$doc")" 201 202
done

security='{"admins":{"names":[],"roles":["vogeler-writer"]},"members":{"names":[],"roles":["vogeler-reader","vogeler-writer"]}}'
readonly_ddoc='{"language":"javascript","validate_doc_update":"function(newDoc, oldDoc, userCtx) { var r = userCtx.roles; if (r.indexOf(\"_admin\") === -1 && r.indexOf(\"vogeler-writer\") === -1) { throw({forbidden: \"read-only: only vogeler-server writes here\"}); } }"}'
for d in "$db" "${db}_history" "${db}_enrollment"; do
  path=/$(segment "$d")
  need "$(call PUT "$path")" 201 202 412
  need "$(call PUT "$path/_security" "$security")" 200
  rev_of "$path/_design/readonly"
  need "$(call PUT "$path/_design/readonly" "${readonly_ddoc%\}}${rev:+,\"_rev\":\"$rev\"}}")" 201 202
done
echo "databases $db, ${db}_history and ${db}_enrollment ready at $url: writer $prefix-server, reader $prefix-runner (passwords in $secrets)"
