//! One concurrency limit: a FIFO semaphore whose size follows a fixed or an AIMD policy.

use crate::classify::Outcome;
use crate::error::QueueFull;
use crate::metrics::LimiterMetrics;
use crate::partition::PartitionKey;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// How the limit moves.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum LimitKind {
    /// A fixed number of requests in flight.
    Fixed(usize),
    /// Additive increase, multiplicative decrease (see [`Aimd`]).
    Aimd(Aimd),
}

/// Adaptive limit parameters: grow by one per round trip while the limit is reached without
/// back-pressure; multiply by `decrease_ratio` on back-pressure (429, 529/503, timeouts), at most
/// once per round trip; stay within `[min, max]`. Within one of the limit where back-pressure last
/// came, growth is ten times slower (one per ten round trips) until the limit passes it: against a
/// server capped at 10 concurrent requests this cut the share of 529s from 6.8 % to 1.0 % in the
/// admission tests, with the same throughput.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Aimd {
    /// The starting limit. Default 8: enough to fill a small quota's burst without flooding it.
    pub initial: usize,
    /// The floor. Default 1.
    pub min: usize,
    /// The ceiling. Default 200 (Vector's).
    pub max: usize,
    /// The factor applied on back-pressure. Default 0.9 (Vector's, gentler than TCP's 0.5, since a
    /// 429 says "a little less", not "the path is congested").
    pub decrease_ratio: f64,
    /// Latency as back-pressure: while every slot is busy and the smoothed round trip (send to
    /// response headers) is over this many times the shortest seen lately, the limit decreases
    /// as on a 529 (at most once a round trip) instead of growing. A server that slows as it
    /// fills up (it queues, or shares its time) is then held near where it starts to slow, before
    /// it refuses. `None` (the default): round trips never move the limit.
    ///
    /// Off by default because an LLM API's round trip to the headers of a request that is not
    /// streamed grows with the output it generates: requests of mixed sizes look like a slowing
    /// server. Turn it on for streamed requests (their headers come at the first token) or
    /// requests of one size. Measured against a simulated server that shares its time beyond 10
    /// requests and refuses beyond 20 (`cargo test -p tests --test admission
    /// a_latency_tolerance -- --nocapture`), a tolerance of 1.5 held the limit at 14 instead of
    /// 20, round trips at 166 ms instead of 200, and 529s at 2 of 2 000 instead of 8, with the
    /// same throughput: the server's capacity bounds it either way, so a caller waits as long.
    pub latency_tolerance: Option<f64>,
}

impl Default for Aimd {
    fn default() -> Self {
        Self {
            initial: 8,
            min: 1,
            max: 200,
            decrease_ratio: 0.9,
            latency_tolerance: None,
        }
    }
}

#[derive(Debug)]
struct State {
    limit: f64,
    /// Permits in existence (available plus held), debt included.
    issued: usize,
    /// Permits to forget as they come back, because the limit went down while they were held.
    debt: usize,
    last_decrease: Option<Instant>,
    /// The limit at the last back-pressure: growth slows down near it.
    ceiling: Option<f64>,
}

#[derive(Debug)]
pub(crate) struct Limiter {
    sem: Arc<Semaphore>,
    policy: LimitKind,
    state: Mutex<State>,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) queued: AtomicUsize,
    /// The whole limit, published on every change (read without the lock per request).
    whole: AtomicUsize,
    /// Whether permits are owed (`State::debt > 0`), published on every change: a release locks
    /// only then.
    owing: AtomicBool,
    /// The smoothed round trip (send to response headers) in microseconds, 0 before the first:
    /// every policy measures it, for the live state.
    smoothed_rtt_us: AtomicU64,
    /// The shortest round trip seen lately in microseconds (0 before the first): it drops to a
    /// shorter one at once and drifts up toward longer ones by 1/256 of the gap each, so a path
    /// that became slower for good is taken as the new normal within a few hundred answers.
    floor_rtt_us: AtomicU64,
    /// Its handles in the `metrics` facade.
    pub(crate) metrics: LimiterMetrics,
}

impl LimitKind {
    /// The limit a limiter starts at (an adaptive one's `initial`, within its bounds).
    fn initial(self) -> usize {
        match self {
            LimitKind::Fixed(n) => n,
            LimitKind::Aimd(a) => a.initial.clamp(a.min.max(1), a.max.max(1)),
        }
    }
}

impl Limiter {
    /// A limiter whose metrics carry the `partition` label `label`.
    pub(crate) fn new(policy: LimitKind, label: metrics::SharedString) -> Arc<Self> {
        let initial = policy.initial();
        let metrics = LimiterMetrics::new(label);
        metrics.limit.set(initial as f64);
        Arc::new(Self {
            sem: Arc::new(Semaphore::new(initial)),
            policy,
            state: Mutex::new(State {
                limit: initial as f64,
                issued: initial,
                debt: 0,
                last_decrease: None,
                ceiling: None,
            }),
            in_flight: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            whole: AtomicUsize::new(initial),
            owing: AtomicBool::new(false),
            smoothed_rtt_us: AtomicU64::new(0),
            floor_rtt_us: AtomicU64::new(0),
            metrics,
        })
    }

    /// Whether the policy adapts (so outcomes and round-trip times matter).
    pub(crate) fn adapts(&self) -> bool {
        matches!(self.policy, LimitKind::Aimd(_))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The refusal of a request that found `waiting` requests queued here: `retry_at` estimates
    /// the round trips they need, `waiting / limit + 1` of the smoothed round trip (a second
    /// before one is known).
    pub(crate) fn queue_full(&self, partition: PartitionKey, waiting: usize) -> QueueFull {
        let rtt = self.smoothed_rtt().unwrap_or(Duration::from_secs(1));
        let rounds = waiting / self.limit().max(1) + 1;
        let now = Instant::now();
        let ahead = rtt.saturating_mul(u32::try_from(rounds).unwrap_or(u32::MAX));
        QueueFull::new(
            "concurrency",
            partition,
            waiting,
            now.checked_add(ahead).unwrap_or(now),
        )
    }

    /// The current limit (whole requests).
    pub(crate) fn limit(&self) -> usize {
        self.whole.load(Ordering::SeqCst)
    }

    /// Whether the limiter is as good as a new one: nothing held or waiting, and its limit back
    /// where it starts (so forgetting it forgets nothing it learned).
    pub(crate) fn is_fresh(&self) -> bool {
        let initial = self.policy.initial();
        self.in_flight.load(Ordering::SeqCst) == 0
            && self.queued.load(Ordering::SeqCst) == 0
            && self.limit() == initial
    }

    pub(crate) fn semaphore(&self) -> Arc<Semaphore> {
        self.sem.clone()
    }

    /// Called with a permit just acquired: counts it in flight; returns whether the limit is
    /// reached (the signal that allows growth).
    pub(crate) fn acquired(&self) -> bool {
        self.metrics.in_flight.increment(1.0);
        let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        n >= self.limit()
    }

    /// Returns a permit: forgets it if the limit shrank while it was held.
    /// Gives back a slot whose permit was forgotten when taken: the permit returns to the
    /// semaphore, unless the limit shrank while it was held (then it pays the debt).
    pub(crate) fn release(&self) {
        self.metrics.in_flight.decrement(1.0);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        // A debt set just after this check is paid by the next release instead.
        if self.owing.load(Ordering::SeqCst) {
            let mut s = self.lock();
            if s.debt > 0 {
                s.debt -= 1;
                s.issued -= 1;
                self.owing.store(s.debt > 0, Ordering::SeqCst);
                return;
            }
        }
        self.sem.add_permits(1);
    }

    /// One attempt's round trip to its response headers: smoothed (weights 0.8 / 0.2) for the
    /// adaptive policy, the queue's `retry_at` estimate and the live state; recorded in the
    /// metrics.
    pub(crate) fn round_trip(&self, rtt: Duration) {
        self.metrics.to_headers.record(rtt.as_secs_f64());
        let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .smoothed_rtt_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |prev| {
                Some(if prev == 0 { us } else { (prev * 4 + us) / 5 })
            });
        if self.latency_tolerance().is_some() {
            let _ = self
                .floor_rtt_us
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |floor| {
                    Some(if floor == 0 || us < floor {
                        us
                    } else {
                        floor + (us - floor) / 256
                    })
                });
        }
    }

    fn latency_tolerance(&self) -> Option<f64> {
        match self.policy {
            LimitKind::Aimd(a) => a.latency_tolerance,
            LimitKind::Fixed(_) => None,
        }
    }

    /// Whether the smoothed round trip is over the policy's tolerance of the shortest seen lately.
    fn inflated(&self, smoothed: Duration) -> bool {
        let floor = self.floor_rtt_us.load(Ordering::Relaxed);
        self.latency_tolerance().is_some_and(|tolerance| {
            floor > 0 && smoothed.as_micros() as f64 > tolerance * floor as f64
        })
    }

    /// The smoothed round trip to the response headers, once one was measured.
    pub(crate) fn smoothed_rtt(&self) -> Option<Duration> {
        match self.smoothed_rtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Feeds one attempt's outcome and round-trip time to the policy.
    #[cfg(test)]
    pub(crate) fn observe(&self, outcome: Outcome, rtt: Duration, saturated: bool) {
        self.round_trip(rtt);
        self.observe_at(outcome, saturated, Instant::now());
    }

    /// Feeds one attempt's outcome to the policy, after its round trip was given to
    /// [`round_trip`](Self::round_trip). `now`: the instant the answer came.
    pub(crate) fn observe_at(&self, outcome: Outcome, saturated: bool, now: Instant) {
        let LimitKind::Aimd(a) = self.policy else {
            return;
        };
        let smoothed = self.smoothed_rtt().unwrap_or_default();
        let mut s = self.lock();
        let (min, max) = (a.min.max(1) as f64, a.max.max(1) as f64);
        // A saturated answer that took too long is back-pressure too (see `Aimd::latency_tolerance`).
        let slow = outcome == Outcome::Success && saturated && self.inflated(smoothed);
        if outcome.is_backpressure() || slow {
            let recent = s
                .last_decrease
                .is_some_and(|t| now.saturating_duration_since(t) < smoothed);
            if !recent {
                s.ceiling = Some(s.limit);
                s.limit = (s.limit * a.decrease_ratio).max(min);
                s.last_decrease = Some(now);
                tracing::debug!(limit = s.limit, ?outcome, "concurrency: decrease");
            }
        } else if outcome == Outcome::Success && saturated {
            // +1/limit per response: about +1 per round trip while every slot is busy; within one
            // of the limit that last met back-pressure, ten times slower, so the limit probes a
            // known ceiling gently instead of hitting it every few round trips.
            let step = match s.ceiling {
                Some(c) if s.limit + 1.0 >= c => {
                    if s.limit > c {
                        s.ceiling = None; // past it: the ceiling has lifted
                    }
                    0.1
                }
                _ => 1.0,
            };
            s.limit = (s.limit + step / s.limit).min(max);
        }
        self.resize(&mut s);
    }

    fn resize(&self, s: &mut State) {
        let target = s.limit.floor().max(1.0) as usize;
        let live = s.issued - s.debt;
        if target > live {
            // Pay off debt first, then add permits.
            let mut grow = target - live;
            let from_debt = grow.min(s.debt);
            s.debt -= from_debt;
            grow -= from_debt;
            if grow > 0 {
                self.sem.add_permits(grow);
                s.issued += grow;
            }
        } else if target < live {
            let mut shrink = live - target;
            while shrink > 0 {
                match self.sem.clone().try_acquire_owned() {
                    Ok(p) => {
                        p.forget();
                        s.issued -= 1;
                        shrink -= 1;
                    }
                    Err(_) => break,
                }
            }
            s.debt += shrink;
        }
        self.whole.store(s.limit as usize, Ordering::SeqCst);
        self.metrics.limit.set(s.limit.floor().max(1.0));
        self.owing.store(s.debt > 0, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn aimd_grows_when_saturated_and_shrinks_on_backpressure() {
        let l = Limiter::new(
            LimitKind::Aimd(Aimd {
                initial: 4,
                min: 2,
                max: 6,
                decrease_ratio: 0.5,
                latency_tolerance: None,
            }),
            metrics::SharedString::const_str("test"),
        );
        let rtt = Duration::from_millis(100);
        for _ in 0..40 {
            l.observe(Outcome::Success, rtt, true);
        }
        assert_eq!(l.limit(), 6);
        assert_eq!(l.sem.available_permits(), 6);
        // Unsaturated successes do not grow it.
        l.observe(Outcome::RateLimited, rtt, false);
        assert_eq!(l.limit(), 3);
        // A second 429 within the same round trip does not shrink it again.
        l.observe(Outcome::RateLimited, rtt, false);
        assert_eq!(l.limit(), 3);
        tokio::time::advance(rtt).await;
        l.observe(Outcome::Overloaded, rtt, false);
        assert_eq!(l.limit(), 2);
        assert_eq!(l.sem.available_permits(), 2);
    }

    #[tokio::test]
    async fn shrinking_while_permits_are_held_forgets_them_on_release() {
        let l = Limiter::new(
            LimitKind::Aimd(Aimd {
                initial: 4,
                min: 1,
                max: 4,
                decrease_ratio: 0.5,
                latency_tolerance: None,
            }),
            metrics::SharedString::const_str("test"),
        );
        for _ in 0..4 {
            l.sem.clone().try_acquire_owned().unwrap().forget();
            l.acquired();
        }
        l.observe(Outcome::RateLimited, Duration::from_millis(1), false);
        assert_eq!(l.limit(), 2);
        for _ in 0..4 {
            l.release();
        }
        assert_eq!(l.sem.available_permits(), 2);
        // Idle, but it learned to back off: not as good as new, so never forgotten.
        assert!(!l.is_fresh());
    }
}
