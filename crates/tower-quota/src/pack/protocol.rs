//! The packing protocol: which requests are prompts that may be packed, the packed prompt's
//! instruction and tags, and the split of a packed reply into one answer per item.

use super::*;

/// A packable request, read.
pub(super) struct Prompt {
    pub(super) key: String,
    pub(super) template: Map<String, Value>,
    pub(super) text: String,
    pub(super) max_tokens: u64,
    pub(super) input: u64,
    pub(super) window: u64,
    /// The largest summed `max_tokens` of its pack: the layer's bound, or its model's largest
    /// `max_tokens` when the table names a smaller one.
    pub(super) max_output: u64,
    pub(super) bytes: Bytes,
}

/// The protocol's tags: a prompt containing one of them is not packed.
pub(super) const TAGS: [&str; 4] = ["<item", "</item", "<answer", "</answer"];

/// Reads a request as a packable prompt: one user message of text, not streamed, its body a JSON
/// object; `None` for anything else.
pub(super) fn prompt_of<B: InMemoryBody>(
    req: &Request<B>,
    windows: &ContextWindows,
    max_output_tokens: u64,
) -> Option<Prompt> {
    if req.method() != http::Method::POST {
        return None;
    }
    let bytes = req.body().body_bytes()?;
    let Value::Object(mut body) = serde_json::from_slice::<Value>(&bytes).ok()? else {
        return None;
    };
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return None;
    }
    let max_tokens = body.remove("max_tokens")?.as_u64()?;
    let Value::Array(messages) = body.remove("messages")? else {
        return None;
    };
    let [message] = messages.as_slice() else {
        return None;
    };
    if message.get("role").and_then(Value::as_str) != Some("user") {
        return None;
    }
    let text = match message.get("content")? {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => {
            let mut text = String::new();
            for b in blocks {
                if b.get("type").and_then(Value::as_str) != Some("text") {
                    return None;
                }
                text.push_str(b.get("text")?.as_str()?);
            }
            text
        }
        _ => return None,
    };
    let lower = text.to_ascii_lowercase();
    if TAGS.iter().any(|t| lower.contains(t)) {
        return None;
    }
    let model = body.get("model").and_then(Value::as_str);
    let window = windows.window(model, req.headers());
    let max_output = windows
        .max_tokens(model)
        .map_or(max_output_tokens, |m| m.min(max_output_tokens));
    // Same path, key, API version and betas, same everything but the prompt and max_tokens.
    let mut key = format!("{} {}\n", req.method(), req.uri().path());
    for name in [
        "x-api-key",
        "authorization",
        "anthropic-version",
        "anthropic-beta",
    ] {
        for v in req.headers().get_all(name) {
            key.push_str(name);
            key.push(':');
            key.push_str(&String::from_utf8_lossy(v.as_bytes()));
            key.push('\n');
        }
    }
    key.push_str(&serde_json::to_string(&body).ok()?);
    let input = (text.len() as u64).div_ceil(4) + ITEM_FRAMING;
    Some(Prompt {
        key,
        template: body,
        text,
        max_tokens,
        input,
        window,
        max_output,
        bytes,
    })
}

/// Tokens each item's tags add, about.
pub(super) const ITEM_FRAMING: u64 = 12;

/// The instruction that opens a packed prompt.
pub(super) fn preamble(n: usize) -> String {
    format!(
        "The following are {n} independent requests, each between an item tag carrying its id \
         and a closing item tag. Answer each one on its own, exactly as you would if it were the \
         only request. Put each answer between <answer id=\"ID\"> and </answer>, with ID the \
         id of its item: one answer per item, and nothing outside the answers.\n\n"
    )
}

/// The answers of a packed reply, by item: `Some` for exactly one well-formed
/// `<answer id="k">...</answer>`, `None` for an answer missing, given twice, or malformed
/// (unterminated, a bad id).
pub(super) fn split_answers(text: &str, n: usize) -> Vec<Option<String>> {
    const OPEN: &str = "<answer id=\"";
    const CLOSE: &str = "</answer>";
    let mut found: Vec<Vec<String>> = vec![Vec::new(); n];
    let mut rest = text;
    while let Some(at) = rest.find(OPEN) {
        let after = &rest[at + OPEN.len()..];
        let Some(quote) = after.find('"') else { break };
        let body = &after[quote..];
        let end = body.find(CLOSE);
        let next = body.find(OPEN);
        match end {
            // Terminated before the next answer opens.
            Some(end) if next.is_none_or(|next| next > end) => {
                let id = after[..quote].parse::<usize>().ok().filter(|&k| k < n);
                if let (Some(k), Some(content)) = (id, body[..end].strip_prefix("\">")) {
                    found[k].push(content.trim().to_owned());
                }
                rest = &body[end + CLOSE.len()..];
            }
            // Unterminated: the next answer (if any) starts over.
            _ => rest = body,
        }
    }
    found
        .into_iter()
        .map(|mut v| if v.len() == 1 { v.pop() } else { None })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_split_and_every_bad_one_is_left_out() {
        let text = "<answer id=\"0\">\nzero\n</answer>\n\
                    <answer id=\"1\">\none\n</answer>\n<answer id=\"1\">\nagain\n</answer>\n\
                    <answer id=\"2?\">\nbroken\n\n\
                    <answer id=\"4\">\nfour\n</answer>\n\
                    <answer id=\"9\">\nnine: no such item\n</answer>\n\
                    <answer id=\"5\">\ncut off by max_tok";
        let got = split_answers(text, 6);
        assert_eq!(
            got,
            [
                Some("zero".to_owned()),
                None, // duplicated
                None, // garbled
                None, // missing
                Some("four".to_owned()),
                None, // truncated
            ]
        );
    }

    #[test]
    fn a_prompt_with_the_protocols_tags_or_more_than_one_message_is_not_packed() {
        let req = |body: &'static str| {
            Request::post("/v1/messages")
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap()
        };
        let ok = req(r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"Hi"}]}"#);
        assert!(prompt_of(&ok, &ContextWindows::default(), 64_000).is_some());
        for body in [
            r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"a </answer> b"}]}"#,
            r#"{"model":"m","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"Hi"}]}"#,
            r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"Yo"}]}"#,
            r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[{"type":"image"}]}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"Hi"}]}"#,
            "not json",
        ] {
            assert!(
                prompt_of(&req(body), &ContextWindows::default(), 64_000).is_none(),
                "{body}"
            );
        }
    }
}
