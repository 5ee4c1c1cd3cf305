//! `quota-redis-worker`: reserves from one shared Redis budget as fast as it admits, for a while,
//! and prints the admission times. The multi-process test and the bench run several at once.
//!
//! Run with: `cargo run -p tower-quota-redis --bin quota-redis-worker -- REDIS_URL KEY RPM BURST MILLIS`
//!
//! Prints one JSON object: `{"admitted": [unix microseconds, ...], "calls": N}`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tower_quota::budget::store::{Admission, BudgetStore, Scope};
use tower_quota::budget::{Cost, Limit, Limits};
use tower_quota::partition::PartitionKey;
use tower_quota_redis::RedisStore;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, key, rpm, burst, millis] = &args[..] else {
        eprintln!("usage: quota-redis-worker REDIS_URL KEY RPM BURST MILLIS");
        std::process::exit(2);
    };
    let rpm: u64 = rpm.parse().expect("RPM");
    let burst: u64 = burst.parse().expect("BURST");
    let run_for = Duration::from_millis(millis.parse().expect("MILLIS"));
    // Redis need not be up yet: the store starts on its fallback and connects when it can.
    let store = RedisStore::connect(url).await.expect("a valid Redis URL");
    let scopes = [Scope {
        partition: PartitionKey::fingerprint(key.as_bytes()),
        limits: Limits {
            requests: Some(Limit {
                per_minute: rpm,
                burst: Some(burst),
            }),
            ..Limits::new()
        },
    }];
    let start = tokio::time::Instant::now();
    let (mut admitted, mut calls) = (Vec::new(), 0u64);
    while start.elapsed() < run_for {
        calls += 1;
        match store.reserve(&scopes, Cost::new(0, 0)).await {
            Ok(Admission::Granted { .. }) => {
                let t = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                admitted.push(t.as_micros() as u64);
            }
            Ok(Admission::Wait { retry_in, .. }) => tokio::time::sleep(retry_in).await,
            Ok(other) => panic!("{other:?}"),
            Err(e) => panic!("{e}"),
        }
    }
    println!(
        "{}",
        serde_json::json!({"admitted": admitted, "calls": calls, "redis_up": store.is_up()})
    );
}
