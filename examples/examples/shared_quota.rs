//! Two worker processes share one API key's budget through Redis.
//!
//! Run with: `cargo run --example shared_quota` (needs `redis-server` on the PATH, or
//! `REDIS_URL` pointing at a running Redis)
//!
//! The parent starts Redis (unless `REDIS_URL` is set) and the simulated API (600 requests/min, a
//! burst of 60), then runs two copies of itself as workers. Each worker sends 150 requests through
//! a `TokenBudgetLayer` backed by the same `RedisStore`: together they stay within the one key's
//! quota, so the server refuses none. With a budget in each process's memory instead, each would
//! believe it owns the whole quota and the pair would send twice too much.

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::process::{Command, Stdio};
use std::time::Duration;
use tower::{ServiceBuilder, ServiceExt};
use tower_quota::BoxError;
use tower_quota::budget::{Limit, Limits, TokenBudgetLayer};
use tower_quota::retry_after::RetryAfterLayer;
use tower_quota_redis::{OnFailure, RedisStore};
use tower_quota_sim::{Limits as SimLimits, MessagesRequest, SimConfig, Simulator};

const KEY: &str = "sk-shared-example";
const PER_WORKER: usize = 150;

fn limits() -> Limits {
    Limits {
        requests: Some(Limit {
            per_minute: 600,
            burst: Some(60),
        }),
        ..Limits::new()
    }
}

async fn worker(redis_url: &str, api: &str) -> Result<(), BoxError> {
    let store = RedisStore::connect(redis_url)
        .await?
        .on_failure(OnFailure::Fallback { workers: 2 });
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let svc = ServiceBuilder::new()
        .layer(TokenBudgetLayer::new(limits()).store(store))
        .layer(RetryAfterLayer::new())
        .service(client);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..PER_WORKER {
        let (svc, url) = (svc.clone(), format!("{api}/v1/messages"));
        tasks.spawn(async move {
            let body =
                MessagesRequest::user("claude-sonnet-5-5", format!("item {i}"), 16).to_bytes();
            let req = Request::post(url)
                .header("x-api-key", KEY)
                .header("content-type", "application/json")
                .body(Full::new(body))?;
            let res = svc.oneshot(req).await?;
            let ok = res.status().is_success();
            res.into_body().collect().await?;
            Ok::<_, BoxError>(ok)
        });
    }
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        ok += usize::from(r??);
    }
    println!("{ok}");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("worker") {
        return worker(&args[2], &args[3]).await;
    }

    // Redis: the one given, or our own on a free loopback port.
    let (redis_url, mut own_redis) = match std::env::var("REDIS_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let child = Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| {
                    format!("cannot start redis-server ({e}); set REDIS_URL or install it")
                })?;
            for _ in 0..100 {
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (format!("redis://127.0.0.1:{port}/"), Some(child))
        }
    };
    let sim = Simulator::new(SimConfig::new(SimLimits {
        rpm: Some(600),
        burst_fraction: 0.1,
        ..SimLimits::unlimited()
    }));
    let server = tower_quota_sim::serve(sim.clone(), "127.0.0.1:0".parse()?).await?;
    let me = std::env::current_exe()?;
    let start = tokio::time::Instant::now();
    // Both workers run at once.
    let mut children = Vec::new();
    for _ in 0..2 {
        children.push(
            Command::new(&me)
                .args(["worker", &redis_url, &server.base_url()])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()?,
        );
    }
    let mut ok = 0;
    for c in children {
        let out = tokio::task::spawn_blocking(move || c.wait_with_output()).await??;
        if !out.status.success() {
            return Err("a worker failed".into());
        }
        ok += String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<usize>()?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let audit = sim.summary();
    println!(
        "2 workers, {ok} of {} requests succeeded in {elapsed:.1} s ({:.1} req/s against a limit of 10/s after a burst of 60); the server answered {} with 429",
        2 * PER_WORKER,
        ok as f64 / elapsed,
        audit.total.rate_limited
    );
    server.shutdown().await;
    if let Some(c) = own_redis.as_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    assert_eq!(ok, 2 * PER_WORKER);
    assert_eq!(audit.total.rate_limited, 0);
    Ok(())
}
