//! `quota-proxy`: the tower-quota stack as a local gateway. See the crate docs.
//!
//! Settings come from flags, then `QUOTA_PROXY_*` environment variables, then the TOML file given
//! with `--config`, then the defaults, in that order of precedence. The file may also give limits
//! per key, by fingerprint (`quota-proxy --fingerprint` reads a key on standard input and prints
//! its fingerprint, so the key never reaches a file, a shell history or a process list):
//!
//! ```toml
//! upstream = "https://api.anthropic.com"
//! max_queue = 1000
//!
//! [limits]               # every key not named below (unset: learned from the headers)
//! rpm = 50
//!
//! [keys.3f2a9c0e5b7d41e68a0c2b4d6f8e1a3c]
//! rpm = 4000
//! itpm = 2000000
//! otpm = 400000
//! ```

use clap::Parser;
use metrics_exporter_prometheus::PrometheusBuilder;
use serde::Deserialize;
use std::collections::HashMap;
use std::io::Read;
use std::time::Duration;
use tower_quota::BoxError;
use tower_quota::budget::Limits;
use tower_quota::partition::{ApiKey, PartitionKey};
use tower_quota_proxy::{Config, PresetKind};

#[derive(Parser)]
#[command(
    name = "quota-proxy",
    about = "A local gateway applying tower-quota's stack per API key, so any SDK stops getting 429s"
)]
struct Args {
    /// A TOML file of settings (overridden by flags and environment variables).
    #[arg(long, env = "QUOTA_PROXY_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Read an API key on standard input, print its fingerprint (for `[keys.<fingerprint>]`), exit.
    #[arg(long)]
    fingerprint: bool,
    /// Address to listen on [default: 127.0.0.1:8787].
    #[arg(long, env = "QUOTA_PROXY_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// The upstream API's base URL [default: `https://api.anthropic.com`].
    #[arg(long, env = "QUOTA_PROXY_UPSTREAM")]
    upstream: Option<http::Uri>,
    /// Which provider's recommended stack [default: anthropic].
    #[arg(long, env = "QUOTA_PROXY_PRESET", value_enum)]
    preset: Option<PresetKind>,
    /// Requests per minute for every key (0 or unset: learn from the upstream's headers).
    #[arg(long, env = "QUOTA_PROXY_RPM")]
    rpm: Option<u64>,
    /// Input tokens per minute for every key (0 or unset: learn).
    #[arg(long, env = "QUOTA_PROXY_ITPM")]
    itpm: Option<u64>,
    /// Output tokens per minute for every key (0 or unset: learn).
    #[arg(long, env = "QUOTA_PROXY_OTPM")]
    otpm: Option<u64>,
    /// Combined tokens per minute for every key (0 or unset: learn).
    #[arg(long, env = "QUOTA_PROXY_TPM")]
    tpm: Option<u64>,
    /// Requests of one key that may wait in each queue; one more is answered 429 [default: 1000].
    #[arg(long, env = "QUOTA_PROXY_MAX_QUEUE")]
    max_queue: Option<usize>,
    /// The longest a request is held for its key's quota, in seconds [default: 120].
    #[arg(long, env = "QUOTA_PROXY_MAX_WAIT_SECS")]
    max_wait_secs: Option<u64>,
    /// The largest request body, in bytes [default: 33554432, the Messages API's 32 MB].
    #[arg(long, env = "QUOTA_PROXY_BODY_LIMIT")]
    body_limit: Option<usize>,
    /// Share every key's budget with other replicas through this Redis.
    #[arg(long, env = "QUOTA_PROXY_REDIS")]
    redis: Option<String>,
    /// How long one attempt may wait for the upstream's response headers, in seconds
    /// [default: 600].
    #[arg(long, env = "QUOTA_PROXY_ATTEMPT_TIMEOUT_SECS")]
    attempt_timeout_secs: Option<u64>,
    /// On Ctrl-C or SIGTERM, how long in-flight and queued requests may take to finish, in
    /// seconds [default: 30].
    #[arg(long, env = "QUOTA_PROXY_DRAIN_SECS")]
    drain_secs: Option<u64>,
}

/// Per-minute limits as the file gives them.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    rpm: Option<u64>,
    itpm: Option<u64>,
    otpm: Option<u64>,
    tpm: Option<u64>,
}

impl FileLimits {
    fn limits(self) -> Limits {
        let mut l = Limits::new();
        let set = |n: Option<u64>| n.filter(|&n| n > 0);
        if let Some(n) = set(self.rpm) {
            l = l.rpm(n);
        }
        if let Some(n) = set(self.itpm) {
            l = l.itpm(n);
        }
        if let Some(n) = set(self.otpm) {
            l = l.otpm(n);
        }
        if let Some(n) = set(self.tpm) {
            l = l.tpm(n);
        }
        l
    }
}

/// The settings file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<std::net::SocketAddr>,
    upstream: Option<String>,
    preset: Option<String>,
    max_queue: Option<usize>,
    max_wait_secs: Option<u64>,
    body_limit: Option<usize>,
    redis: Option<String>,
    attempt_timeout_secs: Option<u64>,
    drain_secs: Option<u64>,
    #[serde(default)]
    limits: FileLimits,
    /// By fingerprint (32 hex digits).
    #[serde(default)]
    keys: HashMap<String, FileLimits>,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    if args.fingerprint {
        let mut key = String::new();
        std::io::stdin().read_to_string(&mut key)?;
        println!("{}", ApiKey::new().fingerprint(key.trim().as_bytes()));
        return Ok(());
    }
    let file: File = match &args.config {
        Some(path) => toml::from_str(&std::fs::read_to_string(path)?)
            .map_err(|e| format!("{}: {e}", path.display()))?,
        None => File::default(),
    };
    let upstream: http::Uri = match (&args.upstream, &file.upstream) {
        (Some(u), _) => u.clone(),
        (None, Some(u)) => u.parse()?,
        (None, None) => "https://api.anthropic.com".parse()?,
    };
    let preset = match (args.preset, file.preset.as_deref()) {
        (Some(p), _) => p,
        (None, Some("anthropic") | None) => PresetKind::Anthropic,
        (None, Some("openai")) => PresetKind::Openai,
        (None, Some(other)) => return Err(format!("preset {other}: anthropic or openai").into()),
    };
    let every = FileLimits {
        rpm: args.rpm.or(file.limits.rpm),
        itpm: args.itpm.or(file.limits.itpm),
        otpm: args.otpm.or(file.limits.otpm),
        tpm: args.tpm.or(file.limits.tpm),
    };
    let mut config = Config::new(upstream.clone());
    config.preset = preset;
    config.limits = every.limits();
    for (fingerprint, limits) in &file.keys {
        let n = u128::from_str_radix(fingerprint, 16)
            .ok()
            .filter(|_| fingerprint.len() == 32)
            .ok_or_else(|| {
                format!("keys.{fingerprint}: a fingerprint is 32 hex digits (--fingerprint)")
            })?;
        config
            .key_limits
            .insert(PartitionKey::from_u128(n), limits.limits());
    }
    if let Some(n) = args.max_queue.or(file.max_queue) {
        config.max_queue = n;
    }
    if let Some(s) = args.max_wait_secs.or(file.max_wait_secs) {
        config.max_wait = Duration::from_secs(s);
    }
    if let Some(n) = args.body_limit.or(file.body_limit) {
        config.body_limit = n;
    }
    if let Some(s) = args.attempt_timeout_secs.or(file.attempt_timeout_secs) {
        config.attempt_timeout = Duration::from_secs(s);
    }
    config.redis = args.redis.clone().or(file.redis);
    let shared = config.redis.is_some();
    let keys = config.key_limits.len();
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    tower_quota::metrics::describe();
    config.prometheus = Some(prometheus);
    let proxy = tower_quota_proxy::app(config).await?;
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or(([127, 0, 0, 1], 8787).into());
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!(
        "quota-proxy listening on http://{}, upstream {upstream}{}{}",
        listener.local_addr()?,
        if keys > 0 {
            format!(", limits for {keys} keys")
        } else {
            String::new()
        },
        if shared { ", budgets in Redis" } else { "" }
    );
    let drain = Duration::from_secs(args.drain_secs.or(file.drain_secs).unwrap_or(30));
    tower_quota_proxy::serve(listener, proxy.router, shutdown_signal(), drain).await?;
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
