//! hyper-util's pooled client under the full tower-quota stack.
//!
//! Run with: `cargo run --example hyper_client`
//!
//! Starts the simulated API on a loopback port (30 requests/min, a burst of 10), then sends 20
//! requests at once through `Preset::anthropic` over hyper-util's legacy (pooled) client. The
//! budget paces them at the server's rate: none is refused. tower-http's layers sit on top: a
//! `TraceLayer` judging responses with the stack's own classifier (so a 429 it waited out is
//! logged as the layers saw it), and `SetRequestHeaderLayer` for the `anthropic-version` header.

use bytes::Bytes;
use http::Request;
use http::header::{HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};
use tower_http::set_header::SetRequestHeaderLayer;
use tower_http::trace::TraceLayer;
use tower_quota::budget::{Limit, Limits};
use tower_quota::{BoxError, Preset, QuotaContext, ServiceBuilderExt};
use tower_quota_sim::{Limits as SimLimits, MessagesRequest, SimConfig, Simulator};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let server_limits = SimLimits {
        rpm: Some(600),
        itpm: Some(100_000),
        otpm: Some(20_000),
        tpm: None,
        burst_fraction: 1.0 / 60.0 * 10.0, // a burst of 10 requests
    };
    let server = tower_quota_sim::serve(
        Simulator::new(SimConfig::new(server_limits)),
        "127.0.0.1:0".parse()?,
    )
    .await?;

    // The client side: your existing hyper-util client, unchanged, under the stack.
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
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
        .service(client);

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let api = api.clone();
        let url = format!("{}/v1/messages", server.base_url());
        tasks.spawn(async move {
            let body =
                MessagesRequest::user("claude-sonnet-5-5", format!("Question {i}"), 32).to_bytes();
            let req = Request::post(url)
                .header("x-api-key", "sk-example")
                .header("content-type", "application/json")
                .body(Full::new(body))?;
            let res = api.oneshot(req).await?;
            let status = res.status();
            res.into_body().collect().await?; // settles the token reservation
            Ok::<_, BoxError>(status)
        });
    }
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        if r??.is_success() {
            ok += 1;
        }
    }
    let audit = server.simulator().summary();
    println!(
        "{ok} of 20 succeeded; the server answered {} with 429",
        audit.total.rate_limited
    );
    server.shutdown().await;
    assert_eq!(ok, 20);
    assert_eq!(audit.total.rate_limited, 0);
    Ok(())
}
