use super::RetryAfter;
use super::gate::Shared;
use crate::context::QuotaContext;
use crate::partition::PartitionKey;
use crate::util::Configured;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Honours the server's word: reads `Retry-After`, `retry-after-ms` and the exhausted buckets'
/// resets, and pauses the whole partition until then. See the [module docs](super).
///
/// # Clone and configuration
///
/// Clones share one set of gates, and so do all the services the layer makes. The gates are made
/// on the layer's first use (its first service or [`handle`](Self::handle)); a setter called after
/// that panics (the services and handles made would not see it): configure the layer, then clone
/// and use it.
#[derive(Clone)]
#[must_use]
pub struct RetryAfterLayer {
    inner: Configured<Config, Shared>,
}

/// What a [`RetryAfterLayer`] was configured with.
#[derive(Clone)]
pub(super) struct Config {
    pub(super) ctx: QuotaContext,
    pub(super) max_wait: Option<Duration>,
    pub(super) jitter: Duration,
    pub(super) inferred: Option<Duration>,
    pub(super) seed: Option<u64>,
    pub(super) max_queue: usize,
}

impl RetryAfterLayer {
    /// Default bound on the requests waiting at one partition's gate: 10 000 (a waiter costs
    /// about 250 bytes beyond its request).
    pub const DEFAULT_MAX_QUEUE: usize = 10_000;

    /// Default cap on one wait: 5 minutes. Real resets run to a few minutes (Anthropic's have been
    /// seen at ~171 s, past the SDKs' 60 s cap); a longer hint is better reported than slept on.
    pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(300);
    /// Default jitter after a gate opens: up to 100 ms, enough to spread a herd of waiters over a
    /// few refill ticks without costing noticeable time.
    pub const DEFAULT_JITTER: Duration = Duration::from_millis(100);

    /// Default first inferred cooldown after a 429 with no hint at all: 250 ms, doubling with
    /// each further one (up to 30 s) until a request succeeds. Short, because the gate reopens
    /// slowly anyway; enough to stop a herd from learning the server's pace one 429 at a time.
    pub const DEFAULT_INFERRED_COOLDOWN: Duration = Duration::from_millis(250);

    /// Gates keyed by the default [`QuotaContext`] (API key fingerprints, the default classifier, the system
    /// clock for HTTP-dates without a `Date` header, a 5-minute cap and up to 100 ms of jitter.
    pub fn new() -> Self {
        Self::from_config(Config {
            ctx: QuotaContext::new(),
            max_wait: Some(Self::DEFAULT_MAX_WAIT),
            jitter: Self::DEFAULT_JITTER,
            inferred: Some(Self::DEFAULT_INFERRED_COOLDOWN),
            max_queue: Self::DEFAULT_MAX_QUEUE,
            seed: None,
        })
    }

    /// The longest a request may wait at a gate; a longer hint fails fast with
    /// [`WaitTooLong`](super::error::WaitTooLong). `None`: no cap (wait as long as the server says).
    #[track_caller]
    pub fn max_wait(self, cap: Option<Duration>) -> Self {
        self.with(|c| c.max_wait = cap)
    }

    /// The largest random delay added after a gate opens (drawn per waiting request).
    ///
    /// # Panics
    ///
    /// If `max` is over an hour (a mistake better refused here than met in a request).
    #[track_caller]
    pub fn jitter(self, max: Duration) -> Self {
        crate::retry::check_setting("gate jitter", max);
        self.with(|c| c.jitter = max)
    }

    /// The first cooldown inferred after a 429 without any hint (`None`: such a 429 closes no
    /// gate, and only the retry layer's backoff paces its own request).
    #[track_caller]
    pub fn inferred_cooldown(self, base: Option<Duration>) -> Self {
        self.with(|c| c.inferred = base)
    }

    /// Seeds the jitter's random source (for reproducible tests).
    #[track_caller]
    pub fn seed(self, seed: u64) -> Self {
        self.with(|c| c.seed = Some(seed))
    }

    /// The shared context: its partitioner keys the gates, its classifier says which responses
    /// may close one (pushed back or failed: [`Outcome::is_retryable_by_default`](crate::classify::Outcome::is_retryable_by_default)) and which 429s
    /// ([`Outcome::RateLimited`](crate::classify::Outcome::RateLimited)) infer a pause, its wall clock reads HTTP-dates without a `Date`
    /// header. Give every layer of a stack the same one.
    #[track_caller]
    pub fn context(self, ctx: QuotaContext) -> Self {
        self.with(|c| c.ctx = ctx)
    }

    /// How many requests may wait at one partition's gate at once (default
    /// [`DEFAULT_MAX_QUEUE`](Self::DEFAULT_MAX_QUEUE)); one more fails at once with
    /// [`QueueFull`](crate::error::QueueFull), whose `retry_at` is the gate's instant.
    #[track_caller]
    pub fn max_queue(self, bound: usize) -> Self {
        self.with(|c| c.max_queue = bound)
    }

    /// A read-only view of the layer's gates.
    pub fn handle(&self) -> RetryAfterHandle {
        RetryAfterHandle {
            shared: self.shared(),
        }
    }
}

/// A cheap, read-only view of a [`RetryAfterLayer`]'s gates, shared by all its services.
#[derive(Clone)]
pub struct RetryAfterHandle {
    shared: Arc<Shared>,
}

impl RetryAfterHandle {
    /// When the gate of `partition` opens, if it is closed now.
    pub fn cooldown_until(&self, partition: PartitionKey) -> Option<Instant> {
        self.shared.gate(partition, Instant::now())
    }

    /// Partitions with a gate now (closed, reopening, or counting 429s without a hint).
    pub fn gates(&self) -> usize {
        self.shared.gates()
    }
}

impl fmt::Debug for RetryAfterHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryAfterHandle")
            .field("gates", &self.gates())
            .finish()
    }
}

impl Default for RetryAfterLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for RetryAfterLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryAfterLayer")
            .field("max_wait", &self.inner.config().max_wait)
            .field("jitter", &self.inner.config().jitter)
            .field("gates", &self.inner.made().map_or(0, |s| s.gates()))
            .finish()
    }
}

configured_layer!(RetryAfterLayer => RetryAfter, make: Shared::new);
