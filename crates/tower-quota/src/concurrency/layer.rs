use super::ConcurrencyLimit;
use super::limiter::{Aimd, LimitKind, Limiter};
use crate::context::QuotaContext;
use crate::partition::PartitionKey;
use crate::util::Configured;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

enum Mode {
    Shared(Arc<Limiter>),
    Partitioned {
        policy: LimitKind,
        limiters: Mutex<HashMap<PartitionKey, Arc<Limiter>>>,
        /// When to forget the limiters that are as good as new.
        sweep: crate::util::Sweep,
    },
}

pub(crate) struct Shared {
    mode: Mode,
    global: Option<Arc<Limiter>>,
    pub(crate) max_queue: usize,
    pub(crate) ctx: QuotaContext,
}

impl Shared {
    /// Whether each partition has its own limit.
    pub(crate) fn partitioned(&self) -> bool {
        matches!(self.mode, Mode::Partitioned { .. })
    }

    /// The limiters a request of partition `p` must pass, in acquisition order.
    pub(crate) fn limiters(&self, p: PartitionKey) -> [Option<Arc<Limiter>>; 2] {
        let own = match &self.mode {
            Mode::Shared(l) => l.clone(),
            Mode::Partitioned {
                policy,
                limiters,
                sweep,
            } => {
                let mut map = limiters.lock().unwrap_or_else(|e| e.into_inner());
                if !map.contains_key(&p) && sweep.due(map.len()) {
                    // Forget only limiters indistinguishable from new ones (nothing in flight or
                    // queued, the limit back at its start): an adaptive limit that learned to
                    // back off keeps what it learned. Amortised O(1) a new partition.
                    map.retain(|_, l| Arc::strong_count(l) > 1 || !l.is_fresh());
                    sweep.swept(map.len());
                }
                map.entry(p)
                    .or_insert_with(|| Limiter::new(*policy, crate::metrics::partition_label(p)))
                    .clone()
            }
        };
        [Some(own), self.global.clone()]
    }

    /// The limiters of the partitions (the one shared limiter outside per-partition mode).
    fn own(&self) -> Vec<Arc<Limiter>> {
        match &self.mode {
            Mode::Shared(l) => vec![l.clone()],
            Mode::Partitioned { limiters, .. } => limiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned()
                .collect(),
        }
    }

    /// Every limiter, the global cap's included.
    fn all(&self) -> Vec<Arc<Limiter>> {
        let mut v = self.own();
        if let Some(g) = &self.global {
            v.push(g.clone());
        }
        v
    }
}

/// Caps the requests in flight, fixed or adaptive, shared by every clone and every service the
/// layer makes. See the [module docs](super).
///
/// The limits are made on the layer's first use (its first service or
/// [`handle`](Self::handle)); a setter called after that panics (the services and handles made
/// would not see it): configure the layer, then clone and use it.
#[derive(Clone)]
#[must_use]
pub struct ConcurrencyLimitLayer {
    inner: Configured<Config, Shared>,
}

#[derive(Clone)]
struct Config {
    policy: LimitKind,
    per_partition: Option<usize>,
    global_cap: Option<usize>,
    max_queue: usize,
    ctx: QuotaContext,
}

impl ConcurrencyLimitLayer {
    /// Default bound on the partitions tracked at once (idle ones beyond it are forgotten).
    pub const DEFAULT_MAX_PARTITIONS: usize = 10_000;

    /// Default bound on the requests waiting for a slot of one limit: 10 000 (a waiter costs
    /// about 230 bytes beyond its request).
    pub const DEFAULT_MAX_QUEUE: usize = 10_000;

    fn make(config: &Config) -> Shared {
        let mode = match config.per_partition {
            None => Mode::Shared(Limiter::new(
                config.policy,
                metrics::SharedString::const_str("shared"),
            )),
            Some(max_partitions) => Mode::Partitioned {
                policy: config.policy,
                limiters: Mutex::new(HashMap::new()),
                sweep: crate::util::Sweep::new(max_partitions),
            },
        };
        Shared {
            mode,
            global: config.global_cap.map(|c| {
                Limiter::new(
                    LimitKind::Fixed(c),
                    metrics::SharedString::const_str("global"),
                )
            }),
            max_queue: config.max_queue,
            ctx: config.ctx.clone(),
        }
    }

    fn build(policy: LimitKind) -> Self {
        Self::from_config(Config {
            policy,
            per_partition: None,
            global_cap: None,
            max_queue: Self::DEFAULT_MAX_QUEUE,
            ctx: QuotaContext::new(),
        })
    }

    /// At most `limit` requests in flight.
    ///
    /// # Panics
    ///
    /// If `limit` is 0 (nothing could ever be sent).
    pub fn fixed(limit: usize) -> Self {
        assert!(limit > 0, "a concurrency limit of 0 admits nothing");
        Self::build(LimitKind::Fixed(limit))
    }

    /// An adaptive AIMD limit (see [`Aimd`]; `Aimd::default()` is a good start). `initial` is
    /// brought within `[min, max]`, and a `min` of 0 counts as 1.
    ///
    /// # Panics
    ///
    /// If `min` is over `max`, `decrease_ratio` is not in `(0, 1]` (the limit must never grow
    /// on back-pressure), or a `latency_tolerance` is not over 1 (every round trip would count
    /// as slow): checked here, so no request ever meets a bad policy.
    pub fn adaptive(aimd: Aimd) -> Self {
        assert!(
            aimd.min <= aimd.max,
            "Aimd: min ({}) is over max ({})",
            aimd.min,
            aimd.max
        );
        assert!(
            aimd.decrease_ratio > 0.0 && aimd.decrease_ratio <= 1.0,
            "Aimd: decrease_ratio must be in (0, 1], got {}",
            aimd.decrease_ratio
        );
        if let Some(tolerance) = aimd.latency_tolerance {
            assert!(
                tolerance > 1.0 && tolerance.is_finite(),
                "Aimd: latency_tolerance must be over 1, got {tolerance}"
            );
        }
        Self::build(LimitKind::Aimd(aimd))
    }

    /// One limit per partition (API key by default) instead of one for all, each following the
    /// policy on its own, at most `max_partitions` tracked at once (idle ones beyond are forgotten).
    ///
    /// # Panics
    ///
    /// If `max_partitions` is 0 (no request could take a slot).
    #[track_caller]
    pub fn per_partition(self, max_partitions: usize) -> Self {
        assert!(
            max_partitions > 0,
            "a limit tracking 0 partitions admits nothing"
        );
        self.with(|c| c.per_partition = Some(max_partitions))
    }

    /// A fixed cap across all partitions, on top of each partition's own limit.
    ///
    /// # Panics
    ///
    /// If `cap` is 0.
    #[track_caller]
    pub fn global_cap(self, cap: usize) -> Self {
        assert!(cap > 0, "a global cap of 0 admits nothing");
        self.with(|c| c.global_cap = Some(cap))
    }

    /// The shared context: its partitioner keys the limits (with
    /// [`per_partition`](Self::per_partition)), its classifier says which outcomes count as
    /// back-pressure (through [`Outcome::is_backpressure`]). Give every layer of a stack the same
    /// one.
    ///
    /// [`Outcome::is_backpressure`]: crate::classify::Outcome::is_backpressure
    #[track_caller]
    pub fn context(self, ctx: QuotaContext) -> Self {
        self.with(|c| c.ctx = ctx)
    }

    /// How many requests may wait for a slot of one limit at once (default
    /// [`DEFAULT_MAX_QUEUE`](Self::DEFAULT_MAX_QUEUE)); one more fails at once with
    /// [`QueueFull`](crate::error::QueueFull), whose `retry_at` estimates when there will be room.
    #[track_caller]
    pub fn max_queue(self, bound: usize) -> Self {
        self.with(|c| c.max_queue = bound)
    }

    /// A read-only view of the layer's live state.
    pub fn handle(&self) -> ConcurrencyHandle {
        ConcurrencyHandle {
            shared: self.shared(),
        }
    }
}

impl fmt::Debug for ConcurrencyLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.inner.made() {
            Some(shared) => fmt::Debug::fmt(
                &ConcurrencyHandle {
                    shared: shared.clone(),
                },
                f,
            ),
            None => f
                .debug_struct("ConcurrencyLimitLayer")
                .field("in_use", &false)
                .finish_non_exhaustive(),
        }
    }
}

/// A cheap, read-only view of a [`ConcurrencyLimitLayer`]'s state, summed over its partitions.
#[derive(Clone)]
pub struct ConcurrencyHandle {
    shared: Arc<Shared>,
}

impl ConcurrencyHandle {
    /// Requests holding a slot (responses still streaming included).
    pub fn in_flight(&self) -> usize {
        // With a global cap, a request is in flight once it holds the global slot too.
        if let Some(g) = &self.shared.global {
            return g.in_flight.load(Ordering::SeqCst);
        }
        self.shared
            .own()
            .iter()
            .map(|l| l.in_flight.load(Ordering::SeqCst))
            .sum()
    }

    /// Requests waiting for a slot.
    pub fn queued(&self) -> usize {
        self.shared
            .all()
            .iter()
            .map(|l| l.queued.load(Ordering::SeqCst))
            .sum()
    }

    /// The current limit (summed over tracked partitions in per-partition mode).
    pub fn limit(&self) -> usize {
        self.shared.own().iter().map(|l| l.limit()).sum()
    }

    /// The smoothed round trip (send to response headers, time queued left out) of `partition`'s
    /// limit, or of the shared one in shared mode (`partition` ignored); `None` before the first
    /// answer or when the partition is not tracked.
    pub fn round_trip(&self, partition: PartitionKey) -> Option<Duration> {
        match &self.shared.mode {
            Mode::Shared(l) => l.smoothed_rtt(),
            Mode::Partitioned { limiters, .. } => limiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&partition)
                .and_then(|l| l.smoothed_rtt()),
        }
    }

    /// The limit of `partition` (`None` in shared mode or when not tracked).
    pub fn partition_limit(&self, partition: PartitionKey) -> Option<usize> {
        match &self.shared.mode {
            Mode::Shared(_) => None,
            Mode::Partitioned { limiters, .. } => limiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&partition)
                .map(|l| l.limit()),
        }
    }

    /// Partitions tracked now.
    pub fn partitions(&self) -> usize {
        self.shared.own().len()
    }

    /// Slots free right now, over all limiters (for tests: every slot back when all is dropped).
    pub fn available(&self) -> usize {
        self.shared
            .own()
            .iter()
            .map(|l| l.semaphore().available_permits())
            .sum()
    }
}

impl fmt::Debug for ConcurrencyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyHandle")
            .field("in_flight", &self.in_flight())
            .field("queued", &self.queued())
            .field("limit", &self.limit())
            .field(
                "global_cap",
                &self.shared.global.as_ref().map(|g| g.limit()),
            )
            .finish()
    }
}

configured_layer!(ConcurrencyLimitLayer => ConcurrencyLimit, make: ConcurrencyLimitLayer::make);
