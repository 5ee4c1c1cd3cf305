//! The layers record what a run did through the `metrics` facade: a recording recorder (installed
//! for this test's thread) sees exactly the scripted run's counts.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use metrics::{SharedString, Unit};
use metrics_util::CompositeKey;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_quota::budget::Limits;
use tower_quota::metrics::names;
use tower_quota::partition::PartitionKey;
use tower_quota::{Preset, ServiceBuilderExt};

const KEY: &str = "sk-metrics";

/// A server answering from a script: (status, retry-after), then 200s with a usage.
fn server(
    script: &[(u16, Option<&'static str>)],
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
+ Send {
    let script = Arc::new(Mutex::new(script.iter().copied().collect::<VecDeque<_>>()));
    service_fn(move |_req: Request<Full<Bytes>>| {
        let next = script.lock().unwrap().pop_front();
        async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let res = match next {
                Some((status, retry_after)) if status != 200 => {
                    let mut b = Response::builder().status(status);
                    if let Some(v) = retry_after {
                        b = b.header("retry-after", v);
                    }
                    b.body(Full::new(Bytes::new())).unwrap()
                }
                _ => Response::new(Full::new(Bytes::from_static(
                    br#"{"usage":{"input_tokens":30,"output_tokens":5}}"#,
                ))),
            };
            Ok(res)
        }
    })
}

fn request() -> Request<Full<Bytes>> {
    Request::post("/v1/messages")
        .header("x-api-key", KEY)
        .body(Full::new(Bytes::from_static(
            br#"{"model":"m","max_tokens":16,"messages":[{"role":"user","content":"Hi"}]}"#,
        )))
        .unwrap()
}

/// Everything a recorder held at one moment.
struct Snap(Vec<(CompositeKey, Option<Unit>, Option<SharedString>, DebugValue)>);

/// The value of the metric `name` with exactly `labels`.
fn value<'a>(snap: &'a Snap, name: &str, labels: &[(&str, &str)]) -> Option<&'a DebugValue> {
    snap.0.iter().find_map(|(key, _, _, value)| {
        let key = key.key();
        let mut have: Vec<(&str, &str)> = key.labels().map(|l| (l.key(), l.value())).collect();
        let mut want = labels.to_vec();
        have.sort();
        want.sort();
        (key.name() == name && have == want).then_some(value)
    })
}

fn counter(snap: &Snap, name: &str, labels: &[(&str, &str)]) -> u64 {
    match value(snap, name, labels) {
        Some(DebugValue::Counter(n)) => *n,
        None => 0,
        other => panic!("{name} {labels:?}: not a counter: {other:?}"),
    }
}

fn gauge(snap: &Snap, name: &str, labels: &[(&str, &str)]) -> f64 {
    match value(snap, name, labels) {
        Some(DebugValue::Gauge(v)) => v.into_inner(),
        other => panic!("{name} {labels:?}: not a gauge: {other:?}"),
    }
}

fn histogram(snap: &Snap, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    match value(snap, name, labels) {
        Some(DebugValue::Histogram(v)) => v.iter().map(|x| x.into_inner()).collect(),
        other => panic!("{name} {labels:?}: not a histogram: {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn the_recorder_receives_exactly_what_a_scripted_run_did() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    // The first request meets a 429 and succeeds on its retry; the second meets two 429s and
    // the retry gives up after one hinted retry. So: 3 429s, 2 retries, 1 give-up, 1 success.
    let script = [
        (429, Some("1")),
        (200, None),
        (429, Some("1")),
        (429, Some("1")),
    ];
    let mut preset = Preset::anthropic(Limits::new().rpm(600).itpm(100_000).otpm(20_000));
    preset.retry = preset.retry.max_hinted_retries(1);
    let api = ServiceBuilder::new()
        .quota_stack(preset)
        .service(server(&script));
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let res = api.clone().oneshot(request()).await.unwrap();
        statuses.push(res.status().as_u16());
        res.into_body().collect().await.unwrap();
    }
    assert_eq!(statuses, [200, 429]);

    let p = PartitionKey::fingerprint(KEY.as_bytes()).to_string();
    let p = p.as_str();
    let part = [("partition", p)];
    let with = |k: &'static str, v: &'static str| [("partition", p), (k, v)];

    // One snapshot: taking one drains the recorder (counters to 0, histograms emptied).
    let snap = Snap(snap.snapshot().into_vec());
    // The budget: every attempt admitted, judged and settled.
    assert_eq!(counter(&snap, names::BUDGET_ADMITTED, &part), 4);
    assert_eq!(
        counter(&snap, names::ANSWERS, &with("outcome", "rate_limited")),
        3
    );
    assert_eq!(
        counter(&snap, names::ANSWERS, &with("outcome", "success")),
        1
    );
    assert_eq!(
        counter(&snap, names::ANSWERS, &with("outcome", "overloaded")),
        0
    );
    assert_eq!(histogram(&snap, names::BUDGET_WAIT_SECONDS, &part).len(), 4);
    assert_eq!(gauge(&snap, names::BUDGET_WAITING, &part), 0.0);
    assert_eq!(
        counter(&snap, names::TOKENS_RESERVED, &with("bucket", "requests")),
        4
    );
    assert_eq!(
        counter(
            &snap,
            names::TOKENS_RESERVED,
            &with("bucket", "output_tokens")
        ),
        4 * 16
    );
    // The 429s settle at nothing (refunds); the success at its usage.
    assert_eq!(
        counter(&snap, names::TOKENS_SETTLED, &with("bucket", "requests")),
        1
    );
    assert_eq!(
        counter(
            &snap,
            names::TOKENS_SETTLED,
            &with("bucket", "input_tokens")
        ),
        30
    );
    assert_eq!(
        counter(
            &snap,
            names::TOKENS_SETTLED,
            &with("bucket", "output_tokens")
        ),
        5
    );
    assert_eq!(
        gauge(&snap, names::LIMIT, &with("bucket", "requests")),
        600.0
    );

    // The retry: two retries after 429s, one give-up when its hinted retries ran out.
    assert_eq!(
        counter(&snap, names::RETRIES, &with("reason", "rate_limited")),
        2
    );
    assert_eq!(
        counter(&snap, names::RETRY_GIVE_UPS, &with("reason", "attempts")),
        1
    );

    // The gate: paused three times on the server's word, a second each.
    assert_eq!(
        counter(&snap, names::GATE_CLOSURES, &with("source", "server")),
        3
    );
    assert_eq!(
        counter(&snap, names::GATE_CLOSURES, &with("source", "inferred")),
        0
    );
    let pauses = histogram(&snap, names::GATE_CLOSED_SECONDS, &part);
    assert_eq!(pauses, [1.0, 1.0, 1.0]);

    // The concurrency limit (one for every key: `shared`): nothing in flight at the end; four
    // round trips of 20 ms to the headers, and two to the end of a body read to its end (the
    // retried 429s' bodies were dropped unread).
    let shared = [("partition", "shared")];
    assert_eq!(gauge(&snap, names::CONCURRENCY_IN_FLIGHT, &shared), 0.0);
    let rtt = histogram(
        &snap,
        names::ROUND_TRIP_SECONDS,
        &[("partition", "shared"), ("until", "headers")],
    );
    assert_eq!(rtt.len(), 4);
    assert!(rtt.iter().all(|&s| (0.019..0.03).contains(&s)), "{rtt:?}");
    let body = histogram(
        &snap,
        names::ROUND_TRIP_SECONDS,
        &[("partition", "shared"), ("until", "body_end")],
    );
    assert_eq!(body.len(), 2, "{body:?}");
    assert!(gauge(&snap, names::CONCURRENCY_LIMIT, &shared) >= 1.0);
}

#[tokio::test(start_paused = true)]
async fn no_key_appears_in_any_label() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let api = ServiceBuilder::new()
        .quota_stack(Preset::anthropic(Limits::new().rpm(600)))
        .service(server(&[(429, Some("1"))]));
    let res = api.oneshot(request()).await.unwrap();
    res.into_body().collect().await.unwrap();
    let all = snap.snapshot().into_vec();
    assert!(all.len() > 10, "{}", all.len());
    for (key, _, _, _) in &all {
        for l in key.key().labels() {
            assert!(!l.value().contains(KEY), "{} = {}", l.key(), l.value());
        }
    }
}
