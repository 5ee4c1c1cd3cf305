//! The response future of [`ConcurrencyLimit`](super::ConcurrencyLimit).

use super::body::ConcurrencyBody;
use super::layer::{Permit, Shared};
use super::limiter::Limiter;
use crate::BoxError;
use crate::classify::Outcome;
use http::{Request, Response};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use tokio::time::Instant;
use tower::Service;

use crate::util::Acquire;

/// Counts a request as queued at a limiter while it waits there.
struct Queued(Arc<Limiter>);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::SeqCst);
    }
}

pin_project! {
    /// Waits for a slot (FIFO), sends the request, and hands the slot to the response body.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        svc: S,
        shared: Arc<Shared>,
        limiters: [Option<Arc<Limiter>>; 2],
        next: usize,
        waiting: Option<(Acquire, Queued)>,
        permit: Option<Permit>,
        saturated: bool,
        sent_at: Option<Instant>,
        // Every slot held, waiting for the inner service.
        acquired: bool,
        #[pin]
        state: State<S::Future, Request<B>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, R> {
        /// Before the call: the request waits here (in the space the inner future takes after).
        Holding { req: Option<R> },
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
        limiters: [Option<Arc<Limiter>>; 2],
    ) -> Self {
        Self {
            svc,
            shared,
            limiters,
            next: 0,
            waiting: None,
            permit: Some(Permit::new()),
            saturated: false,
            sent_at: None,
            acquired: false,
            state: State::Holding { req: Some(req) },
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match (&self.state, self.acquired) {
            (State::Calling { .. }, _) => "calling",
            (_, false) => "acquiring",
            (_, true) => "ready",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S, B, ResB> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<ConcurrencyBody<ResB>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Holding { .. } if !*this.acquired => {
                    let Some(limiter) = this.limiters.get(*this.next).and_then(Clone::clone) else {
                        *this.acquired = true;
                        continue;
                    };
                    let permit = match this.waiting {
                        Some((acquire, _)) => {
                            let p = ready!(acquire.as_mut().poll(cx));
                            *this.waiting = None;
                            p
                        }
                        None => match limiter.semaphore().try_acquire_owned() {
                            Ok(p) => Ok(p),
                            Err(_) => {
                                if *this.next == 0 {
                                    *this.saturated = true;
                                }
                                let queued = limiter.queued.fetch_add(1, Ordering::SeqCst) + 1;
                                tracing::trace!(
                                    limit = limiter.limit(),
                                    queued,
                                    global = *this.next == 1,
                                    "concurrency: waiting for a slot"
                                );
                                let acquire: Acquire =
                                    Box::pin(limiter.semaphore().acquire_owned());
                                *this.waiting = Some((acquire, Queued(limiter.clone())));
                                continue;
                            }
                        },
                    };
                    // The semaphores are never closed.
                    let permit = permit.map_err(|e| -> BoxError { Box::new(e) })?;
                    let reached = limiter.acquired();
                    if *this.next == 0 {
                        // Demand exceeds the limit if the slot was full when we came, or if we had
                        // to queue for it (with lockstep completions the in-flight count dips
                        // below the limit between a release and the next acquire).
                        *this.saturated |= reached;
                    }
                    if let Some(p) = this.permit.as_mut() {
                        p.push(limiter, permit);
                    }
                    *this.next += 1;
                }
                StateProj::Holding { req } => {
                    ready!(this.svc.poll_ready(cx)).map_err(Into::into)?;
                    let req = req.take().expect("request sent once");
                    crate::wire::sent(req.extensions());
                    if this.limiters[0].as_ref().is_some_and(|l| l.adapts()) {
                        *this.sent_at = Some(Instant::now());
                    }
                    let fut = this.svc.call(req);
                    this.state.set(State::Calling { fut });
                }
                StateProj::Calling { fut } => {
                    let result: Result<_, BoxError> = ready!(fut.poll(cx)).map_err(Into::into);
                    if let (Some(own), Some(sent_at)) = (this.limiters[0].as_ref(), *this.sent_at) {
                        // An adaptive limit learns from every attempt's outcome and round trip.
                        let now = Instant::now();
                        let rtt = now.saturating_duration_since(sent_at);
                        let ctx = &this.shared.ctx;
                        let outcome = match &result {
                            Ok(res) => ctx.classify(res).outcome,
                            Err(e) => ctx.classify_error(&**e).outcome,
                        };
                        let saturated = *this.saturated && outcome == Outcome::Success;
                        own.observe_at(outcome, rtt, saturated, now);
                    }
                    let permit = this.permit.take().expect("permit handed over once");
                    return Poll::Ready(match result {
                        Ok(res) => Ok(res.map(|b| ConcurrencyBody::new(b, permit))),
                        Err(e) => Err(e),
                    });
                }
            }
        }
    }
}
