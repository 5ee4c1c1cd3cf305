//! Issue 10, finding 10: `quota-sim` out of file descriptors. Its own process (so the limit is its
//! alone), 64 descriptors, and 200 connections that never send a request: accept fails (`EMFILE`)
//! until the header timeout closes idle connections, and the server must neither spin nor die,
//! and must answer a canary client once descriptors free up.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::process::{Command, Stdio};
use std::time::Duration;
use tower_quota_sim::MessagesRequest;

/// Kills the child when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_answers_a_canary_after_running_out_of_file_descriptors() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let bin = env!("CARGO_BIN_EXE_quota-sim");
    let mut child = Child(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -n 64 && exec '{bin}' serve --port {port} --rpm 0 --itpm 0 --otpm 0 \
                 --latency-ms 0 --header-timeout-ms 1000"
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "quota-sim did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Three times its descriptors in silent connections: the kernel completes them all (the
    // listen backlog), the server accepts what it can and then fails with EMFILE.
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let canary = Request::post(format!("http://{addr}/v1/messages"))
        .header("x-api-key", "sk-canary")
        .header("content-type", "application/json")
        .body(Full::new(
            MessagesRequest::user("claude-sim", "Hello", 16).to_bytes(),
        ))
        .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let t0 = tokio::time::Instant::now();
    // The silent connections are served a second each, about 60 at a time, in the order they
    // came: the canary's turn comes after about four rounds.
    let res = tokio::time::timeout(Duration::from_secs(30), client.request(canary))
        .await
        .expect("the canary was answered within 30 s")
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK, "after {:?}", t0.elapsed());
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "quota-sim is still running"
    );
    drop(silent);
}
