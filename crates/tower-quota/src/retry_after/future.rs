//! The response future of [`RetryAfter`](super::RetryAfter): the crate's holding future with the
//! gate's admission.

use super::gate::{Meet, Shared};
use crate::BoxError;
use crate::admit::{Admit, Same, admitted_future};
use crate::classify::Outcome;
use crate::partition::PartitionKey;
use http::Response;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::sync::futures::OwnedNotified;
use tokio::time::{Instant, Sleep};

admitted_future!(
    /// Waits at the partition's gate, then sends the request and reads the server's hint.
    Gate,
    Same
);

/// One request at its partition's gate.
pub(crate) struct Gate {
    shared: Arc<Shared>,
    partition: PartitionKey,
    jitter: Option<Duration>,
    waited: Option<Instant>,
    sleep: Option<Pin<Box<Sleep>>>,
    notified: Option<Pin<Box<OwnedNotified>>>,
    probe: bool,
    // Counted among the gate's waiters.
    waiting: bool,
    // Past the gate.
    passed: bool,
}

impl Gate {
    pub(crate) fn new(shared: Arc<Shared>, partition: PartitionKey) -> Self {
        Self {
            shared,
            partition,
            jitter: None,
            waited: None,
            sleep: None,
            notified: None,
            probe: false,
            waiting: false,
            passed: false,
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if self.probe {
            // A probe that gives up hands the role to the next waiter.
            self.shared.probe_done(self.partition, false);
        }
        if self.waiting {
            self.shared.leave(self.partition);
        }
    }
}

impl fmt::Debug for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gate")
            .field("partition", &self.partition)
            .field("passed", &self.passed)
            .finish()
    }
}

impl<B> Admit<B> for Gate {
    type Body<R> = Same<R>;

    fn poll_admit(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.passed {
            return Poll::Ready(Ok(()));
        }
        let p = self.partition;
        loop {
            if let Some(n) = self.notified.as_mut() {
                // Waiting for the half-open gate's probe to answer.
                ready!(n.as_mut().poll(cx));
                self.notified = None;
            }
            let mut meet = self.shared.meet(p);
            loop {
                match meet {
                    Meet::Closed(until) => {
                        let now = Instant::now();
                        if let Some(err) = self.shared.too_long(p, until, now) {
                            return Poll::Ready(Err(err.into()));
                        }
                        if !self.waiting {
                            self.shared.enter(p)?;
                            self.waiting = true;
                        }
                        // The jitter is drawn once, the first time the request meets a closed
                        // gate, and only ever adds to the server's instant.
                        let shared = &self.shared;
                        let jitter = *self.jitter.get_or_insert_with(|| shared.draw_jitter());
                        self.waited = Some(until);
                        tracing::trace!(partition = %p, wait_ms = (until + jitter - now).as_millis() as u64, "retry-after: waiting at gate");
                        ready!(crate::util::sleep_until(
                            &mut self.sleep,
                            until + jitter,
                            cx
                        ));
                        break;
                    }
                    Meet::Probing(notify) => {
                        // Register first, then look again: a probe that answers in between still
                        // wakes this request.
                        let n = Box::pin(notify.notified_owned());
                        match self.shared.meet(p) {
                            Meet::Probing(_) => {
                                self.notified = Some(n);
                                break;
                            }
                            again => meet = again,
                        }
                    }
                    Meet::Pass { probe } => {
                        self.probe |= probe;
                        if std::mem::take(&mut self.waiting) {
                            self.shared.leave(p);
                        }
                        if let Some(until) = self.waited {
                            // Released by a probe's answer: keep this request's own jitter, so
                            // the herd spreads out behind the probe.
                            let deadline = until + self.jitter.unwrap_or_default();
                            if Instant::now() < deadline {
                                ready!(crate::util::sleep_until(&mut self.sleep, deadline, cx));
                            }
                        }
                        self.passed = true;
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
    }

    fn answered<R>(
        &mut self,
        result: Result<Response<R>, BoxError>,
    ) -> Result<Response<R>, BoxError> {
        let e = match result {
            Ok(mut res) => {
                let (outcome, closed) = self.shared.observe(self.partition, &mut res);
                if outcome == Outcome::Success {
                    self.shared.succeeded(self.partition);
                }
                if self.probe {
                    self.probe = false;
                    self.shared.probe_done(self.partition, !closed);
                }
                return Ok(res);
            }
            Err(e) => e,
        };
        if self.probe {
            self.probe = false;
            self.shared.probe_done(self.partition, false);
        }
        Err(e)
    }
}
