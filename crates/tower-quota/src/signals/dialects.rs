//! The dialect engine: every rate-limit header a response may carry, read into one raw record per
//! dialect (Anthropic, OpenAI, IETF `RateLimit`, the generic `x-ratelimit-*`), then merged with one
//! precedence rule into a [`Signals`] snapshot.

use super::parse;
use super::{Bucket, BucketState, HintSource, RetryHint, Signals};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

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
pub(super) struct Raw<'a> {
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
    pub(super) fn take(&mut self, name: &str, value: &'a str) {
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

    pub(super) fn finish(self, received_at: Instant, wall: &dyn Fn() -> SystemTime) -> Signals {
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
