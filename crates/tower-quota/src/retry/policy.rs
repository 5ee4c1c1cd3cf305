//! The retry decision, apart from the future that drives it (as tower's `Policy` is apart from
//! its `Retry` future): what follows a failure, and which failures are final whatever the
//! classifier says.

use super::error::{GiveUp, RetryError};
use super::layer::Shared;
use crate::hint::{RetryAt, RetrySource};
use std::error::Error as StdError;
use std::time::Duration;
use tokio::time::Instant;

/// How the failed attempt said to pace the next one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pace {
    /// Nothing said when: the backoff decides.
    Backoff,
    /// The server named the instant: it replaces the backoff (a hinted retry).
    Server(Instant),
    /// The Retry-After gate inferred a pause until then without the server's word: the longer of
    /// the backoff and the pause, counted as a backoff retry.
    Inferred(Instant),
}

impl Pace {
    /// The pace a gate's [`RetryAt`] sets.
    pub(crate) fn of(r: &RetryAt) -> Self {
        match r.source {
            RetrySource::Server(_) => Pace::Server(r.at),
            RetrySource::Inferred => Pace::Inferred(r.at),
        }
    }
}

/// What follows a retryable failure.
#[derive(Debug)]
pub(crate) enum Next {
    /// Send again at `at`.
    Retry {
        at: Instant,
        /// What set the instant, for the trace.
        source: &'static str,
    },
    /// Stop.
    GiveUp(GiveUp),
}

/// One call's attempts so far.
#[derive(Debug)]
pub(crate) struct Attempts {
    /// Attempts sent, the first included.
    pub(crate) sent: u32,
    /// Retries that waited a backoff.
    backoffs: u32,
    /// Retries that waited for the server's instant.
    hinted: u32,
    /// The last backoff delay (decorrelated jitter grows from it).
    previous: Duration,
    /// Whether the request can be sent again.
    pub(crate) replayable: bool,
    /// No retry starts after it.
    deadline: Option<Instant>,
}

impl Attempts {
    pub(crate) fn new(shared: &Shared, deadline: Option<Instant>) -> Self {
        Self {
            sent: 0,
            backoffs: 0,
            hinted: 0,
            previous: shared.backoff.base,
            replayable: true,
            deadline,
        }
    }

    /// Decides what follows a retryable failure paced by `pace`, and counts the retry if there is
    /// one.
    pub(crate) fn next(&mut self, shared: &Shared, pace: Pace) -> Next {
        let now = Instant::now();
        if !self.replayable {
            return Next::GiveUp(GiveUp::NotReplayable);
        }
        let (at, source) = match pace {
            Pace::Server(at) => {
                if self.hinted >= shared.max_hinted_retries {
                    return Next::GiveUp(GiveUp::AttemptsExhausted);
                }
                let wait = at.saturating_duration_since(now);
                if shared.max_hint_wait.is_some_and(|cap| wait > cap) {
                    return Next::GiveUp(GiveUp::HintTooLong { retry_at: at });
                }
                // Never before the server's instant: jitter only adds.
                let at = at.max(now);
                (
                    at.checked_add(shared.draw(shared.hint_jitter))
                        .unwrap_or(at),
                    "server",
                )
            }
            Pace::Backoff | Pace::Inferred(_) => {
                if self.backoffs >= shared.max_retries {
                    return Next::GiveUp(GiveUp::AttemptsExhausted);
                }
                let d = shared.backoff_delay(self.backoffs, self.previous);
                self.previous = d;
                // Settings are at most an hour each (checked when the layer is built).
                let at = now.checked_add(d).unwrap_or(now);
                match pace {
                    Pace::Inferred(gate) if gate > at => (gate, "gate"),
                    _ => (at, "backoff"),
                }
            }
        };
        if let Some(deadline) = self.deadline {
            if at > deadline {
                return Next::GiveUp(GiveUp::DeadlineExceeded { retry_at: at });
            }
        }
        if let Some(budget) = &shared.budget {
            if !budget.withdraw() {
                return Next::GiveUp(GiveUp::BudgetEmpty);
            }
        }
        match pace {
            Pace::Server(_) => self.hinted += 1,
            Pace::Backoff | Pace::Inferred(_) => self.backoffs += 1,
        }
        Next::Retry { at, source }
    }
}

/// Whether `error` is a give-up of one of this crate's layers (a retry loop that already gave up, a
/// wait past a cap, a request the budget refused): final whatever the classifier says, so a retry
/// layer outside another never multiplies its attempts. The retry loop checks it before it asks
/// the classifier, so a user's classifier cannot lose the rule.
pub(crate) fn is_final(error: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.is::<RetryError>()
            || e.is::<crate::retry_after::error::WaitTooLong>()
            || e.is::<crate::budget::BudgetError>()
            || e.is::<crate::error::QueueFull>()
        {
            return true;
        }
        next = e.source();
    }
    false
}
