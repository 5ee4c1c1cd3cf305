//! The in-memory store's own tests.

use super::*;

fn scope(p: PartitionKey, rpm: u64) -> [Scope; 1] {
    [Scope {
        partition: p,
        limits: Limits::new().rpm(rpm),
    }]
}

/// A store with partition `id` at 600 requests a minute, made by one granted reservation.
fn with_partition(id: u64) -> (MemoryStore, PartitionKey, [Scope; 1]) {
    let store = MemoryStore::new(10);
    let p = PartitionKey::from_u64(id);
    let s = scope(p, 600);
    assert!(matches!(
        store.reserve_now(&s, Cost::new(0, 0)),
        Admission::Granted { .. }
    ));
    (store, p, s)
}

/// `n` requests of `s` admitted (or not: the level may go short).
fn take(store: &MemoryStore, s: &[Scope], n: u32) {
    for _ in 0..n {
        let _ = store.reserve_now(s, Cost::new(0, 0));
    }
}

/// The server's count, learned.
fn count(remaining: u64, unseen: u64) -> [Learned; 1] {
    [Learned {
        bucket: Bucket::Requests,
        limit: None,
        remaining: Some(remaining),
        inferred: false,
        unseen,
    }]
}

#[tokio::test(start_paused = true)]
async fn what_another_client_takes_slows_the_refill_and_is_forgotten_when_it_stops() {
    // 600 a minute (10 a second); this store takes 4 a second, the server's count shows 10
    // gone each second: another client takes 6.
    let (store, p, s) = with_partition(7);
    let level = |store: &MemoryStore| store.snapshot_now(p, s[0].limits).unwrap().buckets[0];
    store.learn_now(p, &count(5, 0));
    let mut remaining = 5;
    for _ in 0..9 {
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..4 {
            assert!(matches!(
                store.reserve_now(&s, Cost::new(0, 0)),
                Admission::Granted { .. }
            ));
        }
        // The server refilled 10 and counted 4 of ours and 6 of the other client's.
        store.learn_now(p, &count(remaining, 0));
        remaining = remaining + 10 - 4 - 6;
    }
    let foreign = store.lock().map[&p].levels[0].unwrap().foreign;
    assert!((foreign - 6.0).abs() < 0.5, "{foreign}");
    // The bucket now refills at 4 a second, not 10.
    store.learn_now(p, &count(0, 0));
    tokio::time::advance(Duration::from_secs(1)).await;
    let (l, _) = level(&store).unwrap();
    assert!((l - 4.0).abs() < 0.5, "{l}");
    // The other client stops: the server's count climbs to full, and the estimate decays.
    for r in [500, 550, 590, 599] {
        tokio::time::advance(Duration::from_secs(3)).await;
        store.learn_now(p, &count(r, 0));
    }
    let foreign = store.lock().map[&p].levels[0].unwrap().foreign;
    assert!(foreign < 1.0, "{foreign}");
}

#[tokio::test(start_paused = true)]
async fn the_first_window_begins_when_a_burst_has_emptied_the_bucket() {
    // 600 a minute; the server's bucket starts full, a burst spends it in 2.5 s: the window
    // begun full restarts at the empty count, so the first estimate comes 3 s after it (at
    // 5.5 s), from counts that no longer lag by the burst.
    let (store, p, s) = with_partition(9);
    store.learn_now(p, &count(600, 0));
    tokio::time::advance(Duration::from_millis(1500)).await;
    store.learn_now(p, &count(300, 0));
    tokio::time::advance(Duration::from_secs(1)).await;
    store.learn_now(p, &count(0, 0));
    let foreign = |store: &MemoryStore| store.lock().map[&p].levels[0].unwrap().foreign;
    // Then 4 a second of ours, and the count stays at 0: another client takes 6.
    for _ in 0..3 {
        tokio::time::advance(Duration::from_secs(1)).await;
        take(&store, &s, 4);
        store.learn_now(p, &count(0, 0));
    }
    let f = foreign(&store);
    assert!((f - 6.0).abs() < 0.5, "{f}");
}

#[tokio::test(start_paused = true)]
async fn a_window_begun_during_a_burst_restarts_at_the_first_empty_count() {
    // 600 a minute, alone on the key. The first count comes mid-burst (52), a stale one
    // after it (59); the burst's last 20 are admitted, and the count reaches 0. A window
    // from 52 would take the burst's lag for another client (14 a second, clamped to the
    // whole rate: the bucket would refill at a twentieth of it).
    let (store, p, s) = with_partition(10);
    store.learn_now(p, &count(52, 0));
    tokio::time::advance(Duration::from_millis(100)).await;
    store.learn_now(p, &count(59, 0));
    take(&store, &s, 20);
    tokio::time::advance(Duration::from_millis(900)).await;
    store.learn_now(p, &count(0, 0));
    // Then 10 a second of ours, all the server refills: nobody else.
    for _ in 0..4 {
        tokio::time::advance(Duration::from_secs(1)).await;
        take(&store, &s, 10);
        store.learn_now(p, &count(0, 0));
    }
    let foreign = store.lock().map[&p].levels[0].unwrap().foreign;
    assert!(foreign < 1.0, "{foreign}");
}

#[tokio::test(start_paused = true)]
async fn a_count_leaves_out_the_requests_still_held_inside() {
    let (store, p, s) = with_partition(8);
    // The server says 50 remain; 20 admitted here have not reached it yet.
    store.learn_now(p, &count(50, 20));
    let (l, _) = store.snapshot_now(p, s[0].limits).unwrap().buckets[0].unwrap();
    assert_eq!(l, 30.0);
    // A count never raises a level (an older answer may arrive late)...
    store.learn_now(p, &count(80, 0));
    let (l, _) = store.snapshot_now(p, s[0].limits).unwrap().buckets[0].unwrap();
    assert_eq!(l, 30.0);
    // ...but a 429 read by the inference sets it: the server is empty now.
    store.learn_now(
        p,
        &[Learned {
            inferred: true,
            ..count(0, 5)[0]
        }],
    );
    let (l, _) = store.snapshot_now(p, s[0].limits).unwrap().buckets[0].unwrap();
    assert_eq!(l, -5.0);
}

#[tokio::test(start_paused = true)]
async fn a_refill_is_never_counted_twice_when_the_clock_is_read_out_of_order() {
    let t0 = Instant::now();
    let mut l = Level::full(Limit::per_minute(60), t0);
    l.level = 0.0;
    tokio::time::advance(Duration::from_secs(10)).await;
    let t1 = Instant::now();
    assert_eq!(l.at(t1), 10.0);
    // A caller that read the clock before another took the lock comes second.
    assert_eq!(l.at(t0 + Duration::from_secs(5)), 10.0);
    assert_eq!(l.at(t1), 10.0, "the 5 s in between were counted twice");
}

#[tokio::test(start_paused = true)]
async fn a_busy_key_keeps_its_debt_under_a_flood_of_new_keys() {
    let store = MemoryStore::new(100);
    let busy = scope(PartitionKey::fingerprint(b"sk-busy"), 50);
    let mut admitted = 0;
    let mut n = 0u64;
    // 20 s in steps of 100 ms; 200 new keys a step, twice the store's bound.
    for _ in 0..200 {
        if matches!(
            store.reserve_now(&busy, Cost::new(0, 0)),
            Admission::Granted { .. }
        ) {
            admitted += 1;
        }
        for _ in 0..200 {
            n += 1;
            let key = PartitionKey::fingerprint(&n.to_le_bytes());
            let _ = store.reserve_now(&scope(key, 50), Cost::new(0, 0));
        }
        tokio::time::advance(Duration::from_millis(100)).await;
    }
    // 50 at once, then 50 a minute: at most 50 + 50/60 x 20 = 66.7 in 20 s.
    assert!((60..=67).contains(&admitted), "admitted {admitted}");
    assert!(store.len() <= 100);
}

#[tokio::test(start_paused = true)]
async fn a_full_store_makes_a_new_key_wait_until_a_partition_is_idle() {
    let store = MemoryStore::new(2);
    let key = PartitionKey::from_u64;
    for k in [1, 3] {
        assert!(matches!(
            store.reserve_now(&scope(key(k), 60), Cost::new(0, 0)),
            Admission::Granted { .. }
        ));
    }
    // Both partitions owe a request, refilled in 1 s: nothing may be forgotten before then.
    assert_eq!(
        store.reserve_now(&scope(key(5), 60), Cost::new(0, 0)),
        Admission::Wait {
            retry_in: Duration::from_secs(1),
            partition: key(5),
            reason: WaitReason::StoreFull,
        }
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(matches!(
        store.reserve_now(&scope(key(5), 60), Cost::new(0, 0)),
        Admission::Granted { .. }
    ));
    assert_eq!(store.len(), 2);
    // The global cap's partition is never forgotten and does not count toward the bound.
    let global = [Scope {
        partition: PartitionKey::GLOBAL,
        limits: Limits::new().rpm(60),
    }];
    assert!(matches!(
        store.reserve_now(&global, Cost::new(0, 0)),
        Admission::Granted { .. }
    ));
    assert_eq!(store.len(), 3);
}

/// The idle index may say a partition is idle earlier than it is (a reservation does not move its
/// entry): at the bound, an entry found early is moved to its true time, a busy key is never
/// forgotten, an idle one is, and the wait for room is the earliest true one.
#[tokio::test(start_paused = true)]
async fn a_stale_idle_entry_never_forgets_a_busy_key() {
    let store = MemoryStore::new(2);
    let key = PartitionKey::from_u64;
    let one = |k| store.reserve_now(&scope(key(k), 60), Cost::new(0, 0));
    assert!(matches!(one(1), Admission::Granted { .. }));
    assert!(matches!(one(3), Admission::Granted { .. }));
    // Key 1 takes 30 more at 0.5 s: busy until about 31 s, though its entry still says 0 s.
    tokio::time::advance(Duration::from_millis(500)).await;
    for _ in 0..30 {
        assert!(matches!(one(1), Admission::Granted { .. }));
    }
    // At 2 s key 3 is idle (since 1 s): a new key takes its place, never key 1's.
    tokio::time::advance(Duration::from_millis(1_500)).await;
    assert!(matches!(one(5), Admission::Granted { .. }));
    let limits = Limits::new().rpm(60);
    assert!(
        store.snapshot_now(key(3), limits).is_none(),
        "idle key 3 forgotten"
    );
    let (level, _) = store.snapshot_now(key(1), limits).unwrap().buckets[0].unwrap();
    assert!((level - 31.0).abs() < 0.01, "busy key 1 kept: {level}");
    // Now both are busy: key 5 until 3 s, key 1 until 31 s. A new key waits for key 5.
    match one(7) {
        Admission::Wait {
            retry_in, reason, ..
        } => {
            assert_eq!(reason, WaitReason::StoreFull);
            assert_eq!(retry_in, Duration::from_secs(1));
        }
        other => panic!("{other:?}"),
    }
}
