#!/usr/bin/env bash
# The hop bench (crates/tower-quota-proxy/benches/hop.rs) with LiteLLM's proxy beside quota-proxy,
# both in front of the same quota-sim (unlimited, answering at once). Installs `litellm[proxy]`
# from PyPI into target/litellm-venv. Not run by CI (a benchmark: figures to read).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/litellm-venv
[ -x "$venv/bin/litellm" ] || { python3 -m venv "$venv"; "$venv/bin/pip" install -q 'litellm[proxy]'; }
cargo build -q --release -p tower-quota-sim --bin quota-sim
free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
sim_port=$(free_port)
target/release/quota-sim serve --port "$sim_port" --latency-ms 0 --rpm 100000000 \
    --itpm 100000000000 --otpm 100000000000 >/dev/null 2>&1 &
pids+=($!)
master="sk-litellm-bench-$RANDOM$RANDOM"
conf=target/litellm-hop.yaml
cat > "$conf" <<YAML
model_list:
  - model_name: claude-sonnet-5-5
    litellm_params:
      model: anthropic/claude-sonnet-5-5
      api_base: http://127.0.0.1:$sim_port
      api_key: sk-hop
general_settings:
  master_key: $master
YAML
litellm_port=$(free_port)
"$venv/bin/litellm" --config "$conf" --port "$litellm_port" > target/litellm-hop.log 2>&1 &
pids+=($!)
for _ in $(seq 120); do
    curl -s -m 1 "http://127.0.0.1:$litellm_port/health/liveliness" >/dev/null && break
    sleep 1
done
echo "LiteLLM $("$venv/bin/litellm" --version 2>/dev/null | tail -1) on port $litellm_port"
HOP_UPSTREAM="http://127.0.0.1:$sim_port" HOP_LITELLM="http://127.0.0.1:$litellm_port" \
    HOP_LITELLM_KEY="$master" cargo bench -p tower-quota-proxy --bench hop
