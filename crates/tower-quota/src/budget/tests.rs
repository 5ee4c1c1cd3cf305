use super::*;
use crate::budget::store::{Admission, Scope};
use crate::partition::PartitionKey;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{Instant, advance};
use tower::{Layer, Service, ServiceExt, service_fn};

type Req = Request<Full<Bytes>>;

fn messages(key: &str, prompt: &str, max_tokens: u64) -> Req {
    let body = format!(
        r#"{{"model":"m","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"{prompt}"}}]}}"#
    );
    Request::builder()
        .header("x-api-key", key)
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn costed(key: &str, cost: Cost) -> Req {
    let mut r = messages(key, "", 1);
    r.extensions_mut().insert(cost);
    r
}

/// An upstream that answers 200 with `usage` of (input, output) and records arrival times.
#[derive(Clone)]
struct Upstream {
    usage: (u64, u64),
    arrivals: Arc<Mutex<Vec<(Instant, u64)>>>,
}

impl Upstream {
    fn new(usage: (u64, u64)) -> Self {
        Self {
            usage,
            arrivals: Arc::default(),
        }
    }
}

impl Service<Req> for Upstream {
    type Response = Response<Full<Bytes>>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let tag = req.extensions().get::<Cost>().map_or(0, |c| c.input_tokens);
        self.arrivals.lock().unwrap().push((Instant::now(), tag));
        let body = format!(
            r#"{{"usage":{{"input_tokens":{},"output_tokens":{}}}}}"#,
            self.usage.0, self.usage.1
        );
        std::future::ready(Ok(Response::new(Full::new(Bytes::from(body)))))
    }
}

async fn level(store: &MemoryStore, key: &str, limits: Limits, b: Bucket) -> f64 {
    store
        .snapshot(PartitionKey::fingerprint(key.as_bytes()), limits)
        .await
        .unwrap()
        .unwrap()
        .bucket(b)
        .unwrap()
        .0
}

#[tokio::test(start_paused = true)]
async fn the_memory_store_passes_the_conformance_suite() {
    conformance::run_all(&MemoryStore::default(), 1).await;
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_in_fifo_order_and_a_large_request_is_not_starved() {
    let limits = Limits::new().itpm(600); // 10 tokens/s
    let up = Upstream::new((0, 0));
    let svc = TokenBudgetLayer::new(limits)
        .reconcile(false)
        .layer(up.clone());
    // Drain the bucket, then queue: small, large, small, small...
    svc.clone()
        .oneshot(costed("k", Cost::new(600, 0)))
        .await
        .unwrap();
    let mut set = tokio::task::JoinSet::new();
    let order = [5u64, 500, 5, 5, 5, 5];
    for (i, &n) in order.iter().enumerate() {
        let svc = svc.clone();
        set.spawn(async move { svc.oneshot(costed("k", Cost::new(n, 0))).await.map(|_| i) });
        // Let each task enqueue before the next one.
        tokio::task::yield_now().await;
    }
    while set.join_next().await.is_some() {}
    let arrivals: Vec<u64> = up
        .arrivals
        .lock()
        .unwrap()
        .iter()
        .skip(1)
        .map(|a| a.1)
        .collect();
    assert_eq!(arrivals, order, "served in arrival order");
    // The small ones behind the large one waited for it: none overtook it.
    let times: Vec<Instant> = up.arrivals.lock().unwrap().iter().map(|a| a.0).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]));
}

#[tokio::test(start_paused = true)]
async fn an_oversized_request_fails_fast_naming_the_bucket() {
    let up = Upstream::new((0, 0));
    let svc = TokenBudgetLayer::new(Limits::new().itpm(30_000).otpm(8_000)).layer(up.clone());
    let t0 = Instant::now();
    let err = svc
        .oneshot(messages("k", "hi", 10_000))
        .await
        .unwrap_err()
        .downcast::<BudgetError>()
        .unwrap();
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert!(err.is_too_large(), "{err:?}");
    assert_eq!(err.bucket(), Some(Bucket::OutputTokens));
    assert_eq!(err.needed_and_capacity(), Some((10_000, 8_000)));
    assert_eq!(err.retry_at(), None);
    assert!(err.to_string().contains("output tokens"), "{err}");
    assert!(err.to_string().contains("over by 2000"), "{err}");
    assert!(up.arrivals.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn usage_in_the_body_settles_the_reservation() {
    let limits = Limits::new().otpm(1000);
    let store = Arc::new(MemoryStore::default());
    let svc = TokenBudgetLayer::new(limits)
        .shared_store(store.clone())
        .layer(Upstream::new((7, 30)));
    let res = svc
        .clone()
        .oneshot(messages("k", "hello", 500))
        .await
        .unwrap();
    let h = res.extensions().get::<ReservationHandle>().unwrap().clone();
    assert_eq!(h.estimate().output_tokens, 500);
    assert_eq!(
        level(&store, "k", limits, Bucket::OutputTokens).await,
        500.0
    );
    res.into_body().collect().await.unwrap();
    assert_eq!(h.settled(), Some(Cost::new(7, 30)));
    assert_eq!(
        level(&store, "k", limits, Bucket::OutputTokens).await,
        970.0
    );
    // A body dropped unread keeps its estimate.
    let res = svc
        .clone()
        .oneshot(messages("k", "hello", 500))
        .await
        .unwrap();
    drop(res);
    assert_eq!(
        level(&store, "k", limits, Bucket::OutputTokens).await,
        470.0
    );
}

#[tokio::test(start_paused = true)]
async fn the_caller_can_settle_through_the_handle_once() {
    let limits = Limits::new().itpm(1000).otpm(1000);
    let store = Arc::new(MemoryStore::default());
    let svc = TokenBudgetLayer::new(limits)
        .shared_store(store.clone())
        .reconcile(false)
        .layer(Upstream::new((1, 1)));
    let res = svc
        .oneshot(messages("k", &"x".repeat(400), 500))
        .await
        .unwrap();
    let h = res.extensions().get::<ReservationHandle>().unwrap().clone();
    assert_eq!(h.estimate(), Cost::new(100 + 4 + 3, 500));
    res.into_body().collect().await.unwrap();
    assert_eq!(
        h.settled(),
        None,
        "reconcile(false) leaves it to the caller"
    );
    assert!(h.report_usage(120, 50));
    assert!(!h.report_usage(1, 1), "settles once");
    assert_eq!(level(&store, "k", limits, Bucket::InputTokens).await, 880.0);
    assert_eq!(
        level(&store, "k", limits, Bucket::OutputTokens).await,
        950.0
    );
    assert!(!format!("{h:?}").contains("sk-"));
}

#[tokio::test(start_paused = true)]
async fn a_request_never_sent_refunds_everything() {
    let limits = Limits::new().rpm(10).itpm(1000);
    let store = Arc::new(MemoryStore::default());
    let (mock, mut handle) = tower_test::mock::pair::<Req, Response<Full<Bytes>>>();
    handle.allow(0);
    let svc = TokenBudgetLayer::new(limits)
        .shared_store(store.clone())
        .layer(mock);
    let mut call = tokio_test::task::spawn(svc.oneshot(costed("k", Cost::new(100, 0))));
    tokio_test::assert_pending!(call.poll());
    // Reserved, waiting for the inner service to be ready.
    assert_eq!(level(&store, "k", limits, Bucket::InputTokens).await, 900.0);
    drop(call);
    assert_eq!(
        level(&store, "k", limits, Bucket::InputTokens).await,
        1000.0
    );
    assert_eq!(level(&store, "k", limits, Bucket::Requests).await, 10.0);

    // A connection that could not be made refunds too.
    let refused = service_fn(|_: Req| async {
        Err::<Response<Full<Bytes>>, _>(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
    });
    let svc = TokenBudgetLayer::new(limits)
        .shared_store(store.clone())
        .layer(refused);
    svc.oneshot(costed("k", Cost::new(100, 0)))
        .await
        .unwrap_err();
    assert_eq!(
        level(&store, "k", limits, Bucket::InputTokens).await,
        1000.0
    );
}

#[tokio::test(start_paused = true)]
async fn refused_requests_give_back_and_429s_pause_the_partition() {
    let limits = Limits::new().rpm(100);
    let store = Arc::new(MemoryStore::default());
    let answers = Arc::new(Mutex::new(vec![429u16, 200]));
    let a = answers.clone();
    let inner = service_fn(move |_: Req| {
        let code = a.lock().unwrap().remove(0);
        async move {
            Ok::<_, std::io::Error>(
                Response::builder()
                    .status(code)
                    .header("retry-after", "5")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
        }
    });
    let svc = TokenBudgetLayer::new(limits)
        .shared_store(store.clone())
        .layer(inner);
    let t0 = Instant::now();
    let res = svc
        .clone()
        .oneshot(costed("k", Cost::new(0, 0)))
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(level(&store, "k", limits, Bucket::Requests).await, 100.0);
    svc.oneshot(costed("k", Cost::new(0, 0))).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn limits_are_learned_from_the_headers() {
    let store = Arc::new(MemoryStore::default());
    let inner = service_fn(|_: Req| async {
        Ok::<_, std::io::Error>(
            Response::builder()
                .header("anthropic-ratelimit-requests-limit", "60")
                .header("anthropic-ratelimit-requests-remaining", "2")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
    });
    let svc = TokenBudgetLayer::new(Limits::new())
        .shared_store(store.clone())
        .layer(inner);
    svc.clone()
        .oneshot(costed("k", Cost::new(0, 0)))
        .await
        .unwrap();
    let snap = store
        .snapshot(PartitionKey::fingerprint(b"k"), Limits::new())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(snap.bucket(Bucket::Requests), Some((2.0, 60)));
    // Two more fit at once; the next waits a second for the refill.
    let t0 = Instant::now();
    for _ in 0..3 {
        svc.clone()
            .oneshot(costed("k", Cost::new(0, 0)))
            .await
            .unwrap();
    }
    assert_eq!(t0.elapsed(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn the_request_bucket_admits_what_governor_admits() {
    use crate::clock::TokioClock;
    use governor::{Quota, RateLimiter};
    use std::num::NonZeroU32;
    let clock = TokioClock;
    let gov =
        RateLimiter::direct_with_clock(Quota::per_minute(NonZeroU32::new(120).unwrap()), clock);
    let store = MemoryStore::default();
    let scopes = [Scope {
        partition: PartitionKey::from_u64(9),
        limits: Limits::new().rpm(120),
    }];
    // Arrivals every 100 ms to 900 ms, in a seeded pattern, for two minutes.
    let mut x: u64 = 42;
    let (mut ours, mut theirs) = (0, 0);
    for _ in 0..400 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        advance(Duration::from_millis(100 * (1 + (x >> 33) % 9))).await;
        for _ in 0..((x >> 40) % 4) {
            let a = matches!(
                store.reserve_now(&scopes, Cost::new(0, 0)),
                Admission::Granted { .. }
            );
            let b = gov.check().is_ok();
            assert_eq!(a, b, "after {ours} admissions");
            ours += u32::from(a);
            theirs += u32::from(b);
        }
    }
    assert_eq!(ours, theirs);
    assert!(ours > 200);
}

#[tokio::test(start_paused = true)]
async fn partitions_are_bounded() {
    let store = MemoryStore::new(100);
    let limits = Limits::new().rpm(10);
    for i in 0..1000u64 {
        let scopes = [Scope {
            partition: PartitionKey::from_u64(i * 2 + 1),
            limits,
        }];
        store.reserve_now(&scopes, Cost::new(0, 0));
        advance(Duration::from_secs(7)).await; // a spent request refills in 6 s: idle again
    }
    assert!(store.len() <= 100, "{}", store.len());
}

#[tokio::test(start_paused = true)]
async fn three_keys_each_held_to_their_own_and_a_global_cap_over_them() {
    let up = Upstream::new((0, 0));
    let svc = TokenBudgetLayer::new(Limits::new().rpm(60))
        .global_cap(Limits::new().rpm(90))
        .reconcile(false)
        .layer(up.clone());
    let mut set = tokio::task::JoinSet::new();
    for key in ["a", "b", "c"] {
        for _ in 0..100 {
            let svc = svc.clone();
            set.spawn(async move { svc.oneshot(costed(key, Cost::new(0, 0))).await.unwrap() });
        }
    }
    while set.join_next().await.is_some() {}
    let arrivals = up.arrivals.lock().unwrap().clone();
    let t0 = arrivals[0].0;
    // At t = 0 the global cap binds first (90 of the 180 the three keys hold).
    let first = arrivals.iter().filter(|a| a.0 == t0).count();
    assert_eq!(first, 90);
    // Over the run: 90 burst + 1.5/s.
    let span = (arrivals.last().unwrap().0 - t0).as_secs_f64();
    assert!((span - 140.0).abs() < 1.0, "{span}");
}

#[tokio::test(start_paused = true)]
async fn a_wait_past_the_cap_fails_fast_with_retry_at() {
    let up = Upstream::new((0, 0));
    let svc = TokenBudgetLayer::new(Limits::new().rpm(1))
        .max_wait(Some(Duration::from_secs(10)))
        .layer(up.clone());
    svc.clone().oneshot(messages("k", "hi", 10)).await.unwrap();
    let t0 = Instant::now();
    let err = svc.oneshot(messages("k", "hi", 10)).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::ZERO);
    let at = crate::retry_at(&*err).unwrap();
    assert!(at >= t0 + Duration::from_secs(59) && at <= t0 + Duration::from_secs(60));
    let err = err.downcast::<BudgetError>().unwrap();
    assert!(err.is_wait_too_long() && !err.is_too_large());
    let shown = err.to_string();
    tokio::time::advance(Duration::from_secs(3)).await;
    assert_eq!(
        err.to_string(),
        shown,
        "the message does not read the clock"
    );
}

/// Issue 10, finding 7: a flood of waiters of one key is bounded; past the bound a call fails at
/// once with `QueueFull` and a `retry_at`, and the others of the queue are unaffected.
#[tokio::test(start_paused = true)]
async fn the_queue_of_a_partition_is_bounded() {
    use crate::error::QueueFull;
    let up = Upstream::new((1, 1));
    let layer = TokenBudgetLayer::new(Limits::new().rpm(60).itpm(1_000_000).otpm(1_000_000))
        .max_queue(100)
        .max_wait(None);
    let svc = layer.clone().layer(up.clone());
    // The bucket's 60, then 100 waiters: the 101st waiter is refused.
    let mut held = Vec::new();
    for _ in 0..160 {
        let mut t = tokio_test::task::spawn(svc.clone().oneshot(messages("k", "hi", 10)));
        let _ = t.poll();
        held.push(t);
    }
    assert_eq!(layer.handle().queued(), 100);
    let t0 = Instant::now();
    let err = svc
        .clone()
        .oneshot(messages("k", "hi", 10))
        .await
        .unwrap_err();
    assert_eq!(t0.elapsed(), Duration::ZERO);
    let at = crate::retry_at(&*err).unwrap();
    let full = err.downcast::<QueueFull>().unwrap();
    assert_eq!(full.waiting(), 100);
    // 100 ahead at 60 a minute: about 100 s.
    assert!(
        at >= t0 + Duration::from_secs(90) && at <= t0 + Duration::from_secs(110),
        "{:?}",
        at - t0
    );
    // Another key has a queue of its own.
    let mut other = tokio_test::task::spawn(svc.clone().oneshot(messages("k2", "hi", 10)));
    assert!(other.poll().is_ready());
    drop(held);
    assert_eq!(layer.handle().queued(), 0);
}

/// Requests queued for a partition's FIFO turn only because it is being handed over (the store
/// has room) do not hold up a request that arrives meanwhile: it is admitted at once. (Before,
/// a queue for the turn, once formed under load, admitted one request per task wake-up: a proxy
/// in front of an instant server did 4 000 requests a second where 20 000 fit.)
#[tokio::test(start_paused = true)]
async fn a_turn_being_handed_over_does_not_hold_up_a_request_when_there_is_room() {
    let layer = TokenBudgetLayer::new(
        Limits::new()
            .rpm(1_000)
            .itpm(1_000_000)
            .otpm(1_000_000)
            .tpm(2_000_000),
    );
    let key = "sk-turn";
    let own = layer
        .shared()
        .queue(PartitionKey::fingerprint(key.as_bytes()));
    // The turn is held (as it is between one holder's release and the next waiter's first poll).
    let held = own.queue.clone().acquire_owned().await.unwrap();
    let svc = layer.layer(Upstream::new((1, 1)));
    let res = tokio::time::timeout(
        Duration::from_secs(1),
        svc.clone().oneshot(costed(key, Cost::new(1, 1))),
    )
    .await
    .expect("admitted without the turn: the store has room");
    assert!(res.unwrap().status().is_success());
    // Once the store has made a request wait, requests take the turn again (FIFO).
    own.bound.store(true, std::sync::atomic::Ordering::Relaxed);
    let queued = tokio::time::timeout(
        Duration::from_secs(1),
        svc.oneshot(costed(key, Cost::new(1, 1))),
    )
    .await;
    assert!(
        queued.is_err(),
        "a bound partition's requests queue for the turn"
    );
    drop(held);
}
