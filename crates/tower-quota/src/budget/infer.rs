//! A request rate inferred from 429s, for servers that send no rate-limit headers.
//!
//! # Why
//!
//! A server that says nothing but `retry-after` lets a client learn its limit only by hitting
//! it: the Retry-After gate then pauses the partition, the refilled bucket is spent in a rush, and
//! the next 429 closes the gate again: about one attempt in ten refused when requests bind. The
//! 429s themselves carry the rate: between two of them the client spent everything the server
//! refilled, so the successes in between, over the time in between, are the server's rate.
//!
//! # How
//!
//! Per partition, while its responses carry no rate-limit header: two 429s at least
//! [`MEASURE_OVER`] apart give a sample, the successes between them over the time between them
//! (the server's bucket was empty at both). The span that follows the first 429 is not measured
//! (it holds the late answers of the burst). The first sample sets the rate (97 % of it); later
//! ones are averaged in by halves. Until then, the first 429 gives a guess: the burst before it,
//! as a minute's worth (a provider whose bucket holds a minute's worth, as Anthropic documents its
//! limits, refills that much a minute), so the rush of retries that follows it is paced at once.
//! The rate is taught to the store as a learned requests limit with nothing remaining (the
//! server just said so), so the bucket refills from empty at that rate and the partition is
//! paced, not refused. Without a 429 for [`PROBE_EVERY`], the rate rises by 2 % (the limit may
//! have risen; the next 429 corrects it). A partition whose responses carry headers is left to
//! them.

use super::Bucket;
use super::store::Learned;
use crate::partition::PartitionKey;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// How long the inferred rate holds without a 429 before it rises by [`PROBE_STEP`].
pub(crate) const PROBE_EVERY: Duration = Duration::from_secs(5);
/// The rise of a probe.
const PROBE_STEP: f64 = 1.02;
/// The shortest span between two 429s that measures the rate.
const MEASURE_OVER: Duration = Duration::from_secs(3);
/// The fewest successes before a first 429 that make a guess of the rate.
const MIN_BURST: u64 = 10;
/// The margin under a measured rate.
const MARGIN: f64 = 0.97;
/// The most partitions inferred at once (beyond, a new partition is not inferred).
const MAX_PARTITIONS: usize = 10_000;

#[derive(Debug)]
struct Partition {
    /// Successes since the current span began.
    ok: u64,
    /// When the current span began (a 429).
    since: Option<Instant>,
    /// The inferred requests per minute, once guessed.
    rpm: Option<f64>,
    /// Whether `rpm` was measured (not only guessed).
    measured: bool,
    /// Whether the span after the first 429 has passed.
    warm: bool,
    /// When the rate was last set or raised.
    moved: Instant,
}

/// The inferred rates of every partition.
#[derive(Debug, Default)]
pub(crate) struct Inference {
    parts: Mutex<HashMap<PartitionKey, Partition>>,
}

/// What a response taught: a learned limit for the store, if any.
pub(crate) type Lesson = Option<Learned>;

impl Inference {
    /// A response of `partition` with no rate-limit header: `rate_limited` if it was a 429.
    pub(crate) fn observe(&self, partition: PartitionKey, rate_limited: bool) -> Lesson {
        let mut parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if !parts.contains_key(&partition) && parts.len() >= MAX_PARTITIONS {
            return None;
        }
        let p = parts.entry(partition).or_insert(Partition {
            ok: 0,
            since: None,
            rpm: None,
            measured: false,
            warm: false,
            moved: now,
        });
        if !rate_limited {
            p.ok += 1;
            let rpm = p.rpm?;
            if now.saturating_duration_since(p.moved) < PROBE_EVERY {
                return None;
            }
            let raised = rpm * PROBE_STEP;
            p.rpm = Some(raised);
            p.moved = now;
            return Some(learned(raised, None));
        }
        // Each 429 says the server's bucket is empty now: between two of them, the successes
        // are what it refilled. Spans shorter than MEASURE_OVER are too noisy to measure (a span
        // goes on until one is long enough).
        let Some(start) = p.since else {
            p.since = Some(now);
            let burst = std::mem::take(&mut p.ok);
            if burst < MIN_BURST {
                return None;
            }
            let guess = burst as f64 * MARGIN;
            p.rpm = Some(guess);
            p.moved = now;
            return Some(learned(guess, Some(0)));
        };
        let dt = now.saturating_duration_since(start);
        if dt >= MEASURE_OVER {
            if p.warm {
                let sample = p.ok as f64 / dt.as_secs_f64() * 60.0 * MARGIN;
                p.rpm = Some(match p.rpm {
                    Some(r) if p.measured => (r + sample) / 2.0,
                    _ => sample,
                });
                p.measured = true;
                p.moved = now;
            }
            p.warm = true;
            p.since = Some(now);
            p.ok = 0;
        }
        // Known: the bucket restarts from empty, as the server's just did.
        p.rpm.map(|rpm| learned(rpm, Some(0)))
    }
}

fn learned(rpm: f64, remaining: Option<u64>) -> Learned {
    Learned {
        bucket: Bucket::Requests,
        limit: Some((rpm.round() as u64).max(1)),
        remaining,
        inferred: true,
        unseen: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` successes over `secs` seconds (a success may raise the rate by a probe: it teaches
    /// a limit, never a count), then a 429.
    async fn span(inf: &Inference, p: PartitionKey, n: u32, secs: u32) -> Lesson {
        for _ in 0..n {
            tokio::time::advance(Duration::from_secs(secs.into()) / n).await;
            if let Some(l) = inf.observe(p, false) {
                assert_eq!(l.remaining, None);
            }
        }
        inf.observe(p, true)
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_is_the_successes_between_two_429s() {
        let inf = Inference::default();
        let p = PartitionKey::from_u64(1);
        // A burst of 60, then the first 429: a guess of 60 a minute (less 3 %), from empty.
        let l = span(&inf, p, 60, 1).await.unwrap();
        assert_eq!(
            (l.limit, l.remaining, l.inferred),
            (Some(58), Some(0), true)
        );
        // The span after it holds the burst's late answers: not measured.
        let l = span(&inf, p, 40, 3).await.unwrap();
        assert_eq!(l.limit, Some(58));
        // 40 in 4 s: 600 a minute, less 3 %: the first sample replaces the guess (and the probe
        // that raised it meanwhile).
        let l = span(&inf, p, 40, 4).await.unwrap();
        assert_eq!((l.limit, l.remaining), (Some(582), Some(0)));
        // 20 in 4 s: 291, averaged with 582.
        let l = span(&inf, p, 20, 4).await.unwrap();
        assert_eq!(l.limit, Some(437));
        // A 429 too soon after: nothing measured, the bucket still restarts empty.
        let l = inf.observe(p, true).unwrap();
        assert_eq!((l.limit, l.remaining), (Some(437), Some(0)));
        // No 429 for 5 s: a probe raises it by 2 %.
        tokio::time::advance(PROBE_EVERY).await;
        let l = inf.observe(p, false).unwrap();
        assert_eq!((l.limit, l.remaining), (Some(445), None));
    }
}
