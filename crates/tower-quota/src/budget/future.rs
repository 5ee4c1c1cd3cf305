//! The response future of [`TokenBudget`](super::TokenBudget).

use super::body::BudgetBody;
use super::error::BudgetError;
use super::estimate::BodyBytes;
use super::layer::Shared;
use super::reservation::{NotSent, ReservationHandle, drive};
use super::store::{Admission, Learned};
use super::{Bucket, Cost};
use crate::BoxError;
use crate::classify::{Outcome, TransportKind};
use crate::partition::PartitionKey;
use crate::signals::Signals;
use crate::wire::WireMark;
use http::{Request, Response, StatusCode};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

/// Reserves the request's cost (waiting in FIFO order), sends it, settles and learns from the
/// answer.
///
/// It is boxed: the store's operations are async (a Redis round trip), and the wait loop around them
/// reads best as an `async` block. Every guard inside it (the FIFO turn, the queued count, the
/// not-yet-sent refund) is an RAII value, so dropping the future returns all it held.
pub struct ResponseFuture<ResB> {
    inner: Pin<Box<dyn Future<Output = Result<Response<BudgetBody<ResB>>, BoxError>> + Send>>,
}

impl<ResB> ResponseFuture<ResB> {
    pub(crate) fn new(
        f: impl Future<Output = Result<Response<BudgetBody<ResB>>, BoxError>> + Send + 'static,
    ) -> Self {
        Self { inner: Box::pin(f) }
    }
}

impl<ResB> fmt::Debug for ResponseFuture<ResB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("budget::ResponseFuture")
    }
}

impl<ResB> Future for ResponseFuture<ResB> {
    type Output = Result<Response<BudgetBody<ResB>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

/// Counts a request as queued while it waits for its turn or its budget.
struct Queued<'a>(&'a Shared);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(crate) async fn run<S, B, ResB>(
    svc: S,
    req: Request<B>,
    shared: Arc<Shared>,
) -> Result<Response<BudgetBody<ResB>>, BoxError>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    B: BodyBytes,
{
    let partition = shared
        .partitioner
        .partition(req.headers(), req.extensions());
    let cost = match req.extensions().get::<Cost>() {
        Some(c) => *c,
        None => {
            let body = req.body().body_bytes();
            shared
                .estimator
                .estimate(req.headers(), req.extensions(), body.as_deref())
        }
    };
    let scopes = shared.scopes(partition);

    let (charged, probe) = {
        shared.queued.fetch_add(1, Ordering::SeqCst);
        let _queued = Queued(&shared);
        let (own, global) = shared.turns(partition);
        // The semaphores are never closed.
        let turn = own.queue.clone().acquire_owned().await?;
        // The global turn is held only while the global cap is what binds: a request waiting for
        // its own key's refill must not hold up the other keys.
        let mut global_turn = None;
        let charged = loop {
            if global_turn.is_none() {
                if let Some(g) = &global {
                    global_turn = Some(g.clone().acquire_owned().await?);
                }
            }
            match shared.store.reserve(&scopes, cost).await? {
                Admission::Granted { charged } => break charged,
                Admission::TooLarge {
                    partition,
                    bucket,
                    needed,
                    capacity,
                } => {
                    return Err(Box::new(BudgetError::TooLarge {
                        partition,
                        bucket,
                        needed,
                        capacity,
                    }));
                }
                Admission::Wait {
                    retry_in,
                    partition,
                    reason,
                } => {
                    if let Some(cap) = shared.max_wait.filter(|cap| retry_in > *cap) {
                        return Err(Box::new(BudgetError::WaitTooLong {
                            partition,
                            retry_at: Instant::now() + retry_in,
                            cap,
                        }));
                    }
                    if partition != PartitionKey::GLOBAL {
                        global_turn = None;
                    }
                    shared.waits.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        partition = %partition,
                        bound_by = ?reason,
                        wait_ms = retry_in.as_millis() as u64,
                        "budget: waiting"
                    );
                    tokio::time::sleep(retry_in).await;
                }
            }
        };
        // While some limit is neither configured nor learned, the first request of a partition
        // is a probe: it keeps the turn until its response has taught the store the limits, so
        // the queue behind it is not admitted blind.
        let probe =
            (shared.learn && !own.probed.load(Ordering::SeqCst) && scopes[0].limits.has_unset())
                .then_some((turn, own));
        (charged, probe)
    };
    shared.admitted.fetch_add(1, Ordering::Relaxed);

    let handle = ReservationHandle::new(shared.store.clone(), scopes, partition, cost, charged);
    let mark = WireMark::default();
    let mut req = req;
    req.extensions_mut().insert(mark.clone());
    let mut not_sent = NotSent::new(handle.clone(), mark);
    let mut svc = svc;
    let ready = svc.ready().await.map_err(Into::into)?;
    let fut = ready.call(req);
    not_sent.handed_on();
    let result = fut.await.map_err(Into::into);
    not_sent.answered();

    let mut res = match result {
        Ok(res) => res,
        Err(e) => {
            let verdict = shared.classifier.classify_error(&*e);
            if verdict.outcome == Outcome::Transport(TransportKind::Connect) {
                // The request never reached the server.
                handle.refund();
            }
            return Err(e);
        }
    };

    let signals = Signals::of_with(&mut res, &*shared.wall);
    if shared.learn {
        let learned: Vec<Learned> = Bucket::ALL
            .iter()
            .filter_map(|&b| {
                let s = signals.bucket(b);
                (s.limit.is_some() || s.remaining.is_some()).then_some(Learned {
                    bucket: b,
                    limit: s.limit,
                    remaining: s.remaining,
                })
            })
            .collect();
        if !learned.is_empty() {
            let store = shared.store.clone();
            drive(async move {
                if let Err(e) = store.learn(partition, &learned).await {
                    tracing::warn!(error = %e, "budget: learning from headers failed");
                }
            });
        }
    }
    if let Some((turn, queue)) = probe {
        queue.probed.store(true, Ordering::SeqCst);
        drop(turn);
    }
    if !res.status().is_success() {
        // The server refused the request: it used nothing.
        handle.refund();
        if res.status() == StatusCode::TOO_MANY_REQUESTS {
            if let Some(hint) = signals.hint() {
                let store = shared.store.clone();
                drive(async move {
                    if let Err(e) = store.cooldown(partition, hint.delay).await {
                        tracing::warn!(error = %e, "budget: recording a cooldown failed");
                    }
                });
            }
        }
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
