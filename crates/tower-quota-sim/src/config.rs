//! The simulator's configuration.

use crate::fingerprint;
use std::fmt;
use std::time::Duration;

/// Per-minute limits for one API key. `None` means unlimited. Each limit is a token bucket whose
/// capacity is the per-minute limit (or `burst`, when set) refilled continuously at limit / 60 per
/// second, as Anthropic documents its limits.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Input tokens per minute.
    pub itpm: Option<u64>,
    /// Output tokens per minute. Admission needs `max_tokens` of it; the real output is debited.
    pub otpm: Option<u64>,
    /// Combined (input + output) tokens per minute.
    pub tpm: Option<u64>,
    /// Bucket capacity as a fraction of the per-minute limit (1.0 = a minute's worth, the default).
    pub burst_fraction: f64,
}

impl Limits {
    /// Anthropic-like limits: `rpm` requests, `itpm` input tokens and `otpm` output tokens a minute.
    pub fn new(rpm: u64, itpm: u64, otpm: u64) -> Self {
        Self {
            rpm: Some(rpm),
            itpm: Some(itpm),
            otpm: Some(otpm),
            tpm: None,
            burst_fraction: 1.0,
        }
    }

    /// No limits at all.
    pub fn unlimited() -> Self {
        Self {
            burst_fraction: 1.0,
            ..Self::default()
        }
    }
}

/// How a 429 says when to come back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RetryAfterStyle {
    /// `retry-after: <whole seconds, rounded up>` (Anthropic's own form).
    #[default]
    Seconds,
    /// `retry-after: <IMF-fixdate>`, rounded up to the next whole second.
    HttpDate,
    /// `retry-after-ms: <milliseconds, rounded up>`.
    Ms,
    /// No hint at all.
    None,
    /// A value no parser should accept (`retry-after: soon`, `retry-after-ms: NaN`).
    Garbage,
}

/// Which rate-limit headers every response carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Dialect {
    /// `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`.
    #[default]
    Anthropic,
    /// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` with Go-style durations.
    Openai,
    /// IETF `RateLimit-Policy` and `RateLimit` structured fields (request quota).
    Ietf,
    /// No rate-limit headers (Retry-After on a 429 is still sent, per the style).
    None,
}

/// Faults the simulator injects, each with its own probability (0.0 to 1.0), drawn from the seeded
/// random source.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    /// Answer 529 `overloaded_error` without looking at the quota.
    pub overload: f64,
    /// Answer 500 `api_error` without looking at the quota.
    pub server_error: f64,
    /// Admit the request, then drop the connection before the response (an `io::Error` of kind
    /// `ConnectionReset` in process; a closed connection over HTTP).
    pub reset: f64,
    /// Add `slow_delay` to the response time.
    pub slow: f64,
    /// The extra delay of a slow response.
    pub slow_delay: Duration,
    /// In a stream, replace the rest of the events with an SSE `error` event (`overloaded_error`)
    /// inside the HTTP 200.
    pub stream_error: f64,
    /// Add malformed rate-limit headers to every response (their well-formed twins still come).
    pub garbage_headers: bool,
}

/// How the simulator mangles the answers of a packed prompt (tower-quota's `pack` protocol:
/// `<item id="k">` in, `<answer id="k">` out), each drawn per answer. A packed reply longer than
/// the request's `max_tokens` is cut there (`stop_reason` `max_tokens`), as the model would be.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PackFaults {
    /// Leave the answer out.
    pub drop: f64,
    /// Give the answer twice (the second time with other text).
    pub duplicate: f64,
    /// Break the answer's tags (`<answer id="k?">` and no closing tag).
    pub garble: f64,
}

/// Another client of every key: it takes its share of the key's buckets continuously from `from`
/// until `until` (times since the simulator started), as a second application sharing the key
/// would. It is limited too: each share is kept below its limit.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Background {
    /// Requests a minute it sends.
    pub rpm: u64,
    /// Input tokens a minute it sends.
    pub itpm: u64,
    /// Output tokens a minute it receives.
    pub otpm: u64,
    /// When it starts.
    pub from: Duration,
    /// When it stops.
    pub until: Duration,
}

/// The simulator's whole configuration. Build it with [`SimConfig::new`] and the `with_*` methods.
#[derive(Clone)]
pub struct SimConfig {
    /// Limits for any key not listed in `keys`.
    pub limits: Limits,
    /// Limits for specific keys.
    pub keys: Vec<(String, Limits)>,
    /// How a 429 announces the wait.
    pub retry_after: RetryAfterStyle,
    /// Which rate-limit headers responses carry.
    pub dialect: Dialect,
    /// Injected faults.
    pub faults: Faults,
    /// Requests in flight beyond this many are answered 529 (a server-side concurrency cap).
    pub max_concurrency: Option<usize>,
    /// Requests the server works on at full speed at once (`None`: any number). Beyond it the
    /// server shares its time: a request admitted with `n` in flight (itself included) takes
    /// `n / capacity` times its latency, as a loaded server slows down before it refuses.
    pub service_capacity: Option<usize>,
    /// Time to the first byte of every admitted response.
    pub base_latency: Duration,
    /// Extra time per output token.
    pub per_output_token: Duration,
    /// The real output as a fraction of `max_tokens` (at least one token).
    pub output_fraction: f64,
    /// The context window: a prompt estimated above it gets a 400 (never retryable).
    pub context_window: u64,
    /// The largest `max_tokens` a request may ask for: above it a 400, worded as the real API's
    /// ("max_tokens: N > M, which is the maximum allowed number of output tokens for MODEL").
    pub max_output_tokens: u64,
    /// Requests a minute to `POST /v1/messages/count_tokens` per key, a limit of its own apart
    /// from the Messages buckets (`None`: unlimited). Over it, a 429 with the wait announced in
    /// the `retry_after` style.
    pub count_tokens_rpm: Option<u64>,
    /// A request that arrives this soon after a 429 is not counted as early: it may have been sent
    /// before the client saw the 429.
    pub early_grace: Duration,
    /// The seed of every random draw.
    pub seed: u64,
    /// Limits that change while it runs: at each time (since the simulator started), every key's
    /// limits become the given ones (what remains in a bucket stays, up to its new capacity; a
    /// bucket the new limits leave out is gone).
    pub limit_changes: Vec<(Duration, Limits)>,
    /// Another client sharing every key.
    pub background: Option<Background>,
    /// Faults in the answers to packed prompts.
    pub pack_faults: PackFaults,
    /// Requests a second the Message Batches API processes, per batch (simulated time).
    pub batch_rps: f64,
    /// Calls a minute per key to the Message Batches endpoints, a limit of their own (`None`:
    /// unlimited); over it, a 429 with the wait in the `retry_after` style.
    pub batch_rpm: Option<u64>,
    /// The most requests one key may have processing in batches (`None`: no limit); a batch
    /// that would pass it is refused with a 429.
    pub batch_queue: Option<u64>,
}

impl fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys are secrets: show their fingerprints only.
        let keys: Vec<(String, &Limits)> =
            self.keys.iter().map(|(k, l)| (fingerprint(k), l)).collect();
        f.debug_struct("SimConfig")
            .field("limits", &self.limits)
            .field("keys", &keys)
            .field("retry_after", &self.retry_after)
            .field("dialect", &self.dialect)
            .field("faults", &self.faults)
            .field("max_concurrency", &self.max_concurrency)
            .field("service_capacity", &self.service_capacity)
            .field("base_latency", &self.base_latency)
            .field("per_output_token", &self.per_output_token)
            .field("output_fraction", &self.output_fraction)
            .field("context_window", &self.context_window)
            .field("max_output_tokens", &self.max_output_tokens)
            .field("count_tokens_rpm", &self.count_tokens_rpm)
            .field("early_grace", &self.early_grace)
            .field("seed", &self.seed)
            .field("limit_changes", &self.limit_changes)
            .field("background", &self.background)
            .finish()
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        Self::new(Limits::new(50, 30_000, 8_000))
    }
}

impl SimConfig {
    /// A simulator with `limits` for every key, Anthropic headers, `retry-after` in seconds, 20 ms
    /// of latency, real output equal to `max_tokens`, no faults, seed 0.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            keys: Vec::new(),
            retry_after: RetryAfterStyle::Seconds,
            dialect: Dialect::Anthropic,
            faults: Faults::default(),
            max_concurrency: None,
            service_capacity: None,
            base_latency: Duration::from_millis(20),
            per_output_token: Duration::ZERO,
            output_fraction: 1.0,
            context_window: 200_000,
            max_output_tokens: 128_000,
            count_tokens_rpm: None,
            early_grace: Duration::from_millis(100),
            seed: 0,
            limit_changes: Vec::new(),
            background: None,
            pack_faults: PackFaults::default(),
            batch_rps: 100.0,
            batch_rpm: None,
            batch_queue: None,
        }
    }

    /// At `at` (since the simulator started), every key's limits become `limits`.
    pub fn with_limit_change(mut self, at: Duration, limits: Limits) -> Self {
        self.limit_changes.push((at, limits));
        self.limit_changes.sort_by_key(|&(t, _)| t);
        self
    }

    /// Another client sharing every key.
    pub fn with_background(mut self, background: Background) -> Self {
        self.background = Some(background);
        self
    }

    /// Gives `key` its own limits.
    pub fn with_key(mut self, key: impl Into<String>, limits: Limits) -> Self {
        self.keys.push((key.into(), limits));
        self
    }

    /// Sets the Retry-After style.
    pub fn with_retry_after(mut self, style: RetryAfterStyle) -> Self {
        self.retry_after = style;
        self
    }

    /// Sets the header dialect.
    pub fn with_dialect(mut self, dialect: Dialect) -> Self {
        self.dialect = dialect;
        self
    }

    /// Sets the faults in the answers to packed prompts.
    pub fn with_pack_faults(mut self, faults: PackFaults) -> Self {
        self.pack_faults = faults;
        self
    }

    /// Sets the injected faults.
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// Requests served at full speed at once; beyond, every request slows in proportion (see
    /// [`service_capacity`](Self::service_capacity)).
    ///
    /// # Panics
    ///
    /// If `capacity` is 0.
    pub fn with_service_capacity(mut self, capacity: usize) -> Self {
        assert!(capacity > 0, "a server serves at least one request at once");
        self.service_capacity = Some(capacity);
        self
    }

    /// Sets the server-side concurrency cap.
    pub fn with_max_concurrency(mut self, max: usize) -> Self {
        self.max_concurrency = Some(max);
        self
    }

    /// Sets the latency model: `base` plus `per_output_token` for each output token.
    pub fn with_latency(mut self, base: Duration, per_output_token: Duration) -> Self {
        self.base_latency = base;
        self.per_output_token = per_output_token;
        self
    }

    /// Sets the real output as a fraction of `max_tokens`.
    pub fn with_output_fraction(mut self, fraction: f64) -> Self {
        self.output_fraction = fraction;
        self
    }

    /// Sets the seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the early-arrival grace.
    pub fn with_early_grace(mut self, grace: Duration) -> Self {
        self.early_grace = grace;
        self
    }

    pub(crate) fn limits_for(&self, key: &str) -> Limits {
        self.keys
            .iter()
            .find(|(k, _)| k == key)
            .map_or(self.limits, |(_, l)| *l)
    }
}
