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
//! own limits are then honoured by the same retry, Retry-After and budget logic. It needs a tokio
//! runtime (batches are submitted and polled from tasks of their own). OpenAI's Batch API (a JSONL
//! file upload, a different result shape) is not served by this layer.

use crate::BoxError;
use crate::collect::{self, Groups};
use crate::pack::{PackInner, PackRequestBody};
use bytes::{Bytes, BytesMut};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Either, Full};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::oneshot;
use tower::{Layer, Service, ServiceExt};

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

/// Why a deferred request has no Messages answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchError {
    kind: Kind,
    message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Streaming,
    Canceled,
    Expired,
    Failed,
}

impl BatchError {
    fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// The request asked for a stream, which a batch cannot give: nothing was sent.
    pub fn is_streaming(&self) -> bool {
        self.kind == Kind::Streaming
    }

    /// The batch was canceled before the request was processed.
    pub fn is_canceled(&self) -> bool {
        self.kind == Kind::Canceled
    }

    /// The batch expired (24 hours) before the request was processed.
    pub fn is_expired(&self) -> bool {
        self.kind == Kind::Expired
    }
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            Kind::Streaming => "a streaming request cannot be deferred to a batch",
            Kind::Canceled => "the batch was canceled before this request was processed",
            Kind::Expired => "the batch expired before this request was processed",
            Kind::Failed => "the batch failed",
        };
        if self.message.is_empty() {
            f.write_str(what)
        } else {
            write!(f, "{what}: {}", self.message)
        }
    }
}

impl std::error::Error for BatchError {}

#[derive(Clone, Debug)]
struct Config {
    max_requests: usize,
    max_bytes: usize,
    max_wait: Duration,
    all: bool,
    first_poll: Duration,
    max_poll: Duration,
}

#[derive(Default)]
struct Stats {
    queued: AtomicUsize,
    in_flight: AtomicUsize,
    submitted: AtomicU64,
    delivered: AtomicU64,
    polls: AtomicU64,
    canceled: AtomicU64,
}

struct Shared {
    config: Config,
    groups: Arc<Groups<Group>>,
    /// Numbers the requests' `custom_id`s.
    next: AtomicU64,
    stats: Stats,
    /// The batches submitted and not finished, as their last poll counted them.
    live: Mutex<Vec<BatchStatus>>,
}

/// A submitted batch's requests by state, as the last poll of
/// `GET /v1/messages/batches/{id}` counted them (its `request_counts`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestCounts {
    /// Not processed yet.
    pub processing: u64,
    /// Answered with a message.
    pub succeeded: u64,
    /// Answered with an error.
    pub errored: u64,
    /// Canceled before they were processed.
    pub canceled: u64,
    /// Expired before they were processed.
    pub expired: u64,
}

impl RequestCounts {
    fn from_json(v: &Value) -> Option<Self> {
        let n = |k: &str| v[k].as_u64();
        Some(Self {
            processing: n("processing")?,
            succeeded: n("succeeded")?,
            errored: n("errored")?,
            canceled: n("canceled")?,
            expired: n("expired")?,
        })
    }
}

/// A batch submitted and not finished: see [`BatchHandle::batches`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchStatus {
    /// The batch's id (`msgbatch_...`).
    pub id: String,
    /// Requests it was submitted with (callers that left since still count).
    pub requests: usize,
    /// Its requests by state, from its last poll; all `processing` before the first.
    pub counts: RequestCounts,
    /// Whether its results are being delivered (it ended).
    pub delivering: bool,
}

type Answer = oneshot::Sender<Result<Response<Full<Bytes>>, BoxError>>;

struct Item {
    custom_id: String,
    params: Value,
    tx: Answer,
}

struct Group {
    /// A request of the group: its method, headers and URI make the batch calls.
    head: http::request::Parts,
    items: Vec<Item>,
    bytes: usize,
}

/// Sends deferrable requests through the Message Batches API. See the [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct BatchLayer {
    shared: Arc<Shared>,
}

impl fmt::Debug for BatchLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchLayer")
            .field("config", &self.shared.config)
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

    fn from_config(config: Config) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                groups: Arc::new(Groups::new()),
                next: AtomicU64::new(0),
                stats: Stats::default(),
                live: Mutex::new(Vec::new()),
            }),
        }
    }

    fn with(self, f: impl FnOnce(&mut Config)) -> Self {
        let mut c = self.shared.config.clone();
        f(&mut c);
        Self::from_config(c)
    }

    /// Defer every request, marked or not. Builder methods start fresh shared state.
    pub fn all(self, on: bool) -> Self {
        self.with(|c| c.all = on)
    }

    /// At most `n` requests a batch (1 to 100 000).
    pub fn max_requests(self, n: usize) -> Self {
        self.with(|c| c.max_requests = n.clamp(1, Self::API_MAX_REQUESTS))
    }

    /// At most `n` bytes of requests a batch (up to 256 MB).
    pub fn max_bytes(self, n: usize) -> Self {
        self.with(|c| c.max_bytes = n.clamp(1, Self::API_MAX_BYTES))
    }

    /// How long a batch waits for more requests after its first.
    pub fn max_wait(self, d: Duration) -> Self {
        self.with(|c| c.max_wait = d)
    }

    /// A read-only view of the layer's state.
    pub fn handle(&self) -> BatchHandle {
        BatchHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<S> Layer<S> for BatchLayer {
    type Service = Batch<S>;

    fn layer(&self, inner: S) -> Batch<S> {
        Batch {
            inner,
            shared: self.shared.clone(),
        }
    }
}

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
#[derive(Clone)]
pub struct Batch<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for Batch<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch").field("inner", &self.inner).finish()
    }
}

/// The future of [`Batch`].
pub type BatchFuture<ResB> =
    Pin<Box<dyn Future<Output = Result<Response<BatchBody<ResB>>, BoxError>> + Send>>;

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
            return Box::pin(async move {
                let res = inner.oneshot(req).await.map_err(Into::into)?;
                Ok(res.map(Either::Left))
            });
        };
        if params.get("stream").and_then(Value::as_bool) == Some(true) {
            return Box::pin(async {
                Err(Box::new(BatchError::new(Kind::Streaming, "")) as BoxError)
            });
        }
        let (tx, rx) = oneshot::channel();
        let (parts, _) = req.into_parts();
        self.shared.clone().add(inner, parts, params, tx);
        Box::pin(async move {
            let res = rx
                .await
                .map_err(|_| BatchError::new(Kind::Failed, "abandoned before it answered"))??;
            Ok(res.map(Either::Right))
        })
    }
}

/// The group a request joins: same scheme and host, key and `anthropic-*` headers.
fn group_key(parts: &http::request::Parts) -> String {
    let mut key = format!(
        "{}://{}\n",
        parts.uri.scheme_str().unwrap_or(""),
        parts.uri.authority().map_or("", |a| a.as_str())
    );
    for (name, value) in &parts.headers {
        let n = name.as_str();
        if n == "x-api-key" || n == "authorization" || n.starts_with("anthropic-") {
            key.push_str(n);
            key.push(':');
            key.push_str(&String::from_utf8_lossy(value.as_bytes()));
            key.push('\n');
        }
    }
    key
}

impl Shared {
    fn live(&self) -> MutexGuard<'_, Vec<BatchStatus>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Updates a live batch's entry.
    fn update(&self, id: &str, f: impl FnOnce(&mut BatchStatus)) {
        if let Some(b) = self.live().iter_mut().find(|b| b.id == id) {
            f(b);
        }
    }

    fn add<S: PackInner<B>, B: PackRequestBody>(
        self: Arc<Self>,
        inner: S,
        parts: http::request::Parts,
        params: Value,
        tx: Answer,
    ) {
        let c = &self.config;
        let key = group_key(&parts);
        let size = params.to_string().len() + 64;
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let shared = self.clone();
        let send = move |g| submit(inner.clone(), shared.clone(), g);
        self.groups.add(
            &key,
            c.max_wait,
            send,
            |g| g.bytes + size > c.max_bytes,
            || {
                let mut head = Request::new(()).into_parts().0;
                head.method = parts.method;
                head.uri = parts.uri;
                head.headers = parts.headers;
                Group {
                    head,
                    items: Vec::new(),
                    bytes: 0,
                }
            },
            |g| {
                g.bytes += size;
                g.items.push(Item {
                    custom_id: format!("tq-{n}"),
                    params,
                    tx,
                });
                self.stats.queued.fetch_add(1, Ordering::SeqCst);
                g.items.len() >= c.max_requests
            },
        );
    }
}

/// The URI of `path` on the host of `head`.
fn uri(head: &http::request::Parts, path: &str) -> Option<Uri> {
    let mut parts = head.uri.clone().into_parts();
    parts.path_and_query = Some(path.parse().ok()?);
    Uri::from_parts(parts).ok()
}

/// A request to the batch endpoints with the group's headers.
fn call<B: From<Bytes>>(
    head: &http::request::Parts,
    method: http::Method,
    path: &str,
    body: Bytes,
) -> Option<Request<B>> {
    let mut req = Request::new(B::from(body));
    *req.method_mut() = method;
    *req.uri_mut() = uri(head, path)?;
    *req.headers_mut() = head.headers.clone();
    req.headers_mut().remove(http::header::CONTENT_LENGTH);
    Some(req)
}

/// A response read whole.
async fn read<S: PackInner<B>, B: PackRequestBody>(
    inner: S,
    req: Request<B>,
) -> Result<(http::response::Parts, Bytes), BoxError> {
    let res = inner.oneshot(req).await.map_err(Into::into)?;
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.map_err(Into::into)?.to_bytes();
    Ok((parts, bytes))
}

fn fail_all(callers: HashMap<String, Answer>, e: &str) {
    for (_, tx) in callers {
        let _ = tx.send(Err(Box::new(BatchError::new(Kind::Failed, e.to_owned()))));
    }
}

/// The create call's body, `{"requests":[{"custom_id":..,"params":..},..]}`, written straight
/// from the items; each item's parsed request is dropped as it is written, so nothing of the
/// requests but their `custom_id`s outlives the submission (a batch lives for hours).
fn create_body(items: Vec<Item>, bytes: usize) -> (Bytes, HashMap<String, Answer>) {
    let mut body = Vec::with_capacity(bytes + 16);
    let mut callers = HashMap::with_capacity(items.len());
    body.extend_from_slice(b"{\"requests\":[");
    for (k, item) in items.into_iter().enumerate() {
        if k > 0 {
            body.push(b',');
        }
        body.extend_from_slice(b"{\"custom_id\":");
        serde_json::to_writer(&mut body, &item.custom_id).expect("a string serializes");
        body.extend_from_slice(b",\"params\":");
        serde_json::to_writer(&mut body, &item.params).expect("a JSON value serializes");
        body.push(b'}');
        callers.insert(item.custom_id, item.tx);
    }
    body.extend_from_slice(b"]}");
    (Bytes::from(body), callers)
}

/// Submits a batch, polls it, and answers its callers from its results.
async fn submit<S: PackInner<B>, B: PackRequestBody>(inner: S, shared: Arc<Shared>, group: Group) {
    let stats = &shared.stats;
    stats.queued.fetch_sub(group.items.len(), Ordering::SeqCst);
    // A caller that gave up before submission is left out.
    let items: Vec<Item> = group
        .items
        .into_iter()
        .filter(|i| !i.tx.is_closed())
        .collect();
    if items.is_empty() {
        return;
    }
    let n = items.len();
    let (body, mut callers) = create_body(items, group.bytes);
    let head = group.head;
    let Some(req) = call::<B>(&head, http::Method::POST, "/v1/messages/batches", body) else {
        return fail_all(callers, "the request's URI has no host to send a batch to");
    };
    let (parts, bytes) = match read(inner.clone(), req).await {
        Ok(r) => r,
        Err(e) => return fail_all(callers, &e.to_string()),
    };
    if !parts.status.is_success() {
        // The create call's own answer (after the stack inside gave up), to every caller.
        for (_, tx) in callers {
            let _ = tx.send(Ok(collect::copy_of(&parts, &bytes)));
        }
        return;
    }
    let batch: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let Some(id) = batch["id"].as_str().map(str::to_owned) else {
        return fail_all(callers, "the create call's answer has no batch id");
    };
    stats.submitted.fetch_add(1, Ordering::Relaxed);
    stats.in_flight.fetch_add(1, Ordering::SeqCst);
    shared.live().push(BatchStatus {
        id: id.clone(),
        requests: n,
        counts: RequestCounts {
            processing: n as u64,
            ..RequestCounts::default()
        },
        delivering: false,
    });
    tracing::debug!(batch = %id, requests = n, "batch: submitted");
    let ended = poll(inner.clone(), &shared, &head, &id, &mut callers).await;
    if let Some(results_url) = ended {
        deliver(inner, &shared, &head, &id, &results_url, &mut callers).await;
    }
    for (_, tx) in callers {
        let _ = tx.send(Err(Box::new(BatchError::new(
            Kind::Failed,
            format!("batch {id} gave no result for this request"),
        ))));
    }
    shared.live().retain(|b| b.id != id);
    stats.in_flight.fetch_sub(1, Ordering::SeqCst);
}

/// Polls until the batch ends: its results URL, or `None` when every caller left (it is then
/// canceled).
async fn poll<S: PackInner<B>, B: PackRequestBody>(
    inner: S,
    shared: &Shared,
    head: &http::request::Parts,
    id: &str,
    callers: &mut HashMap<String, Answer>,
) -> Option<String> {
    let c = &shared.config;
    let mut wait = c.first_poll;
    loop {
        let jitter = wait.mul_f64(0.1 * rand::random::<f64>());
        tokio::time::sleep(wait + jitter).await;
        wait = wait.mul_f64(1.5).min(c.max_poll);
        callers.retain(|_, tx| !tx.is_closed());
        if callers.is_empty() {
            let path = format!("/v1/messages/batches/{id}/cancel");
            if let Some(req) = call::<B>(head, http::Method::POST, &path, Bytes::from_static(b"{}"))
            {
                let _ = read(inner.clone(), req).await;
            }
            shared.stats.canceled.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(batch = %id, "batch: every caller gone, canceled");
            return None;
        }
        let path = format!("/v1/messages/batches/{id}");
        let req = call::<B>(head, http::Method::GET, &path, Bytes::new())?;
        shared.stats.polls.fetch_add(1, Ordering::Relaxed);
        let Ok((parts, bytes)) = read(inner.clone(), req).await else {
            continue;
        };
        let ctx = crate::signals::ParseContext::now(&crate::signals::SystemClock);
        if let Some(after) = crate::signals::Signals::parse(&parts.headers, &ctx)
            .hint()
            .map(|h| h.delay)
        {
            // Never earlier than the endpoint asked.
            wait = wait.max(after);
        }
        if !parts.status.is_success() {
            continue;
        }
        let batch: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        tracing::trace!(batch = %id, counts = %batch["request_counts"], "batch: polled");
        let ended = batch["processing_status"] == "ended";
        if let Some(counts) = RequestCounts::from_json(&batch["request_counts"]) {
            shared.update(id, |b| {
                b.counts = counts;
                b.delivering = ended;
            });
        }
        if ended {
            let url = batch["results_url"].as_str().map_or_else(
                || format!("/v1/messages/batches/{id}/results"),
                str::to_owned,
            );
            tracing::debug!(batch = %id, "batch: ended");
            return Some(url);
        }
    }
}

/// Reads the results file line by line as it arrives and answers each caller.
async fn deliver<S: PackInner<B>, B: PackRequestBody>(
    inner: S,
    shared: &Shared,
    head: &http::request::Parts,
    id: &str,
    results_url: &str,
    callers: &mut HashMap<String, Answer>,
) {
    let path = match results_url.parse::<Uri>() {
        Ok(u) => u
            .path_and_query()
            .map_or(results_url.to_owned(), |p| p.to_string()),
        Err(_) => results_url.to_owned(),
    };
    let Some(req) = call::<B>(head, http::Method::GET, &path, Bytes::new()) else {
        return;
    };
    let Ok(res) = inner.oneshot(req).await else {
        return;
    };
    if !res.status().is_success() {
        return;
    }
    let headers = res.headers().clone();
    let mut body = std::pin::pin!(res.into_body());
    let mut line = BytesMut::new();
    loop {
        let frame = match body.frame().await {
            Some(Ok(f)) => f,
            Some(Err(_)) | None => break,
        };
        let Ok(mut data) = frame.into_data() else {
            continue;
        };
        let chunk = data.copy_to_bytes(data.remaining());
        for piece in chunk.split_inclusive(|&b| b == b'\n') {
            line.extend_from_slice(piece);
            if line.ends_with(b"\n") {
                answer(shared, id, &headers, &line, callers);
                line.clear();
            }
        }
    }
    if !line.is_empty() {
        answer(shared, id, &headers, &line, callers);
    }
}

use bytes::Buf as _;

/// Answers the caller of one results line.
fn answer(
    shared: &Shared,
    id: &str,
    headers: &http::HeaderMap,
    line: &[u8],
    callers: &mut HashMap<String, Answer>,
) {
    let Ok(v) = serde_json::from_slice::<Value>(line) else {
        return;
    };
    let Some(tx) = v["custom_id"].as_str().and_then(|c| callers.remove(c)) else {
        return;
    };
    let custom_id = v["custom_id"].as_str().unwrap_or_default().to_owned();
    let result = &v["result"];
    let (status, body) = match result["type"].as_str() {
        Some("succeeded") => (StatusCode::OK, result["message"].clone()),
        Some("errored") => {
            let error = &result["error"];
            let kind = error["error"]["type"].as_str().unwrap_or("api_error");
            (status_of(kind), error.clone())
        }
        Some("canceled") => {
            let _ = tx.send(Err(Box::new(BatchError::new(Kind::Canceled, ""))));
            return;
        }
        _ => {
            let _ = tx.send(Err(Box::new(BatchError::new(Kind::Expired, ""))));
            return;
        }
    };
    let mut res = Response::new(Full::new(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if let Some(r) = headers.get("request-id") {
        res.headers_mut().insert("request-id", r.clone());
    }
    res.extensions_mut().insert(Batched {
        batch_id: id.to_owned(),
        custom_id,
    });
    if tx.send(Ok(res)).is_ok() {
        shared.stats.delivered.fetch_add(1, Ordering::Relaxed);
    }
}

/// The HTTP status `/v1/messages` answers an error of this type with.
fn status_of(kind: &str) -> StatusCode {
    let code = match kind {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "billing_error" => 402,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "overloaded_error" => 529,
        "timeout_error" => 504,
        _ => 500,
    };
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}
