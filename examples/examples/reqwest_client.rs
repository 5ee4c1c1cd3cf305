//! A `reqwest::Client` under the full tower-quota stack.
//!
//! Run with: `cargo run --example reqwest_client`
//!
//! Most Rust programs that call LLM APIs already have a `reqwest::Client`. `ReqwestService` (crate
//! `tower-quota-reqwest`) makes it a tower service of `http::Request`, so the layers wrap it as
//! they wrap hyper-util's client: the client keeps its pool, TLS and timeouts.
//!
//! Starts the simulated API on a loopback port (600 requests/min held as a bucket of 10, as the
//! real API holds them), then sends 30 requests at once, every third one streamed, through
//! `Preset::anthropic` over reqwest. The budget paces them at the server's rate (none is refused)
//! and each reservation settles with the real usage when its body (or stream) ends.

use bytes::Bytes;
use http::Request;
use http::header::{HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full};
use std::time::Duration;
use tower::{ServiceBuilder, ServiceExt};
use tower_http::set_header::SetRequestHeaderLayer;
use tower_http::trace::TraceLayer;
use tower_quota::budget::{Limit, Limits, ReservationHandle};
use tower_quota::{BoxError, Preset, QuotaContext, ServiceBuilderExt};
use tower_quota_reqwest::ReqwestService;
use tower_quota_sim::{Limits as SimLimits, MessagesRequest, SimConfig, Simulator};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let server_limits = SimLimits {
        burst_fraction: 10.0 / 600.0, // a burst of 10 requests
        ..SimLimits::new(600, 100_000, 20_000)
    };
    let sim = Simulator::new(SimConfig::new(server_limits).with_output_fraction(0.5));
    let server = tower_quota_sim::serve(sim, "127.0.0.1:0".parse()?).await?;

    // Your client, configured as you like it: reqwest's own connect timeout stays in charge of
    // connecting (a timeout it raises is retried as a timeout by the stack).
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()?;
    let limits = Limits {
        requests: Some(Limit {
            per_minute: 600,
            burst: Some(10),
        }),
        ..Limits::new()
    };
    let ctx = QuotaContext::new();
    let api = ServiceBuilder::new()
        .layer(TraceLayer::new(ctx.trace_classifier()))
        .layer(SetRequestHeaderLayer::if_not_present(
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static("2023-06-01"),
        ))
        .quota_stack(Preset::anthropic(limits).context(ctx))
        .service(ReqwestService::new(client));

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..30 {
        let api = api.clone();
        let url = format!("{}/v1/messages", server.base_url());
        tasks.spawn(async move {
            let mut body = MessagesRequest::user("claude-sonnet-5-5", format!("Question {i}"), 64);
            body.stream = i % 3 == 0;
            let req = Request::post(url)
                .header("x-api-key", "sk-example")
                .header("content-type", "application/json")
                .body(Full::new(body.to_bytes()))?;
            let res = api.oneshot(req).await?;
            let status = res.status();
            let reservation = res.extensions().get::<ReservationHandle>().cloned();
            let _: Bytes = res.into_body().collect().await?.to_bytes(); // settles the reservation
            let settled = reservation.and_then(|r| r.settled());
            Ok::<_, BoxError>((status, settled))
        });
    }
    let (mut ok, mut settled_output) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let (status, settled) = r??;
        if status.is_success() {
            ok += 1;
        }
        settled_output += settled.map_or(0, |c| c.output_tokens);
    }
    let audit = server.simulator().summary();
    println!(
        "{ok} of 30 succeeded over reqwest; the server answered {} with 429; \
         output tokens settled {settled_output} of 1920 reserved (the server counted {})",
        audit.total.rate_limited, audit.total.output_tokens
    );
    server.shutdown().await;
    assert_eq!(ok, 30);
    assert_eq!(audit.total.rate_limited, 0);
    assert_eq!(settled_output, audit.total.output_tokens);
    Ok(())
}
