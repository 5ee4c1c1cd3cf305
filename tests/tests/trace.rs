//! tower-http's `TraceLayer` with the context's classifier logs the judgement the layers act on.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::{ServiceBuilder, ServiceExt, service_fn};
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
