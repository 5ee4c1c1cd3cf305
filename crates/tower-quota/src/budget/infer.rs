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
//! Per partition, while its responses carry no rate-limit header: two 429s sent at least
//! [`MEASURE_OVER`] apart give a sample, the successes *sent* between them over the time between
//! their sending (the server's bucket was empty when each 429 arrived). Counting by send time
//! matters: a 429 comes back faster than a success, so a span counted by answer misses its last
//! successes (17 counted of 21 in the run, a rate 20 % low that nothing corrects). A
//! closed span is measured once an answer to a request sent after its end arrives (its own
//! answers are in by then, nearly), and again for each of its answers that comes later still.
//! Answers to requests sent before the first 429 (the burst's) count in no span. The first
//! sample sets the rate (98 % of it); later ones are weighed in by their length (a span of
//! [`WEIGH_OVER`] as much as the rate before it, a longer one more). The rate is taught to the
//! store as a learned requests limit with nothing remaining (at a 429, and at a measurement: what
//! the server refilled since the span's end went to the requests sent since, those in flight
//! included), so the partition is paced, not refused. Without a 429 for [`PROBE_EVERY`], the
//! rate rises by 2 % (the limit may have risen; the next 429 corrects it). A partition whose
//! responses carry headers is left to them.
//!
//! Until the first sample the partition is admitted blind: the budget lets only a few of its
//! admitted requests wait in the layers inside (the budget's `BLIND_HELD`), so no admitted
//! backlog waits there to leave in rushes once the rate is known.
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
/// A later sample of a span this long weighs as much as the rate before it (shorter ones less,
/// longer ones more).
const WEIGH_OVER: Duration = Duration::from_secs(4);
/// The margin under a measured rate.
const MARGIN: f64 = 0.98;
/// The most partitions inferred at once (beyond, a new partition is not inferred).
const MAX_PARTITIONS: usize = 10_000;
/// How long a partition with no answer is remembered (its learned limit stays in the store).
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// A span between two 429s, counted by send time.
#[derive(Debug, Clone, Copy)]
struct Span {
    /// When the 429s that begin and end it were sent.
    start: Instant,
    end: Instant,
    /// The successes sent within it, answered so far.
    ok: u64,
    /// The rate before it was measured, once it is: a success of it answered later measures it
    /// again.
    base: Option<Option<f64>>,
}

#[derive(Debug)]
struct Partition {
    /// The current span: begun when the 429 that began it was sent, and the successes sent since.
    since: Option<Instant>,
    ok: u64,
    /// The span a 429 last ended: its requests still in flight are counted as they are answered.
    /// It is measured once an answer to a request sent after its end arrives (or
    /// [`MEASURE_OVER`] after its end, whichever comes first), and measured again for each of
    /// its successes answered after that (answers overtake each other).
    closed: Option<Span>,
    /// When the first 429 was sent: answers to requests sent before it are the burst's.
    first: Option<Instant>,
    /// The inferred requests per minute, once measured.
    rpm: Option<f64>,
    /// When the rate was last set or raised.
    moved: Instant,
    /// Its last answer.
    seen: Instant,
}

impl Partition {
    /// Measures the closed span (again, if it was): its successes over its length, weighed by
    /// that length against the rate before it ([`WEIGH_OVER`]).
    fn measure(&mut self, now: Instant) -> Option<f64> {
        let span = self.closed.as_mut()?;
        let base = *span.base.get_or_insert(self.rpm);
        let dt = span.end.saturating_duration_since(span.start).as_secs_f64();
        let sample = span.ok as f64 / dt * 60.0 * MARGIN;
        // Weighed by length: a span of 20 s says more than one of 2 s.
        let w = dt / (dt + WEIGH_OVER.as_secs_f64());
        let rpm = base.map_or(sample, |r| r + w * (sample - r));
        self.rpm = Some(rpm);
        self.moved = now;
        Some(rpm)
    }
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
            since: None,
            ok: 0,
            closed: None,
            first: None,
            rpm: None,
            moved: now,
            seen: now,
        });
        p.seen = now;
        // A span is counted by when its requests were sent, both ends and the successes
        // within: the server's bucket was empty when each end arrived, so what succeeded in
        // between is what it refilled. An answer to a request sent after the closed span's end
        // says the span's own answers are in (nearly: a later one measures it again).
        let unmeasured = p.closed.filter(|c| c.base.is_none());
        let settled = unmeasured.is_some_and(|c| {
            (sent > c.end && !rate_limited) || now.saturating_duration_since(c.end) >= MEASURE_OVER
        });
        if !rate_limited {
            match p.closed.as_mut() {
                Some(c) if sent > c.start && sent <= c.end => {
                    c.ok += 1;
                    if c.base.is_some() {
                        // A late answer of a measured span: measured again, the count kept.
                        return p.measure(now).map(|rpm| learned(rpm, None));
                    }
                }
                _ if p.since.is_some_and(|s| sent > s) => p.ok += 1,
                _ => {}
            }
            if settled {
                // The measured rate, and nothing left: what the server refilled since the span's
                // end went to the requests sent since (those in flight too, which no count here
                // sees); the level is pulled down to it, less what is still held inside.
                return p.measure(now).map(|rpm| learned(rpm, Some(0)));
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
        if settled {
            p.measure(now);
        }
        let Some(start) = p.since else {
            p.since = Some(sent);
            p.first = Some(sent);
            return None;
        };
        // Spans shorter than MEASURE_OVER are too noisy to measure (a span goes on until one is
        // long enough); 429s sent together end one span, and a span ends only once the one
        // before it is measured.
        let measured = p.closed.is_none_or(|c| c.base.is_some());
        if sent.saturating_duration_since(start) >= MEASURE_OVER && measured {
            p.closed = Some(Span {
                start,
                end: sent,
                ok: p.ok,
                base: None,
            });
            p.since = Some(sent);
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
    async fn the_rate_is_the_successes_sent_between_two_429s() {
        let inf = Inference::default();
        let p = PartitionKey::from_u64(1);
        let before = Instant::now();
        // The burst, then the first 429: nothing known yet.
        assert_eq!(span(&inf, p, 60, 1).await, None);
        // A late answer of the burst counts in no span; a span too short measures nothing.
        assert_eq!(inf.observe(p, false, before), None);
        assert_eq!(span(&inf, p, 10, 1).await, None);
        // 10 more in 1 s: the span (2 s) closes, but its answers may not all be in.
        assert_eq!(span(&inf, p, 10, 1).await, None);
        let end = Instant::now();
        // A 429 sent after the end, answered first (429s are quick), settles nothing; a success
        // sent before the end and answered after it counts in the closed span.
        tokio::time::advance(Duration::from_millis(10)).await;
        assert_eq!(inf.observe(p, true, Instant::now()), None);
        assert_eq!(inf.observe(p, false, end - Duration::from_millis(5)), None);
        // An answer to a request sent after the end settles it: 21 in 2 s, 630 a minute, less
        // 2 %; nothing remains (what was refilled since went to the requests sent since).
        tokio::time::advance(Duration::from_millis(490)).await;
        let l = inf.observe(p, false, Instant::now()).unwrap();
        assert_eq!(
            (l.limit, l.remaining, l.inferred),
            (Some(617), Some(0), true)
        );
        // A success of the span answered later still: 22 in 2 s, measured again (the count is
        // left alone).
        let l = inf
            .observe(p, false, end - Duration::from_millis(1))
            .unwrap();
        assert_eq!((l.limit, l.remaining), (Some(647), None));
        // A 429 too soon after the last span's end: nothing measured, the bucket restarts empty.
        let l = inf.observe(p, true, Instant::now()).unwrap();
        assert_eq!((l.limit, l.remaining), (Some(647), Some(0)));
        // 10 in 2 s and the 1 above, over the 2.5 s since the end: 259, weighed 2.5 to 4 with 647.
        let l = span(&inf, p, 10, 2).await.unwrap();
        assert_eq!((l.limit, l.remaining), (Some(647), Some(0)));
        tokio::time::advance(Duration::from_millis(1)).await;
        let l = inf.observe(p, false, Instant::now()).unwrap();
        assert_eq!(l.limit, Some(498));
        // No 429 for 10 s: a probe raises it by 2 %.
        tokio::time::advance(PROBE_EVERY).await;
        let l = inf.observe(p, false, Instant::now()).unwrap();
        assert_eq!((l.limit, l.remaining), (Some(507), None));
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
