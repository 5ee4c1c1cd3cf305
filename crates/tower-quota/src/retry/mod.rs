//! Retry what is retryable, with exponential backoff and jitter, and never before the server's time.
//!
//! # Why
//!
//! A wave of 429s is made worse by clients that retry at once (no backoff), that retry in lockstep
//! (no jitter: tower 0.5's `ExponentialBackoff` with its default random source gives every request
//! the same delay), that ignore the `Retry-After` the server sent, or that retry without bound so a
//! fleet amplifies an outage. The official SDKs fix some of it, but cap a hinted wait at 60 or 120 s
//! and silently fall back to an 8 s backoff beyond it, which turns a 3-minute reset into a burst
//! of doomed retries.
//!
//! # What it does
//!
//! - Retries the results the [classifier](crate::classify) calls retryable (429, 529/503, other
//!   5xx, 408, 409, connection failures and timeouts; `x-should-retry` overrides), never a fatal
//!   one (a 400 for a prompt over the context window is never retried).
//! - Waits `min(max, base * 2^attempt)` shaped by a [`Jitter`] (default: plus uniform(0, 1 s), the
//!   seed recipe; also full, equal and decorrelated). When the server named an instant (a
//!   [`RetryAt`](crate::retry_after::RetryAt) from an inner
//!   [`RetryAfterLayer`](crate::retry_after::RetryAfterLayer), else the response's own
//!   [`Signals`](crate::signals::Signals)), that instant replaces the backoff for that attempt: the
//!   wait ends at or after it, never before, plus a small jitter.
//! - Is bounded by `max_retries` (default 5) backoff retries and `max_hinted_retries` (default
//!   20) retries that waited for the server's hint (a hinted 429 is pacing, not failure), a deadline (per layer and per request, via
//!   [`Deadline`]), a cap on a hinted wait (default 5 minutes), and a retry budget shared by every
//!   clone (tower's [`TpsBudget`](tower::retry::budget::TpsBudget): 20 % of recent calls plus a
//!   floor of 10/s) so that retries cannot multiply an outage.
//! - Replays request bodies: in-memory bodies directly
//!   ([`InMemoryBody`](crate::body::InMemoryBody)), others through
//!   [`ReplayBodyLayer`](crate::body::ReplayBodyLayer). A request whose body cannot be replayed is sent once, and the caller
//!   learns it was not retried and why.
//! - Never drops a request silently. When it gives up, the caller gets the last response, tagged
//!   with a [`RetryReport`] that says why, or a [`RetryError`](error::RetryError) when the last
//!   failure was a transport error or when the wait would pass the hint cap or the deadline (with
//!   the `retry_at` instant).
//! - Calls `poll_ready` on (a clone of) the inner service before every attempt; drops the response
//!   of a failed attempt before sleeping, so its connection goes back to the pool or is closed.
//! - Emits a `tracing` event for every decision (attempt, outcome, delay and its source).
//!
//! # Where it goes
//!
//! Outermost: one retry loop per call, and every attempt passes the inner layers again (budget,
//! concurrency, Retry-After gate), paying its cost exactly as the server counts it. Its own errors
//! ([`RetryError`](error::RetryError)) are classified as fatal, so a second retry layer outside it
//! does not multiply attempts.
//!
//! # Example
//!
//! ```
//! use http::{Request, Response};
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_quota::retry::{BackoffRetryLayer, RetryReport};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let calls = Arc::new(AtomicUsize::new(0));
//! let counter = calls.clone();
//! let svc = ServiceBuilder::new()
//!     .layer(BackoffRetryLayer::new().max_retries(3).seed(7))
//!     .service(service_fn(move |_req: Request<String>| {
//!         let n = counter.fetch_add(1, Ordering::SeqCst);
//!         async move {
//!             let status = if n < 2 { 503 } else { 200 };
//!             Ok::<_, std::convert::Infallible>(Response::builder().status(status).body(()).unwrap())
//!         }
//!     }));
//! let start = tokio::time::Instant::now();
//! let res = svc.oneshot(Request::new("hello".to_string())).await.unwrap();
//! assert_eq!(res.status(), 200);
//! let report = res.extensions().get::<RetryReport>().unwrap();
//! assert_eq!(report.attempts, 3);
//! // 1 s + jitter, then 2 s + jitter.
//! assert!(start.elapsed() >= Duration::from_secs(3));
//! # }
//! ```

mod backoff;
pub mod error;
pub mod future;
mod layer;
mod policy;
mod service;

pub(crate) use backoff::check_setting;
pub use backoff::{Backoff, Jitter};
pub use error::GiveUp;
pub use layer::{BackoffRetryLayer, RetryHandle};
pub use service::BackoffRetry;

use std::time::Duration;
use tokio::time::Instant;

/// A per-request deadline: put it in the request's extensions, and no retry of that request starts
/// after it. The earlier of it and the layer's own deadline wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline(pub Instant);

/// What the retry loop did, in the extensions of the response it returns (when it retried or gave
/// up).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryReport {
    /// Attempts sent, the first included.
    pub attempts: u32,
    /// The wait before each retry.
    pub delays: Vec<Duration>,
    /// Why it stopped while the response was still a retryable failure; `None` if it succeeded
    /// (or ended on a non-retryable response) after retrying.
    pub gave_up: Option<GiveUp>,
}

#[cfg(test)]
mod tests;
