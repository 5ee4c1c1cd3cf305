//! What the collecting layers ([`pack`](crate::pack) and [`batch`](crate::batch)) share: callers'
//! requests gathered into groups by key, each group sent by a task of its own after a window from
//! its first request, or at once when it is full.

use crate::BoxError;
use crate::pack::PackInner;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Either, Full};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tower::ServiceExt;

/// Where a collected request's answer goes: the response its caller receives, or the error.
pub(crate) type Answer = oneshot::Sender<Result<Response<Full<Bytes>>, BoxError>>;

/// The future of a collecting layer's service: the inner body for a request sent as it was,
/// the answer's bytes for one answered from a collected call.
pub(crate) type CollectFuture<ResB> =
    Pin<Box<dyn Future<Output = Result<Response<Either<ResB, Full<Bytes>>>, BoxError>> + Send>>;

/// A request the layer does not collect: sent as it is.
pub(crate) fn pass<S: PackInner<B>, B: Send + 'static>(
    inner: S,
    req: Request<B>,
) -> CollectFuture<S::ResB> {
    Box::pin(async move {
        let res = inner.oneshot(req).await.map_err(Into::into)?;
        Ok(res.map(Either::Left))
    })
}

/// A collected request: its answer's channel, and the future that waits on the other end (with
/// `abandoned` when the answer's sender is dropped unanswered).
pub(crate) fn answer_later<ResB: 'static>(
    abandoned: fn() -> BoxError,
) -> (Answer, CollectFuture<ResB>) {
    let (tx, rx) = oneshot::channel();
    let fut = Box::pin(async move {
        let res: Response<Full<Bytes>> = rx.await.map_err(|_| abandoned())??;
        Ok(res.map(Either::Right))
    });
    (tx, fut)
}

/// Open groups by key, each with the generation it was opened as (so a window's timer never takes
/// a later group of the same key).
pub(crate) struct Groups<G> {
    map: Mutex<HashMap<String, (u64, G)>>,
    next: AtomicU64,
}

impl<G: Send + 'static> Groups<G> {
    pub(crate) fn new() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        }
    }

    /// Adds an item to the group of `key`. When the open group `overflows` with it, that group
    /// leaves first. A new group is made by `open`, and leaves `wait` after (unless it left
    /// before). `push` adds the item and says whether the group is now full: it then leaves.
    /// `send` sends a group that left, in a task of its own.
    pub(crate) fn add<F, Fut>(
        self: &Arc<Self>,
        key: &str,
        wait: Duration,
        send: F,
        overflows: impl FnOnce(&G) -> bool,
        open: impl FnOnce() -> G,
        push: impl FnOnce(&mut G) -> bool,
    ) where
        F: Fn(G) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(key).is_some_and(|(_, g)| overflows(g)) {
            if let Some((_, g)) = map.remove(key) {
                tokio::spawn(send(g));
            }
        }
        let (_, group) = map.entry(key.to_owned()).or_insert_with(|| {
            let generation = self.next.fetch_add(1, Ordering::Relaxed);
            let (groups, send, key) = (self.clone(), send.clone(), key.to_owned());
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                if let Some(g) = groups.take(&key, generation) {
                    send(g).await;
                }
            });
            (generation, open())
        });
        if push(group) {
            if let Some((_, g)) = map.remove(key) {
                tokio::spawn(send(g));
            }
        }
    }

    /// Takes the group of `key` if it is still the one opened as `generation`.
    fn take(&self, key: &str, generation: u64) -> Option<G> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(key) {
            Some((g, _)) if *g == generation => map.remove(key).map(|(_, g)| g),
            _ => None,
        }
    }
}

/// A copy of an answer read whole, for each caller of a group it answers as it came.
pub(crate) fn copy_of(parts: &http::response::Parts, bytes: &Bytes) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(bytes.clone()));
    *res.status_mut() = parts.status;
    *res.headers_mut() = parts.headers.clone();
    res
}
