//! What the layers' errors have in common.
//!
//! Each layer that adds a failure has its own small error type, opaque with `is_*()` and accessor
//! methods ([`RetryError`](crate::retry::error::RetryError),
//! [`WaitTooLong`](crate::retry_after::error::WaitTooLong),
//! [`BudgetError`](crate::budget::BudgetError)); a layer that adds none passes its inner
//! service's error on. Their `Display` says what happened without repeating the cause (that is
//! `source()`'s job) and without reading the clock, so an error prints the same every time.
//!
//! Three of them can mean "come back at T": a hint past the retry's cap or a deadline, a gate
//! closed past its cap, a budget that would admit the request only past its cap. [`retry_at`]
//! finds that instant in any of them, wherever it sits in an error's source chain, so a server
//! that answers its own clients (an axum handler) can turn any of them into `429` with a
//! `Retry-After`.
//!
//! ```
//! use std::time::Duration;
//! use tower::{Layer, ServiceExt, service_fn};
//! use tower_quota::retry_after::RetryAfterLayer;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let gate = RetryAfterLayer::new().max_wait(Some(Duration::from_secs(60)));
//! let svc = gate.layer(service_fn(|_: http::Request<()>| async {
//!     Ok::<_, std::io::Error>(
//!         http::Response::builder().status(429).header("retry-after", "600").body(()).unwrap(),
//!     )
//! }));
//! let req = || http::Request::builder().header("x-api-key", "sk-1").body(()).unwrap();
//! svc.clone().oneshot(req()).await.unwrap(); // closes the gate for 10 minutes
//! let err = svc.oneshot(req()).await.unwrap_err();
//! let at = tower_quota::retry_at(&*err).unwrap();
//! assert!(at >= tokio::time::Instant::now() + Duration::from_secs(599));
//! # }
//! ```

use crate::partition::PartitionKey;
use std::error::Error as StdError;
use std::fmt;
use tokio::time::Instant;

/// A queue of one of this crate's layers already held as many requests of the partition as it
/// may: the request was refused at once, without waiting, so a flood cannot grow memory without
/// bound. [`retry_at`](Self::retry_at) estimates when the queue will have room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueFull {
    queue: &'static str,
    partition: PartitionKey,
    waiting: usize,
    retry_at: Instant,
}

impl QueueFull {
    pub(crate) fn new(
        queue: &'static str,
        partition: PartitionKey,
        waiting: usize,
        retry_at: Instant,
    ) -> Self {
        Self {
            queue,
            partition,
            waiting,
            retry_at,
        }
    }

    /// The partition whose queue was full (a key fingerprint, never the key).
    pub fn partition(&self) -> PartitionKey {
        self.partition
    }

    /// The requests that were waiting in it.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// An estimate of when the queue will have room (the time the requests ahead need, at the
    /// rate the layer knows).
    pub fn retry_at(&self) -> Instant {
        self.retry_at
    }
}

impl fmt::Display for QueueFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the {} queue of partition {} already holds {} requests: refused without waiting",
            self.queue, self.partition, self.waiting
        )
    }
}

impl StdError for QueueFull {}

/// The instant a request refused by one of this crate's layers could be sent: from a
/// [`RetryError`](crate::retry::error::RetryError) (a hint past the cap, a deadline), a
/// [`WaitTooLong`](crate::retry_after::error::WaitTooLong), a
/// [`BudgetError`](crate::budget::BudgetError) or a [`QueueFull`], found anywhere in `error`'s
/// source chain. `None` when no error of the chain says.
pub fn retry_at(error: &(dyn StdError + 'static)) -> Option<Instant> {
    let mut next = Some(error);
    while let Some(e) = next {
        let at = if let Some(r) = e.downcast_ref::<crate::retry::error::RetryError>() {
            r.retry_at()
        } else if let Some(w) = e.downcast_ref::<crate::retry_after::error::WaitTooLong>() {
            Some(w.retry_at())
        } else if let Some(b) = e.downcast_ref::<crate::budget::BudgetError>() {
            b.retry_at()
        } else {
            e.downcast_ref::<QueueFull>().map(QueueFull::retry_at)
        };
        if at.is_some() {
            return at;
        }
        next = e.source();
    }
    None
}
