//! What the budget does with an admitted request: send it (marked for the layers inside), watch a
//! probe's deadline while it is out, and once its inner service answers settle, learn, release a
//! probe's turn and wrap the body; and its refusal of a request whose partition's queue is full.

use super::Bucket;
use super::body::BudgetBody;
use super::future::Reserve;
use super::reservation::{NotSent, ReservationHandle, drive};
use super::shared::{Queue, Shared};
use super::store::Learned;
use crate::BoxError;
use crate::admit::Admit;
use crate::classify::{Outcome, TransportKind};
use crate::error::QueueFull;
use crate::partition::PartitionKey;
use crate::signals::Signals;
use http::Request;
use http::Response;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tower::Service;

/// A placeholder in the stack buffer of lessons (never handed to the store).
const EMPTY_LESSON: Learned = Learned {
    bucket: Bucket::Requests,
    limit: None,
    remaining: None,
    inferred: false,
    unseen: 0,
};

/// The refusal of a request that found `waiting` requests of its partition queued: `retry_at`
/// estimates the time they need at the partition's request rate (a second if it is not known).
pub(super) fn queue_full(own: &Queue, waiting: usize) -> QueueFull {
    let per_request = own.scopes[0]
        .limits
        .requests
        .filter(|l| l.per_minute > 0)
        .map_or(Duration::from_secs(1), |l| {
            Duration::from_secs_f64(60.0 / l.per_minute as f64)
        });
    let now = Instant::now();
    let ahead = per_request.saturating_mul(u32::try_from(waiting).unwrap_or(u32::MAX));
    let partition = own.scopes[0].partition;
    QueueFull::new(
        "budget",
        partition,
        waiting,
        now.checked_add(ahead).unwrap_or(now),
    )
}

/// The inner service answered: settle, learn, release the probe's turn, wrap the body.
pub(super) fn answer<ResB>(
    shared: &Shared,
    partition: PartitionKey,
    own: &Queue,
    turn: &mut Option<OwnedSemaphorePermit>,
    probe: &mut bool,
    not_sent: &mut Option<NotSent>,
    result: Result<Response<ResB>, BoxError>,
) -> Result<Response<BudgetBody<ResB>>, BoxError> {
    let handle = not_sent
        .take()
        .expect("reserved before the call")
        .answered();
    let mut res = match result {
        Ok(res) => res,
        Err(e) => {
            let verdict = shared.ctx.classify_error(&*e);
            own.metrics.answer(verdict.outcome);
            if verdict.outcome == Outcome::Transport(TransportKind::Connect) {
                // The request never reached the server.
                handle.refund();
            }
            return Err(e);
        }
    };
    settle_answer(shared, partition, own, &handle, &mut res);
    if *probe {
        *probe = false;
        own.probed.store(true, Ordering::SeqCst);
        *turn = None;
    }
    let sse = res
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    res.extensions_mut().insert(handle.clone());
    let settle = shared.reconcile.then_some(handle);
    Ok(res.map(|b| BudgetBody::new(b, settle, sse)))
}

/// What a response teaches the budget: the limits and levels in its headers, a refund when the
/// server did no work, a cooldown in the store when it pushed back with a hint.
fn settle_answer<R>(
    shared: &Shared,
    partition: PartitionKey,
    own: &Queue,
    handle: &ReservationHandle,
    res: &mut Response<R>,
) {
    let outcome = shared.ctx.classify(res).outcome;
    own.metrics.answer(outcome);
    let signals = if outcome == Outcome::Success {
        shared.ctx.signals_once(res)
    } else {
        // The retry and the gate read these again: parse once, cached.
        Signals::clone(&shared.ctx.signals(res))
    };
    // Refunded before the counts are learned: a 429's count (or the empty bucket it implies)
    // already leaves this request out, and a refund after it would add it back.
    if outcome != Outcome::Success {
        // The server refused the request: it used nothing.
        handle.refund();
        if outcome == Outcome::RateLimited {
            own.be_careful();
            if let Some(hint) = signals.hint() {
                let store = shared.store.clone();
                drive(async move {
                    if let Err(e) = store.cooldown(partition, hint.delay).await {
                        tracing::warn!(error = %e.0, "budget: recording a cooldown failed");
                    }
                });
            }
        }
    }
    if shared.learn {
        // At most one lesson a bucket: on the stack, not in a `Vec` per answer.
        let mut learned = [EMPTY_LESSON; Bucket::ALL.len()];
        let mut n = 0;
        for b in Bucket::ALL {
            let s = signals.bucket(b);
            if s.limit.is_some() || s.remaining.is_some() {
                learned[n] = Learned {
                    bucket: b,
                    limit: s.limit,
                    remaining: s.remaining,
                    inferred: false,
                    unseen: 0,
                };
                n += 1;
            }
        }
        if n == 0 && matches!(outcome, Outcome::Success | Outcome::RateLimited) {
            // No headers: the request rate is inferred from the 429s.
            let sent = handle.sent_at();
            if let Some(l) =
                shared
                    .inference
                    .observe(partition, outcome == Outcome::RateLimited, sent)
            {
                learned[0] = l;
                n = 1;
            }
        }
        let learned = &mut learned[..n];
        if !learned.is_empty() {
            // Written once (every response writing it would bounce its cache line).
            if !own.paced.load(Ordering::Relaxed) && learned.iter().any(|l| l.limit.is_some()) {
                own.paced.store(true, Ordering::Relaxed);
            }
            // The server's count leaves out the requests admitted here and still held in the
            // layers inside (queued for a slot, or behind the gate): they will spend it.
            let held = u64::try_from(own.held.load(Ordering::SeqCst)).unwrap_or(0);
            for l in learned.iter_mut() {
                // A configured limit stays the one in force: only a learned one is shown.
                if let Some(limit) = l
                    .limit
                    .filter(|_| own.scopes[0].limits.get(l.bucket).is_none())
                {
                    own.metrics.limit(l.bucket, limit);
                }
                if let Some(remaining) = l.remaining {
                    own.metrics.remaining(l.bucket, remaining);
                }
                if l.bucket == Bucket::Requests {
                    l.unseen = held;
                }
            }
            match shared.store.try_learn(partition, learned) {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e.0, "budget: learning from headers failed");
                }
                None => {
                    let (store, learned) = (shared.store.clone(), learned.to_vec());
                    drive(async move {
                        if let Err(e) = store.learn(partition, &learned).await {
                            tracing::warn!(error = %e.0, "budget: learning from headers failed");
                        }
                    });
                }
            }
        }
    }
}

impl<B> Admit<B> for Reserve {
    type Body<R> = BudgetBody<R>;

    fn poll_admit(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.admit(cx)
    }

    fn send<S: Service<Request<B>>>(&mut self, svc: &mut S, mut req: Request<B>) -> S::Future {
        if let Some(n) = self.not_sent.as_mut() {
            crate::wire::mark(req.extensions_mut(), n.wire_mark());
            n.handed_on();
        }
        let _entered = self.span.as_ref().map(|s| s.enter());
        svc.call(req)
    }

    fn poll_call<F: Future>(&mut self, fut: Pin<&mut F>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let polled = {
            let _entered = self.span.as_ref().map(|s| s.enter());
            fut.poll(cx)
        };
        if polled.is_pending() && self.probe {
            // A probe holds its partition's queue for a bounded time only.
            let until = self.probe_until.expect("a probe's deadline");
            if crate::util::sleep_until(&mut self.sleep, until, cx).is_ready() {
                self.probe = false;
                self.own.probed.store(true, Ordering::SeqCst);
                self.turn = None;
                tracing::debug!(
                    partition = %self.partition,
                    "budget: probe unanswered, the queue moves on"
                );
            }
        }
        polled
    }

    fn answered<R>(
        &mut self,
        result: Result<Response<R>, BoxError>,
    ) -> Result<Response<BudgetBody<R>>, BoxError> {
        answer(
            &self.shared,
            self.partition,
            &self.own,
            &mut self.turn,
            &mut self.probe,
            &mut self.not_sent,
            result,
        )
    }
}
