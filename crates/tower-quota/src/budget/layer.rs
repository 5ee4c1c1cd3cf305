use super::estimate::{Estimate, MessagesEstimator};
use super::shared::{PartitionLimits, Shared};
use super::store::{BudgetStore, MemoryStore, Snapshot, StoreError};
use super::window::ContextWindows;
use super::{Limits, TokenBudget};
use crate::context::QuotaContext;
use crate::partition::PartitionKey;
use crate::util::Configured;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
#[derive(Clone)]
struct Config {
    limits: Limits,
    per_partition: Option<PartitionLimits>,
    global: Option<Limits>,
    store: Arc<dyn BudgetStore>,
    estimator: Arc<dyn Estimate>,
    ctx: QuotaContext,
    max_wait: Option<Duration>,
    max_probe: Duration,
    max_queue: usize,
    learn: bool,
    reconcile: bool,
    max_partitions: usize,
    windows: Option<ContextWindows>,
}

/// Requests, input tokens and output tokens per minute: reserve before sending, wait in FIFO order,
/// settle with the real usage, learn from the server. See the [module docs](super).
///
/// # Clone and configuration
///
/// Clones share the store, the queues and the counters, and so do all the services the layer makes.
/// The queues and counters are made on the layer's first use (its first service or
/// [`handle`](Self::handle)); a setter called after that panics (the services and handles made
/// would not see it): configure the layer, then clone and use it.
#[derive(Clone)]
#[must_use]
pub struct TokenBudgetLayer {
    inner: Configured<Config, Shared>,
}

impl TokenBudgetLayer {
    /// Default cap on one wait for the budget: 5 minutes, like the Retry-After cap.
    pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(300);

    /// Default bound on how long a probe holds its partition's queue: 30 s. While a limit is
    /// neither configured nor learned, a partition's first request holds the queue until its
    /// answer teaches the limits; a server that never answers must not hold it for ever, and 30 s
    /// is longer than any healthy server takes to send headers for a short request.
    pub const DEFAULT_MAX_PROBE: Duration = Duration::from_secs(30);

    /// Default bound on the requests of one partition waiting for the budget: 10 000. A waiter
    /// costs about 350 bytes beyond its request (`cargo bench -p tower-quota --bench memory`), so
    /// a flood of one key stays within a few tens of megabytes; a request past the bound fails at
    /// once with [`QueueFull`](crate::error::QueueFull).
    pub const DEFAULT_MAX_QUEUE: usize = 10_000;

    /// A budget with `limits` for every partition (API key), an in-memory store, the
    /// [`MessagesEstimator`], learning from the server's headers on, waits capped at 5 minutes.
    /// `Limits::new()` (nothing configured) learns every limit from the server.
    pub fn new(limits: Limits) -> Self {
        Self::from_config(Config {
            limits,
            per_partition: None,
            global: None,
            store: Arc::new(MemoryStore::default()),
            estimator: Arc::new(MessagesEstimator::default()),
            ctx: QuotaContext::new(),
            max_wait: Some(Self::DEFAULT_MAX_WAIT),
            max_probe: Self::DEFAULT_MAX_PROBE,
            max_queue: Self::DEFAULT_MAX_QUEUE,
            learn: true,
            reconcile: true,
            max_partitions: MemoryStore::DEFAULT_MAX_PARTITIONS,
            windows: None,
        })
    }

    /// Limits for particular partitions (keys of different tiers): `rule` returns a partition's
    /// limits, or `None` for the layer's. Compare with `PartitionKey::fingerprint(key)`; the rule
    /// never sees the key itself. It is asked when a partition is first seen (and again if the
    /// partition was idle long enough to be forgotten), not for every request.
    ///
    /// ```
    /// use tower_quota::budget::{Limits, TokenBudgetLayer};
    /// use tower_quota::partition::PartitionKey;
    ///
    /// let big = PartitionKey::fingerprint(b"sk-tier-4");
    /// let layer = TokenBudgetLayer::new(Limits::new().rpm(50))
    ///     .partition_limits(move |p| (p == big).then(|| Limits::new().rpm(4000)));
    /// # let _ = layer;
    /// ```
    #[track_caller]
    pub fn partition_limits(
        self,
        rule: impl Fn(PartitionKey) -> Option<Limits> + Send + Sync + 'static,
    ) -> Self {
        self.with(|c| c.per_partition = Some(Arc::new(rule)))
    }

    /// A cap across all partitions, on top of each partition's own limits.
    #[track_caller]
    pub fn global_cap(self, limits: Limits) -> Self {
        self.with(|c| c.global = Some(limits))
    }

    /// Where the buckets live (default: a fresh [`MemoryStore`]).
    #[track_caller]
    pub fn store(self, store: impl BudgetStore) -> Self {
        self.with(|c| c.store = Arc::new(store))
    }

    /// A store shared with other layers or kept for inspection.
    #[track_caller]
    pub fn shared_store(self, store: Arc<dyn BudgetStore>) -> Self {
        self.with(|c| c.store = store)
    }

    /// How a request's cost is estimated (a [`Cost`](super::Cost) in its extensions still wins).
    #[track_caller]
    pub fn estimator(self, e: impl Estimate) -> Self {
        self.with(|c| c.estimator = Arc::new(e))
    }

    /// The shared context: its partitioner keys the budgets, its classifier says what is
    /// refunded (anything but a success: the server did no work) and what pauses the partition in
    /// the store (a rate-limited answer with a hint), its wall clock reads reset dates without a
    /// `Date` header. Give every layer of a stack the same one.
    #[track_caller]
    pub fn context(self, ctx: QuotaContext) -> Self {
        self.with(|c| c.ctx = ctx)
    }

    /// The longest a request may wait for the budget; past it, it fails fast with
    /// a [`BudgetError`](super::BudgetError) whose `is_wait_too_long()` is true. `None`: no cap.
    #[track_caller]
    pub fn max_wait(self, cap: Option<Duration>) -> Self {
        self.with(|c| c.max_wait = cap)
    }

    /// How long a probe (the first request of a partition while a limit is unknown) may hold its
    /// partition's queue waiting for its answer (default
    /// [`DEFAULT_MAX_PROBE`](Self::DEFAULT_MAX_PROBE)); past it the queue moves on without the
    /// server's limits, as it would with a server that sends none.
    #[track_caller]
    pub fn max_probe(self, bound: Duration) -> Self {
        self.with(|c| c.max_probe = bound)
    }

    /// How many requests of one partition may wait for the budget at once (default
    /// [`DEFAULT_MAX_QUEUE`](Self::DEFAULT_MAX_QUEUE)); one more fails at once with
    /// [`QueueFull`](crate::error::QueueFull), whose `retry_at` estimates when the queue will
    /// have room.
    #[track_caller]
    pub fn max_queue(self, bound: usize) -> Self {
        self.with(|c| c.max_queue = bound)
    }

    /// Refuse a request whose estimated input plus `max_tokens` exceeds its model's context
    /// window, before reserving anything or sending it: it fails with a
    /// [`ContextWindowError`](super::ContextWindowError). Off by default. See
    /// [`window`](super::window).
    #[track_caller]
    pub fn context_windows(self, windows: ContextWindows) -> Self {
        self.with(|c| c.windows = Some(windows))
    }

    /// Whether to learn limits and levels from the server's headers (default on).
    #[track_caller]
    pub fn learn(self, on: bool) -> Self {
        self.with(|c| c.learn = on)
    }

    /// Whether to settle reservations with the usage read from response bodies (default on). Off,
    /// a reservation keeps its estimate unless the caller settles it through the
    /// [`ReservationHandle`](super::ReservationHandle) (the OpenAI cookbook's behaviour, kept for
    /// comparison).
    #[track_caller]
    pub fn reconcile(self, on: bool) -> Self {
        self.with(|c| c.reconcile = on)
    }

    /// The bound on partitions whose queues are tracked (the store has its own bound).
    ///
    /// # Panics
    ///
    /// If `n` is 0 (no request could be queued).
    #[track_caller]
    pub fn max_partitions(self, n: usize) -> Self {
        assert!(n > 0, "a budget tracking 0 partitions queues nothing");
        self.with(|c| c.max_partitions = n)
    }

    /// A read-only view of the layer's live state.
    pub fn handle(&self) -> BudgetHandle {
        BudgetHandle {
            shared: self.shared(),
        }
    }
}

impl fmt::Debug for TokenBudgetLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBudgetLayer")
            .field("limits", &self.inner.config().limits)
            .field("global", &self.inner.config().global)
            .field("learn", &self.inner.config().learn)
            .field("max_wait", &self.inner.config().max_wait)
            .finish()
    }
}

/// A cheap, read-only view of a [`TokenBudgetLayer`]'s state.
#[derive(Clone)]
pub struct BudgetHandle {
    shared: Arc<Shared>,
}

impl BudgetHandle {
    /// Requests waiting for the budget now.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::SeqCst)
    }

    /// Times a request had to wait for a bucket or a cooldown, so far.
    pub fn waits(&self) -> u64 {
        self.shared.waits.load(Ordering::Relaxed)
    }

    /// Requests admitted so far.
    pub fn admitted(&self) -> u64 {
        self.shared.admitted.load(Ordering::Relaxed)
    }

    /// The buckets of `partition` now (levels, capacities, cooldown).
    ///
    /// # Errors
    ///
    /// The store's, if it cannot be read.
    pub async fn snapshot(&self, partition: PartitionKey) -> Result<Option<Snapshot>, StoreError> {
        let limits = if partition == PartitionKey::GLOBAL {
            self.shared.global.unwrap_or_default()
        } else {
            self.shared.limits_of(partition)
        };
        self.shared.store.snapshot(partition, limits).await
    }
}

impl fmt::Debug for BudgetHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BudgetHandle")
            .field("queued", &self.queued())
            .field("waits", &self.waits())
            .field("admitted", &self.admitted())
            .finish()
    }
}

configured_layer!(
    TokenBudgetLayer => TokenBudget,
    make: |config| Shared {
        limits: config.limits,
        per_partition: config.per_partition.clone(),
        global: config.global,
        store: config.store.clone(),
        estimator: config.estimator.clone(),
        ctx: config.ctx.clone(),
        max_wait: config.max_wait,
        max_probe: config.max_probe,
        max_queue: config.max_queue,
        learn: config.learn,
        reconcile: config.reconcile,
        windows: config.windows.clone(),
        inference: Default::default(),
        turns: Mutex::new(HashMap::new()),
        sweep: crate::util::Sweep::new(config.max_partitions),
        global_turn: config.global.map(|_| Arc::new(Semaphore::new(1))),
        queued: AtomicUsize::new(0),
        waits: AtomicU64::new(0),
        admitted: AtomicU64::new(0),
    }
);
