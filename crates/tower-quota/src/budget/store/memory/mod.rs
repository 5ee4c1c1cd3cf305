//! The in-memory [`BudgetStore`]: one process's buckets on tokio's clock.

use super::{
    Admission, BudgetStore, Charged, Delta, Learned, Scope, Snapshot, StoreError, StoreFuture,
    WaitReason,
};
use crate::budget::{Bucket, Cost, Limit, Limits};
use crate::partition::PartitionKey;

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

mod level;
#[cfg(test)]
mod tests;

use level::{EPSILON, Level, MIN_WAIT, Partition, Partitions};

/// The in-memory [`BudgetStore`]: one process's buckets, on tokio's clock (so it runs under paused
/// time).
///
/// It tracks at most `max_partitions` partitions (the global cap's aside). A partition is
/// forgotten only once it is indistinguishable from a fresh one (every bucket full, no cooldown),
/// so forgetting never hands a busy key a new burst. When the bound is reached and no partition is
/// idle yet, a request of a new partition waits ([`WaitReason::StoreFull`]) until the first one
/// will be: the store knows when that is, and a flood of new keys cannot reset a busy one.
pub struct MemoryStore {
    partitions: Mutex<Partitions>,
    max_partitions: usize,
    start_empty: bool,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("partitions", &self.len())
            .field("max_partitions", &self.max_partitions)
            .finish()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(Self::DEFAULT_MAX_PARTITIONS)
    }
}

impl MemoryStore {
    /// Default bound on tracked partitions.
    pub const DEFAULT_MAX_PARTITIONS: usize = 10_000;

    /// A store tracking at most `max_partitions` partitions (idle ones beyond are evicted).
    ///
    /// # Panics
    ///
    /// If `max_partitions` is 0 (no request could ever reserve).
    pub fn new(max_partitions: usize) -> Self {
        assert!(
            max_partitions > 0,
            "a store tracking 0 partitions admits nothing"
        );
        Self {
            partitions: Mutex::new(Partitions::default()),
            max_partitions,
            start_empty: false,
        }
    }

    /// A store whose partitions start with empty buckets, refilling at their rate: for a
    /// fallback that takes over from a shared store (`tower-quota-redis`), so the switch hands no
    /// process a fresh burst the fleet has already spent.
    ///
    /// # Panics
    ///
    /// If `max_partitions` is 0, as [`new`](Self::new).
    pub fn starting_empty(max_partitions: usize) -> Self {
        Self {
            start_empty: true,
            ..Self::new(max_partitions)
        }
    }

    /// Forgets every partition (a fallback does, each time it takes over).
    pub fn clear(&self) {
        let mut parts = self.lock();
        parts.map.clear();
        parts.idle.clear();
    }

    /// Partitions tracked now.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether no partition is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Partitions> {
        self.partitions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The partition `p`, tracked now if it is not yet. When the bound is reached, the partition
    /// that is idle earliest is forgotten if it is idle by `now`; if none is, `Err` says how long
    /// until one will be.
    fn entry<'m>(
        &self,
        parts: &'m mut Partitions,
        p: PartitionKey,
        now: Instant,
    ) -> Result<&'m mut Partition, Duration> {
        if !parts.map.contains_key(&p) {
            if p != PartitionKey::GLOBAL && parts.counted() >= self.max_partitions {
                parts.forget_idle(now)?;
            }
            if p != PartitionKey::GLOBAL {
                parts.idle.insert((now, p));
            }
        }
        let start_empty = self.start_empty;
        Ok(parts
            .map
            .entry(p)
            .or_insert_with(|| Partition::new(now, start_empty)))
    }

    /// The synchronous reservation (the in-memory store never waits on anything).
    pub fn reserve_now(&self, scopes: &[Scope], cost: Cost) -> Admission {
        let mut parts = self.lock();
        // Read the clock under the lock, so the instants the buckets see never go backwards.
        let now = Instant::now();
        self.reserve_locked(&mut parts, scopes, cost, now)
    }

    fn reserve_locked(
        &self,
        parts: &mut Partitions,
        scopes: &[Scope],
        cost: Cost,
        now: Instant,
    ) -> Admission {
        let full = |partition, d: Duration| Admission::Wait {
            retry_in: d.max(MIN_WAIT),
            partition,
            reason: WaitReason::StoreFull,
        };
        if let [scope] = scopes {
            // One scope (no global cap): check and charge on one look-up.
            let part = match self.entry(parts, scope.partition, now) {
                Ok(part) => part,
                Err(d) => return full(scope.partition, d),
            };
            let answer = match Self::check(part, scope, cost, now) {
                Err(refused) => refused,
                Ok(Some((retry_in, reason))) => Admission::Wait {
                    retry_in,
                    partition: scope.partition,
                    reason,
                },
                Ok(None) => Admission::Granted {
                    charged: Self::charge(part, scope, 0, cost, now, Charged::NONE),
                },
            };
            // A reservation only makes its partition idle later, which the index may leave as
            // it is (see `Partitions`), unless a bucket was re-limited on the way.
            if part.relimited {
                parts.touched(scope.partition, now);
            }
            return answer;
        }
        let mut wait: Option<(Duration, PartitionKey, WaitReason)> = None;
        for scope in scopes {
            let part = match self.entry(parts, scope.partition, now) {
                Ok(part) => part,
                Err(d) => return full(scope.partition, d),
            };
            match Self::check(part, scope, cost, now) {
                Err(refused) => return refused,
                Ok(Some((d, reason))) if wait.is_none_or(|(w, _, _)| d > w) => {
                    wait = Some((d, scope.partition, reason));
                }
                Ok(_) => {}
            }
        }
        if let Some((retry_in, partition, reason)) = wait {
            return Admission::Wait {
                retry_in,
                partition,
                reason,
            };
        }
        let mut charged = Charged::NONE;
        for (i, scope) in scopes.iter().enumerate() {
            match self.entry(parts, scope.partition, now) {
                Ok(part) => charged = Self::charge(part, scope, i, cost, now, charged),
                // Only an idle partition can have been forgotten since the check: as good as
                // fresh, so the check holds; tracked again unless the store is full of busy ones.
                Err(d) => return full(scope.partition, d),
            }
        }
        for scope in scopes {
            if parts.map.get(&scope.partition).is_some_and(|p| p.relimited) {
                parts.touched(scope.partition, now);
            }
        }
        Admission::Granted { charged }
    }

    /// Whether `cost` fits the buckets of `scope` now: `Ok(None)` if it does, `Ok(Some(wait))` if
    /// it must wait (the longest of its buckets' and the cooldown's), `Err(TooLarge)` if it never
    /// fits.
    fn check(
        part: &mut Partition,
        scope: &Scope,
        cost: Cost,
        now: Instant,
    ) -> Result<Option<(Duration, WaitReason)>, Admission> {
        let mut wait: Option<(Duration, WaitReason)> = None;
        let mut longer = |d: Duration, r| {
            let d = d.max(MIN_WAIT);
            if wait.is_none_or(|(w, _)| d > w) {
                wait = Some((d, r));
            }
        };
        if let Some(until) = part.cooldown_until.filter(|t| *t > now) {
            longer(until - now, WaitReason::Cooldown);
        }
        for b in Bucket::ALL {
            let need = cost.of(b);
            let Some(level) = part.level(&scope.limits, b, now) else {
                continue;
            };
            let capacity = level.limit.capacity();
            if need > capacity {
                return Err(Admission::TooLarge {
                    partition: scope.partition,
                    bucket: b,
                    needed: need,
                    capacity,
                });
            }
            let missing = need as f64 - level.at(now);
            if missing > EPSILON {
                let rate = level.rate();
                let d = if rate > 0.0 {
                    Duration::try_from_secs_f64(missing / rate).unwrap_or(Duration::MAX)
                } else {
                    Duration::MAX
                };
                longer(d, WaitReason::Bucket(b));
            }
        }
        Ok(wait)
    }

    /// Takes `cost` from every existing bucket of `scope` (number `i`); returns `charged` with
    /// them added.
    fn charge(
        part: &mut Partition,
        scope: &Scope,
        i: usize,
        cost: Cost,
        now: Instant,
        mut charged: Charged,
    ) -> Charged {
        for b in Bucket::ALL {
            if let Some(level) = part.level(&scope.limits, b, now) {
                level.take(cost.of(b) as f64);
                charged = charged.with(i, b);
            }
        }
        charged
    }

    /// The synchronous adjustment.
    pub fn adjust_now(&self, scopes: &[Scope], delta: Delta) {
        let mut parts = self.lock();
        let now = Instant::now();
        for (i, scope) in scopes.iter().enumerate() {
            // A partition that was forgotten was full: a refund changes nothing, and an extra
            // charge to a key the store has no room for is lost (the server's remaining counts
            // still pull the level down when the key is seen again).
            let Ok(part) = self.entry(&mut parts, scope.partition, now) else {
                tracing::debug!(partition = %scope.partition, "budget: store full, adjustment dropped");
                continue;
            };
            for b in Bucket::ALL {
                if !delta.only.contains(i, b) {
                    continue;
                }
                if let Some(level) = part.level(&scope.limits, b, now) {
                    let cap = level.limit.capacity() as f64;
                    level.at(now);
                    level.take(delta.of(b) as f64);
                    level.level = level.level.min(cap);
                }
            }
            parts.touched(scope.partition, now);
        }
    }

    fn cooldown_now(&self, partition: PartitionKey, duration: Duration) {
        let mut parts = self.lock();
        let now = Instant::now();
        let Ok(part) = self.entry(&mut parts, partition, now) else {
            tracing::debug!(partition = %partition, "budget: store full, cooldown dropped");
            return;
        };
        let until = now
            .checked_add(duration)
            .unwrap_or(now + crate::util::FAR_FUTURE);
        part.cooldown_until = Some(part.cooldown_until.map_or(until, |t| t.max(until)));
        parts.touched(partition, now);
    }

    fn learn_now(&self, partition: PartitionKey, learned: &[Learned]) {
        let mut parts = self.lock();
        let now = Instant::now();
        let Ok(part) = self.entry(&mut parts, partition, now) else {
            tracing::debug!(partition = %partition, "budget: store full, learned limits dropped");
            return;
        };
        for l in learned {
            let i = l.bucket as usize;
            if let Some(limit) = l.limit.filter(|&n| n > 0) {
                let before = part.learned[i].replace(limit);
                // A level that follows the learned limit follows it now (a configured limit,
                // which takes precedence, is left alone).
                if let (Some(old), Some(level)) = (before, part.levels[i].as_mut()) {
                    if level.limit == Limit::per_minute(old) {
                        level.relimit(Limit::per_minute(limit), now);
                    }
                }
            }
            if let (Some(r), Some(level)) = (l.remaining, part.levels[i].as_mut()) {
                if !l.inferred {
                    level.observe(r as f64, now);
                }
                let target = r as f64 - l.unseen as f64;
                // A server's count pulls the level down, never up (an older answer may arrive
                // after a newer one). A 429 read by the inference is the moment's truth (the
                // server is empty now): it sets the level both ways, undoing a refill counted at
                // a guess of the rate that proved too low.
                if level.at(now) > target || l.inferred {
                    level.level = target;
                }
            } else if let (Some(r), None, Some(limit)) =
                (l.remaining, part.levels[i], part.learned[i])
            {
                // A bucket first learned from the server starts where the server says it is.
                let mut level = Level::full(Limit::per_minute(limit), now);
                level.level = level.level.min(r as f64 - l.unseen as f64);
                part.levels[i] = Some(level);
            }
        }
        parts.touched(partition, now);
    }

    fn snapshot_now(&self, partition: PartitionKey, limits: Limits) -> Option<Snapshot> {
        let mut parts = self.lock();
        let now = Instant::now();
        let part = parts.map.get_mut(&partition)?;
        let mut snap = Snapshot {
            cooldown: part.cooldown_until.filter(|t| *t > now).map(|t| t - now),
            ..Snapshot::default()
        };
        for b in Bucket::ALL {
            if let Some(level) = part.level(&limits, b, now) {
                snap.buckets[b as usize] = Some((level.at(now), level.limit.capacity()));
            }
        }
        Some(snap)
    }
}

impl BudgetStore for MemoryStore {
    fn reserve<'a>(&'a self, scopes: &'a [Scope], cost: Cost) -> StoreFuture<'a, Admission> {
        Box::pin(std::future::ready(Ok(self.reserve_now(scopes, cost))))
    }

    fn try_reserve(&self, scopes: &[Scope], cost: Cost) -> Option<Result<Admission, StoreError>> {
        Some(Ok(self.reserve_now(scopes, cost)))
    }

    fn try_learn(
        &self,
        partition: PartitionKey,
        learned: &[Learned],
    ) -> Option<Result<(), StoreError>> {
        self.learn_now(partition, learned);
        Some(Ok(()))
    }

    fn adjust<'a>(&'a self, scopes: &'a [Scope], delta: Delta) -> StoreFuture<'a, ()> {
        self.adjust_now(scopes, delta);
        Box::pin(std::future::ready(Ok(())))
    }

    fn cooldown<'a>(&'a self, partition: PartitionKey, duration: Duration) -> StoreFuture<'a, ()> {
        self.cooldown_now(partition, duration);
        Box::pin(std::future::ready(Ok(())))
    }

    fn learn<'a>(&'a self, partition: PartitionKey, learned: &'a [Learned]) -> StoreFuture<'a, ()> {
        self.learn_now(partition, learned);
        Box::pin(std::future::ready(Ok(())))
    }

    fn snapshot<'a>(
        &'a self,
        partition: PartitionKey,
        limits: Limits,
    ) -> StoreFuture<'a, Option<Snapshot>> {
        Box::pin(std::future::ready(Ok(self.snapshot_now(partition, limits))))
    }
}
