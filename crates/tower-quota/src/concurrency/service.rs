use super::ConcurrencyLimitLayer;
use super::body::ConcurrencyBody;
use super::future::ResponseFuture;
use super::layer::Shared;
use crate::BoxError;
use crate::partition::PartitionKey;
use http::{Request, Response};
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::Service;

/// The service [`ConcurrencyLimitLayer`] makes. See the [module docs](super).
///
/// It is always ready: the slot is acquired inside the response future, because which limit
/// applies depends on the request's partition. The inner service is made ready only once the slot
/// is held.
pub struct ConcurrencyLimit<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> ConcurrencyLimit<S> {
    /// A fixed-limit layer ([`ConcurrencyLimitLayer::fixed`]).
    pub fn layer(limit: usize) -> ConcurrencyLimitLayer {
        ConcurrencyLimitLayer::fixed(limit)
    }
}

inner_service!(ConcurrencyLimit);

impl<S: fmt::Debug> fmt::Debug for ConcurrencyLimit<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimit")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<S, B, ResB> Service<Request<B>> for ConcurrencyLimit<S>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Response<ConcurrencyBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        crate::wire::pending(req.extensions());
        // One limit for all needs no partition; per-partition limits do.
        let p = match self.shared.partitioned() {
            true => self.shared.ctx.partition(&mut req),
            false => PartitionKey::ANONYMOUS,
        };
        let limiters = self.shared.limiters(p);
        ResponseFuture::new(self.inner.clone(), req, self.shared.clone(), limiters)
    }
}
