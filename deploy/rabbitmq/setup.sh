#!/usr/bin/env bash
# Least-privilege RabbitMQ setup for Vogeler: one vhost, and one user per role with
# permissions limited to what that role does. Run it as root on a broker node (it uses
# rabbitmqctl); it is idempotent, so config management can run it on every pass.
#
#   deploy/rabbitmq/setup.sh [--vhost vogeler] [--collective vogeler] [--user-prefix vogeler]
#                            [--secrets-dir /etc/vogeler/secrets]
#   deploy/rabbitmq/setup.sh --remove [--vhost ...] [--user-prefix ...]
#
# Passwords: <secrets-dir>/rabbitmq-<role>.password (mode 0600), generated when missing. They
# never appear on a command line: the users are imported from a definitions file that holds
# only salted SHA-256 hashes (RabbitMQ's rabbit_password_hashing_sha256).
#
# What each role may do (names are <collective>.<...>, see README "Messages and queues"):
#   agent   declare and consume its own queue <c>.agent.<node>, bind it to <c>.commands,
#           publish to <c>.results (routing keys result.* and announce.* only).
#           It can NOT publish commands, and can NOT read the server's queue <c>.ingest.
#   server  declare the exchanges, <c>.ingest and <c>.dead-letters; consume <c>.ingest;
#           publish to <c>.dead. It can NOT publish commands.
#   runner  publish to <c>.commands (routing keys all and node.*); declare, bind and consume
#           its private reply queues (amq.gen-*) on <c>.results. It can NOT read <c>.ingest.
# All agents may share the agent user: what binds a result to its node is the agent's own
# signing key, pinned by the server (see README "Security").
set -euo pipefail

vhost=vogeler collective=vogeler prefix=vogeler secrets=/etc/vogeler/secrets remove=false
while [ $# -gt 0 ]; do
  case $1 in
    --vhost) vhost=$2; shift 2 ;;
    --collective) collective=$2; shift 2 ;;
    --user-prefix) prefix=$2; shift 2 ;;
    --secrets-dir) secrets=$2; shift 2 ;;
    --remove) remove=true; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $collective in
  *[!A-Za-z0-9_-]*|'') echo "setup.sh: --collective must be letters, digits, - or _" >&2; exit 2 ;;
esac
command -v rabbitmqctl >/dev/null || { echo "setup.sh: rabbitmqctl not found; run this on a broker node" >&2; exit 69; }
roles=(agent server runner)

if $remove; then
  for r in "${roles[@]}"; do rabbitmqctl -q delete_user "$prefix-$r" 2>/dev/null || true; done
  rabbitmqctl -q delete_vhost "$vhost" 2>/dev/null || true
  echo "removed vhost $vhost and users $prefix-{${roles[*]}}" | tr ' ' ','
  exit 0
fi

umask 077
mkdir -p "$secrets"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# base64(salt + sha256(salt + password)), with a random 4-byte salt.
hash() {
  head -c 4 /dev/urandom >"$work/salt"
  { cat "$work/salt"; printf %s "$1"; } | openssl dgst -sha256 -binary >"$work/digest"
  cat "$work/salt" "$work/digest" | base64 -w0
}

c=$collective
declare -A configure write read
configure[agent]="^$c\\.agent\\..+\$"
write[agent]="^$c\\.(agent\\..+|results)\$"
read[agent]="^$c\\.(agent\\..+|commands)\$"
configure[server]="^$c\\.(commands|results|dead|ingest|dead-letters)\$"
write[server]="^$c\\.(dead|ingest|dead-letters)\$"
read[server]="^$c\\.(results|dead|ingest)\$"
configure[runner]='^amq\.gen-.*$'
write[runner]="^($c\\.commands|amq\\.gen-.*)\$"
read[runner]="^($c\\.results|amq\\.gen-.*)\$"

json_escape() { printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g'; }

users="" perms=""
for r in "${roles[@]}"; do
  file="$secrets/rabbitmq-$r.password"
  if [ ! -s "$file" ]; then
    head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$file"
    echo "generated a password for $prefix-$r in $file" >&2
  fi
  pw=$(tr -d '\n' <"$file")
  users+="${users:+,}{\"name\":\"$prefix-$r\",\"password_hash\":\"$(hash "$pw")\",\"hashing_algorithm\":\"rabbit_password_hashing_sha256\",\"tags\":\"\"}"
  perms+="${perms:+,}{\"user\":\"$prefix-$r\",\"vhost\":\"$vhost\",\"configure\":\"$(json_escape "${configure[$r]}")\",\"write\":\"$(json_escape "${write[$r]}")\",\"read\":\"$(json_escape "${read[$r]}")\"}"
done
topics="{\"user\":\"$prefix-agent\",\"vhost\":\"$vhost\",\"exchange\":\"$c.results\",\"write\":\"$(json_escape '^(result|announce)\.')\",\"read\":\".*\"}"
topics+=",{\"user\":\"$prefix-runner\",\"vhost\":\"$vhost\",\"exchange\":\"$c.commands\",\"write\":\"$(json_escape '^(all|node\..+)$')\",\"read\":\".*\"}"

cat >"$work/definitions.json" <<JSON
{"vhosts":[{"name":"$vhost"}],"users":[$users],"permissions":[$perms],"topic_permissions":[$topics]}
JSON
# rabbitmqctl may run as the rabbitmq user (Debian's wrapper does): let it read the file,
# which holds only salted hashes. Older rabbitmqctl cannot read definitions from stdin.
if id rabbitmq >/dev/null 2>&1; then chown -R rabbitmq "$work"; fi
rabbitmqctl -q import_definitions "$work/definitions.json" >/dev/null

echo "vhost $vhost ready for collective $c; connect with (password files in $secrets):"
for r in "${roles[@]}"; do
  echo "  $r: amqp://$prefix-$r:<rabbitmq-$r.password>@<broker>:5672/$vhost"
done
