//! The response future of [`TokenBudget`](super::TokenBudget).

use super::Cost;
use super::answer::queue_full;
use super::body::BudgetBody;
use super::error::BudgetError;
use super::reservation::{NotSent, ReservationHandle};
use super::shared::{BLIND_HELD, BLIND_POLL, Queue, Shared};
use super::store::{Admission, StoreFuture};
use super::window::{CountFuture, Verdict};
use crate::BoxError;
use crate::admit::admitted_future;
use crate::metrics::Refusal;
use crate::partition::PartitionKey;
use crate::util::{Acquire, poll_acquire};
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};

admitted_future!(
    /// Reserves the request's cost (waiting in FIFO order), sends it, settles and learns from the
    /// answer.
    ///
    /// Every guard it holds (the FIFO turns, the queued count, the not-yet-sent refund) is released
    /// when it is dropped.
    Reserve,
    BudgetBody
);

/// One request's reservation: its turn in its partition's queue, the store's answer, and once
/// admitted the reservation itself until the answer settles it.
pub(crate) struct Reserve {
    pub(super) shared: Arc<Shared>,
    pub(super) partition: PartitionKey,
    cost: Cost,
    pub(super) own: Arc<Queue>,
    pub(super) turn: Option<OwnedSemaphorePermit>,
    global_turn: Option<OwnedSemaphorePermit>,
    acquire: Option<Acquire>,
    asking: Option<StoreFuture<'static, Admission>>,
    pub(super) sleep: Option<Pin<Box<Sleep>>>,
    phase: Phase,
    queued: bool,
    pub(super) probe: bool,
    pub(super) probe_until: Option<Instant>,
    pub(super) not_sent: Option<NotSent>,
    // The request's GenAI span, boxed when a subscriber wants it (a waiter holds 8 bytes for it,
    // not 40).
    pub(super) span: Option<Box<tracing::Span>>,
}

impl Drop for Reserve {
    fn drop(&mut self) {
        if self.queued {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            self.own.waiting.fetch_sub(1, Ordering::SeqCst);
            self.own.metrics.waiting.decrement(1.0);
        }
    }
}

/// The longest the head of a partition's queue sleeps before it asks the store again: a wait
/// computed under one limit is not kept when a new one is learned (a wait of two minutes at a
/// first guess of the rate once stalled a partition after the rate was measured ten times higher).
const RECHECK: Duration = Duration::from_secs(1);

/// Where a request holding in the budget is.
enum Phase {
    /// Before its partition's FIFO turn. `fast`: it may first try to reserve without the turn.
    Turn { fast: bool },
    /// Asking the store (holding the turn, unless on the fast path).
    Reserve,
    /// Told to come back at the instant.
    Waiting(Instant),
    /// Admitted: waiting for the inner service.
    Ready,
    /// Refused at once: this many of the partition's requests were waiting already.
    Refused(usize),
    /// Refused at once: too long for its model's context window, or asking for more output
    /// than its model allows.
    OverWindow(BoxError),
    /// Near its model's context window: an exact count decides, before it joins the queue.
    Counting(CountFuture),
}

impl Reserve {
    pub(crate) fn new(
        shared: Arc<Shared>,
        partition: PartitionKey,
        cost: Cost,
        verdict: Verdict,
        span: tracing::Span,
    ) -> Self {
        let own = shared.queue(partition);
        let phase = match verdict {
            // Refused, or counted, before it joins the queue's counts.
            Verdict::Over(e) => Phase::OverWindow(e),
            Verdict::Count(count) => Phase::Counting(count),
            Verdict::Fits => join(&shared, &own),
        };
        let queued = matches!(phase, Phase::Turn { .. });
        Self {
            shared,
            partition,
            cost,
            own,
            turn: None,
            global_turn: None,
            acquire: None,
            asking: None,
            sleep: None,
            phase,
            queued,
            probe: false,
            // Until admission, when the request first had to wait (none: admitted at its first
            // poll, no clock read); after, a probe's deadline.
            probe_until: None,
            not_sent: None,
            span: (!span.is_disabled()).then(|| Box::new(span)),
        }
    }
}

/// A request joins its partition's queue: counted as waiting, or refused when `max_queue`
/// already wait.
fn join(shared: &Shared, own: &Queue) -> Phase {
    let waiting = own.waiting.fetch_add(1, Ordering::SeqCst);
    if waiting >= shared.max_queue {
        own.waiting.fetch_sub(1, Ordering::SeqCst);
        own.metrics.refused(Refusal::QueueFull);
        return Phase::Refused(waiting);
    }
    shared.queued.fetch_add(1, Ordering::SeqCst);
    own.metrics.waiting.increment(1.0);
    // With no global cap and no probe due, a request may first try the store without taking the
    // turn: when nobody holds or waits for the turn, nobody is ahead of it.
    let fast = shared.global_turn.is_none() && !shared.probe_due(own);
    Phase::Turn { fast }
}

impl fmt::Debug for Reserve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.phase {
            Phase::Turn { .. } => "turn",
            Phase::Reserve => "reserve",
            Phase::Waiting(_) => "waiting",
            Phase::Ready => "ready",
            Phase::Refused(_) | Phase::OverWindow(_) => "refused",
            Phase::Counting(_) => "counting",
        };
        f.debug_struct("Reserve")
            .field("partition", &self.partition)
            .field("cost", &self.cost)
            .field("state", &state)
            .finish()
    }
}

impl Reserve {
    /// Until admitted; a request that has to wait is stamped with when it began.
    pub(super) fn admit(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let polled = self.step(cx);
        // Waiting in the queue: the wait is measured from here.
        if polled.is_pending() && self.queued && self.probe_until.is_none() {
            self.probe_until = Some(Instant::now());
        }
        polled
    }

    fn step(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            match self.phase {
                Phase::Refused(waiting) => {
                    return Poll::Ready(Err(Box::new(queue_full(&self.own, waiting))));
                }
                Phase::OverWindow(_) => {
                    self.own.metrics.refused(Refusal::ContextWindow);
                    let Phase::OverWindow(e) =
                        std::mem::replace(&mut self.phase, Phase::Refused(0))
                    else {
                        unreachable!("matched above")
                    };
                    return Poll::Ready(Err(e));
                }
                Phase::Counting(ref mut count) => match ready!(count.as_mut().poll(cx)) {
                    Err(e) => {
                        self.own.metrics.refused(Refusal::ContextWindow);
                        self.phase = Phase::Refused(0);
                        return Poll::Ready(Err(Box::new(e)));
                    }
                    Ok(exact) => {
                        if let Some(n) = exact {
                            // The count is better than the estimate: reserve it.
                            self.cost.input_tokens = n;
                        }
                        self.phase = join(&self.shared, &self.own);
                        self.queued = matches!(self.phase, Phase::Turn { .. });
                    }
                },
                Phase::Turn { fast } => {
                    // Nobody holds the turn, or its queue waits only for hand-overs (the store has
                    // room): ahead of no one who needs room, it may reserve at once. Without this,
                    // a queue for the turn, once formed under load, admits one request per task
                    // wake-up (a starved runtime held a proxy's admissions to a few thousand a
                    // second, with room for millions).
                    let unbound = !self.own.bound.load(Ordering::Relaxed);
                    if fast && (unbound || self.own.queue.available_permits() > 0) {
                        self.phase = Phase::Reserve;
                        continue;
                    }
                    let permit = ready!(poll_acquire(&self.own.queue, &mut self.acquire, cx));
                    self.turn = Some(permit);
                    self.phase = Phase::Reserve;
                }
                Phase::Reserve => {
                    let shared = &*self.shared;
                    if self.own.held.load(Ordering::SeqCst) >= BLIND_HELD
                        && (shared.blind(&self.own) || shared.careful(&self.own))
                    {
                        // Admitted blind or carefully: only a few held inside at a time.
                        self.phase = if self.turn.is_none() {
                            Phase::Turn { fast: false }
                        } else {
                            Phase::Waiting(Instant::now() + BLIND_POLL)
                        };
                        continue;
                    }
                    // The global turn is held only while the global cap is what binds: a request
                    // waiting for its own key's refill must not hold up the other keys.
                    if self.global_turn.is_none() {
                        if let Some(g) = self.shared.global_turn.as_ref() {
                            self.global_turn = Some(ready!(poll_acquire(g, &mut self.acquire, cx)));
                        }
                    }
                    let scopes = &self.own.scopes;
                    let answer = match self.asking.as_mut() {
                        Some(asking) => {
                            let a = ready!(asking.as_mut().poll(cx));
                            self.asking = None;
                            a
                        }
                        None => match shared.store.try_reserve(scopes, self.cost) {
                            Some(a) => a,
                            None if self.turn.is_none()
                                && self.own.queue.available_permits() == 0 =>
                            {
                                // A store that must be asked (Redis) is asked by the head of
                                // the queue alone: one call per wait, not one per request.
                                self.phase = Phase::Turn { fast: false };
                                continue;
                            }
                            None => {
                                let (store, scopes) = (shared.store.clone(), scopes.clone());
                                let cost = self.cost;
                                self.asking =
                                    Some(Box::pin(
                                        async move { store.reserve(&scopes, cost).await },
                                    ));
                                continue;
                            }
                        },
                    };
                    match answer? {
                        Admission::Granted { charged } => {
                            if self.own.bound.load(Ordering::Relaxed) {
                                self.own.bound.store(false, Ordering::Relaxed);
                            }
                            self.queued = false;
                            shared.queued.fetch_sub(1, Ordering::SeqCst);
                            self.own.waiting.fetch_sub(1, Ordering::SeqCst);
                            shared.admitted.fetch_add(1, Ordering::Relaxed);
                            // `probe_until` holds when it started waiting, if it did (see `new`).
                            let waited = self.probe_until.take().map_or(Duration::ZERO, |at| {
                                Instant::now().saturating_duration_since(at)
                            });
                            self.own.metrics.waiting.decrement(1.0);
                            self.own.metrics.admitted(self.cost, waited);
                            self.global_turn = None;
                            // While some limit is neither configured nor learned, the first request
                            // of a partition is a probe: it keeps the turn until its response has
                            // taught the store the limits, so the queue behind it is not admitted
                            // blind.
                            self.probe = self.turn.is_some() && shared.probe_due(&self.own);
                            if self.probe {
                                let now = Instant::now();
                                self.probe_until =
                                    Some(now.checked_add(shared.max_probe).unwrap_or(now));
                            } else {
                                self.turn = None;
                            }
                            let handle = ReservationHandle::new(
                                shared.store.clone(),
                                self.partition,
                                self.cost,
                                charged,
                                self.own.clone(),
                                self.span
                                    .as_deref()
                                    .cloned()
                                    .unwrap_or_else(tracing::Span::none),
                            );
                            self.not_sent = Some(NotSent::new(handle));
                            self.phase = Phase::Ready;
                        }
                        Admission::TooLarge {
                            partition,
                            bucket,
                            needed,
                            capacity,
                        } => {
                            self.own.metrics.refused(Refusal::TooLarge);
                            return Poll::Ready(Err(Box::new(BudgetError::too_large(
                                partition, bucket, needed, capacity,
                            ))));
                        }
                        Admission::Wait { .. } if self.turn.is_none() => {
                            // The fast path found no room: queue for the turn like everyone, and
                            // so do the requests after it.
                            self.own.bound.store(true, Ordering::Relaxed);
                            self.phase = Phase::Turn { fast: false };
                        }
                        Admission::Wait {
                            retry_in,
                            partition,
                            reason,
                        } => {
                            if let Some(cap) = shared.max_wait.filter(|cap| retry_in > *cap) {
                                self.own.metrics.refused(Refusal::WaitTooLong);
                                return Poll::Ready(Err(Box::new(BudgetError::wait_too_long(
                                    partition, retry_in, cap,
                                ))));
                            }
                            if partition != PartitionKey::GLOBAL {
                                self.global_turn = None;
                            }
                            self.own.bound.store(true, Ordering::Relaxed);
                            shared.waits.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(
                                partition = %partition,
                                bound_by = ?reason,
                                wait_ms = retry_in.as_millis() as u64,
                                "budget: waiting"
                            );
                            // Asked again within RECHECK however long the wait: a limit learned
                            // meanwhile (a rise, a first measurement) may shorten it.
                            let now = Instant::now();
                            self.phase = Phase::Waiting(now + retry_in.min(RECHECK));
                        }
                    }
                }
                Phase::Waiting(until) => {
                    ready!(crate::util::sleep_until(&mut self.sleep, until, cx));
                    self.phase = Phase::Reserve;
                }
                Phase::Ready => return Poll::Ready(Ok(())),
            }
        }
    }
}
