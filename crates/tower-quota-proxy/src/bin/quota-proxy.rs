//! `quota-proxy`: the tower-quota stack as a local gateway. See the crate docs.

use clap::Parser;
use metrics_exporter_prometheus::PrometheusBuilder;
use std::time::Duration;
use tower_quota::BoxError;
use tower_quota::budget::Limits;
use tower_quota_proxy::{Config, PresetKind};

#[derive(Parser)]
#[command(
    name = "quota-proxy",
    about = "A local gateway applying tower-quota's stack per API key, so any SDK stops getting 429s"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "QUOTA_PROXY_LISTEN", default_value = "127.0.0.1:8787")]
    listen: std::net::SocketAddr,
    /// The upstream API's base URL, such as `https://api.anthropic.com`.
    #[arg(
        long,
        env = "QUOTA_PROXY_UPSTREAM",
        default_value = "https://api.anthropic.com"
    )]
    upstream: http::Uri,
    /// Which provider's recommended stack.
    #[arg(long, env = "QUOTA_PROXY_PRESET", value_enum, default_value_t = PresetKind::Anthropic)]
    preset: PresetKind,
    /// Requests per minute for every key (0: learn from the upstream's headers).
    #[arg(long, env = "QUOTA_PROXY_RPM", default_value_t = 0)]
    rpm: u64,
    /// Input tokens per minute for every key (0: learn).
    #[arg(long, env = "QUOTA_PROXY_ITPM", default_value_t = 0)]
    itpm: u64,
    /// Output tokens per minute for every key (0: learn).
    #[arg(long, env = "QUOTA_PROXY_OTPM", default_value_t = 0)]
    otpm: u64,
    /// Combined tokens per minute for every key (0: learn).
    #[arg(long, env = "QUOTA_PROXY_TPM", default_value_t = 0)]
    tpm: u64,
    /// Requests of one key that may wait in each queue; one more is answered 429.
    #[arg(long, env = "QUOTA_PROXY_MAX_QUEUE", default_value_t = 1_000)]
    max_queue: usize,
    /// The longest a request is held for its key's quota, in seconds; longer is answered 429.
    #[arg(long, env = "QUOTA_PROXY_MAX_WAIT_SECS", default_value_t = 120)]
    max_wait_secs: u64,
    /// The largest request body, in bytes.
    #[arg(long, env = "QUOTA_PROXY_BODY_LIMIT", default_value_t = 32 << 20)]
    body_limit: usize,
    /// Share every key's budget with other replicas through this Redis.
    #[arg(long, env = "QUOTA_PROXY_REDIS")]
    redis: Option<String>,
    /// How long one attempt may wait for the upstream's response headers, in seconds.
    #[arg(long, env = "QUOTA_PROXY_ATTEMPT_TIMEOUT_SECS", default_value_t = 600)]
    attempt_timeout_secs: u64,
    /// On Ctrl-C or SIGTERM, how long in-flight and queued requests may take to finish.
    #[arg(long, env = "QUOTA_PROXY_DRAIN_SECS", default_value_t = 30)]
    drain_secs: u64,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    tower_quota::metrics::describe();
    let mut limits = Limits::new();
    for (n, set) in [
        (args.rpm, Limits::rpm as fn(Limits, u64) -> Limits),
        (args.itpm, Limits::itpm),
        (args.otpm, Limits::otpm),
        (args.tpm, Limits::tpm),
    ] {
        if n > 0 {
            limits = set(limits, n);
        }
    }
    let mut config = Config::new(args.upstream.clone());
    config.preset = args.preset;
    config.limits = limits;
    config.max_queue = args.max_queue;
    config.max_wait = Duration::from_secs(args.max_wait_secs);
    config.body_limit = args.body_limit;
    config.redis = args.redis.clone();
    config.prometheus = Some(prometheus);
    config.attempt_timeout = Duration::from_secs(args.attempt_timeout_secs);
    let proxy = tower_quota_proxy::app(config).await?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!(
        "quota-proxy listening on http://{}, upstream {}{}",
        listener.local_addr()?,
        args.upstream,
        if args.redis.is_some() {
            ", budgets in Redis"
        } else {
            ""
        }
    );
    tower_quota_proxy::serve(
        listener,
        proxy.router,
        shutdown_signal(),
        Duration::from_secs(args.drain_secs),
    )
    .await?;
    println!("quota-proxy stopped");
    Ok(())
}

/// Ctrl-C, or SIGTERM on Unix.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
