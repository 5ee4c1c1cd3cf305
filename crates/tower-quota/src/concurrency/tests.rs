use super::*;
use crate::partition::PartitionKey;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use std::time::Duration;
use tower::{Layer, ServiceExt};

type Mock = tower_test::mock::Mock<Request<String>, Response<Full<Bytes>>>;
type Handle = tower_test::mock::Handle<Request<String>, Response<Full<Bytes>>>;

fn req(key: &str, tag: &str) -> Request<String> {
    Request::builder()
        .header("x-api-key", key)
        .body(tag.to_owned())
        .unwrap()
}

fn ok(body: &'static str) -> Response<Full<Bytes>> {
    Response::new(Full::new(Bytes::from_static(body.as_bytes())))
}

fn mock() -> (Mock, Handle) {
    let (m, mut h) = tower_test::mock::pair();
    h.allow(1000);
    (m, h)
}

#[tokio::test]
async fn one_limit_for_every_clone_and_service_fifo_and_released_with_the_body() {
    let layer = ConcurrencyLimitLayer::fixed(2);
    let handle = layer.handle();
    let (m, mut h) = mock();
    let a = layer.layer(m.clone());
    let b = layer.clone().layer(m);
    let mut calls = Vec::new();
    for (i, svc) in [a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .enumerate()
    {
        let mut t = tokio_test::task::spawn(svc.oneshot(req("k", &i.to_string())));
        tokio_test::assert_pending!(t.poll());
        calls.push(t);
    }
    assert_eq!(handle.in_flight(), 2);
    assert_eq!(handle.queued(), 2);
    // The first two reached the inner service.
    let (r0, s0) = h.next_request().await.unwrap();
    let (r1, s1) = h.next_request().await.unwrap();
    assert_eq!((r0.body().as_str(), r1.body().as_str()), ("0", "1"));
    s0.send_response(ok("zero"));
    let res0 = tokio_test::assert_ready_ok!(calls[0].poll());
    // The response is back but its body still holds the slot.
    assert!(res0.body().holds_slot());
    tokio_test::assert_pending!(calls[2].poll());
    assert_eq!(handle.in_flight(), 2);
    // Reading the body to its end frees the slot for the next in line (FIFO: "2", not "3").
    assert_eq!(res0.into_body().collect().await.unwrap().to_bytes(), "zero");
    assert!(calls[2].is_woken());
    tokio_test::assert_pending!(calls[2].poll());
    tokio_test::assert_pending!(calls[3].poll());
    let (r2, _s2) = h.next_request().await.unwrap();
    assert_eq!(r2.body(), "2");
    // Dropping a response unread frees its slot too.
    s1.send_response(ok("one"));
    let res1 = tokio_test::assert_ready_ok!(calls[1].poll());
    drop(res1);
    tokio_test::assert_pending!(calls[3].poll());
    let (r3, _s3) = h.next_request().await.unwrap();
    assert_eq!(r3.body(), "3");
    drop(calls);
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(handle.queued(), 0);
    assert_eq!(handle.available(), 2);
}

#[tokio::test]
async fn dropping_a_waiting_or_pending_future_returns_everything() {
    let layer = ConcurrencyLimitLayer::fixed(1);
    let handle = layer.handle();
    let (m, mut h) = mock();
    let svc = layer.layer(m);
    let mut first = tokio_test::task::spawn(svc.clone().oneshot(req("k", "a")));
    tokio_test::assert_pending!(first.poll());
    let mut second = tokio_test::task::spawn(svc.clone().oneshot(req("k", "b")));
    tokio_test::assert_pending!(second.poll());
    assert_eq!(handle.queued(), 1);
    drop(second);
    assert_eq!(handle.queued(), 0);
    let _ = h.next_request().await.unwrap();
    drop(first);
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(handle.available(), 1);
}

#[tokio::test]
async fn per_partition_limits_with_a_global_cap() {
    let layer = ConcurrencyLimitLayer::fixed(2)
        .per_partition(100)
        .global_cap(3);
    let handle = layer.handle();
    let (m, _h) = mock();
    let svc = layer.layer(m);
    let mut calls = Vec::new();
    for key in ["a", "a", "a", "b", "b", "c"] {
        let mut t = tokio_test::task::spawn(svc.clone().oneshot(req(key, key)));
        let _ = t.poll();
        calls.push(t);
    }
    // a: 2 (its limit), b: 1 (the global cap of 3 is reached), c: 0.
    assert_eq!(handle.in_flight(), 3);
    assert_eq!(
        handle.partition_limit(PartitionKey::fingerprint(b"a")),
        Some(2)
    );
    assert_eq!(handle.partitions(), 3);
    drop(calls);
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(handle.queued(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_adaptive_limit_shrinks_on_429s_seen_per_attempt() {
    let layer = ConcurrencyLimitLayer::adaptive(Aimd {
        initial: 10,
        ..Aimd::default()
    });
    let handle = layer.handle();
    let svc = layer.layer(tower::service_fn(|_: Request<String>| async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok::<_, std::io::Error>(
            Response::builder()
                .status(429)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
    }));
    for _ in 0..5 {
        let _ = svc.clone().oneshot(req("k", "")).await.unwrap();
        tokio::time::advance(Duration::from_millis(20)).await;
    }
    // 10 * 0.9^5 = 5.9: five decreases, one per round trip.
    assert_eq!(handle.limit(), 5);
}

#[tokio::test]
async fn one_limit_for_all_reserves_its_slot_in_poll_ready() {
    let layer = ConcurrencyLimitLayer::fixed(1);
    let (m, mut h) = mock();
    let mut a = tower_test::mock::Spawn::new(layer.layer(m.clone()));
    let mut b = tower_test::mock::Spawn::new(layer.layer(m));
    tokio_test::assert_ready_ok!(a.poll_ready());
    let first = a.call(req("k", "a"));
    // The slot is taken: another service of the layer is not ready until it comes back.
    tokio_test::assert_pending!(b.poll_ready());
    assert_eq!(layer.handle().queued(), 1);
    let mut first = tokio_test::task::spawn(first);
    tokio_test::assert_pending!(first.poll());
    let (_, send) = h.next_request().await.unwrap();
    send.send_response(ok("a"));
    let res = tokio_test::assert_ready_ok!(first.poll());
    tokio_test::assert_pending!(b.poll_ready());
    drop(res);
    assert!(b.is_woken());
    tokio_test::assert_ready_ok!(b.poll_ready());
    // A clone does not carry the reservation.
    let mut c = tower_test::mock::Spawn::new(b.get_ref().clone());
    tokio_test::assert_pending!(c.poll_ready());
    // Dropping a reserving service returns its slot.
    drop(b);
    assert!(c.is_woken());
    tokio_test::assert_ready_ok!(c.poll_ready());
}

#[tokio::test]
async fn load_shed_in_front_of_a_full_limit_sheds() {
    let (m, _h) = mock();
    let svc = tower::ServiceBuilder::new()
        .load_shed()
        .layer(ConcurrencyLimitLayer::fixed(1))
        .service(m);
    let mut held = tokio_test::task::spawn(svc.clone().oneshot(req("k", "held")));
    tokio_test::assert_pending!(held.poll());
    let shed = svc.oneshot(req("k", "shed")).await.unwrap_err();
    assert!(shed.is::<tower::load_shed::error::Overloaded>(), "{shed}");
}

#[tokio::test]
async fn per_partition_limits_are_always_ready_and_wait_in_the_future() {
    let layer = ConcurrencyLimitLayer::fixed(1).per_partition(16);
    let (m, _h) = mock();
    let mut a = tower_test::mock::Spawn::new(layer.layer(m));
    tokio_test::assert_ready_ok!(a.poll_ready());
    let mut first = tokio_test::task::spawn(a.call(req("k", "a")));
    tokio_test::assert_pending!(first.poll());
    tokio_test::assert_ready_ok!(a.poll_ready());
    let mut second = tokio_test::task::spawn(a.call(req("k", "b")));
    tokio_test::assert_pending!(second.poll());
    assert_eq!(layer.handle().queued(), 1);
}

/// Issue 10, finding 7: the requests waiting for a slot are bounded; one more fails at once with
/// `QueueFull` and a `retry_at`.
#[tokio::test(start_paused = true)]
async fn the_queue_for_a_slot_is_bounded() {
    use crate::error::QueueFull;
    for layer in [
        ConcurrencyLimitLayer::fixed(1).max_queue(3),
        ConcurrencyLimitLayer::fixed(1)
            .per_partition(8)
            .max_queue(3),
    ] {
        let (m, _h) = mock();
        let svc = layer.layer(m);
        let mut held = Vec::new();
        for i in 0..4 {
            let mut t = tokio_test::task::spawn(svc.clone().oneshot(req("k", &i.to_string())));
            tokio_test::assert_pending!(t.poll());
            held.push(t);
        }
        assert_eq!(layer.handle().queued(), 3);
        let t0 = tokio::time::Instant::now();
        let err = svc.clone().oneshot(req("k", "refused")).await.unwrap_err();
        assert_eq!(t0.elapsed(), Duration::ZERO);
        assert!(crate::retry_at(&*err).is_some_and(|at| at > t0));
        let full = err.downcast::<QueueFull>().unwrap();
        assert_eq!(full.waiting(), 3);
        drop(held);
        assert_eq!(layer.handle().queued(), 0);
    }
}
