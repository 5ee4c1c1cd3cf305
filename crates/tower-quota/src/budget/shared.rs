//! The budget's state shared by its layer, services and futures: the configuration in force, each
//! partition's FIFO queue, and the counts the handle reads.

use super::estimate::Estimate;
use super::store::{BudgetStore, Scope};
use super::window::ContextWindows;
use super::{Bucket, Limits};
use crate::context::QuotaContext;
use crate::partition::PartitionKey;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

pub(crate) struct Shared {
    pub(crate) limits: Limits,
    pub(crate) per_partition: Option<PartitionLimits>,
    pub(crate) global: Option<Limits>,
    pub(crate) store: Arc<dyn BudgetStore>,
    pub(crate) estimator: Arc<dyn Estimate>,
    pub(crate) ctx: QuotaContext,
    pub(crate) max_wait: Option<Duration>,
    pub(crate) max_probe: Duration,
    pub(crate) max_queue: usize,
    pub(crate) learn: bool,
    pub(crate) reconcile: bool,
    pub(crate) windows: Option<ContextWindows>,
    /// Request rates inferred from 429s, for partitions whose server sends no headers.
    pub(crate) inference: super::infer::Inference,
    pub(super) turns: Mutex<HashMap<PartitionKey, Arc<Queue>>>,
    /// When to forget idle queues.
    pub(super) sweep: crate::util::Sweep,
    /// The global cap's FIFO turn, when there is a cap.
    pub(crate) global_turn: Option<Arc<Semaphore>>,
    pub(crate) queued: AtomicUsize,
    pub(crate) waits: AtomicU64,
    pub(crate) admitted: AtomicU64,
}

/// While a partition is admitted blind ([`Shared::blind`]), the budget admits its next request
/// only while fewer than this many of its admitted requests are held by the layers inside, and
/// looks again every [`BLIND_POLL`]. Without it, the requests admitted before any rate is known
/// queue inside (for a concurrency slot, behind the reopening Retry-After gate), already admitted,
/// and leave in rushes the budget cannot pace: against a server without rate-limit headers, 146
/// such requests gave one 429 a second for twelve seconds after the rate was known. A partition
/// the inner layers do not hold back is not slowed.
pub(crate) const BLIND_HELD: isize = 4;
/// How often a blind partition's queue head looks again at what the layers inside hold.
pub(crate) const BLIND_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// How long a partition is admitted carefully after a 429 ([`Shared::careful`]).
pub(crate) const CAREFUL_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// A partition's FIFO queue: one turn, held by the request that asks the store.
#[derive(Debug)]
pub(crate) struct Queue {
    pub(crate) queue: Arc<Semaphore>,
    /// Whether a response of this partition has been seen (limits could be learned).
    pub(crate) probed: AtomicBool,
    /// Whether some limit of this partition has been learned (from headers, or inferred).
    pub(crate) paced: AtomicBool,
    /// Until when (milliseconds after `epoch`) the partition is admitted carefully after a 429
    /// ([`Shared::careful`]).
    pub(crate) careful_until: AtomicU64,
    /// When the queue was made: the origin of `careful_until`.
    pub(crate) epoch: Instant,
    /// The scopes its requests draw on (its own, and the global cap's), made once.
    pub(crate) scopes: Arc<[Scope]>,
    /// Its requests waiting for the budget.
    pub(crate) waiting: AtomicUsize,
    /// Its admitted requests still held in the layers inside (the concurrency limit's queue, the
    /// Retry-After gate): the server has not counted them yet.
    pub(crate) held: Arc<std::sync::atomic::AtomicIsize>,
    /// Its handles in the `metrics` facade.
    pub(crate) metrics: crate::metrics::BudgetMetrics,
    /// Whether the store last told one of its requests to wait (no grant since): while it has,
    /// requests take the FIFO turn; while it has not, a request may reserve without it even when
    /// others are queued for the turn (they only wait for its hand-over, not for room).
    pub(crate) bound: AtomicBool,
}

impl Queue {
    /// Milliseconds from the queue's making to `at` (at least 1, so 0 can mean never).
    pub(crate) fn millis(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// A 429 came: careful for [`CAREFUL_FOR`] from now.
    pub(crate) fn be_careful(&self) {
        let until = self.millis(Instant::now() + CAREFUL_FOR);
        self.careful_until.fetch_max(until, Ordering::Relaxed);
    }
}

/// Limits chosen per partition.
pub(crate) type PartitionLimits = Arc<dyn Fn(PartitionKey) -> Option<Limits> + Send + Sync>;

impl Shared {
    /// The limits of partition `p`: its own if the layer was given a rule for it, else the
    /// layer's.
    pub(crate) fn limits_of(&self, p: PartitionKey) -> Limits {
        self.per_partition
            .as_ref()
            .and_then(|f| f(p))
            .unwrap_or(self.limits)
    }

    /// The scopes a request of partition `p` draws on.
    pub(crate) fn scopes(&self, p: PartitionKey) -> Arc<[Scope]> {
        let own = Scope {
            partition: p,
            limits: self.limits_of(p),
        };
        match self.global {
            Some(g) => Arc::new([
                own,
                Scope {
                    partition: PartitionKey::GLOBAL,
                    limits: g,
                },
            ]),
            None => Arc::new([own]),
        }
    }

    /// Whether a request of the partition of `own` must be its probe: some limit is neither
    /// configured nor learned and no response has been seen yet.
    pub(crate) fn probe_due(&self, own: &Queue) -> bool {
        self.leaves_to_learn(own) && !own.probed.load(Ordering::SeqCst)
    }

    /// Whether the partition of `own` learns some limit from the server: learning is on and some
    /// limit is not configured.
    fn leaves_to_learn(&self, own: &Queue) -> bool {
        self.learn && own.scopes[0].limits.has_unset()
    }

    /// Whether the partition of `own` is admitted blind: some limit is neither configured nor
    /// learned, and nothing has been learned from its responses yet (a server without rate-limit
    /// headers, until its rate is inferred). Meanwhile its requests go past the layers inside a
    /// few at a time ([`BLIND_HELD`]).
    pub(crate) fn blind(&self, own: &Queue) -> bool {
        self.leaves_to_learn(own) && !own.paced.load(Ordering::Relaxed)
    }

    /// Whether the partition of `own` is admitted carefully: within [`CAREFUL_FOR`] of its last
    /// 429, its model of the server proved wrong (another client of the key, a limit that fell),
    /// and what it admits on that model must not pile up inside to leave in one rush when the
    /// Retry-After gate reopens. Limited like a blind partition ([`BLIND_HELD`]).
    pub(crate) fn careful(&self, own: &Queue) -> bool {
        let until = own.careful_until.load(Ordering::Relaxed);
        until > 0 && own.millis(Instant::now()) < until
    }

    /// The queue of partition `p`: its FIFO turn (only the holder asks the store) and its scopes.
    /// A request takes it, then the global cap's turn ([`Shared::global_turn`]) while that binds.
    pub(crate) fn queue(&self, p: PartitionKey) -> Arc<Queue> {
        let mut map = self.turns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(q) = map.get(&p) {
            return q.clone();
        }
        if self.sweep.due(map.len()) {
            // Forget the queues nobody holds or waits in (amortised O(1) a new partition).
            map.retain(|_, q| {
                Arc::strong_count(q) > 1
                    || Arc::strong_count(&q.queue) > 1
                    || q.queue.available_permits() == 0
            });
            self.sweep.swept(map.len());
        }
        let scopes = self.scopes(p);
        let metrics = crate::metrics::BudgetMetrics::new(p);
        for b in Bucket::ALL {
            if let Some(l) = scopes[0].limits.get(b) {
                metrics.limit(b, l.per_minute);
            }
        }
        let q = Arc::new(Queue {
            queue: Arc::new(Semaphore::new(1)),
            probed: AtomicBool::new(false),
            paced: AtomicBool::new(false),
            careful_until: AtomicU64::new(0),
            epoch: Instant::now(),
            scopes,
            waiting: AtomicUsize::new(0),
            held: Default::default(),
            metrics,
            bound: AtomicBool::new(false),
        });
        map.insert(p, q.clone());
        q
    }
}
