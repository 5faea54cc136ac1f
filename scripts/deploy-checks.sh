#!/usr/bin/env bash
# The deployment checks, as CI runs them after scripts/test.sh: build the .deb packages
# (deploy/package.sh), then, for real on this machine and against the stack's RabbitMQ and
# Apache CouchDB, install, start, query and purge them (deploy/package-check.sh), run the
# Ansible role (deploy/ansible/check.sh) and apply the Puppet module (deploy/puppet/check.sh).
# Each check leaves no package, database or work file behind; its queues expire after 10 minutes.
# Installs what they need when missing: cargo-deb (crates.io), ansible-core (PyPI), puppet and
# systemd-analyze (Debian).
#   scripts/deploy-checks.sh               (as root; starts the stack if needed)
#   scripts/deploy-checks.sh --no-puppet   (skip the Puppet check: it installs Ruby and Puppet)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

say() { echo "deploy-checks: $*" >&2; }
puppet=yes
case ${1:-} in
    "") ;;
    --no-puppet) puppet= ;;
    *) say "usage: $0 [--no-puppet]"; exit 2 ;;
esac
[[ $(id -u) == 0 ]] || { say "run as root: the checks install and purge packages (sudo $0)"; exit 2; }
echo "== deployment checks" >&2
# Each check takes this lock (deploy/lib/exercise.sh): wait for one running here to finish
# before looking for a vogeler package it installed.
lock=/run/lock/vogeler-deploy-check.lock
flock -w 900 "$lock" true || { say "another deployment check still holds $lock after 15 minutes (fuser -v $lock)"; exit 1; }
for p in vogeler-agent vogeler-runner vogeler-server; do
    if dpkg -s "$p" >/dev/null 2>&1; then
        say "$p is installed here; the checks install and purge it, so remove it first (dpkg --purge $p)"
        exit 2
    fi
done

# From Debian, when missing: systemd-analyze (package-check verifies the units with it),
# python3-apt (the Ansible role's apt module runs under /usr/bin/python3), python3-venv (the
# Ansible check installs ansible-core into a virtualenv).
debs=()
command -v systemd-analyze >/dev/null || debs+=(systemd)
/usr/bin/python3 -c 'import apt' 2>/dev/null || debs+=(python3-apt)
python3 -c 'import ensurepip, venv' 2>/dev/null || debs+=(python3-venv)
if ((${#debs[@]} > 0)); then
    say "apt-get install ${debs[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${debs[@]}" >/dev/null
fi
scripts/stack.sh up

times=()
# Run one step, say how long it took; stop at the first failure.
step() {
    local label=$1 start=$SECONDS
    shift
    say "== $label: $*"
    "$@" || { say "FAILED: $label (after $((SECONDS - start)) s)"; exit 1; }
    times+=("$label $((SECONDS - start)) s")
    say "== $label: ok in $((SECONDS - start)) s"
}

# Release binaries and packages. cargo rebuilds only what changed (nothing after an earlier
# run), cargo-deb is installed from crates.io only when missing.
step package deploy/package.sh
step package-check deploy/package-check.sh --no-build
step ansible deploy/ansible/check.sh
[[ -z $puppet ]] || step puppet deploy/puppet/check.sh
summary=$(printf '%s, ' "${times[@]}")
say "ok: ${summary%, }"
