use super::ConcurrencyLimitLayer;
use super::body::ConcurrencyBody;
use super::future::ResponseFuture;
use super::layer::Shared;
use super::slots::{Reserved, Slots, poll_reserve};
use crate::BoxError;
use crate::partition::PartitionKey;
use http::{Request, Response};
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tower::Service;

/// The service [`ConcurrencyLimitLayer`] makes. See the [module docs](super).
///
/// # Readiness
///
/// With one limit for every request (the default), `poll_ready` reserves the slot (and the global
/// cap's) as tower's `ConcurrencyLimit` does: it is pending while the limit is full, so
/// `load_shed` or a `Buffer` in front of it see the back-pressure. With
/// [`per_partition`](ConcurrencyLimitLayer::per_partition) limits, which slot a request needs
/// depends on the request, so the service is always ready: `call` takes a free slot, else the
/// response future waits for one. Either way the inner service is made ready only once the slot
/// is held (in `call`, or a clone of it in the response future).
///
/// # Clone
///
/// A clone shares the limits, not the original's reservation.
pub struct ConcurrencyLimit<S> {
    inner: S,
    shared: Arc<Shared>,
    reserved: Reserved,
}

impl<S> ConcurrencyLimit<S> {
    /// A fixed-limit layer ([`ConcurrencyLimitLayer::fixed`]).
    pub fn layer(limit: usize) -> ConcurrencyLimitLayer {
        ConcurrencyLimitLayer::fixed(limit)
    }
}

inner_service!(ConcurrencyLimit, reserved: None);

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

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if !self.shared.partitioned() {
            let shared = &self.shared;
            ready!(poll_reserve(
                &mut self.reserved,
                || {
                    Slots::new(
                        shared.limiters(PartitionKey::ANONYMOUS),
                        PartitionKey::ANONYMOUS,
                        shared.max_queue,
                    )
                },
                cx
            ));
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        crate::wire::pending(req.extensions());
        // One limit for all needs no partition; per-partition limits do.
        let slots = match self.reserved.take() {
            // Reserved by poll_ready (or still being taken, if `call` came without it).
            Some(slots) => slots.into_inner(),
            None => {
                let p = match self.shared.partitioned() {
                    true => self.shared.ctx.partition(&mut req),
                    false => PartitionKey::ANONYMOUS,
                };
                Slots::new(self.shared.limiters(p), p, self.shared.max_queue)
            }
        };
        ResponseFuture::new(
            &mut self.inner,
            req,
            super::future::Slot::new(self.shared.clone(), slots),
        )
    }
}
