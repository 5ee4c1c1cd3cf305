//! The response future of [`TokenBudget`](super::TokenBudget).

use super::Cost;
use super::answer::{answer, queue_full};
use super::body::BudgetBody;
use super::error::BudgetError;
use super::reservation::{NotSent, ReservationHandle};
use super::shared::{BLIND_HELD, BLIND_POLL, Queue, Shared};
use super::store::{Admission, StoreFuture};
use super::window::{CountFuture, Verdict};
use crate::BoxError;
use crate::metrics::Refusal;
use crate::partition::PartitionKey;
use crate::util::{Acquire, poll_acquire};
use http::{Request, Response};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};
use tower::Service;

pin_project! {
    /// Reserves the request's cost (waiting in FIFO order), sends it, settles and learns from the
    /// answer.
    ///
    /// Every guard it holds (the FIFO turns, the queued count, the not-yet-sent refund) is released
    /// when it is dropped.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        svc: S,
        shared: Arc<Shared>,
        partition: PartitionKey,
        cost: Cost,
        own: Arc<Queue>,
        turn: Option<OwnedSemaphorePermit>,
        global_turn: Option<OwnedSemaphorePermit>,
        acquire: Option<Acquire>,
        asking: Option<StoreFuture<'static, Admission>>,
        sleep: Option<Pin<Box<Sleep>>>,
        phase: Phase,
        queued: bool,
        probe: bool,
        probe_until: Option<Instant>,
        not_sent: Option<NotSent>,
        // The request's GenAI span, boxed when a subscriber wants it (a waiter holds 8 bytes
        // for it, not 40).
        span: Option<Box<tracing::Span>>,
        #[pin]
        state: State<S::Future, Request<B>>,
    }

    impl<S, B> PinnedDrop for ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.queued {
                this.shared.queued.fetch_sub(1, Ordering::SeqCst);
                this.own.waiting.fetch_sub(1, Ordering::SeqCst);
                this.own.metrics.waiting.decrement(1.0);
            }
        }
    }
}

/// The longest the head of a partition's queue sleeps before it asks the store again: a wait
/// computed under one limit is not kept when a new one is learned (a wait of two minutes at a
/// first guess of the rate once stalled a partition after the rate was measured ten times higher).
const RECHECK: Duration = Duration::from_secs(1);

pin_project! {
    #[project = StateProj]
    enum State<F, R> {
        /// Before the call: the request waits here (in the same space the inner future takes
        /// after it).
        Holding { req: Option<R> },
        Calling { #[pin] fut: F },
    }
}

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

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn new(
        svc: S,
        req: Request<B>,
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
            svc,
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
            state: State::Holding { req: Some(req) },
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

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match (&self.state, &self.phase) {
            (State::Calling { .. }, _) => "calling",
            (_, Phase::Turn { .. }) => "turn",
            (_, Phase::Reserve) => "reserve",
            (_, Phase::Waiting(_)) => "waiting",
            (_, Phase::Ready) => "ready",
            (_, Phase::Refused(_) | Phase::OverWindow(_)) => "refused",
            (_, Phase::Counting(_)) => "counting",
        };
        f.debug_struct("ResponseFuture")
            .field("partition", &self.partition)
            .field("cost", &self.cost)
            .field("state", &state)
            .finish()
    }
}

impl<S, B, ResB> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<BudgetBody<ResB>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let polled = self.as_mut().step(cx);
        if polled.is_pending() {
            let this = self.project();
            // Waiting in the queue: the wait is measured from here.
            if *this.queued && this.probe_until.is_none() {
                *this.probe_until = Some(Instant::now());
            }
        }
        polled
    }
}

impl<S, B, ResB> ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    fn step(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<BudgetBody<ResB>>, BoxError>> {
        let mut this = self.project();
        loop {
            let req = match this.state.as_mut().project() {
                StateProj::Holding { req } => req,
                StateProj::Calling { fut } => {
                    let polled = {
                        let _entered = this.span.as_ref().map(|s| s.enter());
                        fut.poll(cx)
                    };
                    let result = match polled {
                        Poll::Ready(r) => r.map_err(Into::into),
                        Poll::Pending => {
                            if *this.probe {
                                // A probe holds its partition's queue for a bounded time only.
                                let until = this.probe_until.expect("a probe's deadline");
                                ready!(crate::util::sleep_until(this.sleep, until, cx));
                                *this.probe = false;
                                this.own.probed.store(true, Ordering::SeqCst);
                                *this.turn = None;
                                tracing::debug!(
                                    partition = %this.partition,
                                    "budget: probe unanswered, the queue moves on"
                                );
                            }
                            return Poll::Pending;
                        }
                    };
                    return Poll::Ready(answer(
                        this.shared,
                        *this.partition,
                        this.own,
                        this.turn,
                        this.probe,
                        this.not_sent,
                        result,
                    ));
                }
            };
            match *this.phase {
                Phase::Refused(waiting) => {
                    return Poll::Ready(Err(Box::new(queue_full(this.own, waiting))));
                }
                Phase::OverWindow(_) => {
                    this.own.metrics.refused(Refusal::ContextWindow);
                    let Phase::OverWindow(e) = std::mem::replace(this.phase, Phase::Refused(0))
                    else {
                        unreachable!("matched above")
                    };
                    return Poll::Ready(Err(e));
                }
                Phase::Counting(ref mut count) => match ready!(count.as_mut().poll(cx)) {
                    Err(e) => {
                        this.own.metrics.refused(Refusal::ContextWindow);
                        *this.phase = Phase::Refused(0);
                        return Poll::Ready(Err(Box::new(e)));
                    }
                    Ok(exact) => {
                        if let Some(n) = exact {
                            // The count is better than the estimate: reserve it.
                            this.cost.input_tokens = n;
                        }
                        *this.phase = join(this.shared, this.own);
                        *this.queued = matches!(this.phase, Phase::Turn { .. });
                    }
                },
                Phase::Turn { fast } => {
                    // Nobody holds the turn, or its queue waits only for hand-overs (the store has
                    // room): ahead of no one who needs room, it may reserve at once. Without this,
                    // a queue for the turn, once formed under load, admits one request per task
                    // wake-up (a starved runtime held a proxy's admissions to a few thousand a
                    // second, with room for millions).
                    let unbound = !this.own.bound.load(Ordering::Relaxed);
                    if fast && (unbound || this.own.queue.available_permits() > 0) {
                        *this.phase = Phase::Reserve;
                        continue;
                    }
                    let permit = ready!(poll_acquire(&this.own.queue, this.acquire, cx));
                    *this.turn = Some(permit);
                    *this.phase = Phase::Reserve;
                }
                Phase::Reserve => {
                    let shared = &**this.shared;
                    if this.own.held.load(Ordering::SeqCst) >= BLIND_HELD
                        && (shared.blind(this.own) || shared.careful(this.own))
                    {
                        // Admitted blind or carefully: only a few held inside at a time.
                        *this.phase = if this.turn.is_none() {
                            Phase::Turn { fast: false }
                        } else {
                            Phase::Waiting(Instant::now() + BLIND_POLL)
                        };
                        continue;
                    }
                    // The global turn is held only while the global cap is what binds: a request
                    // waiting for its own key's refill must not hold up the other keys.
                    if this.global_turn.is_none() {
                        if let Some(g) = this.shared.global_turn.as_ref() {
                            *this.global_turn = Some(ready!(poll_acquire(g, this.acquire, cx)));
                        }
                    }
                    let scopes = &this.own.scopes;
                    let answer = match this.asking.as_mut() {
                        Some(asking) => {
                            let a = ready!(asking.as_mut().poll(cx));
                            *this.asking = None;
                            a
                        }
                        None => match shared.store.try_reserve(scopes, *this.cost) {
                            Some(a) => a,
                            None if this.turn.is_none()
                                && this.own.queue.available_permits() == 0 =>
                            {
                                // A store that must be asked (Redis) is asked by the head of
                                // the queue alone: one call per wait, not one per request.
                                *this.phase = Phase::Turn { fast: false };
                                continue;
                            }
                            None => {
                                let (store, scopes) = (shared.store.clone(), scopes.clone());
                                let cost = *this.cost;
                                *this.asking =
                                    Some(Box::pin(
                                        async move { store.reserve(&scopes, cost).await },
                                    ));
                                continue;
                            }
                        },
                    };
                    match answer? {
                        Admission::Granted { charged } => {
                            if this.own.bound.load(Ordering::Relaxed) {
                                this.own.bound.store(false, Ordering::Relaxed);
                            }
                            *this.queued = false;
                            shared.queued.fetch_sub(1, Ordering::SeqCst);
                            this.own.waiting.fetch_sub(1, Ordering::SeqCst);
                            shared.admitted.fetch_add(1, Ordering::Relaxed);
                            // `probe_until` holds when it started waiting, if it did (see `new`).
                            let waited = this.probe_until.take().map_or(Duration::ZERO, |at| {
                                Instant::now().saturating_duration_since(at)
                            });
                            this.own.metrics.waiting.decrement(1.0);
                            this.own.metrics.admitted(*this.cost, waited);
                            *this.global_turn = None;
                            // While some limit is neither configured nor learned, the first request
                            // of a partition is a probe: it keeps the turn until its response has
                            // taught the store the limits, so the queue behind it is not admitted
                            // blind.
                            *this.probe = this.turn.is_some() && shared.probe_due(this.own);
                            if *this.probe {
                                let now = Instant::now();
                                *this.probe_until =
                                    Some(now.checked_add(shared.max_probe).unwrap_or(now));
                            } else {
                                *this.turn = None;
                            }
                            let handle = ReservationHandle::new(
                                shared.store.clone(),
                                *this.partition,
                                *this.cost,
                                charged,
                                this.own.clone(),
                                this.span
                                    .as_deref()
                                    .cloned()
                                    .unwrap_or_else(tracing::Span::none),
                            );
                            if let Some(req) = req.as_mut() {
                                crate::wire::mark(req.extensions_mut(), handle.wire_mark());
                            }
                            *this.not_sent = Some(NotSent::new(handle));
                            *this.phase = Phase::Ready;
                        }
                        Admission::TooLarge {
                            partition,
                            bucket,
                            needed,
                            capacity,
                        } => {
                            this.own.metrics.refused(Refusal::TooLarge);
                            return Poll::Ready(Err(Box::new(BudgetError::too_large(
                                partition, bucket, needed, capacity,
                            ))));
                        }
                        Admission::Wait { .. } if this.turn.is_none() => {
                            // The fast path found no room: queue for the turn like everyone, and
                            // so do the requests after it.
                            this.own.bound.store(true, Ordering::Relaxed);
                            *this.phase = Phase::Turn { fast: false };
                        }
                        Admission::Wait {
                            retry_in,
                            partition,
                            reason,
                        } => {
                            if let Some(cap) = shared.max_wait.filter(|cap| retry_in > *cap) {
                                this.own.metrics.refused(Refusal::WaitTooLong);
                                return Poll::Ready(Err(Box::new(BudgetError::wait_too_long(
                                    partition, retry_in, cap,
                                ))));
                            }
                            if partition != PartitionKey::GLOBAL {
                                *this.global_turn = None;
                            }
                            this.own.bound.store(true, Ordering::Relaxed);
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
                            *this.phase = Phase::Waiting(now + retry_in.min(RECHECK));
                        }
                    }
                }
                Phase::Waiting(until) => {
                    ready!(crate::util::sleep_until(this.sleep, until, cx));
                    *this.phase = Phase::Reserve;
                }
                Phase::Ready => {
                    ready!(this.svc.poll_ready(cx)).map_err(Into::into)?;
                    let req = req.take().expect("request sent once");
                    if let Some(n) = this.not_sent.as_mut() {
                        n.handed_on();
                    }
                    let fut = {
                        let _entered = this.span.as_ref().map(|s| s.enter());
                        this.svc.call(req)
                    };
                    this.state.set(State::Calling { fut });
                }
            }
        }
    }
}
