//! Cap the requests in flight: fixed, or adaptive to the server's back-pressure.
//!
//! # Why
//!
//! A program that launches every request at once turns a quota into a wall of 429s, and a fixed
//! semaphore picked by hand ("15 should be fine") is either too small to use the quota or too big to
//! stay under it when the server slows down. The limit should follow the server: grow while every
//! slot is busy and the server keeps up, shrink when it pushes back.
//!
//! # What it does
//!
//! - A **fixed** limit, or an **adaptive** AIMD one ([`Aimd`]): +1 per round trip while the limit is
//!   reached without back-pressure; times `decrease_ratio` (default 0.9) on a 429, a 529/503 or a
//!   timeout, at most once per round trip; within `min` and `max`.
//! - One limit shared by **all clones** of the service and every service the layer makes; or one
//!   per partition (API key) with an optional global cap ([`ConcurrencyLimitLayer::per_partition`],
//!   [`ConcurrencyLimitLayer::global_cap`]).
//! - Waiters are served **FIFO** (tokio's fair semaphore).
//! - The slot travels **inside the response body** ([`ConcurrencyBody`]) and is released when the
//!   body ends or is dropped, so a 60-second stream holds its slot for 60 seconds. Dropping the
//!   future returns the slot too.
//! - Outcomes are measured **per attempt**: stacked inside
//!   [`BackoffRetryLayer`](crate::retry::BackoffRetryLayer), it sees every 429, not a whole retry
//!   sequence as one slow round trip (Vector's adaptive concurrency misses back-pressure outside
//!   the retry loop, vector#26123).
//!
//! # Differences from tower's `ConcurrencyLimit`
//!
//! - tower's limit is fixed; this one can adapt.
//! - tower releases the slot when the response future completes; this one holds it until the
//!   response *body* ends, which is when the server's work ends for a streaming response.
//! - tower's `ConcurrencyLimitLayer` gives every service it makes its own semaphore (only
//!   `GlobalConcurrencyLimitLayer` shares one); here every service from one layer, and every clone,
//!   always shares the limit, and the limit can be per partition with a global cap. A
//!   per-partition slot is taken in `call` (or waited for in the response future) rather than in
//!   `poll_ready`, because the partition is known only from the request.
//! - Errors become [`BoxError`](crate::BoxError) and responses carry a [`ConcurrencyBody`].
//!
//! # Example
//!
//! ```
//! use http::{Request, Response};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_quota::concurrency::{Aimd, ConcurrencyLimitLayer};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let layer = ConcurrencyLimitLayer::adaptive(Aimd { initial: 4, ..Aimd::default() });
//! let handle = layer.handle();
//! let svc = ServiceBuilder::new().layer(layer).service(service_fn(|_: Request<()>| async {
//!     Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
//! }));
//! let res = svc.oneshot(Request::new(())).await.unwrap();
//! assert_eq!(handle.in_flight(), 1); // the body still holds the slot
//! drop(res);
//! assert_eq!(handle.in_flight(), 0);
//! # }
//! ```

mod body;
pub mod future;
mod layer;
mod limiter;
mod service;
mod slots;

pub use body::ConcurrencyBody;
pub use layer::{ConcurrencyHandle, ConcurrencyLimitLayer};
pub use limiter::Aimd;
pub use service::ConcurrencyLimit;

#[cfg(test)]
mod tests;
