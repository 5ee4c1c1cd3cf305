use super::RetryAfterLayer;
use super::future::ResponseFuture;
use super::gate::Shared;
use crate::BoxError;
use http::{Request, Response};
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::Service;

/// The service [`RetryAfterLayer`] makes. See the [module docs](super).
///
/// It is always ready: the inner service is asked to be ready only after the request has passed
/// its partition's gate (at once in `call` when the gate is open, else in the response future,
/// on a clone), so a request that waits holds nothing of the inner service (no connection, no
/// concurrency slot) while it waits.
pub struct RetryAfter<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> RetryAfter<S> {
    /// A layer with the defaults ([`RetryAfterLayer::new`]).
    pub fn layer() -> RetryAfterLayer {
        RetryAfterLayer::new()
    }
}

inner_service!(RetryAfter);

impl<S: fmt::Debug> fmt::Debug for RetryAfter<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryAfter")
            .field("inner", &self.inner)
            .field("max_wait", &self.shared.max_wait)
            .finish()
    }
}

impl<S, B, ResB> Service<Request<B>> for RetryAfter<S>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        crate::wire::pending(req.extensions());
        // Last before the wire: read the partition a layer above cached, cache nothing.
        let partition = self.shared.ctx.partition_here(&req);
        ResponseFuture::new(
            &mut self.inner,
            req,
            super::future::Gate::new(self.shared.clone(), partition),
        )
    }
}
