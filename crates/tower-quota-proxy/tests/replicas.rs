//! Three quota-proxy replicas in front of one upstream, one key, a round-robin client: with their
//! budgets in one Redis they hold the key's quota together; each with its own memory budget they
//! admit about three times it.

#[path = "../../tower-quota-redis/tests/support/mod.rs"]
mod support;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;
use tower_quota::budget::{Limit, Limits};
use tower_quota_proxy::{Config, app, serve};
use tower_quota_sim::{MessagesRequest, SimConfig, Simulator};

const REQUESTS: usize = 160;

/// Sends `REQUESTS` at once, round-robin over three proxies in front of a fresh simulator holding
/// 1 200 requests a minute as a bucket of 60. Returns what the simulator saw: (ok, 429s, the
/// share of the quota used between the first arrival and the last).
async fn run(redis: Option<String>) -> (u64, u64, f64) {
    let sim = Simulator::new(SimConfig::new(tower_quota_sim::Limits {
        burst_fraction: 60.0 / 1200.0,
        ..tower_quota_sim::Limits::new(1200, 100_000_000, 100_000_000)
    }));
    let upstream = tower_quota_sim::serve(sim.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut bases = Vec::new();
    for _ in 0..3 {
        let mut config = Config::new(upstream.base_url().parse().unwrap());
        // Under the server's limit by a margin for the trip from admission to the server: a
        // request admitted at t arrives at t + d, and d varies with the load (the wait for a
        // slot, the gate, the hop). A sequence paced to (rate r, burst b) and delayed by 0..D
        // arrives paced to (r, b + r * D) at most: a burst 6 under the server's absorbs 300 ms of
        // jitter at 20 a second. With 2 (98 %), a loaded CI machine met one 429 in 161 calls.
        config.limits = Limits {
            requests: Some(Limit {
                per_minute: 1140,
                burst: Some(54),
            }),
            ..Limits::new()
        };
        config.redis = redis.clone();
        let proxy = app(config).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        bases.push(format!("http://{}", listener.local_addr().unwrap()));
        tokio::spawn(serve(
            listener,
            proxy.router,
            std::future::pending(),
            Duration::ZERO,
        ));
    }
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..REQUESTS {
        let body = MessagesRequest::user("claude-sonnet-5-5", format!("Q{i}"), 16).to_bytes();
        let req = http::Request::post(format!("{}/v1/messages", bases[i % 3]))
            .header("x-api-key", "sk-replicas")
            .body(Full::new(body))
            .unwrap();
        let client = client.clone();
        tasks.spawn(async move {
            let res = client.request(req).await.unwrap();
            let status = res.status();
            res.into_body().collect().await.unwrap();
            status
        });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(
            status.unwrap(),
            200,
            "every caller is answered 200 in the end"
        );
    }
    let summary = sim.summary();
    upstream.shutdown().await;
    let quota = 60.0 + 20.0 * summary.span_s;
    (
        summary.total.ok,
        summary.total.rate_limited,
        summary.total.ok as f64 / quota,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_sharing_redis_hold_one_keys_quota() {
    let redis = support::RedisServer::start().await;
    let (ok, limited, used) = run(Some(redis.url())).await;
    let (alone_ok, alone_limited, _) = run(None).await;
    eprintln!(
        "shared Redis: {ok} ok, {limited} 429s, {:.1} % of the quota used; memory each: \
         {alone_ok} ok, {alone_limited} 429s",
        used * 100.0
    );
    assert_eq!(ok, REQUESTS as u64);
    // Together they never sent more than the key's quota: the server refused nothing.
    assert_eq!(limited, 0, "replicas sharing Redis met {limited} 429s");
    // Each alone believes it owns the whole burst of 60 (the adaptive limits and the gates,
    // which pause each replica after its first 429s, keep the excess from reaching 3x): the
    // server refuses what they send over the quota.
    assert!(
        alone_limited >= 20,
        "memory budgets met only {alone_limited} 429s"
    );
}
