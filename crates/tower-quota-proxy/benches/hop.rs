//! The cost of the hop: latency quota-proxy adds over a direct call, requests per second through
//! it, and its resident memory with 10 000 requests held. Not a timed test: figures to read.
//!
//! Run with: `cargo bench -p tower-quota-proxy --bench hop`
//!
//! The upstream is the simulator, unlimited and answering at once (no latency), served on a
//! loopback port in this process; the proxy is the `quota-proxy` binary in a process of its own
//! (so its memory is its own), with limits far above the load (so the budget never waits) and the
//! preset's adaptive concurrency limit (which starts at 8 and grows to 200 while every slot is
//! busy).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tower_quota_sim::{MessagesRequest, SimConfig, Simulator};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proxy {
    child: Child,
    base: String,
}

impl Proxy {
    async fn start(upstream: &str, extra: &[&str]) -> Self {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_quota-proxy"))
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--upstream",
                upstream,
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("quota-proxy starts");
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Resident memory, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn request(base: &str, key: &str) -> http::Request<Full<Bytes>> {
    let body = MessagesRequest::user("claude-sonnet-5-5", "Hello", 16).to_bytes();
    http::Request::post(format!("{base}/v1/messages"))
        .header("x-api-key", key)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .unwrap()
}

/// `total` requests, `concurrency` at a time: sorted latencies and requests per second.
async fn load(
    client: &HttpClient,
    (base, key): (&str, &str),
    concurrency: usize,
    total: usize,
) -> (Vec<Duration>, f64) {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, base, key, next) = (
            client.clone(),
            base.to_owned(),
            key.to_owned(),
            next.clone(),
        );
        workers.spawn(async move {
            let mut lat = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let t0 = Instant::now();
                let res = client
                    .request(request(&base, &key))
                    .await
                    .expect("answered");
                assert_eq!(res.status(), 200);
                res.into_body().collect().await.unwrap();
                lat.push(t0.elapsed());
            }
            lat
        });
    }
    let mut all = Vec::with_capacity(total);
    while let Some(l) = workers.join_next().await {
        all.extend(l.unwrap());
    }
    let rps = total as f64 / start.elapsed().as_secs_f64();
    all.sort_unstable();
    (all, rps)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let sim = Simulator::new(
        SimConfig::new(tower_quota_sim::Limits::unlimited())
            .with_latency(Duration::ZERO, Duration::ZERO),
    );
    let upstream = tower_quota_sim::serve(sim, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    // HOP_UPSTREAM: another upstream instead (scripts/hop_litellm.sh gives the one LiteLLM
    // forwards to, so both proxies stand in front of the same server).
    let upstream_base = std::env::var("HOP_UPSTREAM").unwrap_or_else(|_| upstream.base_url());
    // HOP_LITELLM and HOP_LITELLM_KEY: LiteLLM's proxy, measured beside.
    let litellm = std::env::var("HOP_LITELLM")
        .ok()
        .map(|base| (base, std::env::var("HOP_LITELLM_KEY").unwrap_or_default()));
    let generous = [
        "--rpm",
        "100000000",
        "--itpm",
        "100000000000",
        "--otpm",
        "100000000000",
    ];
    let proxy = Proxy::start(&upstream_base, &generous).await;
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build_http();
    // Warm both paths (connections, the adaptive limit).
    let direct_at = (upstream_base.as_str(), "sk-hop");
    let proxy_at = (proxy.base.as_str(), "sk-hop");
    load(&client, direct_at, 64, 4_000).await;
    load(&client, proxy_at, 64, 4_000).await;
    if let Some((base, key)) = &litellm {
        load(&client, (base, key), 64, 1_000).await;
    }
    // HOP_DEBUG=1: where the time goes (the proxy's own metrics after the warm-up).
    if std::env::var("HOP_DEBUG").is_ok() {
        let req = http::Request::get(format!("{}/metrics", proxy.base))
            .body(Full::default())
            .unwrap();
        let text = client
            .request(req)
            .await
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        for l in String::from_utf8_lossy(&text).lines() {
            if l.contains("_total{")
                || l.contains("concurrency_limit")
                || l.contains("in_flight")
                || (l.contains("_seconds{") && l.contains("\"0.5\""))
            {
                println!("{l}");
            }
        }
    }

    println!(
        "| concurrent clients | direct p50 | direct p99 | proxy p50 | proxy p99 | added p50 | direct req/s | proxy req/s |{}",
        if litellm.is_some() {
            " LiteLLM p50 | LiteLLM p99 | LiteLLM req/s |"
        } else {
            ""
        }
    );
    println!(
        "|---:|---:|---:|---:|---:|---:|---:|---:|{}",
        if litellm.is_some() {
            "---:|---:|---:|"
        } else {
            ""
        }
    );
    for concurrency in [1, 64, 512] {
        let total = (concurrency * 40).max(4_000);
        let (direct, direct_rps) = load(&client, direct_at, concurrency, total).await;
        let (proxied, proxy_rps) = load(&client, proxy_at, concurrency, total).await;
        let beside = match &litellm {
            Some((base, key)) => {
                let (l, rps) = load(&client, (base, key), concurrency, total / 4).await;
                format!(
                    " {:.2} ms | {:.2} ms | {rps:.0} |",
                    pct(&l, 0.5),
                    pct(&l, 0.99)
                )
            }
            None => String::new(),
        };
        println!(
            "| {concurrency} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {direct_rps:.0} | {proxy_rps:.0} |{beside}",
            pct(&direct, 0.5),
            pct(&direct, 0.99),
            pct(&proxied, 0.5),
            pct(&proxied, 0.99),
            pct(&proxied, 0.5) - pct(&direct, 0.5),
        );
    }
    drop(proxy);

    // 10 000 requests of one key held: a budget of one request a minute, queues raised.
    let held = 10_000;
    let proxy = Proxy::start(
        &upstream_base,
        &[
            "--rpm",
            "1",
            "--max-queue",
            "20000",
            "--max-wait-secs",
            "3600",
        ],
    )
    .await;
    let idle = proxy.rss_kib();
    let flood = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut waiting = tokio::task::JoinSet::new();
    for _ in 0..held {
        let f = flood.request(request(&proxy.base, "sk-hop"));
        waiting.spawn(async move {
            let _ = f.await;
        });
    }
    let metrics = format!("{}/metrics", proxy.base);
    let mut queued = 0.0;
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let res = client
            .request(http::Request::get(&metrics).body(Full::default()).unwrap())
            .await
            .unwrap();
        let text = res.into_body().collect().await.unwrap().to_bytes();
        queued = String::from_utf8_lossy(&text)
            .lines()
            .find(|l| l.starts_with("tower_quota_budget_waiting{"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if queued >= (held - 1) as f64 {
            break;
        }
    }
    let full = proxy.rss_kib();
    println!();
    println!(
        "resident memory: {idle} KiB idle, {full} KiB with {queued:.0} requests held: {:.1} KiB a held request (its connection, its buffered body, its place in the queues)",
        (full.saturating_sub(idle)) as f64 / queued.max(1.0)
    );
    drop(proxy);
    waiting.abort_all();
    upstream.shutdown().await;
}
