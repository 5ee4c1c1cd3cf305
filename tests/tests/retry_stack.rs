//! BackoffRetryLayer over RetryAfterLayer over the in-process simulator, under paused time.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use std::time::Duration;
use tokio::task::JoinSet;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_quota::BoxError;
use tower_quota::retry::{BackoffRetryLayer, RetryReport};
use tower_quota::retry_after::RetryAfterLayer;
use tower_quota_sim::{Limits, MessagesRequest, RetryAfterStyle, SimConfig, Simulator};

fn request(key: &str) -> Request<Full<Bytes>> {
    Request::post("/v1/messages")
        .header("x-api-key", key)
        .body(Full::new(
            MessagesRequest::user("claude-sim", "Hello", 16).to_bytes(),
        ))
        .unwrap()
}

fn rpm(n: u64) -> Limits {
    Limits {
        rpm: Some(n),
        ..Limits::unlimited()
    }
}

/// Runs `n` concurrent calls through `svc`; returns (successes, typed errors).
async fn burst<S>(svc: S, n: usize, key: &'static str) -> (usize, usize)
where
    S: Service<Request<Full<Bytes>>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send + 'static,
{
    let mut set = JoinSet::new();
    for _ in 0..n {
        let svc = svc.clone();
        set.spawn(async move { svc.oneshot(request(key)).await });
    }
    let (mut ok, mut err) = (0, 0);
    while let Some(r) = set.join_next().await {
        match r.unwrap() {
            Ok(_) => ok += 1,
            Err(_) => err += 1,
        }
    }
    (ok, err)
}

#[tokio::test(start_paused = true)]
async fn fifty_tasks_send_nothing_during_a_ten_second_cooldown() {
    // 6 RPM: a full bucket of 6, then one request every 10 s, announced as `retry-after: 10`.
    let sim = Simulator::new(SimConfig::new(rpm(6)));
    let svc = ServiceBuilder::new()
        .layer(
            BackoffRetryLayer::new()
                .seed(1)
                .max_retries(20)
                .no_retry_budget(),
        )
        .layer(RetryAfterLayer::new().seed(2))
        .service(sim.clone());

    let (ok, err) = burst(svc, 50, "sk-cooldown").await;
    assert_eq!(ok + err, 50, "every call ends");
    assert_eq!(err, 0);

    let audit = sim.audit();
    let summary = sim.summary();
    assert_eq!(summary.total.early_arrivals, 0, "{summary:?}");
    // Nothing reaches the server between the first wave (t = 0) and the end of the cooldown.
    let first_cooldown = audit
        .iter()
        .filter(|r| r.arrival > Duration::from_millis(100) && r.arrival < Duration::from_secs(10))
        .count();
    assert_eq!(first_cooldown, 0);
    assert_eq!(summary.total.ok, 50);
}

#[tokio::test(start_paused = true)]
async fn every_hint_style_is_honoured_by_the_stack() {
    for style in [
        RetryAfterStyle::Seconds,
        RetryAfterStyle::Ms,
        RetryAfterStyle::HttpDate,
    ] {
        let sim = Simulator::new(SimConfig::new(rpm(60)).with_retry_after(style));
        let svc = ServiceBuilder::new()
            .layer(
                BackoffRetryLayer::new()
                    .seed(3)
                    .max_retries(30)
                    .no_retry_budget(),
            )
            .layer(RetryAfterLayer::new().seed(4))
            .service(sim.clone());
        let (ok, err) = burst(svc, 100, "sk-styles").await;
        assert_eq!((ok, err), (100, 0), "{style:?}");
        let s = sim.summary();
        assert_eq!(s.total.early_arrivals, 0, "{style:?}: {s:?}");
        assert_eq!(s.total.ok, 100);
    }
}

#[tokio::test(start_paused = true)]
async fn the_gate_alone_protects_every_caller() {
    let sim = Simulator::new(SimConfig::new(rpm(6)));
    let gate = ServiceBuilder::new()
        .layer(RetryAfterLayer::new())
        .service(sim.clone());
    // Use up the bucket, then get the 429 that closes the gate.
    for _ in 0..7 {
        gate.clone().oneshot(request("sk-alone")).await.unwrap();
    }
    tokio::time::advance(Duration::from_secs(1)).await;
    // Twenty more callers, each sending once, no retry layer: they wait at the gate.
    let (ok, err) = burst(gate, 20, "sk-alone").await;
    assert_eq!(ok + err, 20);
    let s = sim.summary();
    assert_eq!(s.total.early_arrivals, 0, "{s:?}");
    let t = sim.audit().iter().skip(7).map(|r| r.arrival).min().unwrap();
    assert!(t >= Duration::from_secs(10), "{t:?}");
}

#[tokio::test(start_paused = true)]
async fn a_retried_call_reports_its_attempts_and_the_stack_never_multiplies_them() {
    let sim = Simulator::new(SimConfig::new(rpm(1)).with_retry_after(RetryAfterStyle::Ms));
    let retry = BackoffRetryLayer::new()
        .seed(5)
        .max_retries(3)
        .no_retry_budget();
    let stats = retry.handle();
    let svc = ServiceBuilder::new()
        .layer(retry)
        .layer(RetryAfterLayer::new())
        .service(sim.clone());
    svc.clone().oneshot(request("sk-one")).await.unwrap();
    let res = svc.oneshot(request("sk-one")).await.unwrap();
    assert_eq!(res.status(), 200);
    let report = res.extensions().get::<RetryReport>().unwrap();
    assert_eq!(report.attempts, 2);
    // One 429, then the gate's instant: the server saw exactly three requests.
    assert_eq!(sim.summary().total.requests, 3);
    assert_eq!(stats.retries(), 1);
}
