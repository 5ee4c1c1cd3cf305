//! tower-http's `TraceLayer` with the context's classifier logs the judgement the layers act on.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::{Layer, ServiceBuilder, ServiceExt, service_fn};
use tower_http::trace::TraceLayer;
use tower_quota::QuotaContext;
use tower_quota::classify::Outcome;
use tower_quota::retry::BackoffRetryLayer;
use tower_quota::trace::QuotaFailure;

/// For a 429, a 529, a 400 and a 200 behind a retry layer (one retry) sharing the context: the
/// trace's failure class carries the outcome the layers judged, and it is retryable exactly when
/// the retry layer retried.
#[tokio::test(start_paused = true)]
async fn trace_layer_and_the_layers_agree_on_429_529_400() {
    let cases = [
        (429, Some(Outcome::RateLimited), 2),
        (529, Some(Outcome::Overloaded), 2),
        (400, Some(Outcome::Fatal), 1),
        (200, None, 1),
    ];
    for (status, outcome, attempts) in cases {
        let calls = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::<QuotaFailure>::new()));
        let inner = {
            let calls = calls.clone();
            service_fn(move |_req: Request<Full<Bytes>>| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .body(Full::<Bytes>::default())
                            .unwrap(),
                    )
                }
            })
        };
        let ctx = QuotaContext::new();
        let seen = failures.clone();
        let trace = TraceLayer::new(ctx.trace_classifier()).on_failure(
            move |f: QuotaFailure, _: Duration, _: &tracing::Span| seen.lock().unwrap().push(f),
        );
        let svc = ServiceBuilder::new()
            .layer(trace)
            .layer(BackoffRetryLayer::new().max_retries(1).context(ctx))
            .service(inner);
        let req = Request::post("/v1/messages")
            .header("x-api-key", "sk-trace")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::from_u16(status).unwrap());
        assert_eq!(calls.load(Ordering::SeqCst), attempts, "status {status}");
        let failures = failures.lock().unwrap();
        match outcome {
            None => assert!(failures.is_empty(), "{failures:?}"),
            Some(outcome) => {
                let c = failures[0].classification().expect("a response");
                assert_eq!(c.outcome, outcome, "status {status}");
                assert_eq!(c.retryable, attempts > 1, "status {status}");
                assert!(failures[0].to_string().contains(&status.to_string()));
            }
        }
    }
}

/// A subscriber that keeps every span's fields (as text), by span name.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<(&'static str, std::collections::BTreeMap<String, String>)>>>);

struct Fields<'a>(&'a mut std::collections::BTreeMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            format!("{value:?}").trim_matches('"').to_owned(),
        );
    }
}

impl tracing::Subscriber for Spans {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut fields = std::collections::BTreeMap::new();
        span.record(&mut Fields(&mut fields));
        let mut all = self.0.lock().unwrap();
        all.push((span.metadata().name(), fields));
        tracing::span::Id::from_u64(all.len() as u64)
    }
    fn record(&self, span: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        let mut all = self.0.lock().unwrap();
        let (_, fields) = &mut all[span.into_u64() as usize - 1];
        values.record(&mut Fields(fields));
    }
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The budget opens one span per request carrying OpenTelemetry's GenAI attributes: the model
/// and `max_tokens` read from the request, the usage recorded when the response settles.
#[tokio::test(start_paused = true)]
async fn each_request_has_a_span_with_the_gen_ai_attributes() {
    use http_body_util::BodyExt;
    use tower_quota::budget::{Limits, TokenBudgetLayer};
    let spans = Spans::default();
    let _guard = tracing::subscriber::set_default(spans.clone());
    let inner = service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
            br#"{"type":"message","usage":{"input_tokens":12,"output_tokens":7}}"#,
        ))))
    });
    let api = TokenBudgetLayer::new(Limits::new().rpm(60)).layer(inner);
    let req = Request::post("/v1/messages")
        .header("x-api-key", "sk-trace")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"claude-sonnet-5-5","max_tokens":50,"messages":[{"role":"user","content":"Hello there"}]}"#,
        )))
        .unwrap();
    let res = api.oneshot(req).await.unwrap();
    res.into_body().collect().await.unwrap();

    let all = spans.0.lock().unwrap();
    let genai: Vec<_> = all.iter().filter(|(n, _)| *n == "gen_ai.request").collect();
    assert_eq!(
        genai.len(),
        1,
        "{:?}",
        all.iter().map(|s| s.0).collect::<Vec<_>>()
    );
    let f = &genai[0].1;
    assert_eq!(f["gen_ai.operation.name"], "chat");
    assert_eq!(f["gen_ai.request.model"], "claude-sonnet-5-5");
    assert_eq!(f["gen_ai.request.max_tokens"], "50");
    assert_eq!(f["gen_ai.usage.input_tokens"], "12");
    assert_eq!(f["gen_ai.usage.output_tokens"], "7");
    let partition = tower_quota::partition::PartitionKey::fingerprint(b"sk-trace").to_string();
    assert_eq!(f["tower_quota.partition"], partition);
    assert!(f.values().all(|v| !v.contains("sk-trace")), "{f:?}");
}
