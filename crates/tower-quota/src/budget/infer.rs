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
//! [`MEASURE_OVER`] apart give a sample, `successes / elapsed` between them (the server's bucket
//! was empty at both); the inferred rate is 97 % of it, averaged with the current rate by halves.
//! It is taught to the store as a
//! learned requests limit with nothing remaining (the server just said so), so the bucket refills
//! from empty at that rate and the partition is paced, not refused. Without a 429 for
//! [`PROBE_EVERY`], the rate rises by 2 % (the limit may have risen; the next 429 corrects it).
//! A partition whose responses carry headers is left to them.

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
/// The fewest successes before a first 429 that make a first guess of the rate.
const MIN_BURST: u64 = 10;
/// The margin under a measured rate.
const MARGIN: f64 = 0.97;
/// The most partitions inferred at once (beyond, a new partition is not inferred).
const MAX_PARTITIONS: usize = 10_000;

#[derive(Debug)]
struct Partition {
    /// Successes since the last 429 event.
    ok: u64,
    /// When the last 429 event came.
    last_429: Option<Instant>,
    /// The inferred requests per minute, once measured.
    rpm: Option<f64>,
    /// When the rate was last set or raised.
    moved: Instant,
    /// Whether a first span between 429s has passed (the first holds the burst's answers).
    warm: bool,
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
            last_429: None,
            rpm: None,
            moved: now,
            warm: false,
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
        // Each 429 says the server's bucket is empty now: between two of them, the successes are
        // what it refilled. Measured over at least MEASURE_OVER (shorter spans are noisy: the
        // answers of requests sent before a 429 arrive after it).
        let Some(start) = p.last_429 else {
            // The first 429: what came before was the burst, a bucket's capacity. A provider
            // whose bucket holds a minute's worth (Anthropic documents its limits so) refills that
            // much a minute: a first guess, so the retries of this rush are paced at once; the
            // spans between later 429s measure the rate.
            p.last_429 = Some(now);
            let burst = std::mem::take(&mut p.ok);
            if burst < MIN_BURST {
                return None;
            }
            let rpm = burst as f64 * MARGIN;
            p.rpm = Some(rpm);
            p.moved = now;
            return Some(learned(rpm, Some(0)));
        };
        let dt = now.saturating_duration_since(start);
        if dt >= MEASURE_OVER {
            if p.warm {
                let measured = p.ok as f64 / dt.as_secs_f64() * 60.0 * MARGIN;
                let rpm = p.rpm.map_or(measured, |r| (r + measured) / 2.0);
                p.rpm = Some(rpm);
                p.moved = now;
            }
            // The first span still holds the burst's answers: it is not measured.
            p.warm = true;
            p.last_429 = Some(now);
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

    /// `n` successes over `secs` seconds, then a 429: what it teaches.
    async fn span(inf: &Inference, p: PartitionKey, n: u32, secs: u32) -> Lesson {
        for _ in 0..n {
            tokio::time::advance(Duration::from_secs(secs.into()) / n).await;
            assert_eq!(inf.observe(p, false), None);
        }
        inf.observe(p, true)
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_is_the_successes_between_two_429s() {
        let inf = Inference::default();
        let p = PartitionKey::from_u64(1);
        // The first 429 (after the burst) teaches nothing, nor one too soon after it, nor the end
        // of the first span (it holds the burst's answers).
        assert_eq!(inf.observe(p, true), None);
        assert_eq!(span(&inf, p, 10, 1).await, None);
        assert_eq!(span(&inf, p, 20, 2).await, None);
        // 40 in 4 s: 600 a minute, less 3 %; the bucket restarts empty.
        let l = span(&inf, p, 40, 4).await.unwrap();
        assert_eq!(
            (l.limit, l.remaining, l.inferred),
            (Some(582), Some(0), true)
        );
        // 20 in 4 s: 291, averaged with 582.
        let l = span(&inf, p, 20, 4).await.unwrap();
        assert_eq!(l.limit, Some(437));
        // No 429 for 5 s: a probe raises it by 2 %.
        tokio::time::advance(PROBE_EVERY).await;
        let l = inf.observe(p, false).unwrap();
        assert_eq!((l.limit, l.remaining), (Some(445), None));
    }
}
