#!/usr/bin/env bash
# The README's test command: every test of the workspace, the Redis ones against a real
# redis-server on loopback ports (the tests start and stop their own servers).
# On a fresh Debian machine it installs Debian's redis-server first (as root, or with sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v "${REDIS_SERVER:-redis-server}" >/dev/null 2>&1; then
    echo "redis-server is missing: installing Debian's package"
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -q
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server
fi
"${REDIS_SERVER:-redis-server}" --version

cargo test --workspace "$@"
