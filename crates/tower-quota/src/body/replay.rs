//! Bodies read into memory once, so any body can be replayed and estimated.

use super::InMemoryBody;
use crate::BoxError;
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, Request};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tower::{Layer, Service, ServiceExt};

/// A body read into memory so it can be replayed, or, past the cap, one that can be sent once.
pub struct ReplayBody<B> {
    inner: Inner<B>,
}

enum Inner<B> {
    Buffered {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    Tail {
        prefix: Option<Bytes>,
        rest: B,
    },
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Inner::Buffered { data, .. } => f
                .debug_struct("ReplayBody::Buffered")
                .field("bytes", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
            Inner::Tail { prefix, .. } => f
                .debug_struct("ReplayBody::Tail")
                .field("prefix", &prefix.as_ref().map_or(0, Bytes::len))
                .finish(),
        }
    }
}

impl<B> ReplayBody<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    /// Reads `body` into memory, up to `cap` bytes. A longer body comes back as a one-shot body
    /// (its buffered prefix, then the unread rest): [`ReplayBody::is_replayable`] is then `false`.
    ///
    /// # Errors
    ///
    /// The body's own error, if reading it fails.
    pub async fn buffer(mut body: B, cap: usize) -> Result<Self, BoxError> {
        let mut buf = BytesMut::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(Into::into)?;
            match frame.into_data() {
                Ok(mut data) => {
                    buf.extend_from_slice(&data.copy_to_bytes(data.remaining()));
                    if buf.len() > cap {
                        return Ok(Self {
                            inner: Inner::Tail {
                                prefix: Some(buf.freeze()),
                                rest: body,
                            },
                        });
                    }
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = Some(t);
                    }
                }
            }
        }
        Ok(Self {
            inner: Inner::Buffered {
                data: Some(buf.freeze()),
                trailers,
            },
        })
    }
}

impl<B> ReplayBody<B> {
    /// The whole body, if it was read whole.
    pub fn buffered(&self) -> Option<Bytes> {
        match &self.inner {
            Inner::Buffered { data, .. } => Some(data.clone().unwrap_or_default()),
            Inner::Tail { .. } => None,
        }
    }

    /// Whether the body was read whole and can be sent again.
    pub fn is_replayable(&self) -> bool {
        matches!(self.inner, Inner::Buffered { .. })
    }
}

impl<B> InMemoryBody for ReplayBody<B> {
    fn try_clone_body(&self) -> Option<Self> {
        match &self.inner {
            Inner::Buffered { data, trailers } => Some(Self {
                inner: Inner::Buffered {
                    data: data.clone(),
                    trailers: trailers.clone(),
                },
            }),
            Inner::Tail { .. } => None,
        }
    }

    fn body_bytes(&self) -> Option<Bytes> {
        self.buffered()
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().inner {
            Inner::Buffered { data, trailers } => {
                if let Some(d) = data.take().filter(|d| !d.is_empty()) {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            Inner::Tail { prefix, rest } => {
                if let Some(p) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(p))));
                }
                match Pin::new(rest).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(
                        frame.map_data(|mut d| d.copy_to_bytes(d.remaining()))
                    ))),
                    Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                    Poll::Ready(None) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Buffered { data, trailers } => {
                data.as_ref().is_none_or(Bytes::is_empty) && trailers.is_none()
            }
            Inner::Tail { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Buffered { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Inner::Tail { prefix, rest } => {
                let p = prefix.as_ref().map_or(0, |d| d.len() as u64);
                let r = rest.size_hint();
                let mut h = SizeHint::new();
                h.set_lower(r.lower().saturating_add(p));
                if let Some(u) = r.upper() {
                    h.set_upper(u.saturating_add(p));
                }
                h
            }
        }
    }
}

/// Buffers request bodies (up to a cap) into [`ReplayBody`] so the retry layer inside can replay
/// them and the budget can estimate them. See the [module docs](super).
#[derive(Clone, Copy, Debug)]
#[must_use]
pub struct ReplayBodyLayer {
    cap: usize,
}

impl ReplayBodyLayer {
    /// Buffers bodies of up to `cap` bytes.
    pub const fn new(cap: usize) -> Self {
        Self { cap }
    }
}

impl Default for ReplayBodyLayer {
    /// A 1 MiB cap: far above a typical Messages request, far below anything that hurts.
    fn default() -> Self {
        Self::new(1 << 20)
    }
}

impl<S> Layer<S> for ReplayBodyLayer {
    type Service = ReplayBodies<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ReplayBodies {
            inner,
            cap: self.cap,
        }
    }
}

/// The service [`ReplayBodyLayer`] makes.
#[derive(Clone, Debug)]
pub struct ReplayBodies<S> {
    inner: S,
    cap: usize,
}

impl<S> ReplayBodies<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, consuming this one.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<B>> for ReplayBodies<S>
where
    S: Service<Request<ReplayBody<B>>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The inner service is made ready in the future, once the body is read: nothing of it is
        // held while a slow upload buffers.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        let cap = self.cap;
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = ReplayBody::buffer(body, cap).await?;
            let req = Request::from_parts(parts, body);
            inner.oneshot(req).await.map_err(Into::into)
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use http_body_util::Full;

    /// A streaming body of `n` chunks of `size` bytes: not cloneable.
    pub(crate) struct Chunks {
        pub(crate) left: usize,
        pub(crate) size: usize,
    }

    impl Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            self.left -= 1;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; self.size])))))
        }
    }

    #[tokio::test]
    async fn buffers_and_replays_small_bodies() {
        let b = ReplayBody::buffer(Full::new(Bytes::from_static(b"hello")), 16)
            .await
            .unwrap();
        assert!(b.is_replayable());
        let copy = b.try_clone_body().unwrap();
        assert_eq!(copy.collect().await.unwrap().to_bytes(), "hello");
        assert_eq!(b.collect().await.unwrap().to_bytes(), "hello");

        let b = ReplayBody::buffer(Chunks { left: 4, size: 4 }, 16)
            .await
            .unwrap();
        assert!(b.is_replayable());
        assert_eq!(
            b.try_clone_body()
                .unwrap()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .len(),
            16
        );
    }

    #[tokio::test]
    async fn bodies_over_the_cap_are_sent_once_whole() {
        let b = ReplayBody::buffer(Chunks { left: 10, size: 4 }, 16)
            .await
            .unwrap();
        assert!(!b.is_replayable());
        assert!(b.try_clone_body().is_none());
        // Nothing is lost: the prefix read so far, then the rest.
        assert_eq!(b.collect().await.unwrap().to_bytes().len(), 40);
    }
}
