//! The response future of [`BackoffRetry`](super::BackoffRetry).

use super::RetryReport;
use super::error::{GiveUp, RetryError};
use super::layer::Shared;
use super::policy::{self, Attempts, Next, Pace};
use crate::BoxError;
use crate::body::{InMemoryBody, try_clone_request};
use crate::hint::RetryAt;
use crate::partition::PartitionKey;
use http::{Request, Response};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tower::Service;

pin_project! {
    /// Runs the retry loop of one call.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        svc: S,
        template: Option<Request<B>>,
        shared: Arc<Shared>,
        attempts: Attempts,
        delays: Vec<Duration>,
        timeout_at: Option<Instant>,
        sleep: Option<Pin<Box<Sleep>>>,
        #[pin]
        state: State<S::Future>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Ready,
        Calling { #[pin] fut: F },
        Sleeping { until: Instant },
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn new(
        svc: S,
        req: Request<B>,
        shared: Arc<Shared>,
        deadline: Option<Instant>,
    ) -> Self {
        Self {
            svc,
            template: Some(req),
            attempts: Attempts::new(&shared, deadline),
            shared,
            delays: Vec::new(),
            timeout_at: None,
            sleep: None,
            state: State::Ready,
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Ready => "ready",
            State::Calling { .. } => "calling",
            State::Sleeping { .. } => "sleeping",
        };
        f.debug_struct("ResponseFuture")
            .field("attempts", &self.attempts.sent)
            .field("state", &state)
            .finish()
    }
}

impl<S, B, ResB> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    B: InMemoryBody,
{
    type Output = Result<Response<ResB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Ready => {
                    ready!(this.svc.poll_ready(cx)).map_err(Into::into)?;
                    let req = match this.template.as_ref().and_then(try_clone_request) {
                        Some(copy) => copy,
                        None => {
                            this.attempts.replayable = false;
                            this.template
                                .take()
                                .expect("a request is sent once it cannot be copied")
                        }
                    };
                    this.attempts.sent += 1;
                    if this.attempts.sent > 1 {
                        this.shared.stats.retries.fetch_add(1, Ordering::Relaxed);
                    }
                    let fut = this.svc.call(req);
                    *this.timeout_at = this
                        .shared
                        .attempt_timeout
                        .and_then(|t| Instant::now().checked_add(t));
                    this.state.set(State::Calling { fut });
                }
                StateProj::Calling { fut } => {
                    let result = match fut.poll(cx) {
                        Poll::Ready(r) => r.map_err(Into::into),
                        Poll::Pending => match *this.timeout_at {
                            Some(at) => {
                                ready!(crate::util::sleep_until(this.sleep, at, cx));
                                // Past the attempt's timeout: the attempt is dropped (cancelled)
                                // below, as the state moves on.
                                Err(Box::new(tower::timeout::error::Elapsed::new()) as BoxError)
                            }
                            None => return Poll::Pending,
                        },
                    };
                    let shared = &**this.shared;
                    let (next, outcome, failure) = match result {
                        Ok(mut res) => {
                            let verdict = shared.ctx.classify(&res);
                            // A response an inner retry loop already gave up on is final.
                            let given_up = res
                                .extensions()
                                .get::<RetryReport>()
                                .is_some_and(|r| r.gave_up.is_some());
                            if !verdict.retryable || given_up {
                                let sent = this.attempts.sent;
                                return Poll::Ready(Ok(report(res, sent, this.delays, None)));
                            }
                            let pace = match res.extensions().get::<RetryAt>() {
                                Some(r) => Pace::of(r),
                                None => shared
                                    .ctx
                                    .signals(&mut res)
                                    .retry_at()
                                    .map_or(Pace::Backoff, Pace::Server),
                            };
                            let next = this.attempts.next(shared, pace);
                            (next, verdict.outcome, Ok(res))
                        }
                        Err(e) => {
                            // This crate's own give-ups are final, whatever the classifier says.
                            if policy::is_final(&*e) {
                                return Poll::Ready(Err(e));
                            }
                            let verdict = shared.ctx.classify_error(&*e);
                            if !verdict.retryable {
                                return Poll::Ready(Err(e));
                            }
                            let next = this.attempts.next(shared, Pace::Backoff);
                            (next, verdict.outcome, Err(e))
                        }
                    };
                    let partition = || {
                        this.template
                            .as_ref()
                            .map_or(PartitionKey::ANONYMOUS, |r| shared.ctx.partition_here(r))
                    };
                    match next {
                        Next::Retry { at, source } => {
                            crate::metrics::retried(partition(), outcome);
                            let delay = at.saturating_duration_since(Instant::now());
                            tracing::debug!(
                                attempt = this.attempts.sent,
                                outcome = ?outcome,
                                delay_ms = delay.as_millis() as u64,
                                source,
                                "retry: will retry"
                            );
                            this.delays.push(delay);
                            // The failed response (and its connection) is released here.
                            drop(failure);
                            this.state.set(State::Sleeping { until: at });
                        }
                        Next::GiveUp(reason) => {
                            shared.stats.gave_up.fetch_add(1, Ordering::Relaxed);
                            crate::metrics::gave_up(partition(), reason.label());
                            tracing::debug!(attempt = this.attempts.sent, outcome = ?outcome, %reason, "retry: giving up");
                            let attempts = this.attempts.sent;
                            return Poll::Ready(match failure {
                                Ok(res) if reason.retry_at().is_none() => {
                                    Ok(report(res, attempts, this.delays, Some(reason)))
                                }
                                Ok(res) => Err(Box::new(RetryError::new(
                                    reason,
                                    attempts,
                                    Some(res.status()),
                                    None,
                                ))),
                                Err(e) => {
                                    Err(Box::new(RetryError::new(reason, attempts, None, Some(e))))
                                }
                            });
                        }
                    }
                }
                StateProj::Sleeping { until } => {
                    ready!(crate::util::sleep_until(this.sleep, *until, cx));
                    this.state.set(State::Ready);
                }
            }
        }
    }
}

/// Tags a response the loop returns after retries or a give-up.
fn report<R>(
    mut res: Response<R>,
    attempts: u32,
    delays: &mut Vec<Duration>,
    gave_up: Option<GiveUp>,
) -> Response<R> {
    if attempts > 1 || gave_up.is_some() {
        res.extensions_mut().insert(RetryReport {
            attempts,
            delays: std::mem::take(delays),
            gave_up,
        });
    }
    res
}
