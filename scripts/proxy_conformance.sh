#!/usr/bin/env bash
# quota-proxy in front of quota-sim, driven by the official `anthropic` Python SDK
# (scripts/proxy_conformance.py): a burst of 300 concurrent calls against a key whose limits it
# blows through 5x completes with 0 errors through the proxy (and fails in large part directly);
# streams give the same events both ways; healthz, metrics, 413; the key never appears in the
# proxy's output. Uses the virtual environment of scripts/sdk_conformance.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/sdk-venv
[ -x "$venv/bin/python" ] || bash scripts/sdk_conformance.sh >/dev/null
cargo build -q --release -p tower-quota-sim --bin quota-sim -p tower-quota-proxy --bin quota-proxy
bin=target/release
free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
wait_port() {
    for _ in $(seq 100); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1',$1),0.1)" 2>/dev/null && return
        sleep 0.05
    done
    echo "nothing listens on $1"; exit 1
}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
key="sk-proxy-secret-$RANDOM$RANDOM"
log=target/quota-proxy.log
: > "$log"
sim() {
    local port; port=$(free_port)
    "$bin/quota-sim" serve --port "$port" "$@" >/dev/null 2>&1 &
    pids+=($!); wait_port "$port"; echo "http://127.0.0.1:$port"
}
proxy() {
    local port; port=$(free_port)
    "$bin/quota-proxy" --listen "127.0.0.1:$port" --upstream "$1" >>"$log" 2>&1 &
    pids+=($!); wait_port "$port"; echo "http://127.0.0.1:$port"
}
# 1200 requests a minute held as a bucket of 60: a burst of 300 is 5x what it holds.
limits=(--rpm 1200 --itpm 10000000 --otpm 10000000 --burst-fraction 0.05)
behind=$(sim "${limits[@]}")
direct=$(sim "${limits[@]}")
front=$(proxy "$behind")
generous=$(sim --rpm 100000 --itpm 100000000 --otpm 100000000)
stream_front=$(proxy "$generous")
"$venv/bin/python" scripts/proxy_conformance.py "$front" "$behind" "$direct" "$stream_front" "$generous" "$key"
# A settings file with limits for this key alone, named by its fingerprint (read on stdin).
fp=$(printf '%s' "$key" | "$bin/quota-proxy" --fingerprint)
conf=target/quota-proxy-test.toml
printf 'max_queue = 500\n\n[keys.%s]\nrpm = 777\n' "$fp" > "$conf"
port=$(free_port)
"$bin/quota-proxy" --listen "127.0.0.1:$port" --upstream "$generous" --config "$conf" >>"$log" 2>&1 &
pids+=($!); wait_port "$port"
"$venv/bin/python" - "http://127.0.0.1:$port" "$key" "$fp" <<'PY'
import sys, urllib.request
import anthropic
base, key, fp = sys.argv[1:4]
anthropic.Anthropic(base_url=base, api_key=key, max_retries=0).messages.create(
    model="claude-sonnet-4-6", max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
metrics = urllib.request.urlopen(f"{base}/metrics").read().decode()
line = f'tower_quota_limit{{partition="{fp}",bucket="requests"}} 777'
assert line in metrics, "the key's own limit from the file is not in force"
print("ok   --config: the key's own limits, named by --fingerprint, are in force")
PY
if grep -q "$key" "$log"; then
    echo "FAIL the key appears in the proxy's output"; exit 1
fi
echo "ok   the key never appears in the proxy's output ($(wc -l < "$log") lines)"
