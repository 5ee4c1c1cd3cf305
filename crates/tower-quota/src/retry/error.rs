//! Why [`BackoffRetry`](super::BackoffRetry) stopped.

use crate::BoxError;
use http::StatusCode;
use std::fmt;
use std::time::Duration;
use tokio::time::Instant;

/// Why the retry loop stopped while the last result was still a retryable failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum GiveUp {
    /// Every allowed retry of this kind was made (`max_retries` for backoff retries,
    /// `max_hinted_retries` for those that waited for the server's hint).
    AttemptsExhausted,
    /// The retry budget shared by the layer's services had no retry left.
    BudgetEmpty,
    /// The request body cannot be sent again (see [`InMemoryBody`](crate::body::InMemoryBody)).
    NotReplayable,
    /// The server asked to wait past the cap on a hinted wait.
    HintTooLong {
        /// When the server will take the request.
        retry_at: Instant,
    },
    /// The next attempt would start after the call's deadline.
    DeadlineExceeded {
        /// When the next attempt would have started.
        retry_at: Instant,
    },
}

impl GiveUp {
    /// A short name for the reason (the `reason` label of the retry's give-up metric):
    /// `attempts`, `budget`, `not_replayable`, `hint_too_long` or `deadline`.
    pub fn label(&self) -> &'static str {
        match self {
            GiveUp::AttemptsExhausted => "attempts",
            GiveUp::BudgetEmpty => "budget",
            GiveUp::NotReplayable => "not_replayable",
            GiveUp::HintTooLong { .. } => "hint_too_long",
            GiveUp::DeadlineExceeded { .. } => "deadline",
        }
    }

    /// The instant a retry would have been possible, for the reasons that have one.
    pub fn retry_at(self) -> Option<Instant> {
        match self {
            GiveUp::HintTooLong { retry_at } | GiveUp::DeadlineExceeded { retry_at } => {
                Some(retry_at)
            }
            _ => None,
        }
    }
}

impl fmt::Display for GiveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GiveUp::AttemptsExhausted => f.write_str("every allowed retry was used"),
            GiveUp::BudgetEmpty => f.write_str("the retry budget is empty"),
            GiveUp::NotReplayable => f.write_str(
                "the request body cannot be replayed (not cloneable, or larger than the replay buffer)",
            ),
            GiveUp::HintTooLong { .. } => {
                f.write_str("the server asked to wait longer than the cap on a hinted wait")
            }
            GiveUp::DeadlineExceeded { .. } => {
                f.write_str("the next attempt would start after the deadline")
            }
        }
    }
}

/// The retry loop gave up: why, after how many attempts, and the last failure (a transport error as
/// `source()`, or the status of a response that was dropped to report a hint or deadline).
#[derive(Debug)]
pub struct RetryError {
    pub(crate) reason: GiveUp,
    pub(crate) attempts: u32,
    pub(crate) status: Option<StatusCode>,
    pub(crate) source: Option<BoxError>,
    /// How long until `retry_at`, measured when the loop gave up (so `Display` never reads the
    /// clock).
    wait: Option<Duration>,
}

impl RetryError {
    pub(crate) fn new(
        reason: GiveUp,
        attempts: u32,
        status: Option<StatusCode>,
        source: Option<BoxError>,
    ) -> Self {
        let wait = reason
            .retry_at()
            .map(|t| t.saturating_duration_since(Instant::now()));
        Self {
            reason,
            attempts,
            status,
            source,
            wait,
        }
    }

    /// Why it stopped.
    pub fn reason(&self) -> GiveUp {
        self.reason
    }

    /// Attempts sent, the first included.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// When a retry would have been possible (for a hint past the cap or a deadline).
    pub fn retry_at(&self) -> Option<Instant> {
        self.reason.retry_at()
    }

    /// How long until [`RetryError::retry_at`], from now.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_at()
            .map(|t| t.saturating_duration_since(Instant::now()))
    }

    /// The status of the last response, when the last failure was a response.
    pub fn status(&self) -> Option<StatusCode> {
        self.status
    }
}

impl fmt::Display for RetryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.reason == GiveUp::NotReplayable {
            write!(f, "not retried: {}", self.reason)?;
        } else {
            write!(
                f,
                "gave up after {} attempt(s): {}",
                self.attempts, self.reason
            )?;
        }
        if let Some(w) = self.wait {
            write!(f, " (a wait of {:.3} s)", w.as_secs_f64())?;
        }
        if let Some(s) = self.status {
            write!(f, " (last status {s})")?;
        }
        Ok(())
    }
}

impl std::error::Error for RetryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}
