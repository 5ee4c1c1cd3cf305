//! Why [`TokenBudget`](super::TokenBudget) refused a request without sending it.

use super::Bucket;
use crate::partition::PartitionKey;
use std::fmt;
use std::time::Duration;
use tokio::time::Instant;

/// The budget refused a request without sending it: it could never fit
/// ([`is_too_large`](Self::is_too_large)), or it would wait past the cap
/// ([`is_wait_too_long`](Self::is_wait_too_long), with [`retry_at`](Self::retry_at)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BudgetError {
    kind: Kind,
    partition: PartitionKey,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    TooLarge {
        bucket: Bucket,
        needed: u64,
        capacity: u64,
    },
    WaitTooLong {
        retry_at: Instant,
        wait: Duration,
        cap: Duration,
    },
}

impl BudgetError {
    pub(crate) fn too_large(
        partition: PartitionKey,
        bucket: Bucket,
        needed: u64,
        capacity: u64,
    ) -> Self {
        Self {
            kind: Kind::TooLarge {
                bucket,
                needed,
                capacity,
            },
            partition,
        }
    }

    pub(crate) fn wait_too_long(partition: PartitionKey, wait: Duration, cap: Duration) -> Self {
        let now = Instant::now();
        let retry_at = now.checked_add(wait).unwrap_or(now + cap);
        Self {
            kind: Kind::WaitTooLong {
                retry_at,
                wait,
                cap,
            },
            partition,
        }
    }

    /// Whether the request costs more than a bucket holds when full: it could never be admitted.
    pub fn is_too_large(&self) -> bool {
        matches!(self.kind, Kind::TooLarge { .. })
    }

    /// Whether the wait for the budget would have exceeded the layer's cap.
    pub fn is_wait_too_long(&self) -> bool {
        matches!(self.kind, Kind::WaitTooLong { .. })
    }

    /// The partition that refused (a key fingerprint, or [`PartitionKey::GLOBAL`]).
    pub fn partition(&self) -> PartitionKey {
        self.partition
    }

    /// The bucket too small for the request, when it is too large.
    pub fn bucket(&self) -> Option<Bucket> {
        match self.kind {
            Kind::TooLarge { bucket, .. } => Some(bucket),
            Kind::WaitTooLong { .. } => None,
        }
    }

    /// What the request needs from that bucket, and what the bucket holds when full.
    pub fn needed_and_capacity(&self) -> Option<(u64, u64)> {
        match self.kind {
            Kind::TooLarge {
                needed, capacity, ..
            } => Some((needed, capacity)),
            Kind::WaitTooLong { .. } => None,
        }
    }

    /// When the budget expected to admit the request, when the wait was too long.
    pub fn retry_at(&self) -> Option<Instant> {
        match self.kind {
            Kind::WaitTooLong { retry_at, .. } => Some(retry_at),
            Kind::TooLarge { .. } => None,
        }
    }
}

impl fmt::Display for BudgetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let partition = self.partition;
        match self.kind {
            Kind::TooLarge {
                bucket,
                needed,
                capacity,
            } => write!(
                f,
                "request needs {needed} {bucket} but the {bucket} bucket of partition {partition} \
                 holds at most {capacity} (over by {})",
                needed.saturating_sub(capacity)
            ),
            Kind::WaitTooLong { wait, cap, .. } => write!(
                f,
                "partition {partition} could admit the request in {:.3} s, more than the cap of \
                 {:.3} s",
                wait.as_secs_f64(),
                cap.as_secs_f64()
            ),
        }
    }
}

impl std::error::Error for BudgetError {}
