#!/usr/bin/env bash
# The official `anthropic` Python SDK against tower-quota-sim (scripts/sdk_conformance.py): every
# answer the simulator gives (messages, streams, a stream's error event, token counts, 429, 529,
# 400, 413, 404, the Message Batches API) must parse as the SDK's own types. Installs the SDK into a virtual environment under
# target/ (PyPI), builds and starts three simulators on free loopback ports, stops them at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/sdk-venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" || {
        echo "python3 -m venv failed: installing Debian's python3-venv"
        if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
        $sudo apt-get update -q
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
        python3 -m venv "$venv"
    }
fi
"$venv/bin/pip" install -q --disable-pip-version-check 'anthropic>=2.14,<3'
"$venv/bin/python" -c "import anthropic; print('anthropic', anthropic.__version__)"

cargo build -q --release -p tower-quota-sim --bin quota-sim
sim=target/release/quota-sim
free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
start() {
    local port; port=$(free_port)
    "$sim" serve --port "$port" "$@" >/dev/null 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1',$port),0.1)" 2>/dev/null && break
        sleep 0.05
    done
    echo "http://127.0.0.1:$port"
}
plain=$(start --rpm 20 --itpm 100000 --otpm 100000)
broken=$(start --rpm 1000 --itpm 1000000 --otpm 1000000 --stream-error 1.0)
overloaded=$(start --overload 1.0)
batch=$(start --batch-rps 50)
"$venv/bin/python" scripts/sdk_conformance.py "$plain" "$broken" "$overloaded" "$batch"
