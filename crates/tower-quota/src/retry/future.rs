//! The response future of [`BackoffRetry`](super::BackoffRetry).

use super::RetryReport;
use super::error::{GiveUp, RetryError};
use super::layer::Shared;
use super::replay::{TryCloneBody, try_clone_request};
use crate::BoxError;
use crate::retry_after::RetryAt;
use crate::signals::{HintSource, Signals};
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
        deadline: Option<Instant>,
        attempts: u32,
        backoffs: u32,
        hinted: u32,
        replayable: bool,
        previous: Duration,
        delays: Vec<Duration>,
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
        let previous = shared.backoff.base;
        Self {
            svc,
            template: Some(req),
            shared,
            deadline,
            attempts: 0,
            backoffs: 0,
            hinted: 0,
            replayable: true,
            previous,
            delays: Vec::new(),
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
            .field("attempts", &self.attempts)
            .field("state", &state)
            .finish()
    }
}

enum Next {
    Retry { at: Instant, source: &'static str },
    GiveUp(GiveUp),
}

/// Decides what follows a retryable failure. `hint`: the instant the server named, if any.
/// `counts`: retries so far that waited a backoff, and that waited for a hint.
fn decide(
    shared: &Shared,
    counts: (&mut u32, &mut u32),
    replayable: bool,
    deadline: Option<Instant>,
    previous: &mut Duration,
    hint: Option<(Instant, HintSource)>,
) -> Next {
    let now = Instant::now();
    if !replayable {
        return Next::GiveUp(GiveUp::NotReplayable);
    }
    let (backoffs, hinted) = counts;
    let exhausted = match hint {
        Some(_) => *hinted >= shared.max_hinted_retries,
        None => *backoffs >= shared.max_retries,
    };
    if exhausted {
        return Next::GiveUp(GiveUp::AttemptsExhausted);
    }
    let (at, source) = match hint {
        Some((at, _)) => {
            let wait = at.saturating_duration_since(now);
            if shared.max_hint_wait.is_some_and(|cap| wait > cap) {
                return Next::GiveUp(GiveUp::HintTooLong { retry_at: at });
            }
            let jitter = if shared.hint_jitter.is_zero() {
                Duration::ZERO
            } else {
                let mut rng = shared.rng.lock().unwrap_or_else(|e| e.into_inner());
                shared
                    .hint_jitter
                    .mul_f64(rand::Rng::random::<f64>(&mut *rng))
            };
            // Never before the server's instant: jitter only adds.
            (at.max(now) + jitter, "server")
        }
        None => {
            let d = {
                let mut rng = shared.rng.lock().unwrap_or_else(|e| e.into_inner());
                shared.backoff.delay(*backoffs, *previous, &mut *rng)
            };
            *previous = d;
            (now + d, "backoff")
        }
    };
    if let Some(deadline) = deadline {
        if at > deadline {
            return Next::GiveUp(GiveUp::DeadlineExceeded { retry_at: at });
        }
    }
    if let Some(budget) = &shared.budget {
        if !budget.withdraw() {
            return Next::GiveUp(GiveUp::BudgetEmpty);
        }
    }
    match hint {
        Some(_) => *hinted += 1,
        None => *backoffs += 1,
    }
    Next::Retry { at, source }
}

impl<S, B, ResB> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    B: TryCloneBody,
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
                            *this.replayable = false;
                            this.template
                                .take()
                                .expect("a request is sent once it cannot be copied")
                        }
                    };
                    *this.attempts += 1;
                    if *this.attempts > 1 {
                        this.shared.stats.retries.fetch_add(1, Ordering::Relaxed);
                    }
                    let fut = this.svc.call(req);
                    this.state.set(State::Calling { fut });
                }
                StateProj::Calling { fut } => {
                    let result = ready!(fut.poll(cx));
                    let shared = &**this.shared;
                    let (next, outcome, failure) = match result {
                        Ok(mut res) => {
                            let verdict = shared
                                .classifier
                                .classify_response(res.status(), res.headers());
                            if !verdict.retryable {
                                return Poll::Ready(Ok(report(
                                    res,
                                    *this.attempts,
                                    this.delays,
                                    None,
                                )));
                            }
                            let hint = match res.extensions().get::<RetryAt>() {
                                Some(h) => Some((h.at, h.source)),
                                None => {
                                    let s = Signals::of_with(&mut res, &*shared.wall);
                                    s.retry_at().zip(s.hint().map(|h| h.source))
                                }
                            };
                            let next = decide(
                                shared,
                                (this.backoffs, this.hinted),
                                *this.replayable,
                                *this.deadline,
                                this.previous,
                                hint,
                            );
                            (next, verdict.outcome, Ok(res))
                        }
                        Err(e) => {
                            let e: BoxError = e.into();
                            let verdict = shared.classifier.classify_error(&*e);
                            if !verdict.retryable {
                                return Poll::Ready(Err(e));
                            }
                            let next = decide(
                                shared,
                                (this.backoffs, this.hinted),
                                *this.replayable,
                                *this.deadline,
                                this.previous,
                                None,
                            );
                            (next, verdict.outcome, Err(e))
                        }
                    };
                    match next {
                        Next::Retry { at, source } => {
                            let delay = at.saturating_duration_since(Instant::now());
                            tracing::debug!(
                                attempt = *this.attempts,
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
                            tracing::debug!(attempt = *this.attempts, outcome = ?outcome, %reason, "retry: giving up");
                            let attempts = *this.attempts;
                            return Poll::Ready(match failure {
                                Ok(res) if reason.retry_at().is_none() => {
                                    Ok(report(res, attempts, this.delays, Some(reason)))
                                }
                                Ok(res) => Err(Box::new(RetryError {
                                    reason,
                                    attempts,
                                    status: Some(res.status()),
                                    source: None,
                                })),
                                Err(e) => Err(Box::new(RetryError {
                                    reason,
                                    attempts,
                                    status: None,
                                    source: Some(e),
                                })),
                            });
                        }
                    }
                }
                StateProj::Sleeping { until } => {
                    ready!(crate::sleep_until(this.sleep, *until, cx));
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
