//! The response future of [`ConcurrencyLimit`](super::ConcurrencyLimit).

use super::body::ConcurrencyBody;
use super::layer::Shared;
use super::slots::Slots;
use crate::BoxError;
use crate::classify::Outcome;
use http::{Request, Response};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::time::Instant;
use tower::Service;

pin_project! {
    /// Waits for a slot (FIFO), sends the request, and hands the slot to the response body.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        svc: S,
        shared: Arc<Shared>,
        slots: Option<Slots>,
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
    pub(crate) fn new(svc: S, req: Request<B>, shared: Arc<Shared>, slots: Slots) -> Self {
        Self {
            svc,
            shared,
            slots: Some(slots),
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
                    if let Some(slots) = this.slots.as_mut() {
                        ready!(slots.poll_acquire(cx)).map_err(|e| -> BoxError { Box::new(e) })?;
                    }
                    *this.acquired = true;
                }
                StateProj::Holding { req } => {
                    ready!(this.svc.poll_ready(cx)).map_err(Into::into)?;
                    let req = req.take().expect("request sent once");
                    crate::wire::sent(req.extensions());
                    // The send time is kept with the slots (it goes on to the body's end).
                    if let Some(slots) = this.slots.as_mut().filter(|s| s.own().is_some()) {
                        slots.sent(Instant::now());
                    }
                    let fut = this.svc.call(req);
                    this.state.set(State::Calling { fut });
                }
                StateProj::Calling { fut } => {
                    let result: Result<_, BoxError> = ready!(fut.poll(cx)).map_err(Into::into);
                    let slots = this.slots.take().expect("slots handed over once");
                    if let (Some(own), Some(sent_at)) = (slots.own(), slots.sent_at()) {
                        let now = Instant::now();
                        let rtt = now.saturating_duration_since(sent_at);
                        own.round_trip(rtt);
                        if own.adapts() {
                            // An adaptive limit learns from every attempt's outcome and round trip.
                            let ctx = &this.shared.ctx;
                            let outcome = match &result {
                                Ok(res) => ctx.classify(res).outcome,
                                Err(e) => ctx.classify_error(&**e).outcome,
                            };
                            let saturated = slots.saturated() && outcome == Outcome::Success;
                            own.observe_at(outcome, saturated, now);
                        }
                    }
                    let permit = slots.into_permit();
                    return Poll::Ready(match result {
                        Ok(res) => Ok(res.map(|b| ConcurrencyBody::new(b, permit))),
                        Err(e) => Err(e),
                    });
                }
            }
        }
    }
}
