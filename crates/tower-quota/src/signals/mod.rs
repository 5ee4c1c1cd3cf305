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

mod parse;

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

/// A reset value before it is turned into a duration.
#[derive(Clone, Copy, Debug)]
enum Reset {
    In(Duration),
    At(SystemTime),
}

#[derive(Clone, Copy, Debug, Default)]
struct RawBucket {
    limit: Option<u64>,
    remaining: Option<u64>,
    reset: Option<Reset>,
}

/// One dialect's buckets, kept apart so that precedence between dialects is applied once at the end.
#[derive(Default)]
struct Raw<'a> {
    retry_after_ms: Option<Duration>,
    retry_after: Option<&'a str>,
    date: Option<&'a str>,
    should_retry: Option<bool>,
    anthropic: [RawBucket; 4],
    openai: [RawBucket; 4],
    generic: RawBucket,
    ietf_limit: Option<&'a str>,
    ietf_policy: Option<&'a str>,
}

impl<'a> Raw<'a> {
    fn take(&mut self, name: &str, value: &'a str) {
        // Header names from `http` are lowercase already.
        if let Some(rest) = name.strip_prefix("anthropic-ratelimit-") {
            let (bucket, field) = match rest.rsplit_once('-') {
                Some(split) => split,
                None => return,
            };
            let b = match bucket {
                "requests" => Bucket::Requests,
                "tokens" => Bucket::Tokens,
                "input-tokens" => Bucket::InputTokens,
                "output-tokens" => Bucket::OutputTokens,
                _ => return,
            };
            let slot = &mut self.anthropic[b.index()];
            match field {
                "limit" => keep(&mut slot.limit, parse::uint(value)),
                "remaining" => keep(&mut slot.remaining, parse::uint(value)),
                "reset" => keep(&mut slot.reset, parse::rfc3339(value).map(Reset::At)),
                _ => {}
            }
            return;
        }
        if let Some(rest) = name.strip_prefix("x-ratelimit-") {
            let openai = |b: &str| match b {
                "requests" => Some(Bucket::Requests),
                "tokens" => Some(Bucket::Tokens),
                _ => None,
            };
            match rest {
                "limit" => keep(&mut self.generic.limit, parse::uint(value)),
                "remaining" => keep(&mut self.generic.remaining, parse::uint(value)),
                "reset" => keep(&mut self.generic.reset, generic_reset(value)),
                _ => {
                    if let Some(b) = rest.strip_prefix("limit-").and_then(openai) {
                        keep(&mut self.openai[b.index()].limit, parse::uint(value));
                    } else if let Some(b) = rest.strip_prefix("remaining-").and_then(openai) {
                        keep(&mut self.openai[b.index()].remaining, parse::uint(value));
                    } else if let Some(b) = rest.strip_prefix("reset-").and_then(openai) {
                        keep(
                            &mut self.openai[b.index()].reset,
                            parse::go_duration(value).map(Reset::In),
                        );
                    }
                }
            }
            return;
        }
        match name {
            "retry-after"
                if parse::delta_seconds(value).is_some() || parse::http_date(value).is_some() =>
            {
                self.retry_after = Some(value);
            }
            "retry-after-ms" => keep(&mut self.retry_after_ms, parse::millis(value)),
            "x-should-retry" => keep(&mut self.should_retry, parse::boolean(value)),
            "date" => self.date = Some(value),
            "ratelimit" => self.ietf_limit = Some(value),
            "ratelimit-policy" => self.ietf_policy = Some(value),
            // The widespread pre-structured-field draft: `RateLimit-Limit/Remaining/Reset`.
            "ratelimit-limit" => self.generic.limit = self.generic.limit.or(parse::uint(value)),
            "ratelimit-remaining" => {
                self.generic.remaining = self.generic.remaining.or(parse::uint(value))
            }
            "ratelimit-reset" => {
                self.generic.reset = self
                    .generic
                    .reset
                    .or(parse::delta_seconds(value).map(Reset::In))
            }
            _ => {}
        }
    }

    fn finish(self, received_at: Instant, wall: &dyn Fn() -> SystemTime) -> Signals {
        // Dates are measured against the server's own clock when it sent one.
        // Parsed only when some value is a date.
        let reference = std::cell::OnceCell::new();
        let resolve = |r: Reset| match r {
            Reset::In(d) => d,
            Reset::At(t) => {
                let now = reference
                    .get_or_init(|| self.date.and_then(parse::http_date).unwrap_or_else(wall));
                t.duration_since(*now).unwrap_or(Duration::ZERO)
            }
        };

        let retry_after = if let Some(delay) = self.retry_after_ms {
            Some(RetryHint {
                delay,
                source: HintSource::RetryAfterMs,
            })
        } else if let Some(v) = self.retry_after {
            if let Some(delay) = parse::delta_seconds(v) {
                Some(RetryHint {
                    delay,
                    source: HintSource::RetryAfterSeconds,
                })
            } else {
                parse::http_date(v).map(|t| RetryHint {
                    delay: resolve(Reset::At(t)),
                    source: HintSource::RetryAfterDate,
                })
            }
        } else {
            None
        };

        // Precedence between dialects: the provider's own headers, then the IETF fields, then the
        // generic ones. Within a bucket, fields are filled independently.
        let mut buckets = [BucketState::default(); 4];
        let mut merge = |b: Bucket, raw: &RawBucket| {
            let s = &mut buckets[b.index()];
            s.limit = s.limit.or(raw.limit);
            s.remaining = s.remaining.or(raw.remaining);
            s.reset = s.reset.or(raw.reset.map(resolve));
        };
        for b in Bucket::ALL {
            merge(b, &self.anthropic[b.index()]);
            merge(b, &self.openai[b.index()]);
        }
        if let Some(ietf) = self.ietf_limit.and_then(|l| ietf(l, self.ietf_policy)) {
            merge(Bucket::Requests, &ietf);
        }
        merge(Bucket::Requests, &self.generic);

        Signals {
            received_at,
            retry_after,
            should_retry: self.should_retry,
            buckets,
        }
    }
}

/// Stores a parsed value; a value that did not parse never erases one that did (a server that sends
/// a header twice, once garbled, keeps its good value).
fn keep<T>(slot: &mut Option<T>, parsed: Option<T>) {
    if parsed.is_some() {
        *slot = parsed;
    }
}

/// `x-ratelimit-reset`: a unix timestamp or delta seconds, depending on the server. A value past
/// 2001-09-09 (1e9 seconds) cannot be a sensible delta and is read as a timestamp.
fn generic_reset(value: &str) -> Option<Reset> {
    let secs = parse::uint(value)?;
    if secs >= 1_000_000_000 {
        SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_secs(secs))
            .map(Reset::At)
    } else {
        Some(Reset::In(Duration::from_secs(secs)))
    }
}

/// The IETF `RateLimit` field (`"default";r=50;t=30`), with `RateLimit-Policy`
/// (`"default";q=100;w=60`) for the quota. Only request quotas are kept (`qu` absent or
/// `"requests"`); of several, the one with the least remaining binds. `None` if nothing usable.
fn ietf(limit: &str, policy: Option<&str>) -> Option<RawBucket> {
    use sfv::{BareItem, List, ListEntry, Parser};

    fn int(v: &BareItem) -> Option<u64> {
        v.as_integer()
            .and_then(|i| u64::try_from(i64::from(i)).ok())
    }
    fn name(item: &sfv::Item) -> Option<String> {
        match &item.bare_item {
            BareItem::String(s) => Some(s.as_str().to_owned()),
            BareItem::Token(t) => Some(t.as_str().to_owned()),
            _ => None,
        }
    }

    let policies: List = policy
        .and_then(|p| Parser::new(p).parse().ok())
        .unwrap_or_default();
    let quota_of = |n: &Option<String>| -> (Option<u64>, bool) {
        for entry in &policies {
            let ListEntry::Item(item) = entry else {
                continue;
            };
            if name(item) != *n {
                continue;
            }
            let mut q = None;
            let mut requests = true;
            for (k, v) in &item.params {
                match k.as_str() {
                    "q" => q = int(v),
                    "qu" => requests = matches!(v, BareItem::String(s) if s.as_str() == "requests"),
                    _ => {}
                }
            }
            return (q, requests);
        }
        (None, true)
    };

    let limits: List = Parser::new(limit).parse().ok()?;
    let mut best: Option<RawBucket> = None;
    for entry in &limits {
        let ListEntry::Item(item) = entry else {
            continue;
        };
        let (mut r, mut t) = (None, None);
        for (k, v) in &item.params {
            match k.as_str() {
                "r" => r = int(v),
                "t" => t = int(v),
                _ => {}
            }
        }
        let (q, requests) = quota_of(&name(item));
        if !requests || (r.is_none() && t.is_none()) {
            continue;
        }
        let candidate = RawBucket {
            limit: q,
            remaining: r,
            reset: t.map(|s| Reset::In(Duration::from_secs(s))),
        };
        let better = match &best {
            None => true,
            Some(b) => candidate.remaining.unwrap_or(u64::MAX) < b.remaining.unwrap_or(u64::MAX),
        };
        if better {
            best = Some(candidate);
        }
    }
    best
}

#[cfg(test)]
mod tests;
