//! The suite every [`BudgetStore`] must pass.
//!
//! Each check uses its own partitions (derived from `namespace`, so runs against a shared store do
//! not collide), slow refill rates (so a store on a real clock, such as Redis, drifts by far less
//! than the tolerance while a check runs), and panics with a message naming the check.
//!
//! ```
//! use tower_quota::budget::{MemoryStore, conformance};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! conformance::run_all(&MemoryStore::default(), 1).await;
//! # }
//! ```

use super::store::{Admission, BudgetStore, Delta, Learned, Scope, WaitReason};
use super::{Bucket, Cost, Limit, Limits};
use crate::partition::PartitionKey;
use std::time::Duration;

/// Levels may differ from the exact figure by this much (refill while the check runs, rounding).
pub const TOLERANCE: f64 = 0.5;

fn partition(namespace: u64, check: u64) -> PartitionKey {
    PartitionKey::fingerprint(format!("conformance/{namespace}/{check}").as_bytes())
}

fn scope(p: PartitionKey, limits: Limits) -> [Scope; 1] {
    [Scope {
        partition: p,
        limits,
    }]
}

async fn level(store: &dyn BudgetStore, p: PartitionKey, limits: Limits, b: Bucket) -> f64 {
    let snap = store
        .snapshot(p, limits)
        .await
        .expect("snapshot")
        .unwrap_or_else(|| panic!("no snapshot for {p:?}"));
    snap.bucket(b)
        .unwrap_or_else(|| panic!("no {b} bucket in {snap:?}"))
        .0
}

fn near(what: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= TOLERANCE,
        "{what}: level {got}, expected {want}"
    );
}

async fn reserve(store: &dyn BudgetStore, scopes: &[Scope], cost: Cost) -> Admission {
    store.reserve(scopes, cost).await.expect("reserve")
}

/// A reservation takes every bucket or none.
pub async fn all_or_none(store: &dyn BudgetStore, namespace: u64) {
    let p = partition(namespace, 1);
    let limits = Limits::new().rpm(10).itpm(100);
    let s = scope(p, limits);
    assert!(
        matches!(
            reserve(store, &s, Cost::new(60, 0)).await,
            Admission::Granted { .. }
        ),
        "all_or_none: first"
    );
    match reserve(store, &s, Cost::new(60, 0)).await {
        Admission::Wait {
            reason, partition, ..
        } => {
            assert_eq!(
                reason,
                WaitReason::Bucket(Bucket::InputTokens),
                "all_or_none: reason"
            );
            assert_eq!(partition, p);
        }
        other => panic!("all_or_none: expected a wait, got {other:?}"),
    }
    // The refused reservation took nothing from the request bucket.
    near(
        "all_or_none: requests",
        level(store, p, limits, Bucket::Requests).await,
        9.0,
    );
    near(
        "all_or_none: input",
        level(store, p, limits, Bucket::InputTokens).await,
        40.0,
    );
}

/// A cost above a bucket's capacity is refused for good, with the bucket and the sizes.
pub async fn too_large(store: &dyn BudgetStore, namespace: u64) {
    let p = partition(namespace, 2);
    let s = scope(p, Limits::new().rpm(10).itpm(100));
    assert_eq!(
        reserve(store, &s, Cost::new(250, 0)).await,
        Admission::TooLarge {
            partition: p,
            bucket: Bucket::InputTokens,
            needed: 250,
            capacity: 100
        },
        "too_large"
    );
}

/// A limit of 0 refuses every request that needs its bucket, whatever its burst: one meaning for 0
/// in every store (not "no limit").
pub async fn zero_refuses(store: &dyn BudgetStore, namespace: u64) {
    let p = partition(namespace, 10);
    for limit in [
        Limit::per_minute(0),
        Limit {
            per_minute: 0,
            burst: Some(5),
        },
    ] {
        let s = scope(
            p,
            Limits {
                requests: Some(limit),
                ..Limits::new()
            },
        );
        for _ in 0..3 {
            assert_eq!(
                reserve(store, &s, Cost::new(1, 1)).await,
                Admission::TooLarge {
                    partition: p,
                    bucket: Bucket::Requests,
                    needed: 1,
                    capacity: 0
                },
                "zero_refuses: {limit:?}"
            );
        }
    }
}

/// The wait reported is the time the bucket needs to refill what is missing.
pub async fn wait_time(store: &dyn BudgetStore, namespace: u64) {
    let p = partition(namespace, 3);
    let s = scope(p, Limits::new().rpm(60));
    for _ in 0..60 {
        assert!(
            matches!(
                reserve(store, &s, Cost::new(0, 0)).await,
                Admission::Granted { .. }
            ),
            "wait_time: burst"
        );
    }
    match reserve(store, &s, Cost::new(0, 0)).await {
        Admission::Wait { retry_in, .. } => assert!(
            retry_in >= Duration::from_millis(900) && retry_in <= Duration::from_millis(1000),
            "wait_time: {retry_in:?}, expected about 1 s"
        ),
        other => panic!("wait_time: expected a wait, got {other:?}"),
    }
}

/// Signed adjustments refund and charge; a refund never fills a bucket past its capacity, a
/// charge may take it below zero.
pub async fn adjust(store: &dyn BudgetStore, namespace: u64) {
    let p = partition(namespace, 4);
    let limits = Limits::new().otpm(100);
    let s = scope(p, limits);
    assert!(
        matches!(
            reserve(store, &s, Cost::new(0, 100)).await,
            Admission::Granted { .. }
        ),
        "adjust: reserve"
    );
    near(
        "adjust: reserved",
        level(store, p, limits, Bucket::OutputTokens).await,
        0.0,
    );
    let d = |o: i64| Delta {
        output_tokens: o,
        ..Delta::default()
    };
    store.adjust(&s, d(-70)).await.expect("adjust");
    near(
        "adjust: refund",
        level(store, p, limits, Bucket::OutputTokens).await,
        70.0,
    );
    store.adjust(&s, d(30)).await.expect("adjust");
    near(
        "adjust: charge",
        level(store, p, limits, Bucket::OutputTokens).await,
        40.0,
    );
    store.adjust(&s, d(-500)).await.expect("adjust");
    near(
        "adjust: capped refund",
        level(store, p, limits, Bucket::OutputTokens).await,
        100.0,
    );
    store.adjust(&s, d(150)).await.expect("adjust");
    near(
        "adjust: debt",
        level(store, p, limits, Bucket::OutputTokens).await,
        -50.0,
    );
    assert!(
        matches!(
            reserve(store, &s, Cost::new(0, 1)).await,
            Admission::Wait { .. }
        ),
        "adjust: a bucket in debt admits nothing"
    );
}

/// A cooldown holds every reservation of the partition until it ends.
pub async fn cooldown(store: &dyn BudgetStore, namespace: u64) {
    let p = partition(namespace, 5);
    let s = scope(p, Limits::new().rpm(100));
    store
        .cooldown(p, Duration::from_secs(2))
        .await
        .expect("cooldown");
    match reserve(store, &s, Cost::new(0, 0)).await {
        Admission::Wait {
            retry_in, reason, ..
        } => {
            assert_eq!(reason, WaitReason::Cooldown, "cooldown: reason");
            assert!(
                retry_in > Duration::from_millis(1900) && retry_in <= Duration::from_secs(2),
                "cooldown: {retry_in:?}"
            );
        }
        other => panic!("cooldown: expected a wait, got {other:?}"),
    }
    // A shorter cooldown does not shorten it.
    store
        .cooldown(p, Duration::from_secs(1))
        .await
        .expect("cooldown");
    match reserve(store, &s, Cost::new(0, 0)).await {
        Admission::Wait { retry_in, .. } => {
            assert!(
                retry_in > Duration::from_millis(1900),
                "cooldown: shortened to {retry_in:?}"
            )
        }
        other => panic!("cooldown: expected a wait, got {other:?}"),
    }
}

/// Learned limits create buckets; a remaining count pulls a level down, never up.
pub async fn learn(store: &dyn BudgetStore, namespace: u64) {
    let p = partition(namespace, 6);
    let none = Limits::new();
    let s = scope(p, none);
    let seen = |remaining| {
        [Learned {
            bucket: Bucket::InputTokens,
            limit: Some(100),
            remaining: Some(remaining),
            inferred: false,
            unseen: 0,
        }]
    };
    store.learn(p, &seen(40)).await.expect("learn");
    near(
        "learn: seeded",
        level(store, p, none, Bucket::InputTokens).await,
        40.0,
    );
    assert!(
        matches!(
            reserve(store, &s, Cost::new(50, 0)).await,
            Admission::Wait {
                reason: WaitReason::Bucket(Bucket::InputTokens),
                ..
            }
        ),
        "learn: the learned bucket binds"
    );
    store.learn(p, &seen(80)).await.expect("learn");
    near(
        "learn: never up",
        level(store, p, none, Bucket::InputTokens).await,
        40.0,
    );
    store.learn(p, &seen(10)).await.expect("learn");
    near(
        "learn: down",
        level(store, p, none, Bucket::InputTokens).await,
        10.0,
    );
    assert!(
        matches!(
            reserve(store, &s, Cost::new(250, 0)).await,
            Admission::TooLarge { capacity: 100, .. }
        ),
        "learn: the learned capacity"
    );
}

/// A reservation over two scopes (a key and the global cap) binds on either.
pub async fn global_scope(store: &dyn BudgetStore, namespace: u64) {
    let global = PartitionKey::fingerprint(format!("conformance/{namespace}/global").as_bytes());
    let scopes = |key: u64| {
        [
            Scope {
                partition: partition(namespace, 100 + key),
                limits: Limits::new().rpm(10),
            },
            Scope {
                partition: global,
                limits: Limits::new().rpm(2),
            },
        ]
    };
    assert!(matches!(
        reserve(store, &scopes(1), Cost::new(0, 0)).await,
        Admission::Granted { .. }
    ));
    assert!(matches!(
        reserve(store, &scopes(2), Cost::new(0, 0)).await,
        Admission::Granted { .. }
    ));
    match reserve(store, &scopes(3), Cost::new(0, 0)).await {
        Admission::Wait { partition, .. } => assert_eq!(partition, global, "global_scope: binds"),
        other => panic!("global_scope: expected a wait, got {other:?}"),
    }
    // Nothing was taken from key 3's own bucket.
    near(
        "global_scope: key 3",
        level(
            store,
            partition(namespace, 103),
            Limits::new().rpm(10),
            Bucket::Requests,
        )
        .await,
        10.0,
    );
}

/// Limits travel with each call: a new limit applies at once and keeps what remains, up to its
/// capacity (a server whose limit changes keeps what remains; keeping what was used would turn a
/// halved limit into a debt of the old capacity).
pub async fn limits_change(store: &dyn BudgetStore, namespace: u64) {
    let p = partition(namespace, 7);
    let s10 = scope(p, Limits::new().rpm(10));
    assert!(matches!(
        reserve(store, &s10, Cost::new(0, 0)).await,
        Admission::Granted { .. }
    ));
    near(
        "limits_change: before",
        level(store, p, Limits::new().rpm(10), Bucket::Requests).await,
        9.0,
    );
    near(
        "limits_change: raised",
        level(store, p, Limits::new().rpm(20), Bucket::Requests).await,
        9.0,
    );
    // Dropped below what remains (9 kept as 4), and one more request.
    assert!(matches!(
        reserve(store, &scope(p, Limits::new().rpm(4)), Cost::new(0, 0)).await,
        Admission::Granted { .. }
    ));
    near(
        "limits_change: dropped below what remains",
        level(store, p, Limits::new().rpm(4), Bucket::Requests).await,
        3.0,
    );
    near(
        "limits_change: raised again",
        level(store, p, Limits::new().rpm(20), Bucket::Requests).await,
        3.0,
    );
}

/// Runs every check.
pub async fn run_all(store: &dyn BudgetStore, namespace: u64) {
    all_or_none(store, namespace).await;
    too_large(store, namespace).await;
    zero_refuses(store, namespace).await;
    wait_time(store, namespace).await;
    adjust(store, namespace).await;
    cooldown(store, namespace).await;
    learn(store, namespace).await;
    global_scope(store, namespace).await;
    limits_change(store, namespace).await;
}
