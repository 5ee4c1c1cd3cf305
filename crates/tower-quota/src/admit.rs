//! One future for the layers that hold a request before they send it: the Retry-After gate, the
//! concurrency limit and the token budget.
//!
//! Each of them is "always ready, wait in the future": the service clones its inner service into
//! the request's future, the future waits for its layer's admission, then readies the clone,
//! sends the request and looks at the answer. Only the waiting and the looking differ, so they
//! are what a layer writes ([`Admit`]: plain state, no tower types); the rest is written once
//! here ([`Admitted`]): the clone of the inner service, readiness after admission, the call, the
//! request kept in the space the inner future takes after the call, and the answer handed back.

use crate::BoxError;
use http::{Request, Response};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tower::Service;

/// What a holding layer does with one request: admit it, send it, read its answer.
pub(crate) trait Admit<B>: fmt::Debug {
    /// The response body the layer hands back for an inner body `R`.
    type Body<R>;

    /// Waits until the request may go (`Err`: refused, never sent). Called again after it said
    /// `Ready(Ok)` when the inner service was not ready: it must then say so again at once.
    fn poll_admit(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>>;

    /// Sends the request to the (ready) inner service. By default it marks the request as
    /// handed on (the budget's held count, see [`crate::wire`]) and calls.
    fn send<S: Service<Request<B>>>(&mut self, svc: &mut S, req: Request<B>) -> S::Future {
        crate::wire::sent(req.extensions());
        svc.call(req)
    }

    /// Polls the inner future (a layer may poll it inside a span, or watch a deadline meanwhile).
    fn poll_call<F: Future>(&mut self, fut: Pin<&mut F>, cx: &mut Context<'_>) -> Poll<F::Output> {
        fut.poll(cx)
    }

    /// The inner service answered (or failed): what the caller gets.
    fn answered<R>(
        &mut self,
        result: Result<Response<R>, BoxError>,
    ) -> Result<Response<Self::Body<R>>, BoxError>;
}

pin_project! {
    /// The future of a holding layer: `admit` decides when, the rest is the same for all.
    pub(crate) struct Admitted<S, B, A>
    where
        S: Service<Request<B>>,
    {
        svc: S,
        admit: A,
        #[pin]
        state: State<S::Future, Request<B>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, R> {
        /// Before the call: the request waits here, in the space the inner future takes after.
        Holding { req: Option<R> },
        Calling { #[pin] fut: F },
    }
}

impl<S, B, A> Admitted<S, B, A>
where
    S: Service<Request<B>>,
{
    pub(crate) fn new(svc: S, req: Request<B>, admit: A) -> Self {
        Self {
            svc,
            admit,
            state: State::Holding { req: Some(req) },
        }
    }
}

impl<S, B, A, R> Future for Admitted<S, B, A>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    A: Admit<B>,
{
    type Output = Result<Response<A::Body<R>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Holding { req } => {
                    ready!(this.admit.poll_admit(cx))?;
                    ready!(this.svc.poll_ready(cx)).map_err(Into::into)?;
                    let req = req.take().expect("request sent once");
                    let fut = this.admit.send(this.svc, req);
                    this.state.set(State::Calling { fut });
                }
                StateProj::Calling { fut } => {
                    let result = ready!(this.admit.poll_call(fut, cx)).map_err(Into::into);
                    return Poll::Ready(this.admit.answered(result));
                }
            }
        }
    }
}

impl<S, B, A> fmt::Debug for Admitted<S, B, A>
where
    S: Service<Request<B>>,
    A: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("calling", &matches!(self.state, State::Calling { .. }))
            .field("admission", &self.admit)
            .finish()
    }
}

/// The public `ResponseFuture<S, B>` of a holding layer's module: a pinned [`Admitted`] with the
/// layer's [`Admit`] state, its docs and its response body.
macro_rules! admitted_future {
    ($(#[$doc:meta])* $admit:ty, $body:ident) => {
        pin_project_lite::pin_project! {
            $(#[$doc])*
            pub struct ResponseFuture<S, B>
            where
                S: tower::Service<http::Request<B>>,
            {
                #[pin]
                inner: crate::admit::Admitted<S, B, $admit>,
            }
        }

        impl<S, B> ResponseFuture<S, B>
        where
            S: tower::Service<http::Request<B>>,
        {
            pub(crate) fn new(svc: S, req: http::Request<B>, admit: $admit) -> Self {
                Self {
                    inner: crate::admit::Admitted::new(svc, req, admit),
                }
            }
        }

        impl<S, B, ResB> std::future::Future for ResponseFuture<S, B>
        where
            S: tower::Service<http::Request<B>, Response = http::Response<ResB>>,
            S::Error: Into<crate::BoxError>,
        {
            type Output = Result<http::Response<$body<ResB>>, crate::BoxError>;

            fn poll(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Self::Output> {
                self.project().inner.poll(cx)
            }
        }

        impl<S, B> std::fmt::Debug for ResponseFuture<S, B>
        where
            S: tower::Service<http::Request<B>>,
        {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::Debug::fmt(&self.inner, f)
            }
        }
    };
}

pub(crate) use admitted_future;

/// The body of a layer that hands the inner body back as it is.
pub(crate) type Same<R> = R;
