//! A continuously refilling token bucket on tokio's clock.

use std::time::Duration;
use tokio::time::Instant;

/// A token bucket: `capacity` tokens, refilled at `rate` tokens per second. Its level may go below
/// zero when a debit exceeds what an admission checked (real output above the check, for example).
#[derive(Clone, Debug)]
pub(crate) struct TokenBucket {
    capacity: f64,
    rate: f64,
    /// What another client of the key takes, continuously (per second, below `rate`).
    drain: f64,
    level: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket for `per_minute`, with `capacity = per_minute * burst_fraction`.
    pub(crate) fn per_minute(per_minute: u64, burst_fraction: f64, now: Instant) -> Self {
        let capacity = (per_minute as f64 * burst_fraction).max(1.0);
        Self {
            capacity,
            rate: per_minute as f64 / 60.0,
            drain: 0.0,
            level: capacity,
            last: now,
        }
    }

    /// The limit changes at `now` to `per_minute` (capacity `per_minute * burst_fraction`): what
    /// remains stays, up to the new capacity.
    pub(crate) fn rescale(&mut self, per_minute: u64, burst_fraction: f64, now: Instant) {
        self.refill(now);
        self.capacity = (per_minute as f64 * burst_fraction).max(1.0);
        self.rate = per_minute as f64 / 60.0;
        self.drain = self.drain.min(self.rate * 0.99);
        self.level = self.level.min(self.capacity);
    }

    /// From `now` on, another client takes `per_minute` of the bucket continuously (kept below
    /// the limit: that client is limited too).
    pub(crate) fn set_drain(&mut self, per_minute: u64, now: Instant) {
        self.refill(now);
        self.drain = (per_minute as f64 / 60.0).min(self.rate * 0.99);
    }

    /// What the bucket gains per second: its rate less what the other client takes.
    fn net(&self) -> f64 {
        self.rate - self.drain
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.level = (self.level + dt * self.net()).min(self.capacity);
        self.last = now;
    }

    /// The level now (may be negative).
    pub(crate) fn level(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.level
    }

    pub(crate) fn capacity(&self) -> f64 {
        self.capacity
    }

    pub(crate) fn limit_per_minute(&self) -> u64 {
        (self.rate * 60.0).round() as u64
    }

    /// How long until `amount` is available; `None` if it never fits.
    pub(crate) fn wait_for(&mut self, amount: f64, now: Instant) -> Option<Duration> {
        if amount > self.capacity || self.rate <= 0.0 {
            return None;
        }
        let missing = amount - self.level(now);
        if missing <= 0.0 {
            return Some(Duration::ZERO);
        }
        Duration::try_from_secs_f64(missing / self.net()).ok()
    }

    /// How long until the bucket is full again.
    pub(crate) fn until_full(&mut self, now: Instant) -> Duration {
        let missing = self.capacity - self.level(now);
        if missing <= 0.0 || self.rate <= 0.0 {
            return Duration::ZERO;
        }
        Duration::try_from_secs_f64(missing / self.net()).unwrap_or(Duration::MAX)
    }

    pub(crate) fn debit(&mut self, amount: f64, now: Instant) {
        self.refill(now);
        self.level -= amount;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn refills_continuously() {
        let now = Instant::now();
        let mut b = TokenBucket::per_minute(60, 1.0, now);
        assert_eq!(b.level(now), 60.0);
        b.debit(60.0, now);
        assert_eq!(b.wait_for(1.0, now), Some(Duration::from_secs(1)));
        assert_eq!(b.until_full(now), Duration::from_secs(60));
        let later = now + Duration::from_millis(1500);
        assert!((b.level(later) - 1.5).abs() < 1e-9);
        assert_eq!(b.wait_for(61.0, later), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rescaled_bucket_keeps_what_remains_and_a_drain_slows_its_refill() {
        let now = Instant::now();
        let mut b = TokenBucket::per_minute(1200, 1.0, now);
        b.debit(400.0, now);
        b.rescale(600, 1.0, now);
        assert_eq!(
            b.level(now),
            600.0,
            "800 remained: capped at the new capacity"
        );
        assert_eq!(b.limit_per_minute(), 600);
        b.debit(600.0, now);
        b.set_drain(300, now);
        // 10 a second less the other client's 5.
        assert_eq!(b.wait_for(5.0, now), Some(Duration::from_secs(1)));
    }
}
