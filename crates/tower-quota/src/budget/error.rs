use super::Bucket;
use crate::partition::PartitionKey;
use std::fmt;
use std::time::Duration;
use tokio::time::Instant;

/// The budget refused a request without sending it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BudgetError {
    /// The request costs more than a bucket holds when full: it could never be admitted.
    TooLarge {
        /// The partition (a key fingerprint, or the global cap).
        partition: PartitionKey,
        /// The bucket.
        bucket: Bucket,
        /// What the request needs from it.
        needed: u64,
        /// What the bucket holds when full.
        capacity: u64,
    },
    /// The wait for the budget would exceed the layer's cap on a wait.
    WaitTooLong {
        /// The partition that binds.
        partition: PartitionKey,
        /// When the budget expects to admit the request.
        retry_at: Instant,
        /// The cap.
        cap: Duration,
    },
}

impl BudgetError {
    /// When the request could be admitted, for [`BudgetError::WaitTooLong`].
    pub fn retry_at(&self) -> Option<Instant> {
        match self {
            BudgetError::WaitTooLong { retry_at, .. } => Some(*retry_at),
            BudgetError::TooLarge { .. } => None,
        }
    }
}

impl fmt::Display for BudgetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BudgetError::TooLarge {
                partition,
                bucket,
                needed,
                capacity,
            } => write!(
                f,
                "request needs {needed} {bucket} but the {bucket} bucket of partition {partition} \
                 holds at most {capacity} (over by {})",
                needed - capacity
            ),
            BudgetError::WaitTooLong {
                partition,
                retry_at,
                cap,
            } => write!(
                f,
                "partition {partition} could admit the request in {:.3} s, more than the cap of {:.3} s",
                retry_at
                    .saturating_duration_since(Instant::now())
                    .as_secs_f64(),
                cap.as_secs_f64()
            ),
        }
    }
}

impl std::error::Error for BudgetError {}
