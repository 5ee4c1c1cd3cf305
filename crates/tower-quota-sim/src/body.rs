//! The simulator's response body: a whole message, or server-sent events paced on tokio's clock.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// The error a simulated body never returns today; kept so the type can say "a body may fail".
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Counts the server's requests in flight: decremented when dropped.
pub(crate) struct InFlight(pub(crate) Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

enum Inner {
    Full(Option<Bytes>),
    Stream {
        /// Events, each with the delay before it.
        events: VecDeque<(Duration, Bytes)>,
        sleep: Pin<Box<Sleep>>,
        armed: bool,
    },
}

/// A simulated response body. A streaming body holds the server's in-flight slot until it ends or
/// is dropped, as a real server's connection would.
pub struct SimBody {
    inner: Inner,
    in_flight: Option<InFlight>,
}

impl fmt::Debug for SimBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.inner {
            Inner::Full(b) => format!("Full({} bytes)", b.as_ref().map_or(0, Bytes::len)),
            Inner::Stream { events, .. } => format!("Stream({} events left)", events.len()),
        };
        f.debug_struct("SimBody").field("inner", &kind).finish()
    }
}

impl SimBody {
    /// A whole body.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self {
            inner: Inner::Full(Some(bytes.into())),
            in_flight: None,
        }
    }

    /// A body of `events`, each sent after its delay.
    pub(crate) fn stream(events: VecDeque<(Duration, Bytes)>, in_flight: Option<InFlight>) -> Self {
        Self {
            inner: Inner::Stream {
                events,
                sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
                armed: false,
            },
            in_flight,
        }
    }

    pub(crate) fn with_in_flight(mut self, in_flight: Option<InFlight>) -> Self {
        self.in_flight = in_flight;
        self
    }
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let next = match &mut this.inner {
            Inner::Full(b) => b.take(),
            Inner::Stream {
                events,
                sleep,
                armed,
            } => match events.front() {
                None => None,
                Some(&(delay, _)) => {
                    if !*armed {
                        sleep.as_mut().reset(Instant::now() + delay);
                        *armed = true;
                    }
                    ready!(sleep.as_mut().poll(cx));
                    *armed = false;
                    events.pop_front().map(|(_, b)| b)
                }
            },
        };
        if next.is_none() {
            this.in_flight = None;
        }
        Poll::Ready(next.map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(b) => b.is_none(),
            Inner::Stream { events, .. } => events.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            // Streams go out chunked, as a real SSE response does.
            Inner::Stream { .. } => SizeHint::default(),
        }
    }
}
