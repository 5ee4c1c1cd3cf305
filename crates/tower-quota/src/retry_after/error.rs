//! Errors of [`RetryAfter`](super::RetryAfter).

use crate::partition::PartitionKey;
use std::fmt;
use std::time::Duration;
use tokio::time::Instant;

/// The server asked the partition to wait longer than the configured cap, so the request fails fast
/// instead of sleeping. `retry_at` says when the server will take requests again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaitTooLong {
    pub(crate) retry_at: Instant,
    pub(crate) wait: Duration,
    pub(crate) cap: Duration,
    pub(crate) partition: PartitionKey,
}

impl WaitTooLong {
    /// When the server will take requests from this partition again.
    pub fn retry_at(&self) -> Instant {
        self.retry_at
    }

    /// How long the wait would have been.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// The cap it exceeds.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// The partition (a key fingerprint, never the key).
    pub fn partition(&self) -> PartitionKey {
        self.partition
    }
}

impl fmt::Display for WaitTooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the server asked partition {} to wait {:.3} s, more than the cap of {:.3} s",
            self.partition,
            self.wait.as_secs_f64(),
            self.cap.as_secs_f64()
        )
    }
}

impl std::error::Error for WaitTooLong {}
