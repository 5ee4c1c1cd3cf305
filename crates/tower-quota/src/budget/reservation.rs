use super::Cost;
use super::shared::Queue;
use super::store::{BudgetStore, Charged, Delta};
use crate::partition::PartitionKey;
use crate::wire::{self, WireCell, WireMark};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use std::sync::{Arc, Mutex};
use std::task::{Context, Waker};

/// Runs a store operation from a place that cannot wait (a `Drop`, a body's last frame): polls it
/// once, which finishes the in-memory store's operations at once, and spawns the rest on the
/// current tokio runtime.
pub(crate) fn drive(fut: impl Future<Output = ()> + Send + 'static) {
    let mut fut = Box::pin(fut);
    let mut cx = Context::from_waker(Waker::noop());
    if fut.as_mut().poll(&mut cx).is_pending() {
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(fut);
            }
            Err(_) => tracing::warn!("budget: no runtime to finish a store update; it is lost"),
        }
    }
}

struct Ledger {
    store: Arc<dyn BudgetStore>,
    partition: PartitionKey,
    estimate: Cost,
    charged: Charged,
    settled: Mutex<Option<Cost>>,
    /// Whether the request has left our layers (see [`WireMark`]).
    wire: AtomicU8,
    /// Its partition's queue: the scopes it drew on, the count of admitted requests still held in
    /// the layers inside, the metrics.
    own: Arc<Queue>,
    /// When it was admitted.
    admitted: tokio::time::Instant,
    /// The request's GenAI span: the usage is recorded on it when it settles.
    span: tracing::Span,
    /// When a layer inside last handed it on, in nanoseconds after `admitted` (0: never).
    sent_after: AtomicU64,
}

impl WireCell for Ledger {
    fn wire(&self) -> &AtomicU8 {
        &self.wire
    }

    fn held(&self, delta: isize) {
        self.own.held.fetch_add(delta, Ordering::SeqCst);
    }

    fn left(&self) {
        let after = tokio::time::Instant::now().saturating_duration_since(self.admitted);
        self.sent_after.store(
            u64::try_from(after.as_nanos()).unwrap_or(u64::MAX).max(1),
            Ordering::SeqCst,
        );
        self.held(-1);
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        // Given up while held (never handed on, or in a queue): it leaves the count.
        if wire::is_held(self) {
            self.own.held.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// A request's reservation, in the extensions of its response. Settle it with the real usage
/// ([`ReservationHandle::report_usage`]) when your code reads the usage itself; the layer settles
/// it on its own when it sees the usage in the response body. It settles once: later calls do
/// nothing and return `false`. Dropped unsettled, it keeps its estimate.
#[derive(Clone)]
pub struct ReservationHandle(Arc<Ledger>);

impl ReservationHandle {
    pub(crate) fn new(
        store: Arc<dyn BudgetStore>,
        partition: PartitionKey,
        estimate: Cost,
        charged: Charged,
        own: Arc<Queue>,
        span: tracing::Span,
    ) -> Self {
        // Granted and not handed on yet: held until the layers inside hand it on.
        own.held.fetch_add(1, Ordering::SeqCst);
        Self(Arc::new(Ledger {
            store,
            partition,
            estimate,
            charged,
            settled: Mutex::new(None),
            wire: wire::cell(),
            own,
            admitted: tokio::time::Instant::now(),
            sent_after: AtomicU64::new(0),
            span,
        }))
    }

    /// The mark the layers inside flip as they hold and hand on the request.
    pub(crate) fn wire_mark(&self) -> WireMark {
        WireMark::new(self.0.clone())
    }

    /// When the request left the layers inside for the wire, as far as they say (when it was
    /// admitted, if none of them marks requests).
    pub(crate) fn sent_at(&self) -> tokio::time::Instant {
        let after = self.0.sent_after.load(Ordering::SeqCst);
        self.0.admitted + std::time::Duration::from_nanos(after)
    }

    /// What was reserved.
    pub fn estimate(&self) -> Cost {
        self.0.estimate
    }

    /// What it was settled at, once settled.
    pub fn settled(&self) -> Option<Cost> {
        *self.0.settled.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The partition it was taken from.
    pub fn partition(&self) -> PartitionKey {
        self.0.partition
    }

    /// Settles with the real usage: refunds or charges the difference from the estimate.
    pub fn report_usage(&self, input_tokens: u64, output_tokens: u64) -> bool {
        self.settle(Cost {
            requests: self.0.estimate.requests,
            input_tokens,
            output_tokens,
        })
    }

    /// Gives everything back (the request was never processed).
    pub fn refund(&self) -> bool {
        self.settle(Cost::default())
    }

    /// Settles at `actual`.
    pub fn settle(&self, actual: Cost) -> bool {
        {
            let mut s = self.0.settled.lock().unwrap_or_else(|e| e.into_inner());
            if s.is_some() {
                return false;
            }
            *s = Some(actual);
        }
        self.0.own.metrics.settled(actual);
        if actual.requests > 0 {
            // Refunds leave the usage unset: the server did no work.
            let span = &self.0.span;
            span.record("gen_ai.usage.input_tokens", actual.input_tokens);
            span.record("gen_ai.usage.output_tokens", actual.output_tokens);
        }
        let delta = Delta {
            only: self.0.charged,
            ..Delta::between(self.0.estimate, actual)
        };
        if !delta.is_zero() {
            let ledger = self.0.clone();
            drive(async move {
                if let Err(e) = ledger.store.adjust(&ledger.own.scopes, delta).await {
                    tracing::warn!(error = %e.0, "budget: settling a reservation failed");
                }
            });
        }
        tracing::trace!(partition = %self.0.partition, ?delta, "budget: settled");
        true
    }
}

impl fmt::Debug for ReservationHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReservationHandle")
            .field("partition", &self.0.partition)
            .field("estimate", &self.0.estimate)
            .field("settled", &self.settled())
            .finish()
    }
}

/// Refunds a reservation whose request never left, when dropped before [`NotSent::answered`]:
/// not handed to the inner service yet, or still held in a queue of this crate's layers inside
/// (see [`WireMark`]).
pub(crate) struct NotSent {
    handle: Option<ReservationHandle>,
    handed_on: bool,
}

impl NotSent {
    pub(crate) fn new(handle: ReservationHandle) -> Self {
        Self {
            handle: Some(handle),
            handed_on: false,
        }
    }

    /// The mark the layers inside flip as they hold and hand on the request.
    pub(crate) fn wire_mark(&self) -> WireMark {
        self.handle.as_ref().expect("not answered yet").wire_mark()
    }

    /// The request was handed to the inner service.
    pub(crate) fn handed_on(&mut self) {
        self.handed_on = true;
    }

    /// The inner service answered: from here the response decides.
    pub(crate) fn answered(mut self) -> ReservationHandle {
        let handle = self.handle.take().expect("answered once");
        wire::answered(&*handle.0);
        handle
    }
}

impl Drop for NotSent {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            if !self.handed_on || !wire::maybe_sent(&*h.0) {
                h.refund();
            }
        }
    }
}
