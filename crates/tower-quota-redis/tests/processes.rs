//! Four OS processes share one key's budget through Redis for about 5 s of real time.

mod support;

use std::process::Command;
use support::RedisServer;

const RATE: f64 = 100.0; // per second
const BURST: f64 = 10.0;

#[tokio::test]
async fn four_processes_hold_the_quota_in_every_window_and_use_it() {
    let server = RedisServer::start().await;
    let url = server.url();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::task::spawn_blocking(move || {
                Command::new(env!("CARGO_BIN_EXE_quota-redis-worker"))
                    .args([url.as_str(), "sk-shared", "6000", "10", "5000"])
                    .output()
                    .expect("run a worker")
            })
        })
        .collect();
    let mut admitted: Vec<u64> = Vec::new();
    let mut calls = 0;
    for w in workers {
        let out = w.await.unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["redis_up"], true);
        calls += v["calls"].as_u64().unwrap();
        let mine: Vec<u64> = v["admitted"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect();
        assert!(!mine.is_empty(), "every worker got a share");
        admitted.extend(mine);
    }
    admitted.sort_unstable();
    let first = admitted[0];
    let span = (admitted[admitted.len() - 1] - first) as f64 / 1e6;
    // Never more than burst + rate x window in any window (one unit of slack: the admission time
    // is taken on return, up to a loopback round trip after the script ran).
    for window in [0.5, 1.0, 2.0] {
        let w = (window * 1e6) as u64;
        let bound = BURST + RATE * window + 1.0;
        let mut j = 0;
        let mut worst = 0;
        for i in 0..admitted.len() {
            while j < admitted.len() && admitted[j] < admitted[i] + w {
                j += 1;
            }
            worst = worst.max(j - i);
        }
        eprintln!("window {window} s: at most {worst} admitted (bound {bound})");
        assert!(
            worst as f64 <= bound,
            "{worst} admitted in a {window} s window, bound {bound}"
        );
    }
    // And the quota is used: at least 95 % of what it allowed over the run.
    let allowed = BURST + RATE * span;
    let share = admitted.len() as f64 / allowed;
    eprintln!(
        "{} admitted in {span:.2} s ({:.1} % of the quota), {calls} script calls",
        admitted.len(),
        100.0 * share
    );
    assert!(share >= 0.95, "{share}");
}
