//! The default classifier's judgement of everything the simulator can answer, end to end.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use std::time::Duration;
use tower::ServiceExt;
use tower_quota::classify::{Classification, Classify, DefaultClassifier, Outcome, TransportKind};
use tower_quota_sim::{Faults, Limits, MessagesRequest, SimConfig, Simulator};

async fn classify(cfg: SimConfig, requests: usize) -> Classification {
    let sim = Simulator::new(cfg);
    let mut last = None;
    for _ in 0..requests {
        let body = MessagesRequest::user("m", "hello", 10).to_bytes();
        let req = Request::post("/v1/messages")
            .header("x-api-key", "k")
            .body(Full::<Bytes>::new(body))
            .unwrap();
        last = Some(match sim.clone().oneshot(req).await {
            Ok(res) => DefaultClassifier.classify_response(res.status(), res.headers()),
            Err(e) => DefaultClassifier.classify_error(&*e),
        });
    }
    last.unwrap()
}

#[tokio::test(start_paused = true)]
async fn every_simulated_answer_is_judged_as_the_sdks_would() {
    let unlimited = || SimConfig::new(Limits::unlimited());
    let faults = |f: Faults| unlimited().with_faults(f);
    let cases = [
        (unlimited(), 1, Outcome::Success, false),
        (
            SimConfig::new(Limits {
                rpm: Some(1),
                ..Limits::unlimited()
            }),
            2,
            Outcome::RateLimited,
            true,
        ),
        (
            faults(Faults {
                overload: 1.0,
                ..Faults::default()
            }),
            1,
            Outcome::Overloaded,
            true,
        ),
        (
            faults(Faults {
                server_error: 1.0,
                ..Faults::default()
            }),
            1,
            Outcome::ServerError,
            true,
        ),
        (
            faults(Faults {
                reset: 1.0,
                ..Faults::default()
            }),
            1,
            Outcome::Transport(TransportKind::Reset),
            true,
        ),
        (
            {
                let mut c = unlimited();
                c.context_window = 3;
                c
            },
            1,
            Outcome::Fatal,
            false,
        ),
    ];
    for (cfg, n, outcome, retryable) in cases {
        let label = format!("{:?}", cfg.faults);
        let got = classify(
            cfg.with_latency(Duration::from_millis(1), Duration::ZERO),
            n,
        )
        .await;
        assert_eq!(got, Classification { outcome, retryable }, "{label}");
    }
}
