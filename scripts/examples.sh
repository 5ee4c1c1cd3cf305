#!/usr/bin/env bash
# Runs every example in a short mode and checks what it printed. Called by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

cargo build --release --examples -p examples
cargo build --release -p tower-quota-sim -p tower-quota-bench --bins
bin=target/release
json_field() { python3 -c "import json,sys; print(json.loads(sys.stdin.read().splitlines()[-1])['$1'])"; }

echo "--- burst (short), with --json and --plot"
out=$($bin/examples/burst --requests 120 --json --plot target/burst.svg)
echo "$out" | tail -12
[ "$(echo "$out" | json_field failed)" = 0 ] || { echo "burst: requests failed"; exit 1; }
python3 -c "import xml.dom.minidom,sys; d=xml.dom.minidom.parse('target/burst.svg'); assert d.documentElement.tagName=='svg'; assert len(d.getElementsByTagName('polyline'))+len(d.getElementsByTagName('path'))>0"
echo "plot: target/burst.svg is a well-formed SVG"

echo "--- burst --compare (short), with --plot: one panel per strategy"
$bin/examples/burst --compare --requests 90 --plot target/compare.svg | tail -10
python3 - <<'PY'
import xml.dom.minidom
svg = open('target/compare.svg').read()
xml.dom.minidom.parseString(svg)
for name in ['naive', 'seed recipe', 'tower built-ins', 'SDK-like', 'tower-quota (configured)']:
    assert name in svg, name + ' missing from the comparison plot'
print('plot: target/compare.svg is a well-formed SVG naming every strategy')
PY

echo "--- burst --batch (short): the burst through the Message Batches API"
out=$($bin/examples/burst --batch --requests 200 --json)
echo "$out" | tail -9
[ "$(echo "$out" | json_field messages_calls)" = 0 ] || { echo "burst --batch: requests reached /v1/messages"; exit 1; }
[ "$(echo "$out" | json_field succeeded)" = 200 ] || { echo "burst --batch: requests failed"; exit 1; }

echo "--- burst --base-url against quota-sim, every Retry-After style, with and without rate-limit headers"
port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
for style in seconds http-date ms none; do
  for dialect in anthropic none; do
    $bin/quota-sim serve --port "$port" --rpm 600 --itpm 400000 --otpm 80000 --burst-fraction 0.1 \
      --retry-after "$style" --dialect "$dialect" >/dev/null 2>&1 &
    sim=$!
    for _ in $(seq 50); do
      python3 -c "import socket; socket.create_connection(('127.0.0.1',$port),0.1)" 2>/dev/null && break
      sleep 0.1
    done
    out=$($bin/examples/burst --base-url "http://127.0.0.1:$port" --api-key sk-ci --requests 120 --json)
    audit=$(python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$port/__audit').read().decode())")
    kill -INT "$sim"; wait "$sim" 2>/dev/null || true
    failed=$(echo "$out" | json_field failed)
    early=$(echo "$audit" | python3 -c "import json,sys; print(json.load(sys.stdin)['early_arrivals'])")
    echo "retry-after=$style headers=$dialect: failed=$failed early_arrivals=$early 429s=$(echo "$out" | json_field rate_limited)"
    [ "$failed" = 0 ] && [ "$early" = 0 ] || { echo "burst against quota-sim ($style, $dialect) failed"; exit 1; }
  done
done

echo "--- hyper_client, reqwest_client, custom_service, axum_upstream, shared_quota"
$bin/examples/hyper_client
$bin/examples/reqwest_client
$bin/examples/custom_service
$bin/examples/axum_upstream
$bin/examples/shared_quota

echo "--- prometheus: the exposition after a burst"
out=$($bin/examples/prometheus)
echo "$out" | grep -E '^tower_quota_(answers_total|retries_total|gate_closures_total)' | head -8
echo "$out" | tail -1

echo "--- goodput benchmark (short, in process)"
$bin/goodput --requests 300 --batch-requests 2000 --http-requests 0 > target/goodput-short.md
head -14 target/goodput-short.md
grep -A6 '^## The Message Batches path' target/goodput-short.md
