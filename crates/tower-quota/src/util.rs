//! Small helpers the layers share.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Far enough to mean "never in this process's lifetime", short enough for every clock to hold:
/// what a wait that would overflow an instant saturates to.
pub(crate) const FAR_FUTURE: std::time::Duration =
    std::time::Duration::from_secs(30 * 365 * 86_400);

/// The layers' random source: seeded for reproducible runs, else from the OS.
pub(crate) fn small_rng(seed: Option<u64>) -> rand::rngs::SmallRng {
    use rand::SeedableRng;
    match seed {
        Some(s) => rand::rngs::SmallRng::seed_from_u64(s),
        None => rand::rngs::SmallRng::from_rng(&mut rand::rng()),
    }
}

/// Sleeps until `deadline` on a future's one reusable timer (created on first use, `reset` after:
/// no allocation per wait).
pub(crate) fn sleep_until(
    slot: &mut Option<Pin<Box<Sleep>>>,
    deadline: Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let sleep = slot.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
    if sleep.deadline() != deadline {
        sleep.as_mut().reset(deadline);
    }
    sleep.as_mut().poll(cx)
}

/// When to sweep a map of per-partition state for entries that may be forgotten: once it reaches
/// `floor` entries, then each time it doubles the size it had after the last sweep. Each sweep is
/// a scan, but the scans add up to O(1) per insertion (amortised), where sweeping at a fixed size
/// scans the whole map for every new key once the map is full of live entries.
#[derive(Debug)]
pub(crate) struct Sweep {
    floor: usize,
    next: std::sync::atomic::AtomicUsize,
    /// Sweeps so far (for tests).
    pub(crate) count: std::sync::atomic::AtomicU64,
}

impl Sweep {
    pub(crate) fn new(floor: usize) -> Self {
        Self {
            floor,
            next: std::sync::atomic::AtomicUsize::new(floor),
            count: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether a map of `len` entries is due for a sweep (call under the map's lock).
    pub(crate) fn due(&self, len: usize) -> bool {
        len >= self.next.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A sweep left `len` entries (call under the map's lock).
    pub(crate) fn swept(&self, len: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.next
            .store(self.floor.max(len.saturating_mul(2)), Relaxed);
        self.count.fetch_add(1, Relaxed);
    }
}

/// A queued wait for a semaphore permit.
pub(crate) type Acquire =
    Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// Takes a permit of `sem` in FIFO order: at once when one is free and nobody queues (no
/// allocation), else by queueing in `waiting` (tokio's semaphore is fair: a free permit goes to
/// the queue first, so the fast path never jumps it).
pub(crate) fn poll_acquire(
    sem: &Arc<Semaphore>,
    waiting: &mut Option<Acquire>,
    cx: &mut Context<'_>,
) -> Poll<OwnedSemaphorePermit> {
    if waiting.is_none() {
        if let Ok(p) = sem.clone().try_acquire_owned() {
            return Poll::Ready(p);
        }
        *waiting = Some(Box::pin(sem.clone().acquire_owned()));
    }
    let acquire = waiting.as_mut().expect("set above");
    let permit = ready!(acquire.as_mut().poll(cx));
    *waiting = None;
    // The crate never closes its semaphores.
    Poll::Ready(permit.expect("the crate's semaphores are never closed"))
}

/// A layer's settings and the shared state made from them: made once, on the layer's first use
/// (its first service or handle), and shared by every clone taken before that. A setter returns a
/// layer with fresh (not yet made) state, so a clone taken before a setter keeps its own settings;
/// a setter on a layer already in use panics, where it once made new state silently (services and
/// handles of the old state would have gone on apart from the new).
pub(crate) struct Configured<C, S> {
    config: C,
    state: Arc<std::sync::OnceLock<Arc<S>>>,
}

impl<C: Clone, S> Clone for Configured<C, S> {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
            state: self.state.clone(),
        }
    }
}

impl<C, S> Configured<C, S> {
    pub(crate) fn new(config: C) -> Self {
        Self {
            config,
            state: Arc::default(),
        }
    }

    /// The settings.
    pub(crate) fn config(&self) -> &C {
        &self.config
    }

    /// The settings changed by `f`, with state to be made.
    ///
    /// # Panics
    ///
    /// If the layer is in use (it made a service or a handle).
    #[track_caller]
    pub(crate) fn with(mut self, f: impl FnOnce(&mut C)) -> Self {
        assert!(
            self.state.get().is_none(),
            "a layer is configured before its first use: this one already made a service or a \
             handle, which would not see the change (configure it first, then clone it)"
        );
        f(&mut self.config);
        self.state = Arc::default();
        self
    }

    /// The state, made by `make` from the settings on first use.
    pub(crate) fn state(&self, make: impl FnOnce(&C) -> S) -> Arc<S> {
        self.state
            .get_or_init(|| Arc::new(make(&self.config)))
            .clone()
    }

    /// The state, if it was made.
    pub(crate) fn made(&self) -> Option<&Arc<S>> {
        self.state.get()
    }
}
