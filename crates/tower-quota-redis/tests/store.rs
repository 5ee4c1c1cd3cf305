//! RedisStore against a real redis-server on loopback: the conformance suite, the same decisions
//! as the in-memory store, and the failure policy under faults.

mod support;

use std::time::Duration;
use support::RedisServer;
use tower_quota::budget::store::{
    Admission, BudgetStore, Charged, Delta, MemoryStore, Scope, WaitReason,
};
use tower_quota::budget::{Bucket, Cost, Limits, conformance};
use tower_quota::partition::PartitionKey;
use tower_quota_redis::{OnFailure, RedisStore};

async fn store(server: &RedisServer) -> RedisStore {
    RedisStore::connect(&server.url()).await.expect("connect")
}

#[tokio::test]
async fn the_redis_store_passes_the_conformance_suite() {
    let server = RedisServer::start().await;
    let s = store(&server).await;
    conformance::run_all(&s, 1).await;
    assert!(s.is_up());
    // A second namespace on the same server: keys do not collide.
    conformance::run_all(&s, 2).await;
}

/// The kind of an admission, for comparing decisions across stores whose clocks differ by the
/// time the calls take.
fn kind(a: &Admission) -> String {
    match a {
        Admission::Granted { charged } => format!("granted {charged:?}"),
        Admission::Wait { reason, .. } => format!("wait {reason:?}"),
        Admission::TooLarge {
            bucket,
            needed,
            capacity,
            ..
        } => format!("too large {bucket} {needed}/{capacity}"),
        other => format!("{other:?}"),
    }
}

#[tokio::test]
async fn redis_and_memory_make_the_same_decisions() {
    let server = RedisServer::start().await;
    let redis = store(&server).await;
    let memory = MemoryStore::default();
    let p = PartitionKey::fingerprint(b"sk-compare");
    let g = PartitionKey::fingerprint(b"global-compare");
    // Slow refill (a unit a second at most): the stores' clocks may differ by milliseconds.
    let scopes = [
        Scope {
            partition: p,
            limits: Limits::new().rpm(30).itpm(600).otpm(300),
        },
        Scope {
            partition: g,
            limits: Limits::new().rpm(40),
        },
    ];
    let mut x: u64 = 7;
    let mut decisions = Vec::new();
    for step in 0..300 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let r = (x >> 33) % 10;
        if r < 7 {
            let input = if (x >> 20) % 10 == 0 {
                700
            } else {
                (x >> 40) % 120
            };
            let cost = Cost::new(input, (x >> 50) % 90);
            let a = redis.reserve(&scopes, cost).await.unwrap();
            let b = memory.reserve(&scopes, cost).await.unwrap();
            assert_eq!(kind(&a), kind(&b), "step {step}: {cost:?}");
            if let (Admission::Wait { retry_in: wa, .. }, Admission::Wait { retry_in: wb, .. }) =
                (a, b)
            {
                let diff = wa.as_secs_f64() - wb.as_secs_f64();
                assert!(diff.abs() < 0.05, "step {step}: waits {wa:?} vs {wb:?}");
            }
            decisions.push(kind(&a));
        } else if r < 9 {
            let delta = Delta {
                input_tokens: ((x >> 40) % 100) as i64 - 60,
                output_tokens: ((x >> 48) % 80) as i64 - 50,
                ..Delta::default()
            };
            redis.adjust(&scopes, delta).await.unwrap();
            memory.adjust(&scopes, delta).await.unwrap();
        } else {
            redis.cooldown(p, Duration::from_millis(200)).await.unwrap();
            memory
                .cooldown(p, Duration::from_millis(200))
                .await
                .unwrap();
            let a = redis.reserve(&scopes, Cost::new(0, 0)).await.unwrap();
            let b = memory.reserve(&scopes, Cost::new(0, 0)).await.unwrap();
            assert_eq!(kind(&a), kind(&b), "step {step}: cooldown");
            tokio::time::sleep(Duration::from_millis(210)).await;
        }
        for b in Bucket::ALL {
            let la = redis
                .snapshot(p, scopes[0].limits)
                .await
                .unwrap()
                .unwrap()
                .bucket(b);
            let lb = memory
                .snapshot(p, scopes[0].limits)
                .await
                .unwrap()
                .unwrap()
                .bucket(b);
            match (la, lb) {
                (Some((a, ca)), Some((b2, cb))) => {
                    assert_eq!(ca, cb);
                    assert!((a - b2).abs() < 0.5, "step {step} {b}: {a} vs {b2}");
                }
                (a, b2) => assert_eq!(a.is_some(), b2.is_some(), "step {step} {b}"),
            }
        }
    }
    // The sequence exercised every kind of answer.
    assert!(decisions.iter().any(|d| d.starts_with("granted")));
    assert!(decisions.iter().any(|d| d.starts_with("wait")));
    assert!(decisions.iter().any(|d| d.starts_with("too large")));
}

#[tokio::test]
async fn a_flushed_script_is_loaded_again() {
    let server = RedisServer::start().await;
    let s = store(&server).await;
    let scopes = [Scope {
        partition: PartitionKey::fingerprint(b"sk-flush"),
        limits: Limits::new().rpm(100),
    }];
    assert!(matches!(
        s.reserve(&scopes, Cost::new(0, 0)).await.unwrap(),
        Admission::Granted { .. }
    ));
    server.command(&["SCRIPT", "FLUSH"]).await;
    assert!(matches!(
        s.reserve(&scopes, Cost::new(0, 0)).await.unwrap(),
        Admission::Granted { .. }
    ));
    assert!(
        s.is_up(),
        "EVALSHA failed over to loading the script, not to the fallback"
    );
    let snap = s
        .snapshot(scopes[0].partition, scopes[0].limits)
        .await
        .unwrap()
        .unwrap();
    let (level, _) = snap.bucket(Bucket::Requests).unwrap();
    assert!(
        (level - 98.0).abs() < 0.5,
        "{level}: both reservations are in Redis"
    );
}

#[tokio::test]
async fn redis_down_falls_back_and_comes_back_on_its_own() {
    let mut server = RedisServer::start().await;
    let s = store(&server)
        .await
        .on_failure(OnFailure::Fallback { workers: 4 });
    let scopes = [Scope {
        partition: PartitionKey::fingerprint(b"sk-down"),
        limits: Limits::new().rpm(6000),
    }];
    assert!(matches!(
        s.reserve(&scopes, Cost::new(0, 0)).await.unwrap(),
        Admission::Granted { .. }
    ));
    server.stop();
    // Redis is gone: the local fallback answers with a quarter of the limit (4 workers), and
    // starts empty (no fresh burst at the switch): 25 a second from the switch on.
    let first = s.reserve(&scopes, Cost::new(0, 0)).await.unwrap();
    assert!(
        matches!(first, Admission::Wait { retry_in, reason: WaitReason::Bucket(Bucket::Requests), .. }
            if retry_in <= Duration::from_millis(40)),
        "{first:?}"
    );
    assert!(!s.is_up());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut granted = 0;
    for _ in 0..2000 {
        match s.reserve(&scopes, Cost::new(0, 0)).await.unwrap() {
            Admission::Granted { .. } => granted += 1,
            Admission::Wait { .. } => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(
        (20..=40).contains(&granted),
        "{granted}: a second of 6000 / 4 a minute"
    );
    server.restart().await;
    // Within a second or two (the retry interval, the reconnect), calls reach Redis again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let _ = s.reserve(&scopes, Cost::new(0, 0)).await.unwrap();
        if s.is_up() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never came back to Redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_stalled_redis_times_out_into_the_policy_and_recovers() {
    let server = RedisServer::start().await;
    let s = store(&server).await;
    let scopes = [Scope {
        partition: PartitionKey::fingerprint(b"sk-stall"),
        limits: Limits::new().rpm(600),
    }];
    let stall = {
        let url = server.url();
        tokio::spawn(async move {
            let client = redis::Client::open(url).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let _: Result<redis::Value, _> = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg(1)
                .query_async(&mut conn)
                .await;
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = tokio::time::Instant::now();
    let a = s.reserve(&scopes, Cost::new(0, 0)).await.unwrap();
    // The fallback answered (it starts empty: a wait of one request's refill).
    assert!(
        matches!(a, Admission::Wait { retry_in, .. } if retry_in <= Duration::from_millis(100)),
        "{a:?}"
    );
    assert!(
        t0.elapsed() < Duration::from_millis(300),
        "the timeout bounds the wait: {:?}",
        t0.elapsed()
    );
    assert!(!s.is_up());
    stall.await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !s.is_up() {
        let _ = s.reserve(&scopes, Cost::new(0, 0)).await.unwrap();
        assert!(tokio::time::Instant::now() < deadline, "never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn fail_open_and_fail_closed() {
    let mut server = RedisServer::start().await;
    let scopes = [Scope {
        partition: PartitionKey::fingerprint(b"sk-policy"),
        limits: Limits::new().rpm(1),
    }];
    let open = store(&server).await.on_failure(OnFailure::FailOpen);
    let closed = store(&server).await.on_failure(OnFailure::FailClosed);
    server.stop();
    for _ in 0..3 {
        assert_eq!(
            open.reserve(&scopes, Cost::new(0, 0)).await.unwrap(),
            Admission::Granted {
                charged: Charged::NONE
            }
        );
    }
    let err = closed.reserve(&scopes, Cost::new(0, 0)).await.unwrap_err();
    // The cause is the source's to tell (the message does not repeat it).
    let cause = std::error::Error::source(&err).unwrap().to_string();
    assert!(cause.contains("fails closed"), "{cause}");
    let _ = WaitReason::Cooldown;
}

#[tokio::test]
async fn keys_carry_the_fingerprint_never_the_key() {
    let server = RedisServer::start().await;
    let s = store(&server).await;
    let p = PartitionKey::fingerprint(b"sk-ant-very-secret");
    let scopes = [Scope {
        partition: p,
        limits: Limits::new().rpm(10),
    }];
    s.reserve(&scopes, Cost::new(1, 1)).await.unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    for k in &keys {
        assert!(!k.contains("secret"), "{k}");
        if k.ends_with("workers") {
            continue; // the fleet's heartbeat set: random process ids, no key
        }
        assert!(
            k.contains(&format!("{{{p}}}")),
            "{k}: the partition's hash tag"
        );
    }
    // The state key outlives its last write by 15 minutes (the bucket is full again after 6 s: a
    // request of 10/min), so a process that wrote it within 10 minutes can tell a state Redis lost
    // (FLUSHALL) from one that expired.
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("tq:{{{p}}}:s"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((895_000..=900_000).contains(&ttl), "{ttl}");
    assert!(!format!("{s:?}").contains("secret"));
}

#[tokio::test]
async fn the_budget_layer_loses_no_request_while_redis_restarts() {
    use http::Request;
    use http_body_util::{BodyExt, Full};
    use tower::{Layer, ServiceExt};
    use tower_quota::budget::TokenBudgetLayer;
    use tower_quota_sim::{Limits as SimLimits, MessagesRequest, SimConfig, Simulator};

    let mut server = RedisServer::start().await;
    let sim = Simulator::new(
        SimConfig::new(SimLimits::unlimited())
            .with_latency(Duration::from_millis(5), Duration::ZERO),
    );
    let redis = store(&server)
        .await
        .on_failure(OnFailure::Fallback { workers: 1 });
    let svc = TokenBudgetLayer::new(Limits::new().rpm(60_000))
        .store(redis.clone())
        .layer(sim.clone());
    let run = tokio::spawn(async move {
        let mut set = tokio::task::JoinSet::new();
        for w in 0..20 {
            let svc = svc.clone();
            set.spawn(async move {
                let mut ok = 0;
                for i in 0..40 {
                    let body = MessagesRequest::user("m", format!("{w}/{i}"), 8).to_bytes();
                    let req = Request::post("/v1/messages")
                        .header("x-api-key", "sk-restart")
                        .body(Full::new(body))
                        .unwrap();
                    let res = svc.clone().oneshot(req).await.expect("no request fails");
                    assert_eq!(res.status(), 200);
                    res.into_body().collect().await.unwrap();
                    ok += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                ok
            });
        }
        let mut total = 0;
        while let Some(n) = set.join_next().await {
            total += n.unwrap();
        }
        total
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!redis.is_up(), "the store noticed");
    server.restart().await;
    let total = run.await.unwrap();
    assert_eq!(total, 800);
    assert_eq!(sim.summary().total.ok, 800);
    // Back on Redis by the end (the run lasts about a second after the restart).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !redis.is_up() {
        let _ = redis
            .reserve(
                &[Scope {
                    partition: PartitionKey::fingerprint(b"sk-restart"),
                    limits: Limits::new().rpm(60_000),
                }],
                Cost::new(0, 0),
            )
            .await
            .unwrap();
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 10, finding 3 (in part): a process can start while Redis is down: the store comes up on
/// its failure policy and reaches Redis once it is back.
#[tokio::test]
async fn a_store_starts_while_redis_is_down_and_reaches_it_later() {
    let mut server = RedisServer::start().await;
    server.stop();
    let s = RedisStore::connect(&server.url())
        .await
        .expect("a store even with Redis down");
    let scopes = [Scope {
        partition: PartitionKey::fingerprint(b"sk-late"),
        limits: Limits::new().rpm(600),
    }];
    // The local fallback answers meanwhile (starting empty: one request's refill away).
    let a = s.reserve(&scopes, Cost::new(0, 0)).await.unwrap();
    assert!(
        matches!(a, Admission::Wait { retry_in, .. } if retry_in <= Duration::from_millis(100)),
        "{a:?}"
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(matches!(
        s.reserve(&scopes, Cost::new(0, 0)).await.unwrap(),
        Admission::Granted { .. }
    ));
    assert!(!s.is_up());
    server.restart().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !s.is_up() {
        let _ = s.reserve(&scopes, Cost::new(0, 0)).await.unwrap();
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reached Redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 10, finding 3 (in part): two processes share a key (a burst of 60, 10 a second: at most
/// 160 in any 10 s window); Redis dies for 5 s and comes back empty. Each fallback takes only its
/// share (the fleet's size learned from the heartbeat, though each was configured for 1 worker),
/// starts empty (no fresh burst at the switch), and what it admitted is charged to Redis when it
/// answers again (the restarted, empty Redis learns what the fleet spent). Slack: 5 requests for
/// the moments between Redis's return and the repayment. Before: 339 (and 225 without the
/// repayment).
/// The fault a fleet test injects for 5 s, 5 s into the run.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Killed, then restarted empty (no persistence).
    KillRestart,
    /// Stopped (`SIGSTOP`: a stalled server), then let go on (`SIGCONT`), state intact.
    Stall,
    /// Emptied (`FLUSHALL`) while it stays up: no process sees an outage.
    Flush,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_stays_within_its_quota_while_redis_dies_and_returns() {
    fleet_through(Fault::KillRestart).await;
}

/// As above with a stalled Redis (`SIGSTOP` for 5 s): the calls time out into the fallback, and
/// the ones Redis runs when it wakes are cancelled (refunded) once it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_stays_within_its_quota_while_redis_stalls() {
    fleet_through(Fault::Stall).await;
}

/// Issue 10, finding 3: `FLUSHALL` mid-run (Redis stays up, so no process falls back and none has
/// a debt to repay). A process that used a partition before and finds its state gone takes the
/// bucket as spent at that moment (it refills from empty), instead of handing out a full one.
/// Before: 218 in one 10 s window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_stays_within_its_quota_when_redis_is_flushed() {
    fleet_through(Fault::Flush).await;
}

async fn fleet_through(fault: Fault) {
    let mut server = RedisServer::start().await;
    let a = RedisStore::connect(&server.url()).await.unwrap();
    let b = RedisStore::connect(&server.url()).await.unwrap();
    let limit = tower_quota::budget::Limit {
        per_minute: 600,
        burst: Some(60),
    };
    let scopes = [Scope {
        partition: PartitionKey::fingerprint(b"sk-fleet"),
        limits: Limits {
            requests: Some(limit),
            ..Limits::new()
        },
    }];
    // Let the heartbeat count the fleet.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let t0 = tokio::time::Instant::now();
    let mut admitted = Vec::new();
    let (mut struck, mut healed) = (false, false);
    while t0.elapsed() < Duration::from_secs(17) {
        let t = t0.elapsed();
        if !struck && t >= Duration::from_secs(5) {
            match fault {
                Fault::KillRestart => server.stop(),
                Fault::Stall => server.signal("-STOP"),
                Fault::Flush => server.command(&["FLUSHALL"]).await,
            }
            struck = true;
        }
        if !healed && t >= Duration::from_secs(10) {
            match fault {
                Fault::KillRestart => server.restart().await,
                Fault::Stall => server.signal("-CONT"),
                Fault::Flush => {}
            }
            healed = true;
        }
        for s in [&a, &b] {
            if let Admission::Granted { .. } = s.reserve(&scopes, Cost::new(0, 0)).await.unwrap() {
                admitted.push(t0.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // In any window of w seconds, at most the burst and w seconds of refill (60 + 10 w), and a
    // slack of 5 for the moments between Redis's return and the repayment.
    for secs in [1, 5, 10] {
        let window = Duration::from_secs(secs);
        let most = admitted
            .iter()
            .map(|&start| {
                admitted
                    .iter()
                    .filter(|&&t| t >= start && t < start + window)
                    .count()
            })
            .max()
            .unwrap_or(0);
        let bound = 60 + 10 * secs as usize;
        assert!(
            most <= bound + 5,
            "{fault:?}: {most} admitted in one {secs} s window (bound {bound})"
        );
    }
    // The fleet kept working through the fault.
    let during = admitted
        .iter()
        .filter(|&&t| t > Duration::from_millis(5500) && t < Duration::from_secs(10))
        .count();
    assert!(
        during >= 20,
        "{fault:?}: {during} admitted during the fault"
    );
}

/// Issue 10, finding 3: reservations whose calls timed out while Redis was stalled (`SIGSTOP`),
/// and that Redis ran when it woke, are not charged: the caller was told "no" (the store fails
/// closed here), so a charge would be quota spent on nothing. Before: every late call was charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_that_timed_out_is_not_charged_when_redis_runs_it_later() {
    let server = RedisServer::start().await;
    let s = store(&server).await.on_failure(OnFailure::FailClosed);
    // A bucket of 1000 that refills by one a minute: what is charged stays visible.
    let limits = Limits {
        requests: Some(tower_quota::budget::Limit {
            per_minute: 1,
            burst: Some(1000),
        }),
        ..Limits::new()
    };
    let partition = PartitionKey::fingerprint(b"sk-late");
    let scopes = [Scope { partition, limits }];
    for _ in 0..10 {
        let a = s.reserve(&scopes, Cost::new(0, 0)).await.unwrap();
        assert!(matches!(a, Admission::Granted { .. }), "{a:?}");
    }
    server.signal("-STOP");
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.reserve(&scopes, Cost::new(0, 0)).await })
        })
        .collect();
    for c in calls {
        assert!(c.await.unwrap().is_err(), "Redis is stalled: fails closed");
    }
    server.signal("-CONT");
    // Snapshots (which charge nothing) until the store reaches Redis again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !s.is_up() {
        let _ = s.snapshot(partition, limits).await;
        assert!(tokio::time::Instant::now() < deadline, "never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let snap = s.snapshot(partition, limits).await.unwrap().unwrap();
    let (level, capacity) = snap.buckets[0].unwrap();
    assert_eq!(capacity, 1000);
    assert!(
        (989.5..991.0).contains(&level),
        "{level}: only the 10 granted requests are charged"
    );
}
