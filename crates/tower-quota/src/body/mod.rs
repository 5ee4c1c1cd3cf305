//! Request bodies the layers can read and send again, and the response body of the stack.
//!
//! # Why one trait
//!
//! Two layers need something of a request body beyond streaming it once: the retry loop sends the
//! request again, body included, and the token budget reads the body to estimate its cost. Both
//! need the same thing: a body that is already in memory. [`InMemoryBody`] says how to copy one
//! and how to read its bytes without consuming it; it is implemented for the cheap in-memory
//! bodies (`Full<Bytes>`, `Bytes`, `String`, `Vec<u8>`, `&'static str`, `&'static [u8]`, `Empty`,
//! `()`), and the inner service keeps its own body type.
//!
//! Any other body (a stream, hyper's `Incoming`, a `BoxBody`) must be kept as it is read:
//! [`ReplayBodyLayer`], stacked outside the layers that need it, reads it into a buffer of at most
//! `cap` bytes once, before the first attempt, and hands them a [`ReplayBody`]. A body larger than
//! the cap is sent once, unbuffered (its read prefix, then the rest); the retry layer then reports
//! that it could not retry it, and the budget estimates it as it would a body it cannot read.
//! Keeping the buffering apart leaves the cheap path free of buffering and of a body type change.
//!
//! A request body that is not in memory fails to compile with a message that names
//! [`ReplayBodyLayer`]. Through a method call (`svc.oneshot(req)`) rustc only says "its trait
//! bounds were not satisfied"; naming the request type (`ServiceExt::<Request<B>>::oneshot(svc,
//! req)`) shows the message.
//!
//! # The stacked response body
//!
//! The budget wraps the response body to read the real usage as it passes, and the concurrency
//! limit wraps it to hold the slot until it ends. [`QuotaBody`] names the result of the full stack,
//! so users need not spell out the wrappers.

mod replay;

#[cfg(test)]
pub(crate) use replay::tests as replay_tests;

pub use replay::{ReplayBodies, ReplayBody, ReplayBodyLayer};

use bytes::{Buf, Bytes};
use http::Request;
use http_body::Body;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// The response body of the four layers in the recommended order over a client whose response
/// body is `B`.
pub type QuotaBody<B> = crate::budget::BudgetBody<crate::concurrency::ConcurrencyBody<B>>;

/// The response body of a [`Preset`](crate::Preset)'s stack
/// ([`quota_stack`](crate::ServiceBuilderExt::quota_stack)): the four layers' body over tower-http's
/// idle-timeout body. It is `!Unpin` (the timer lives inline): pin it (`std::pin::pin!`) to call
/// `BodyExt::frame`; `collect` takes it by value.
pub type PresetBody<B> = QuotaBody<tower_http::timeout::TimeoutBody<B>>;

/// A request body held in memory: it can be copied for another attempt and read for an estimate
/// without being consumed.
#[diagnostic::on_unimplemented(
    message = "the request body `{Self}` is not in memory, so it cannot be replayed or estimated",
    label = "not an in-memory body",
    note = "use an in-memory body (`Full<Bytes>`, `Bytes`, `String`), or stack \
            `tower_quota::body::ReplayBodyLayer` outside the stack: it reads any body into a \
            `ReplayBody` once"
)]
pub trait InMemoryBody: Sized {
    /// A fresh copy of the body, or `None` if this body cannot be sent again.
    fn try_clone_body(&self) -> Option<Self>;

    /// The whole body, if it is in memory.
    fn body_bytes(&self) -> Option<Bytes>;
}

macro_rules! in_memory {
    ($($t:ty => |$s:ident| $bytes:expr),* $(,)?) => {$(
        impl InMemoryBody for $t {
            fn try_clone_body(&self) -> Option<Self> {
                Some(self.clone())
            }

            fn body_bytes(&self) -> Option<Bytes> {
                let $s = self;
                $bytes
            }
        }
    )*};
}

in_memory! {
    () => |_s| None,
    String => |s| Some(Bytes::copy_from_slice(s.as_bytes())),
    Bytes => |s| Some(s.clone()),
    Vec<u8> => |s| Some(Bytes::copy_from_slice(s)),
    &'static str => |s| Some(Bytes::from_static(s.as_bytes())),
    &'static [u8] => |s| Some(Bytes::from_static(s)),
}

impl<D> InMemoryBody for http_body_util::Full<D>
where
    D: Buf + Clone,
{
    fn try_clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }

    fn body_bytes(&self) -> Option<Bytes> {
        // `Full` yields its one frame at once: poll a copy with a no-op waker.
        let mut copy = self.clone();
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(&mut copy).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => frame
                .into_data()
                .ok()
                .map(|mut d| d.copy_to_bytes(d.remaining())),
            Poll::Ready(None) => Some(Bytes::new()),
            _ => None,
        }
    }
}

impl<D> InMemoryBody for http_body_util::Empty<D> {
    fn try_clone_body(&self) -> Option<Self> {
        Some(http_body_util::Empty::new())
    }

    fn body_bytes(&self) -> Option<Bytes> {
        Some(Bytes::new())
    }
}

/// A copy of `req` for another attempt: same method, URI, version, headers and extensions, a copied
/// body. `None` if the body cannot be copied.
pub(crate) fn try_clone_request<B: InMemoryBody>(req: &Request<B>) -> Option<Request<B>> {
    let body = req.body().try_clone_body()?;
    let mut copy = Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    *copy.extensions_mut() = req.extensions().clone();
    Some(copy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[test]
    fn bytes_without_consuming() {
        let full = Full::new(Bytes::from_static(b"abc"));
        assert_eq!(full.body_bytes().unwrap(), "abc");
        assert_eq!(full.body_bytes().unwrap(), "abc");
        assert_eq!("x".to_owned().body_bytes().unwrap(), "x");
        assert_eq!((&b"raw"[..]).body_bytes().unwrap(), "raw");
        assert_eq!(().body_bytes(), None);
    }

    #[tokio::test]
    async fn copies_are_whole() {
        let full = Full::new(Bytes::from_static(b"abc"));
        let copy = full.try_clone_body().unwrap();
        assert_eq!(copy.collect().await.unwrap().to_bytes(), "abc");
        assert_eq!(full.collect().await.unwrap().to_bytes(), "abc");
    }
}
