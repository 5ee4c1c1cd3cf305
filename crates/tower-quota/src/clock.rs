//! A tokio-backed clock for [governor], so governor's rate limiters run on tokio's (pausable) time.
//!
//! The layers of this crate wait only through `tokio::time`, so a test of a 60-second cooldown
//! runs in milliseconds under `#[tokio::test(start_paused = true)]`. governor reads its own clock;
//! give it [`TokioClock`] and it follows paused time too. The budget's tests use it to check the
//! in-memory buckets against governor's GCRA.
//!
//! [governor]: https://docs.rs/governor

use governor::clock::{Clock, Reference};
use governor::nanos::Nanos;
use std::ops::Add;
use std::time::Duration;
use tokio::time::Instant;

/// A governor [`Clock`] that reads [`tokio::time::Instant::now`].
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioClock;

/// An instant of [`TokioClock`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TokioInstant(pub Instant);

impl Add<Nanos> for TokioInstant {
    type Output = TokioInstant;

    fn add(self, other: Nanos) -> TokioInstant {
        TokioInstant(self.0 + Duration::from_nanos(other.as_u64()))
    }
}

impl Reference for TokioInstant {
    fn duration_since(&self, earlier: Self) -> Nanos {
        self.0.saturating_duration_since(earlier.0).into()
    }

    fn saturating_sub(&self, duration: Nanos) -> Self {
        let d = Duration::from_nanos(duration.as_u64());
        TokioInstant(self.0.checked_sub(d).unwrap_or(self.0))
    }
}

impl Clock for TokioClock {
    type Instant = TokioInstant;

    fn now(&self) -> TokioInstant {
        TokioInstant(Instant::now())
    }
}
