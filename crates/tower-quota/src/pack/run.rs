//! A pack's life: reading a request as a prompt, filling a pack, the packed call, splitting its
//! answer, and re-sending alone what could not be split.

use super::protocol::{Prompt, preamble, split_answers};
use super::*;

#[derive(Clone, Debug)]
pub(super) struct Config {
    pub(super) max_items: usize,
    pub(super) max_input_tokens: u64,
    pub(super) max_output_tokens: u64,
    pub(super) max_wait: Duration,
    pub(super) all: bool,
    pub(super) windows: ContextWindows,
}

#[derive(Default)]
pub(super) struct Stats {
    pub(super) items_packed: AtomicU64,
    pub(super) packed_calls: AtomicU64,
    pub(super) resent_alone: AtomicU64,
}

pub(crate) struct Shared {
    pub(super) config: Config,
    pub(super) groups: Arc<Groups<Group>>,
    pub(super) stats: Stats,
}

/// A pack being filled.
pub(super) struct Group {
    pub(super) items: Vec<Item>,
    pub(super) input: u64,
    pub(super) output: u64,
    /// The body without `messages` and `max_tokens`, shared by every item.
    pub(super) template: Map<String, Value>,
    pub(super) window: u64,
    pub(super) max_output: u64,
}

/// A prompt waiting in a pack: its request (to build the packed call from, or to re-send alone)
/// and its caller's channel.
pub(super) struct Item {
    pub(super) parts: http::request::Parts,
    pub(super) bytes: Bytes,
    pub(super) text: String,
    pub(super) input: u64,
    pub(super) tx: crate::collect::Answer,
}

impl Shared {
    /// Whether a prompt can be packed at all (alone, it is within every bound).
    pub(super) fn fits_alone(&self, p: &Prompt) -> bool {
        let c = &self.config;
        p.input <= c.max_input_tokens
            && p.max_tokens <= p.max_output
            && p.input + p.max_tokens <= p.window
    }

    /// Adds a prompt to its pack; sends the pack when full, starts its window when new.
    pub(super) fn add<S: PackInner<B>, B: PackRequestBody>(
        self: Arc<Self>,
        inner: S,
        p: Prompt,
        parts: http::request::Parts,
        tx: crate::collect::Answer,
    ) {
        let c = &self.config;
        let shared = self.clone();
        let send = move |g| flush(inner.clone(), shared.clone(), g);
        let Prompt {
            key,
            template,
            text,
            max_tokens,
            input,
            window,
            max_output,
            bytes,
        } = p;
        self.groups.add(
            &key,
            c.max_wait,
            send,
            |g| {
                g.items.len() >= c.max_items
                    || g.input + input > c.max_input_tokens
                    || g.output + max_tokens > g.max_output
                    || g.input + input + g.output + max_tokens > g.window
            },
            || Group {
                items: Vec::new(),
                input: 0,
                output: 0,
                template,
                window,
                max_output,
            },
            |g| {
                g.input += input;
                g.output += max_tokens;
                g.items.push(Item {
                    parts,
                    bytes,
                    text,
                    input,
                    tx,
                });
                g.items.len() >= c.max_items
            },
        );
    }
}

/// Sends a pack and answers its callers.
pub(super) async fn flush<S: PackInner<B>, B: PackRequestBody>(
    inner: S,
    shared: Arc<Shared>,
    group: Group,
) {
    // A caller that gave up before the pack left is left out of it.
    let items: Vec<Item> = group
        .items
        .into_iter()
        .filter(|i| !i.tx.is_closed())
        .collect();
    match items.len() {
        0 => return,
        1 => {
            let item = items.into_iter().next().expect("one item");
            return alone(inner, item).await;
        }
        _ => {}
    }
    let n = items.len();
    let mut prompt = preamble(n);
    for (k, item) in items.iter().enumerate() {
        prompt.push_str(&format!("<item id=\"{k}\">\n{}\n</item>\n", item.text));
    }
    let mut body = group.template;
    body.insert("max_tokens".into(), json!(group.output));
    body.insert(
        "messages".into(),
        json!([{"role": "user", "content": prompt}]),
    );
    let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
    let mut req = Request::new(B::from(bytes));
    let head = &items[0].parts;
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = head.uri.clone();
    *req.version_mut() = head.version;
    *req.headers_mut() = head.headers.clone();
    req.headers_mut().remove(http::header::CONTENT_LENGTH);
    shared.stats.packed_calls.fetch_add(1, Ordering::Relaxed);
    shared
        .stats
        .items_packed
        .fetch_add(n as u64, Ordering::Relaxed);

    let answered = match inner.clone().oneshot(req).await.map_err(Into::into) {
        Err(e) => Err(e.to_string()),
        Ok(res) => {
            let (parts, body) = res.into_parts();
            match body.collect().await {
                Ok(b) => Ok((parts, b.to_bytes())),
                Err(e) => Err(e.into().to_string()),
            }
        }
    };
    let (parts, bytes) = match answered {
        Err(message) => {
            for item in items {
                let _ = item.tx.send(Err(Box::new(PackError::new(message.clone()))));
            }
            return;
        }
        Ok(answer) => answer,
    };
    if parts.status == StatusCode::BAD_REQUEST {
        // One of them may be the cause: each goes alone.
        return resend(inner, &shared, items).await;
    }
    if !parts.status.is_success() {
        // What the stack inside gave up on, answered to every caller as it came.
        for item in items {
            let _ = item.tx.send(Ok(collect::copy_of(&parts, &bytes)));
        }
        return;
    }
    let reply: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let text = reply["content"]
        .as_array()
        .map(|blocks| {
            blocks
                .iter()
                .filter_map(|b| b["text"].as_str())
                .collect::<String>()
        })
        .unwrap_or_default();
    let answers = split_answers(&text, n);
    let usage_in = reply["usage"]["input_tokens"].as_u64().unwrap_or(0);
    let usage_out = reply["usage"]["output_tokens"].as_u64().unwrap_or(0);
    let weight_in: u64 = items.iter().map(|i| i.input).sum::<u64>().max(1);
    let weight_out: u64 = answers
        .iter()
        .flatten()
        .map(|a| a.len() as u64)
        .sum::<u64>()
        .max(1);
    let id = reply["id"].as_str().unwrap_or("msg_packed");
    let mut failed = Vec::new();
    for (k, (item, answer)) in items.into_iter().zip(answers).enumerate() {
        let Some(answer) = answer else {
            failed.push(item);
            continue;
        };
        let message = json!({
            "id": format!("{id}_{k}"),
            "type": "message",
            "role": "assistant",
            "model": reply["model"],
            "content": [{"type": "text", "text": answer}],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": {
                "input_tokens": usage_in * item.input / weight_in,
                "output_tokens": usage_out * answer.len() as u64 / weight_out,
            },
        });
        let mut res = Response::new(Full::new(Bytes::from(
            serde_json::to_vec(&message).unwrap_or_default(),
        )));
        *res.headers_mut() = parts.headers.clone();
        res.headers_mut().remove(http::header::CONTENT_LENGTH);
        res.extensions_mut().insert(Packed { index: k, of: n });
        let _ = item.tx.send(Ok(res));
    }
    resend(inner, &shared, failed).await;
}

/// Re-sends each item alone, at once.
pub(super) async fn resend<S: PackInner<B>, B: PackRequestBody>(
    inner: S,
    shared: &Shared,
    items: Vec<Item>,
) {
    shared
        .stats
        .resent_alone
        .fetch_add(items.len() as u64, Ordering::Relaxed);
    let mut sends = tokio::task::JoinSet::new();
    for item in items {
        sends.spawn(alone(inner.clone(), item));
    }
    while sends.join_next().await.is_some() {}
}

/// Sends one item as it came and answers its caller with the response read whole.
pub(super) async fn alone<S: PackInner<B>, B: PackRequestBody>(inner: S, item: Item) {
    let req = Request::from_parts(item.parts, B::from(item.bytes));
    let answer = async {
        let res = inner.oneshot(req).await.map_err(Into::into)?;
        let (parts, body) = res.into_parts();
        let bytes = body.collect().await.map_err(Into::into)?.to_bytes();
        Ok::<_, BoxError>(Response::from_parts(parts, Full::new(bytes)))
    }
    .await;
    let _ = item.tx.send(answer);
}
