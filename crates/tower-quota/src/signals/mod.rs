//! Server signals: one parser for every rate-limit header dialect.
//!
//! # Why one parser
//!
//! Servers say how long to wait and how much quota is left in half a dozen dialects: `Retry-After`
//! (seconds or an HTTP-date in three forms), `retry-after-ms`, `x-should-retry`, Anthropic's
//! `anthropic-ratelimit-*`, OpenAI's `x-ratelimit-*` with Go-style durations, the generic
//! `x-ratelimit-*`, and the IETF `RateLimit` / `RateLimit-Policy` structured fields. Every layer of
//! this crate needs the same facts from them, so they are read once, into a [`Signals`] snapshot that
//! is cached in the response extensions ([`Signals::of`]) and shared by every layer that looks.
//!
//! # Rules
//!
//! - Malformed, negative, non-finite, non-UTF-8 or overflowing values are ignored; parsing never
//!   panics and never fails. A huge but valid value is kept: capping is the layers' decision.
//! - `retry-after-ms` wins over `retry-after`; both win over every reset header (the IETF draft says
//!   so for its `t`, and the same reasoning holds for the provider dialects).
//! - An HTTP-date or an RFC 3339 reset is measured against the response's own `Date` header when it
//!   has one, so a client whose clock is off does not wait too long or too little; without `Date`
//!   it is measured against a [`WallClock`] (injectable for tests). A date in the past means "now".
//! - Every delay is also anchored to a [`tokio::time::Instant`] taken when the response was parsed
//!   ([`Signals::received_at`]), so waits run on tokio's clock and work under paused time.
//!
//! # Example
//!
//! ```
//! use http::Response;
//! use std::time::Duration;
//! use tower_quota::signals::{Bucket, Signals};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let mut res = Response::builder()
//!     .status(429)
//!     .header("retry-after", "16")
//!     .header("anthropic-ratelimit-input-tokens-limit", "200000")
//!     .header("anthropic-ratelimit-input-tokens-remaining", "0")
//!     .body(())
//!     .unwrap();
//! let signals = Signals::of(&mut res);
//! assert_eq!(signals.hint().unwrap().delay, Duration::from_secs(16));
//! assert_eq!(signals.exhausted().collect::<Vec<_>>(), [Bucket::InputTokens]);
//! # }
//! ```

mod dialects;
mod parse;

use dialects::Raw;

use http::{HeaderMap, Response};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// A source of wall-clock time, used to measure HTTP-dates and RFC 3339 resets when a response has
/// no `Date` header. Inject one to test clock skew; the default is [`SystemClock`].
pub trait WallClock: Send + Sync + 'static {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

impl<F> WallClock for F
where
    F: Fn() -> SystemTime + Send + Sync + 'static,
{
    fn now(&self) -> SystemTime {
        self()
    }
}

/// When a response is parsed: the tokio instant the delays are anchored to, and the wall-clock time
/// dates are measured against when the response carries no `Date` header.
#[derive(Clone, Copy, Debug)]
pub struct ParseContext {
    /// The tokio instant the response was received.
    pub received_at: Instant,
    /// The client's wall-clock time at `received_at`.
    pub wall: SystemTime,
}

impl ParseContext {
    /// Now, on tokio's clock and the given wall clock.
    pub fn now(wall: &dyn WallClock) -> Self {
        Self {
            received_at: Instant::now(),
            wall: wall.now(),
        }
    }
}

/// One of the quota buckets a provider reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Bucket {
    /// Requests per window (Anthropic and OpenAI `requests`, generic and IETF request quotas).
    Requests,
    /// Combined tokens per window (Anthropic `tokens`, OpenAI `tokens`).
    Tokens,
    /// Input tokens per minute (Anthropic ITPM).
    InputTokens,
    /// Output tokens per minute (Anthropic OTPM).
    OutputTokens,
}

impl Bucket {
    /// Every bucket, in a fixed order.
    pub const ALL: [Bucket; 4] = [
        Bucket::Requests,
        Bucket::Tokens,
        Bucket::InputTokens,
        Bucket::OutputTokens,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Bucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Bucket::Requests => "requests",
            Bucket::Tokens => "tokens",
            Bucket::InputTokens => "input tokens",
            Bucket::OutputTokens => "output tokens",
        })
    }
}

/// What the server said about one bucket. Each field is `None` when not sent or not understood.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BucketState {
    /// The bucket's capacity (`*-limit`).
    pub limit: Option<u64>,
    /// What is left now (`*-remaining`).
    pub remaining: Option<u64>,
    /// How long from [`Signals::received_at`] until the bucket resets (`*-reset`).
    pub reset: Option<Duration>,
}

impl BucketState {
    /// Whether the server says nothing is left.
    pub fn is_exhausted(&self) -> bool {
        self.remaining == Some(0)
    }

    fn is_empty(&self) -> bool {
        self.limit.is_none() && self.remaining.is_none() && self.reset.is_none()
    }
}

/// Where a retry hint came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HintSource {
    /// `retry-after-ms`.
    RetryAfterMs,
    /// `Retry-After` as delta-seconds.
    RetryAfterSeconds,
    /// `Retry-After` as an HTTP-date.
    RetryAfterDate,
    /// The reset of an exhausted bucket (any dialect).
    BucketReset(Bucket),
}

/// A server's word on how long to wait, measured from [`Signals::received_at`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryHint {
    /// How long to wait.
    pub delay: Duration,
    /// Which header said so.
    pub source: HintSource,
}

/// The normalized snapshot of a response's rate-limit headers.
#[derive(Clone, Debug)]
pub struct Signals {
    received_at: Instant,
    retry_after: Option<RetryHint>,
    should_retry: Option<bool>,
    buckets: [BucketState; 4],
}

/// The cached snapshot in a response's extensions.
#[derive(Clone, Debug)]
struct Cached(Arc<Signals>);

impl Signals {
    /// Parses `headers`. Never fails: whatever is not understood is left out.
    pub fn parse(headers: &HeaderMap, ctx: &ParseContext) -> Self {
        Self::parse_at(headers, ctx.received_at, &|| ctx.wall)
    }

    /// Parses `headers` received at `received_at`, reading the wall clock only if a date needs it
    /// and the response has no `Date` header.
    pub(crate) fn parse_at(
        headers: &HeaderMap,
        received_at: Instant,
        wall: &dyn Fn() -> SystemTime,
    ) -> Self {
        let mut raw = Raw::default();
        for (name, value) in headers {
            // Non-UTF-8 and non-visible-ASCII values fail here and are ignored.
            let Ok(value) = value.to_str() else { continue };
            raw.take(name.as_str(), value);
        }
        raw.finish(received_at, wall)
    }

    /// Parses `headers` received now, measuring dates against `wall` when there is no `Date`.
    pub(crate) fn parse_now(headers: &HeaderMap, wall: &dyn WallClock) -> Self {
        Self::parse_at(headers, Instant::now(), &|| wall.now())
    }

    /// The snapshot cached in `res`, parsed now (on tokio's clock and the system clock) if it is not
    /// there yet.
    pub fn of<B>(res: &mut Response<B>) -> Arc<Signals> {
        Self::of_with(res, &SystemClock)
    }

    /// As [`Signals::of`], measuring dates against `wall` when the response has no `Date` header.
    pub fn of_with<B>(res: &mut Response<B>, wall: &dyn WallClock) -> Arc<Signals> {
        if let Some(Cached(s)) = res.extensions().get::<Cached>() {
            return s.clone();
        }
        let s = Arc::new(Self::parse_now(res.headers(), wall));
        res.extensions_mut().insert(Cached(s.clone()));
        s
    }

    /// The cached snapshot, if some layer already parsed this response.
    pub fn cached<B>(res: &Response<B>) -> Option<Arc<Signals>> {
        res.extensions().get::<Cached>().map(|c| c.0.clone())
    }

    /// The tokio instant every delay in this snapshot is measured from.
    pub fn received_at(&self) -> Instant {
        self.received_at
    }

    /// The explicit `retry-after-ms` or `Retry-After` hint, if any (`retry-after-ms` wins).
    pub fn retry_after(&self) -> Option<RetryHint> {
        self.retry_after
    }

    /// The server's hint: the explicit Retry-After when present, else the latest reset among the
    /// exhausted buckets (the request cannot pass before all of them refill).
    pub fn hint(&self) -> Option<RetryHint> {
        self.retry_after.or_else(|| {
            Bucket::ALL
                .iter()
                .filter_map(|&b| {
                    let s = self.bucket(b);
                    Some((s.reset?, b)).filter(|_| s.is_exhausted())
                })
                .max()
                .map(|(delay, b)| RetryHint {
                    delay,
                    source: HintSource::BucketReset(b),
                })
        })
    }

    /// The instant the server's hint points to ([`Signals::hint`] anchored at
    /// [`Signals::received_at`]); `None` without a hint or if the instant is out of range.
    pub fn retry_at(&self) -> Option<Instant> {
        self.received_at.checked_add(self.hint()?.delay)
    }

    /// `x-should-retry`, when the server sent it.
    pub fn should_retry(&self) -> Option<bool> {
        self.should_retry
    }

    /// What the server said about `bucket`.
    pub fn bucket(&self, bucket: Bucket) -> &BucketState {
        &self.buckets[bucket.index()]
    }

    /// The buckets the server says are exhausted (remaining 0), in [`Bucket::ALL`] order.
    pub fn exhausted(&self) -> impl Iterator<Item = Bucket> + '_ {
        Bucket::ALL
            .into_iter()
            .filter(|&b| self.bucket(b).is_exhausted())
    }

    /// Whether the response carried any rate-limit signal at all.
    pub fn is_empty(&self) -> bool {
        self.retry_after.is_none()
            && self.should_retry.is_none()
            && self.buckets.iter().all(BucketState::is_empty)
    }
}

#[cfg(test)]
mod tests;
