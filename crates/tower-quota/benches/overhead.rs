//! Cost per request of each layer on the success path, side by side with a bare service and with
//! tower's own `Retry` (a policy that never retries, but clones the request as tower requires).
//!
//! Run with: `cargo bench -p tower-quota --bench overhead`
#![allow(missing_docs)] // criterion_group! generates an undocumented function.

use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::time::{Duration, Instant};
use tower::retry::Policy;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_quota::retry::BackoffRetryLayer;
use tower_quota::retry_after::RetryAfterLayer;

fn req() -> Request<String> {
    Request::builder()
        .uri("/v1/messages")
        .header("x-api-key", "sk-bench")
        .header("content-type", "application/json")
        .body(String::new())
        .unwrap()
}

fn ok(_req: Request<String>) -> Ready<Result<Response<()>, Infallible>> {
    ready(Ok(Response::new(())))
}

/// A tower retry policy that never retries (but clones the request, as tower's `Retry` needs).
#[derive(Clone)]
struct Never;

impl Policy<Request<String>, Response<()>, tower::BoxError> for Never {
    type Future = Ready<()>;

    fn retry(
        &mut self,
        _req: &mut Request<String>,
        _result: &mut Result<Response<()>, tower::BoxError>,
    ) -> Option<Self::Future> {
        None
    }

    fn clone_request(&mut self, req: &Request<String>) -> Option<Request<String>> {
        let mut r = Request::new(req.body().clone());
        *r.uri_mut() = req.uri().clone();
        *r.headers_mut() = req.headers().clone();
        Some(r)
    }
}

/// ns per request: `iters` sequential ready + call + await on one task.
fn run<S>(rt: &tokio::runtime::Runtime, svc: S, iters: u64) -> Duration
where
    S: Service<Request<String>, Response = Response<()>> + Clone,
    S::Error: std::fmt::Debug,
{
    rt.block_on(async move {
        let mut svc = svc;
        let start = Instant::now();
        for _ in 0..iters {
            let r = svc.ready().await.unwrap().call(req()).await.unwrap();
            std::hint::black_box(r);
        }
        start.elapsed()
    })
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("overhead");
    // The request is built in every variant, so the bare case includes its cost too.
    g.bench_function("bare_service_fn", |b| {
        b.iter_custom(|n| run(&rt, service_fn(ok), n))
    });
    g.bench_function("tower_retry_never", |b| {
        b.iter_custom(|n| {
            let svc = tower::retry::RetryLayer::new(Never).layer(service_fn(|r| async move {
                ok(r).await.map_err(tower::BoxError::from)
            }));
            run(&rt, svc, n)
        })
    });
    g.bench_function("retry_after", |b| {
        b.iter_custom(|n| run(&rt, RetryAfterLayer::new().layer(service_fn(ok)), n))
    });
    g.bench_function("backoff_retry", |b| {
        b.iter_custom(|n| run(&rt, BackoffRetryLayer::new().layer(service_fn(ok)), n))
    });
    g.bench_function("backoff_retry_no_budget", |b| {
        b.iter_custom(|n| {
            run(
                &rt,
                BackoffRetryLayer::new().no_budget().layer(service_fn(ok)),
                n,
            )
        })
    });
    g.bench_function("backoff_retry+retry_after", |b| {
        b.iter_custom(|n| {
            let svc = BackoffRetryLayer::new().layer(RetryAfterLayer::new().layer(service_fn(ok)));
            run(&rt, svc, n)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
