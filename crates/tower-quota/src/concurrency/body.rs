use super::slots::Permit;
use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

pin_project! {
    /// A response body that holds its request's concurrency slot until it ends or is dropped, so a
    /// streaming response counts as in flight for as long as it streams.
    pub struct ConcurrencyBody<B> {
        #[pin]
        inner: B,
        permit: Option<Permit>,
    }
}

impl<B> ConcurrencyBody<B> {
    pub(crate) fn new(inner: B, permit: Permit) -> Self {
        Self {
            inner,
            permit: Some(permit),
        }
    }

    /// Whether the body still holds its slot.
    pub fn holds_slot(&self) -> bool {
        self.permit.is_some()
    }

    /// The inner body (releasing the slot).
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: fmt::Debug> fmt::Debug for ConcurrencyBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyBody")
            .field("inner", &self.inner)
            .field("holds_slot", &self.permit.is_some())
            .finish()
    }
}

impl<B> Body for ConcurrencyBody<B>
where
    B: Body,
    B::Data: Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            None => {
                if let Some(p) = this.permit.take() {
                    p.body_ended();
                }
            }
            Some(Err(_)) => *this.permit = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
