//! Honour the server's word: wait as long as it says, and make every caller of the key wait too.
//!
//! # Why
//!
//! A 429 usually says how long to wait: `Retry-After` (seconds or an HTTP-date),
//! `retry-after-ms`, or a reset header of the bucket that ran dry. Clients that ignore it retry into
//! more 429s; clients that honour it only for the one request that got it leave every other task on
//! the same API key hammering the server during the cooldown. The quota belongs to the key, so the
//! pause must too.
//!
//! # What it does
//!
//! - After each response that the classifier deems retryable (429, 529/503, other 5xx, 408, 409),
//!   it reads the hint from the parsed [`Signals`](crate::signals::Signals) (Retry-After wins; else
//!   the reset of an exhausted bucket) and closes the *gate* of the request's partition (by default
//!   a fingerprint of the API key, never the key) until that instant, or later if the gate already
//!   is closed for longer.
//! - It puts a [`RetryAt`] in the response's extensions, so an outer
//!   [`BackoffRetryLayer`](crate::retry::BackoffRetryLayer) waits for exactly that instant instead
//!   of its own backoff.
//! - Every request (new ones and retries, from every task sharing the layer) first waits at its
//!   partition's gate. Waits end at or after the server's instant, never before, plus a small
//!   random jitter (default up to 100 ms) so the waiters do not all arrive in the same millisecond.
//! - A wait longer than the cap (default 5 minutes; `None` for no cap) fails fast with
//!   [`WaitTooLong`](error::WaitTooLong), which carries `retry_at`, instead of sleeping for days.
//!
//! # Where it goes
//!
//! Last before the wire (innermost). A request that queued in a budget or concurrency layer while a
//! 429 arrived must still not leave during the cooldown, and waiting here holds no slot of the
//! layers outside. With [`BackoffRetryLayer`](crate::retry::BackoffRetryLayer) outside it, the retry
//! sleeps until the gate's instant and then passes the open gate: attempts do not multiply and
//! waits do not add up. Alone, it still protects every caller of the key; the 429 itself is
//! returned to the caller that got it.
//!
//! # Example
//!
//! ```
//! use http::{Request, Response};
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_quota::retry_after::{RetryAfterLayer, RetryAt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let layer = RetryAfterLayer::new().max_wait(Some(Duration::from_secs(60)));
//! let svc = ServiceBuilder::new().layer(layer.clone()).service(service_fn(|_req: Request<()>| async {
//!     Ok::<_, std::convert::Infallible>(
//!         Response::builder().status(429).header("retry-after", "3").body(()).unwrap(),
//!     )
//! }));
//! let req = || Request::builder().header("x-api-key", "sk-example").body(()).unwrap();
//! let res = svc.clone().oneshot(req()).await.unwrap();
//! let at = res.extensions().get::<RetryAt>().unwrap().at;
//! // Every caller of this key now waits until `at` before its request leaves.
//! let start = tokio::time::Instant::now();
//! svc.oneshot(req()).await.unwrap();
//! assert!(tokio::time::Instant::now() >= at);
//! assert!(start.elapsed() >= Duration::from_secs(3));
//! # }
//! ```

pub mod error;
pub mod future;
mod gate;
mod layer;
mod service;

pub use crate::hint::{RetryAt, RetrySource};
pub use layer::{RetryAfterHandle, RetryAfterLayer};
pub use service::RetryAfter;
