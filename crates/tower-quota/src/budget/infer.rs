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
//! [`MEASURE_OVER`] apart give a sample, the successes answered between them over the time
//! between them (the server's bucket was empty at both; a span's last answers arrive in the next
//! one and the previous span's in this one, which evens out). Answers to requests sent before the
//! first 429 (the burst's) count in no span. The first sample sets the rate (96 % of it), later
//! ones are averaged in by halves. The rate is taught to the store as a learned requests limit
//! with nothing remaining (the server just said so), so the bucket refills from empty at that
//! rate and the partition is paced, not refused. Without a 429 for [`PROBE_EVERY`], the rate
//! rises by 2 % (the limit may have risen; the next 429 corrects it). A partition whose
//! responses carry headers is left to them.
//!
//! No guess is made before the first sample: a guess from the burst (a bucket of a minute's
//! worth) was ten times too low for a server whose bucket holds six seconds, and a rate paced too
//! low never meets the 429 that would correct it.

use super::Bucket;
use super::store::Learned;
use crate::partition::PartitionKey;
use crate::util::Sweep;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// How long the inferred rate holds without a 429 before it rises by [`PROBE_STEP`].
pub(crate) const PROBE_EVERY: Duration = Duration::from_secs(10);
/// The rise of a probe.
const PROBE_STEP: f64 = 1.02;
/// The shortest span between two 429s that measures the rate.
const MEASURE_OVER: Duration = Duration::from_secs(2);
/// The margin under a measured rate.
const MARGIN: f64 = 0.96;
/// The most partitions inferred at once (beyond, a new partition is not inferred).
const MAX_PARTITIONS: usize = 10_000;
/// How long a partition with no answer is remembered (its learned limit stays in the store).
const FORGET_AFTER: Duration = Duration::from_secs(3600);

#[derive(Debug)]
struct Partition {
    /// Successes since the current span began.
    ok: u64,
    /// When the current span began (a 429).
    since: Option<Instant>,
    /// When the first 429 came: answers to requests sent before it are the burst's.
    first: Option<Instant>,
    /// The inferred requests per minute, once measured.
    rpm: Option<f64>,
    /// When the rate was last set or raised.
    moved: Instant,
    /// Its last answer.
    seen: Instant,
}

/// The inferred rates of every partition.
#[derive(Debug)]
pub(crate) struct Inference {
    /// Whether any partition has had a 429 without headers: until then a success teaches
    /// nothing, and is not even looked up (the common case: a server that sends headers, or one
    /// that never refused).
    armed: AtomicBool,
    parts: Mutex<HashMap<PartitionKey, Partition>>,
    /// When to forget the partitions idle for [`FORGET_AFTER`].
    sweep: Sweep,
}

impl Default for Inference {
    fn default() -> Self {
        Self {
            armed: AtomicBool::new(false),
            parts: Mutex::new(HashMap::new()),
            sweep: Sweep::new(1024),
        }
    }
}

/// What a response taught: a learned limit for the store, if any.
pub(crate) type Lesson = Option<Learned>;

impl Inference {
    /// A response of `partition` with no rate-limit header, to a request that left for the wire
    /// at `sent`: `rate_limited` if it was a 429.
    pub(crate) fn observe(
        &self,
        partition: PartitionKey,
        rate_limited: bool,
        sent: Instant,
    ) -> Lesson {
        if rate_limited {
            self.armed.store(true, Ordering::Relaxed);
        } else if !self.armed.load(Ordering::Relaxed) {
            return None;
        }
        let mut parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if !parts.contains_key(&partition) {
            // Swept as the map grows (amortised), and at the bound (a scan for each new
            // partition only while the map is full of partitions answered within the hour).
            if self.sweep.due(parts.len()) || parts.len() >= MAX_PARTITIONS {
                parts.retain(|_, p| now.saturating_duration_since(p.seen) < FORGET_AFTER);
                self.sweep.swept(parts.len());
            }
            if parts.len() >= MAX_PARTITIONS {
                return None;
            }
        }
        let p = parts.entry(partition).or_insert(Partition {
            ok: 0,
            since: None,
            first: None,
            rpm: None,
            moved: now,
            seen: now,
        });
        p.seen = now;
        if !rate_limited {
            // Counted when answered: a span's last answers count in the next one and the
            // previous span's in this one, which evens out; but never the answers of the burst
            // (the requests sent before the first 429).
            if p.first.is_some_and(|f| sent >= f) {
                p.ok += 1;
            }
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
            p.first = Some(now);
            p.ok = 0;
            return None;
        };
        let dt = now.saturating_duration_since(start);
        if dt >= MEASURE_OVER {
            let sample = p.ok as f64 / dt.as_secs_f64() * 60.0 * MARGIN;
            p.rpm = Some(p.rpm.map_or(sample, |r| (r + sample) / 2.0));
            p.moved = now;
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

    /// `n` successes over `secs` seconds (a success may raise the rate by a probe: it teaches a
    /// limit, never a count), then a 429.
    async fn span(inf: &Inference, p: PartitionKey, n: u32, secs: u32) -> Lesson {
        for _ in 0..n {
            tokio::time::advance(Duration::from_secs(secs.into()) / n).await;
            if let Some(l) = inf.observe(p, false, Instant::now()) {
                assert_eq!(l.remaining, None);
            }
        }
        inf.observe(p, true, Instant::now())
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_is_the_successes_between_two_429s() {
        let inf = Inference::default();
        let p = PartitionKey::from_u64(1);
        let before = Instant::now();
        // The burst, then the first 429: nothing known yet.
        assert_eq!(span(&inf, p, 60, 1).await, None);
        // A late answer of the burst counts in no span; a span too short measures nothing.
        assert_eq!(inf.observe(p, false, before), None);
        assert_eq!(span(&inf, p, 10, 1).await, None);
        // 10 more in 1 s: 20 in 2 s, 600 a minute, less 4 %; the bucket restarts empty.
        let l = span(&inf, p, 10, 1).await.unwrap();
        assert_eq!(
            (l.limit, l.remaining, l.inferred),
            (Some(576), Some(0), true)
        );
        // 10 in 2 s: 288, averaged with 576.
        let l = span(&inf, p, 10, 2).await.unwrap();
        assert_eq!(l.limit, Some(432));
        // A 429 too soon after: nothing measured, the bucket still restarts empty.
        let l = inf.observe(p, true, Instant::now()).unwrap();
        assert_eq!((l.limit, l.remaining), (Some(432), Some(0)));
        // No 429 for 10 s: a probe raises it by 2 %.
        tokio::time::advance(PROBE_EVERY).await;
        let l = inf.observe(p, false, Instant::now()).unwrap();
        assert_eq!((l.limit, l.remaining), (Some(441), None));
    }

    #[tokio::test(start_paused = true)]
    async fn partitions_idle_for_an_hour_are_forgotten_to_make_room() {
        let inf = Inference::default();
        for n in 0..MAX_PARTITIONS as u64 {
            let _ = inf.observe(PartitionKey::from_u64(n), true, Instant::now());
        }
        let late = PartitionKey::from_u64(u64::MAX);
        // Full of partitions answered just now: a new one is not inferred.
        assert_eq!(inf.observe(late, true, Instant::now()), None);
        assert!(!inf.parts.lock().unwrap().contains_key(&late));
        // An hour later they are idle: the next new partition sweeps them out.
        tokio::time::advance(FORGET_AFTER).await;
        assert_eq!(inf.observe(late, true, Instant::now()), None);
        let parts = inf.parts.lock().unwrap();
        assert_eq!(parts.len(), 1);
        assert!(parts.contains_key(&late));
    }
}
