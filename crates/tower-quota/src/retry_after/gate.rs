//! The gates: per partition, closed until the server's time, reopening slowly. A plain state
//! machine over a map (no tower types): the service and its future only ask it.

use super::error::WaitTooLong;
use crate::classify::Outcome;
use crate::context::QuotaContext;
use crate::error::QueueFull;
use crate::hint::{RetryAt, RetrySource};
use crate::partition::PartitionKey;
use http::Response;
use rand::Rng;
use rand::rngs::SmallRng;
use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// One partition's gate.
#[derive(Debug)]
struct Gate {
    /// Closed until then.
    until: Instant,
    /// After a closure the gate reopens slowly, as TCP's slow start does: `window` requests (the
    /// probes) may be out at once, doubling with each one that comes back without closing the
    /// gate again, back to 1 when one does; fully open (0) past [`OPEN_WINDOW`]. So the waiters do
    /// not all arrive at once into another 429 when the server has room for only a few.
    window: u32,
    /// Probes out.
    probes: u32,
    /// 429s without a hint since the last success: each doubles the inferred cooldown.
    strikes: u32,
    /// Wakes the requests waiting for a probe's answer.
    notify: Arc<Notify>,
    /// Requests waiting at it (closed, or for a probe's answer).
    waiters: usize,
}

impl Gate {
    /// A gate closed until `until`, reopening with `window` probes (0: fully open).
    fn new(until: Instant, window: u32) -> Self {
        Self {
            until,
            window,
            probes: 0,
            strikes: 0,
            notify: Arc::new(Notify::new()),
            waiters: 0,
        }
    }
}

/// The window past which a reopening gate is fully open.
const OPEN_WINDOW: u32 = 32;

/// What a request meets at its partition's gate.
pub(crate) enum Meet {
    /// Closed until then.
    Closed(Instant),
    /// Reopening, and as many probes are out as the window allows: wait for an answer.
    Probing(Arc<Notify>),
    /// Pass; as the probe if `probe`.
    Pass {
        /// This request is one of the reopening gate's probes.
        probe: bool,
    },
}

pub(crate) struct Shared {
    gates: Mutex<HashMap<PartitionKey, Gate>>,
    /// How many gates there are (published on every unlock).
    live: AtomicUsize,
    /// When to forget the gates that are open again.
    pub(crate) sweep: crate::util::Sweep,
    pub(crate) ctx: QuotaContext,
    pub(crate) max_wait: Option<Duration>,
    jitter: Duration,
    inferred: Option<Duration>,
    rng: Mutex<SmallRng>,
    max_queue: usize,
}

/// The longest inferred cooldown.
const MAX_INFERRED: Duration = Duration::from_secs(30);

/// The locked gates; on unlock, their number is published to [`Shared::live`] so the common
/// case (no gate at all) is answered without the lock.
struct Gates<'a> {
    map: MutexGuard<'a, HashMap<PartitionKey, Gate>>,
    live: &'a AtomicUsize,
}

impl Deref for Gates<'_> {
    type Target = HashMap<PartitionKey, Gate>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl DerefMut for Gates<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.map
    }
}

impl Drop for Gates<'_> {
    fn drop(&mut self) {
        self.live.store(self.map.len(), Ordering::SeqCst);
    }
}

impl Shared {
    /// The gates of a layer configured as `c`.
    pub(super) fn new(c: &super::layer::Config) -> Self {
        Self {
            gates: Mutex::new(HashMap::new()),
            live: AtomicUsize::new(0),
            sweep: crate::util::Sweep::new(1024),
            ctx: c.ctx.clone(),
            max_wait: c.max_wait,
            jitter: c.jitter,
            inferred: c.inferred,
            rng: Mutex::new(crate::util::small_rng(c.seed)),
            max_queue: c.max_queue,
        }
    }

    /// Partitions with a gate now.
    pub(crate) fn gates(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    fn lock(&self) -> Gates<'_> {
        Gates {
            map: self.gates.lock().unwrap_or_else(|e| e.into_inner()),
            live: &self.live,
        }
    }

    /// Whether no partition has a gate (closed, reopening or counting strikes): every request
    /// passes, and nothing needs the lock.
    fn none(&self) -> bool {
        self.live.load(Ordering::SeqCst) == 0
    }

    /// When the partition's gate opens, if it is closed now.
    pub(crate) fn gate(&self, p: PartitionKey, now: Instant) -> Option<Instant> {
        self.lock()
            .get(&p)
            .map(|g| g.until)
            .filter(|&until| until > now)
    }

    /// The error for a wait until `until` past the cap, if there is a cap and it is passed.
    pub(crate) fn too_long(
        &self,
        p: PartitionKey,
        until: Instant,
        now: Instant,
    ) -> Option<WaitTooLong> {
        let cap = self.max_wait?;
        let wait = until.saturating_duration_since(now);
        (wait > cap).then_some(WaitTooLong {
            retry_at: until,
            wait,
            cap,
            partition: p,
        })
    }

    /// Meets the gate of `p`: closed, waiting for a probe, or pass (as a probe while the gate is
    /// reopening and the window has room).
    pub(crate) fn meet(&self, p: PartitionKey) -> Meet {
        if self.none() {
            return Meet::Pass { probe: false };
        }
        let mut gates = self.lock();
        let Some(g) = gates.get_mut(&p) else {
            return Meet::Pass { probe: false };
        };
        if g.until > Instant::now() {
            Meet::Closed(g.until)
        } else if g.window == 0 {
            if g.strikes == 0 && g.probes == 0 {
                // Fully open and nothing to remember: as if it never closed.
                gates.remove(&p);
            }
            Meet::Pass { probe: false }
        } else if g.probes >= g.window {
            Meet::Probing(g.notify.clone())
        } else {
            g.probes += 1;
            Meet::Pass { probe: true }
        }
    }

    /// A probe is done: answered without closing the gate again (`reopened`: the window doubles),
    /// or closed it again, failed or gave up (the role goes to the next waiter).
    pub(crate) fn probe_done(&self, p: PartitionKey, reopened: bool) {
        let mut gates = self.lock();
        if let Some(g) = gates.get_mut(&p) {
            g.probes = g.probes.saturating_sub(1);
            if reopened && g.window > 0 {
                g.window = g.window.saturating_mul(2);
                if g.window > OPEN_WINDOW {
                    g.window = 0;
                }
            }
            g.notify.notify_waiters();
        }
    }

    /// Forgets the gates that are open again and hold no probe, when the map is due (so many keys
    /// cannot grow it for ever, and a flood of new gates costs O(1) each, amortised).
    fn sweep(&self, gates: &mut Gates<'_>, now: Instant) {
        if self.sweep.due(gates.len()) {
            gates.retain(|_, g| g.until > now || g.probes > 0 || g.waiters > 0);
            self.sweep.swept(gates.len());
        }
    }

    /// Counts a 429 without a hint; returns how many came before it in this run of failures.
    fn strike(&self, p: PartitionKey, now: Instant) -> u32 {
        let mut gates = self.lock();
        self.sweep(&mut gates, now);
        let g = gates.entry(p).or_insert_with(|| Gate::new(now, 0));
        // 429s that were in flight together count once: only one that arrives while the gate is
        // open strikes again.
        if g.until <= now || g.strikes == 0 {
            g.strikes += 1;
        }
        g.strikes - 1
    }

    /// A request of `p` succeeded: inferred cooldowns start over.
    pub(crate) fn succeeded(&self, p: PartitionKey) {
        if self.none() {
            return;
        }
        let mut gates = self.lock();
        if let Some(g) = gates.get_mut(&p) {
            g.strikes = 0;
            if g.window == 0 && g.probes == 0 && g.until <= Instant::now() {
                gates.remove(&p);
            }
        }
    }

    /// Closes the gate of `p` until `at` (or later, if it already is); returns when it opens.
    fn close(&self, p: PartitionKey, at: Instant, now: Instant) -> Instant {
        let mut gates = self.lock();
        self.sweep(&mut gates, now);
        let g = gates.entry(p).or_insert_with(|| Gate::new(at, 1));
        g.until = g.until.max(at);
        g.window = 1;
        g.until
    }

    /// A request starts waiting at the gate of `p`; refused when `max_queue` already wait there.
    pub(crate) fn enter(&self, p: PartitionKey) -> Result<(), QueueFull> {
        let mut gates = self.lock();
        let Some(g) = gates.get_mut(&p) else {
            return Ok(());
        };
        if g.waiters >= self.max_queue {
            return Err(QueueFull::new("retry-after gate", p, g.waiters, g.until));
        }
        g.waiters += 1;
        Ok(())
    }

    /// A request that waited at the gate of `p` leaves it (passes, or gives up).
    pub(crate) fn leave(&self, p: PartitionKey) {
        if let Some(g) = self.lock().get_mut(&p) {
            g.waiters = g.waiters.saturating_sub(1);
        }
    }

    /// A fresh jitter in `[0, jitter]`.
    pub(crate) fn draw_jitter(&self) -> Duration {
        if self.jitter.is_zero() {
            return Duration::ZERO;
        }
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        self.jitter.mul_f64(rng.random::<f64>())
    }

    /// Reads a response's hint; closes the gate and tags the response when there is one.
    /// Returns what the response was, and whether it closed the gate.
    pub(crate) fn observe<B>(&self, p: PartitionKey, res: &mut Response<B>) -> (Outcome, bool) {
        let outcome = self.ctx.classify(res).outcome;
        if !outcome.is_retryable_by_default() {
            return (outcome, false);
        }
        let signals = self.ctx.signals(res);
        let received = signals.received_at();
        let (delay, source) = match signals.hint() {
            Some(hint) => (hint.delay, RetrySource::Server(hint.source)),
            None => match self.inferred.filter(|_| outcome == Outcome::RateLimited) {
                // A 429 that says nothing: pause the partition for an estimate that doubles with
                // each such 429 until a success, then reopen it slowly. Without it, every waiter
                // would learn the server's pace one 429 at a time.
                Some(base) => {
                    let strikes = self.strike(p, received);
                    let factor = 1u32.checked_shl(strikes).unwrap_or(u32::MAX);
                    (
                        base.saturating_mul(factor).min(MAX_INFERRED),
                        RetrySource::Inferred,
                    )
                }
                None => return (outcome, false),
            },
        };
        let at = received
            .checked_add(delay)
            .unwrap_or(received + crate::util::FAR_FUTURE);
        let until = self.close(p, at, received);
        crate::metrics::gate_closed(
            p,
            until.saturating_duration_since(received),
            source == RetrySource::Inferred,
        );
        tracing::debug!(
            partition = %p,
            status = res.status().as_u16(),
            delay_ms = delay.as_millis() as u64,
            source = ?source,
            "retry-after: gate closed"
        );
        res.extensions_mut().insert(RetryAt {
            at: until,
            source,
            partition: p,
        });
        (outcome, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    fn shared() -> Shared {
        Shared::new(&super::super::layer::Config {
            ctx: QuotaContext::new(),
            max_wait: None,
            jitter: Duration::ZERO,
            inferred: None,
            seed: Some(1),
            max_queue: 10_000,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_new_gates_sweeps_the_map_a_logarithmic_number_of_times() {
        let s = shared();
        let now = Instant::now();
        let at = now + Duration::from_secs(3600);
        for n in 0..20_000u64 {
            s.close(PartitionKey::fingerprint(&n.to_le_bytes()), at, now);
        }
        assert_eq!(s.gates(), 20_000);
        // Sweeping at a fixed size scanned every closed gate for each new one (19 000 scans of up
        // to 20 000 gates); doubling, it is a handful.
        let sweeps = s.sweep.count.load(Relaxed);
        assert!(sweeps <= 6, "{sweeps} sweeps");
        // Gates open again are forgotten at the next sweep.
        tokio::time::advance(Duration::from_secs(3601)).await;
        let later = Instant::now();
        for n in 0..40_000u64 {
            s.close(
                PartitionKey::fingerprint(&(n + 1_000_000).to_le_bytes()),
                later + Duration::from_secs(1),
                later,
            );
        }
        assert!(s.gates() <= 40_000 + 1, "{}", s.gates());
    }
}
