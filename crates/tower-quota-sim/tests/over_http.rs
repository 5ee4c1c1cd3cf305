//! The simulator as a real HTTP server on loopback, driven by hyper-util's client.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use tower_quota::classify::{Classify, DefaultClassifier, Outcome};
use tower_quota::signals::{Bucket, Signals};
use tower_quota_sim::{Faults, Limits, MessagesRequest, SimConfig, Simulator, serve};

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn messages(base: &str, stream: bool) -> Request<Full<Bytes>> {
    let mut m = MessagesRequest::user("claude-sim", "Hello over HTTP", 16);
    m.stream = stream;
    Request::post(format!("{base}/v1/messages"))
        .header("x-api-key", "sk-loopback")
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(Full::new(m.to_bytes()))
        .unwrap()
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test]
async fn admits_limits_streams_and_audits_over_loopback() {
    let limits = Limits {
        rpm: Some(3),
        ..Limits::unlimited()
    };
    let server = serve(Simulator::new(SimConfig::new(limits)), loopback())
        .await
        .unwrap();
    let base = server.base_url();
    let client = client();

    let res = client.request(messages(&base, false)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers().contains_key("date"));
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["usage"]["output_tokens"], 16);

    let res = client.request(messages(&base, true)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(
        std::str::from_utf8(&body)
            .unwrap()
            .contains("event: message_stop")
    );

    client.request(messages(&base, false)).await.unwrap();
    let mut res = client.request(messages(&base, false)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let s = Signals::of(&mut res);
    // 3 RPM: one request every 20 s.
    assert!(s.hint().unwrap().delay.as_secs() >= 19);
    assert_eq!(s.bucket(Bucket::Requests).remaining, Some(0));

    let res = client
        .request(
            Request::get(format!("{base}/__audit"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["requests"], 4);
    assert_eq!(v["ok"], 3);
    assert_eq!(v["rate_limited"], 1);
    // The raw key is nowhere in the audit.
    assert!(!String::from_utf8_lossy(&body).contains("sk-loopback"));
    server.shutdown().await;
}

#[tokio::test]
async fn a_simulated_reset_reaches_the_client_as_a_transport_error() {
    let cfg = SimConfig::new(Limits::unlimited()).with_faults(Faults {
        reset: 1.0,
        ..Faults::default()
    });
    let server = serve(Simulator::new(cfg), loopback()).await.unwrap();
    let err = client()
        .request(messages(&server.base_url(), false))
        .await
        .unwrap_err();
    let v = DefaultClassifier.classify_error(&err);
    assert!(
        matches!(v.outcome, Outcome::Transport(_)),
        "{err:?} -> {v:?}"
    );
    assert!(v.retryable);
    assert_eq!(server.simulator().summary().total.resets, 1);
    server.shutdown().await;
}
