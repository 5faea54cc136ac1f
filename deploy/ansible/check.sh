#!/usr/bin/env bash
# Run the vogeler_agent role for real against this machine (ansible-core from PyPI, local
# connection, no service manager here): install the .deb, write the config and key, drop in
# a plugin, start the agent; then prove the agent answers a runner query for that plugin,
# that a second run changes nothing, and that a broken plugin is refused before it lands.
#   deploy/ansible/check.sh     (needs root, the stack up and target/debian/*.deb: deploy/package.sh)
set -euo pipefail
name=ansible-check
# shellcheck source=../lib/exercise.sh
source "$(dirname "$0")/../lib/exercise.sh"
[[ $(id -u) == 0 ]] || die "run as root (the role installs a package)"
dpkg -s vogeler-agent >/dev/null 2>&1 && die "vogeler-agent is already installed here; this check installs and purges it"
# ansible-core from PyPI in a virtualenv of its own, kept for the next run: pip into the
# system's python3 is refused on Debian 12 (PEP 668) and would change what others import.
if ! command -v ansible-playbook >/dev/null; then
    venv=${XDG_CACHE_HOME:-$HOME/.cache}/vogeler-ansible
    if [[ ! -x $venv/bin/ansible-playbook ]]; then
        say "installing ansible-core from PyPI into $venv"
        { python3 -m venv "$venv" && "$venv/bin/pip" install --quiet --disable-pip-version-check ansible-core; } \
            || die "could not install ansible-core into $venv (Debian: apt-get install python3-venv)"
    fi
    PATH=$venv/bin:$PATH
fi
need_stack
deb=$(ls "$root"/target/debian/vogeler-agent_*.deb 2>/dev/null) || die "no package; run deploy/package.sh"

cleanup() {
    /usr/lib/vogeler/vogeler-service stop agent >/dev/null 2>&1 || true
    dpkg --purge vogeler-agent >/dev/null 2>&1 || true
    rm -rf /etc/vogeler /var/log/vogeler /run/vogeler /var/cache/vogeler-agent.deb
    cleanup_common
}
trap cleanup EXIT

make_runner_key
start_server
cat > "$work/inventory.ini" <<INI
[nodes]
localhost ansible_connection=local ansible_python_interpreter=/usr/bin/python3
INI
cat > "$work/vars.yml" <<YAML
vogeler_agent_package_source: deb
vogeler_agent_deb: "$deb"
vogeler_agent_service_manager: none
vogeler_amqp_url: "$amqp_url"
# The stack's URL carries its user (the check's private collective is not set up by
# deploy/rabbitmq/setup.sh).
vogeler_amqp_username: ""
vogeler_collective: "$collective"
vogeler_queue_expires: 10m
vogeler_agent_node: "$node"
vogeler_authorized_keys:
  - "$(cat "$work/keys/runner.pub")"
vogeler_plugins:
  - name: ansible_dropin
    content: |
      name = "ansible_dropin"
      description = "Dropped in by the Ansible role"
      command = ["sh", "-c", "echo managed by ansible"]
      format = "string"
YAML
cat > "$work/play.yml" <<YAML
- hosts: nodes
  roles:
    - vogeler_agent
YAML
playbook() {
    ANSIBLE_ROLES_PATH="$root/deploy/ansible/roles" ANSIBLE_NOCOLOR=1 ANSIBLE_RETRY_FILES_ENABLED=0 \
        ansible-playbook -i "$work/inventory.ini" -e "@$work/vars.yml" "$work/play.yml"
}

say "first run"
playbook | tee "$work/run1.log" | grep -E '^(TASK|changed|ok|fatal|PLAY RECAP)|ok=' | sed 's/^/    /'
prove_answers ansible_dropin

say "second run: nothing to change"
playbook > "$work/run2.log"
grep -E 'ok=' "$work/run2.log" | sed 's/^/    /'
grep -qE 'changed=0 .*failed=0' "$work/run2.log" || die "the second run changed something"

say "a broken plugin is refused before it reaches plugins.d"
cat >> "$work/vars.yml" <<YAML
  - name: broken
    content: |
      name = "broken"
      command = "not a list"
      format = "nonsense"
YAML
if playbook > "$work/run3.log" 2>&1; then die "the role accepted a broken plugin"; fi
# The validator's first line, out of Ansible's JSON (where it ends at \n, quotes are \").
grep -oE 'error: ([^"\\]|\\")*' "$work/run3.log" | head -n 1 | sed 's/\\"/"/g; s/^/    /'
[[ ! -e /etc/vogeler/plugins.d/broken.toml ]] || die "the broken plugin was put in place"
/usr/lib/vogeler/vogeler-service status agent | sed 's/^/    /'
say "ok: role installed the agent, it answered ansible_dropin, reran clean, refused a broken plugin"
