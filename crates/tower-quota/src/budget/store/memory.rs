//! The in-memory [`BudgetStore`]: one process's buckets on tokio's clock.

use super::{
    Admission, BudgetStore, Charged, Delta, Learned, Scope, Snapshot, StoreError, StoreFuture,
    WaitReason,
};
use crate::budget::{Bucket, Cost, Limit, Limits};
use crate::partition::PartitionKey;
use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// A continuously refilling token bucket on tokio's clock.
#[derive(Clone, Copy, Debug)]
struct Level {
    level: f64,
    last: Instant,
    limit: Limit,
}

impl Level {
    fn full(limit: Limit, now: Instant) -> Self {
        Self {
            level: limit.capacity() as f64,
            last: now,
            limit,
        }
    }

    fn at(&mut self, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        let cap = self.limit.capacity() as f64;
        if self.level < cap {
            self.level = (self.level + dt * self.limit.rate_per_sec()).min(cap);
        }
        self.last = now;
        self.level
    }

    /// Follows a changed limit, keeping what was used.
    fn relimit(&mut self, limit: Limit, now: Instant) {
        if limit != self.limit {
            let used = self.limit.capacity() as f64 - self.at(now);
            self.limit = limit;
            self.level = limit.capacity() as f64 - used;
        }
    }
}

/// Tokens a level may lack and still count as enough: absorbs float rounding between two clocks
/// that compute the same refill at different instants (ours and the server's).
const EPSILON: f64 = 1e-6;
/// The shortest wait reported: a wait of zero would spin.
const MIN_WAIT: Duration = Duration::from_millis(1);

#[derive(Debug)]
struct Partition {
    levels: [Option<Level>; 4],
    learned: [Option<u64>; 4],
    cooldown_until: Option<Instant>,
    last_used: Instant,
}

impl Partition {
    fn new(now: Instant) -> Self {
        Self {
            levels: [None; 4],
            learned: [None; 4],
            cooldown_until: None,
            last_used: now,
        }
    }

    fn limit(&self, limits: &Limits, b: Bucket) -> Option<Limit> {
        limits
            .get(b)
            .or(self.learned[b as usize].map(Limit::per_minute))
    }

    /// The bucket for `b` under `limits`, created full or re-limited as needed.
    fn level(&mut self, limits: &Limits, b: Bucket, now: Instant) -> Option<&mut Level> {
        let limit = self.limit(limits, b)?;
        let slot = &mut self.levels[b as usize];
        match slot {
            Some(l) => l.relimit(limit, now),
            None => *slot = Some(Level::full(limit, now)),
        }
        slot.as_mut()
    }

    fn is_idle(&mut self, now: Instant) -> bool {
        self.cooldown_until.is_none_or(|t| t <= now)
            && self
                .levels
                .iter_mut()
                .flatten()
                .all(|l| l.at(now) >= l.limit.capacity() as f64)
    }
}

/// The in-memory [`BudgetStore`]: one process's buckets, on tokio's clock (so it runs under paused
/// time). It tracks at most `max_partitions` partitions; beyond that, idle ones (full buckets, no
/// cooldown) are forgotten, least recently used first.
pub struct MemoryStore {
    partitions: Mutex<HashMap<PartitionKey, Partition>>,
    max_partitions: usize,
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
    pub fn new(max_partitions: usize) -> Self {
        Self {
            partitions: Mutex::new(HashMap::new()),
            max_partitions: max_partitions.max(1),
        }
    }

    /// Partitions tracked now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no partition is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PartitionKey, Partition>> {
        self.partitions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn make_room(&self, map: &mut HashMap<PartitionKey, Partition>, now: Instant) {
        if map.len() < self.max_partitions {
            return;
        }
        map.retain(|k, p| *k == PartitionKey::GLOBAL || !p.is_idle(now));
        if map.len() >= self.max_partitions {
            // Everything is busy: forget the least recently used all the same (it refills as new).
            if let Some(oldest) = map
                .iter()
                .filter(|(k, _)| **k != PartitionKey::GLOBAL)
                .min_by_key(|(_, p)| p.last_used)
                .map(|(k, _)| *k)
            {
                map.remove(&oldest);
            }
        }
    }

    fn entry<'m>(
        &self,
        map: &'m mut HashMap<PartitionKey, Partition>,
        p: PartitionKey,
        now: Instant,
    ) -> &'m mut Partition {
        if !map.contains_key(&p) {
            self.make_room(map, now);
        }
        let part = map.entry(p).or_insert_with(|| Partition::new(now));
        part.last_used = now;
        part
    }

    /// The synchronous reservation (the in-memory store never waits on anything).
    pub fn reserve_now(&self, scopes: &[Scope], cost: Cost) -> Admission {
        let now = Instant::now();
        let mut map = self.lock();
        if let [scope] = scopes {
            // One scope (no global cap): check and charge on one look-up.
            let part = self.entry(&mut map, scope.partition, now);
            return match Self::check(part, scope, cost, now) {
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
        }
        let mut wait: Option<(Duration, PartitionKey, WaitReason)> = None;
        for scope in scopes {
            let part = self.entry(&mut map, scope.partition, now);
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
            let part = self.entry(&mut map, scope.partition, now);
            charged = Self::charge(part, scope, i, cost, now, charged);
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
                let rate = level.limit.rate_per_sec();
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
                level.level -= cost.of(b) as f64;
                charged = charged.with(i, b);
            }
        }
        charged
    }

    /// The synchronous adjustment.
    pub fn adjust_now(&self, scopes: &[Scope], delta: Delta) {
        let now = Instant::now();
        let mut map = self.lock();
        for (i, scope) in scopes.iter().enumerate() {
            let part = self.entry(&mut map, scope.partition, now);
            for b in Bucket::ALL {
                if !delta.only.contains(i, b) {
                    continue;
                }
                if let Some(level) = part.level(&scope.limits, b, now) {
                    let cap = level.limit.capacity() as f64;
                    level.level = (level.at(now) - delta.of(b) as f64).min(cap);
                }
            }
        }
    }

    fn cooldown_now(&self, partition: PartitionKey, duration: Duration) {
        let now = Instant::now();
        let mut map = self.lock();
        let part = self.entry(&mut map, partition, now);
        let until = now
            .checked_add(duration)
            .unwrap_or(now + Duration::from_secs(86_400 * 365));
        part.cooldown_until = Some(part.cooldown_until.map_or(until, |t| t.max(until)));
    }

    fn learn_now(&self, partition: PartitionKey, learned: &[Learned]) {
        let now = Instant::now();
        let mut map = self.lock();
        let part = self.entry(&mut map, partition, now);
        for l in learned {
            let i = l.bucket as usize;
            if let Some(limit) = l.limit.filter(|&n| n > 0) {
                part.learned[i] = Some(limit);
            }
            if let (Some(r), Some(level)) = (l.remaining, part.levels[i].as_mut()) {
                if level.at(now) > r as f64 {
                    level.level = r as f64;
                }
            } else if let (Some(r), None, Some(limit)) =
                (l.remaining, part.levels[i], part.learned[i])
            {
                // A bucket first learned from the server starts where the server says it is.
                let mut level = Level::full(Limit::per_minute(limit), now);
                level.level = level.level.min(r as f64);
                part.levels[i] = Some(level);
            }
        }
    }

    fn snapshot_now(&self, partition: PartitionKey, limits: Limits) -> Option<Snapshot> {
        let now = Instant::now();
        let mut map = self.lock();
        let part = map.get_mut(&partition)?;
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
