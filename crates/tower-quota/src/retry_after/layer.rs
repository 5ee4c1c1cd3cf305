use super::RetryAfter;
use crate::classify::{Classify, DefaultClassifier};
use crate::partition::{ApiKey, PartitionKey, Partitioner};
use crate::signals::{HintSource, Signals, SystemClock, WallClock};
use http::Response;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower::Layer;

/// The instant a partition may send again, put in the extensions of a response that carried a
/// server hint. [`BackoffRetry`](crate::retry::BackoffRetry) waits for it instead of its own backoff.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryAt {
    /// When the partition's gate opens: the later of the hint and any gate already closed.
    pub at: Instant,
    /// Which header said so.
    pub source: HintSource,
    /// The partition the gate belongs to.
    pub partition: PartitionKey,
}

/// Far enough to mean "not in this process's lifetime", short enough for every clock to hold.
const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 86_400);

pub(crate) struct Shared {
    gates: Mutex<HashMap<PartitionKey, Instant>>,
    pub(crate) partitioner: Arc<dyn Partitioner>,
    classifier: Arc<dyn Classify>,
    wall: Arc<dyn WallClock>,
    pub(crate) max_wait: Option<Duration>,
    jitter: Duration,
    rng: Mutex<SmallRng>,
}

impl Shared {
    /// When the partition's gate opens, if it is closed now.
    pub(crate) fn gate(&self, p: PartitionKey, now: Instant) -> Option<Instant> {
        let gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        gates.get(&p).copied().filter(|&until| until > now)
    }

    /// Closes the gate of `p` until `at` (or later, if it already is); returns when it opens.
    fn close(&self, p: PartitionKey, at: Instant, now: Instant) -> Instant {
        let mut gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        if gates.len() >= 1024 {
            // Forget the gates that are open again, so many keys cannot grow the map for ever.
            gates.retain(|_, until| *until > now);
        }
        let until = gates.entry(p).or_insert(at);
        *until = (*until).max(at);
        *until
    }

    /// A fresh jitter in `[0, jitter]`.
    pub(crate) fn draw_jitter(&self) -> Duration {
        if self.jitter.is_zero() {
            return Duration::ZERO;
        }
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        self.jitter.mul_f64(rng.random::<f64>())
    }

    /// Reads a response's hint; closes the gate and tags the response when there is one.
    pub(crate) fn observe<B>(&self, p: PartitionKey, res: &mut Response<B>) {
        let verdict = self
            .classifier
            .classify_response(res.status(), res.headers());
        if !verdict.outcome.is_retryable_by_default() {
            return;
        }
        let signals = Signals::of_with(res, &*self.wall);
        let Some(hint) = signals.hint() else { return };
        let received = signals.received_at();
        let at = received
            .checked_add(hint.delay)
            .unwrap_or(received + FAR_FUTURE);
        let until = self.close(p, at, received);
        tracing::debug!(
            partition = %p,
            status = res.status().as_u16(),
            delay_ms = hint.delay.as_millis() as u64,
            source = ?hint.source,
            "retry-after: gate closed"
        );
        res.extensions_mut().insert(RetryAt {
            at: until,
            source: hint.source,
            partition: p,
        });
    }
}

/// Honours the server's word: reads `Retry-After`, `retry-after-ms` and the exhausted buckets'
/// resets, and pauses the whole partition until then. See the [module docs](super).
///
/// # Clone
///
/// Clones share one set of gates, and so do all the services the layer makes.
#[derive(Clone)]
#[must_use]
pub struct RetryAfterLayer {
    shared: Arc<Shared>,
}

struct Config {
    partitioner: Arc<dyn Partitioner>,
    classifier: Arc<dyn Classify>,
    wall: Arc<dyn WallClock>,
    max_wait: Option<Duration>,
    jitter: Duration,
    seed: Option<u64>,
}

impl RetryAfterLayer {
    /// Default cap on one wait: 5 minutes. Real resets run to a few minutes (Anthropic's have been
    /// seen at ~171 s, past the SDKs' 60 s cap); a longer hint is better reported than slept on.
    pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(300);
    /// Default jitter after a gate opens: up to 100 ms, enough to spread a herd of waiters over a
    /// few refill ticks without costing noticeable time.
    pub const DEFAULT_JITTER: Duration = Duration::from_millis(100);

    /// Gates keyed by API key fingerprint ([`ApiKey`]), the [`DefaultClassifier`], the system
    /// clock for HTTP-dates without a `Date` header, a 5-minute cap and up to 100 ms of jitter.
    pub fn new() -> Self {
        Self::from_config(Config {
            partitioner: Arc::new(ApiKey),
            classifier: Arc::new(DefaultClassifier),
            wall: Arc::new(SystemClock),
            max_wait: Some(Self::DEFAULT_MAX_WAIT),
            jitter: Self::DEFAULT_JITTER,
            seed: None,
        })
    }

    fn from_config(c: Config) -> Self {
        let rng = match c.seed {
            Some(s) => SmallRng::seed_from_u64(s),
            None => SmallRng::from_rng(&mut rand::rng()),
        };
        Self {
            shared: Arc::new(Shared {
                gates: Mutex::new(HashMap::new()),
                partitioner: c.partitioner,
                classifier: c.classifier,
                wall: c.wall,
                max_wait: c.max_wait,
                jitter: c.jitter,
                rng: Mutex::new(rng),
            }),
        }
    }

    fn config(&self) -> Config {
        let s = &self.shared;
        Config {
            partitioner: s.partitioner.clone(),
            classifier: s.classifier.clone(),
            wall: s.wall.clone(),
            max_wait: s.max_wait,
            jitter: s.jitter,
            seed: None,
        }
    }

    fn with(self, f: impl FnOnce(&mut Config)) -> Self {
        let mut c = self.config();
        f(&mut c);
        Self::from_config(c)
    }

    /// The longest a request may wait at a gate; a longer hint fails fast with
    /// [`WaitTooLong`](super::error::WaitTooLong). `None`: no cap (wait as long as the server says).
    ///
    /// Builder methods start a fresh set of gates: configure the layer before you clone it.
    pub fn max_wait(self, cap: Option<Duration>) -> Self {
        self.with(|c| c.max_wait = cap)
    }

    /// The largest random delay added after a gate opens (drawn per waiting request).
    pub fn jitter(self, max: Duration) -> Self {
        self.with(|c| c.jitter = max)
    }

    /// Seeds the jitter's random source (for reproducible tests).
    pub fn seed(self, seed: u64) -> Self {
        self.with(|c| c.seed = Some(seed))
    }

    /// How requests map to partitions.
    pub fn partitioner(self, p: impl Partitioner) -> Self {
        self.with(|c| c.partitioner = Arc::new(p))
    }

    /// Which responses may close a gate (those the classifier calls retryable by default: 429,
    /// 529/503, other 5xx, 408, 409).
    pub fn classifier(self, classify: impl Classify) -> Self {
        self.with(|c| c.classifier = Arc::new(classify))
    }

    /// The wall clock HTTP-dates are measured against when a response has no `Date` header.
    pub fn wall_clock(self, wall: impl WallClock) -> Self {
        self.with(|c| c.wall = Arc::new(wall))
    }

    /// When the gate of `partition` opens, if it is closed now.
    pub fn cooldown_until(&self, partition: PartitionKey) -> Option<Instant> {
        self.shared.gate(partition, Instant::now())
    }
}

impl Default for RetryAfterLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for RetryAfterLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let closed = self
            .shared
            .gates
            .lock()
            .map(|g| g.len())
            .unwrap_or_default();
        f.debug_struct("RetryAfterLayer")
            .field("max_wait", &self.shared.max_wait)
            .field("jitter", &self.shared.jitter)
            .field("gates", &closed)
            .finish()
    }
}

impl<S> Layer<S> for RetryAfterLayer {
    type Service = RetryAfter<S>;

    fn layer(&self, inner: S) -> RetryAfter<S> {
        RetryAfter::new(inner, self.shared.clone())
    }
}
