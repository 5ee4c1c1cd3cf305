"""The official `anthropic` Python SDK through quota-proxy, with no code change but the base URL.

Run by scripts/proxy_conformance.sh; arguments: the proxy's base URL, the base URL of the
simulator behind it, the base URL of a second simulator with the same limits (hit directly, for
contrast), a proxy in front of a generous simulator and that simulator (for streams), and the
API key. The SDK runs with max_retries=0: whatever reaches the caller is what the proxy (or the
simulator) answered.
"""

import asyncio
import json
import sys
import urllib.error
import urllib.request

import anthropic

proxy, behind, direct, stream_proxy, stream_direct, key = sys.argv[1:7]
MODEL = "claude-sonnet-4-6"
BURST = 300


def check(name, ok, detail=""):
    if not ok:
        print(f"FAIL {name} {detail}")
        sys.exit(1)
    print(f"ok   {name} {detail}")


async def burst(base_url):
    client = anthropic.AsyncAnthropic(base_url=base_url, api_key=key, max_retries=0, timeout=120)

    async def one(i):
        try:
            await client.messages.create(
                model=MODEL,
                max_tokens=32,
                messages=[{"role": "user", "content": f"Question {i}"}],
            )
            return None
        except anthropic.APIStatusError as e:
            return e.status_code
        except anthropic.APIError as e:
            return type(e).__name__

    results = await asyncio.gather(*(one(i) for i in range(BURST)))
    await client.close()
    return [r for r in results if r is not None]


def audit(base_url):
    with urllib.request.urlopen(f"{base_url}/__audit") as r:
        return json.load(r)


direct_errors = asyncio.run(burst(direct))
proxied_errors = asyncio.run(burst(proxy))
print(f"directly against the simulator: {len(direct_errors)} of {BURST} failed "
      f"({direct_errors.count(429)} with 429)")
print(f"through quota-proxy:            {len(proxied_errors)} of {BURST} failed")
check("burst through the proxy: 0 errors", not proxied_errors, str(proxied_errors[:5]))
check("burst directly: most fail (the contrast)", len(direct_errors) > BURST // 2)
a = audit(behind)
check("the simulator behind the proxy saw every request answered", a["ok"] == BURST, str(a))


def stream_events(base_url):
    client = anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0)
    kinds = []
    with client.messages.stream(
        model=MODEL, max_tokens=48, messages=[{"role": "user", "content": "Stream a haiku."}]
    ) as s:
        for event in s:
            kinds.append(event.type)
        final = s.get_final_message()
    return kinds, final.content[0].text, final.usage.output_tokens


through = stream_events(stream_proxy)
plain = stream_events(stream_direct)
check("messages.stream: the same events through the proxy as directly", through == plain,
      f"{len(through[0])} events")


def status(method, url, body=None):
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"x-api-key": key, "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


code, body = status("GET", f"{stream_proxy}/healthz")
check("GET /healthz", code == 200 and body == b"ok\n")
code, body = status("GET", f"{stream_proxy}/metrics")
check("GET /metrics: the layers' metrics in Prometheus text",
      code == 200 and b"tower_quota_budget_admitted_total" in body)
code, body = status("POST", f"{stream_proxy}/v1/messages", b"x" * (33 << 20))
check("a body over 32 MB: 413 request_too_large",
      code == 413 and json.loads(body)["error"]["type"] == "request_too_large")
code, body = status("POST", f"{stream_proxy}/v1/nowhere", b"{}")
check("an unknown path: the upstream's own 404 passes through", code == 404)
code, body = status("POST", f"{stream_proxy}/v1/messages", b"{not json")
check("a malformed body: the upstream's own 400 passes through", code == 400)
code, body = status("GET", f"{stream_proxy}/healthz")
check("the proxy keeps serving", code == 200)
