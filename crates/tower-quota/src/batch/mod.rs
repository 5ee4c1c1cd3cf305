//! Sends deferrable Messages requests through the Message Batches API, and answers each caller
//! as the Messages endpoint would have.
//!
//! # Why
//!
//! Many small independent requests that can wait compete with interactive traffic for the same
//! requests, input tokens and output tokens a minute. Anthropic's Message Batches API takes up to
//! 100 000 Messages requests a batch, answers within 24 hours (most batches within the hour), costs
//! half the price, and runs on a rate-limit pool of its own. Every SDK exposes it as separate calls
//! (create, poll, read the results, match them by `custom_id`) that the caller orchestrates by
//! hand. [`BatchLayer`] makes it transparent: a request marked [`Deferrable`] (or every request,
//! with [`BatchLayer::all`]) is collected into a batch, and its caller's future resolves with an
//! `http::Response` shaped as `/v1/messages` would have answered.
//!
//! # How
//!
//! - **Collected, then submitted**: a batch is submitted when it holds
//!   [`max_requests`](BatchLayer::max_requests) (default 10 000), when the next request would take
//!   its body past [`max_bytes`](BatchLayer::max_bytes) (default 64 MB), or
//!   [`max_wait`](BatchLayer::max_wait) after its first request (default 2 s). Requests share a
//!   batch when they go to the same host with the same key and `anthropic-*` headers. Each gets a
//!   `custom_id` of its own. A caller that drops its future before submission is left out.
//! - **Polled**: `GET /v1/messages/batches/{id}` after 1 s, then each wait 1.5 times the last, up
//!   to a minute, with up to a tenth of jitter, never before a `Retry-After` the endpoint gave.
//!   When every caller of a submitted batch is gone, it is canceled. Each poll's
//!   `request_counts` are kept for the live state ([`BatchHandle::batches`]).
//! - **Results read as a stream**: the results file is read line by line as it arrives (a
//!   100 000-request file can be hundreds of MB; only the line being read is held), each line
//!   matched by `custom_id` and answered at once.
//! - **Answers**: `succeeded` is a 200 with the message; `errored` is the error's own status
//!   (400 for `invalid_request_error`, 429, 529, 500, ...) and body `{"type":"error","error":...}`,
//!   so classifiers and callers treat it as a `/v1/messages` answer; `canceled` and `expired` are
//!   a typed [`BatchError`]. A streaming request (`"stream": true`) cannot be deferred: it fails at
//!   once with [`BatchError::is_streaming`], nothing sent. Requests not deferrable pass through.
//!
//! Stack it outside the quota stack (`BatchLayer` > retry > budget > ...): the batch endpoints'
//! own limits are then honoured by the same retry, Retry-After and budget logic, in a pool of
//! their own ([`Pool::Batches`](crate::partition::Pool)): a poll's 429 pauses the key's batch
//! calls, never its Messages calls, and the batch calls spend nothing of the Messages budget.
//! It needs a tokio runtime (batches are submitted and polled from tasks of their own).
//!
//! # Memory
//!
//! A request waiting in a submitted batch costs its caller's answer channel and its `custom_id`:
//! the layer writes the create call's body straight from the parsed requests and drops each as
//! it is written. Measured (`cargo bench -p tower-quota --bench batch_memory`): 100 000 callers
//! waiting in one batch, 1.1 KB each with the caller's own task; delivering their 124 MB of
//! results adds at most 0.2 MB.
//!
//! # OpenAI's Batch API: not served, and why
//!
//! It is the same idea with other moving parts: the requests go up as a JSONL file
//! (`POST /v1/files`, multipart, purpose `batch`), the batch names that file, the answers come
//! back as two files (`output_file_id`, `error_file_id`) downloaded through `/v1/files`, and each
//! line wraps the answer in a `response` object with its own `status_code`. A second backend
//! behind this layer would share the collecting, the polling and the matching by `custom_id`,
//! and differ in the submit and in the reading of results. What holds it back is not the shape
//! but the check: the simulator serves no OpenAI Batch API, so nothing here could show that such
//! a backend answers callers correctly, and an untested backend would be worse than none. The
//! submit and read steps are the two functions to add when the simulator learns it.

use crate::BoxError;
use crate::collect::{self, Groups};
use crate::pack::{PackInner, PackRequestBody};
use crate::util::Configured;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Either, Full};
use serde_json::Value;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tower::Service;

/// Marks a request as deferrable (a request extension): it may be answered through a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deferrable;

/// On a response that came through a batch: the batch's id and the request's `custom_id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batched {
    /// The batch.
    pub batch_id: String,
    /// The request's id in it.
    pub custom_id: String,
}

/// The response body of [`Batch`]: the inner body for a request sent as it was, the result's
/// bytes for one answered through a batch.
pub type BatchBody<B> = Either<B, Full<Bytes>>;

mod error;
mod run;
mod state;

pub use error::BatchError;
use error::Kind;
pub use state::{BatchStatus, RequestCounts};
use state::{Config, Shared, Stats};

/// Sends deferrable requests through the Message Batches API. See the [module docs](self).
///
/// The state is made on the layer's first use (its first service or [`handle`](Self::handle)); a
/// setter called after that panics (the services and handles made would not see it): configure
/// the layer, then clone and use it.
#[derive(Clone)]
#[must_use]
pub struct BatchLayer {
    inner: Configured<Config, Shared>,
}

impl fmt::Debug for BatchLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchLayer")
            .field("config", self.inner.config())
            .finish()
    }
}

impl Default for BatchLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchLayer {
    /// The API's own bound on a batch's requests.
    pub const API_MAX_REQUESTS: usize = 100_000;
    /// The API's own bound on a batch's size: 256 MB.
    pub const API_MAX_BYTES: usize = 256 << 20;

    /// Defers requests marked [`Deferrable`], with the defaults.
    pub fn new() -> Self {
        Self::from_config(Config {
            max_requests: 10_000,
            max_bytes: 64 << 20,
            max_wait: Duration::from_secs(2),
            all: false,
            first_poll: Duration::from_secs(1),
            max_poll: Duration::from_secs(60),
        })
    }

    /// Defer every request, marked or not.
    #[track_caller]
    pub fn all(self, on: bool) -> Self {
        self.with(|c| c.all = on)
    }

    /// At most `n` requests a batch.
    ///
    /// # Panics
    ///
    /// If `n` is 0 or over [`API_MAX_REQUESTS`](Self::API_MAX_REQUESTS) (the API refuses such
    /// a batch).
    #[track_caller]
    pub fn max_requests(self, n: usize) -> Self {
        assert!(
            (1..=Self::API_MAX_REQUESTS).contains(&n),
            "a batch holds 1 to {} requests: {n}",
            Self::API_MAX_REQUESTS
        );
        self.with(|c| c.max_requests = n)
    }

    /// At most `n` bytes of requests a batch.
    ///
    /// # Panics
    ///
    /// If `n` is 0 or over [`API_MAX_BYTES`](Self::API_MAX_BYTES) (the API refuses such a
    /// batch).
    #[track_caller]
    pub fn max_bytes(self, n: usize) -> Self {
        assert!(
            (1..=Self::API_MAX_BYTES).contains(&n),
            "a batch holds 1 to {} bytes: {n}",
            Self::API_MAX_BYTES
        );
        self.with(|c| c.max_bytes = n)
    }

    /// How long a batch waits for more requests after its first.
    #[track_caller]
    pub fn max_wait(self, d: Duration) -> Self {
        self.with(|c| c.max_wait = d)
    }

    /// A read-only view of the layer's state.
    pub fn handle(&self) -> BatchHandle {
        BatchHandle {
            shared: self.shared(),
        }
    }
}

configured_layer!(BatchLayer => Batch, make: |config| Shared {
    config: config.clone(),
    groups: Arc::new(Groups::new()),
    next: AtomicU64::new(0),
    stats: Stats::default(),
    live: Mutex::new(Vec::new()),
});

/// What a [`BatchLayer`] is doing.
#[derive(Clone)]
pub struct BatchHandle {
    shared: Arc<Shared>,
}

impl BatchHandle {
    /// Requests collected, not submitted yet.
    pub fn queued(&self) -> usize {
        self.shared.stats.queued.load(Ordering::SeqCst)
    }

    /// Batches submitted and not finished.
    pub fn in_flight(&self) -> usize {
        self.shared.stats.in_flight.load(Ordering::SeqCst)
    }

    /// Batches submitted so far.
    pub fn submitted(&self) -> u64 {
        self.shared.stats.submitted.load(Ordering::Relaxed)
    }

    /// Results delivered to callers so far.
    pub fn delivered(&self) -> u64 {
        self.shared.stats.delivered.load(Ordering::Relaxed)
    }

    /// Polls of submitted batches so far.
    pub fn polls(&self) -> u64 {
        self.shared.stats.polls.load(Ordering::Relaxed)
    }

    /// Batches canceled because every caller was gone.
    pub fn canceled(&self) -> u64 {
        self.shared.stats.canceled.load(Ordering::Relaxed)
    }

    /// The batches submitted and not finished, oldest first, with their `request_counts` as
    /// their last poll gave them.
    pub fn batches(&self) -> Vec<BatchStatus> {
        self.shared.live().clone()
    }
}

impl fmt::Debug for BatchHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchHandle")
            .field("queued", &self.queued())
            .field("in_flight", &self.in_flight())
            .field("submitted", &self.submitted())
            .field("delivered", &self.delivered())
            .finish()
    }
}

/// The service of [`BatchLayer`].
pub struct Batch<S> {
    inner: S,
    shared: Arc<Shared>,
}

inner_service!(Batch);

impl<S: fmt::Debug> fmt::Debug for Batch<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch").field("inner", &self.inner).finish()
    }
}

/// The future of [`Batch`].
pub type BatchFuture<ResB> = collect::CollectFuture<ResB>;

impl<S: PackInner<B>, B: PackRequestBody> Service<Request<B>> for Batch<S> {
    type Response = Response<BatchBody<S::ResB>>;
    type Error = BoxError;
    type Future = BatchFuture<S::ResB>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        let wanted = self.shared.config.all || req.extensions().get::<Deferrable>().is_some();
        let params = wanted
            .then(|| req.body().body_bytes())
            .flatten()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .filter(Value::is_object);
        let Some(params) = params else {
            return collect::pass(inner, req);
        };
        if params.get("stream").and_then(Value::as_bool) == Some(true) {
            return Box::pin(async {
                Err(Box::new(BatchError::new(Kind::Streaming, "")) as BoxError)
            });
        }
        let (tx, answered) = collect::answer_later(|| {
            Box::new(BatchError::new(
                Kind::Failed,
                "abandoned before it answered",
            ))
        });
        let (parts, _) = req.into_parts();
        self.shared.clone().add(inner, parts, params, tx);
        answered
    }
}
