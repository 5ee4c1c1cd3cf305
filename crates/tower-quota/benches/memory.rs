//! Memory per queued waiter and per tracked partition, counted by dhat's allocator.
//!
//! Run with: `cargo bench -p tower-quota --bench memory`
//!
//! Each figure is the heap growth while N waiters (or partitions) exist, divided by N, with the
//! requests' own bytes reported apart (a waiter holds its request).
#![allow(missing_docs)]

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use std::future::{Pending, pending};
use tower::{Layer, ServiceBuilder, ServiceExt, service_fn};
use tower_quota::budget::store::{BudgetStore, Scope};
use tower_quota::budget::{Cost, Limits, MemoryStore, TokenBudgetLayer};
use tower_quota::concurrency::Aimd;
use tower_quota::concurrency::ConcurrencyLimitLayer;
use tower_quota::partition::PartitionKey;
use tower_quota::retry::BackoffRetryLayer;
use tower_quota::retry_after::RetryAfterLayer;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const N: usize = 100_000;

type Body = Full<Bytes>;

fn heap() -> usize {
    dhat::HeapStats::get().curr_bytes
}

fn req(key: &str) -> Request<Body> {
    let mut r = Request::builder()
        .header("x-api-key", key)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    r.extensions_mut().insert(Cost::new(10, 10));
    r
}

fn never(_: Request<Body>) -> Pending<Result<Response<Body>, std::io::Error>> {
    pending()
}

fn report(what: &str, bytes: usize, n: usize) {
    println!(
        "{what:<48} {:>8.0} bytes each ({n} of them)",
        bytes as f64 / n as f64
    );
}

fn main() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        // The requests alone.
        let before = heap();
        let reqs: Vec<_> = (0..N).map(|_| req("sk-mem")).collect();
        report(
            "a request (2 headers, 2-byte body, a Cost)",
            heap() - before,
            N,
        );
        drop(reqs);

        // Waiters queued at the token budget (an empty bucket: one request a minute).
        let layer = TokenBudgetLayer::new(
            Limits::new()
                .rpm(1)
                .itpm(1_000_000)
                .otpm(1_000_000)
                .tpm(1_000_000),
        )
        // 100 000 waiters of one key: past the default bound of 10 000.
        .max_queue(2 * N);
        let svc = layer.layer(service_fn(never));
        let mut first = tokio_test::task::spawn(svc.clone().oneshot(req("sk-mem")));
        let _ = first.poll();
        let before = heap();
        let mut waiters: Vec<_> = (0..N)
            .map(|_| tokio_test::task::spawn(svc.clone().oneshot(req("sk-mem"))))
            .collect();
        for w in &mut waiters {
            assert!(w.poll().is_pending());
        }
        report("token budget waiter (request included)", heap() - before, N);
        drop(waiters);

        // Waiters queued at the concurrency limit.
        let svc = ConcurrencyLimitLayer::fixed(1)
            .max_queue(2 * N)
            .layer(service_fn(never));
        let mut first = tokio_test::task::spawn(svc.clone().oneshot(req("sk-mem")));
        let _ = first.poll();
        let before = heap();
        let mut waiters: Vec<_> = (0..N)
            .map(|_| tokio_test::task::spawn(svc.clone().oneshot(req("sk-mem"))))
            .collect();
        for w in &mut waiters {
            assert!(w.poll().is_pending());
        }
        report(
            "concurrency limit waiter (request included)",
            heap() - before,
            N,
        );
        drop(waiters);

        // Waiters at a closed Retry-After gate.
        let gate = RetryAfterLayer::new().max_queue(2 * N);
        let closing = gate.clone().layer(service_fn(|_: Request<Body>| async {
            Ok::<_, std::io::Error>(
                Response::builder()
                    .status(429)
                    .header("retry-after", "60")
                    .body(Body::default())
                    .unwrap(),
            )
        }));
        closing.oneshot(req("sk-mem")).await.unwrap();
        let svc = gate.layer(service_fn(never));
        let before = heap();
        let mut waiters: Vec<_> = (0..N)
            .map(|_| tokio_test::task::spawn(svc.clone().oneshot(req("sk-mem"))))
            .collect();
        for w in &mut waiters {
            assert!(w.poll().is_pending());
        }
        report(
            "Retry-After gate waiter (request included)",
            heap() - before,
            N,
        );
        drop(waiters);

        // Partitions tracked by the in-memory store (three buckets each).
        let store = MemoryStore::new(2 * N);
        let limits = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
        let before = heap();
        for i in 0..N as u64 {
            let scopes = [Scope {
                partition: PartitionKey::from_u64(2 * i + 1),
                limits,
            }];
            let _ = store.reserve(&scopes, Cost::new(10, 10)).await;
        }
        report("partition in the MemoryStore", heap() - before, N);

        // Partitions tracked by the budget layer (its queue map) and by a per-partition limit.
        let budget = TokenBudgetLayer::new(limits)
            .max_partitions(2 * N)
            .store(MemoryStore::new(2 * N));
        let svc = budget.layer(service_fn(|_: Request<Body>| async {
            Ok::<_, std::io::Error>(Response::new(Body::default()))
        }));
        let keys: Vec<String> = (0..N).map(|i| format!("sk-{i}")).collect();
        let before = heap();
        for k in &keys {
            drop(svc.clone().oneshot(req(k)).await.unwrap());
        }
        report(
            "partition in the budget layer (queue + store)",
            heap() - before,
            N,
        );
        let conc = ConcurrencyLimitLayer::fixed(4).per_partition(2 * N);
        let svc = conc.layer(service_fn(|_: Request<Body>| async {
            Ok::<_, std::io::Error>(Response::new(Body::default()))
        }));
        let before = heap();
        for k in &keys {
            drop(svc.clone().oneshot(req(k)).await.unwrap());
        }
        report(
            "partition in a per-partition concurrency limit",
            heap() - before,
            N,
        );

        // Allocations a request makes through each layer alone and the recommended stack, beyond
        // those of building it and of the bare service: the overhead is mostly these.
        let ok =
            |_: Request<Body>| async { Ok::<_, std::io::Error>(Response::new(Body::default())) };
        let bare = allocations(service_fn(ok)).await;
        println!(
            "{:<48} {bare:>8.1} allocations a request",
            "bare service_fn (the request built)"
        );
        let rows = [
            (
                "backoff retry",
                allocations(BackoffRetryLayer::new().layer(service_fn(ok))).await,
            ),
            (
                "token budget, cost given",
                allocations(
                    TokenBudgetLayer::new(Limits::new().rpm(u64::MAX / 4)).layer(service_fn(ok)),
                )
                .await,
            ),
            (
                "concurrency limit, adaptive",
                allocations(ConcurrencyLimitLayer::adaptive(Aimd::default()).layer(service_fn(ok)))
                    .await,
            ),
            (
                "Retry-After gate",
                allocations(RetryAfterLayer::new().layer(service_fn(ok))).await,
            ),
            (
                "full stack, cost given",
                allocations(
                    ServiceBuilder::new()
                        .layer(BackoffRetryLayer::new())
                        .layer(TokenBudgetLayer::new(Limits::new().rpm(u64::MAX / 4)))
                        .layer(ConcurrencyLimitLayer::adaptive(Aimd::default()))
                        .layer(RetryAfterLayer::new())
                        .service(service_fn(ok)),
                )
                .await,
            ),
        ];
        for (what, n) in rows {
            println!("{what:<48} {:>8.1} allocations a request more", n - bare);
        }
    });
}

/// Heap allocations per request through `svc`, the request's own building included (averaged
/// over 10 000 sequential requests after 100 to warm up).
async fn allocations<S, R>(mut svc: S) -> f64
where
    S: tower::Service<Request<Body>, Response = Response<R>>,
    S::Error: std::fmt::Debug,
{
    const M: u64 = 10_000;
    let mut before = 0;
    // 100 to warm up (first clones, first partition), then the measured ones.
    for (n, measured) in [(100, false), (M, true)] {
        if measured {
            before = dhat::HeapStats::get().total_blocks;
        }
        for _ in 0..n {
            let res = svc.ready().await.unwrap().call(req("sk-alloc")).await;
            drop(res.unwrap());
        }
    }
    (dhat::HeapStats::get().total_blocks - before) as f64 / M as f64
}
