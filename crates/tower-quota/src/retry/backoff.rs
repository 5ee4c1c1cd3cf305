//! Exponential backoff with jitter.

use rand::Rng;
use std::time::Duration;

/// How the random part of a delay is drawn. `d` below is `min(max, base * 2^attempt)`.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Jitter {
    /// `d`: no randomness (synchronised retry waves: for tests and comparisons only).
    None,
    /// `d + uniform(0, j)`: the seed recipe's `base * 2^n + uniform(0, 1 s)`. The delay is never
    /// shorter than the exponential part.
    Additive(Duration),
    /// `uniform(0, d)` (AWS "full jitter"): the widest spread, the lowest mean.
    Full,
    /// `d / 2 + uniform(0, d / 2)` (AWS "equal jitter").
    Equal,
    /// `min(max, uniform(base, 3 * previous))` (AWS "decorrelated jitter"), `previous` starting
    /// at `base`.
    Decorrelated,
}

/// An exponential backoff: `min(max, base * 2^attempt)` shaped by a [`Jitter`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    /// The first delay. Default 1 s, as the seed recipe and most SDK guides use.
    pub base: Duration,
    /// The cap on the exponential part. Default 60 s: past a minute, a per-minute quota has fully
    /// refilled, so waiting longer buys nothing.
    pub max: Duration,
    /// The random part. Default [`Jitter::Additive`] of up to 1 s, the seed recipe's.
    pub jitter: Jitter,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
            jitter: Jitter::Additive(Duration::from_secs(1)),
        }
    }
}

/// The longest a backoff's base, cap or jitter may be: an hour. A per-minute quota refills in a
/// minute; a longer pause is a configuration mistake, refused when the layer is built rather than
/// met in a request.
pub(crate) const MAX_SETTING: Duration = Duration::from_secs(3600);

/// Panics with a message naming `what` if `d` is over [`MAX_SETTING`].
pub(crate) fn check_setting(what: &str, d: Duration) {
    assert!(
        d <= MAX_SETTING,
        "{what} of {d:?} is over the {MAX_SETTING:?} a setting may be"
    );
}

impl Backoff {
    /// Panics if `base`, `max` or an additive jitter is over an hour.
    pub(crate) fn check(&self) {
        check_setting("backoff base", self.base);
        check_setting("backoff max", self.max);
        if let Jitter::Additive(j) = self.jitter {
            check_setting("additive jitter", j);
        }
    }

    /// `min(max, base * 2^attempt)`, saturating.
    pub fn exponential(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The delay before retry number `attempt + 1` (`attempt` counts from 0 for the first retry);
    /// `previous` is the last delay (for [`Jitter::Decorrelated`]; pass `base` the first time).
    pub fn delay<R: Rng + ?Sized>(
        &self,
        attempt: u32,
        previous: Duration,
        rng: &mut R,
    ) -> Duration {
        let d = self.exponential(attempt);
        let mut uniform = |hi: Duration| hi.mul_f64(rng.random::<f64>());
        match self.jitter {
            Jitter::None => d,
            Jitter::Additive(j) => d.saturating_add(uniform(j)),
            Jitter::Full => uniform(d),
            Jitter::Equal => d / 2 + uniform(d / 2),
            Jitter::Decorrelated => {
                let hi = previous.max(self.base).saturating_mul(3);
                let span = hi.saturating_sub(self.base);
                self.base.saturating_add(uniform(span)).min(self.max)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn exponential_part_doubles_and_caps() {
        let b = Backoff {
            jitter: Jitter::None,
            ..Backoff::default()
        };
        let got: Vec<u64> = (0..8).map(|n| b.exponential(n).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(b.exponential(200), Duration::from_secs(60));
        let huge = Backoff {
            max: Duration::MAX,
            ..b
        };
        assert_eq!(huge.exponential(40), S * u32::MAX);
    }

    #[test]
    fn every_jitter_mode_follows_its_formula() {
        let mut rng = SmallRng::seed_from_u64(1);
        for attempt in 0..7 {
            for _ in 0..200 {
                let mk = |jitter| Backoff {
                    jitter,
                    ..Backoff::default()
                };
                let d = mk(Jitter::None).exponential(attempt);
                let a = mk(Jitter::Additive(S)).delay(attempt, S, &mut rng);
                assert!(a >= d && a < d + S, "additive {a:?} for {d:?}");
                let f = mk(Jitter::Full).delay(attempt, S, &mut rng);
                assert!(f <= d);
                let e = mk(Jitter::Equal).delay(attempt, S, &mut rng);
                assert!(e >= d / 2 && e <= d);
                let prev = d;
                let c = mk(Jitter::Decorrelated).delay(attempt, prev, &mut rng);
                assert!(c >= S && c <= (prev * 3).min(Duration::from_secs(60)));
            }
        }
    }

    #[test]
    fn seeded_delays_repeat() {
        let b = Backoff::default();
        let run = |seed| {
            let mut rng = SmallRng::seed_from_u64(seed);
            (0..5).map(|n| b.delay(n, S, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(run(9), run(9));
        assert_ne!(run(9), run(10));
    }
}
