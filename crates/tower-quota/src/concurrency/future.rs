//! The response future of [`ConcurrencyLimit`](super::ConcurrencyLimit): the crate's holding
//! future with the limit's admission.

use super::body::ConcurrencyBody;
use super::layer::Shared;
use super::slots::Slots;
use crate::BoxError;
use crate::admit::{Admit, admitted_future};
use crate::classify::Outcome;
use http::{Request, Response};
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::time::Instant;
use tower::Service;

admitted_future!(
    /// Waits for a slot (FIFO), sends the request, and hands the slot to the response body.
    Slot,
    ConcurrencyBody
);

/// One request's slots: waited for, held while it is sent, handed to its response body.
pub(crate) struct Slot {
    shared: Arc<Shared>,
    slots: Option<Slots>,
    // Every slot held.
    acquired: bool,
}

impl Slot {
    pub(crate) fn new(shared: Arc<Shared>, slots: Slots) -> Self {
        Self {
            shared,
            slots: Some(slots),
            acquired: false,
        }
    }
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("acquired", &self.acquired)
            .finish()
    }
}

impl<B> Admit<B> for Slot {
    type Body<R> = ConcurrencyBody<R>;

    fn poll_admit(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if !self.acquired {
            if let Some(slots) = self.slots.as_mut() {
                ready!(slots.poll_acquire(cx)).map_err(|e| -> BoxError { Box::new(e) })?;
            }
            self.acquired = true;
        }
        Poll::Ready(Ok(()))
    }

    fn send<S: Service<Request<B>>>(&mut self, svc: &mut S, req: Request<B>) -> S::Future {
        crate::wire::sent(req.extensions());
        // The send time is kept with the slots (it goes on to the body's end).
        if let Some(slots) = self.slots.as_mut().filter(|s| s.own().is_some()) {
            slots.sent(Instant::now());
        }
        svc.call(req)
    }

    fn answered<R>(
        &mut self,
        result: Result<Response<R>, BoxError>,
    ) -> Result<Response<ConcurrencyBody<R>>, BoxError> {
        let slots = self.slots.take().expect("slots handed over once");
        if let (Some(own), Some(sent_at)) = (slots.own(), slots.sent_at()) {
            let now = Instant::now();
            let rtt = now.saturating_duration_since(sent_at);
            own.round_trip(rtt);
            if own.adapts() {
                // An adaptive limit learns from every attempt's outcome and round trip.
                let ctx = &self.shared.ctx;
                let outcome = match &result {
                    Ok(res) => ctx.classify(res).outcome,
                    Err(e) => ctx.classify_error(&**e).outcome,
                };
                let saturated = slots.saturated() && outcome == Outcome::Success;
                own.observe_at(outcome, saturated, now);
            }
        }
        let permit = slots.into_permit();
        match result {
            Ok(res) => Ok(res.map(|b| ConcurrencyBody::new(b, permit))),
            Err(e) => Err(e),
        }
    }
}
