#!/usr/bin/env bash
# Check deploy/docker-compose.yml as far as a machine without a Docker engine allows:
# `docker compose config` (or the Python docker-compose 1.29, installed into a private venv
# when neither is present) parses and resolves it, and every build target it names exists
# in the Dockerfile. Building and starting need a Docker engine: see the file's header.
#   deploy/docker/check.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
compose_file=$here/../docker-compose.yml
venv=${XDG_CACHE_HOME:-$HOME/.cache}/vogeler-compose

if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif command -v docker-compose >/dev/null; then
    compose=(docker-compose)
else
    if [[ ! -x $venv/bin/docker-compose ]]; then
        echo "check: no docker compose here; installing docker-compose 1.29 from PyPI into $venv"
        python3 -m venv "$venv"
        # Its PyYAML 5 pin does not build with Cython 3: build it without isolation.
        "$venv/bin/pip" install -q "cython<3" wheel
        "$venv/bin/pip" install -q --no-build-isolation "pyyaml==5.4.1"
        "$venv/bin/pip" install -q docker-compose
    fi
    compose=("$venv/bin/docker-compose")
fi

"${compose[@]}" -f "$compose_file" config -q
echo "check: ${compose[*]} config: valid; services: $("${compose[@]}" -f "$compose_file" config --services | tr '\n' ' ')"
for target in $(grep -oE 'target: [a-z]+' "$compose_file" | awk '{print $2}' | sort -u); do
    grep -qE "^FROM .* AS $target\$" "$here/Dockerfile" || { echo "check: Dockerfile has no stage $target" >&2; exit 1; }
done
echo "check: Dockerfile stages for every build target: ok"
if ! docker info >/dev/null 2>&1; then
    echo "check: no Docker engine here, so images were not built and nothing was started"
fi
