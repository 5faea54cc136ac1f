#!/usr/bin/env bash
# Install the vogeler-agent and vogeler-runner packages on this machine, start the agent the
# way the package does (systemd if it runs, else /usr/lib/vogeler/vogeler-service), and prove
# it reports: a runner query answered and stored in CouchDB. Then verify the units against
# the installed binaries and purge everything again.
#   deploy/package-check.sh            (builds the packages first with deploy/package.sh)
#   deploy/package-check.sh --no-build (uses target/debian/*.deb as they are)
# Needs root and the stack (scripts/stack.sh up). Leaves no package, file or queue behind.
set -euo pipefail
name=pkgcheck
# shellcheck source=lib/exercise.sh
source "$(dirname "$0")/lib/exercise.sh"
[[ $(id -u) == 0 ]] || die "run as root (it installs packages)"
if dpkg -s vogeler-agent >/dev/null 2>&1; then
    die "vogeler-agent is already installed here; this check installs and purges it"
fi

cleanup() {
    /usr/lib/vogeler/vogeler-service stop agent >/dev/null 2>&1 || true
    dpkg --purge vogeler-agent vogeler-runner >/dev/null 2>&1 || true
    rm -rf /etc/vogeler /var/log/vogeler /run/vogeler
    cleanup_common
}
trap cleanup EXIT

[[ ${1:-} == --no-build ]] || "$root/deploy/package.sh"
need_stack
agent_deb=$(ls "$root"/target/debian/vogeler-agent_*.deb)
runner_deb=$(ls "$root"/target/debian/vogeler-runner_*.deb)

say "installing $(basename "$agent_deb") with no runner key yet: it must not start"
dpkg -i "$agent_deb" 2>&1 | sed 's/^/    /'
if /usr/lib/vogeler/vogeler-service status agent >/dev/null; then die "the agent started without keys"; fi
vogeler-agent --version
vogeler-agent plugins check /etc/vogeler/plugins.d | tail -n 3 | sed 's/^/    /'
[[ -f /usr/share/man/man1/vogeler-agent.1.gz && -f /usr/share/bash-completion/completions/vogeler-agent ]] \
    || die "man page or completion missing"

make_runner_key
install -m 0644 "$work/keys/runner.pub" /etc/vogeler/keys/authorized_keys
agent_toml > /etc/vogeler/agent.toml
vogeler-agent --config /etc/vogeler/agent.toml --check-config

say "reinstalling with a key in place: postinst starts the agent"
dpkg -i "$agent_deb" 2>&1 | sed 's/^/    /'
/usr/lib/vogeler/vogeler-service status agent || die "postinst did not start the agent"
dpkg -i "$runner_deb" >/dev/null
runner=/usr/bin/vogeler-runner

start_server
wait_until 15 curl -fsS http://127.0.0.1:9188/healthz >/dev/null || die "agent /healthz does not answer"
say "agent /healthz: $(curl -sS http://127.0.0.1:9188/healthz | tr '\n' ' ')"
prove_answers facts
say "agent /metrics: $(curl -sS http://127.0.0.1:9188/metrics | grep -E '^vogeler_agent_plugin_runs_total' | tr '\n' ' ')"

say "systemd units against the installed binaries:"
"$root/deploy/systemd/verify.sh" | sed 's/^/    /'

say "removing: prerm stops the agent"
dpkg --purge vogeler-agent vogeler-runner >/dev/null
if pgrep -x vogeler-agent >/dev/null; then die "the agent is still running after removal"; fi
[[ ! -e /var/lib/vogeler ]] || die "purge left /var/lib/vogeler"
say "ok: installed, started, answered, stopped and purged"
