//! Admit exactly what the server will accept: requests, input tokens and output tokens per minute,
//! reserved before a request leaves and settled with what it really used.
//!
//! # Why
//!
//! Providers limit requests per minute *and* tokens per minute (Anthropic: input and output
//! separately), as continuously refilling buckets per API key. A client that counts requests but not
//! tokens, or that counts a request's `max_tokens` but never gives back what it did not use, is
//! refused or wastes quota. Existing tools each miss a part: tower's `RateLimit` is a fixed window
//! per service instance (clones do not share it) and counts requests only; governor's weighted
//! `check_n` cannot refund, cannot take more than its burst, and wakes its waiters in no order; the
//! OpenAI cookbook processor never reconciles its estimate; LiteLLM reconciles, but its distributed
//! check reads local memory only.
//!
//! # What it does
//!
//! 1. **Estimate** the request's [`Cost`]: a `Cost` the caller put in the request extensions wins;
//!    else the layer's [`Estimate`] (default [`MessagesEstimator`]: input tokens from the JSON
//!    body's text, output reserved as `max_tokens`; or any closure).
//! 2. **Reserve** it from every configured bucket of the request's partition (and of the global
//!    cap, if any) at once or not at all. Requests wait in **FIFO order** per partition: only the
//!    head of the queue asks the store, so a large request is not starved by small ones, and a
//!    shared store (Redis) is asked once per wait, not once per waiter. A request larger than a
//!    bucket's whole capacity fails fast with [`BudgetError`] naming the bucket and the excess.
//! 3. **Settle**: the response carries a [`ReservationHandle`]. The real usage (the response's
//!    `usage`, read as the body streams past, including at the end of an SSE stream; or reported by
//!    the caller through the handle) refunds or charges the difference. A reservation dropped
//!    unsettled keeps its estimate; a request that was never sent, or that the server refused
//!    (a 4xx or 5xx status, a connection that could not be made), gives everything back.
//! 4. **Learn** from the server: `*-limit` headers create the buckets the user did not configure,
//!    `*-remaining` pulls a bucket down to what the server says is left (never up), less the
//!    requests admitted here that the layers inside still hold (the server has not counted them
//!    yet), and a 429's hint pauses the partition in the store. The budget converges to the
//!    server's truth, and works with no limits configured at all. See *Limits that change or are
//!    shared* below.
//!
//! # Limits that change or are shared
//!
//! - **A limit that changes** (an organisation's tier moves): the bucket follows the new limit at
//!   once, keeping what remains (up to the new capacity). Keeping what was *used* instead, as
//!   this crate did before, turned a halved limit into a debt of the old capacity: a minute
//!   without sending and with no 429 to explain it.
//! - **A key shared with other clients**: the server's remaining count after each response is the
//!   truth about everybody's use. Over windows of a few seconds, the [`MemoryStore`] compares it
//!   with its own use and the refill; the difference is what others take, smoothed, and the
//!   bucket refills at the limit's rate less that. When the others stop, the estimate decays
//!   within about ten seconds. (The Redis store does not estimate this yet: a fleet sharing a key
//!   with clients outside it relies on the remaining counts and the gate.)
//! - **A server that sends no rate-limit headers**, only `retry-after`: the request rate is
//!   inferred from the 429s (between two of them the server's bucket went from empty to empty: the
//!   successes in between are its refill) and taught to the store as a learned limit, so the
//!   partition is paced instead of refused; it rises by 2 % every 10 s without a 429 to find a
//!   limit that grew. Measured in `tests/tests/learning.rs` and in BENCHMARKS.md.
//!
//! State lives behind the [`BudgetStore`] trait ([`store`] has what an implementation needs):
//! [`MemoryStore`] by default, a Redis store for many processes sharing one key (crate
//! `tower-quota-redis`). With the `conformance` feature, `conformance` holds the suite every
//! store must pass. Partitions (API key fingerprints by default) are tracked up to a bound; idle ones are
//! evicted, so a flood of distinct keys cannot grow memory without limit.
//!
//! # Where governor is used, and where not
//!
//! governor's GCRA is the right tool for "n per period, weight w, no refunds". The buckets here need
//! what it does not offer: an atomic all-or-none reservation across several buckets (governor's
//! limiters are independent: admitting in one and failing in the next cannot be undone), refunds
//! and extra charges (negative or positive adjustments after the fact), a cost larger than the
//! burst failing with its size, and FIFO waiting. So the buckets are plain continuously refilling
//! token buckets on tokio's clock. governor serves as the reference: a test checks that for unit
//! costs and no refunds the request bucket admits exactly what governor admits, with governor on
//! `clock::TokioClock` (feature `governor`) so both run on paused time.
//!
//! # Where it goes
//!
//! Inside [`BackoffRetryLayer`](crate::retry::BackoffRetryLayer) (each attempt pays its cost, as
//! the server counts it) and outside the concurrency limit and the Retry-After gate.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_quota::budget::{Limits, ReservationHandle, TokenBudgetLayer};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let budget = TokenBudgetLayer::new(Limits::new().rpm(50).itpm(30_000).otpm(8_000));
//! let svc = ServiceBuilder::new().layer(budget).service(service_fn(|_: Request<Full<Bytes>>| async {
//!     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
//!         br#"{"usage":{"input_tokens":12,"output_tokens":30}}"#,
//!     ))))
//! }));
//! let body = r#"{"model":"m","max_tokens":256,"messages":[{"role":"user","content":"Hello"}]}"#;
//! let res = svc.oneshot(Request::new(Full::new(Bytes::from(body)))).await.unwrap();
//! let handle = res.extensions().get::<ReservationHandle>().unwrap().clone();
//! assert_eq!(handle.estimate().output_tokens, 256);
//! // Reading the body to its end settles the reservation with the real usage.
//! use http_body_util::BodyExt;
//! res.into_body().collect().await.unwrap();
//! assert_eq!(handle.settled().unwrap().output_tokens, 30);
//! # }
//! ```

mod answer;
mod body;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod error;
mod estimate;
pub mod future;
mod infer;
mod layer;
mod reservation;
mod service;
mod shared;
pub mod store;
pub mod window;

pub use body::BudgetBody;
pub use error::BudgetError;
pub use estimate::{Estimate, MessagesEstimator};
pub use layer::{BudgetHandle, TokenBudgetLayer};
pub use reservation::ReservationHandle;
pub use service::TokenBudget;
pub use store::{BudgetStore, MemoryStore, Snapshot, StoreError};
pub use window::{ContextWindowError, ContextWindows, CountTokens, MaxTokensError};

pub use crate::signals::Bucket;

/// One bucket's limit: `per_minute` units a minute, refilled continuously, holding at most `burst`
/// (default: a minute's worth, as Anthropic's buckets do).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Limit {
    /// Units per minute.
    pub per_minute: u64,
    /// The bucket's capacity; `None` means `per_minute`.
    pub burst: Option<u64>,
}

impl Limit {
    /// `per_minute` a minute, with a minute's worth of burst.
    pub const fn per_minute(per_minute: u64) -> Self {
        Self {
            per_minute,
            burst: None,
        }
    }

    /// The bucket's capacity. A limit of 0 a minute holds nothing, whatever its burst: 0 means
    /// "refuse every request", in every store.
    pub fn capacity(&self) -> u64 {
        if self.per_minute == 0 {
            return 0;
        }
        self.burst.unwrap_or(self.per_minute)
    }

    /// Refill per second.
    pub fn rate_per_sec(&self) -> f64 {
        self.per_minute as f64 / 60.0
    }
}

/// The limits of one partition (or of the global cap). Any subset may be set; a bucket left unset
/// is learned from the server's `*-limit` headers, if it sends them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Limits {
    /// Requests per minute.
    pub requests: Option<Limit>,
    /// Input tokens per minute.
    pub input_tokens: Option<Limit>,
    /// Output tokens per minute.
    pub output_tokens: Option<Limit>,
    /// Combined (input + output) tokens per minute.
    pub tokens: Option<Limit>,
}

impl Limits {
    /// No limits: every bucket is learned from the server.
    pub const fn new() -> Self {
        Self {
            requests: None,
            input_tokens: None,
            output_tokens: None,
            tokens: None,
        }
    }

    /// Sets requests per minute.
    pub const fn rpm(mut self, n: u64) -> Self {
        self.requests = Some(Limit::per_minute(n));
        self
    }

    /// Sets input tokens per minute.
    pub const fn itpm(mut self, n: u64) -> Self {
        self.input_tokens = Some(Limit::per_minute(n));
        self
    }

    /// Sets output tokens per minute.
    pub const fn otpm(mut self, n: u64) -> Self {
        self.output_tokens = Some(Limit::per_minute(n));
        self
    }

    /// Sets combined tokens per minute.
    pub const fn tpm(mut self, n: u64) -> Self {
        self.tokens = Some(Limit::per_minute(n));
        self
    }

    /// The limit of `bucket`.
    pub fn get(&self, bucket: Bucket) -> Option<Limit> {
        match bucket {
            Bucket::Requests => self.requests,
            Bucket::Tokens => self.tokens,
            Bucket::InputTokens => self.input_tokens,
            Bucket::OutputTokens => self.output_tokens,
        }
    }

    /// Whether some bucket has no limit set (so it may have to be learned).
    pub fn has_unset(&self) -> bool {
        Bucket::ALL.iter().any(|&b| self.get(b).is_none())
    }

    /// Sets the limit of `bucket`.
    pub fn set(&mut self, bucket: Bucket, limit: Option<Limit>) {
        match bucket {
            Bucket::Requests => self.requests = limit,
            Bucket::Tokens => self.tokens = limit,
            Bucket::InputTokens => self.input_tokens = limit,
            Bucket::OutputTokens => self.output_tokens = limit,
        }
    }
}

/// What a request costs. Put one in the request extensions to override the estimator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Cost {
    /// Requests (normally 1).
    pub requests: u64,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens (the reservation: `max_tokens` until the real usage is known).
    pub output_tokens: u64,
}

impl Cost {
    /// One request with these token counts.
    pub const fn new(input_tokens: u64, output_tokens: u64) -> Self {
        Self {
            requests: 1,
            input_tokens,
            output_tokens,
        }
    }

    /// The amount this cost takes from `bucket`.
    pub fn of(&self, bucket: Bucket) -> u64 {
        match bucket {
            Bucket::Requests => self.requests,
            Bucket::Tokens => self.input_tokens.saturating_add(self.output_tokens),
            Bucket::InputTokens => self.input_tokens,
            Bucket::OutputTokens => self.output_tokens,
        }
    }
}

#[cfg(test)]
mod tests;
