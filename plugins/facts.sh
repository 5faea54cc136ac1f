#!/bin/sh
# Facts about this node as one JSON object, using only POSIX tools and /proc, so it works on
# any Linux node without extra packages. Shipped with plugins/facts.toml.
set -u

# JSON string escape: backslash and quote; control characters dropped.
esc() { printf '%s' "$1" | tr -d '\000-\037' | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g'; }
num() { case "$1" in '' | *[!0-9]*) printf 'null' ;; *) printf '%s' "$1" ;; esac; }

# One value from os-release, without its shell quotes.
osr() {
    v=$(sed -n "s/^$1=//p" /etc/os-release 2>/dev/null | head -n 1)
    v=${v#\"}; v=${v%\"}; v=${v#\'}; v=${v%\'}
    printf '%s' "$v"
}

id=$(osr ID)
like=$(osr ID_LIKE)
# The family names facter uses, so fact filters read the same across tools.
case " $id $like " in
    *" debian "* | *" ubuntu "*) family=Debian ;;
    *" rhel "* | *" fedora "* | *" centos "*) family=RedHat ;;
    *" suse "* | *" opensuse "*) family=Suse ;;
    *" arch "*) family=Archlinux ;;
    *" alpine "*) family=Alpine ;;
    *) family=$id ;;
esac

host=$(uname -n)
fqdn=$(hostname -f 2>/dev/null || true)
[ -n "$fqdn" ] || fqdn=$host
cpus=$(getconf _NPROCESSORS_ONLN 2>/dev/null || nproc 2>/dev/null || true)
mem=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 }' /proc/meminfo 2>/dev/null)
up=$(cut -d ' ' -f 1 /proc/uptime 2>/dev/null | cut -d . -f 1)

ips=$(hostname -I 2>/dev/null || ip -o addr show scope global 2>/dev/null | awk '{ sub(/\/.*/, "", $4); print $4 }')
ip_json=""
for a in $ips; do
    ip_json="$ip_json${ip_json:+, }\"$(esc "$a")\""
done

printf '{"hostname": "%s", "fqdn": "%s", ' "$(esc "$host")" "$(esc "$fqdn")"
printf '"os": {"id": "%s", "family": "%s", "name": "%s", "version": "%s"}, ' \
    "$(esc "$id")" "$(esc "$family")" "$(esc "$(osr NAME)")" "$(esc "$(osr VERSION_ID)")"
printf '"kernel": "%s", "arch": "%s", ' "$(esc "$(uname -r)")" "$(esc "$(uname -m)")"
printf '"cpus": %s, "memory_mb": %s, "uptime_s": %s, "ips": [%s]}\n' \
    "$(num "$cpus")" "$(num "$mem")" "$(num "$up")" "$ip_json"
