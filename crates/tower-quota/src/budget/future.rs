//! The response future of [`TokenBudget`](super::TokenBudget).

use super::body::BudgetBody;
use super::error::BudgetError;
use super::layer::{Queue, Shared};
use super::reservation::{NotSent, ReservationHandle, drive};
use super::store::{Admission, Learned, Scope, StoreFuture};
use super::{Bucket, Cost};
use crate::BoxError;
use crate::classify::{Outcome, TransportKind};
use crate::partition::PartitionKey;
use crate::signals::Signals;
use crate::util::{Acquire, poll_acquire};
use http::{Request, Response};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
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
        req: Option<Request<B>>,
        shared: Arc<Shared>,
        partition: PartitionKey,
        cost: Cost,
        scopes: Arc<[Scope]>,
        own: Arc<Queue>,
        global: Option<Arc<Semaphore>>,
        turn: Option<OwnedSemaphorePermit>,
        global_turn: Option<OwnedSemaphorePermit>,
        acquire: Option<Acquire>,
        asking: Option<StoreFuture<'static, Admission>>,
        sleep: Option<Pin<Box<Sleep>>>,
        queued: bool,
        probe: bool,
        not_sent: Option<NotSent>,
        #[pin]
        state: State<S::Future>,
    }

    impl<S, B> PinnedDrop for ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.queued {
                this.shared.queued.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        /// Waiting for the partition's FIFO turn.
        Turn,
        /// Holding the turn: asking the store (with the global cap's turn while it binds).
        Reserve,
        /// Told to come back at `until`.
        Waiting { until: Instant },
        /// Admitted: waiting for the inner service.
        Ready,
        Calling { #[pin] fut: F },
    }
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
    ) -> Self {
        let own = shared.queue(partition);
        let scopes = own.scopes.clone();
        let global = shared.global_turn.clone();
        shared.queued.fetch_add(1, Ordering::SeqCst);
        Self {
            svc,
            req: Some(req),
            shared,
            partition,
            cost,
            scopes,
            own,
            global,
            turn: None,
            global_turn: None,
            acquire: None,
            asking: None,
            sleep: None,
            queued: true,
            probe: false,
            not_sent: None,
            state: State::Turn,
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Turn => "turn",
            State::Reserve => "reserve",
            State::Waiting { .. } => "waiting",
            State::Ready => "ready",
            State::Calling { .. } => "calling",
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

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Turn => {
                    let permit = ready!(poll_acquire(&this.own.queue, this.acquire, cx));
                    *this.turn = Some(permit);
                    this.state.set(State::Reserve);
                }
                StateProj::Reserve => {
                    // The global turn is held only while the global cap is what binds: a request
                    // waiting for its own key's refill must not hold up the other keys.
                    if this.global_turn.is_none() {
                        if let Some(g) = this.global.as_ref() {
                            *this.global_turn = Some(ready!(poll_acquire(g, this.acquire, cx)));
                        }
                    }
                    let shared = &**this.shared;
                    let answer = match this.asking.as_mut() {
                        Some(asking) => {
                            let a = ready!(asking.as_mut().poll(cx));
                            *this.asking = None;
                            a
                        }
                        None => match shared.store.try_reserve(this.scopes, *this.cost) {
                            Some(a) => a,
                            None => {
                                let (store, scopes) = (shared.store.clone(), this.scopes.clone());
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
                            *this.queued = false;
                            shared.queued.fetch_sub(1, Ordering::SeqCst);
                            shared.admitted.fetch_add(1, Ordering::Relaxed);
                            *this.global_turn = None;
                            // While some limit is neither configured nor learned, the first request
                            // of a partition is a probe: it keeps the turn until its response has
                            // taught the store the limits, so the queue behind it is not admitted
                            // blind.
                            *this.probe = shared.learn
                                && !this.own.probed.load(Ordering::SeqCst)
                                && this.scopes[0].limits.has_unset();
                            if !*this.probe {
                                *this.turn = None;
                            }
                            let handle = ReservationHandle::new(
                                shared.store.clone(),
                                this.scopes.clone(),
                                *this.partition,
                                *this.cost,
                                charged,
                            );
                            if let Some(req) = this.req.as_mut() {
                                req.extensions_mut().insert(handle.wire_mark());
                            }
                            *this.not_sent = Some(NotSent::new(handle));
                            this.state.set(State::Ready);
                        }
                        Admission::TooLarge {
                            partition,
                            bucket,
                            needed,
                            capacity,
                        } => {
                            return Poll::Ready(Err(Box::new(BudgetError::TooLarge {
                                partition,
                                bucket,
                                needed,
                                capacity,
                            })));
                        }
                        Admission::Wait {
                            retry_in,
                            partition,
                            reason,
                        } => {
                            if let Some(cap) = shared.max_wait.filter(|cap| retry_in > *cap) {
                                return Poll::Ready(Err(Box::new(BudgetError::WaitTooLong {
                                    partition,
                                    retry_at: Instant::now() + retry_in,
                                    cap,
                                })));
                            }
                            if partition != PartitionKey::GLOBAL {
                                *this.global_turn = None;
                            }
                            shared.waits.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(
                                partition = %partition,
                                bound_by = ?reason,
                                wait_ms = retry_in.as_millis() as u64,
                                "budget: waiting"
                            );
                            this.state.set(State::Waiting {
                                until: Instant::now() + retry_in,
                            });
                        }
                    }
                }
                StateProj::Waiting { until } => {
                    ready!(crate::util::sleep_until(this.sleep, *until, cx));
                    this.state.set(State::Reserve);
                }
                StateProj::Ready => {
                    ready!(this.svc.poll_ready(cx)).map_err(Into::into)?;
                    let req = this.req.take().expect("request sent once");
                    if let Some(n) = this.not_sent.as_mut() {
                        n.handed_on();
                    }
                    let fut = this.svc.call(req);
                    this.state.set(State::Calling { fut });
                }
                StateProj::Calling { fut } => {
                    let result = ready!(fut.poll(cx)).map_err(Into::into);
                    let not_sent = this.not_sent.take().expect("reserved before the call");
                    let handle = not_sent.answered();
                    let shared = &**this.shared;
                    let mut res = match result {
                        Ok(res) => res,
                        Err(e) => {
                            let verdict = shared.ctx.classify_error(&*e);
                            if verdict.outcome == Outcome::Transport(TransportKind::Connect) {
                                // The request never reached the server.
                                handle.refund();
                            }
                            return Poll::Ready(Err(e));
                        }
                    };
                    settle_answer(shared, *this.partition, &handle, &mut res);
                    if *this.probe {
                        *this.probe = false;
                        this.own.probed.store(true, Ordering::SeqCst);
                        *this.turn = None;
                    }
                    let sse = res
                        .headers()
                        .get(http::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.starts_with("text/event-stream"));
                    res.extensions_mut().insert(handle.clone());
                    let settle = shared.reconcile.then_some(handle);
                    return Poll::Ready(Ok(res.map(|b| BudgetBody::new(b, settle, sse))));
                }
            }
        }
    }
}

/// What a response teaches the budget: the limits and levels in its headers, a refund when the
/// server did no work, a cooldown in the store when it pushed back with a hint.
fn settle_answer<R>(
    shared: &Shared,
    partition: PartitionKey,
    handle: &ReservationHandle,
    res: &mut Response<R>,
) {
    let outcome = shared.ctx.classify(res).outcome;
    let signals = if outcome == Outcome::Success {
        shared.ctx.signals_once(res)
    } else {
        // The retry and the gate read these again: parse once, cached.
        Signals::clone(&shared.ctx.signals(res))
    };
    if shared.learn {
        let learned: Vec<Learned> = Bucket::ALL
            .iter()
            .filter_map(|&b| {
                let s = signals.bucket(b);
                (s.limit.is_some() || s.remaining.is_some()).then_some(Learned {
                    bucket: b,
                    limit: s.limit,
                    remaining: s.remaining,
                })
            })
            .collect();
        if !learned.is_empty() {
            let store = shared.store.clone();
            drive(async move {
                if let Err(e) = store.learn(partition, &learned).await {
                    tracing::warn!(error = %e, "budget: learning from headers failed");
                }
            });
        }
    }
    if outcome != Outcome::Success {
        // The server refused the request: it used nothing.
        handle.refund();
        if outcome == Outcome::RateLimited {
            if let Some(hint) = signals.hint() {
                let store = shared.store.clone();
                drive(async move {
                    if let Err(e) = store.cooldown(partition, hint.delay).await {
                        tracing::warn!(error = %e, "budget: recording a cooldown failed");
                    }
                });
            }
        }
    }
}
