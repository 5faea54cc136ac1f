#!/usr/bin/env bash
# Apply the vogeler module for real on this machine (`puppet apply`, Debian's puppet package,
# no service manager here): install the .deb, write the config and key, drop in a plugin,
# start the agent; then prove the agent answers a runner query for that plugin, that a second
# apply changes nothing, and that a broken plugin is refused before it lands.
#   deploy/puppet/check.sh     (needs root, the stack up and target/debian/*.deb: deploy/package.sh)
set -euo pipefail
name=puppet-check
# shellcheck source=../lib/exercise.sh
source "$(dirname "$0")/../lib/exercise.sh"
[[ $(id -u) == 0 ]] || die "run as root (the module installs a package)"
dpkg -s vogeler-agent >/dev/null 2>&1 && die "vogeler-agent is already installed here; this check installs and purges it"
# Puppet is installed for this check and purged afterwards, with every package it brought,
# when it was not here before: nothing stays behind, and facter on the PATH would change what
# the test suite's facter plugin test expects.
installed_packages() { dpkg-query -W -f='${db:Status-Status} ${binary:Package}\n' | sed -n 's/^installed //p' | sort; }
brought=()
cleanup() {
    /usr/lib/vogeler/vogeler-service stop agent >/dev/null 2>&1 || true
    dpkg --purge vogeler-agent >/dev/null 2>&1 || true
    rm -rf /etc/vogeler /var/log/vogeler /run/vogeler
    cleanup_common
    if ((${#brought[@]} > 0)); then
        if DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq "${brought[@]}" >/dev/null 2>&1; then
            say "purged the ${#brought[@]} packages the puppet install brought"
        else
            echo "$name: warning: could not purge ${brought[*]}: apt-get purge them by hand" >&2
        fi
    fi
}
trap cleanup EXIT

if ! command -v puppet >/dev/null; then
    say "installing puppet from Debian (purged again at the end)"
    before=$(installed_packages)
    apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends puppet >/dev/null; }
    # A fresh machine may have no package lists yet, or stale ones.
    apt_install || { DEBIAN_FRONTEND=noninteractive apt-get update -qq && apt_install; } || install_failed=yes
    mapfile -t brought < <(comm -13 <(echo "$before") <(installed_packages))
    [[ -z ${install_failed:-} ]] || die "apt-get install puppet failed"
    say "puppet $(puppet --version) installed with ${#brought[@]} packages"
fi
need_stack
deb=$(ls "$root"/target/debian/vogeler-agent_*.deb 2>/dev/null) || die "no package; run deploy/package.sh"

make_runner_key
start_server
manifest() {
    cat <<PP
class { 'vogeler::agent':
  package_source  => '$deb',
  service_manager => 'none',
  amqp_url        => '$amqp_url',
  amqp_username   => '',
  collective      => '$collective',
  queue_expires   => '10m',
  node            => '$node',
  authorized_keys => ['$(cat "$work/keys/runner.pub")'],
  node_facts      => { 'managed_by' => 'puppet' },
  plugins         => {
    'puppet_dropin' => {
      content => "name = \"puppet_dropin\"\ncommand = [\"sh\", \"-c\", \"echo managed by puppet\"]\nformat = \"string\"\n",
    },
$(cat "$work/extra.pp" 2>/dev/null)
  },
}
PP
}
apply() {
    manifest > "$work/site.pp"
    # --detailed-exitcodes: 0 no changes, 2 changes, 4/6 failures.
    puppet apply --color=false --detailed-exitcodes --modulepath "$root/deploy/puppet" "$work/site.pp"
}

say "first apply"
rc=0
apply > "$work/apply1.log" 2>&1 || rc=$?
grep -E 'Notice: .*(ensure|content|Service)|Error' "$work/apply1.log" | grep -v 'Facter: Permission denied' | sed 's/^/    /'
[[ $rc == 2 ]] || { cat "$work/apply1.log"; die "first apply exited $rc (expected 2: changes)"; }
prove_answers puppet_dropin

say "second apply: nothing to change"
rc=0
apply > "$work/apply2.log" 2>&1 || rc=$?
[[ $rc == 0 ]] || { cat "$work/apply2.log"; die "second apply exited $rc (expected 0: no changes)"; }
say "    exit 0, $(grep -c 'Notice: /Stage' "$work/apply2.log" || true) resources changed"

say "a broken plugin is refused before it reaches plugins.d"
cat > "$work/extra.pp" <<'PP'
    'broken' => { content => "name = \"broken\"\ncommand = \"not a list\"\n" },
PP
rc=0
apply > "$work/apply3.log" 2>&1 || rc=$?
[[ $rc == 4 || $rc == 6 ]] || { cat "$work/apply3.log"; die "apply with a broken plugin exited $rc (expected a failure)"; }
# The validator's exit status and message: "returned 78: error: <file>: <what is wrong>".
grep -m1 -oE 'returned [0-9]+: error: .*' "$work/apply3.log" | cut -c1-240 | sed 's/^/    /'
[[ ! -e /etc/vogeler/plugins.d/broken.toml ]] || die "the broken plugin was put in place"
/usr/lib/vogeler/vogeler-service status agent | sed 's/^/    /'
say "ok: module installed the agent, it answered puppet_dropin, reapplied clean, refused a broken plugin"
