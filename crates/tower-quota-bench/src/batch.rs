//! The Message Batches rows: one RPM-bound burst sent through the Messages path (the recommended
//! stack, bounded workers) and through the batch path ([`BatchLayer`] over the same stack, every
//! request at once), against the in-process simulator under paused time.
//!
//! The batch path's wall time is the simulator's: it processes [`SimConfig::batch_rps`] requests
//! a second per batch (100 by default), where the real API promises 24 hours and ends most batches
//! within the hour. The columns that do not depend on it are the calls that reached
//! `/v1/messages` and the cost.
//!
//! [`SimConfig::batch_rps`]: tower_quota_sim::SimConfig::batch_rps

use crate::scenario::Scenario;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::{Layer, ServiceBuilder, ServiceExt};
use tower_quota::batch::BatchLayer;
use tower_quota::{Preset, ServiceBuilderExt};
use tower_quota_sim::{MessagesRequest, Price};

/// The model the rows are priced as (the Sonnet family's list price).
pub const MODEL: &str = "claude-sonnet-sim";

/// One path's figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BatchCell {
    /// `Messages` or `Message Batches`.
    pub path: &'static str,
    /// Requests in the burst.
    pub requests: usize,
    /// Requests answered 200.
    pub succeeded: usize,
    /// Calls that reached `/v1/messages`, as the simulator counted them.
    pub messages_calls: u64,
    /// Batches created.
    pub batches: u64,
    /// Calls to the batch endpoints (create, retrieve, results, cancel).
    pub batch_calls: u64,
    /// Virtual seconds from the first request to the last answer.
    pub elapsed_s: f64,
    /// Input tokens of the successes, as the server counted them.
    pub input_tokens: u64,
    /// Output tokens of the successes.
    pub output_tokens: u64,
    /// Their cost at the path's prices ([`Price::of`] [`MODEL`]), dollars.
    pub cost_usd: f64,
}

/// Sends `scenario`'s burst through the Messages path (with `tasks` workers) or the batch path.
/// Runs under paused time (call it on a paused runtime).
pub async fn run(scenario: &Scenario, via_batch: bool, tasks: usize, seed: u64) -> BatchCell {
    let sim = scenario.simulator(seed);
    let limits = scenario
        .client_limits()
        .expect("a scenario with its limits known");
    let stack = ServiceBuilder::new()
        .quota_stack(Preset::anthropic(limits))
        .service(sim.clone());
    let layer = BatchLayer::new().all(via_batch);
    let api = layer.layer(stack);
    let n = scenario.requests;
    let key = scenario.keys[0].0.clone();
    let body =
        MessagesRequest::user(MODEL, scenario.prompt.clone(), scenario.max_tokens).to_bytes();
    let request = move || {
        Request::post("http://api.sim/v1/messages")
            .header("x-api-key", &key)
            .header("anthropic-version", "2023-06-01")
            .header("content-type", "application/json")
            .body(Full::new(body.clone()))
            .expect("a valid request")
    };
    let start = Instant::now();
    // The batch path sends everything at once (each request waits in its batch); the Messages
    // path with bounded workers, as every strategy of the goodput tables.
    let workers = if via_batch { n } else { tasks.min(n) };
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for _ in 0..workers {
        let (api, next, request) = (api.clone(), next.clone(), request.clone());
        set.spawn(async move {
            let mut out = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                out.push(usage(api.clone().oneshot(request()).await).await);
            }
            out
        });
    }
    let (mut succeeded, mut input_tokens, mut output_tokens) = (0, 0, 0);
    while let Some(done) = set.join_next().await {
        for (i, o) in done.expect("a worker").into_iter().flatten() {
            succeeded += 1;
            input_tokens += i;
            output_tokens += o;
        }
    }
    let elapsed_s = start.elapsed().as_secs_f64();
    let calls = sim.batch_calls();
    let price = Price::of(MODEL);
    BatchCell {
        path: if via_batch {
            "Message Batches"
        } else {
            "Messages"
        },
        requests: n,
        succeeded,
        messages_calls: sim.summary().total.requests,
        batches: calls.created,
        batch_calls: calls.created + calls.retrieved + calls.results + calls.canceled,
        elapsed_s,
        input_tokens,
        output_tokens,
        cost_usd: if via_batch {
            price.batch(input_tokens, output_tokens)
        } else {
            price.messages(input_tokens, output_tokens)
        },
    }
}

/// The usage of a 200, or `None`.
async fn usage<B>(res: Result<http::Response<B>, tower_quota::BoxError>) -> Option<(u64, u64)>
where
    B: http_body::Body<Data = Bytes>,
{
    let res = res.ok().filter(|r| r.status() == 200)?;
    let bytes = res.into_body().collect().await.ok()?.to_bytes();
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    Some((
        v["usage"]["input_tokens"].as_u64()?,
        v["usage"]["output_tokens"].as_u64()?,
    ))
}

/// The rows as a Markdown table.
pub fn table(cells: &[BatchCell]) -> String {
    let mut s = String::from(
        "| path | succeeded | calls to /v1/messages | batches | calls to the batch endpoints \
         | elapsed | input tokens | output tokens | cost |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for c in cells {
        s.push_str(&format!(
            "| {} | {} / {} | {} | {} | {} | {:.0} s | {} | {} | ${:.2} |\n",
            c.path,
            c.succeeded,
            c.requests,
            c.messages_calls,
            c.batches,
            c.batch_calls,
            c.elapsed_s,
            c.input_tokens,
            c.output_tokens,
            c.cost_usd,
        ));
    }
    s
}
