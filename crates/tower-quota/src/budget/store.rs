//! Where budget state lives: the [`BudgetStore`] trait and the in-memory store.

use super::{Bucket, Cost, Limit, Limits};
use crate::BoxError;
use crate::partition::PartitionKey;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// The future a store operation returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A store failed (a Redis store that cannot reach Redis, for example).
#[derive(Debug)]
pub struct StoreError(pub BoxError);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the budget store failed")
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// One set of buckets a reservation draws on: a partition (an API key fingerprint, or
/// [`PartitionKey::GLOBAL`]) with its configured limits. Limits travel with every call, so they can
/// change with no migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scope {
    /// The partition.
    pub partition: PartitionKey,
    /// Its configured limits (unset buckets use what the store learned).
    pub limits: Limits,
}

/// Why a reservation must wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WaitReason {
    /// This bucket has too little left.
    Bucket(Bucket),
    /// The partition is in a cooldown the server announced.
    Cooldown,
}

/// Which buckets of which scopes a reservation was charged to: bit `4 * scope + bucket` (scope as
/// its index in the slice, bucket as its index in [`Bucket::ALL`]). A bucket that did not exist
/// when the request was admitted (its limit not known yet) is not charged, so it must not be
/// refunded or settled either.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Charged(pub u16);

impl Charged {
    /// Every bucket of every scope.
    pub const ALL: Charged = Charged(u16::MAX);
    /// No bucket.
    pub const NONE: Charged = Charged(0);

    /// Whether bucket `b` of scope number `scope` is included.
    pub fn contains(self, scope: usize, b: Bucket) -> bool {
        scope < 4 && self.0 & (1 << (4 * scope + b as usize)) != 0
    }

    /// This set with bucket `b` of scope number `scope` added.
    pub fn with(self, scope: usize, b: Bucket) -> Self {
        if scope < 4 {
            Charged(self.0 | 1 << (4 * scope + b as usize))
        } else {
            self
        }
    }
}

impl Default for Charged {
    fn default() -> Self {
        Self::ALL
    }
}

/// The answer to a reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Admission {
    /// Reserved from every bucket of every scope that exists.
    Granted {
        /// The buckets charged.
        charged: Charged,
    },
    /// Nothing was reserved; ask again after `retry_in`.
    Wait {
        /// How long until the cost fits (or the cooldown ends).
        retry_in: Duration,
        /// The partition that binds.
        partition: PartitionKey,
        /// What binds.
        reason: WaitReason,
    },
    /// Nothing was reserved, and the cost never fits: it exceeds a bucket's capacity.
    TooLarge {
        /// The partition whose bucket is too small.
        partition: PartitionKey,
        /// The bucket.
        bucket: Bucket,
        /// What the request needs from it.
        needed: u64,
        /// What the bucket holds when full.
        capacity: u64,
    },
}

/// A signed change to the buckets of the scopes: negative refunds, positive charges more. Only the
/// buckets in `only` change (by default all).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// Requests.
    pub requests: i64,
    /// Input tokens.
    pub input_tokens: i64,
    /// Output tokens.
    pub output_tokens: i64,
    /// The buckets it applies to.
    pub only: Charged,
}

impl Delta {
    /// `actual - estimate`.
    pub fn between(estimate: Cost, actual: Cost) -> Self {
        let d = |a: u64, e: u64| a as i64 - e as i64;
        Self {
            requests: d(actual.requests, estimate.requests),
            input_tokens: d(actual.input_tokens, estimate.input_tokens),
            output_tokens: d(actual.output_tokens, estimate.output_tokens),
            only: Charged::ALL,
        }
    }

    /// A refund of all of `cost`.
    pub fn refund(cost: Cost) -> Self {
        Self::between(cost, Cost::default())
    }

    /// The change to `bucket`.
    pub fn of(&self, bucket: Bucket) -> i64 {
        match bucket {
            Bucket::Requests => self.requests,
            Bucket::Tokens => self.input_tokens + self.output_tokens,
            Bucket::InputTokens => self.input_tokens,
            Bucket::OutputTokens => self.output_tokens,
        }
    }

    /// Whether it changes nothing.
    pub fn is_zero(&self) -> bool {
        (self.requests, self.input_tokens, self.output_tokens) == (0, 0, 0)
            || self.only == Charged::NONE
    }
}

/// What the server said about one bucket, for [`BudgetStore::learn`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Learned {
    /// The bucket.
    pub bucket: Bucket,
    /// Its capacity per minute, if the server said.
    pub limit: Option<u64>,
    /// What is left, if the server said.
    pub remaining: Option<u64>,
}

/// A view of one partition's buckets.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Per bucket ([`Bucket::ALL`] order): the level now and the capacity, if the bucket exists.
    pub buckets: [Option<(f64, u64)>; 4],
    /// How long the partition's cooldown still runs.
    pub cooldown: Option<Duration>,
}

impl Snapshot {
    /// The level and capacity of `bucket`.
    pub fn bucket(&self, bucket: Bucket) -> Option<(f64, u64)> {
        self.buckets[bucket as usize]
    }
}

/// Where budget state lives. Every operation is atomic: a reservation takes every bucket of every
/// scope or none. Implementations: [`MemoryStore`] (one process), the Redis store (many).
/// [`conformance`](super::conformance) has the suite each must pass.
pub trait BudgetStore: Send + Sync + 'static {
    /// Reserves `cost` from every bucket of every scope, or nothing.
    fn reserve<'a>(&'a self, scopes: &'a [Scope], cost: Cost) -> StoreFuture<'a, Admission>;

    /// As [`reserve`](Self::reserve), answered at once when the store can answer without waiting
    /// on anything (an in-memory store always can); `None` (the default): call `reserve`. The
    /// budget asks this first, so a store that answers here costs no allocation per request.
    fn try_reserve(&self, scopes: &[Scope], cost: Cost) -> Option<Result<Admission, StoreError>> {
        let _ = (scopes, cost);
        None
    }

    /// Applies a signed change to every bucket of every scope (a level may go below zero: the
    /// debt is paid by the refill).
    fn adjust<'a>(&'a self, scopes: &'a [Scope], delta: Delta) -> StoreFuture<'a, ()>;

    /// Pauses `partition` for `duration` (or longer, if it already is).
    fn cooldown<'a>(&'a self, partition: PartitionKey, duration: Duration) -> StoreFuture<'a, ()>;

    /// Re-seeds `partition` from the server's word: learned limits create missing buckets, a
    /// remaining count pulls a bucket's level down to it (never up).
    fn learn<'a>(&'a self, partition: PartitionKey, learned: &'a [Learned]) -> StoreFuture<'a, ()>;

    /// The partition's buckets now, with `limits` configured.
    fn snapshot<'a>(
        &'a self,
        partition: PartitionKey,
        limits: Limits,
    ) -> StoreFuture<'a, Option<Snapshot>>;
}

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
