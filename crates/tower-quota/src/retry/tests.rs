use super::error::RetryError;
use super::*;
use crate::QuotaContext;
use crate::body::ReplayBodyLayer;
use crate::body::replay_tests::Chunks;
use crate::retry_after::RetryAfterLayer;
use crate::retry_after::error::WaitTooLong;
use http::{Request, Response};
use std::collections::{HashSet, VecDeque};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::time::advance;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

type Answer = Result<Response<()>, io::ErrorKind>;

/// A service that answers from a script (the last answer repeats) and records when it was called.
#[derive(Clone, Default)]
struct Script {
    answers: Arc<Mutex<VecDeque<Answer>>>,
    calls: Arc<Mutex<Vec<Instant>>>,
}

impl Script {
    fn new(answers: impl IntoIterator<Item = Answer>) -> Self {
        Self {
            answers: Arc::new(Mutex::new(answers.into_iter().collect())),
            calls: Arc::default(),
        }
    }

    fn calls(&self) -> Vec<Instant> {
        self.calls.lock().unwrap().clone()
    }
}

impl<B> Service<Request<B>> for Script {
    type Response = Response<()>;
    type Error = io::Error;
    type Future = std::future::Ready<Result<Response<()>, io::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), io::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<B>) -> Self::Future {
        self.calls.lock().unwrap().push(Instant::now());
        let mut answers = self.answers.lock().unwrap();
        let answer = if answers.len() > 1 {
            answers.pop_front().unwrap()
        } else {
            answers.front().cloned().expect("a scripted answer")
        };
        std::future::ready(answer.map_err(|k| io::Error::new(k, "scripted")))
    }
}

fn status(code: u16) -> Answer {
    Ok(Response::builder().status(code).body(()).unwrap())
}

fn with_headers(code: u16, headers: &[(&str, String)]) -> Answer {
    let mut b = Response::builder().status(code);
    for (n, v) in headers {
        b = b.header(*n, v.as_str());
    }
    Ok(b.body(()).unwrap())
}

fn req() -> Request<String> {
    Request::builder()
        .header("x-api-key", "sk-test")
        .body("{}".to_owned())
        .unwrap()
}

fn layer() -> BackoffRetryLayer {
    BackoffRetryLayer::new().seed(1).no_retry_budget()
}

const SEC: Duration = Duration::from_secs(1);
const JITTER: Duration = BackoffRetryLayer::DEFAULT_HINT_JITTER;

#[tokio::test(start_paused = true)]
async fn backoff_without_jitter_doubles() {
    let script = Script::new([status(503), status(503), status(503), status(200)]);
    let svc = layer().jitter(Jitter::None).layer(script.clone());
    let t0 = Instant::now();
    let res = svc.oneshot(req()).await.unwrap();
    assert_eq!(res.status(), 200);
    let offsets: Vec<u64> = script.calls().iter().map(|t| (*t - t0).as_secs()).collect();
    assert_eq!(offsets, [0, 1, 3, 7]);
    let report = res.extensions().get::<RetryReport>().unwrap();
    assert_eq!(report.attempts, 4);
    assert_eq!(report.delays, [SEC, 2 * SEC, 4 * SEC]);
    assert_eq!(report.gave_up, None);
}

#[tokio::test(start_paused = true)]
async fn each_jitter_mode_follows_its_formula_in_the_layer() {
    for jitter in [
        Jitter::Additive(SEC),
        Jitter::Full,
        Jitter::Equal,
        Jitter::Decorrelated,
    ] {
        let script = Script::new([status(503), status(503), status(503), status(200)]);
        let svc = layer().jitter(jitter).layer(script);
        let res = svc.oneshot(req()).await.unwrap();
        let delays = &res.extensions().get::<RetryReport>().unwrap().delays;
        let mut previous = SEC;
        for (n, d) in delays.iter().enumerate() {
            let exp = SEC * (1 << n);
            let ok = match jitter {
                Jitter::Additive(j) => *d >= exp && *d < exp + j,
                Jitter::Full => *d <= exp,
                Jitter::Equal => *d >= exp / 2 && *d <= exp,
                Jitter::Decorrelated => *d >= SEC && *d <= previous * 3,
                Jitter::None => unreachable!(),
            };
            assert!(ok, "{jitter:?} retry {n}: {d:?}");
            previous = *d;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_thousand_simultaneous_failures_get_distinct_first_delays() {
    // Each call fails once, then succeeds.
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let inner = tower::service_fn(move |req: Request<String>| {
        let first = seen.lock().unwrap().insert(req.body().clone());
        async move {
            let code = if first { 503 } else { 200 };
            Ok::<_, io::Error>(Response::builder().status(code).body(()).unwrap())
        }
    });
    let svc = BackoffRetryLayer::new().no_retry_budget().layer(inner);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let svc = svc.clone();
        set.spawn(async move { svc.oneshot(Request::new(i.to_string())).await.unwrap() });
    }
    let mut first = HashSet::new();
    while let Some(res) = set.join_next().await {
        let res = res.unwrap();
        assert_eq!(res.status(), 200);
        let d = res.extensions().get::<RetryReport>().unwrap().delays[0];
        assert!(d >= SEC && d < 2 * SEC);
        first.insert(d);
    }
    assert!(first.len() >= 990, "{} distinct", first.len());
}

#[tokio::test(start_paused = true)]
async fn towers_default_backoff_gives_every_request_the_same_first_delay() {
    // The comparison the 990-distinct test stands against: tower 0.5's default maker clones one
    // random source into every backoff, so 1000 requests failing at once all wait exactly as long
    // and retry in one wave.
    use tower::retry::backoff::{Backoff as _, ExponentialBackoffMaker, MakeBackoff};
    let mut maker = ExponentialBackoffMaker::default();
    let now = Instant::now();
    let first: HashSet<Duration> = (0..1000)
        .map(|_| maker.make_backoff().next_backoff().deadline() - now)
        .collect();
    assert_eq!(first.len(), 1, "{first:?}");
}

/// `Date` and a wall clock for HTTP-date tests: the server's clock reads `server`, the client's
/// reads `server + skew`.
fn date_answers(skew: Duration) -> (Answer, impl Fn() -> SystemTime + Send + Sync + 'static) {
    let server = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let answer = with_headers(
        429,
        &[
            ("date", httpdate::fmt_http_date(server)),
            ("retry-after", httpdate::fmt_http_date(server + 3 * SEC)),
        ],
    );
    (answer, move || server + skew)
}

#[tokio::test(start_paused = true)]
async fn hints_set_the_next_attempt_never_earlier_and_at_most_the_jitter_later() {
    // The client's wall clock is an hour fast in every case: only the Date header makes the
    // HTTP-date come out right.
    let cases: Vec<(&str, Answer, Duration)> = vec![
        (
            "seconds",
            with_headers(429, &[("retry-after", "3".into())]),
            3 * SEC,
        ),
        (
            "ms",
            with_headers(429, &[("retry-after-ms", "2500".into())]),
            Duration::from_millis(2500),
        ),
        ("date", date_answers(Duration::ZERO).0, 3 * SEC),
    ];
    for stacked in [false, true] {
        for (name, answer, expect) in &cases {
            let (_, skewed_wall) = date_answers(Duration::from_secs(3600));
            let script = Script::new([answer.clone(), status(200)]);
            let retry = layer().context(QuotaContext::new().wall_clock(skewed_wall));
            let t0 = Instant::now();
            let res = if stacked {
                let (_, wall) = date_answers(Duration::from_secs(3600));
                ServiceBuilder::new()
                    .layer(retry)
                    .layer(
                        RetryAfterLayer::new()
                            .seed(2)
                            .context(QuotaContext::new().wall_clock(wall)),
                    )
                    .service(script.clone())
                    .oneshot(req())
                    .await
            } else {
                retry.layer(script.clone()).oneshot(req()).await
            }
            .unwrap();
            assert_eq!(res.status(), 200);
            let calls = script.calls();
            assert_eq!(calls.len(), 2, "{name}");
            let waited = calls[1] - t0;
            // With the gate stacked inside, its jitter can add to the retry's own.
            let bound = if stacked { 2 * JITTER } else { JITTER };
            assert!(waited >= *expect, "{name} stacked={stacked}: {waited:?}");
            assert!(
                waited <= *expect + bound,
                "{name} stacked={stacked}: {waited:?}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_past_date_retries_at_once_and_garbage_falls_back_to_the_backoff() {
    let server = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let past = with_headers(
        429,
        &[
            ("date", httpdate::fmt_http_date(server)),
            ("retry-after", httpdate::fmt_http_date(server - 60 * SEC)),
        ],
    );
    let script = Script::new([past, status(200)]);
    let t0 = Instant::now();
    layer().layer(script.clone()).oneshot(req()).await.unwrap();
    assert!(script.calls()[1] - t0 <= JITTER);

    let garbage = with_headers(
        429,
        &[
            ("retry-after", "soon".into()),
            ("retry-after-ms", "NaN".into()),
        ],
    );
    let script = Script::new([garbage, status(200)]);
    let t0 = Instant::now();
    let res = layer().layer(script.clone()).oneshot(req()).await.unwrap();
    let waited = script.calls()[1] - t0;
    assert!(waited >= SEC && waited < 2 * SEC, "{waited:?}");
    // The timer fires at or after the delay (tokio rounds up to the millisecond), never before.
    let delay = res.extensions().get::<RetryReport>().unwrap().delays[0];
    assert!(waited >= delay && waited < delay + Duration::from_millis(1));
}

#[tokio::test(start_paused = true)]
async fn a_hint_over_the_cap_fails_fast_with_retry_at() {
    let script = Script::new([with_headers(429, &[("retry-after", "86400".into())])]);
    let t0 = Instant::now();
    let err = layer()
        .max_hint_wait(Some(Duration::from_secs(60)))
        .layer(script.clone())
        .oneshot(req())
        .await
        .unwrap_err();
    assert_eq!(t0.elapsed(), Duration::ZERO);
    let err = err.downcast::<RetryError>().unwrap();
    assert_eq!(err.retry_at(), Some(t0 + Duration::from_secs(86_400)));
    assert!(matches!(err.reason(), GiveUp::HintTooLong { .. }));
    assert_eq!(err.status(), Some(http::StatusCode::TOO_MANY_REQUESTS));
    assert!(err.to_string().contains("86400.000 s"), "{err}");
    // The message does not read the clock, nor repeat a cause.
    let shown = err.to_string();
    advance(Duration::from_secs(5)).await;
    assert_eq!(err.to_string(), shown);
    assert_eq!(
        crate::retry_at(&*err),
        Some(t0 + Duration::from_secs(86_400))
    );
    assert_eq!(script.calls().len(), 1);

    // No cap: it sleeps as long as the server says.
    let script = Script::new([
        with_headers(429, &[("retry-after", "86400".into())]),
        status(200),
    ]);
    let res = layer()
        .max_hint_wait(None)
        .layer(script.clone())
        .oneshot(req())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(script.calls()[1] - t0 >= Duration::from_secs(86_400));
}

#[tokio::test(start_paused = true)]
async fn fatal_results_are_never_retried() {
    for answer in [
        status(400),
        status(401),
        status(404),
        with_headers(503, &[("x-should-retry", "false".into())]),
    ] {
        let script = Script::new([answer.clone(), status(200)]);
        let res = layer().layer(script.clone()).oneshot(req()).await.unwrap();
        assert_eq!(
            script.calls().len(),
            1,
            "{:?}",
            answer.as_ref().map(|r| r.status())
        );
        assert!(res.extensions().get::<RetryReport>().is_none());
    }
    // x-should-retry: true makes a 400 retryable.
    let script = Script::new([
        with_headers(400, &[("x-should-retry", "true".into())]),
        status(200),
    ]);
    assert_eq!(
        layer()
            .layer(script.clone())
            .oneshot(req())
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(script.calls().len(), 2);
    // An unknown error is not retried, and comes back as it was.
    let script = Script::new([Err(io::ErrorKind::InvalidData)]);
    let err = layer()
        .layer(script.clone())
        .oneshot(req())
        .await
        .unwrap_err();
    assert_eq!(
        err.downcast::<io::Error>().unwrap().kind(),
        io::ErrorKind::InvalidData
    );
    assert_eq!(script.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn giving_up_returns_the_last_response_or_a_typed_error() {
    let script = Script::new([status(529)]);
    let res = layer()
        .max_retries(2)
        .layer(script.clone())
        .oneshot(req())
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 529);
    let report = res.extensions().get::<RetryReport>().unwrap();
    assert_eq!(
        (report.attempts, report.gave_up),
        (3, Some(GiveUp::AttemptsExhausted))
    );
    assert_eq!(script.calls().len(), 3);

    let script = Script::new([Err(io::ErrorKind::ConnectionReset)]);
    let err = layer()
        .max_retries(2)
        .layer(script.clone())
        .oneshot(req())
        .await
        .unwrap_err();
    let err = err.downcast::<RetryError>().unwrap();
    assert_eq!(
        (err.attempts(), err.reason()),
        (3, GiveUp::AttemptsExhausted)
    );
    let source = std::error::Error::source(&*err).unwrap();
    assert_eq!(
        source.downcast_ref::<io::Error>().unwrap().kind(),
        io::ErrorKind::ConnectionReset
    );
    // The cause is `source()`'s to tell: the message does not repeat it.
    assert!(!err.to_string().contains(&source.to_string()), "{err}");
    assert_eq!(crate::retry_at(&*err), None);
    // Nested retry layers do not multiply: the inner give-up is final for the outer one.
    let script = Script::new([Err(io::ErrorKind::ConnectionReset)]);
    let nested = ServiceBuilder::new()
        .layer(layer().max_retries(2))
        .layer(layer().max_retries(2))
        .service(script.clone());
    nested.oneshot(req()).await.unwrap_err();
    assert_eq!(script.calls().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn deadlines_from_the_layer_and_the_request() {
    let script = Script::new([status(503)]);
    let t0 = Instant::now();
    let err = layer()
        .jitter(Jitter::None)
        .deadline(Some(Duration::from_secs(5)))
        .layer(script.clone())
        .oneshot(req())
        .await
        .unwrap_err()
        .downcast::<RetryError>()
        .unwrap();
    // Attempts at 0, 1 and 3 s; the next would be at 7 s, past the 5 s deadline.
    assert_eq!(script.calls().len(), 3);
    assert_eq!(
        err.reason(),
        GiveUp::DeadlineExceeded {
            retry_at: t0 + 7 * SEC
        }
    );
    assert_eq!(t0.elapsed(), 3 * SEC);

    let script = Script::new([status(503)]);
    let t1 = Instant::now();
    let mut r = req();
    r.extensions_mut()
        .insert(Deadline(t1 + 3 * SEC + Duration::from_millis(500)));
    let err = layer()
        .jitter(Jitter::None)
        .layer(script.clone())
        .oneshot(r)
        .await
        .unwrap_err();
    let err = err.downcast::<RetryError>().unwrap();
    assert_eq!(err.retry_at(), Some(t1 + 7 * SEC));
    assert_eq!(script.calls().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn the_budget_stops_a_retry_storm() {
    let script = Script::new([status(503)]);
    let retry = BackoffRetryLayer::new().seed(3);
    let stats = retry.handle();
    let svc = retry.layer(script.clone());
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let svc = svc.clone();
        set.spawn(async move { svc.oneshot(req()).await });
    }
    let mut budget_empty = 0;
    while let Some(res) = set.join_next().await {
        let res = res.unwrap().unwrap();
        assert_eq!(res.status(), 503);
        let report = res.extensions().get::<RetryReport>().unwrap();
        budget_empty += usize::from(report.gave_up == Some(GiveUp::BudgetEmpty));
    }
    // TpsBudget(10 s, 10/s, 20 %): a reserve of 100 retries plus 20 % of 1000 calls.
    let retries = script.calls().len() - 1000;
    assert!(retries <= 300, "{retries} retries");
    assert!(
        retries >= 250,
        "{retries} retries: the budget should be used, not wasted"
    );
    assert_eq!(stats.retries() as usize, retries);
    assert_eq!(stats.calls(), 1000);
    assert!(budget_empty > 900);
}

#[tokio::test(start_paused = true)]
async fn bodies_that_cannot_be_replayed_are_sent_once_and_say_so() {
    let script = Script::new([Err(io::ErrorKind::ConnectionReset), status(200)]);
    let svc = ServiceBuilder::new()
        .layer(ReplayBodyLayer::new(16))
        .layer(layer())
        .service(script.clone());
    let big = Request::new(Chunks { left: 10, size: 4 });
    let err = svc.clone().oneshot(big).await.unwrap_err();
    let err = err.downcast::<RetryError>().unwrap();
    assert_eq!(err.reason(), GiveUp::NotReplayable);
    assert!(
        err.to_string()
            .starts_with("not retried: the request body cannot be replayed"),
        "{err}"
    );
    assert_eq!(script.calls().len(), 1);

    // A small streaming body is buffered and replayed.
    let script = Script::new([status(503), status(200)]);
    let svc = ServiceBuilder::new()
        .layer(ReplayBodyLayer::new(1024))
        .layer(layer())
        .service(script.clone());
    let res = svc
        .oneshot(Request::new(Chunks { left: 10, size: 4 }))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(script.calls().len(), 2);

    // A response is returned with the reason.
    let script = Script::new([status(503), status(200)]);
    let svc = ServiceBuilder::new()
        .layer(ReplayBodyLayer::new(16))
        .layer(layer())
        .service(script.clone());
    let res = svc
        .oneshot(Request::new(Chunks { left: 10, size: 4 }))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(
        res.extensions().get::<RetryReport>().unwrap().gave_up,
        Some(GiveUp::NotReplayable)
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_a_call_mid_wait_cancels_cleanly() {
    let script = Script::new([status(503)]);
    let svc = layer().layer(script.clone());
    let mut call = tokio_test::task::spawn(svc.oneshot(req()));
    tokio_test::assert_pending!(call.poll());
    assert_eq!(script.calls().len(), 1);
    drop(call);
    advance(Duration::from_secs(120)).await;
    assert_eq!(script.calls().len(), 1);

    // Waiting at a gate, too.
    let script = Script::new([with_headers(429, &[("retry-after", "10".into())])]);
    let gate = RetryAfterLayer::new();
    let svc = gate.layer(script.clone());
    svc.clone().oneshot(req()).await.unwrap();
    let mut waiting = tokio_test::task::spawn(svc.clone().oneshot(req()));
    tokio_test::assert_pending!(waiting.poll());
    drop(waiting);
    advance(Duration::from_secs(20)).await;
    assert_eq!(script.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn poll_ready_is_called_before_every_attempt() {
    let (mock, mut handle) = tower_test::mock::pair::<Request<String>, Response<()>>();
    let svc = layer().jitter(Jitter::None).layer(mock);
    handle.allow(1);
    let mut call = tokio_test::task::spawn(svc.oneshot(req()));
    tokio_test::assert_pending!(call.poll());
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(Response::builder().status(503).body(()).unwrap());
    tokio_test::assert_pending!(call.poll());
    advance(SEC).await;
    // The inner service is not ready: the retry waits for it instead of calling.
    tokio_test::assert_pending!(call.poll());
    assert!(
        tokio_test::task::spawn(handle.next_request())
            .poll()
            .is_pending()
    );
    handle.allow(1);
    tokio_test::assert_pending!(call.poll());
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(Response::builder().status(200).body(()).unwrap());
    let res = tokio_test::assert_ready_ok!(call.poll());
    assert_eq!(res.status(), 200);
}

#[tokio::test(start_paused = true)]
async fn the_gate_holds_every_caller_of_the_partition_and_only_it() {
    let script = Script::new([
        with_headers(429, &[("retry-after", "10".into())]),
        status(200),
    ]);
    let gate = RetryAfterLayer::new().jitter(Duration::ZERO);
    let svc = gate.layer(script.clone());
    let t0 = Instant::now();
    let first = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(first.status(), 429);
    let at = first
        .extensions()
        .get::<crate::retry_after::RetryAt>()
        .unwrap();
    assert_eq!(at.at, t0 + 10 * SEC);
    let p = crate::partition::PartitionKey::fingerprint(b"sk-test");
    assert_eq!(gate.handle().cooldown_until(p), Some(t0 + 10 * SEC));
    // Another key passes at once.
    let other = Request::builder()
        .header("x-api-key", "sk-other")
        .body(String::new())
        .unwrap();
    svc.clone().oneshot(other).await.unwrap();
    assert_eq!(script.calls()[1], t0);
    // A clone of the layer shares the gate.
    let again = gate
        .clone()
        .layer(script.clone())
        .oneshot(req())
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(script.calls()[2], t0 + 10 * SEC);
}

#[tokio::test(start_paused = true)]
async fn a_gate_longer_than_the_cap_fails_fast() {
    let script = Script::new([with_headers(429, &[("retry-after-ms", "259200000".into())])]);
    let svc = RetryAfterLayer::new().layer(script.clone());
    let t0 = Instant::now();
    let res = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(res.status(), 429);
    let err = svc.oneshot(req()).await.unwrap_err();
    let err = err.downcast::<WaitTooLong>().unwrap();
    assert_eq!(err.retry_at(), t0 + Duration::from_secs(3 * 86_400));
    assert_eq!(err.cap(), RetryAfterLayer::DEFAULT_MAX_WAIT);
    assert!(!err.to_string().contains("sk-test"));
    assert_eq!(script.calls().len(), 1);
    assert_eq!(t0.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn gate_jitter_is_positive_and_bounded() {
    let script = Script::new([
        with_headers(429, &[("retry-after", "2".into())]),
        status(200),
    ]);
    let svc = RetryAfterLayer::new().seed(5).layer(script.clone());
    let t0 = Instant::now();
    svc.clone().oneshot(req()).await.unwrap();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let svc = svc.clone();
        set.spawn(async move { svc.oneshot(req()).await.unwrap() });
    }
    while set.join_next().await.is_some() {}
    let calls = script.calls();
    let distinct: HashSet<_> = calls[1..].iter().collect();
    for c in &calls[1..] {
        assert!(*c >= t0 + 2 * SEC && *c <= t0 + 2 * SEC + RetryAfterLayer::DEFAULT_JITTER);
    }
    assert!(distinct.len() > 10, "{distinct:?}");
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Step {
        Ok,
        Status(u16, Option<u64>),
        Reset,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            Just(Step::Ok),
            (
                prop_oneof![Just(429u16), Just(529), Just(500), Just(503)],
                proptest::option::of(0u64..5000)
            )
                .prop_map(|(s, h)| Step::Status(s, h)),
            Just(Step::Reset),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn never_early_never_too_many_always_an_answer(
            steps in proptest::collection::vec(step(), 1..10),
            max_retries in 0u32..6,
            stacked in any::<bool>(),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async move {
                let answers: Vec<Answer> = steps.iter().map(|s| match s {
                    Step::Ok => status(200),
                    Step::Status(code, Some(ms)) => with_headers(*code, &[("retry-after-ms", ms.to_string())]),
                    Step::Status(code, None) => status(*code),
                    Step::Reset => Err(io::ErrorKind::ConnectionReset),
                }).collect();
                let script = Script::new(answers);
                let retry = BackoffRetryLayer::new()
                    .seed(11)
                    .no_retry_budget()
                    .max_retries(max_retries)
                    .max_hinted_retries(max_retries);
                let result = if stacked {
                    ServiceBuilder::new()
                        .layer(retry)
                        .layer(RetryAfterLayer::new().seed(12))
                        .service(script.clone())
                        .oneshot(req())
                        .await
                } else {
                    retry.layer(script.clone()).oneshot(req()).await
                };
                let calls = script.calls();
                // Never more attempts than allowed: each kind of retry has its own bound.
                assert!(calls.len() <= 2 * max_retries as usize + 1);
                // Only the server's own hints count as hinted retries: the gate's inferred pause
                // after a bare 429 is pacing, counted with the backoff retries.
                let hinted = (0..calls.len() - 1)
                    .map(|i| &steps[i.min(steps.len() - 1)])
                    .filter(|s| matches!(s, Step::Status(_, Some(_))))
                    .count();
                assert!(hinted <= max_retries as usize);
                assert!(calls.len() - 1 - hinted <= max_retries as usize);
                // Never before the hint of the previous answer.
                for (i, pair) in calls.windows(2).enumerate() {
                    if let Step::Status(_, Some(ms)) = steps[i.min(steps.len() - 1)] {
                        assert!(pair[1] - pair[0] >= Duration::from_millis(ms), "{steps:?}");
                    }
                }
                // Every call ends with a response or a typed error.
                match result {
                    Ok(res) => {
                        let last = steps[(calls.len() - 1).min(steps.len() - 1)].clone();
                        match last {
                            Step::Ok => assert_eq!(res.status(), 200),
                            Step::Status(code, _) => {
                                assert_eq!(res.status().as_u16(), code);
                                assert!(res.extensions().get::<RetryReport>().unwrap().gave_up.is_some());
                            }
                            Step::Reset => unreachable!(),
                        }
                    }
                    Err(e) => assert!(
                        e.is::<RetryError>() || e.is::<WaitTooLong>(),
                        "untyped error {e:?}"
                    ),
                }
            });
        }
    }

    #[test]
    fn futures_and_services_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<BackoffRetry<Script>>();
        send_sync::<crate::retry_after::RetryAfter<Script>>();
        send_sync::<BackoffRetryLayer>();
        send_sync::<RetryAfterLayer>();
        fn send<T: Send>() {}
        send::<future::ResponseFuture<Script, String>>();
        send::<crate::retry_after::future::ResponseFuture<Script, String>>();
    }
}

#[tokio::test(start_paused = true)]
async fn hinted_retries_are_counted_apart_from_backoff_retries() {
    let script = Script::new([with_headers(429, &[("retry-after", "1".into())])]);
    let res = layer()
        .max_retries(0)
        .max_hinted_retries(3)
        .layer(script.clone())
        .oneshot(req())
        .await
        .unwrap();
    assert_eq!(script.calls().len(), 4);
    let report = res.extensions().get::<RetryReport>().unwrap();
    assert_eq!(report.gave_up, Some(GiveUp::AttemptsExhausted));
    // A 503 without a hint is a backoff retry: max_retries(0) stops it at once.
    let script = Script::new([status(503)]);
    layer()
        .max_retries(0)
        .max_hinted_retries(3)
        .layer(script.clone())
        .oneshot(req())
        .await
        .unwrap();
    assert_eq!(script.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_429_without_any_hint_closes_the_gate_for_an_inferred_doubling_cooldown() {
    let script = Script::new([status(429), status(429), status(200), status(429)]);
    let gate = RetryAfterLayer::new().jitter(Duration::ZERO);
    let svc = gate.layer(script.clone());
    let p = crate::partition::PartitionKey::fingerprint(b"sk-test");
    let t0 = Instant::now();
    let res = svc.clone().oneshot(req()).await.unwrap();
    let at = res
        .extensions()
        .get::<crate::retry_after::RetryAt>()
        .unwrap();
    assert_eq!(at.source, crate::hint::RetrySource::Inferred);
    assert_eq!(at.at, t0 + Duration::from_millis(250));
    // The next caller waits for it; its 429 doubles the cooldown.
    svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(script.calls()[1], t0 + Duration::from_millis(250));
    assert_eq!(
        gate.handle().cooldown_until(p),
        Some(t0 + Duration::from_millis(750))
    );
    // A success starts the estimate over.
    svc.clone().oneshot(req()).await.unwrap();
    svc.clone().oneshot(req()).await.unwrap();
    let last = script.calls()[3];
    assert_eq!(
        gate.handle().cooldown_until(p),
        Some(last + Duration::from_millis(250))
    );
    // Off: a hintless 429 closes nothing.
    let script = Script::new([status(429), status(200)]);
    let svc = RetryAfterLayer::new()
        .inferred_cooldown(None)
        .layer(script.clone());
    svc.clone().oneshot(req()).await.unwrap();
    svc.oneshot(req()).await.unwrap();
    assert_eq!(script.calls()[0], script.calls()[1]);
}

#[tokio::test(start_paused = true)]
async fn a_seed_survives_later_builder_calls() {
    let delays = || async {
        let script = Script::new([status(503), status(503), status(200)]);
        let res = BackoffRetryLayer::new()
            .seed(9)
            .no_retry_budget()
            .max_retries(3)
            .layer(script)
            .oneshot(req())
            .await
            .unwrap();
        res.extensions()
            .get::<RetryReport>()
            .unwrap()
            .delays
            .clone()
    };
    assert_eq!(delays().await, delays().await);
}

/// Issue 10, finding 7: the requests waiting at a closed gate are bounded; one more fails at once
/// with `QueueFull`, whose `retry_at` is the gate's instant.
#[tokio::test(start_paused = true)]
async fn the_wait_at_a_closed_gate_is_bounded() {
    let script = Script::new([
        with_headers(429, &[("retry-after", "60".into())]),
        status(200),
    ]);
    let gate = RetryAfterLayer::new().jitter(Duration::ZERO).max_queue(3);
    let svc = gate.layer(script.clone());
    let t0 = Instant::now();
    svc.clone().oneshot(req()).await.unwrap();
    let mut waiting = Vec::new();
    for _ in 0..3 {
        let mut t = tokio_test::task::spawn(svc.clone().oneshot(req()));
        tokio_test::assert_pending!(t.poll());
        waiting.push(t);
    }
    let err = svc.clone().oneshot(req()).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(crate::retry_at(&*err), Some(t0 + 60 * SEC));
    let full = err.downcast::<crate::error::QueueFull>().unwrap();
    assert_eq!(full.waiting(), 3);
    // A waiter that gives up makes room.
    waiting.pop();
    let mut again = tokio_test::task::spawn(svc.clone().oneshot(req()));
    tokio_test::assert_pending!(again.poll());
}
