use super::future::ResponseFuture;
use super::layer::Shared;
use super::{BackoffRetryLayer, Deadline};
use crate::BoxError;
use crate::body::InMemoryBody;
use http::{Request, Response};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use tokio::time::Instant;
use tower::Service;

/// The service [`BackoffRetryLayer`] makes. See the [module docs](super).
///
/// It is always ready: each attempt drives a clone of the inner service to readiness inside the
/// response future (`poll_ready` before every `call`), so no capacity of the inner service is held
/// between attempts.
pub struct BackoffRetry<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> BackoffRetry<S> {
    /// A layer with the defaults ([`BackoffRetryLayer::new`]).
    pub fn layer() -> BackoffRetryLayer {
        BackoffRetryLayer::new()
    }
}

inner_service!(BackoffRetry);

impl<S: fmt::Debug> fmt::Debug for BackoffRetry<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackoffRetry")
            .field("inner", &self.inner)
            .field("max_retries", &self.shared.max_retries)
            .finish()
    }
}

impl<S, B, ResB> Service<Request<B>> for BackoffRetry<S>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    B: InMemoryBody,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let shared = &self.shared;
        shared.stats.calls.fetch_add(1, Ordering::Relaxed);
        if let Some(b) = &shared.budget {
            b.deposit();
        }
        // Read the clock only when a deadline needs it.
        let from_layer = shared.deadline.and_then(|d| Instant::now().checked_add(d));
        let from_request = req.extensions().get::<Deadline>().map(|d| d.0);
        let deadline = match (from_layer, from_request) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        ResponseFuture::new(self.inner.clone(), req, self.shared.clone(), deadline)
    }
}
