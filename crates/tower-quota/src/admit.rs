//! One future for the layers that hold a request before they send it: the Retry-After gate, the
//! concurrency limit and the token budget.
//!
//! Each of them is "always ready, wait in the future": `call` asks the layer's admission once; a
//! request admitted at once goes to the inner service from `call` if that is ready (as from
//! tower's own layers; no clone of the inner service is made); a request that must wait moves
//! into the future with a clone of the inner service, and the future waits for the admission,
//! readies the clone and sends it. The clone and the request wait in the space the inner future
//! takes after the call, not in a box: a box made the futures smaller and the stack about 3 %
//! faster, but cost every waiter one more allocation (a budget waiter 456 bytes beyond its
//! request, over the 400 it may take). Either way the future looks at the answer. Only the
//! waiting and the looking differ, so they are what a layer writes ([`Admit`]: plain state, no
//! tower types); the rest is written once here ([`Admitted`]): the first try, the clone,
//! readiness after admission, the call, and the answer handed back.

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
        admit: A,
        #[pin]
        state: State<S, S::Future, Request<B>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, F, R> {
        /// Not admitted yet, or the inner service not ready: a clone of it and the request (a
        /// request admitted at once, the usual case, never holds them).
        Holding { svc: S, req: Option<R> },
        Calling { #[pin] fut: F },
        /// Refused at once, or the inner service failed to get ready: said at the first poll.
        Failed { error: Option<BoxError> },
    }
}

impl<S, B, A> Admitted<S, B, A>
where
    S: Service<Request<B>> + Clone,
    S::Error: Into<BoxError>,
    A: Admit<B>,
{
    /// Admits `req` at once if it can, and sends it to `svc` if that is ready too: the future
    /// then holds the inner future. Else it holds a clone of `svc` (the one polled, if its
    /// readiness was asked: tower's rule for a service that is not ready) and waits.
    ///
    /// Asking here, with a waker that does nothing, is safe: whatever was asked is asked again by
    /// the future's first poll, with the caller's waker.
    pub(crate) fn new(svc: &mut S, req: Request<B>, mut admit: A) -> Self {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let hold = |svc: S, req| State::Holding {
            svc,
            req: Some(req),
        };
        let state = match admit.poll_admit(&mut cx) {
            Poll::Pending => hold(svc.clone(), req),
            Poll::Ready(Err(error)) => State::Failed { error: Some(error) },
            Poll::Ready(Ok(())) => match svc.poll_ready(&mut cx) {
                Poll::Ready(Ok(())) => State::Calling {
                    fut: admit.send(svc, req),
                },
                not_ready => {
                    // The service that was asked leaves with the request (to be asked again) or
                    // goes (it failed); a fresh clone stays for the next request, as when every
                    // request readied its own.
                    let fresh = svc.clone();
                    let asked = std::mem::replace(svc, fresh);
                    match not_ready {
                        Poll::Ready(Err(e)) => State::Failed {
                            error: Some(e.into()),
                        },
                        _ => hold(asked, req),
                    }
                }
            },
        };
        Self { admit, state }
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
                StateProj::Holding { svc, req } => {
                    ready!(this.admit.poll_admit(cx))?;
                    ready!(svc.poll_ready(cx)).map_err(Into::into)?;
                    let req = req.take().expect("request sent once");
                    let fut = this.admit.send(svc, req);
                    this.state.set(State::Calling { fut });
                }
                StateProj::Calling { fut } => {
                    let result = ready!(this.admit.poll_call(fut, cx)).map_err(Into::into);
                    return Poll::Ready(this.admit.answered(result));
                }
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(error.take().expect("polled after completion")));
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
            pub(crate) fn new(svc: &mut S, req: http::Request<B>, admit: $admit) -> Self
            where
                S: Clone,
                S::Error: Into<crate::BoxError>,
            {
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

#[cfg(test)]
mod tests {
    use crate::concurrency::ConcurrencyLimitLayer;
    use crate::retry_after::RetryAfterLayer;
    use http::{Request, Response};
    use std::convert::Infallible;
    use std::future::{Ready, ready};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};
    use tokio_test::{assert_pending, assert_ready_ok};
    use tower::{Layer, Service};

    /// Answers 200 at once, counting its clones and its calls.
    #[derive(Default)]
    struct Counted {
        clones: Arc<AtomicUsize>,
        calls: Arc<AtomicUsize>,
    }

    impl Clone for Counted {
        fn clone(&self) -> Self {
            self.clones.fetch_add(1, Ordering::SeqCst);
            Self {
                clones: self.clones.clone(),
                calls: self.calls.clone(),
            }
        }
    }

    impl Service<Request<()>> for Counted {
        type Response = Response<()>;
        type Error = Infallible;
        type Future = Ready<Result<Response<()>, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _req: Request<()>) -> Self::Future {
            self.calls.fetch_add(1, Ordering::SeqCst);
            ready(Ok(Response::new(())))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_admitted_at_once_is_sent_by_call_and_one_that_waits_holds_a_clone() {
        let inner = Counted::default();
        let (clones, calls) = (inner.clones.clone(), inner.calls.clone());
        let mut svc = ConcurrencyLimitLayer::fixed(1).layer(inner);
        let count = |c: &AtomicUsize| c.load(Ordering::SeqCst);

        // A free slot: sent from `call`, before any poll, and no clone of the inner service.
        let mut first = tokio_test::task::spawn(svc.call(Request::new(())));
        assert_eq!((count(&calls), count(&clones)), (1, 0));

        // The slot is taken: the second waits, holding a clone, and is not sent.
        let mut second = tokio_test::task::spawn(svc.call(Request::new(())));
        assert_pending!(second.poll());
        assert_eq!((count(&calls), count(&clones)), (1, 1));

        // The first answer's body holds the slot; dropping it lets the second go.
        let res = assert_ready_ok!(first.poll());
        assert_pending!(second.poll());
        drop(res);
        assert!(second.is_woken());
        assert_ready_ok!(second.poll());
        assert_eq!(count(&calls), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_inner_service_not_ready_at_call_is_polled_again_with_the_callers_waker() {
        let (mock, mut handle) = tower_test::mock::pair::<Request<()>, Response<()>>();
        handle.allow(0);
        let mut svc = RetryAfterLayer::new().layer(mock);
        // Admitted at once, but the inner service is not ready: the request waits in the future.
        let mut fut = tokio_test::task::spawn(svc.call(Request::new(())));
        assert_pending!(fut.poll());
        assert_pending!(tokio_test::task::spawn(handle.next_request()).poll());
        handle.allow(1);
        assert!(
            fut.is_woken(),
            "the readiness asked in `call` was asked again by the poll"
        );
        assert_pending!(fut.poll());
        let (_req, send) = handle.next_request().await.expect("sent once ready");
        send.send_response(Response::new(()));
        assert_ready_ok!(fut.poll());
    }
}
