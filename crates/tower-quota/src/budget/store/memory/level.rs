//! The buckets of one partition (levels refilling on tokio's clock), and the partitions with an
//! index of when each will be idle.

use crate::budget::{Bucket, Limit, Limits};
use crate::partition::PartitionKey;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tokio::time::Instant;

/// A continuously refilling token bucket on tokio's clock, refilled at the limit's rate less what
/// other clients of the key are seen to take.
#[derive(Clone, Copy, Debug)]
pub(super) struct Level {
    pub(super) level: f64,
    pub(super) last: Instant,
    pub(super) limit: Limit,
    /// What other clients of the key take, per second, as the server's remaining counts show it
    /// (smoothed): the bucket refills at the limit's rate less this.
    pub(super) foreign: f64,
    /// The current observation window: when it began and the server's remaining count then.
    pub(super) window: Option<(Instant, f64)>,
    /// What this store took from the bucket since the window began.
    pub(super) spent: f64,
    /// The most the server has said remains since the limit was set: its bucket's capacity as
    /// far as this store knows (a per-minute limit says nothing of the burst).
    pub(super) peak: f64,
    /// Whether `foreign` has been measured at least once.
    pub(super) sampled: bool,
    /// Whether a window has begun at an empty count since the limit was set.
    pub(super) anchored: bool,
}

/// How long a window of the server's remaining counts is before it yields an estimate of what
/// other clients take.
pub(super) const OBSERVE_WINDOW: Duration = Duration::from_secs(3);

impl Level {
    pub(super) fn full(limit: Limit, now: Instant) -> Self {
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
    pub(super) fn rate(&self) -> f64 {
        let r = self.limit.rate_per_sec();
        (r - self.foreign).max(r / 20.0)
    }

    /// Takes `amount` (negative: gives back), counting it as this store's own use.
    pub(super) fn take(&mut self, amount: f64) {
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
    pub(super) fn observe(&mut self, remaining: f64, now: Instant) {
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
    pub(super) fn begin_window(&mut self, remaining: f64, now: Instant) {
        self.window = Some((now, remaining));
        self.spent = 0.0;
    }

    pub(super) fn at(&mut self, now: Instant) -> f64 {
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
    pub(super) fn full_at(&self) -> Option<Instant> {
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
    pub(super) fn relimit(&mut self, limit: Limit, now: Instant) -> bool {
        if limit == self.limit {
            return false;
        }
        let remains = self.at(now);
        self.limit = limit;
        self.level = remains.min(limit.capacity() as f64);
        // A window across the change would mix two rates, and the server's capacity may have
        // changed with it.
        self.window = None;
        self.peak = 0.0;
        self.anchored = false;
        true
    }
}

/// Tokens a level may lack and still count as enough: absorbs float rounding between two clocks
/// that compute the same refill at different instants (ours and the server's).
pub(super) const EPSILON: f64 = 1e-6;
/// The shortest wait reported: a wait of zero would spin.
pub(super) const MIN_WAIT: Duration = Duration::from_millis(1);

#[derive(Debug)]
pub(super) struct Partition {
    pub(super) levels: [Option<Level>; 4],
    pub(super) learned: [Option<u64>; 4],
    pub(super) cooldown_until: Option<Instant>,
    /// Its key in [`Partitions::idle`]: at or before the instant it is indistinguishable from a
    /// fresh one (every bucket full, no cooldown), from when it may be forgotten.
    pub(super) idle_at: Instant,
    /// Its buckets start empty (a fallback store: no burst at the switch).
    pub(super) start_empty: bool,
    /// A bucket was re-limited since the partition was last re-indexed: it may be idle earlier
    /// than its entry says (a smaller bucket fills sooner).
    pub(super) relimited: bool,
}

impl Partition {
    pub(super) fn new(now: Instant, start_empty: bool) -> Self {
        Self {
            levels: [None; 4],
            learned: [None; 4],
            cooldown_until: None,
            idle_at: now,
            start_empty,
            relimited: false,
        }
    }

    /// When the partition will be idle, as its state stands now.
    pub(super) fn compute_idle_at(&self, now: Instant) -> Instant {
        let never = now + crate::util::FAR_FUTURE;
        let mut at = self.cooldown_until.unwrap_or(now);
        for l in self.levels.iter().flatten() {
            at = at.max(l.full_at().unwrap_or(never).min(never));
        }
        at
    }

    pub(super) fn limit(&self, limits: &Limits, b: Bucket) -> Option<Limit> {
        limits
            .get(b)
            .or(self.learned[b as usize].map(Limit::per_minute))
    }

    /// The bucket for `b` under `limits`, created full or re-limited as needed.
    pub(super) fn level(&mut self, limits: &Limits, b: Bucket, now: Instant) -> Option<&mut Level> {
        let limit = self.limit(limits, b)?;
        let slot = &mut self.levels[b as usize];
        match slot {
            Some(l) => self.relimited |= l.relimit(limit, now),
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
/// forgotten, and not indexed), found in O(log n) when the bound is reached, never by a scan.
///
/// The index may say *earlier* than the truth, never later: a request pushes its partition's idle
/// time later, and re-indexing on every request would cost two tree operations each, so an entry
/// is moved only when it would say later than the truth (a refund, a new limit).
/// [`forget_idle`](Self::forget_idle) corrects the early entries it meets. Since every entry is
/// at or before its truth, an earliest entry after `now` proves no partition is idle yet.
#[derive(Debug, Default)]
pub(super) struct Partitions {
    pub(super) map: HashMap<PartitionKey, Partition>,
    pub(super) idle: BTreeSet<(Instant, PartitionKey)>,
}

impl Partitions {
    /// Partitions that count toward the bound (all but the global cap's).
    pub(super) fn counted(&self) -> usize {
        self.map.len() - usize::from(self.map.contains_key(&PartitionKey::GLOBAL))
    }

    /// Re-indexes `p` after its state changed at `now`, if it will be idle earlier than its entry
    /// says (see the type's docs).
    pub(super) fn touched(&mut self, p: PartitionKey, now: Instant) {
        if p == PartitionKey::GLOBAL {
            return;
        }
        if let Some(part) = self.map.get_mut(&p) {
            part.relimited = false;
            let at = part.compute_idle_at(now);
            if at < part.idle_at {
                self.idle.remove(&(part.idle_at, p));
                self.idle.insert((at, p));
                part.idle_at = at;
            }
        }
    }

    /// Forgets a partition that is idle at `now`; `Err` with how long until one may be if none
    /// is. Entries found early are moved to their true time on the way.
    pub(super) fn forget_idle(&mut self, now: Instant) -> Result<(), Duration> {
        loop {
            let Some((at, oldest)) = self.idle.first().copied() else {
                return Err(crate::util::FAR_FUTURE);
            };
            if at > now {
                return Err(at - now);
            }
            self.idle.remove(&(at, oldest));
            let Some(part) = self.map.get_mut(&oldest) else {
                continue;
            };
            let truth = part.compute_idle_at(now);
            if truth <= now {
                self.map.remove(&oldest);
                return Ok(());
            }
            part.idle_at = truth;
            self.idle.insert((truth, oldest));
        }
    }
}
