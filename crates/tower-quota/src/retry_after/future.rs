//! The response future of [`RetryAfter`](super::RetryAfter).

use super::gate::{Meet, Shared};
use crate::BoxError;
use crate::classify::Outcome;
use crate::partition::PartitionKey;
use http::{Request, Response};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::sync::futures::OwnedNotified;
use tokio::time::{Instant, Sleep};
use tower::Service;

pin_project! {
    /// Waits at the partition's gate, then sends the request and reads the server's hint.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        svc: S,
        shared: Arc<Shared>,
        partition: PartitionKey,
        jitter: Option<Duration>,
        waited: Option<Instant>,
        sleep: Option<Pin<Box<Sleep>>>,
        notified: Option<Pin<Box<OwnedNotified>>>,
        probe: bool,
        // Counted among the gate's waiters.
        waiting: bool,
        // Past the gate, waiting for the inner service.
        passed: bool,
        #[pin]
        state: State<S::Future, Request<B>>,
    }

    impl<S, B> PinnedDrop for ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.probe {
                // A probe that gives up hands the role to the next waiter.
                this.shared.probe_done(*this.partition, false);
            }
            if *this.waiting {
                this.shared.leave(*this.partition);
            }
        }
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
        partition: PartitionKey,
    ) -> Self {
        Self {
            svc,
            shared,
            partition,
            jitter: None,
            waited: None,
            sleep: None,
            notified: None,
            probe: false,
            waiting: false,
            passed: false,
            state: State::Holding { req: Some(req) },
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match (&self.state, self.passed) {
            (State::Calling { .. }, _) => "calling",
            (_, false) => "gate",
            (_, true) => "ready",
        };
        f.debug_struct("ResponseFuture")
            .field("partition", &self.partition)
            .field("state", &state)
            .finish()
    }
}

impl<S, B, ResB> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<ResB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Holding { .. } if !*this.passed => {
                    if let Some(n) = this.notified.as_mut() {
                        // Waiting for the half-open gate's probe to answer.
                        ready!(n.as_mut().poll(cx));
                        *this.notified = None;
                    }
                    let p = *this.partition;
                    let mut meet = this.shared.meet(p);
                    loop {
                        match meet {
                            Meet::Closed(until) => {
                                let now = Instant::now();
                                if let Some(err) = this.shared.too_long(p, until, now) {
                                    return Poll::Ready(Err(err.into()));
                                }
                                if !*this.waiting {
                                    this.shared.enter(p)?;
                                    *this.waiting = true;
                                }
                                // The jitter is drawn once, the first time the request meets a
                                // closed gate, and only ever adds to the server's instant.
                                let jitter =
                                    *this.jitter.get_or_insert_with(|| this.shared.draw_jitter());
                                *this.waited = Some(until);
                                tracing::trace!(partition = %p, wait_ms = (until + jitter - now).as_millis() as u64, "retry-after: waiting at gate");
                                ready!(crate::util::sleep_until(this.sleep, until + jitter, cx));
                                break;
                            }
                            Meet::Probing(notify) => {
                                // Register first, then look again: a probe that answers in
                                // between still wakes this request.
                                let n = Box::pin(notify.notified_owned());
                                match this.shared.meet(p) {
                                    Meet::Probing(_) => {
                                        *this.notified = Some(n);
                                        break;
                                    }
                                    again => meet = again,
                                }
                            }
                            Meet::Pass { probe } => {
                                *this.probe |= probe;
                                if std::mem::take(this.waiting) {
                                    this.shared.leave(p);
                                }
                                if let Some(until) = *this.waited {
                                    // Released by a probe's answer: keep this request's own
                                    // jitter, so the herd spreads out behind the probe.
                                    let deadline = until + this.jitter.unwrap_or_default();
                                    if Instant::now() < deadline {
                                        ready!(crate::util::sleep_until(this.sleep, deadline, cx));
                                    }
                                }
                                *this.passed = true;
                                break;
                            }
                        }
                    }
                }
                StateProj::Holding { req } => {
                    ready!(this.svc.poll_ready(cx)).map_err(Into::into)?;
                    let req = req.take().expect("request sent once");
                    crate::wire::sent(req.extensions());
                    let fut = this.svc.call(req);
                    this.state.set(State::Calling { fut });
                }
                StateProj::Calling { fut } => {
                    let result = ready!(fut.poll(cx)).map_err(Into::into);
                    let closed = match result {
                        Ok(mut res) => {
                            let (outcome, closed) = this.shared.observe(*this.partition, &mut res);
                            if outcome == Outcome::Success {
                                this.shared.succeeded(*this.partition);
                            }
                            if *this.probe {
                                *this.probe = false;
                                this.shared.probe_done(*this.partition, !closed);
                            }
                            return Poll::Ready(Ok(res));
                        }
                        Err(e) => e,
                    };
                    if *this.probe {
                        *this.probe = false;
                        this.shared.probe_done(*this.partition, false);
                    }
                    return Poll::Ready(Err(closed));
                }
            }
        }
    }
}
