//! The in-memory [`BudgetStore`]: one process's buckets on tokio's clock.

use super::{
    Admission, BudgetStore, Charged, Delta, Learned, Scope, Snapshot, StoreError, StoreFuture,
    WaitReason,
};
use crate::budget::{Bucket, Cost, Limit, Limits};
use crate::partition::PartitionKey;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// A continuously refilling token bucket on tokio's clock, refilled at the limit's rate less what
/// other clients of the key are seen to take.
#[derive(Clone, Copy, Debug)]
struct Level {
    level: f64,
    last: Instant,
    limit: Limit,
    /// What other clients of the key take, per second, as the server's remaining counts show it
    /// (smoothed): the bucket refills at the limit's rate less this.
    foreign: f64,
    /// The current observation window: when it began and the server's remaining count then.
    window: Option<(Instant, f64)>,
    /// What this store took from the bucket since the window began.
    spent: f64,
    /// The most the server has said remains since the limit was set: its bucket's capacity as
    /// far as this store knows (a per-minute limit says nothing of the burst).
    peak: f64,
    /// Whether `foreign` has been measured at least once.
    sampled: bool,
    /// Whether a window has begun at an empty count since the limit was set.
    anchored: bool,
}

/// How long a window of the server's remaining counts is before it yields an estimate of what
/// other clients take.
const OBSERVE_WINDOW: Duration = Duration::from_secs(3);

impl Level {
    fn full(limit: Limit, now: Instant) -> Self {
        Self {
            level: limit.capacity() as f64,
            last: now,
            limit,
            foreign: 0.0,
            window: None,
            spent: 0.0,
            peak: 0.0,
            sampled: false,
            anchored: false,
        }
    }

    /// The refill rate per second: the limit's, less what other clients take (at least a
    /// twentieth of it, so an estimate can never stop the bucket).
    fn rate(&self) -> f64 {
        let r = self.limit.rate_per_sec();
        (r - self.foreign).max(r / 20.0)
    }

    /// Takes `amount` (negative: gives back), counting it as this store's own use.
    fn take(&mut self, amount: f64) {
        self.level -= amount;
        self.spent += amount;
    }

    /// The server says `remaining` now. Over each window of about three seconds (shorter ones
    /// are thrown off by the pauses of the Retry-After gate), what the server's count lost beyond
    /// this store's own use and the refill is what other clients took:
    /// `rate * dt - (remaining - remaining_then) - spent`. Measured only while the server's
    /// bucket is short of full at both ends (below 90 % of the most it has said remains, when that
    /// was at least a twentieth of the limit: a full bucket's refill is capped, and nobody is
    /// limited); otherwise the estimate decays by halves. A higher sample is averaged in by
    /// halves, a lower one taken whole. The first window after the limit is set begins at the
    /// first empty count (a burst's counts lag by what it has in flight).
    fn observe(&mut self, remaining: f64, now: Instant) {
        self.peak = self.peak.max(remaining);
        let empty = remaining < 1.0;
        let (t0, r0) = match self.window {
            Some(w) if self.anchored || !empty => w,
            _ => {
                // No window yet, or the first empty count since the limit was set: a window
                // begins now. An empty count is the surest start: while a burst is spent, a
                // count lags by all the burst has in flight (a window begun at 5 % of full took
                // 40 requests in flight for another client's, and one begun at 52 of 60 took 17
                // a second: the bucket then refilled at a twentieth of the limit). And the first
                // estimate comes one window after the burst, not up to two.
                self.anchored |= empty;
                self.begin_window(remaining, now);
                return;
            }
        };
        let dt = now.saturating_duration_since(t0);
        if dt < OBSERVE_WINDOW {
            return;
        }
        let dt = dt.as_secs_f64();
        let rate = self.limit.rate_per_sec();
        // A level that has never been above a twentieth of the limit (three seconds' worth) is
        // taken as short of full whatever it was: few servers keep a burst that small, and a
        // level held down by another client must not pass for a full bucket.
        let short = if self.peak >= self.limit.per_minute as f64 / 20.0 {
            0.9 * self.peak
        } else {
            f64::INFINITY
        };
        if r0 < short && remaining < short {
            // A sample may be negative (the counts are whole numbers, and lag by a round trip):
            // only the smoothed estimate is kept within 0 and the rate, so noise does not bias it.
            let sample = (rate * dt - (remaining - r0) - self.spent) / dt;
            // The first sample is the first knowledge (the 0 before it was none): it is taken
            // whole; later ones are averaged in when they are higher, and taken whole when they
            // are lower: a client that stops gives its share back within a window or two (a
            // sample too low costs a 429 or two, which the next window corrects).
            let smoothed = if self.sampled && sample > self.foreign {
                0.5 * self.foreign + 0.5 * sample
            } else {
                sample
            };
            self.foreign = smoothed.clamp(0.0, rate);
            self.sampled = true;
        } else {
            self.foreign *= 0.5;
        }
        self.begin_window(remaining, now);
    }

    /// A window of the server's counts begins at `remaining`, now.
    fn begin_window(&mut self, remaining: f64, now: Instant) {
        self.window = Some((now, remaining));
        self.spent = 0.0;
    }

    fn at(&mut self, now: Instant) -> f64 {
        // A caller whose clock reading is older than the last one refills nothing, and never
        // moves the refill time back (that would count the time in between twice).
        if now > self.last {
            let dt = (now - self.last).as_secs_f64();
            let cap = self.limit.capacity() as f64;
            if self.level < cap {
                self.level = (self.level + dt * self.rate()).min(cap);
            }
            self.last = now;
        }
        self.level
    }

    /// When the bucket is full again (now, if it is).
    fn full_at(&self) -> Option<Instant> {
        let missing = self.limit.capacity() as f64 - self.level;
        if missing <= 0.0 {
            return Some(self.last);
        }
        let rate = self.rate();
        if rate <= 0.0 {
            return None; // never
        }
        Duration::try_from_secs_f64(missing / rate)
            .ok()
            .and_then(|d| self.last.checked_add(d))
    }

    /// Follows a changed limit, keeping what remains (up to the new capacity; a debt stays a
    /// debt), as a server does when a key's limit changes. Keeping what was *used* instead turned
    /// a halved limit into a debt of the old capacity: a minute without sending (issue 11).
    fn relimit(&mut self, limit: Limit, now: Instant) {
        if limit != self.limit {
            let remains = self.at(now);
            self.limit = limit;
            self.level = remains.min(limit.capacity() as f64);
            // A window across the change would mix two rates, and the server's capacity may have
            // changed with it.
            self.window = None;
            self.peak = 0.0;
            self.anchored = false;
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
    /// When the partition is indistinguishable from a fresh one (every bucket full, no cooldown):
    /// from then on it may be forgotten. Its key in [`Partitions::idle`].
    idle_at: Instant,
    /// Its buckets start empty (a fallback store: no burst at the switch).
    start_empty: bool,
}

impl Partition {
    fn new(now: Instant, start_empty: bool) -> Self {
        Self {
            levels: [None; 4],
            learned: [None; 4],
            cooldown_until: None,
            idle_at: now,
            start_empty,
        }
    }

    /// When the partition will be idle, as its state stands now.
    fn compute_idle_at(&self, now: Instant) -> Instant {
        let never = now + crate::util::FAR_FUTURE;
        let mut at = self.cooldown_until.unwrap_or(now);
        for l in self.levels.iter().flatten() {
            at = at.max(l.full_at().unwrap_or(never).min(never));
        }
        at
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
            None => {
                let mut l = Level::full(limit, now);
                if self.start_empty {
                    l.level = 0.0;
                }
                *slot = Some(l);
            }
        }
        slot.as_mut()
    }
}

/// The partitions, and an index of when each will be idle (the global cap's partition is never
/// forgotten, and not indexed). The earliest entry of the index is the one to forget when the
/// bound is reached: found in O(log n), never by a scan.
#[derive(Debug, Default)]
struct Partitions {
    map: HashMap<PartitionKey, Partition>,
    idle: BTreeSet<(Instant, PartitionKey)>,
}

impl Partitions {
    /// Partitions that count toward the bound (all but the global cap's).
    fn counted(&self) -> usize {
        self.map.len() - usize::from(self.map.contains_key(&PartitionKey::GLOBAL))
    }

    /// Re-indexes `p` after its state changed at `now`.
    fn touched(&mut self, p: PartitionKey, now: Instant) {
        if p == PartitionKey::GLOBAL {
            return;
        }
        if let Some(part) = self.map.get_mut(&p) {
            let at = part.compute_idle_at(now);
            if at != part.idle_at {
                self.idle.remove(&(part.idle_at, p));
                self.idle.insert((at, p));
                part.idle_at = at;
            }
        }
    }
}

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
    pub fn new(max_partitions: usize) -> Self {
        Self {
            partitions: Mutex::new(Partitions::default()),
            max_partitions: max_partitions.max(1),
            start_empty: false,
        }
    }

    /// A store whose partitions start with empty buckets, refilling at their rate: for a
    /// fallback that takes over from a shared store (`tower-quota-redis`), so the switch hands no
    /// process a fresh burst the fleet has already spent.
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
                match parts.idle.first().copied() {
                    Some((at, oldest)) if at <= now => {
                        parts.idle.remove(&(at, oldest));
                        parts.map.remove(&oldest);
                    }
                    Some((at, _)) => return Err(at - now),
                    None => return Err(crate::util::FAR_FUTURE),
                }
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
        let answer = self.reserve_locked(&mut parts, scopes, cost, now);
        for scope in scopes {
            parts.touched(scope.partition, now);
        }
        answer
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(p: PartitionKey, rpm: u64) -> [Scope; 1] {
        [Scope {
            partition: p,
            limits: Limits::new().rpm(rpm),
        }]
    }

    /// A store with partition `id` at 600 requests a minute, made by one granted reservation.
    fn with_partition(id: u64) -> (MemoryStore, PartitionKey, [Scope; 1]) {
        let store = MemoryStore::new(10);
        let p = PartitionKey::from_u64(id);
        let s = scope(p, 600);
        assert!(matches!(
            store.reserve_now(&s, Cost::new(0, 0)),
            Admission::Granted { .. }
        ));
        (store, p, s)
    }

    /// `n` requests of `s` admitted (or not: the level may go short).
    fn take(store: &MemoryStore, s: &[Scope], n: u32) {
        for _ in 0..n {
            let _ = store.reserve_now(s, Cost::new(0, 0));
        }
    }

    /// The server's count, learned.
    fn count(remaining: u64, unseen: u64) -> [Learned; 1] {
        [Learned {
            bucket: Bucket::Requests,
            limit: None,
            remaining: Some(remaining),
            inferred: false,
            unseen,
        }]
    }

    #[tokio::test(start_paused = true)]
    async fn what_another_client_takes_slows_the_refill_and_is_forgotten_when_it_stops() {
        // 600 a minute (10 a second); this store takes 4 a second, the server's count shows 10
        // gone each second: another client takes 6.
        let (store, p, s) = with_partition(7);
        let level = |store: &MemoryStore| store.snapshot_now(p, s[0].limits).unwrap().buckets[0];
        store.learn_now(p, &count(5, 0));
        let mut remaining = 5;
        for _ in 0..9 {
            tokio::time::advance(Duration::from_secs(1)).await;
            for _ in 0..4 {
                assert!(matches!(
                    store.reserve_now(&s, Cost::new(0, 0)),
                    Admission::Granted { .. }
                ));
            }
            // The server refilled 10 and counted 4 of ours and 6 of the other client's.
            store.learn_now(p, &count(remaining, 0));
            remaining = remaining + 10 - 4 - 6;
        }
        let foreign = store.lock().map[&p].levels[0].unwrap().foreign;
        assert!((foreign - 6.0).abs() < 0.5, "{foreign}");
        // The bucket now refills at 4 a second, not 10.
        store.learn_now(p, &count(0, 0));
        tokio::time::advance(Duration::from_secs(1)).await;
        let (l, _) = level(&store).unwrap();
        assert!((l - 4.0).abs() < 0.5, "{l}");
        // The other client stops: the server's count climbs to full, and the estimate decays.
        for r in [500, 550, 590, 599] {
            tokio::time::advance(Duration::from_secs(3)).await;
            store.learn_now(p, &count(r, 0));
        }
        let foreign = store.lock().map[&p].levels[0].unwrap().foreign;
        assert!(foreign < 1.0, "{foreign}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_window_begins_when_a_burst_has_emptied_the_bucket() {
        // 600 a minute; the server's bucket starts full, a burst spends it in 2.5 s: the window
        // begun full restarts at the empty count, so the first estimate comes 3 s after it (at
        // 5.5 s), from counts that no longer lag by the burst.
        let (store, p, s) = with_partition(9);
        store.learn_now(p, &count(600, 0));
        tokio::time::advance(Duration::from_millis(1500)).await;
        store.learn_now(p, &count(300, 0));
        tokio::time::advance(Duration::from_secs(1)).await;
        store.learn_now(p, &count(0, 0));
        let foreign = |store: &MemoryStore| store.lock().map[&p].levels[0].unwrap().foreign;
        // Then 4 a second of ours, and the count stays at 0: another client takes 6.
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(1)).await;
            take(&store, &s, 4);
            store.learn_now(p, &count(0, 0));
        }
        let f = foreign(&store);
        assert!((f - 6.0).abs() < 0.5, "{f}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_begun_during_a_burst_restarts_at_the_first_empty_count() {
        // 600 a minute, alone on the key. The first count comes mid-burst (52), a stale one
        // after it (59); the burst's last 20 are admitted, and the count reaches 0. A window
        // from 52 would take the burst's lag for another client (14 a second, clamped to the
        // whole rate: the bucket would refill at a twentieth of it).
        let (store, p, s) = with_partition(10);
        store.learn_now(p, &count(52, 0));
        tokio::time::advance(Duration::from_millis(100)).await;
        store.learn_now(p, &count(59, 0));
        take(&store, &s, 20);
        tokio::time::advance(Duration::from_millis(900)).await;
        store.learn_now(p, &count(0, 0));
        // Then 10 a second of ours, all the server refills: nobody else.
        for _ in 0..4 {
            tokio::time::advance(Duration::from_secs(1)).await;
            take(&store, &s, 10);
            store.learn_now(p, &count(0, 0));
        }
        let foreign = store.lock().map[&p].levels[0].unwrap().foreign;
        assert!(foreign < 1.0, "{foreign}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_count_leaves_out_the_requests_still_held_inside() {
        let (store, p, s) = with_partition(8);
        // The server says 50 remain; 20 admitted here have not reached it yet.
        store.learn_now(p, &count(50, 20));
        let (l, _) = store.snapshot_now(p, s[0].limits).unwrap().buckets[0].unwrap();
        assert_eq!(l, 30.0);
        // A count never raises a level (an older answer may arrive late)...
        store.learn_now(p, &count(80, 0));
        let (l, _) = store.snapshot_now(p, s[0].limits).unwrap().buckets[0].unwrap();
        assert_eq!(l, 30.0);
        // ...but a 429 read by the inference sets it: the server is empty now.
        store.learn_now(
            p,
            &[Learned {
                inferred: true,
                ..count(0, 5)[0]
            }],
        );
        let (l, _) = store.snapshot_now(p, s[0].limits).unwrap().buckets[0].unwrap();
        assert_eq!(l, -5.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refill_is_never_counted_twice_when_the_clock_is_read_out_of_order() {
        let t0 = Instant::now();
        let mut l = Level::full(Limit::per_minute(60), t0);
        l.level = 0.0;
        tokio::time::advance(Duration::from_secs(10)).await;
        let t1 = Instant::now();
        assert_eq!(l.at(t1), 10.0);
        // A caller that read the clock before another took the lock comes second.
        assert_eq!(l.at(t0 + Duration::from_secs(5)), 10.0);
        assert_eq!(l.at(t1), 10.0, "the 5 s in between were counted twice");
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_key_keeps_its_debt_under_a_flood_of_new_keys() {
        let store = MemoryStore::new(100);
        let busy = scope(PartitionKey::fingerprint(b"sk-busy"), 50);
        let mut admitted = 0;
        let mut n = 0u64;
        // 20 s in steps of 100 ms; 200 new keys a step, twice the store's bound.
        for _ in 0..200 {
            if matches!(
                store.reserve_now(&busy, Cost::new(0, 0)),
                Admission::Granted { .. }
            ) {
                admitted += 1;
            }
            for _ in 0..200 {
                n += 1;
                let key = PartitionKey::fingerprint(&n.to_le_bytes());
                let _ = store.reserve_now(&scope(key, 50), Cost::new(0, 0));
            }
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        // 50 at once, then 50 a minute: at most 50 + 50/60 x 20 = 66.7 in 20 s.
        assert!((60..=67).contains(&admitted), "admitted {admitted}");
        assert!(store.len() <= 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_store_makes_a_new_key_wait_until_a_partition_is_idle() {
        let store = MemoryStore::new(2);
        let key = PartitionKey::from_u64;
        for k in [1, 3] {
            assert!(matches!(
                store.reserve_now(&scope(key(k), 60), Cost::new(0, 0)),
                Admission::Granted { .. }
            ));
        }
        // Both partitions owe a request, refilled in 1 s: nothing may be forgotten before then.
        assert_eq!(
            store.reserve_now(&scope(key(5), 60), Cost::new(0, 0)),
            Admission::Wait {
                retry_in: Duration::from_secs(1),
                partition: key(5),
                reason: WaitReason::StoreFull,
            }
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(matches!(
            store.reserve_now(&scope(key(5), 60), Cost::new(0, 0)),
            Admission::Granted { .. }
        ));
        assert_eq!(store.len(), 2);
        // The global cap's partition is never forgotten and does not count toward the bound.
        let global = [Scope {
            partition: PartitionKey::GLOBAL,
            limits: Limits::new().rpm(60),
        }];
        assert!(matches!(
            store.reserve_now(&global, Cost::new(0, 0)),
            Admission::Granted { .. }
        ));
        assert_eq!(store.len(), 3);
    }
}
