//! The response future of [`RetryAfter`](super::RetryAfter).

use super::layer::Shared;
use super::service::too_long;
use crate::BoxError;
use crate::partition::PartitionKey;
use http::{Request, Response};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tower::Service;

pin_project! {
    /// Waits at the partition's gate, then sends the request and reads the server's hint.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        svc: S,
        req: Option<Request<B>>,
        shared: Arc<Shared>,
        partition: PartitionKey,
        jitter: Option<Duration>,
        sleep: Option<Pin<Box<Sleep>>>,
        #[pin]
        state: State<S::Future>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Gate,
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
    ) -> Self {
        Self {
            svc,
            req: Some(req),
            shared,
            partition,
            jitter: None,
            sleep: None,
            state: State::Gate,
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Gate => "gate",
            State::Ready => "ready",
            State::Calling { .. } => "calling",
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
                StateProj::Gate => {
                    let now = Instant::now();
                    let Some(until) = this.shared.gate(*this.partition, now) else {
                        this.state.set(State::Ready);
                        continue;
                    };
                    if let Some(err) = too_long(this.shared, *this.partition, until, now) {
                        return Poll::Ready(Err(err.into()));
                    }
                    // The jitter is drawn once, the first time this request meets a closed gate.
                    let jitter = *this.jitter.get_or_insert_with(|| this.shared.draw_jitter());
                    let deadline = until + jitter;
                    match this.sleep {
                        Some(s) => s.as_mut().reset(deadline),
                        None => *this.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                    tracing::trace!(partition = %this.partition, wait_ms = (deadline - now).as_millis() as u64, "retry-after: waiting at gate");
                    if let Some(s) = this.sleep.as_mut() {
                        ready!(s.as_mut().poll(cx));
                    }
                    // Woken: look again, the gate may have been pushed further meanwhile.
                    if this.shared.gate(*this.partition, Instant::now()).is_none() {
                        this.state.set(State::Ready);
                    }
                }
                StateProj::Ready => {
                    ready!(this.svc.poll_ready(cx)).map_err(Into::into)?;
                    let req = this.req.take().expect("request sent once");
                    crate::wire::sent(req.extensions());
                    let fut = this.svc.call(req);
                    this.state.set(State::Calling { fut });
                }
                StateProj::Calling { fut } => {
                    let mut res = ready!(fut.poll(cx)).map_err(Into::into)?;
                    this.shared.observe(*this.partition, &mut res);
                    return Poll::Ready(Ok(res));
                }
            }
        }
    }
}
