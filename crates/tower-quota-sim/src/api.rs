//! The Messages API shapes the simulator reads and writes.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A `POST /v1/messages` request body (the fields the simulator reads).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct MessagesRequest {
    /// The model name (echoed back).
    pub model: String,
    /// The output reservation: admission needs this many output tokens.
    pub max_tokens: u64,
    /// The conversation.
    pub messages: Vec<Message>,
    /// An optional system prompt (a string or a list of text blocks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<Value>,
    /// Stream the answer as server-sent events.
    #[serde(default)]
    pub stream: bool,
}

/// One message of the conversation.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Message {
    /// `user` or `assistant`.
    pub role: String,
    /// A string or a list of content blocks.
    pub content: Value,
}

impl MessagesRequest {
    /// A one-message request: `prompt` from the user, answered with at most `max_tokens`.
    pub fn user(model: impl Into<String>, prompt: impl Into<String>, max_tokens: u64) -> Self {
        Self {
            model: model.into(),
            max_tokens,
            messages: vec![Message {
                role: "user".into(),
                content: Value::String(prompt.into()),
            }],
            system: None,
            stream: false,
        }
    }

    /// The request as JSON bytes.
    pub fn to_bytes(&self) -> bytes::Bytes {
        serde_json::to_vec(self).unwrap_or_default().into()
    }
}

/// Characters of text in a content value: a string, or the `text` of every block in a list.
fn text_chars(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.chars().count() as u64,
        Value::Array(blocks) => blocks
            .iter()
            .map(|b| b.get("text").map_or(0, text_chars))
            .sum(),
        _ => 0,
    }
}

/// The real API's refusals of a request that cannot fit its model, as it words them (a 400
/// `invalid_request_error`): `max_tokens` over the model's largest, the prompt alone over the
/// context window, or the prompt and `max_tokens` together over it. `input`: the request's
/// [`input_tokens`].
pub(crate) fn refusal(
    req: &MessagesRequest,
    input: u64,
    context_window: u64,
    max_output_tokens: u64,
) -> Option<String> {
    if req.max_tokens > max_output_tokens {
        Some(format!(
            "max_tokens: {} > {max_output_tokens}, which is the maximum allowed number of output \
             tokens for {}",
            req.max_tokens, req.model
        ))
    } else if input > context_window {
        Some(format!(
            "prompt is too long: {input} tokens > {context_window} maximum"
        ))
    } else if input.saturating_add(req.max_tokens) > context_window {
        Some(format!(
            "input length and `max_tokens` exceed context limit: {input} + {} > \
             {context_window}, decrease input length or `max_tokens` and try again",
            req.max_tokens
        ))
    } else {
        None
    }
}

/// The simulator's deterministic input-token count: one token per 4 characters of text (rounded
/// up), plus 4 per message and 3 for the request (the framing real tokenizers add).
pub fn input_tokens(req: &MessagesRequest) -> u64 {
    let chars: u64 = req
        .messages
        .iter()
        .map(|m| text_chars(&m.content))
        .fold(0u64, u64::saturating_add)
        .saturating_add(req.system.as_ref().map_or(0, text_chars));
    chars
        .div_ceil(4)
        .saturating_add((req.messages.len() as u64).saturating_mul(4))
        .saturating_add(3)
}

/// An Anthropic-shaped error body.
pub(crate) fn error_body(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

/// The text of an answer of `output_tokens` tokens (one short word a token, at most 64 shown).
fn answer_text(output_tokens: u64) -> String {
    "ok "
        .repeat(output_tokens.min(64) as usize)
        .trim_end()
        .to_owned()
}

pub(crate) fn stop_reason(output_tokens: u64, max_tokens: u64) -> &'static str {
    if output_tokens >= max_tokens {
        "max_tokens"
    } else {
        "end_turn"
    }
}

/// The items of a packed prompt (tower-quota's `pack` protocol): in the last user message's text,
/// each `<item id="k">` line, the item's text, and a `</item>` line. `None` when there is none.
pub(crate) fn packed_items(req: &MessagesRequest) -> Option<Vec<(String, String)>> {
    let last = req.messages.last()?;
    let text = match &last.content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => return None,
    };
    let mut items = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("<item id=\"") {
        let after = &rest[start + 10..];
        let close = after.find("\">\n")?;
        let id = after[..close].to_owned();
        let body = &after[close + 3..];
        let end = body.find("\n</item>")?;
        items.push((id, body[..end].to_owned()));
        rest = &body[end + 8..];
    }
    (!items.is_empty()).then_some(items)
}

/// The simulator's answer to one packed item: deterministic, and naming the item's own text, so a
/// client can check each prompt got its own answer.
pub fn packed_answer(item: &str) -> String {
    format!("Answer to: {item}")
}

/// A complete (non-streaming) message; `text` replaces the default filler when given.
pub(crate) fn message(
    id: &str,
    req: &MessagesRequest,
    input: u64,
    output: u64,
    text: Option<&str>,
) -> Value {
    let text = text.map_or_else(|| answer_text(output), str::to_owned);
    json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop_reason(output, req.max_tokens),
        "stop_sequence": null,
        "usage": {"input_tokens": input, "output_tokens": output},
    })
}

/// One SSE event.
pub(crate) fn sse(event: &str, data: &Value) -> bytes::Bytes {
    format!("event: {event}\ndata: {data}\n\n").into()
}

/// The events of a streamed message: start, a text block in `deltas` pieces, usage, stop.
pub(crate) fn stream_events(
    id: &str,
    req: &MessagesRequest,
    input: u64,
    output: u64,
    deltas: usize,
) -> Vec<bytes::Bytes> {
    let mut ev = vec![
        sse(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": id, "type": "message", "role": "assistant", "model": req.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": input, "output_tokens": 1}}}),
        ),
        sse(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}),
        ),
    ];
    for _ in 0..deltas {
        ev.push(sse(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": "ok "}}),
        ));
    }
    ev.push(sse(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    ev.push(sse(
        "message_delta",
        &json!({"type": "message_delta",
            "delta": {"stop_reason": stop_reason(output, req.max_tokens), "stop_sequence": null},
            "usage": {"output_tokens": output}}),
    ));
    ev.push(sse("message_stop", &json!({"type": "message_stop"})));
    ev
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_tokens_are_deterministic() {
        let r = MessagesRequest::user("m", "abcdefgh", 10);
        assert_eq!(input_tokens(&r), 2 + 4 + 3);
        let blocks: MessagesRequest = serde_json::from_value(json!({
            "model": "m", "max_tokens": 5, "system": "abcd",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "abcde"}]}]
        }))
        .unwrap();
        assert_eq!(input_tokens(&blocks), 3 + 4 + 3);
    }
}
