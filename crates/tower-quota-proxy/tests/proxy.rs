//! quota-proxy against bad upstreams and bad clients: a clear error to the caller, nothing leaked,
//! and the proxy keeps serving.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;
use tower_quota_proxy::{Config, Proxy, app, serve};
use tower_quota_sim::{MessagesRequest, SimConfig, Simulator};

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Starts a proxy for `config` on a loopback port: its base URL and its handles.
async fn start(config: Config) -> (String, Proxy) {
    let proxy = app(config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(
        listener,
        proxy.router.clone(),
        std::future::pending(),
        Duration::ZERO,
    ));
    (base, proxy)
}

fn messages(base: &str, stream: bool) -> http::Request<Full<Bytes>> {
    let mut body = MessagesRequest::user("claude-sonnet-5-5", "Hello", 64);
    body.stream = stream;
    http::Request::post(format!("{base}/v1/messages"))
        .header("x-api-key", "sk-proxy-test")
        .header("content-type", "application/json")
        .body(Full::new(body.to_bytes()))
        .unwrap()
}

async fn error_type(res: http::Response<hyper::body::Incoming>) -> String {
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(
        !String::from_utf8_lossy(&body).contains("sk-proxy-test"),
        "the key leaked: {}",
        String::from_utf8_lossy(&body)
    );
    v["error"]["type"].as_str().unwrap().to_owned()
}

async fn healthy(base: &str) -> bool {
    let req = http::Request::get(format!("{base}/healthz"))
        .body(Full::default())
        .unwrap();
    client().request(req).await.unwrap().status() == 200
}

/// An upstream that refuses connections: after the stack's retries, a 502 with an
/// Anthropic-shaped `api_error` (paused time: the backoff passes at once).
#[tokio::test(start_paused = true)]
async fn an_upstream_that_refuses_connections_is_a_502() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let upstream = format!("http://127.0.0.1:{port}").parse().unwrap();
    let (base, proxy) = start(Config::new(upstream)).await;
    let res = client().request(messages(&base, false)).await.unwrap();
    assert_eq!(res.status(), 502);
    assert_eq!(error_type(res).await, "api_error");
    assert_eq!(proxy.concurrency.in_flight(), 0);
    assert_eq!(proxy.budget.queued(), 0);
    assert!(healthy(&base).await);
}

/// An upstream that accepts and never answers: each attempt times out, then a 504.
#[tokio::test(start_paused = true)]
async fn an_upstream_that_never_answers_is_a_504() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", silent.local_addr().unwrap())
        .parse()
        .unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let mut config = Config::new(upstream);
    config.attempt_timeout = Duration::from_secs(5);
    let (base, proxy) = start(config).await;
    let res = client().request(messages(&base, false)).await.unwrap();
    assert_eq!(res.status(), 504);
    assert_eq!(error_type(res).await, "api_error");
    assert_eq!(proxy.concurrency.in_flight(), 0);
    assert!(healthy(&base).await);
}

/// A client that hangs up in the middle of a stream: the stream's slot and reservation are given
/// back (the handles read back to idle) and the proxy keeps serving.
#[tokio::test]
async fn a_client_that_disconnects_mid_stream_leaks_nothing() {
    let sim = Simulator::new(
        SimConfig::new(tower_quota_sim::Limits::unlimited())
            .with_latency(Duration::from_millis(5), Duration::from_millis(30)),
    );
    let upstream_server = tower_quota_sim::serve(sim, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let upstream = upstream_server.base_url().parse().unwrap();
    let (base, proxy) = start(Config::new(upstream)).await;
    let res = client().request(messages(&base, true)).await.unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    assert_eq!(
        proxy.concurrency.in_flight(),
        1,
        "the stream holds its slot"
    );
    drop(body); // hang up mid-stream (about 2 s of stream left)
    let mut idle = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if proxy.concurrency.in_flight() == 0 && proxy.budget.queued() == 0 {
            idle = true;
            break;
        }
    }
    assert!(idle, "{:?} {:?}", proxy.concurrency, proxy.budget);
    // And it keeps serving: a whole answer for the next caller.
    let res = client().request(messages(&base, false)).await.unwrap();
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap();
    upstream_server.shutdown().await;
}

/// On shutdown the proxy stops accepting and lets the requests it holds finish: a request in
/// flight to a slow upstream when the signal comes is answered whole.
#[tokio::test]
async fn shutdown_drains_the_requests_in_flight() {
    let sim = Simulator::new(
        SimConfig::new(tower_quota_sim::Limits::unlimited())
            .with_latency(Duration::from_millis(300), Duration::ZERO),
    );
    let upstream_server = tower_quota_sim::serve(sim, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let proxy = app(Config::new(upstream_server.base_url().parse().unwrap()))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let base = format!("http://{addr}");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        listener,
        proxy.router,
        async {
            let _ = stopped.await;
        },
        Duration::from_secs(5),
    ));
    let in_flight = tokio::spawn(client().request(messages(&base, false)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.send(()).unwrap();
    let res = in_flight.await.unwrap().unwrap();
    assert_eq!(res.status(), 200, "answered although the signal came first");
    res.into_body().collect().await.unwrap();
    server.await.unwrap().unwrap();
    // And it no longer accepts.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    upstream_server.shutdown().await;
}

/// The upstream is asked for uncompressed answers (the SDKs send `accept-encoding: gzip`), so the
/// budget can read each answer's usage; the other headers pass through, hop-by-hop ones do not.
#[tokio::test]
async fn the_upstream_gets_the_callers_headers_but_not_its_encodings() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", upstream.local_addr().unwrap());
    let seen = tokio::spawn(async move {
        let (mut s, _) = upstream.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            head.extend_from_slice(&buf[..n]);
        }
        let body = br#"{"type":"message","usage":{"input_tokens":1,"output_tokens":1}}"#;
        let reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(reply.as_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        String::from_utf8_lossy(&head).to_ascii_lowercase()
    });
    let (base, _proxy) = start(Config::new(url.parse().unwrap())).await;
    let mut req = messages(&base, false);
    let h = req.headers_mut();
    h.insert("accept-encoding", "gzip, deflate".parse().unwrap());
    h.insert("anthropic-version", "2023-06-01".parse().unwrap());
    h.insert("connection", "keep-alive, x-hop".parse().unwrap());
    h.insert("x-hop", "per-connection".parse().unwrap());
    let res = client().request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let head = seen.await.unwrap();
    assert!(head.contains("anthropic-version: 2023-06-01"), "{head}");
    assert!(head.contains("x-api-key: sk-proxy-test"), "{head}");
    assert!(!head.contains("accept-encoding"), "{head}");
    assert!(
        !head.contains("x-hop"),
        "a header named in Connection is hop-by-hop: {head}"
    );
}

/// Holding, bounded: past a key's queue bound the proxy answers 429 at once, Anthropic-shaped,
/// with a `retry-after` from its queue and `x-should-retry: true`; the requests within the bound
/// are held and answered 200 in their turn.
#[tokio::test(start_paused = true)]
async fn past_the_queue_bound_a_429_with_retry_after() {
    let sim = Simulator::new(SimConfig::new(tower_quota_sim::Limits::unlimited()));
    let upstream_server = tower_quota_sim::serve(sim, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut config = Config::new(upstream_server.base_url().parse().unwrap());
    // One request a minute (a burst of one), at most two waiting for it.
    config.limits = tower_quota::budget::Limits::new().rpm(1);
    config.max_queue = 2;
    let (base, proxy) = start(config).await;
    let mut calls = Vec::new();
    for _ in 0..4 {
        calls.push(tokio::spawn(client().request(messages(&base, false))));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut statuses = Vec::new();
    for call in calls {
        let res = call.await.unwrap().unwrap();
        if res.status() == 429 {
            let retry_after: u64 = res.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(retry_after >= 1, "{retry_after}");
            assert_eq!(res.headers()["x-should-retry"], "true");
            assert_eq!(error_type(res).await, "rate_limit_error");
            statuses.push(429);
        } else {
            statuses.push(res.status().as_u16());
            res.into_body().collect().await.unwrap();
        }
    }
    statuses.sort_unstable();
    assert_eq!(
        statuses,
        [200, 200, 200, 429],
        "one sent, two held, one refused"
    );
    assert_eq!(proxy.budget.queued(), 0);
    upstream_server.shutdown().await;
}

/// Bad input from a caller: a body that is not JSON and a path the API does not have. Each gets
/// the upstream's own answer (a 400 `invalid_request_error`, a 404 `not_found_error`), the
/// reservation made for it is given back (the key's buckets read full again), no slot is held,
/// and the proxy keeps serving.
#[tokio::test(start_paused = true)]
async fn a_malformed_body_and_an_unknown_path_get_the_upstreams_answer_and_leak_nothing() {
    let sim = Simulator::new(SimConfig::new(tower_quota_sim::Limits::unlimited()));
    let upstream_server = tower_quota_sim::serve(sim, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut config = Config::new(upstream_server.base_url().parse().unwrap());
    config.limits = tower_quota::budget::Limits::new().rpm(60).itpm(100_000);
    let (base, proxy) = start(config).await;
    let partition = tower_quota::partition::ApiKey::new().fingerprint(b"sk-proxy-test");

    let malformed = http::Request::post(format!("{base}/v1/messages"))
        .header("x-api-key", "sk-proxy-test")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"model\": \"claude-son")))
        .unwrap();
    let res = client().request(malformed).await.unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(error_type(res).await, "invalid_request_error");

    let unknown = http::Request::get(format!("{base}/v1/no-such-endpoint"))
        .header("x-api-key", "sk-proxy-test")
        .body(Full::default())
        .unwrap();
    let res = client().request(unknown).await.unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(error_type(res).await, "not_found_error");

    assert_eq!(proxy.concurrency.in_flight(), 0);
    assert_eq!(proxy.budget.queued(), 0);
    let snapshot = proxy.budget.snapshot(partition).await.unwrap().unwrap();
    for bucket in snapshot.buckets.iter().flatten() {
        let (level, capacity) = *bucket;
        assert!(
            level >= capacity as f64 - 1e-6,
            "a refused request kept its reservation: {snapshot:?}"
        );
    }
    assert!(healthy(&base).await);
    let res = client().request(messages(&base, false)).await.unwrap();
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap();
    // The control: an answered request keeps what it used.
    let snapshot = proxy.budget.snapshot(partition).await.unwrap().unwrap();
    let (level, capacity) = snapshot.buckets[0].unwrap();
    assert!(level < capacity as f64 - 0.5, "{snapshot:?}");
    upstream_server.shutdown().await;
}
