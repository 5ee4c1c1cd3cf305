//! `quota-proxy`: the tower-quota stack as a local gateway, so any language's SDK stops getting
//! 429s.
//!
//! # Why
//!
//! Most programs that call Claude concurrently are not written in Rust: they use the official
//! Python or TypeScript SDK, which retry a 429 at most twice by default and pace nothing. Every
//! official SDK takes a base URL (`ANTHROPIC_BASE_URL`, `OPENAI_BASE_URL`), so a local gateway
//! that applies the stack per key in front of the real API fixes them all without a code change.
//!
//! # How
//!
//! Every path and method is forwarded to the upstream through [`Preset::anthropic`] (or
//! [`Preset::openai`]), keyed by the caller's own `x-api-key` (or `Authorization: Bearer`): the
//! budget, the Retry-After gate, the adaptive concurrency limit and the retry apply per key, with
//! every limit learned from the upstream's headers unless configured. Headers pass through both
//! ways except the hop-by-hop ones; response bodies, server-sent events included, pass through as
//! they arrive (the reservation settles from the stream's own `usage` when it ends).
//!
//! Callers wait in the stack's queues instead of receiving 429s. A key's queue is bounded
//! ([`Config::max_queue`] requests, [`Config::max_wait`] of waiting): past either the proxy
//! answers `429` with a `retry-after` computed from its queue, an Anthropic-shaped
//! `rate_limit_error` and `x-should-retry: true`, so memory stays bounded and the SDK backs off.
//! When the stack gives up, the upstream's own last answer is returned unchanged. An upstream that
//! cannot be reached is a `502`, one that does not answer in time a `504`.
//!
//! The proxy asks the upstream for uncompressed answers (it drops the callers' `accept-encoding`),
//! so the budget can read each answer's `usage` and settle the reservation with it.
//!
//! `GET /healthz` answers `ok`; `GET /metrics` the layers' metrics in Prometheus' text format
//! (`tower_quota::metrics`, labelled by key fingerprints). A request body over
//! [`Config::body_limit`] (the Messages API's own 32 MB) is answered `413`. Keys are never
//! logged or exposed: the proxy prints nothing per request, and its errors name partitions by
//! fingerprint.
//!
//! HTTPS upstreams go through rustls with the system's root certificates.
//!
//! Not built yet: a TOML configuration file, per-key limits, and the
//! OpenAI paths beyond passing them through with [`PresetKind::Openai`]'s stack.
//!
//! # Example
//!
//! The proxy in front of the simulated API, called as an SDK would call it:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_quota::BoxError> {
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use tower_quota_proxy::{Config, app, serve};
//! use tower_quota_sim::{MessagesRequest, SimConfig, Simulator};
//!
//! let upstream = tower_quota_sim::serve(Simulator::new(SimConfig::default()), "127.0.0.1:0".parse()?).await?;
//! let proxy = app(Config::new(upstream.base_url().parse()?)).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let base = format!("http://{}", listener.local_addr()?);
//! tokio::spawn(serve(listener, proxy.router, std::future::pending(), std::time::Duration::ZERO));
//!
//! // What `anthropic.Anthropic(base_url=base)` would send:
//! let body = MessagesRequest::user("claude-sonnet-5-5", "Hello", 64).to_bytes();
//! let req = http::Request::post(format!("{base}/v1/messages"))
//!     .header("x-api-key", "sk-example")
//!     .header("anthropic-version", "2023-06-01")
//!     .body(Full::new(body))?;
//! let res = Client::builder(TokioExecutor::new()).build_http().request(req).await?;
//! assert_eq!(res.status(), 200);
//! let message: serde_json::Value = serde_json::from_slice(&res.into_body().collect().await?.to_bytes())?;
//! assert_eq!(message["type"], "message");
//! # upstream.shutdown().await;
//! # Ok(()) }
//! ```

use axum::Router;
use axum::body::Body;
use axum::extract::{Request as AxumRequest, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Request, StatusCode, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tower_quota::body::PresetBody;
use tower_quota::budget::{BudgetHandle, Limits};
use tower_quota::concurrency::ConcurrencyHandle;
use tower_quota::partition::PartitionKey;
use tower_quota::{BoxError, Preset, ServiceBuilderExt};

/// Which provider's recommended stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PresetKind {
    /// [`Preset::anthropic`].
    #[default]
    Anthropic,
    /// [`Preset::openai`].
    Openai,
}

/// What the proxy is told.
#[derive(Clone, Debug)]
pub struct Config {
    /// The upstream's base URL (`http://host:port`; a path prefix is kept).
    pub upstream: Uri,
    /// Which provider's stack.
    pub preset: PresetKind,
    /// Limits for every key (unset buckets are learned from the upstream's headers).
    pub limits: Limits,
    /// Requests of one key that may wait in each of the stack's queues; one more is answered 429.
    pub max_queue: usize,
    /// The longest a request may be held for its key's quota; a longer wait is answered 429.
    pub max_wait: Duration,
    /// The largest request body (the Messages API's: 32 MB).
    pub body_limit: usize,
    /// Share every key's budget through this Redis (many proxy replicas).
    pub redis: Option<String>,
    /// Where `GET /metrics` reads from (the binary installs the recorder).
    pub prometheus: Option<PrometheusHandle>,
    /// How long one attempt may wait for the upstream's response headers.
    pub attempt_timeout: Duration,
    /// Limits of particular keys, by fingerprint (instead of [`Config::limits`]).
    pub key_limits: HashMap<PartitionKey, Limits>,
}

impl Config {
    /// The defaults in front of `upstream`: Anthropic's stack, every limit learned, 1 000
    /// requests and 2 minutes of waiting per key, 32 MB bodies, no Redis, no metrics.
    pub fn new(upstream: Uri) -> Self {
        Self {
            upstream,
            preset: PresetKind::Anthropic,
            limits: Limits::new(),
            max_queue: 1_000,
            max_wait: Duration::from_secs(120),
            body_limit: 32 << 20,
            redis: None,
            prometheus: None,
            attempt_timeout: Duration::from_secs(600),
            key_limits: HashMap::new(),
        }
    }
}

type Stack = BoxCloneSyncService<
    Request<Full<Bytes>>,
    http::Response<PresetBody<hyper::body::Incoming>>,
    BoxError,
>;

struct AppState {
    stack: Stack,
    /// The upstream's base, without a trailing slash.
    upstream: String,
    body_limit: usize,
    prometheus: Option<PrometheusHandle>,
}

/// A built proxy: its app, and read-only views of its stack's live state.
#[derive(Debug)]
pub struct Proxy {
    /// `/healthz`, `/metrics`, and everything else forwarded through the stack.
    pub router: Router,
    /// The budget's state (requests queued, admitted).
    pub budget: BudgetHandle,
    /// The concurrency limit's state (requests in flight, queued).
    pub concurrency: ConcurrencyHandle,
}

/// Builds the proxy for `config`.
///
/// # Errors
///
/// An upstream URL that is neither `http://` nor `https://`, an HTTPS upstream on a system
/// without root certificates, or a Redis that cannot be reached.
pub async fn app(config: Config) -> Result<Proxy, BoxError> {
    let https = match config.upstream.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(format!(
                "upstream {}: expected http:// or https://host[:port]",
                config.upstream
            )
            .into());
        }
    };
    if config.upstream.authority().is_none() {
        return Err(format!("upstream {}: no host", config.upstream).into());
    }
    let mut preset = match config.preset {
        PresetKind::Anthropic => Preset::anthropic(config.limits),
        PresetKind::Openai => Preset::openai(config.limits),
    };
    preset.budget = preset
        .budget
        .max_queue(config.max_queue)
        .max_wait(Some(config.max_wait));
    if !config.key_limits.is_empty() {
        let per_key = config.key_limits.clone();
        preset.budget = preset
            .budget
            .partition_limits(move |p| per_key.get(&p).copied());
    }
    if let Some(url) = &config.redis {
        let store = tower_quota_redis::RedisStore::connect(url).await?;
        preset.budget = preset.budget.store(store);
    }
    preset.concurrency = preset.concurrency.max_queue(config.max_queue);
    preset.retry = preset.retry.attempt_timeout(Some(config.attempt_timeout));
    let (budget, concurrency) = (preset.budget.handle(), preset.concurrency.handle());
    preset.retry_after = preset
        .retry_after
        .max_wait(Some(config.max_wait))
        .max_queue(config.max_queue);
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(10)));
    let builder = Client::builder(TokioExecutor::new());
    let stack = if https {
        // rustls, with the system's root certificates.
        connector.enforce_http(false);
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()?
            .https_only()
            .enable_http1()
            .wrap_connector(connector);
        let client = builder.build::<_, Full<Bytes>>(tls);
        let stack = ServiceBuilder::new().quota_stack(preset).service(client);
        BoxCloneSyncService::new(stack.map_err(Into::into))
    } else {
        let client = builder.build::<_, Full<Bytes>>(connector);
        let stack = ServiceBuilder::new().quota_stack(preset).service(client);
        BoxCloneSyncService::new(stack.map_err(Into::into))
    };
    let state = Arc::new(AppState {
        stack,
        upstream: config.upstream.to_string().trim_end_matches('/').to_owned(),
        body_limit: config.body_limit,
        prometheus: config.prometheus,
    });
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .fallback(forward)
        .with_state(state);
    Ok(Proxy {
        router,
        budget,
        concurrency,
    })
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match &state.prometheus {
        Some(p) => (
            [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            p.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are off\n").into_response(),
    }
}

/// The headers that belong to one connection, not to the message (RFC 9110, 7.6.1), and those the
/// proxy sets itself.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<String> = from
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    for (name, value) in from {
        if !hop_by_hop(name) && !named.iter().any(|n| n == name.as_str()) {
            to.append(name, value.clone());
        }
    }
}

/// An Anthropic-shaped error answered by the proxy itself.
fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = serde_json::json!({"type": "error", "error": {"type": kind, "message": message}});
    (
        status,
        [(http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn forward(State(state): State<Arc<AppState>>, req: AxumRequest) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, state.body_limit).await else {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            "Request exceeds the maximum allowed number of bytes.",
        );
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = format!("{}{path}", state.upstream).parse::<Uri>() else {
        return error(StatusCode::BAD_REQUEST, "invalid_request_error", "bad path");
    };
    let mut out = Request::new(Full::new(bytes));
    *out.method_mut() = parts.method;
    *out.uri_mut() = uri;
    copy_headers(&parts.headers, out.headers_mut());
    // The budget reads each answer's `usage` to settle its reservation: ask the upstream for it
    // uncompressed (SDKs ask for gzip; between the proxy and its callers it is loopback).
    out.headers_mut().remove(http::header::ACCEPT_ENCODING);
    match state.stack.clone().oneshot(out).await {
        Ok(res) => {
            let (parts, body) = res.into_parts();
            let mut back = Response::new(Body::new(body));
            *back.status_mut() = parts.status;
            copy_headers(&parts.headers, back.headers_mut());
            back
        }
        Err(e) => refusal(&*e),
    }
}

/// The answer to a request the stack did not send or gave up on without a response.
fn refusal(e: &(dyn std::error::Error + 'static)) -> Response {
    if let Some(at) = tower_quota::retry_at(e) {
        // Held too long or too many waiting: come back when the queue says.
        let secs = at
            .saturating_duration_since(tokio::time::Instant::now())
            .as_secs_f64()
            .ceil()
            .max(1.0) as u64;
        let mut res = error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            &format!("quota-proxy: {e}"),
        );
        let h = res.headers_mut();
        h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        h.insert("x-should-retry", HeaderValue::from_static("true"));
        return res;
    }
    use tower_quota::classify::{DefaultClassifier, Outcome, TransportKind};
    match DefaultClassifier::outcome_of_error(e) {
        Outcome::Transport(TransportKind::Timeout) => error(
            StatusCode::GATEWAY_TIMEOUT,
            "api_error",
            &format!("quota-proxy: the upstream did not answer in time: {e}"),
        ),
        _ => error(
            StatusCode::BAD_GATEWAY,
            "api_error",
            &format!("quota-proxy: the upstream could not be reached: {e}"),
        ),
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains in-flight and queued
/// requests for at most `drain`.
///
/// # Errors
///
/// The listener's.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> std::io::Result<()> {
    let stop = Arc::new(tokio::sync::Notify::new());
    let signalled = stop.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        signalled.notify_waiters();
    });
    let deadline = async {
        stop.notified().await;
        tokio::time::sleep(drain).await;
    };
    tokio::select! {
        r = server => r,
        () = deadline => Ok(()),
    }
}
