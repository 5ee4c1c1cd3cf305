//! `quota-sim`: the simulated rate-limited Messages API as a real HTTP server.
//!
//! Run with: `cargo run -p tower-quota-sim --bin quota-sim -- serve --port 8080 --rpm 50 --itpm 30000 --otpm 8000`
//!
//! `GET /__audit` answers the audit summary as JSON; it is printed again on Ctrl-C.

use clap::{Args, Parser, Subcommand};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tower_quota_sim::{
    Background, Dialect, Faults, Limits, RetryAfterStyle, ServeOptions, SimConfig, Simulator,
};

#[derive(Parser)]
#[command(
    version,
    about = "A simulated rate-limited, Anthropic-Messages-shaped API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the simulated API over HTTP/1.1 until Ctrl-C.
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to bind (loopback by default).
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to bind (0 picks a free one and prints it).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests per minute per key (0 = unlimited).
    #[arg(long, default_value_t = 50)]
    rpm: u64,
    /// Input tokens per minute per key (0 = unlimited).
    #[arg(long, default_value_t = 30_000)]
    itpm: u64,
    /// Output tokens per minute per key (0 = unlimited).
    #[arg(long, default_value_t = 8_000)]
    otpm: u64,
    /// Combined tokens per minute per key (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    tpm: u64,
    /// Bucket capacity as a fraction of the per-minute limit.
    #[arg(long, default_value_t = 1.0)]
    burst_fraction: f64,
    /// How a 429 announces its wait.
    #[arg(long, value_enum, default_value_t = RetryAfterStyle::Seconds)]
    retry_after: RetryAfterStyle,
    /// Which rate-limit headers responses carry.
    #[arg(long, value_enum, default_value_t = Dialect::Anthropic)]
    dialect: Dialect,
    /// Probability of a 529 overload.
    #[arg(long, default_value_t = 0.0)]
    overload: f64,
    /// Probability of a 500.
    #[arg(long, default_value_t = 0.0)]
    server_error: f64,
    /// Probability of a connection reset after admission.
    #[arg(long, default_value_t = 0.0)]
    reset: f64,
    /// Probability of a slow response.
    #[arg(long, default_value_t = 0.0)]
    slow: f64,
    /// Extra delay of a slow response, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    slow_ms: u64,
    /// Probability that a stream ends with an overload `error` event.
    #[arg(long, default_value_t = 0.0)]
    stream_error: f64,
    /// Add malformed rate-limit headers to every response.
    #[arg(long)]
    garbage_headers: bool,
    /// Answer 529 beyond this many requests in flight (0 = no cap).
    #[arg(long, default_value_t = 0)]
    max_concurrency: usize,
    /// Serve this many requests at full speed at once, and slow every request in proportion
    /// beyond (0 = no slowing).
    #[arg(long, default_value_t = 0)]
    service_capacity: usize,
    /// Base latency of a response, in milliseconds.
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
    /// Extra latency per output token, in microseconds.
    #[arg(long, default_value_t = 0)]
    per_token_us: u64,
    /// Real output as a fraction of max_tokens.
    #[arg(long, default_value_t = 1.0)]
    output_fraction: f64,
    /// Context window in tokens.
    #[arg(long, default_value_t = 200_000)]
    context_window: u64,
    /// The largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 128_000)]
    max_output_tokens: u64,
    /// Calls per minute per key to `POST /v1/messages/count_tokens` (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    count_tokens_rpm: u64,
    /// Requests a second the Message Batches API processes, per batch.
    #[arg(long, default_value_t = 100.0)]
    batch_rps: f64,
    /// Calls a minute per key to the Message Batches endpoints (0: unlimited).
    #[arg(long, default_value_t = 0)]
    batch_rpm: u64,
    /// The most requests a key may have processing in batches (0: no limit).
    #[arg(long, default_value_t = 0)]
    batch_queue: u64,
    /// Grace after a 429 before arrivals count as early, in milliseconds.
    #[arg(long, default_value_t = 100)]
    grace_ms: u64,
    /// Seed of every random draw.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A limit change, `SECONDS:RPM:ITPM:OTPM` (0 = unlimited; repeatable): at that time since
    /// the start, every key's limits become these.
    #[arg(long, value_parser = parse_change)]
    limit_change: Vec<(Duration, u64, u64, u64)>,
    /// Another client sharing every key: requests per minute it takes.
    #[arg(long, default_value_t = 0)]
    background_rpm: u64,
    /// Input tokens per minute the other client takes.
    #[arg(long, default_value_t = 0)]
    background_itpm: u64,
    /// Output tokens per minute the other client takes.
    #[arg(long, default_value_t = 0)]
    background_otpm: u64,
    /// When the other client starts, in seconds since the start.
    #[arg(long, default_value_t = 0.0)]
    background_from_s: f64,
    /// When the other client stops, in seconds since the start.
    #[arg(long, default_value_t = f64::MAX)]
    background_until_s: f64,
    /// How long a connection may take to send a request's headers, or stay idle, in milliseconds.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    header_timeout_ms: u64,
}

impl ServeArgs {
    fn config(&self) -> SimConfig {
        let nz = |v: u64| (v > 0).then_some(v);
        let limits = Limits {
            rpm: nz(self.rpm),
            itpm: nz(self.itpm),
            otpm: nz(self.otpm),
            tpm: nz(self.tpm),
            burst_fraction: self.burst_fraction,
        };
        let mut c = SimConfig::new(limits)
            .with_retry_after(self.retry_after)
            .with_dialect(self.dialect)
            .with_faults(Faults {
                overload: self.overload,
                server_error: self.server_error,
                reset: self.reset,
                slow: self.slow,
                slow_delay: Duration::from_millis(self.slow_ms),
                stream_error: self.stream_error,
                garbage_headers: self.garbage_headers,
            })
            .with_latency(
                Duration::from_millis(self.latency_ms),
                Duration::from_micros(self.per_token_us),
            )
            .with_output_fraction(self.output_fraction)
            .with_early_grace(Duration::from_millis(self.grace_ms))
            .with_seed(self.seed);
        c.context_window = self.context_window;
        c.max_output_tokens = self.max_output_tokens;
        c.count_tokens_rpm = (self.count_tokens_rpm > 0).then_some(self.count_tokens_rpm);
        c.batch_rps = self.batch_rps;
        c.batch_rpm = (self.batch_rpm > 0).then_some(self.batch_rpm);
        c.batch_queue = (self.batch_queue > 0).then_some(self.batch_queue);
        for &(at, rpm, itpm, otpm) in &self.limit_change {
            c = c.with_limit_change(
                at,
                Limits {
                    rpm: nz(rpm),
                    itpm: nz(itpm),
                    otpm: nz(otpm),
                    tpm: None,
                    burst_fraction: self.burst_fraction,
                },
            );
        }
        if self.background_rpm + self.background_itpm + self.background_otpm > 0 {
            let secs = |s: f64| Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX);
            c = c.with_background(Background {
                rpm: self.background_rpm,
                itpm: self.background_itpm,
                otpm: self.background_otpm,
                from: secs(self.background_from_s),
                until: secs(self.background_until_s),
            });
        }
        if self.service_capacity > 0 {
            c = c.with_service_capacity(self.service_capacity);
        }
        if self.max_concurrency > 0 {
            c = c.with_max_concurrency(self.max_concurrency);
        }
        c
    }
}

/// `SECONDS:RPM:ITPM:OTPM`.
fn parse_change(s: &str) -> Result<(Duration, u64, u64, u64), String> {
    let parts: Vec<&str> = s.split(':').collect();
    let [at, rpm, itpm, otpm] = parts[..] else {
        return Err(format!("`{s}`: expected SECONDS:RPM:ITPM:OTPM"));
    };
    let at: f64 = at.parse().map_err(|e| format!("`{at}`: {e}"))?;
    let at = Duration::try_from_secs_f64(at).map_err(|e| format!("`{s}`: {e}"))?;
    let n = |v: &str| v.parse::<u64>().map_err(|e| format!("`{v}`: {e}"));
    Ok((at, n(rpm)?, n(itpm)?, n(otpm)?))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let Command::Serve(args) = Cli::parse().command;
    let sim = Simulator::new(args.config());
    let options =
        ServeOptions::default().header_timeout(Duration::from_millis(args.header_timeout_ms));
    let server =
        tower_quota_sim::serve_with(sim, SocketAddr::new(args.host, args.port), options).await?;
    eprintln!("quota-sim listening on {}", server.base_url());
    tokio::signal::ctrl_c().await?;
    let summary = server.simulator().summary();
    server.shutdown().await;
    println!("{}", summary.to_json());
    Ok(())
}
