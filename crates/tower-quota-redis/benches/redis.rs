//! Script calls per second and their latency on loopback, and the admitted rate against the quota
//! when four processes share one key.
//!
//! Run with: `cargo bench -p tower-quota-redis --bench redis` (starts its own redis-server).
#![allow(missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};
use tower_quota::budget::store::{BudgetStore, Scope};
use tower_quota::budget::{Cost, Limits};
use tower_quota::partition::PartitionKey;
use tower_quota_redis::RedisStore;

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e6
}

async fn calls(store: &RedisStore, tasks: usize, per_task: usize) -> (f64, Vec<Duration>) {
    let scopes = [Scope {
        partition: PartitionKey::fingerprint(b"sk-bench"),
        limits: Limits::new()
            .rpm(u64::MAX / 4)
            .itpm(u64::MAX / 4)
            .otpm(u64::MAX / 4),
    }];
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let store = store.clone();
        set.spawn(async move {
            let mut lat = Vec::with_capacity(per_task);
            for _ in 0..per_task {
                let t = Instant::now();
                store.reserve(&scopes, Cost::new(10, 10)).await.unwrap();
                lat.push(t.elapsed());
            }
            lat
        });
    }
    let mut all = Vec::new();
    while let Some(l) = set.join_next().await {
        all.extend(l.unwrap());
    }
    let rate = all.len() as f64 / start.elapsed().as_secs_f64();
    all.sort_unstable();
    (rate, all)
}

#[tokio::main]
async fn main() {
    let server = support::RedisServer::start().await;
    let store = RedisStore::connect(&server.url())
        .await
        .unwrap()
        .timeout(Duration::from_secs(1));
    calls(&store, 1, 2_000).await; // warm up
    println!("| tasks in one process | script calls/s | p50 | p99 |\n|---:|---:|---:|---:|");
    for tasks in [1, 4, 16] {
        let (rate, lat) = calls(&store, tasks, 20_000 / tasks).await;
        println!(
            "| {tasks} | {rate:.0} | {:.0} µs | {:.0} µs |",
            pct(&lat, 0.5),
            pct(&lat, 0.99)
        );
    }

    let url = server.url();
    let t0 = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                Command::new(env!("CARGO_BIN_EXE_quota-redis-worker"))
                    .args([url.as_str(), "sk-bench-shared", "6000", "10", "3000"])
                    .output()
                    .expect("run a worker")
            })
        })
        .collect();
    let mut admitted = 0usize;
    let mut script_calls = 0u64;
    for w in workers {
        let out = w.join().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        admitted += v["admitted"].as_array().unwrap().len();
        script_calls += v["calls"].as_u64().unwrap();
    }
    let secs = t0.elapsed().as_secs_f64().min(3.0);
    let quota = 10.0 + 100.0 * secs;
    println!(
        "\n4 processes, one key at 100 requests/s (burst 10), 3 s: {admitted} admitted of a quota of \
         {quota:.0} ({:.1} %), {script_calls} script calls ({:.1} per admission)",
        100.0 * admitted as f64 / quota,
        script_calls as f64 / admitted as f64
    );
}
