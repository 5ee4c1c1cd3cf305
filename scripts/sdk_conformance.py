"""The official `anthropic` Python SDK against tower-quota-sim: every answer the simulator gives
must parse as the SDK's own types, validated (not merely constructed).

Run by scripts/sdk_conformance.sh, which installs the SDK into a virtual environment and starts
the simulator; arguments: the base URLs of a plain simulator, one whose streams end with an
overload event, one that answers 529 to everything, and one for the Message Batches API.
"""

import sys

import anthropic
import pydantic
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent

plain, broken_stream, overloaded, batch_sim = sys.argv[1:5]
MODEL = "claude-sonnet-4-6"
ASK = [{"role": "user", "content": "Write a haiku about rate limits."}]
events = pydantic.TypeAdapter(RawMessageStreamEvent)
checked = []


def client(base_url, key="sk-sdk-conformance"):
    # No retries: every answer the simulator gives reaches the checks as it is.
    return anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0)


def check(name, ok, detail=""):
    if not ok:
        print(f"FAIL {name} {detail}")
        sys.exit(1)
    checked.append(name)
    print(f"ok   {name}")


# A message: the raw JSON validates as the SDK's Message, and the parsed object is whole.
raw = client(plain).messages.with_raw_response.create(model=MODEL, max_tokens=64, messages=ASK)
msg = Message.model_validate(raw.http_response.json())
check("message: validates as anthropic.types.Message", msg.type == "message")
parsed = raw.parse()
check("message: role, content, stop_reason", parsed.role == "assistant"
      and parsed.content and parsed.content[0].type == "text" and parsed.stop_reason is not None)
check("message: usage", parsed.usage.input_tokens > 0 and parsed.usage.output_tokens > 0)
check("message: rate-limit headers", "anthropic-ratelimit-requests-remaining" in raw.headers)

# A stream: every event validates, the helper assembles the final message.
with client(plain).messages.stream(model=MODEL, max_tokens=64, messages=ASK) as stream:
    kinds = []
    for event in stream:
        if event.type in ("text", "input_json", "citation", "thinking", "signature"):
            continue  # the helper's own derived events
        events.validate_python(event.model_dump())
        kinds.append(event.type)
    final = stream.get_final_message()
check("stream: events validate as RawMessageStreamEvent",
      kinds[0] == "message_start" and kinds[-1] == "message_stop", str(kinds))
check("stream: final message", final.content[0].text and final.usage.output_tokens > 0)

# A stream the server breaks with an overload error event: the SDK raises its typed error.
try:
    with client(broken_stream).messages.stream(model=MODEL, max_tokens=256, messages=ASK) as s:
        for _ in s:
            pass
    check("stream error event: raised", False, "no error")
except anthropic.APIStatusError as e:
    check("stream error event: a typed overload error",
          isinstance(e.body, dict) and e.body.get("error", {}).get("type") == "overloaded_error",
          repr(e.body))

# Token counting.
count = client(plain).messages.count_tokens(model=MODEL, messages=ASK)
MessageTokensCount.model_validate(count.model_dump())
check("count_tokens: validates", count.input_tokens > 0)

# 429: RateLimitError with the error body and a Retry-After.
c = client(plain, key="sk-sdk-429")
try:
    for _ in range(100):
        c.messages.create(model=MODEL, max_tokens=16, messages=ASK)
    check("429: raised", False, "never limited")
except anthropic.RateLimitError as e:
    check("429: RateLimitError", e.status_code == 429
          and e.body["error"]["type"] == "rate_limit_error", repr(e.body))
    check("429: retry-after", e.response.headers.get("retry-after") is not None)

# 529: OverloadedError.
try:
    client(overloaded).messages.create(model=MODEL, max_tokens=16, messages=ASK)
    check("529: raised", False, "no error")
except anthropic.OverloadedError as e:
    check("529: OverloadedError", e.status_code == 529
          and e.body["error"]["type"] == "overloaded_error", repr(e.body))

# 400: a request over the context window is the caller's mistake, typed as such.
try:
    client(plain).messages.create(model=MODEL, max_tokens=16,
                                  messages=[{"role": "user", "content": "x" * 1_200_000}])
    check("400: raised", False, "no error")
except anthropic.BadRequestError as e:
    check("400: BadRequestError", e.body["error"]["type"] == "invalid_request_error", repr(e.body))

# 413: a body over the API's 32 MB.
try:
    client(plain).messages.create(model=MODEL, max_tokens=16,
                                  messages=[{"role": "user", "content": "x" * (33 << 20)}])
    check("413: raised", False, "no error")
except anthropic.APIStatusError as e:
    check("413: a typed request_too_large error", e.status_code == 413
          and e.body["error"]["type"] == "request_too_large", f"{type(e).__name__} {e.body!r}")

# 404: an unknown path.
try:
    client(plain).get("/v1/nothing-here", cast_to=object)
    check("404: raised", False, "no error")
except anthropic.NotFoundError as e:
    check("404: NotFoundError", e.body["error"]["type"] == "not_found_error", repr(e.body))

# The Message Batches API: create, retrieve, list, results (every result type), cancel, delete.
import time

from anthropic.types.messages import MessageBatch, MessageBatchIndividualResponse

batches = client(batch_sim).messages.batches
requests = [
    {"custom_id": "ok-1", "params": {"model": MODEL, "max_tokens": 16, "messages": ASK}},
    {"custom_id": "ok-2", "params": {"model": MODEL, "max_tokens": 32, "messages": ASK}},
    {"custom_id": "bad-1", "params": {"model": MODEL, "messages": ASK}},
]
raw = batches.with_raw_response.create(requests=requests)
created = MessageBatch.model_validate(raw.http_response.json())
check("batches.create: validates as MessageBatch", created.type == "message_batch"
      and created.processing_status == "in_progress", repr(created))
for _ in range(200):
    got = batches.retrieve(created.id)
    if got.processing_status == "ended":
        break
    time.sleep(0.05)
check("batches.retrieve: ends, with its counts", got.processing_status == "ended"
      and got.request_counts.succeeded == 2 and got.request_counts.errored == 1
      and got.results_url is not None, repr(got))
listed = batches.list()
check("batches.list: the batch is listed", any(b.id == created.id for b in listed.data))
results = {r.custom_id: r for r in batches.results(created.id)}
for r in results.values():
    MessageBatchIndividualResponse.model_validate(r.model_dump())
check("batches.results: each request's result, by custom_id",
      results["ok-1"].result.type == "succeeded"
      and results["ok-1"].result.message.usage.output_tokens > 0
      and results["bad-1"].result.type == "errored"
      and results["bad-1"].result.error.error.type == "invalid_request_error",
      repr(results))
slow = batches.create(requests=[
    {"custom_id": f"slow-{i}", "params": {"model": MODEL, "max_tokens": 8, "messages": ASK}}
    for i in range(500)
])
canceled = batches.cancel(slow.id)
check("batches.cancel: validates", canceled.processing_status in ("canceling", "ended"))
for _ in range(200):
    if batches.retrieve(slow.id).processing_status == "ended":
        break
    time.sleep(0.05)
kinds = {r.result.type for r in batches.results(slow.id)}
check("batches.results: canceled requests typed as canceled", "canceled" in kinds, repr(kinds))
deleted = batches.delete(slow.id)
check("batches.delete: validates", deleted.type == "message_batch_deleted")

print(f"{len(checked)} passed, 0 failed")
