//! The full stack over reqwest against the simulated API on a loopback port (real sockets, so real
//! time: the simulator's latency is 20 ms).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt};
use tower_quota::budget::{Limit, Limits, ReservationHandle};
use tower_quota::{Preset, ServiceBuilderExt};
use tower_quota_reqwest::ReqwestService;
use tower_quota_sim::{MessagesRequest, SimConfig, Simulator};

fn request(base: &str, stream: bool, max_tokens: u64) -> http::Request<Full<Bytes>> {
    let mut body = MessagesRequest::user("claude-sonnet-5-5", "Summarise the plot.", max_tokens);
    body.stream = stream;
    http::Request::post(format!("{base}/v1/messages"))
        .header("x-api-key", "sk-reqwest-test")
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(Full::new(body.to_bytes()))
        .unwrap()
}

#[tokio::test]
async fn a_streamed_response_through_reqwest_settles_its_reservation_when_the_stream_ends() {
    // The model writes a quarter of max_tokens: the reservation (400) must come down to 100.
    let sim = Simulator::new(SimConfig::default().with_output_fraction(0.25));
    let server = tower_quota_sim::serve(sim, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let api = ServiceBuilder::new()
        .quota_stack(Preset::anthropic(
            Limits::new().rpm(50).itpm(30_000).otpm(8_000),
        ))
        .service(ReqwestService::new(reqwest::Client::new()));

    let res = api
        .oneshot(request(&server.base_url(), true, 400))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let reservation = res.extensions().get::<ReservationHandle>().unwrap().clone();
    assert_eq!(reservation.estimate().output_tokens, 400);
    assert_eq!(
        reservation.settled(),
        None,
        "settled before the stream ended"
    );

    let text = res.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(text.to_vec()).unwrap();
    assert!(text.contains("event: message_stop"), "{text}");
    let settled = reservation
        .settled()
        .expect("settled at the end of the stream");
    assert_eq!(settled.output_tokens, 100, "{settled:?}");
    assert_eq!(settled.requests, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn a_burst_through_reqwest_under_the_stack_meets_no_429() {
    // 40 requests at once against 1 200 requests a minute held as the real API holds them: a
    // bucket of 10 refilled at 20 a second. Unpaced, 30 of them would meet a 429; the stack paces
    // them (about 1.5 s) and the server never says 429.
    let sim_limits = tower_quota_sim::Limits {
        burst_fraction: 10.0 / 1200.0,
        ..tower_quota_sim::Limits::new(1200, 4_000_000, 800_000)
    };
    let sim = Simulator::new(SimConfig::new(sim_limits));
    let server = tower_quota_sim::serve(sim.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut limits = Limits::new().itpm(4_000_000).otpm(800_000);
    limits.requests = Some(Limit {
        per_minute: 1200,
        burst: Some(10),
    });
    let api = ServiceBuilder::new()
        .quota_stack(Preset::anthropic(limits))
        .service(ReqwestService::new(reqwest::Client::new()));
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let api = api.clone();
        let req = request(&server.base_url(), false, 64);
        tasks.push(tokio::spawn(async move {
            let res = api.oneshot(req).await.unwrap();
            let status = res.status();
            res.into_body().collect().await.unwrap();
            status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let total = sim.summary().total;
    assert_eq!(total.rate_limited, 0, "{total:?}");
    assert_eq!(total.ok, 40, "{total:?}");
    server.shutdown().await;
}
