//! The burst demo: many concurrent Messages requests against a rate-limited API.
//!
//! Run with: `cargo run --release --example burst`
//!
//! With no arguments it starts the simulated API (`tower-quota-sim`) on a loopback port with
//! Anthropic-like limits and fires a burst of concurrent requests at it. This first version sends
//! them the naive way (all at once, no retry) to show the problem the layers solve: most of the
//! burst is refused with 429. `--base-url` aims it at any Messages-compatible server instead.

use bytes::Bytes;
use clap::Parser;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::{Duration, Instant};
use tower_quota_sim::{Limits, MessagesRequest, SimConfig, Simulator};

#[derive(Parser)]
#[command(about = "Fire a burst of concurrent Messages requests at a rate-limited API")]
struct Args {
    /// Number of requests in the burst.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Server to aim at (default: a simulator started on a loopback port).
    #[arg(long)]
    base_url: Option<String>,
    /// API key (default: $ANTHROPIC_API_KEY, or a test key for the simulator).
    #[arg(long)]
    api_key: Option<String>,
    /// Model name.
    #[arg(long, default_value = "claude-sonnet-4-5")]
    model: String,
    /// max_tokens of each request.
    #[arg(long, default_value_t = 64)]
    max_tokens: u64,
    /// Print the summary as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args = Args::parse();
    let (base, server) = match &args.base_url {
        Some(url) => (url.trim_end_matches('/').to_owned(), None),
        None => {
            let sim = Simulator::new(SimConfig::new(Limits::new(120, 40_000, 8_000)));
            let server = tower_quota_sim::serve(sim, "127.0.0.1:0".parse()?).await?;
            (server.base_url(), Some(server))
        }
    };
    let key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("ANTHROPIC_API_KEY").ok())
        .unwrap_or_else(|| "sk-sim-demo".to_owned());
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = MessagesRequest::user(&args.model, "Say hello.", args.max_tokens).to_bytes();

    let start = Instant::now();
    let mut tasks = Vec::with_capacity(args.requests);
    for _ in 0..args.requests {
        let req = Request::post(format!("{base}/v1/messages"))
            .header("x-api-key", &key)
            .header("anthropic-version", "2023-06-01")
            .header("content-type", "application/json")
            .body(Full::new(body.clone()))?;
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let res = client.request(req).await?;
            let status = res.status().as_u16();
            res.into_body().collect().await?;
            Ok::<u16, Box<dyn std::error::Error + Send + Sync>>(status)
        }));
    }
    let (mut ok, mut limited, mut failed) = (0u64, 0u64, 0u64);
    for t in tasks {
        match t.await? {
            Ok(200) => ok += 1,
            Ok(429) => {
                limited += 1;
                failed += 1
            }
            _ => failed += 1,
        }
    }
    let elapsed = start.elapsed().max(Duration::from_millis(1));
    println!("requests:   {}", args.requests);
    println!("succeeded:  {ok}");
    println!("failed:     {failed} (naive client: no retry, no limits)");
    println!("429s seen:  {limited}");
    println!("elapsed:    {:.2} s", elapsed.as_secs_f64());
    if let Some(server) = server {
        println!("server:     {}", server.simulator().summary().to_json());
        server.shutdown().await;
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "requests": args.requests, "succeeded": ok, "failed": failed,
                "rate_limited": limited, "retries": 0,
                "elapsed_s": elapsed.as_secs_f64(),
                "goodput_rps": ok as f64 / elapsed.as_secs_f64(),
            })
        );
    }
    Ok(())
}
