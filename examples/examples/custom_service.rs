//! The layers around your own `tower::Service`: here a transport that counts its calls and sends
//! them to the in-process simulator, but any `Service<http::Request<B>>` works the same way.
//!
//! Run with: `cargo run --example custom_service`

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_quota::BoxError;
use tower_quota::budget::{Limits, TokenBudgetLayer};
use tower_quota::retry::BackoffRetryLayer;
use tower_quota::retry_after::RetryAfterLayer;
use tower_quota_sim::{Limits as SimLimits, MessagesRequest, SimBody, SimConfig, Simulator};

/// Your own transport: anything that turns an HTTP request into an HTTP response.
#[derive(Clone)]
struct MyTransport {
    upstream: Simulator,
    calls: Arc<AtomicUsize>,
}

impl Service<Request<Full<Bytes>>> for MyTransport {
    type Response = Response<SimBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<SimBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let upstream = self.upstream.clone();
        Box::pin(upstream.oneshot(req))
    }
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> Result<(), BoxError> {
    // Paused time: the simulator's one-minute windows pass in milliseconds.
    let sim = Simulator::new(SimConfig::new(SimLimits {
        rpm: Some(60),
        ..SimLimits::unlimited()
    }));
    let transport = MyTransport {
        upstream: sim.clone(),
        calls: Arc::default(),
    };
    let calls = transport.calls.clone();

    // Three of the four layers, in the recommended order.
    let svc = ServiceBuilder::new()
        .layer(BackoffRetryLayer::new().seed(1))
        .layer(TokenBudgetLayer::new(Limits::new().rpm(60)))
        .layer(RetryAfterLayer::new().seed(2))
        .service(transport);

    let start = tokio::time::Instant::now();
    for i in 0..90 {
        let body = MessagesRequest::user("m", format!("request {i}"), 16).to_bytes();
        let req = Request::post("/v1/messages")
            .header("x-api-key", "sk-custom")
            .body(Full::new(body))?;
        let res = svc.clone().oneshot(req).await?;
        assert!(res.status().is_success());
        res.into_body().collect().await?;
    }
    let elapsed = start.elapsed();
    println!(
        "90 requests in {:.0} s of virtual time, {} transport calls, {} refused by the server",
        elapsed.as_secs_f64(),
        calls.load(Ordering::Relaxed),
        sim.summary().total.rate_limited
    );
    // 60 at once, then one a second.
    assert!(elapsed >= Duration::from_secs(30));
    assert_eq!(calls.load(Ordering::Relaxed), 90);
    Ok(())
}
