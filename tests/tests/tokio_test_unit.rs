//! How to unit-test your own pipeline: tokio-test for polling by hand, the in-process simulator as
//! the server, and paused time so minutes of rate limiting pass in milliseconds.
//!
//! Copy from here. Each test builds the pipeline it checks, drives it, and asserts what the server
//! saw through the simulator's audit.

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use std::time::Duration;
use tokio::time::{Instant, advance};
use tokio_test::{assert_pending, assert_ready_ok, task};
use tower::{ServiceBuilder, ServiceExt};
use tower_quota::budget::{Limits, TokenBudgetLayer};
use tower_quota::retry::BackoffRetryLayer;
use tower_quota::retry_after::RetryAfterLayer;
use tower_quota::{Preset, ServiceBuilderExt};
use tower_quota_sim::{Limits as SimLimits, MessagesRequest, SimConfig, Simulator};

fn ask(key: &str) -> Request<Full<Bytes>> {
    Request::post("/v1/messages")
        .header("x-api-key", key)
        .body(Full::new(MessagesRequest::user("m", "hi", 16).to_bytes()))
        .unwrap()
}

fn one_a_second() -> SimLimits {
    SimLimits {
        rpm: Some(60),
        ..SimLimits::unlimited()
    }
}

/// The budget holds the 61st request of a minute until the bucket has refilled one second's worth.
#[tokio::test(start_paused = true)]
async fn the_budget_holds_a_request_until_the_quota_refills() {
    let sim = Simulator::new(SimConfig::new(one_a_second()));
    let svc = ServiceBuilder::new()
        .layer(TokenBudgetLayer::new(Limits::new().rpm(60)))
        .service(sim.clone());
    for _ in 0..60 {
        svc.clone().oneshot(ask("sk-unit")).await.unwrap();
    }
    let mut waiting = task::spawn(svc.clone().oneshot(ask("sk-unit")));
    assert_pending!(waiting.poll());
    advance(Duration::from_millis(999)).await;
    assert_pending!(waiting.poll());
    advance(Duration::from_millis(1)).await;
    // The timer fired: the request left. Give the simulator its 20 ms of latency.
    assert_pending!(waiting.poll());
    advance(Duration::from_millis(20)).await;
    let res = assert_ready_ok!(waiting.poll());
    assert_eq!(res.status(), 200);
    assert_eq!(sim.summary().total.rate_limited, 0);
}

/// After a 429, every caller of the key waits for the server's Retry-After; the audit proves no
/// request arrived early.
#[tokio::test(start_paused = true)]
async fn callers_wait_for_retry_after_and_none_arrives_early() {
    let sim =
        Simulator::new(SimConfig::new(one_a_second()).with_latency(Duration::ZERO, Duration::ZERO));
    let svc = ServiceBuilder::new()
        .layer(RetryAfterLayer::new().seed(1))
        .service(sim.clone());
    for _ in 0..60 {
        svc.clone().oneshot(ask("sk-unit")).await.unwrap();
    }
    // The 61st is refused; the gate closes for the announced second.
    let res = svc.clone().oneshot(ask("sk-unit")).await.unwrap();
    assert_eq!(res.status(), 429);
    let mut next = task::spawn(svc.clone().oneshot(ask("sk-unit")));
    assert_pending!(next.poll());
    assert_eq!(sim.summary().total.requests, 61, "held at the gate");
    advance(Duration::from_millis(1100)).await; // the second plus the gate's jitter bound
    let res = assert_ready_ok!(next.poll());
    assert_eq!(res.status(), 200);
    assert_eq!(sim.summary().total.early_arrivals, 0);
}

/// The whole preset under paused time: a five-minute burst runs in a blink, with no 429.
#[tokio::test(start_paused = true)]
async fn the_preset_paces_a_long_burst() {
    let sim = Simulator::new(SimConfig::new(one_a_second()));
    let svc = ServiceBuilder::new()
        .quota_stack(Preset::anthropic(Limits::new().rpm(60)))
        .service(sim.clone());
    let start = Instant::now();
    for _ in 0..300 {
        let res = svc.clone().oneshot(ask("sk-unit")).await.unwrap();
        res.into_body().collect().await.unwrap();
    }
    // 60 at once, then 240 at one a second: four minutes of virtual time.
    assert!(start.elapsed() >= Duration::from_secs(239));
    let audit = sim.summary();
    assert_eq!((audit.total.ok, audit.total.rate_limited), (300, 0));
}

/// Retries under a fault: a server that resets one connection in five still serves every request.
#[tokio::test(start_paused = true)]
async fn retries_ride_out_connection_resets() {
    let faults = tower_quota_sim::Faults {
        reset: 0.2,
        ..Default::default()
    };
    let sim = Simulator::new(
        SimConfig::new(SimLimits::unlimited())
            .with_faults(faults)
            .with_seed(7),
    );
    let svc = ServiceBuilder::new()
        .layer(BackoffRetryLayer::new().seed(3))
        .service(sim.clone());
    for _ in 0..50 {
        assert_eq!(
            svc.clone().oneshot(ask("sk-unit")).await.unwrap().status(),
            200
        );
    }
    assert!(sim.summary().total.resets > 0);
}
