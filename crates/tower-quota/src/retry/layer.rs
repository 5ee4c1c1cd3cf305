use super::BackoffRetry;
use super::backoff::{Backoff, Jitter};
use crate::context::QuotaContext;
use crate::util::Configured;
use rand::rngs::SmallRng;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::retry::budget::{Budget, TpsBudget};

pub(crate) struct Shared {
    pub(crate) backoff: Backoff,
    pub(crate) max_retries: u32,
    pub(crate) max_hinted_retries: u32,
    pub(crate) deadline: Option<Duration>,
    pub(crate) max_hint_wait: Option<Duration>,
    pub(crate) hint_jitter: Duration,
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) budget: Option<Arc<dyn Budget + Send + Sync>>,
    pub(crate) ctx: QuotaContext,
    pub(crate) rng: Mutex<SmallRng>,
    pub(crate) stats: Arc<StatsInner>,
}

impl Shared {
    /// A random delay in `[0, max]`.
    pub(crate) fn draw(&self, max: Duration) -> Duration {
        if max.is_zero() {
            return Duration::ZERO;
        }
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        max.mul_f64(rand::Rng::random::<f64>(&mut *rng))
    }

    /// The backoff before retry number `n` (from 0), after a delay of `previous`.
    pub(crate) fn backoff_delay(&self, n: u32, previous: Duration) -> Duration {
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        self.backoff.delay(n, previous, &mut *rng)
    }
}

#[derive(Debug, Default)]
pub(crate) struct StatsInner {
    pub(crate) calls: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) gave_up: AtomicU64,
}

/// A cheap, read-only view of a retry layer's counters, shared by all its services.
#[derive(Clone, Debug)]
pub struct RetryHandle(Arc<StatsInner>);

impl RetryHandle {
    /// Calls made through the layer.
    pub fn calls(&self) -> u64 {
        self.0.calls.load(Ordering::Relaxed)
    }

    /// Retries sent (attempts after the first).
    pub fn retries(&self) -> u64 {
        self.0.retries.load(Ordering::Relaxed)
    }

    /// Calls that ended on a retryable failure the layer gave up on.
    pub fn gave_up(&self) -> u64 {
        self.0.gave_up.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct Config {
    backoff: Backoff,
    max_retries: u32,
    max_hinted_retries: u32,
    deadline: Option<Duration>,
    max_hint_wait: Option<Duration>,
    hint_jitter: Duration,
    attempt_timeout: Option<Duration>,
    budget: Option<Arc<dyn Budget + Send + Sync>>,
    ctx: QuotaContext,
    seed: Option<u64>,
}

/// Retries what is retryable, with exponential backoff and jitter, waiting for the server's hint
/// when it gives one. See the [module docs](super).
///
/// # Clone and configuration
///
/// Clones share the retry budget, the random source and the counters, and so do all the services
/// the layer makes. They are made on the layer's first use (its first service or
/// [`handle`](Self::handle)); a setter called after that panics (the services and handles made
/// would not see it): configure the layer, then clone and use it.
#[derive(Clone)]
#[must_use]
pub struct BackoffRetryLayer {
    inner: Configured<Config, Shared>,
}

impl BackoffRetryLayer {
    /// Default retries after the first attempt: 5, as the seed recipe (the SDKs use 2, which gives
    /// up inside a minute-long cooldown).
    pub const DEFAULT_MAX_RETRIES: u32 = 5;
    /// Default retries that follow a server hint (a 429 or 503 that said when to come back): 20.
    /// They are counted apart from `max_retries`: a hinted 429 is the server pacing the client,
    /// not a failure, and under contention a request can meet several in a row while its
    /// neighbours take the freed capacity; counting them as failures would drop requests the
    /// server was about to serve. The retry budget and the deadline still bound them.
    pub const DEFAULT_MAX_HINTED_RETRIES: u32 = 20;
    /// Default cap on a hinted wait: 5 minutes, the same as
    /// [`RetryAfterLayer::DEFAULT_MAX_WAIT`](crate::retry_after::RetryAfterLayer::DEFAULT_MAX_WAIT).
    pub const DEFAULT_MAX_HINT_WAIT: Duration = Duration::from_secs(300);
    /// The per-attempt timeout the presets set: 10 minutes, the official SDKs' default. A
    /// non-streaming Messages call answers only when the whole reply is written, which takes
    /// minutes for a large `max_tokens`; a stream's headers come at once.
    pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(600);
    /// Default jitter after a hinted instant: up to 100 ms (jitter only ever adds to a hint).
    pub const DEFAULT_HINT_JITTER: Duration = Duration::from_millis(100);

    /// The defaults: [`Backoff::default`] (1 s base doubling to a 60 s cap, plus uniform(0, 1 s)),
    /// 5 backoff retries and 20 hinted ones, no deadline, hinted waits up to 5 minutes plus up to 100 ms of jitter, a retry
    /// budget of 20 % of recent calls plus 10 retries/s over a 10 s window (tower's
    /// [`TpsBudget`], Envoy's 20 %), and the default [`QuotaContext`].
    pub fn new() -> Self {
        Self::from_config(Config {
            backoff: Backoff::default(),
            max_retries: Self::DEFAULT_MAX_RETRIES,
            max_hinted_retries: Self::DEFAULT_MAX_HINTED_RETRIES,
            deadline: None,
            max_hint_wait: Some(Self::DEFAULT_MAX_HINT_WAIT),
            hint_jitter: Self::DEFAULT_HINT_JITTER,
            attempt_timeout: None,
            budget: Some(Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2))),
            ctx: QuotaContext::new(),
            seed: None,
        })
    }

    /// The backoff.
    ///
    /// # Panics
    ///
    /// This setter and [`base`](Self::base), [`max_delay`](Self::max_delay),
    /// [`jitter`](Self::jitter) and [`hint_jitter`](Self::hint_jitter) panic if a duration is
    /// over an hour: a per-minute quota refills in a minute, and a longer pause is a mistake
    /// better refused here than met in a request.
    #[track_caller]
    pub fn backoff(self, backoff: Backoff) -> Self {
        self.with(|c| c.backoff = backoff)
    }

    /// The first delay (`base` of the backoff).
    #[track_caller]
    pub fn base(self, base: Duration) -> Self {
        self.with(|c| c.backoff.base = base)
    }

    /// The cap on the exponential part of the delay.
    #[track_caller]
    pub fn max_delay(self, max: Duration) -> Self {
        self.with(|c| c.backoff.max = max)
    }

    /// The jitter mode.
    #[track_caller]
    pub fn jitter(self, jitter: Jitter) -> Self {
        self.with(|c| c.backoff.jitter = jitter)
    }

    /// Retries after the first attempt that wait a computed backoff (0: never retry those).
    #[track_caller]
    pub fn max_retries(self, n: u32) -> Self {
        self.with(|c| c.max_retries = n)
    }

    /// Retries that wait for the server's hinted instant (see
    /// [`DEFAULT_MAX_HINTED_RETRIES`](Self::DEFAULT_MAX_HINTED_RETRIES)).
    #[track_caller]
    pub fn max_hinted_retries(self, n: u32) -> Self {
        self.with(|c| c.max_hinted_retries = n)
    }

    /// A deadline for the whole call, from when it starts: no retry starts after it. A request can
    /// carry its own [`Deadline`](super::Deadline) too; the earlier one wins. It does not cut an
    /// attempt short (that is a timeout layer's job).
    #[track_caller]
    pub fn deadline(self, total: Option<Duration>) -> Self {
        self.with(|c| c.deadline = total)
    }

    /// The longest hinted wait to sleep through; past it the call fails fast with
    /// [`GiveUp::HintTooLong`](super::GiveUp::HintTooLong). `None`: no cap.
    #[track_caller]
    pub fn max_hint_wait(self, cap: Option<Duration>) -> Self {
        self.with(|c| c.max_hint_wait = cap)
    }

    /// How long one attempt may wait for its response (its headers: a streaming body that stalls
    /// later is not cut here), or `None` (the layer's default: no timeout; the presets set
    /// [`DEFAULT_ATTEMPT_TIMEOUT`](Self::DEFAULT_ATTEMPT_TIMEOUT)). An attempt past it is dropped
    /// (the request is cancelled) and counts as a transport timeout
    /// ([`tower::timeout::error::Elapsed`]): retried like one, and the source of the
    /// [`RetryError`](super::error::RetryError) when the loop gives up.
    #[track_caller]
    pub fn attempt_timeout(self, timeout: Option<Duration>) -> Self {
        self.with(|c| c.attempt_timeout = timeout)
    }

    /// The largest random delay added after a hinted instant.
    #[track_caller]
    pub fn hint_jitter(self, max: Duration) -> Self {
        self.with(|c| c.hint_jitter = max)
    }

    /// The retry budget (any tower [`Budget`]); shared by every clone and service of the layer.
    #[track_caller]
    pub fn retry_budget(self, budget: impl Budget + Send + Sync + 'static) -> Self {
        self.with(|c| c.budget = Some(Arc::new(budget)))
    }

    /// No retry budget: only `max_retries` and the deadline bound the retries.
    #[track_caller]
    pub fn no_retry_budget(self) -> Self {
        self.with(|c| c.budget = None)
    }

    /// The shared context: its classifier says which results are retried, its wall clock reads
    /// HTTP-dates without a `Date` header. Give every layer of a stack the same one.
    #[track_caller]
    pub fn context(self, ctx: QuotaContext) -> Self {
        self.with(|c| c.ctx = ctx)
    }

    /// Seeds the jitter's random source (for reproducible tests).
    #[track_caller]
    pub fn seed(self, seed: u64) -> Self {
        self.with(|c| c.seed = Some(seed))
    }

    /// The layer's counters.
    pub fn handle(&self) -> RetryHandle {
        RetryHandle(self.shared().stats.clone())
    }
}

impl Default for BackoffRetryLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for BackoffRetryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.inner.config();
        f.debug_struct("BackoffRetryLayer")
            .field("backoff", &c.backoff)
            .field("max_retries", &c.max_retries)
            .field("max_hinted_retries", &c.max_hinted_retries)
            .field("deadline", &c.deadline)
            .field("max_hint_wait", &c.max_hint_wait)
            .field("hint_jitter", &c.hint_jitter)
            .field("budget", &c.budget.is_some())
            .field("stats", &self.inner.made().map(|s| &s.stats))
            .finish()
    }
}

configured_layer!(
    BackoffRetryLayer => BackoffRetry,
    make: |c| Shared {
        backoff: c.backoff,
        max_retries: c.max_retries,
        max_hinted_retries: c.max_hinted_retries,
        deadline: c.deadline,
        max_hint_wait: c.max_hint_wait,
        hint_jitter: c.hint_jitter,
        attempt_timeout: c.attempt_timeout,
        budget: c.budget.clone(),
        ctx: c.ctx.clone(),
        rng: Mutex::new(crate::util::small_rng(c.seed)),
        stats: Arc::new(StatsInner::default()),
    },
    check: |c: &Config| {
        c.backoff.check();
        super::backoff::check_setting("hint jitter", c.hint_jitter);
    }
);
