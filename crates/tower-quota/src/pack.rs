//! Packs small independent prompts into one Messages call, and splits the reply back into one
//! response per prompt.
//!
//! # Why
//!
//! When the requests-per-minute limit binds and the prompts are short, most of the quota is spent
//! on calls, not tokens: a thousand one-line classifications cost a thousand requests of a
//! 50-a-minute limit. The guide's fix is to "consolidate multiple prompts into a single API call
//! ... if the context window allows": ten prompts in one call do ten times the work under the same
//! limit. [`PackLayer`] does it as middleware, for prompts that opt in ([`Packable`], or every
//! request with [`PackLayer::all`]), and gives each caller a Messages-shaped response of its own,
//! so the caller's code does not change.
//!
//! It is a layer, stacked outside the quota stack (`PackLayer` > retry > budget > ...), so a
//! packed call is one request to every layer inside: the budget reserves it once, the retry
//! retries it as one call, the gate pauses it like any other.
//!
//! # How
//!
//! - **Who is packed together**: requests to the same method and path, with the same API key and
//!   `anthropic-*` headers, and the same body apart from `messages` and `max_tokens` (so the same
//!   model, system prompt, tools and sampling parameters), whose `messages` is one user message of
//!   text, not streamed. Anything else passes through untouched, as does a prompt containing the
//!   protocol's own tags.
//! - **When a pack is sent**: after [`max_wait`](PackLayer::max_wait) (default 50 ms) from its
//!   first prompt, or as soon as it holds [`max_items`](PackLayer::max_items) (default 16), or
//!   when the next prompt would take its estimated input over
//!   [`max_input_tokens`](PackLayer::max_input_tokens) (default 8 000), its summed `max_tokens`
//!   over [`max_output_tokens`](PackLayer::max_output_tokens) (default 64 000) or the two over the
//!   model's context window ([`ContextWindows`]).
//! - **The protocol**: the packed call's user message is a short instruction followed by each
//!   prompt as `<item id="k">`, a line break, the prompt, a line break and `</item>`; the model is
//!   asked to answer each as `<answer id="k">...</answer>`. Its `max_tokens` is the sum of the
//!   prompts' (so a pack never asks for more than its prompts would have alone).
//! - **The split**: each well-formed answer becomes a `200` Messages response (`type` `message`,
//!   one text block, `stop_reason` `end_turn`) with the packed response's headers and a
//!   [`Packed`] extension. `usage` is apportioned (approximate): input tokens by each prompt's
//!   share of the packed prompts' length, output tokens by each answer's share of the answers'.
//! - **Nothing lost, no answer given to the wrong prompt**: a prompt whose answer is missing,
//!   given twice, malformed or cut off by `max_tokens` is re-sent alone (counted in
//!   [`PackHandle::resent_alone`]). A `400` for the packed call sends every prompt alone (one of
//!   them may be the cause). Any other failure the stack inside gave up on (a 429 after its
//!   retries, a 529, a 401) is answered to every caller of the pack as it came; an error
//!   instead of a response reaches each as a [`PackError`]. A caller that drops its future before
//!   the pack leaves is left out of it.
//!
//! Packs are sent from tasks of their own (a pack answers callers that may be gone), so the layer
//! needs a tokio runtime, as tower's `Buffer` does.
//!
//! Request bodies must be in memory and buildable from bytes (`B: InMemoryBody + From<Bytes>`:
//! `Full<Bytes>`, `Bytes`, `Vec<u8>`); the response body is [`PackBody`]: the inner body for a
//! request that was not packed, the split answer's bytes for one that was.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() -> Result<(), tower_quota::BoxError> {
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_quota::budget::Limits;
//! use tower_quota::pack::{PackLayer, Packed};
//! use tower_quota::{Preset, ServiceBuilderExt};
//! use tower_quota_sim::{MessagesRequest, SimConfig, Simulator};
//!
//! let pack = PackLayer::new().all(true);
//! let api = ServiceBuilder::new()
//!     .layer(pack.clone())
//!     .quota_stack(Preset::anthropic(Limits::new().rpm(50).itpm(30_000).otpm(8_000)))
//!     .service(Simulator::new(SimConfig::default()));
//! let mut calls = Vec::new();
//! for q in ["Capital of France?", "Capital of Peru?", "Capital of Japan?"] {
//!     let body = MessagesRequest::user("claude-sonnet-5-5", q, 64).to_bytes();
//!     let req = http::Request::post("/v1/messages")
//!         .header("x-api-key", "sk-example")
//!         .body(Full::new(body))?;
//!     calls.push(tokio::spawn(api.clone().oneshot(req)));
//! }
//! for call in calls {
//!     let res = call.await??;
//!     assert_eq!(res.extensions().get::<Packed>().map(|p| p.of), Some(3));
//!     let message: serde_json::Value = serde_json::from_slice(&res.into_body().collect().await?.to_bytes())?;
//!     assert_eq!(message["type"], "message");
//! }
//! assert_eq!(pack.handle().calls_saved(), 2);
//! # Ok(()) }
//! ```

use crate::BoxError;
use crate::body::InMemoryBody;
use crate::budget::ContextWindows;
use crate::collect::{self, Groups};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use serde_json::{Map, Value, json};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::oneshot;
use tower::{Layer, Service, ServiceExt};

/// Marks a request as packable (a request extension), when the layer does not pack every request
/// ([`PackLayer::all`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Packable;

/// On a response split out of a packed call: which item it was and how many the pack held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packed {
    /// The item's index in the pack.
    pub index: usize,
    /// The items the pack held.
    pub of: usize,
}

/// The response body of [`Pack`]: the inner service's body for a request sent as it was (not
/// packed, or re-sent alone is not: see below), or the bytes of an answer split out of a pack (and
/// of a prompt re-sent alone, read whole to be answered in its place).
pub type PackBody<B> = Either<B, Full<Bytes>>;

/// A packed call failed with an error (not a response): every caller of the pack gets one, with
/// the error's message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackError {
    message: String,
}

impl PackError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// The packed call's error, as text.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for PackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "packed call failed: {}", self.message)
    }
}

impl std::error::Error for PackError {}

#[derive(Clone, Debug)]
struct Config {
    max_items: usize,
    max_input_tokens: u64,
    max_output_tokens: u64,
    max_wait: Duration,
    all: bool,
    windows: ContextWindows,
}

#[derive(Default)]
struct Stats {
    items_packed: AtomicU64,
    packed_calls: AtomicU64,
    resent_alone: AtomicU64,
}

struct Shared {
    config: Config,
    groups: Arc<Groups<Group>>,
    stats: Stats,
}

/// A pack being filled.
struct Group {
    items: Vec<Item>,
    input: u64,
    output: u64,
    /// The body without `messages` and `max_tokens`, shared by every item.
    template: Map<String, Value>,
    window: u64,
}

/// A prompt waiting in a pack: its request (to build the packed call from, or to re-send alone)
/// and its caller's channel.
struct Item {
    parts: http::request::Parts,
    bytes: Bytes,
    text: String,
    input: u64,
    tx: oneshot::Sender<Result<Response<Full<Bytes>>, BoxError>>,
}

/// Packs small prompts into one Messages call. See the [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct PackLayer {
    shared: Arc<Shared>,
}

impl Default for PackLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for PackLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PackLayer")
            .field("config", &self.shared.config)
            .finish()
    }
}

impl PackLayer {
    /// Default bound on the items of one pack.
    pub const DEFAULT_MAX_ITEMS: usize = 16;
    /// Default bound on a pack's estimated input tokens.
    pub const DEFAULT_MAX_INPUT_TOKENS: u64 = 8_000;
    /// Default bound on a pack's summed `max_tokens`.
    pub const DEFAULT_MAX_OUTPUT_TOKENS: u64 = 64_000;
    /// Default packing window.
    pub const DEFAULT_MAX_WAIT: Duration = Duration::from_millis(50);

    /// Packs requests marked [`Packable`], with the default bounds.
    pub fn new() -> Self {
        Self::from_config(Config {
            max_items: Self::DEFAULT_MAX_ITEMS,
            max_input_tokens: Self::DEFAULT_MAX_INPUT_TOKENS,
            max_output_tokens: Self::DEFAULT_MAX_OUTPUT_TOKENS,
            max_wait: Self::DEFAULT_MAX_WAIT,
            all: false,
            windows: ContextWindows::default(),
        })
    }

    fn from_config(config: Config) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                groups: Arc::new(Groups::new()),
                stats: Stats::default(),
            }),
        }
    }

    fn with(self, f: impl FnOnce(&mut Config)) -> Self {
        let mut c = self.shared.config.clone();
        f(&mut c);
        Self::from_config(c)
    }

    /// Pack every packable request, marked or not.
    ///
    /// Builder methods start fresh shared state: configure the layer before you clone it.
    pub fn all(self, on: bool) -> Self {
        self.with(|c| c.all = on)
    }

    /// At most `n` items a pack (at least 1).
    pub fn max_items(self, n: usize) -> Self {
        self.with(|c| c.max_items = n.max(1))
    }

    /// At most `n` estimated input tokens of prompts a pack.
    pub fn max_input_tokens(self, n: u64) -> Self {
        self.with(|c| c.max_input_tokens = n)
    }

    /// At most `n` output tokens a pack (its items' `max_tokens` summed): the model's largest
    /// `max_tokens`, or less.
    pub fn max_output_tokens(self, n: u64) -> Self {
        self.with(|c| c.max_output_tokens = n)
    }

    /// How long a pack waits for more prompts after its first.
    pub fn max_wait(self, d: Duration) -> Self {
        self.with(|c| c.max_wait = d)
    }

    /// The models' context windows a pack must fit (default [`ContextWindows::default`]).
    pub fn context_windows(self, windows: ContextWindows) -> Self {
        self.with(|c| c.windows = windows)
    }

    /// A read-only view of what the layer did.
    pub fn handle(&self) -> PackHandle {
        PackHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<S> Layer<S> for PackLayer {
    type Service = Pack<S>;

    fn layer(&self, inner: S) -> Pack<S> {
        Pack {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// What a [`PackLayer`] did so far.
#[derive(Clone)]
pub struct PackHandle {
    shared: Arc<Shared>,
}

impl PackHandle {
    /// Prompts sent inside packed calls.
    pub fn items_packed(&self) -> u64 {
        self.shared.stats.items_packed.load(Ordering::Relaxed)
    }

    /// Packed calls sent.
    pub fn packed_calls(&self) -> u64 {
        self.shared.stats.packed_calls.load(Ordering::Relaxed)
    }

    /// Calls saved: prompts packed less packed calls.
    pub fn calls_saved(&self) -> u64 {
        self.items_packed().saturating_sub(self.packed_calls())
    }

    /// Prompts of a pack re-sent alone (their answer was missing, duplicated, malformed or cut
    /// off, or the pack was refused with a 400).
    pub fn resent_alone(&self) -> u64 {
        self.shared.stats.resent_alone.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for PackHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PackHandle")
            .field("items_packed", &self.items_packed())
            .field("packed_calls", &self.packed_calls())
            .field("resent_alone", &self.resent_alone())
            .finish()
    }
}

/// The service of [`PackLayer`].
#[derive(Clone)]
pub struct Pack<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for Pack<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pack").field("inner", &self.inner).finish()
    }
}

/// What [`Pack`] needs of its inner service, in one place: a clonable service of `Request<B>`
/// whose futures and response bodies can move to the tasks that send the packs. Implemented for
/// every such service.
pub trait PackInner<B>:
    Service<
        Request<B>,
        Response = Response<Self::ResB>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Clone
    + Send
    + 'static
{
    /// The response body.
    type ResB: http_body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static;
}

impl<S, B, R> PackInner<B> for S
where
    S: Service<Request<B>, Response = Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    R: http_body::Body + Send + 'static,
    R::Data: Send,
    R::Error: Into<BoxError>,
{
    type ResB = R;
}

/// What [`Pack`] needs of a request body: in memory (to read the prompt and re-send it alone) and
/// buildable from bytes (to make the packed call). Implemented for every such body.
pub trait PackRequestBody: InMemoryBody + From<Bytes> + Send + 'static {}

impl<B: InMemoryBody + From<Bytes> + Send + 'static> PackRequestBody for B {}

/// The future of [`Pack`].
pub type PackFuture<ResB> =
    Pin<Box<dyn Future<Output = Result<Response<PackBody<ResB>>, BoxError>> + Send>>;

impl<S: PackInner<B>, B: PackRequestBody> Service<Request<B>> for Pack<S> {
    type Response = Response<PackBody<S::ResB>>;
    type Error = BoxError;
    type Future = PackFuture<S::ResB>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Always ready: each request readies its own clone of the inner service.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        let wanted = self.shared.config.all || req.extensions().get::<Packable>().is_some();
        let prompt = if wanted {
            prompt_of(&req, &self.shared.config.windows)
        } else {
            None
        };
        let Some(prompt) = prompt.filter(|p| self.shared.fits_alone(p)) else {
            return Box::pin(async move {
                let res = inner.oneshot(req).await.map_err(Into::into)?;
                Ok(res.map(Either::Left))
            });
        };
        let (tx, rx) = oneshot::channel();
        let (parts, _) = req.into_parts();
        self.shared.clone().add(inner, prompt, parts, tx);
        Box::pin(async move {
            let res = rx
                .await
                .map_err(|_| PackError::new("the pack was abandoned before it answered"))??;
            Ok(res.map(Either::Right))
        })
    }
}

/// A packable request, read.
struct Prompt {
    key: String,
    template: Map<String, Value>,
    text: String,
    max_tokens: u64,
    input: u64,
    window: u64,
    bytes: Bytes,
}

/// The protocol's tags: a prompt containing one of them is not packed.
const TAGS: [&str; 4] = ["<item", "</item", "<answer", "</answer"];

/// Reads a request as a packable prompt: one user message of text, not streamed, its body a JSON
/// object; `None` for anything else.
fn prompt_of<B: InMemoryBody>(req: &Request<B>, windows: &ContextWindows) -> Option<Prompt> {
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
        bytes,
    })
}

/// Tokens each item's tags add, about.
const ITEM_FRAMING: u64 = 12;

/// The instruction that opens a packed prompt.
fn preamble(n: usize) -> String {
    format!(
        "The following are {n} independent requests, each between an item tag carrying its id \
         and a closing item tag. Answer each one on its own, exactly as you would if it were the \
         only request. Put each answer between <answer id=\"ID\"> and </answer>, with ID the \
         id of its item: one answer per item, and nothing outside the answers.\n\n"
    )
}

impl Shared {
    /// Whether a prompt can be packed at all (alone, it is within every bound).
    fn fits_alone(&self, p: &Prompt) -> bool {
        let c = &self.config;
        p.input <= c.max_input_tokens
            && p.max_tokens <= c.max_output_tokens
            && p.input + p.max_tokens <= p.window
    }

    /// Adds a prompt to its pack; sends the pack when full, starts its window when new.
    fn add<S: PackInner<B>, B: PackRequestBody>(
        self: Arc<Self>,
        inner: S,
        p: Prompt,
        parts: http::request::Parts,
        tx: oneshot::Sender<Result<Response<Full<Bytes>>, BoxError>>,
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
            bytes,
        } = p;
        self.groups.add(
            &key,
            c.max_wait,
            send,
            |g| {
                g.items.len() >= c.max_items
                    || g.input + input > c.max_input_tokens
                    || g.output + max_tokens > c.max_output_tokens
                    || g.input + input + g.output + max_tokens > g.window
            },
            || Group {
                items: Vec::new(),
                input: 0,
                output: 0,
                template,
                window,
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
async fn flush<S: PackInner<B>, B: PackRequestBody>(inner: S, shared: Arc<Shared>, group: Group) {
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
async fn resend<S: PackInner<B>, B: PackRequestBody>(inner: S, shared: &Shared, items: Vec<Item>) {
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
async fn alone<S: PackInner<B>, B: PackRequestBody>(inner: S, item: Item) {
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

/// The answers of a packed reply, by item: `Some` for exactly one well-formed
/// `<answer id="k">...</answer>`, `None` for an answer missing, given twice, or malformed
/// (unterminated, a bad id).
fn split_answers(text: &str, n: usize) -> Vec<Option<String>> {
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
        assert!(prompt_of(&ok, &ContextWindows::default()).is_some());
        for body in [
            r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"a </answer> b"}]}"#,
            r#"{"model":"m","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"Hi"}]}"#,
            r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"Yo"}]}"#,
            r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[{"type":"image"}]}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"Hi"}]}"#,
            "not json",
        ] {
            assert!(
                prompt_of(&req(body), &ContextWindows::default()).is_none(),
                "{body}"
            );
        }
    }
}
