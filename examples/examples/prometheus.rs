//! The layers' metrics, exported in Prometheus' text format.
//!
//! Run with: `cargo run --example prometheus`
//!
//! Installs `metrics-exporter-prometheus`' recorder (before the stack sees its first request:
//! the layers register their handles per partition when they first see it), sends a burst of 60
//! requests through `Preset::anthropic` at the simulated API, whose limits are half what the
//! client was told, so some requests meet a 429 and are retried, and prints the exposition a
//! Prometheus server would scrape: 429s seen, retries, pauses, queue waits, tokens reserved and
//! settled, the limits learned from the headers, round trips. A real program serves
//! `handle.render()` on its `/metrics` route (or lets the exporter's own HTTP listener do it).

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use metrics_exporter_prometheus::PrometheusBuilder;
use tower::{ServiceBuilder, ServiceExt};
use tower_quota::budget::Limits;
use tower_quota::{BoxError, Preset, ServiceBuilderExt};
use tower_quota_sim::{Limits as SimLimits, MessagesRequest, SimConfig, Simulator};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    tower_quota::metrics::describe();

    // The server holds 300 requests a minute as a bucket of 5; the client believes in 600 with a
    // minute's burst, so it learns better from the first 429s and the headers.
    let server_limits = SimLimits {
        burst_fraction: 5.0 / 300.0,
        ..SimLimits::new(300, 200_000, 40_000)
    };
    let server = tower_quota_sim::serve(
        Simulator::new(SimConfig::new(server_limits).with_output_fraction(0.5)),
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let api = ServiceBuilder::new()
        .quota_stack(Preset::anthropic(
            Limits::new().rpm(600).itpm(200_000).otpm(40_000),
        ))
        .service(
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>(),
        );

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..60 {
        let api = api.clone();
        let url = format!("{}/v1/messages", server.base_url());
        tasks.spawn(async move {
            let body = MessagesRequest::user("claude-sonnet-5-5", format!("Question {i}"), 64);
            let req = Request::post(url)
                .header("x-api-key", "sk-example")
                .header("anthropic-version", "2023-06-01")
                .header("content-type", "application/json")
                .body(Full::new(body.to_bytes()))?;
            let res = api.oneshot(req).await?;
            let status = res.status();
            res.into_body().collect().await?;
            Ok::<_, BoxError>(status)
        });
    }
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        ok += usize::from(r??.is_success());
    }
    let rate_limited = server.simulator().summary().total.rate_limited;
    server.shutdown().await;

    let exposition = prometheus.render();
    println!("{exposition}");
    println!("# {ok} of 60 succeeded; the server answered {rate_limited} with 429");
    assert_eq!(ok, 60);
    for name in [
        "tower_quota_budget_admitted_total",
        "tower_quota_answers_total",
        "tower_quota_round_trip_seconds",
        "tower_quota_tokens_settled_total",
    ] {
        assert!(exposition.contains(name), "{name} missing");
    }
    Ok(())
}
