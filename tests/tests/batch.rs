//! The batch layer against the simulator's Message Batches API, under paused time.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_quota::BoxError;
use tower_quota::batch::{BatchError, BatchLayer, Batched, Deferrable};
use tower_quota::budget::Limits;
use tower_quota::{Preset, ServiceBuilderExt};
use tower_quota_sim::{MessagesRequest, SimConfig, Simulator};

fn sim(batch_rps: f64) -> Simulator {
    let mut cfg = SimConfig::new(tower_quota_sim::Limits::new(50, 30_000, 8_000));
    cfg.batch_rps = batch_rps;
    Simulator::new(cfg)
}

fn request(max_tokens: u64) -> http::Request<Full<Bytes>> {
    let body = MessagesRequest::user("claude-sonnet-5-5", "Classify this.", max_tokens).to_bytes();
    http::Request::post("/v1/messages")
        .header("x-api-key", "sk-batch")
        .body(Full::new(body))
        .unwrap()
}

/// The layer over the recommended stack over the simulator.
fn stack(
    layer: BatchLayer,
    sim: &Simulator,
) -> impl Service<
    http::Request<Full<Bytes>>,
    Response = http::Response<
        tower_quota::batch::BatchBody<tower_quota::body::PresetBody<tower_quota_sim::SimBody>>,
    >,
    Error = BoxError,
    Future: Send,
> + Clone
+ Send
+ 'static {
    layer.layer(
        ServiceBuilder::new()
            .quota_stack(Preset::anthropic(
                Limits::new().rpm(50).itpm(30_000).otpm(8_000),
            ))
            .service(sim.clone()),
    )
}

async fn json(
    res: http::Response<impl hyper::body::Body<Error: std::fmt::Debug>>,
) -> serde_json::Value {
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test(start_paused = true)]
async fn ten_thousand_deferrable_requests_make_one_batch_and_no_messages_call() {
    let sim = sim(1_000.0);
    let layer = BatchLayer::new().all(true);
    let api = stack(layer.clone(), &sim);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..10_000u64 {
        let api = api.clone();
        // Each asks for its own max_tokens: the simulator writes that many, so each caller can
        // tell its own answer.
        tasks.spawn(async move {
            let res = api.oneshot(request(1 + i)).await.unwrap();
            assert!(res.extensions().get::<Batched>().is_some());
            assert_eq!(res.status(), 200);
            (i, json(res).await)
        });
    }
    while let Some(done) = tasks.join_next().await {
        let (i, message) = done.unwrap();
        assert_eq!(message["type"], "message");
        assert_eq!(
            message["usage"]["output_tokens"],
            1 + i,
            "request {i} got another's answer"
        );
    }
    let calls = sim.batch_calls();
    assert!(calls.created <= 2, "{calls:?}");
    assert_eq!(calls.requests, 10_000);
    assert_eq!(
        sim.summary().total.requests,
        0,
        "no request reached /v1/messages"
    );
    assert_eq!(layer.handle().delivered(), 10_000);
    // 10 s of processing at 1 000 a second: polled at 1, 2.5, 4.75, 8.1, 13.2 s or so.
    assert!(layer.handle().polls() <= 8, "{:?}", layer.handle().polls());
}

#[tokio::test(start_paused = true)]
async fn an_errored_request_gets_its_own_status_and_body_and_an_expired_one_a_typed_error() {
    // 50 000 s a request: the first ends within the 24 hours, the second would not.
    let sim = sim(1.0 / 50_000.0);
    let api = stack(BatchLayer::new().all(true), &sim);
    let no_max_tokens = http::Request::post("/v1/messages")
        .header("x-api-key", "sk-batch")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"claude-sonnet-5-5","messages":[{"role":"user","content":"Hi"}]}"#,
        )))
        .unwrap();
    let errored = tokio::spawn(api.clone().oneshot(no_max_tokens));
    let expired = tokio::spawn(api.clone().oneshot(request(16)));
    let res = errored.await.unwrap().unwrap();
    assert_eq!(res.status(), 400);
    let body = json(res).await;
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let Err(e) = expired.await.unwrap() else {
        panic!("the expired request was answered")
    };
    let e = e.downcast_ref::<BatchError>().expect("typed");
    assert!(e.is_expired(), "{e}");
}

#[tokio::test(start_paused = true)]
async fn a_batch_canceled_elsewhere_answers_its_unprocessed_requests_with_a_typed_error() {
    let sim = sim(1.0 / 600.0); // ten minutes a request
    let api = stack(BatchLayer::new().all(true), &sim);
    let first = tokio::spawn(api.clone().oneshot(request(8)));
    let second = tokio::spawn(api.clone().oneshot(request(8)));
    tokio::time::sleep(Duration::from_secs(700)).await; // the first is done
    let mut direct = sim.clone();
    let list = http::Request::get("/v1/messages/batches")
        .header("x-api-key", "sk-batch")
        .body(Full::<Bytes>::default())
        .unwrap();
    let listed = json(direct.call(list).await.unwrap()).await;
    let id = listed["data"][0]["id"].as_str().unwrap().to_owned();
    let cancel = http::Request::post(format!("/v1/messages/batches/{id}/cancel"))
        .header("x-api-key", "sk-batch")
        .body(Full::<Bytes>::default())
        .unwrap();
    assert_eq!(direct.call(cancel).await.unwrap().status(), 200);
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    let Err(e) = second.await.unwrap() else {
        panic!("the canceled request was answered")
    };
    assert!(e.downcast_ref::<BatchError>().unwrap().is_canceled(), "{e}");
}

#[tokio::test(start_paused = true)]
async fn a_caller_gone_before_submission_is_absent_and_all_gone_cancels_the_batch() {
    let sim = sim(1.0 / 600.0);
    let layer = BatchLayer::new().all(true);
    let api = stack(layer.clone(), &sim);
    let calls: Vec<_> = (0..3)
        .map(|_| tokio::spawn(api.clone().oneshot(request(8))))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    calls[0].abort(); // before the 2 s window ends: left out
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        sim.batch_calls().requests,
        2,
        "the caller gone before submission is absent"
    );
    for c in &calls[1..] {
        c.abort(); // every caller of the submitted batch gone
    }
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(
        sim.batch_calls().canceled,
        1,
        "canceled once every caller was gone"
    );
    assert_eq!(layer.handle().canceled(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_hour_long_batch_is_polled_at_most_about_eighty_times() {
    let sim = sim(1.0); // 3 600 requests: an hour
    let layer = BatchLayer::new().all(true).max_requests(3_600);
    let api = stack(layer.clone(), &sim);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..3_600 {
        tasks.spawn(api.clone().oneshot(request(8)));
    }
    // Half an hour in, the handle shows the batch as its last poll (at most a minute old)
    // counted it.
    tokio::time::sleep(Duration::from_secs(1_800)).await;
    let live = layer.handle().batches();
    assert_eq!(live.len(), 1, "{live:?}");
    let counts = live[0].counts;
    assert_eq!(live[0].requests, 3_600);
    assert!(live[0].id.starts_with("msgbatch_"), "{live:?}");
    assert!(
        (1_700..=1_800).contains(&counts.succeeded),
        "{counts:?} half an hour in"
    );
    assert_eq!(counts.processing + counts.succeeded, 3_600, "{counts:?}");
    assert!(!live[0].delivering);
    while let Some(done) = tasks.join_next().await {
        assert_eq!(done.unwrap().unwrap().status(), 200);
    }
    assert!(
        layer.handle().batches().is_empty(),
        "a batch delivered is gone"
    );
    let polls = layer.handle().polls();
    assert!(polls <= 80, "{polls} polls");
    assert_eq!(sim.batch_calls().retrieved, polls);
}

#[tokio::test(start_paused = true)]
async fn a_streaming_request_cannot_be_deferred_and_others_are_not_delayed() {
    let sim = sim(1.0 / 600.0);
    let api = stack(BatchLayer::new(), &sim);
    // Deferrable but streamed: refused at once, nothing sent.
    let mut streamed = MessagesRequest::user("claude-sonnet-5-5", "Hi", 8);
    streamed.stream = true;
    let mut req = http::Request::post("/v1/messages")
        .header("x-api-key", "sk-batch")
        .body(Full::new(streamed.to_bytes()))
        .unwrap();
    req.extensions_mut().insert(Deferrable);
    let Err(e) = api.clone().oneshot(req).await else {
        panic!("a streamed request was deferred")
    };
    assert!(e.downcast_ref::<BatchError>().unwrap().is_streaming());
    // A deferrable request waits in a batch; a plain one passes at once, in one round trip.
    let mut deferred = request(8);
    deferred.extensions_mut().insert(Deferrable);
    let pending = tokio::spawn(api.clone().oneshot(deferred));
    let start = Instant::now();
    let res = api.clone().oneshot(request(8)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert!(res.extensions().get::<Batched>().is_none());
    assert_eq!(sim.summary().total.requests, 1);
    pending.abort();
}

/// The batch endpoints' own limit: the polls meet 429s with a `retry-after`, and no call comes
/// back before the wait they announced (the simulator counts early calls), yet every caller is
/// answered.
#[tokio::test(start_paused = true)]
async fn polls_never_come_before_the_retry_after_of_the_batch_endpoints() {
    let mut cfg = SimConfig::new(tower_quota_sim::Limits::new(50, 30_000, 8_000));
    cfg.batch_rps = 1.0 / 30.0; // two requests: a minute
    cfg.batch_rpm = Some(3); // a bucket of 3 calls, one more every 20 s
    let sim = Simulator::new(cfg);
    let api = stack(BatchLayer::new().all(true), &sim);
    let calls: Vec<_> = (0..2)
        .map(|_| tokio::spawn(api.clone().oneshot(request(8))))
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap().status(), 200);
    }
    let counts = sim.batch_calls();
    assert!(counts.refused >= 1, "the limit was never met: {counts:?}");
    assert_eq!(counts.early, 0, "{counts:?}");
}

/// The batch endpoints are a rate-limit pool of their own: their 429 (and its `retry-after`)
/// pauses the batch calls of the key, never its Messages calls.
#[tokio::test(start_paused = true)]
async fn a_429_of_the_batch_endpoints_does_not_pause_the_keys_messages_calls() {
    let mut cfg = SimConfig::new(tower_quota_sim::Limits::new(50, 30_000, 8_000));
    cfg.batch_rps = 1.0 / 600.0;
    cfg.batch_rpm = Some(1); // one call a minute: the first poll meets a 429 of about a minute
    let sim = Simulator::new(cfg);
    let layer = BatchLayer::new();
    let api = stack(layer.clone(), &sim);
    let mut deferred = request(8);
    deferred.extensions_mut().insert(Deferrable);
    let pending = tokio::spawn(api.clone().oneshot(deferred));
    let start = Instant::now();
    while sim.batch_calls().refused == 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "no 429 met");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sent = Instant::now();
    let res = api.clone().oneshot(request(8)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        sent.elapsed() < Duration::from_secs(1),
        "a Messages call waited {:?} behind the batch endpoints' 429",
        sent.elapsed()
    );
    pending.abort();
}
