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
//!   over [`max_output_tokens`](PackLayer::max_output_tokens) (default 64 000, or the model's
//!   largest `max_tokens` when [`ContextWindows`] names a smaller one) or the two over the
//!   model's context window.
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
use crate::util::Configured;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use serde_json::{Map, Value, json};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{Service, ServiceExt};

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
    pub(super) fn new(message: impl Into<String>) -> Self {
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

mod protocol;
mod run;
use protocol::prompt_of;
use run::{Config, Shared, Stats};

/// Packs small prompts into one Messages call. See the [module docs](self).
///
/// The state is made on the layer's first use (its first service or [`handle`](Self::handle)); a
/// setter called after that panics (the services and handles made would not see it): configure
/// the layer, then clone and use it.
#[derive(Clone)]
#[must_use]
pub struct PackLayer {
    inner: Configured<Config, Shared>,
}

impl Default for PackLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for PackLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PackLayer")
            .field("config", self.inner.config())
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

    /// Pack every packable request, marked or not.
    #[track_caller]
    pub fn all(self, on: bool) -> Self {
        self.with(|c| c.all = on)
    }

    /// At most `n` items a pack.
    ///
    /// # Panics
    ///
    /// If `n` is 0 (a pack holds at least one prompt).
    #[track_caller]
    pub fn max_items(self, n: usize) -> Self {
        assert!(n > 0, "a pack holds at least one item");
        self.with(|c| c.max_items = n)
    }

    /// At most `n` estimated input tokens of prompts a pack.
    #[track_caller]
    pub fn max_input_tokens(self, n: u64) -> Self {
        self.with(|c| c.max_input_tokens = n)
    }

    /// At most `n` output tokens a pack (its items' `max_tokens` summed). A model whose largest
    /// `max_tokens` the [`context_windows`](Self::context_windows) table names is held to the
    /// smaller of the two.
    #[track_caller]
    pub fn max_output_tokens(self, n: u64) -> Self {
        self.with(|c| c.max_output_tokens = n)
    }

    /// How long a pack waits for more prompts after its first.
    #[track_caller]
    pub fn max_wait(self, d: Duration) -> Self {
        self.with(|c| c.max_wait = d)
    }

    /// The models' context windows a pack must fit (default [`ContextWindows::default`]).
    #[track_caller]
    pub fn context_windows(self, windows: ContextWindows) -> Self {
        self.with(|c| c.windows = windows)
    }

    /// A read-only view of what the layer did.
    pub fn handle(&self) -> PackHandle {
        PackHandle {
            shared: self.shared(),
        }
    }
}

configured_layer!(PackLayer => Pack, make: |config| Shared {
    config: config.clone(),
    groups: Arc::new(Groups::new()),
    stats: Stats::default(),
});

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
pub struct Pack<S> {
    inner: S,
    shared: Arc<Shared>,
}

inner_service!(Pack);

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
pub type PackFuture<ResB> = collect::CollectFuture<ResB>;

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
            prompt_of(
                &req,
                &self.shared.config.windows,
                self.shared.config.max_output_tokens,
            )
        } else {
            None
        };
        let Some(prompt) = prompt.filter(|p| self.shared.fits_alone(p)) else {
            return collect::pass(inner, req);
        };
        let (tx, answered) = collect::answer_later(|| {
            Box::new(PackError::new("the pack was abandoned before it answered"))
        });
        let (parts, _) = req.into_parts();
        self.shared.clone().add(inner, prompt, parts, tx);
        answered
    }
}
