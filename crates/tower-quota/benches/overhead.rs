//! Cost per request of each layer on the success path, side by side with a bare service and with
//! tower's own layers, in one run.
//!
//! Run with: `cargo bench -p tower-quota --bench overhead`
//!
//! Every variant builds the same request (a small Messages JSON body, two headers) and awaits one
//! call on one task of a current-thread runtime; the bare service's figure includes building the
//! request, so the other figures minus it are each layer's own cost.
#![allow(missing_docs)] // criterion_group! generates an undocumented function.

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::Full;
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::time::{Duration, Instant};
use tower::retry::Policy;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};
use tower_quota::budget::store::Scope;
use tower_quota::budget::{
    Cost, Estimate, Limits, MemoryStore, MessagesEstimator, TokenBudgetLayer,
};
use tower_quota::concurrency::{Aimd, ConcurrencyLimitLayer};
use tower_quota::partition::PartitionKey;
use tower_quota::retry::BackoffRetryLayer;
use tower_quota::retry_after::RetryAfterLayer;

mod support;
use support::anthropic_200;

type Body = Full<Bytes>;

const JSON: &str = r#"{"model":"claude-sonnet-5-5","max_tokens":256,"messages":[{"role":"user","content":"Summarise the plot of Hamlet in one line."}]}"#;

fn req() -> Request<Body> {
    Request::builder()
        .uri("/v1/messages")
        .header("x-api-key", "sk-bench")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(JSON.as_bytes())))
        .unwrap()
}

fn req_with_cost() -> Request<Body> {
    let mut r = req();
    r.extensions_mut().insert(Cost::new(20, 256));
    r
}

fn ok(_req: Request<Body>) -> Ready<Result<Response<Body>, Infallible>> {
    ready(Ok(Response::new(Full::new(Bytes::new()))))
}

/// A service answering with the headers of a typical Anthropic 200, as every real answer carries
/// them (a copy of them per answer).
fn with_headers() -> impl Service<
    Request<Body>,
    Response = Response<Body>,
    Error = Infallible,
    Future = Ready<Result<Response<Body>, Infallible>>,
> + Clone {
    // Shared: the layers clone their inner service per request, and that must not copy them.
    let headers = std::sync::Arc::new(anthropic_200());
    service_fn(move |_req: Request<Body>| {
        let mut res = Response::new(Full::new(Bytes::new()));
        *res.headers_mut() = (*headers).clone();
        ready(Ok(res))
    })
}

/// A tower retry policy that never retries (but clones the request, as tower's `Retry` needs).
#[derive(Clone)]
struct Never;

impl<E> Policy<Request<Body>, Response<Body>, E> for Never {
    type Future = Ready<()>;

    fn retry(
        &mut self,
        _req: &mut Request<Body>,
        _result: &mut Result<Response<Body>, E>,
    ) -> Option<Self::Future> {
        None
    }

    fn clone_request(&mut self, req: &Request<Body>) -> Option<Request<Body>> {
        let mut r = Request::new(req.body().clone());
        *r.uri_mut() = req.uri().clone();
        *r.headers_mut() = req.headers().clone();
        Some(r)
    }
}

/// `iters` sequential ready + call + await on one task; the response is dropped at once.
fn run<S, R>(
    rt: &tokio::runtime::Runtime,
    make: impl FnOnce() -> S,
    mk_req: fn() -> Request<Body>,
    iters: u64,
) -> Duration
where
    S: Service<Request<Body>, Response = R>,
    S::Error: std::fmt::Debug,
{
    rt.block_on(async move {
        let mut svc = make();
        let start = Instant::now();
        for _ in 0..iters {
            let r = svc.ready().await.unwrap().call(mk_req()).await.unwrap();
            std::hint::black_box(r);
        }
        start.elapsed()
    })
}

/// The only way to share tower's rate limit across clones: `ConcurrencyLimit` > `Retry` >
/// `Buffer` > `RateLimit`, over `inner`.
fn tower_shared<S>(
    inner: S,
) -> impl Service<Request<Body>, Response = Response<Body>, Error: std::fmt::Debug>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send,
{
    ServiceBuilder::new()
        .concurrency_limit(1000)
        .layer(tower::retry::RetryLayer::new(Never))
        .buffer(1024)
        .rate_limit(u64::MAX / 4, Duration::from_secs(60))
        .service(inner)
}

/// The full tower-quota stack, in the recommended order (retry > budget > adaptive concurrency >
/// Retry-After), with limits that never bind, over `inner`.
fn full_stack<S>(inner: S) -> impl Service<Request<Body>, Response: Sized, Error: std::fmt::Debug>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone,
{
    ServiceBuilder::new()
        .layer(BackoffRetryLayer::new())
        .layer(TokenBudgetLayer::new(big()))
        .layer(ConcurrencyLimitLayer::adaptive(Aimd::default()))
        .layer(RetryAfterLayer::new())
        .service(inner)
}

fn big() -> Limits {
    Limits::new()
        .rpm(u64::MAX / 4)
        .itpm(u64::MAX / 4)
        .otpm(u64::MAX / 4)
        .tpm(u64::MAX / 4)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("overhead");
    g.bench_function("bare_service_fn", |b| {
        b.iter_custom(|n| run(&rt, || service_fn(ok), req, n))
    });
    g.bench_function("tower_retry_never", |b| {
        b.iter_custom(|n| {
            run(
                &rt,
                || tower::retry::RetryLayer::new(Never).layer(service_fn(ok)),
                req,
                n,
            )
        })
    });
    g.bench_function("tower_concurrency_limit", |b| {
        b.iter_custom(|n| {
            run(
                &rt,
                || tower::limit::ConcurrencyLimitLayer::new(1000).layer(service_fn(ok)),
                req,
                n,
            )
        })
    });
    g.bench_function("tower_shared_stack", |b| {
        b.iter_custom(|n| {
            let _guard = rt.enter();
            run(&rt, || tower_shared(service_fn(ok)), req, n)
        })
    });
    g.bench_function("tower_buffer_rate_limit", |b| {
        b.iter_custom(|n| {
            let _guard = rt.enter();
            run(
                &rt,
                || {
                    ServiceBuilder::new()
                        .buffer(1024)
                        .rate_limit(u64::MAX / 4, Duration::from_secs(60))
                        .service(service_fn(ok))
                },
                req,
                n,
            )
        })
    });
    g.bench_function("retry_after", |b| {
        b.iter_custom(|n| run(&rt, || RetryAfterLayer::new().layer(service_fn(ok)), req, n))
    });
    g.bench_function("backoff_retry", |b| {
        b.iter_custom(|n| {
            run(
                &rt,
                || BackoffRetryLayer::new().layer(service_fn(ok)),
                req,
                n,
            )
        })
    });
    g.bench_function("concurrency_fixed", |b| {
        b.iter_custom(|n| {
            run(
                &rt,
                || ConcurrencyLimitLayer::fixed(1000).layer(service_fn(ok)),
                req,
                n,
            )
        })
    });
    g.bench_function("concurrency_adaptive", |b| {
        b.iter_custom(|n| {
            run(
                &rt,
                || ConcurrencyLimitLayer::adaptive(Aimd::default()).layer(service_fn(ok)),
                req,
                n,
            )
        })
    });
    g.bench_function("token_budget_cost_given", |b| {
        b.iter_custom(|n| {
            run(
                &rt,
                || TokenBudgetLayer::new(big()).layer(service_fn(ok)),
                req_with_cost,
                n,
            )
        })
    });
    g.bench_function("token_budget_json_estimate", |b| {
        b.iter_custom(|n| {
            run(
                &rt,
                || TokenBudgetLayer::new(big()).layer(service_fn(ok)),
                req,
                n,
            )
        })
    });
    // The full stack, in the recommended order; with the JSON estimate, and with a given cost.
    for (name, mk_req) in [
        ("full_stack", req as fn() -> Request<Body>),
        ("full_stack_cost_given", req_with_cost),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|n| run(&rt, || full_stack(service_fn(ok)), mk_req, n))
        });
    }
    // The same with the headers every real Anthropic answer carries (the layers read them; tower's
    // do not).
    g.bench_function("headers/bare_service_fn", |b| {
        b.iter_custom(|n| run(&rt, with_headers, req, n))
    });
    g.bench_function("headers/tower_shared_stack", |b| {
        b.iter_custom(|n| {
            let _guard = rt.enter();
            run(&rt, || tower_shared(with_headers()), req, n)
        })
    });
    g.bench_function("headers/full_stack", |b| {
        b.iter_custom(|n| run(&rt, || full_stack(with_headers()), req, n))
    });
    g.bench_function("messages_estimator_alone", |b| {
        let e = MessagesEstimator::default();
        let (headers, ext) = (http::HeaderMap::new(), http::Extensions::new());
        b.iter(|| e.estimate(&headers, &ext, Some(std::hint::black_box(JSON.as_bytes()))))
    });
    g.finish();

    // A new key a call, against a store with room and against a store at its bound whose
    // partitions are all idle (each new key forgets one): the bound must not make new keys slow.
    let mut g = c.benchmark_group("memory_store_new_key");
    let limits = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
    let scope = |n: u64| {
        [Scope {
            partition: PartitionKey::fingerprint(&n.to_le_bytes()),
            limits,
        }]
    };
    // 1000 new keys a batch, on a fresh store each batch: empty, or at its bound of 10 000 with
    // every partition idle (each new key forgets one).
    for (name, prefill) in [("empty_x1000", 0u64), ("full_x1000", 10_000)] {
        g.bench_function(name, |b| {
            let _guard = rt.enter();
            b.iter_batched(
                || {
                    let store = MemoryStore::new(10_000);
                    for n in 0..prefill {
                        // Reserve nothing: the partition is tracked, and idle at once.
                        store.reserve_now(&scope(u64::MAX - n), Cost::default());
                    }
                    store
                },
                |store| {
                    for n in 0..1000 {
                        std::hint::black_box(store.reserve_now(&scope(n), Cost::new(10, 10)));
                    }
                    store
                },
                criterion::BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
