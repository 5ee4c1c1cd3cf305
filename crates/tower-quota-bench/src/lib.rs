//! The goodput benchmark: the same burst of Messages requests, sent by each client strategy
//! (the naive loop, immediate retry, the seed recipe, tower's built-ins, an SDK-like policy, and
//! tower-quota with limits configured and learned), against the simulated API.
//!
//! Each strategy is a `tower::Service` from a request to the final status of one *logical*
//! request (retries included), built over a base service (the in-process simulator, or a hyper
//! client aimed at it over loopback). A probe in the request extensions, set by the innermost
//! layer, records whether any attempt of the request saw a 429.

#![forbid(unsafe_code)]

pub mod batch;
pub mod scenario;
pub mod strategy;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use http_body_util::combinators::UnsyncBoxBody;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::task::{Context, Poll};
use tower::Service;
use tower::util::BoxCloneService;

pub use tower_quota::BoxError;

/// The request type every strategy takes.
pub type Req = Request<Full<Bytes>>;
/// A response body, type-erased.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;
/// The base service strategies wrap: the simulator in process, or an HTTP client.
pub type Base = BoxCloneService<Req, Response<Body>, BoxError>;
/// A strategy, ready to call: a request in, the final HTTP status out (body read to its end).
pub type Client = BoxCloneService<Req, u16, BoxError>;

/// What the innermost layer saw of one logical request's attempts.
#[derive(Clone, Debug, Default)]
pub struct Probe(Arc<ProbeState>);

/// The probe's counters.
#[derive(Debug, Default)]
pub struct ProbeState {
    saw_429: AtomicBool,
    attempts: AtomicU32,
    limited: AtomicU32,
}

impl Probe {
    /// Whether an attempt got a 429.
    pub fn saw_429(&self) -> bool {
        self.0.saw_429.load(Ordering::Relaxed)
    }

    /// Attempts answered 429.
    pub fn limited(&self) -> u32 {
        self.0.limited.load(Ordering::Relaxed)
    }

    /// Attempts that reached the base service.
    pub fn attempts(&self) -> u32 {
        self.0.attempts.load(Ordering::Relaxed)
    }
}

/// Records each attempt in the request's [`Probe`].
#[derive(Clone, Debug)]
pub struct Recorder<S>(pub S);

impl<S> Service<Req> for Recorder<S>
where
    S: Service<Req, Response = Response<Body>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<Body>, BoxError>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let probe = req.extensions().get::<Probe>().cloned();
        if let Some(p) = &probe {
            p.0.attempts.fetch_add(1, Ordering::Relaxed);
        }
        let fut = self.0.call(req);
        Box::pin(async move {
            let res = fut.await?;
            if res.status() == 429 {
                if let Some(p) = probe {
                    p.0.saw_429.store(true, Ordering::Relaxed);
                    p.0.limited.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(res)
        })
    }
}

/// A copy of a request for another attempt (extensions included, so the probe follows).
pub fn clone_request(req: &Req) -> Req {
    let mut r = Request::new(req.body().clone());
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.headers_mut() = req.headers().clone();
    *r.extensions_mut() = req.extensions().clone();
    r
}
