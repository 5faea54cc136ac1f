#!/usr/bin/env bash
# Least-privilege RabbitMQ setup for Vogeler: one vhost, one user per role (server, runner)
# and one user per agent node, each allowed only what it does. Run it as root on a broker
# node (it uses rabbitmqctl); it is idempotent, so config management can run it on every pass.
#
#   deploy/rabbitmq/setup.sh [--vhost vogeler] [--collective vogeler] [--user-prefix vogeler]
#                            [--secrets-dir /etc/vogeler/secrets]
#                            [--agent NODE]... [--agents-file FILE]
#                            [--agent-queue-max-length 1000] [--agent-queue-max-age 86400]
#                            [--agent-queue-type classic|quorum]
#                            [--remove-agent NODE]... [--shared-agent-user]
#   deploy/rabbitmq/setup.sh --remove [--vhost ...] [--user-prefix ...]
#
#   setup.sh --agent web01 --agent db-2.example.com   enrol two nodes (and set up the roles)
#   setup.sh --agents-file /etc/vogeler/nodes         enrol every node in the file: one name a
#                                                     line, blank lines and # comments skipped
#   setup.sh --remove-agent web01                     revoke web01 now
#
# Enrolling node N creates the user <prefix>-agent-N, its password file, and its command
# queue <c>.agent.N bound to <c>.commands with "all" and "node.N". The queue is bounded:
# --agent-queue-max-length commands at most (more are refused and the runner says so), and
# commands older than --agent-queue-max-age seconds are dropped. On a RabbitMQ cluster use
# --agent-queue-type quorum (and amqp.agent_queue_type = "quorum" in the agents' config):
# a classic queue is unusable while its node is down, so its agent cannot answer until that
# node returns; a quorum queue moves to a surviving node. An existing queue keeps the
# bounds it was declared with (the script warns; delete the queue and run it again to apply
# new ones). Revoking N (--remove-agent N) deletes its user, which closes the node's
# connections at once, its queue and its password file; enrolling it again makes a new
# password. Nodes no longer listed are not revoked by themselves: name them in --remove-agent.
# Node names are the agents' (agent.node): letters, digits, '.', '-', '_', at most 253
# characters, starting with a letter or digit.
#
# Passwords: <secrets-dir>/rabbitmq-<role>.password and rabbitmq-agent-<node>.password (mode
# 0600), generated when missing; give each node its own file as amqp.password_file and
# <prefix>-agent-<node> as amqp.username. Passwords never appear on a command line: the users
# are imported from a definitions file that holds only salted SHA-256 hashes (RabbitMQ's
# rabbit_password_hashing_sha256). To change a password, delete its file and run again.
#
# What each user may do (names are <collective>.<...>, see README "Messages and queues"):
#   agent N  consume its own queue <c>.agent.N and publish to <c>.results with routing keys
#            result.<request id> and announce.N only. It can declare, bind and delete nothing:
#            no queue, no exchange, no binding (its queue is made here). So it can NOT read,
#            bind, purge or delete another node's queue, copy commands anywhere, publish
#            commands, announce as another node, or read the server's queue <c>.ingest.
#   server   declare the exchanges, <c>.ingest and <c>.dead-letters; consume <c>.ingest;
#            publish to <c>.dead. It can NOT publish commands.
#   runner   publish to <c>.commands (routing keys all and node.*); declare, bind and consume
#            its private reply queues (amq.gen-*) on <c>.results. It can NOT read <c>.ingest.
# The script also declares the three exchanges, as the server does; <c>.ingest is the
# server's (its type and bound are server settings), so start the server once before agents.
#
# --shared-agent-user keeps the old shared user <prefix>-agent, for moving a fleet over: it
# is INSECURE, since every node holding it can read and bind every node's queue, copy every
# command and announce as any node. Without the flag an existing shared user is deleted (its
# connections are closed): enrol the nodes and give them their own passwords first.
set -euo pipefail
export LC_ALL=C

vhost=vogeler collective=vogeler prefix=vogeler secrets=/etc/vogeler/secrets remove=false
shared_agent=false max_length=1000 max_age=86400 queue_type=classic
enrol=() revoke=()
usage() { echo "setup.sh: $1 (see --help)" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --vhost|--collective|--user-prefix|--secrets-dir|--agent|--agents-file|--remove-agent|--agent-queue-max-length|--agent-queue-max-age|--agent-queue-type)
      [ $# -ge 2 ] || usage "$1 needs a value" ;;&
    --vhost) vhost=$2; shift 2 ;;
    --collective) collective=$2; shift 2 ;;
    --user-prefix) prefix=$2; shift 2 ;;
    --secrets-dir) secrets=$2; shift 2 ;;
    --agent) enrol+=("$2"); shift 2 ;;
    --agents-file)
      [ -r "$2" ] || usage "cannot read --agents-file $2"
      # One name a line; '#' starts a comment; surrounding blanks are ignored.
      while IFS= read -r line || [ -n "$line" ]; do
        line=${line%%#*}
        line=${line//[[:space:]]/}
        [ -z "$line" ] || enrol+=("$line")
      done <"$2"
      shift 2 ;;
    --remove-agent) revoke+=("$2"); shift 2 ;;
    --agent-queue-max-length) max_length=$2; shift 2 ;;
    --agent-queue-max-age) max_age=$2; shift 2 ;;
    --agent-queue-type) queue_type=$2; shift 2 ;;
    --shared-agent-user) shared_agent=true; shift ;;
    --remove) remove=true; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) usage "unknown argument $1" ;;
  esac
done
case $collective in
  *[!A-Za-z0-9_-]*|'') usage "--collective must be letters, digits, - or _" ;;
esac
case $prefix in
  *[!A-Za-z0-9._-]*|'') usage "--user-prefix must be letters, digits, '.', - or _" ;;
esac
case $max_length in *[!0-9]*|''|0) usage "--agent-queue-max-length must be a whole number of commands, at least 1" ;; esac
case $max_age in *[!0-9]*|''|0) usage "--agent-queue-max-age must be a whole number of seconds, at least 1" ;; esac
case $queue_type in classic|quorum) ;; *) usage "--agent-queue-type must be classic or quorum" ;; esac
# The agent's own rule for node names (proto/src/names.rs): they end up in user, queue,
# file and regular-expression names, so nothing else may pass.
valid_node() { [[ ${#1} -le 253 && $1 =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; }
declare -A enrolled=()
agents=()
for n in "${enrol[@]}" "${revoke[@]}"; do
  valid_node "$n" || usage "node name ${n@Q} must be letters, digits, '.', - or _ (at most 253, starting with a letter or digit)"
done
for n in "${enrol[@]}"; do
  [ -n "${enrolled[$n]:-}" ] || agents+=("$n")
  enrolled[$n]=1
done
for n in "${revoke[@]}"; do
  [ -z "${enrolled[$n]:-}" ] || usage "$n is both enrolled and revoked"
done
command -v rabbitmqctl >/dev/null || { echo "setup.sh: rabbitmqctl not found; run this on a broker node" >&2; exit 69; }
roles=(server runner)
c=$collective

# Revoke one node: its user (which closes its connections), its queue, its password file.
revoke_agent() {
  local n=$1 user="$prefix-agent-$1" done=() list
  if rabbitmqctl -q delete_user "$user" >/dev/null 2>&1; then done+=("user $user (its connections are closed)"); fi
  if rabbitmqctl -q delete_queue -p "$vhost" "$c.agent.$n" >/dev/null 2>&1; then done+=("queue $c.agent.$n"); fi
  if [ -e "$secrets/rabbitmq-agent-$n.password" ]; then
    rm -f "$secrets/rabbitmq-agent-$n.password"
    done+=("$secrets/rabbitmq-agent-$n.password")
  fi
  if [ ${#done[@]} -gt 0 ]; then
    printf -v list '%s, ' "${done[@]}"
    echo "revoked $n: deleted ${list%, }"
  else
    echo "$n was not enrolled (no user $user, no queue $c.agent.$n)"
  fi
}

if $remove; then
  # Every node user of this prefix with permissions in this vhost, before the vhost goes.
  mapfile -t nodes < <(rabbitmqctl -s list_permissions -p "$vhost" 2>/dev/null \
    | awk -F '\t' -v p="$prefix-agent-" 'index($1, p) == 1 { print $1 }')
  for u in "${nodes[@]}"; do rabbitmqctl -q delete_user "$u" 2>/dev/null || true; done
  for r in "${roles[@]}" agent; do rabbitmqctl -q delete_user "$prefix-$r" 2>/dev/null || true; done
  rabbitmqctl -q delete_vhost "$vhost" 2>/dev/null || true
  echo "removed vhost $vhost, users $prefix-{server,runner,agent} and ${#nodes[@]} node users $prefix-agent-*"
  exit 0
fi

umask 077
mkdir -p "$secrets"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for n in "${revoke[@]}"; do revoke_agent "$n"; done

# base64(salt + sha256(salt + password)), with a random 4-byte salt.
hash() {
  head -c 4 /dev/urandom >"$work/salt"
  { cat "$work/salt"; printf %s "$1"; } | openssl dgst -sha256 -binary >"$work/digest"
  cat "$work/salt" "$work/digest" | base64 -w0
}
json_escape() { printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g'; }
# The password in $1 (generated when missing or empty).
password() {
  if [ ! -s "$1" ]; then
    head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$1"
    echo "generated a password for $2 in $1" >&2
  fi
  tr -d '\n' <"$1"
}

declare -A configure write read
configure[server]="^$c\\.(commands|results|dead|ingest|dead-letters)\$"
write[server]="^$c\\.(dead|ingest|dead-letters)\$"
read[server]="^$c\\.(results|dead|ingest)\$"
configure[runner]='^amq\.gen-.*$'
write[runner]="^($c\\.commands|amq\\.gen-.*)\$"
read[runner]="^($c\\.results|amq\\.gen-.*)\$"
if $shared_agent; then
  roles+=(agent)
  configure[agent]="^$c\\.agent\\..+\$"
  write[agent]="^$c\\.(agent\\..+|results)\$"
  read[agent]="^$c\\.(agent\\..+|commands)\$"
fi

V=$(json_escape "$vhost")
users="" perms="" topics="" queues="" bindings=""
# One user: name, password file, configure, write, read.
add_user() {
  local pw
  pw=$(password "$2" "$1")
  users+="${users:+,}{\"name\":\"$1\",\"password_hash\":\"$(hash "$pw")\",\"hashing_algorithm\":\"rabbit_password_hashing_sha256\",\"tags\":\"\"}"
  perms+="${perms:+,}{\"user\":\"$1\",\"vhost\":\"$V\",\"configure\":\"$(json_escape "$3")\",\"write\":\"$(json_escape "$4")\",\"read\":\"$(json_escape "$5")\"}"
}
# Routing keys user $1 may publish (write) and bind (read) on exchange $2.
add_topic() {
  topics+="${topics:+,}{\"user\":\"$1\",\"vhost\":\"$V\",\"exchange\":\"$2\",\"write\":\"$(json_escape "$3")\",\"read\":\"$(json_escape "$4")\"}"
}
for r in "${roles[@]}"; do
  add_user "$prefix-$r" "$secrets/rabbitmq-$r.password" "${configure[$r]}" "${write[$r]}" "${read[$r]}"
done
add_topic "$prefix-runner" "$c.commands" '^(all|node\..+)$' '.*'
$shared_agent && add_topic "$prefix-agent" "$c.results" '^(result|announce)\.' '.*'

# Each node: a user that may create nothing (configure matches no name), so it cannot make
# an exchange of its own to route into other queues or around its topic permissions.
uuid='[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}'
# As the agent declares it (proto/src/topology.rs): x-queue-type only when not classic.
queue_args="{\"x-max-length\":$max_length,\"x-overflow\":\"reject-publish\",\"x-message-ttl\":$((max_age * 1000))"
[ "$queue_type" = classic ] || queue_args+=",\"x-queue-type\":\"$queue_type\""
queue_args+="}"
for n in "${agents[@]}"; do
  re=${n//./\\.}
  add_user "$prefix-agent-$n" "$secrets/rabbitmq-agent-$n.password" '^$' "^$c\\.results\$" "^$c\\.agent\\.$re\$"
  add_topic "$prefix-agent-$n" "$c.results" "^(result\\.$uuid|announce\\.$re)\$" '^$'
  queues+="${queues:+,}{\"name\":\"$c.agent.$n\",\"vhost\":\"$V\",\"durable\":true,\"auto_delete\":false,\"arguments\":$queue_args}"
  for key in all "node.$n"; do
    bindings+="${bindings:+,}{\"source\":\"$c.commands\",\"vhost\":\"$V\",\"destination\":\"$c.agent.$n\",\"destination_type\":\"queue\",\"routing_key\":\"$key\",\"arguments\":{}}"
  done
done
exchanges=""
for ex in commands:topic results:topic dead:fanout; do
  exchanges+="${exchanges:+,}{\"name\":\"$c.${ex%%:*}\",\"vhost\":\"$V\",\"type\":\"${ex#*:}\",\"durable\":true,\"auto_delete\":false,\"internal\":false,\"arguments\":{}}"
done

cat >"$work/definitions.json" <<JSON
{"vhosts":[{"name":"$V"}],"users":[$users],"permissions":[$perms],"topic_permissions":[$topics],
 "exchanges":[$exchanges],"queues":[$queues],"bindings":[$bindings]}
JSON
# rabbitmqctl may run as the rabbitmq user (Debian's wrapper does): let it read the file,
# which holds only salted hashes. Older rabbitmqctl cannot read definitions from stdin.
if id rabbitmq >/dev/null 2>&1; then chown -R rabbitmq "$work"; fi
rabbitmqctl -q import_definitions "$work/definitions.json" >/dev/null

if ! $shared_agent && rabbitmqctl -q delete_user "$prefix-agent" >/dev/null 2>&1; then
  rm -f "$secrets/rabbitmq-agent.password"
  echo "setup.sh: deleted the shared agent user $prefix-agent and its password file (any node holding it could reach every node's queue); nodes still using it are disconnected: enrol them with --agent (or keep it for a while with --shared-agent-user)" >&2
fi

# An existing queue keeps its arguments (the import leaves it as it is): say when they are
# not the ones asked for, or when it would expire (a node user cannot declare it again).
if [ ${#agents[@]} -gt 0 ]; then
  while IFS=$'\t' read -r name args; do
    [[ $name == "$c.agent."* && -n ${enrolled[${name#"$c.agent."}]:-} ]] || continue
    if [[ $args == *'"x-expires"'* || $args != *"{\"x-max-length\",$max_length}"* \
      || $args != *"{\"x-message-ttl\",$((max_age * 1000))}"* || $args != *'{"x-overflow","reject-publish"}'* \
      || $queue_type != "$(if [[ $args == *'{"x-queue-type","quorum"}'* ]]; then echo quorum; else echo classic; fi)" ]]; then
      echo "setup.sh: warning: queue $name keeps the arguments it was declared with, $args; to apply these (max length $max_length, max age ${max_age}s, no expiry, $queue_type), delete it (rabbitmqctl delete_queue -p $vhost $name: its pending commands are dropped) and run this again" >&2
    fi
  done < <(rabbitmqctl -s list_queues -p "$vhost" name arguments 2>/dev/null || true)
fi

echo "vhost $vhost ready for collective $c; connect with (password files in $secrets):"
for r in "${roles[@]}"; do
  echo "  $r: amqp://$prefix-$r:<rabbitmq-$r.password>@<broker>:5672/$vhost"
done
if [ ${#agents[@]} -gt 0 ]; then
  echo "  ${#agents[@]} agent node(s): amqp://$prefix-agent-<node>:<rabbitmq-agent-<node>.password>@<broker>:5672/$vhost"
  echo "    (amqp.username = \"$prefix-agent-<node>\", amqp.password_file = that node's file)"
fi
$shared_agent && echo "  warning: the shared agent user $prefix-agent is insecure; drop --shared-agent-user once every node has its own" >&2
exit 0
