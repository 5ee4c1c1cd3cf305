//! The seams between the layers: what one layer hands the next, under the preset, paused time.

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, ServiceBuilder, ServiceExt, service_fn};
use tower_quota::budget::{Cost, Limits, ReservationHandle, TokenBudgetLayer};
use tower_quota::classify::{Classification, Classify, DefaultClassifier, Outcome};
use tower_quota::concurrency::{Aimd, ConcurrencyLimitLayer};
use tower_quota::partition::PartitionKey;
use tower_quota::retry::{BackoffRetryLayer, RetryReport};
use tower_quota::retry_after::RetryAfterLayer;
use tower_quota::{Preset, QuotaContext, ServiceBuilderExt};

fn request() -> Request<Full<Bytes>> {
    Request::post("/v1/messages")
        .header("x-api-key", "sk-seams")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"m","max_tokens":16,"messages":[{"role":"user","content":"Hi"}]}"#,
        )))
        .unwrap()
}

/// A 429 whose hint no layer can use must be paced by the backoff alone: `max_retries + 1`
/// attempts, each gap `base * 2^n` plus the additive jitter (under a second). The Retry-After
/// gate's own inferred pause may make a wait longer, never shorter, and never adds attempts.
#[tokio::test(start_paused = true)]
async fn a_429_without_a_usable_hint_gets_the_backoff_schedule_under_the_preset() {
    let values: [Option<&'static str>; 5] = [
        None,
        Some("-10"),
        Some(""),
        Some("Mon, 99 Foo 2026 25:61:61 GMT"),
        Some("99999999999999999999999999999999999"),
    ];
    for value in values {
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let seen = arrivals.clone();
        let server = service_fn(move |_: Request<Full<Bytes>>| {
            seen.lock().unwrap().push(Instant::now());
            let mut res = Response::builder().status(429);
            if let Some(v) = value {
                res = res.header("retry-after", v);
            }
            let res = res.body(Full::new(Bytes::new())).unwrap();
            async move { Ok::<_, std::io::Error>(res) }
        });
        let preset = Preset::anthropic(Limits::new().rpm(600));
        let stack = ServiceBuilder::new().quota_stack(preset).service(server);
        let res = stack.oneshot(request()).await.unwrap();
        assert_eq!(res.status(), 429, "{value:?}");
        let report = res.extensions().get::<RetryReport>().unwrap().clone();
        let arrivals = arrivals.lock().unwrap().clone();
        assert_eq!(arrivals.len(), 6, "{value:?}: max_retries + 1 attempts");
        assert_eq!(report.attempts, 6, "{value:?}");
        for (n, pair) in arrivals.windows(2).enumerate() {
            let gap = pair[1] - pair[0];
            let base = Duration::from_secs(1 << n);
            assert!(
                gap >= base && gap <= base + Duration::from_millis(1002),
                "{value:?}: gap {n} was {gap:?}, expected {base:?} plus under 1 s of jitter"
            );
        }
    }
}

/// Calls a 418 "rate limited"; everything else as the default rules do.
struct Teapot;

impl Classify for Teapot {
    fn classify_response(&self, status: StatusCode, headers: &HeaderMap) -> Classification {
        if status == StatusCode::IM_A_TEAPOT {
            return Classification::of(Outcome::RateLimited);
        }
        DefaultClassifier.classify_response(status, headers)
    }
    fn classify_error(&self, e: &(dyn std::error::Error + 'static)) -> Classification {
        DefaultClassifier.classify_error(e)
    }
}

/// A server that answers `first` (with `headers`) `n` times, then 200 with a usage body.
fn scripted(
    n: usize,
    first: u16,
    headers: &'static [(&'static str, &'static str)],
) -> (
    impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = std::io::Error,
        Future = impl Send,
    > + Clone
    + Send,
    Arc<Mutex<usize>>,
) {
    let calls = Arc::new(Mutex::new(0));
    let seen = calls.clone();
    let svc = service_fn(move |_: Request<Full<Bytes>>| {
        let k = {
            let mut c = seen.lock().unwrap();
            *c += 1;
            *c
        };
        let res = if k <= n {
            let mut b = Response::builder().status(first);
            for (name, value) in headers {
                b = b.header(*name, *value);
            }
            b.body(Full::new(Bytes::new())).unwrap()
        } else {
            Response::new(Full::new(Bytes::from_static(
                br#"{"usage":{"input_tokens":3,"output_tokens":4}}"#,
            )))
        };
        async move { Ok::<_, std::io::Error>(res) }
    });
    (svc, calls)
}

fn teapot() -> QuotaContext {
    QuotaContext::new().classifier(Teapot)
}

#[tokio::test(start_paused = true)]
async fn one_classifier_changes_the_retry() {
    for (ctx, attempts, status) in [(QuotaContext::new(), 1, 418), (teapot(), 3, 200)] {
        let (server, calls) = scripted(2, 418, &[]);
        let retry = BackoffRetryLayer::new().seed(1).context(ctx);
        let res = retry.layer(server).oneshot(request()).await.unwrap();
        assert_eq!(res.status(), status);
        assert_eq!(*calls.lock().unwrap(), attempts);
    }
}

#[tokio::test(start_paused = true)]
async fn one_classifier_changes_the_gate() {
    let p = PartitionKey::fingerprint(b"sk-seams");
    for (ctx, closes) in [(QuotaContext::new(), false), (teapot(), true)] {
        let (server, _) = scripted(1, 418, &[("retry-after", "7")]);
        let gate = RetryAfterLayer::new().context(ctx);
        gate.layer(server).oneshot(request()).await.unwrap();
        assert_eq!(gate.handle().cooldown_until(p).is_some(), closes);
        // Without any hint, only a rate-limited answer infers a pause.
        let (server, _) = scripted(1, 418, &[]);
        let gate = RetryAfterLayer::new().context(if closes {
            teapot()
        } else {
            QuotaContext::new()
        });
        gate.layer(server).oneshot(request()).await.unwrap();
        assert_eq!(gate.handle().cooldown_until(p).is_some(), closes);
    }
}

#[tokio::test(start_paused = true)]
async fn one_classifier_changes_the_budget() {
    let p = PartitionKey::fingerprint(b"sk-seams");
    for (ctx, cooldown) in [(QuotaContext::new(), false), (teapot(), true)] {
        let (server, _) = scripted(1, 418, &[("retry-after", "30")]);
        let budget = TokenBudgetLayer::new(Limits::new().rpm(60)).context(ctx);
        let handle = budget.handle();
        let res = budget.layer(server).oneshot(request()).await.unwrap();
        let reservation = res.extensions().get::<ReservationHandle>().unwrap();
        // Neither a fatal 418 nor a rate-limited one did any work: both refund.
        assert_eq!(reservation.settled(), Some(Cost::default()));
        let snap = handle.snapshot(p).await.unwrap().unwrap();
        assert_eq!(snap.cooldown.is_some(), cooldown, "{snap:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn one_classifier_changes_the_adaptive_limit() {
    for (ctx, decreased) in [(QuotaContext::new(), false), (teapot(), true)] {
        let (server, _) = scripted(1, 418, &[]);
        let aimd = Aimd {
            initial: 10,
            ..Aimd::default()
        };
        let limit = ConcurrencyLimitLayer::adaptive(aimd).context(ctx);
        let handle = limit.handle();
        limit.layer(server).oneshot(request()).await.unwrap();
        assert_eq!(handle.limit() < 10, decreased, "limit {}", handle.limit());
    }
}

#[tokio::test(start_paused = true)]
async fn the_preset_hands_one_classifier_to_all_four_layers() {
    let (server, calls) = scripted(2, 418, &[("retry-after", "2")]);
    let preset = Preset::anthropic(Limits::new().rpm(60)).context(teapot());
    let limit = preset.concurrency.handle();
    let stack = ServiceBuilder::new().quota_stack(preset).service(server);
    let t0 = Instant::now();
    let res = stack.oneshot(request()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(*calls.lock().unwrap(), 3, "the retry retried the 418s");
    assert!(
        t0.elapsed() >= Duration::from_secs(4),
        "the server's 2 s were honoured twice"
    );
    assert!(
        limit.limit() < Aimd::default().initial,
        "the limit went down"
    );
}

/// Calls every result retryable, errors included.
struct RetryEverything;

impl Classify for RetryEverything {
    fn classify_response(&self, status: StatusCode, _: &HeaderMap) -> Classification {
        Classification {
            outcome: DefaultClassifier::outcome_of_status(status),
            retryable: !status.is_success(),
        }
    }
    fn classify_error(&self, _: &(dyn std::error::Error + 'static)) -> Classification {
        Classification {
            outcome: Outcome::Fatal,
            retryable: true,
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_user_classifier_cannot_make_nested_retries_multiply_attempts() {
    let ctx = QuotaContext::new().classifier(RetryEverything);
    let nested = |ctx: &QuotaContext| {
        ServiceBuilder::new()
            .layer(
                BackoffRetryLayer::new()
                    .no_retry_budget()
                    .context(ctx.clone()),
            )
            .layer(
                BackoffRetryLayer::new()
                    .no_retry_budget()
                    .context(ctx.clone()),
            )
    };
    // A response the inner loop gave up on.
    let (server, calls) = scripted(usize::MAX, 503, &[]);
    let res = nested(&ctx)
        .service(server)
        .oneshot(request())
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(*calls.lock().unwrap(), 6, "one loop's attempts, not 36");
    // An error the inner loop gave up on.
    let calls = Arc::new(Mutex::new(0));
    let seen = calls.clone();
    let refused = service_fn(move |_: Request<Full<Bytes>>| {
        *seen.lock().unwrap() += 1;
        async {
            Err::<Response<Full<Bytes>>, _>(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            ))
        }
    });
    let err = nested(&ctx).service(refused).oneshot(request()).await;
    assert!(err.is_err());
    assert_eq!(*calls.lock().unwrap(), 6, "one loop's attempts, not 36");
}

/// A service that is not `Send`: it holds an `Rc`, and so do its futures.
#[derive(Clone)]
struct Local(Rc<Cell<u32>>);

impl tower::Service<Request<Full<Bytes>>> for Local {
    type Response = Response<Full<Bytes>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>>>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Full<Bytes>>) -> Self::Future {
        let count = self.0.clone();
        Box::pin(async move {
            tokio::task::yield_now().await;
            count.set(count.get() + 1);
            Ok(Response::new(Full::new(Bytes::from_static(
                br#"{"usage":{"input_tokens":3,"output_tokens":4}}"#,
            ))))
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_service_that_is_not_send_works_under_each_layer_and_the_stack() {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let count = Rc::new(Cell::new(0));
            let svc = Local(count.clone());
            let res = BackoffRetryLayer::new()
                .layer(svc.clone())
                .oneshot(request())
                .await;
            assert_eq!(res.unwrap().status(), 200);
            let res = RetryAfterLayer::new()
                .layer(svc.clone())
                .oneshot(request())
                .await;
            assert_eq!(res.unwrap().status(), 200);
            let res = ConcurrencyLimitLayer::fixed(2)
                .layer(svc.clone())
                .oneshot(request())
                .await;
            assert_eq!(res.unwrap().status(), 200);
            let res = TokenBudgetLayer::new(Limits::new().rpm(60))
                .layer(svc.clone())
                .oneshot(request())
                .await;
            assert_eq!(res.unwrap().status(), 200);
            // The whole stack, from a task spawned on the local set.
            let stack = ServiceBuilder::new()
                .quota_stack(Preset::anthropic(Limits::new().rpm(60)))
                .service(svc);
            let task = tokio::task::spawn_local(async move {
                let res = stack.oneshot(request()).await.unwrap();
                res.into_body().collect().await.unwrap();
            });
            task.await.unwrap();
            assert_eq!(count.get(), 5);
        })
        .await;
}

#[test]
fn services_are_send_and_sync_and_their_futures_send() {
    fn service<S>(_: &S)
    where
        S: tower::Service<Request<Full<Bytes>>> + Send + Sync,
        S::Future: Send,
    {
    }
    let (server, _) = scripted(0, 200, &[]);
    service(&BackoffRetryLayer::new().layer(server.clone()));
    service(&RetryAfterLayer::new().layer(server.clone()));
    service(&ConcurrencyLimitLayer::fixed(1).layer(server.clone()));
    service(
        &ConcurrencyLimitLayer::fixed(1)
            .per_partition(8)
            .layer(server.clone()),
    );
    service(&TokenBudgetLayer::new(Limits::new()).layer(server.clone()));
    let stack = ServiceBuilder::new()
        .quota_stack(Preset::anthropic(Limits::new()))
        .service(server);
    service(&stack);
}

/// Issue 10, finding 5: invalid or extreme settings never panic inside a request.
#[tokio::test(start_paused = true)]
async fn a_zero_rate_with_a_burst_refuses_and_never_panics() {
    use tower_quota::budget::{BudgetError, Limit};
    let (server, calls) = scripted(0, 200, &[]);
    // A limit of 0 a minute refuses every request, whatever its burst: one meaning for 0.
    let zero = Limits {
        requests: Some(Limit {
            per_minute: 0,
            burst: Some(2),
        }),
        ..Limits::new()
    };
    for max_wait in [None, Some(Duration::from_secs(60))] {
        let svc = TokenBudgetLayer::new(zero)
            .max_wait(max_wait)
            .layer(server.clone());
        for _ in 0..3 {
            let err = svc.clone().oneshot(request()).await.unwrap_err();
            let err = err.downcast::<BudgetError>().unwrap();
            assert!(err.is_too_large(), "{err}");
        }
    }
    assert_eq!(*calls.lock().unwrap(), 0);
}

#[test]
#[should_panic(expected = "min")]
fn an_aimd_floor_over_its_ceiling_is_refused_when_the_layer_is_built() {
    let _ = ConcurrencyLimitLayer::adaptive(Aimd {
        min: 10,
        max: 2,
        ..Aimd::default()
    });
}

#[test]
#[should_panic(expected = "latency_tolerance")]
fn an_aimd_latency_tolerance_of_one_or_less_is_refused_when_the_layer_is_built() {
    let _ = ConcurrencyLimitLayer::adaptive(Aimd {
        latency_tolerance: Some(1.0),
        ..Aimd::default()
    });
}

#[test]
#[should_panic(expected = "decrease_ratio")]
fn an_aimd_decrease_that_grows_is_refused_when_the_layer_is_built() {
    let _ = ConcurrencyLimitLayer::adaptive(Aimd {
        decrease_ratio: 2.0,
        ..Aimd::default()
    });
}

#[test]
#[should_panic(expected = "base")]
fn an_absurd_backoff_is_refused_when_the_layer_is_built() {
    let _ = BackoffRetryLayer::new().base(Duration::MAX);
}

#[test]
#[should_panic(expected = "jitter")]
fn an_absurd_hint_jitter_is_refused_when_the_layer_is_built() {
    let _ = BackoffRetryLayer::new().hint_jitter(Duration::MAX);
}

#[test]
#[should_panic(expected = "jitter")]
fn an_absurd_gate_jitter_is_refused_when_the_layer_is_built() {
    let _ = RetryAfterLayer::new().jitter(Duration::MAX);
}

/// One rule for settings out of range: a panic when the layer is built, never a silent clamp.
mod settings_out_of_range {
    use tower_quota::batch::BatchLayer;
    use tower_quota::budget::{CountTokens, MemoryStore, TokenBudgetLayer};
    use tower_quota::concurrency::ConcurrencyLimitLayer;
    use tower_quota::pack::PackLayer;

    #[test]
    #[should_panic(expected = "0 partitions")]
    fn a_budget_tracking_no_partition() {
        let _ = TokenBudgetLayer::new(tower_quota::budget::Limits::new()).max_partitions(0);
    }

    #[test]
    #[should_panic(expected = "0 partitions")]
    fn a_store_tracking_no_partition() {
        let _ = MemoryStore::new(0);
    }

    #[test]
    #[should_panic(expected = "0 partitions")]
    fn a_concurrency_limit_tracking_no_partition() {
        let _ = ConcurrencyLimitLayer::fixed(1).per_partition(0);
    }

    #[test]
    #[should_panic(expected = "at least one item")]
    fn a_pack_of_no_item() {
        let _ = PackLayer::new().max_items(0);
    }

    #[test]
    #[should_panic(expected = "1 to 100000 requests")]
    fn a_batch_over_the_apis_bound() {
        let _ = BatchLayer::new().max_requests(100_001);
    }

    #[test]
    #[should_panic(expected = "bytes")]
    fn a_batch_of_no_byte() {
        let _ = BatchLayer::new().max_bytes(0);
    }

    #[test]
    #[should_panic(expected = "within [0, 1]")]
    fn a_count_tokens_margin_that_is_not_a_share() {
        let counter = tower::service_fn(
            |_: http::Request<http_body_util::Full<bytes::Bytes>>| async {
                Ok::<_, std::io::Error>(http::Response::new(
                    http_body_util::Full::<bytes::Bytes>::default(),
                ))
            },
        );
        let _ = CountTokens::via(counter).margin(f64::NAN);
    }

    #[test]
    fn the_bounds_themselves_are_accepted() {
        let _ = BatchLayer::new()
            .max_requests(BatchLayer::API_MAX_REQUESTS)
            .max_bytes(BatchLayer::API_MAX_BYTES);
        let _ = PackLayer::new().max_items(1);
        let _ = MemoryStore::new(1);
    }
}

/// Issue 10, finding 6: a server's absurd usage is clamped, never wrapped into a refund.
#[tokio::test(start_paused = true)]
async fn an_absurd_usage_is_charged_not_refunded() {
    use tower_quota::budget::Cost;
    let body = format!(
        r#"{{"usage":{{"input_tokens":{max},"cache_creation_input_tokens":{max},"output_tokens":{max}}}}}"#,
        max = u64::MAX
    );
    let server = service_fn(move |_: Request<Full<Bytes>>| {
        let body = body.clone();
        async move { Ok::<_, std::io::Error>(Response::new(Full::new(Bytes::from(body)))) }
    });
    let budget = TokenBudgetLayer::new(Limits::new().itpm(1_000_000).otpm(1_000_000));
    let handle = budget.handle();
    let res = budget.layer(server).oneshot(request()).await.unwrap();
    let reservation = res.extensions().get::<ReservationHandle>().unwrap().clone();
    res.into_body().collect().await.unwrap();
    let settled = reservation.settled().unwrap();
    assert!(settled.input_tokens >= reservation.estimate().input_tokens);
    assert!(settled.output_tokens >= reservation.estimate().output_tokens);
    assert_ne!(settled, Cost::default());
    // The buckets went down (a debt), not up past their capacity.
    let snap = handle
        .snapshot(PartitionKey::fingerprint(b"sk-seams"))
        .await
        .unwrap()
        .unwrap();
    let (level, capacity) = snap
        .bucket(tower_quota::budget::Bucket::OutputTokens)
        .unwrap();
    assert!(level < capacity as f64, "{level} of {capacity}");
}

/// Issue 10, finding 2: a server that accepts and never answers must not hold a key's queue for
/// ever (the probe's turn is bounded), and every call ends with a typed error (the attempt timeout).
#[tokio::test(start_paused = true)]
async fn a_silent_server_never_blocks_its_key_and_every_call_ends() {
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let seen = arrivals.clone();
    let silent = service_fn(move |_: Request<Full<Bytes>>| {
        seen.lock().unwrap().push(Instant::now());
        std::future::pending::<Result<Response<Full<Bytes>>, std::io::Error>>()
    });
    // The README's limits: the combined tokens bucket is unset, so the first request probes.
    let preset = Preset::anthropic(Limits::new().rpm(50).itpm(30_000).otpm(8_000));
    let probe_bound = tower_quota::budget::TokenBudgetLayer::DEFAULT_MAX_PROBE;
    let timeout = BackoffRetryLayer::DEFAULT_ATTEMPT_TIMEOUT;
    let stack = ServiceBuilder::new().quota_stack(preset).service(silent);
    let t0 = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..5 {
        let svc = stack.clone();
        calls.spawn(async move { svc.oneshot(request()).await });
    }
    let mut errors = 0;
    while let Some(r) = calls.join_next().await {
        // (tower-http's timeout body has no `Debug`, so no `unwrap_err`.)
        let Err(err) = r.unwrap() else {
            panic!("a silent server's call must end in an error")
        };
        assert!(
            std::error::Error::source(&*err)
                .is_some_and(|s| s.is::<tower::timeout::error::Elapsed>()),
            "{err}"
        );
        errors += 1;
    }
    assert_eq!(errors, 5);
    let arrivals = arrivals.lock().unwrap().clone();
    // The other four were not held behind the silent probe for longer than its bound.
    let first_of_the_rest = arrivals[1];
    assert!(
        first_of_the_rest - t0 <= probe_bound,
        "{:?}",
        first_of_the_rest - t0
    );
    // Every call ended: its attempts, each cut at the timeout, and the backoffs between them.
    let ended = t0.elapsed();
    assert!(
        ended <= probe_bound + 6 * timeout + Duration::from_secs(40),
        "{ended:?}"
    );
}

/// Configuration as values: a layer's state is made once, on its first use, and shared by every
/// clone taken before it; a setter returns a layer with state of its own; a setter on a layer in
/// use panics (its services and handles would not see the change), for every layer.
mod configured_once {
    use super::*;
    use tower_quota::batch::BatchLayer;
    use tower_quota::pack::PackLayer;

    fn panics(f: impl FnOnce() + std::panic::UnwindSafe) -> String {
        let err = std::panic::catch_unwind(f).expect_err("a setter after use must panic");
        err.downcast_ref::<String>()
            .cloned()
            .or_else(|| err.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default()
    }

    #[test]
    fn a_setter_on_a_layer_in_use_panics_for_every_layer() {
        let messages = [
            panics(|| {
                let l = TokenBudgetLayer::new(Limits::new().rpm(10));
                let _h = l.handle();
                let _ = l.max_wait(None);
            }),
            panics(|| {
                let l = BackoffRetryLayer::new();
                let _s = l.layer(service_fn(ok));
                let _ = l.max_retries(1);
            }),
            panics(|| {
                let l = RetryAfterLayer::new();
                let _h = l.handle();
                let _ = l.max_queue(1);
            }),
            panics(|| {
                let l = ConcurrencyLimitLayer::fixed(2);
                let _s = l.layer(service_fn(ok));
                let _ = l.max_queue(1);
            }),
            panics(|| {
                let l = PackLayer::new();
                let _h = l.handle();
                let _ = l.max_items(2);
            }),
            panics(|| {
                let l = BatchLayer::new();
                let _h = l.handle();
                let _ = l.all(true);
            }),
        ];
        for m in messages {
            assert!(m.contains("configured before its first use"), "{m}");
        }
    }

    async fn ok(
        _: Request<Full<Bytes>>,
    ) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
        Ok(Response::new(Full::default()))
    }

    fn request() -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::default());
        req.headers_mut()
            .insert("x-api-key", "sk-configured".parse().unwrap());
        req.extensions_mut().insert(Cost::new(1, 1));
        req
    }

    #[tokio::test(start_paused = true)]
    async fn clones_taken_before_first_use_share_one_state_and_a_setter_makes_its_own() {
        let layer = TokenBudgetLayer::new(Limits::new().rpm(10));
        let configured = layer.clone().max_wait(None);
        let clone = layer.clone();
        // The clone's first service makes the state; the original's handle sees it.
        let res = clone
            .layer(service_fn(ok))
            .oneshot(request())
            .await
            .unwrap();
        drop(res);
        assert_eq!(layer.handle().admitted(), 1);
        assert_eq!(clone.handle().admitted(), 1);
        // The layer a setter returned has its own.
        assert_eq!(configured.handle().admitted(), 0);
        configured
            .layer(service_fn(ok))
            .oneshot(request())
            .await
            .unwrap();
        assert_eq!(configured.handle().admitted(), 1);
        assert_eq!(layer.handle().admitted(), 1);
    }
}
