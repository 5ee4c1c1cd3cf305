//! A continuously refilling token bucket on tokio's clock.

use std::time::Duration;
use tokio::time::Instant;

/// A token bucket: `capacity` tokens, refilled at `rate` tokens per second. Its level may go below
/// zero when a debit exceeds what an admission checked (real output above the check, for example).
#[derive(Clone, Debug)]
pub(crate) struct TokenBucket {
    capacity: f64,
    rate: f64,
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
            level: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.level = (self.level + dt * self.rate).min(self.capacity);
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
        Duration::try_from_secs_f64(missing / self.rate).ok()
    }

    /// How long until the bucket is full again.
    pub(crate) fn until_full(&mut self, now: Instant) -> Duration {
        let missing = self.capacity - self.level(now);
        if missing <= 0.0 || self.rate <= 0.0 {
            return Duration::ZERO;
        }
        Duration::try_from_secs_f64(missing / self.rate).unwrap_or(Duration::MAX)
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
}
