//! Whether a request has really left for the wire, for the budget's refunds.
//!
//! The budget refunds a reservation whose request was never sent. From where it sits it only sees
//! the request handed to its inner service; but the layers inside it (the concurrency limit, the
//! Retry-After gate) may still hold the request in a queue, and if the caller gives up there, the
//! server never saw it. So the budget puts a [`WireMark`] in the request's extensions; each layer
//! of this crate that holds requests marks it *pending* when it takes the request and *sent* when
//! it hands it on. When the budget's future is dropped, a pending mark means the request is still
//! inside one of our queues: refund. A mark nobody touched means an inner service we do not know
//! took it: assume it was sent.

use crate::context::Stamp;
use http::Extensions;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

const UNTOUCHED: u8 = 0;
const PENDING: u8 = 1;
const SENT: u8 = 2;

/// Where a mark's state lives: in a value the marking layer already allocated (the budget's
/// reservation ledger), so the mark costs no allocation of its own.
pub(crate) trait WireCell: Send + Sync + 'static {
    /// The mark's state.
    fn wire(&self) -> &AtomicU8;

    /// The request became held (`1`: taken back into a queue of this crate's layers after it had
    /// been handed on) or left for good as far as this mark knows (`-1`: handed on, or answered).
    /// A fresh mark counts as held: granted, not yet handed to anyone.
    fn held(&self, _delta: isize) {}

    /// A layer handed the request on (it leaves the count, and may be on the wire now).
    fn left(&self) {
        self.held(-1);
    }
}

impl WireCell for AtomicU8 {
    fn wire(&self) -> &AtomicU8 {
        self
    }
}

/// A fresh cell for a mark (untouched).
pub(crate) const fn cell() -> AtomicU8 {
    AtomicU8::new(UNTOUCHED)
}

/// Whether the request whose mark lives in `cell` may have reached the server.
pub(crate) fn maybe_sent(cell: &dyn WireCell) -> bool {
    cell.wire().load(Ordering::SeqCst) != PENDING
}

#[derive(Clone)]
pub(crate) struct WireMark(Arc<dyn WireCell>);

impl WireMark {
    /// A mark whose state lives in `cell`.
    pub(crate) fn new(cell: Arc<dyn WireCell>) -> Self {
        Self(cell)
    }
}

/// Puts `mark` on a request (replacing any other).
pub(crate) fn mark(ext: &mut Extensions, mark: WireMark) {
    ext.get_or_insert_default::<Stamp>().wire = Some(mark);
}

fn set(ext: &Extensions, state: u8) {
    if let Some(m) = ext.get::<Stamp>().and_then(|s| s.wire.as_ref()) {
        let before = m.0.wire().swap(state, Ordering::SeqCst);
        match (before, state) {
            (SENT, PENDING) => m.0.held(1),
            (UNTOUCHED | PENDING, SENT) => m.0.left(),
            _ => {}
        }
    }
}

/// Whether the request whose mark lives in `cell` still counts as held: not handed on yet, or
/// taken into a queue again.
pub(crate) fn is_held(cell: &dyn WireCell) -> bool {
    cell.wire().load(Ordering::SeqCst) != SENT
}

/// The request whose mark lives in `cell` was answered: it is no longer held (if a service that
/// does not mark requests sent it, or a layer answered it without sending, it leaves the count
/// now).
pub(crate) fn answered(cell: &dyn WireCell) {
    if cell.wire().swap(SENT, Ordering::SeqCst) != SENT {
        cell.held(-1);
    }
}

/// A layer took the request and may hold it before sending.
pub(crate) fn pending(ext: &Extensions) {
    set(ext, PENDING);
}

/// A layer hands the request on.
pub(crate) fn sent(ext: &Extensions) {
    set(ext, SENT);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states() {
        let mut ext = Extensions::new();
        let c = Arc::new(cell());
        mark(&mut ext, WireMark::new(c.clone()));
        assert!(
            maybe_sent(&*c),
            "untouched: an unknown inner service took it"
        );
        pending(&ext);
        assert!(!maybe_sent(&*c));
        sent(&ext);
        assert!(maybe_sent(&*c));
    }

    /// A cell that counts how many requests are held, as the budget's ledger does.
    struct Counting(AtomicU8, std::sync::atomic::AtomicIsize);

    impl WireCell for Counting {
        fn wire(&self) -> &AtomicU8 {
            &self.0
        }

        fn held(&self, delta: isize) {
            self.1.fetch_add(delta, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_request_is_held_until_handed_on_and_again_in_each_queue() {
        let mut ext = Extensions::new();
        // A fresh mark counts as held (the ledger counts it when it is made).
        let c = Arc::new(Counting(cell(), std::sync::atomic::AtomicIsize::new(1)));
        mark(&mut ext, WireMark::new(c.clone()));
        let held = || c.1.load(Ordering::SeqCst);
        pending(&ext);
        pending(&ext);
        assert_eq!(held(), 1, "taken into a queue: the same stay");
        sent(&ext);
        assert_eq!(held(), 0);
        sent(&ext);
        assert_eq!(held(), 0, "handed on twice, left once");
        pending(&ext);
        assert_eq!(held(), 1, "the next layer's queue");
        assert!(is_held(&*c));
        answered(&*c);
        assert_eq!(
            held(),
            0,
            "answered without being handed on (a layer's refusal)"
        );
        answered(&*c);
        assert_eq!(held(), 0);
        // A service that marks nothing: held until answered.
        let d = Arc::new(Counting(cell(), std::sync::atomic::AtomicIsize::new(1)));
        answered(&*d);
        assert_eq!(d.1.load(Ordering::SeqCst), 0);
    }
}
