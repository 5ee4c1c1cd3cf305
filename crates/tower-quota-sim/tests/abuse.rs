//! Issue 10, finding 10: the simulator stays responsive to a canary client while it is abused
//! (overflowing numbers, oversized bodies, connections that never finish their headers).

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tower::ServiceExt;
use tower_quota_sim::{Limits, MessagesRequest, SimConfig, Simulator, serve};

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn post(base: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::post(format!("{base}/v1/messages"))
        .header("x-api-key", "sk-abuse")
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap()
}

/// A simulator with no limits, served on a loopback port.
async fn unlimited() -> tower_quota_sim::ServerHandle {
    serve(
        Simulator::new(SimConfig::new(Limits::unlimited())),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap()
}

fn canary(base: &str) -> Request<Full<Bytes>> {
    post(
        base,
        MessagesRequest::user("claude-sim", "Hello", 16).to_bytes(),
    )
}

#[tokio::test]
async fn overflowing_numbers_get_an_answer_and_the_audit_never_wraps() {
    let limits = Limits {
        tpm: Some(1_000),
        ..Limits::unlimited()
    };
    let sim = Simulator::new(SimConfig::new(limits));
    for max_tokens in [u64::MAX, u64::MAX / 2, 1 << 63] {
        let body = format!(
            r#"{{"model":"m","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"hi"}}]}}"#
        );
        let res = sim
            .clone()
            .oneshot(
                Request::post("/v1/messages")
                    .header("x-api-key", "k")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap(),
            )
            .await
            .expect("an answer, not a panic");
        assert!(res.status().is_client_error(), "{}", res.status());
    }
    let s = sim.summary();
    assert_eq!(s.total.requests, 3, "every request is in the audit");
}

#[tokio::test]
async fn an_oversized_body_is_refused_with_413() {
    let server = unlimited().await;
    let base = server.base_url();
    // 40 MB: over the API's 32 MB.
    let big = vec![b' '; 40 << 20];
    let res = client().request(post(&base, big)).await.unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["type"], "request_too_large");
    let res = client().request(canary(&base)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    server.shutdown().await;
}

/// Four bodies of 100 MB at once: each is refused (413, or the connection closed while the client
/// still sends) after at most 32 MB is read, and a canary is answered meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_bodies_of_100_mb_at_once_leave_the_server_responsive() {
    let server = unlimited().await;
    let base = server.base_url();
    // One buffer, shared by the four requests (`Bytes` clones share it).
    let big = Bytes::from(vec![b' '; 100 << 20]);
    let floods: Vec<_> = (0..4)
        .map(|_| {
            let req = post(&base, big.clone());
            tokio::spawn(async move { client().request(req).await })
        })
        .collect();
    let res = tokio::time::timeout(Duration::from_secs(30), client().request(canary(&base)))
        .await
        .expect("the canary is answered while the floods arrive")
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    for f in floods {
        // A flood is answered 413, or its send fails: the server answered and closed while the
        // client was still sending (how hyper reports it varies with the timing). None succeeds.
        if let Ok(res) = f.await.unwrap() {
            assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
        }
    }
    // Every flood was refused by the server, whatever the client saw.
    let s = server.simulator().summary().total;
    assert_eq!((s.rejected, s.ok), (4, 1), "{s:?}");
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn connections_that_never_finish_their_headers_are_closed() {
    let server = unlimited().await;
    let addr = server.local_addr();
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    // The header timeout passes (virtual time): every slow connection is closed by the server.
    tokio::time::sleep(Duration::from_secs(60)).await;
    for mut s in slow {
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut s, &mut buf),
        )
        .await
        .expect("the server closed or answered the slow connection");
        let n = n.unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    let res = client().request(canary(&server.base_url())).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    server.shutdown().await;
}
