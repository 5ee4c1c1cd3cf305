//! "Come back at T": the one value every layer uses to say when a partition may send again.
//!
//! # Why a module of its own
//!
//! The Retry-After gate learns when a partition may send again and the retry loop must wait at
//! least that long; the token budget and the callers (an axum handler answering its own client with
//! `429` and `Retry-After`) want the same instant. The gate puts a [`RetryAt`] in the extensions
//! of the response that closed it; the retry layer reads it. Neither layer owns the type, so
//! neither has to know the other.
//!
//! # The server's word, and the gate's guess
//!
//! A [`RetryAt`] says where its instant came from ([`RetrySource`]). When the server named the
//! instant (a `Retry-After`, `retry-after-ms` or an exhausted bucket's reset), it replaces the
//! retry's backoff for that attempt and counts as a *hinted* retry. When the server said nothing
//! usable and the gate only *inferred* a pause after a bare 429, the pause is pacing, not the
//! server's word: the retry waits the longer of its own backoff and the gate, and counts the
//! attempt as a backoff retry, so a server that never says when gets exactly the backoff schedule.

use crate::partition::PartitionKey;
use crate::signals::HintSource;
use tokio::time::Instant;

/// The instant a partition may send again, put in the extensions of a response that closed its
/// partition's gate (by [`RetryAfterLayer`](crate::retry_after::RetryAfterLayer)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryAt {
    /// When the partition's gate opens: the later of the hint and any gate already closed.
    pub at: Instant,
    /// Where the instant came from.
    pub source: RetrySource,
    /// The partition the gate belongs to.
    pub partition: PartitionKey,
}

impl RetryAt {
    /// Whether the server named the instant (rather than the gate inferring it).
    pub fn is_from_server(&self) -> bool {
        matches!(self.source, RetrySource::Server(_))
    }
}

/// Where a [`RetryAt`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetrySource {
    /// A header of the response said so.
    Server(HintSource),
    /// No header said anything usable: the gate's own estimate after a 429 without a hint (see
    /// [`RetryAfterLayer::inferred_cooldown`](crate::retry_after::RetryAfterLayer::inferred_cooldown)).
    Inferred,
}
