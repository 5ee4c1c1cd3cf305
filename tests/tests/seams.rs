//! The seams between the layers: what one layer hands the next, under the preset, paused time.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_quota::budget::Limits;
use tower_quota::retry::RetryReport;
use tower_quota::{Preset, ServiceBuilderExt};

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
