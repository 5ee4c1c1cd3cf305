//! Taking a request's slots: its partition's limit, then the global cap's, each in FIFO order.
//! Shared by the service (which reserves in `poll_ready` when one limit serves every request) and
//! the response future (which takes them itself when the limit depends on the request).

use super::limiter::Limiter;
use crate::error::QueueFull;
use crate::partition::PartitionKey;
use crate::util::Acquire;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use sync_wrapper::SyncWrapper;

/// Counts a request as queued at a limiter while it waits there.
struct Queued(Arc<Limiter>);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The slots one request is taking, or has taken.
pub(crate) struct Slots {
    permit: Permit,
    /// The partition the slots are for (for a refusal's message).
    partition: PartitionKey,
    /// How many may queue at a limiter before one more is refused.
    max_queue: usize,
    waiting: Option<(Acquire, Queued)>,
    /// Demand exceeded the partition's limit: the slot was full when the request came, or it had
    /// to queue (the signal that lets an adaptive limit grow).
    saturated: bool,
}

impl fmt::Debug for Slots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slots")
            .field("waiting", &self.waiting.is_some())
            .finish()
    }
}

impl Slots {
    pub(crate) fn new(
        limiters: [Option<Arc<Limiter>>; 2],
        partition: PartitionKey,
        max_queue: usize,
    ) -> Self {
        Self {
            permit: Permit::new(limiters),
            partition,
            max_queue,
            waiting: None,
            saturated: false,
        }
    }

    /// Takes the slots in order, queueing where one is full; ready when all are held, or refused
    /// when a full limiter's queue is at its bound.
    pub(crate) fn poll_acquire(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), QueueFull>> {
        while let Some(limiter) = self.permit.next().cloned() {
            let own = self.permit.at_own();
            let permit = match self.waiting.as_mut() {
                Some((acquire, _)) => {
                    let p = ready!(acquire.as_mut().poll(cx));
                    self.waiting = None;
                    p
                }
                None => match limiter.semaphore().try_acquire_owned() {
                    Ok(p) => Ok(p),
                    Err(_) => {
                        if own {
                            self.saturated = true;
                        }
                        let waiting = limiter.queued.load(Ordering::SeqCst);
                        if waiting >= self.max_queue {
                            return Poll::Ready(Err(limiter.queue_full(self.partition, waiting)));
                        }
                        let queued = limiter.queued.fetch_add(1, Ordering::SeqCst) + 1;
                        tracing::trace!(
                            limit = limiter.limit(),
                            queued,
                            global = !own,
                            "concurrency: waiting for a slot"
                        );
                        let acquire: Acquire = Box::pin(limiter.semaphore().acquire_owned());
                        self.waiting = Some((acquire, Queued(limiter)));
                        continue;
                    }
                },
            };
            // The slot is held by the count in `Permit`; `Limiter::release` gives it back.
            permit
                .expect("the crate's semaphores are never closed")
                .forget();
            let reached = limiter.acquired();
            if own {
                // With lockstep completions the in-flight count dips below the limit between a
                // release and the next acquire: a full slot on arrival counts too.
                self.saturated |= reached;
            }
            self.permit.took();
        }
        Poll::Ready(Ok(()))
    }

    /// The partition's own limiter.
    pub(crate) fn own(&self) -> Option<&Arc<Limiter>> {
        self.permit.own()
    }

    /// Whether demand exceeded the partition's limit.
    pub(crate) fn saturated(&self) -> bool {
        self.saturated
    }

    /// The slots held, for the response body.
    /// The request was sent at `at`.
    pub(crate) fn sent(&mut self, at: tokio::time::Instant) {
        self.permit.sent(at);
    }

    /// When the request was sent, if it was.
    pub(crate) fn sent_at(&self) -> Option<tokio::time::Instant> {
        self.permit.sent_at()
    }

    pub(crate) fn into_permit(self) -> Permit {
        self.permit
    }
}

/// The service's reservation, made in `poll_ready` (when one limit serves every request). In a
/// [`SyncWrapper`]: a queued acquisition is `Send` but not `Sync`, and the service must stay
/// `Sync` (axum's `BoxCloneSyncService`); a service is only ever polled through `&mut self`.
pub(crate) type Reserved = Option<SyncWrapper<Slots>>;

/// Polls a reservation to completion.
pub(crate) fn poll_reserve(
    reserved: &mut Reserved,
    make: impl FnOnce() -> Slots,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let slots = reserved.get_or_insert_with(|| SyncWrapper::new(make()));
    if ready!(slots.get_mut().poll_acquire(cx)).is_err() {
        // The queue is at its bound: reserve nothing, so `call` makes a future that meets the
        // bound itself and fails with the typed error (a `poll_ready` error would break the
        // service for good).
        *reserved = None;
    }
    Poll::Ready(())
}

/// The slots one request takes, in order (its partition's, then the global cap's when there is
/// one), and how many of them it holds. Each held slot is a semaphore permit forgotten when taken
/// and given back by [`Limiter::release`] on drop, so a slot costs no permit value of its own.
pub(crate) struct Permit {
    limiters: [Option<Arc<Limiter>>; 2],
    held: usize,
    /// When the request was sent (for the round trip to the end of its body).
    sent_at: Option<tokio::time::Instant>,
}

impl Permit {
    pub(crate) fn new(limiters: [Option<Arc<Limiter>>; 2]) -> Self {
        Self {
            limiters,
            held: 0,
            sent_at: None,
        }
    }

    /// The request was sent at `at`.
    pub(crate) fn sent(&mut self, at: tokio::time::Instant) {
        self.sent_at = Some(at);
    }

    /// When the request was sent, if it was.
    pub(crate) fn sent_at(&self) -> Option<tokio::time::Instant> {
        self.sent_at
    }

    /// Its response body ended: the round trip from the send to the body's end is recorded.
    pub(crate) fn body_ended(&self) {
        if let (Some(own), Some(at)) = (self.own(), self.sent_at) {
            let rtt = tokio::time::Instant::now().saturating_duration_since(at);
            own.metrics.to_body_end.record(rtt.as_secs_f64());
        }
    }

    /// The next limiter to take a slot of, if any.
    pub(crate) fn next(&self) -> Option<&Arc<Limiter>> {
        self.limiters.get(self.held).and_then(Option::as_ref)
    }

    /// Whether the slot of the first limiter (the partition's own) is the next to take.
    pub(crate) fn at_own(&self) -> bool {
        self.held == 0
    }

    /// The next limiter's slot was taken (its permit forgotten).
    pub(crate) fn took(&mut self) {
        self.held += 1;
    }

    /// The partition's own limiter.
    pub(crate) fn own(&self) -> Option<&Arc<Limiter>> {
        self.limiters[0].as_ref()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        for limiter in self.limiters[..self.held].iter().flatten() {
            limiter.release();
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Permit")
    }
}
