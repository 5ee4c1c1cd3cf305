//! An axum handler calling an upstream API through one shared tower-quota stack.
//!
//! Run with: `cargo run --example axum_upstream`
//!
//! Starts the simulated upstream API and an axum app on loopback ports. The app's handler
//! `POST /ask` forwards each question to the upstream's Messages endpoint through one stack held in
//! the app's state, shared by every request the app serves, so all of them draw on one budget and
//! wait behind one Retry-After gate. Then it sends 30 questions to the app at once.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tower_quota::body::PresetBody;
use tower_quota::budget::{Limit, Limits};
use tower_quota::{BoxError, Preset, ServiceBuilderExt};
use tower_quota_sim::{Limits as SimLimits, MessagesRequest, SimConfig, Simulator};

/// The upstream stack, type-erased so it fits in the app's state.
type Upstream = BoxCloneSyncService<Request<Full<Bytes>>, (StatusCode, Value), BoxError>;

#[derive(Clone)]
struct AppState {
    upstream: Upstream,
    url: String,
}

async fn ask(State(app): State<AppState>, Json(q): Json<Value>) -> (StatusCode, Json<Value>) {
    let question = q["question"].as_str().unwrap_or("").to_owned();
    let body = MessagesRequest::user("claude-sonnet-5-5", question, 32).to_bytes();
    let req = Request::post(&app.url)
        .header("x-api-key", "sk-app")
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(Full::new(body))
        .expect("a valid request");
    match app.upstream.oneshot(req).await {
        Ok((status, answer)) => (status, Json(answer)),
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            Json(json!({"error": e.to_string()})),
        ),
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let upstream_server = tower_quota_sim::serve(
        Simulator::new(SimConfig::new(SimLimits {
            rpm: Some(1200),
            itpm: Some(200_000),
            otpm: Some(40_000),
            tpm: None,
            burst_fraction: 0.01, // a burst of 12
        })),
        "127.0.0.1:0".parse()?,
    )
    .await?;

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let limits = Limits {
        requests: Some(Limit {
            per_minute: 1200,
            burst: Some(12),
        }),
        ..Limits::new()
    };
    let stack = ServiceBuilder::new()
        .quota_stack(Preset::anthropic(limits))
        .service(client);
    let upstream = BoxCloneSyncService::new(ServiceExt::<Request<Full<Bytes>>>::and_then(
        stack,
        |res: http::Response<PresetBody<hyper::body::Incoming>>| async move {
            let status =
                StatusCode::from_u16(res.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let bytes = res.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>((
                status,
                serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            ))
        },
    ));
    let state = AppState {
        upstream,
        url: format!("{}/v1/messages", upstream_server.base_url()),
    };
    let app = Router::new().route("/ask", post(ask)).with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let app_url = format!("http://{}/ask", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app_task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });

    // Thirty users ask at once.
    let users = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut asks = tokio::task::JoinSet::new();
    for i in 0..30 {
        let (users, url) = (users.clone(), app_url.clone());
        asks.spawn(async move {
            let body = json!({"question": format!("question {i}")}).to_string();
            let req = Request::post(url)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))?;
            let res = users.request(req).await?;
            Ok::<_, BoxError>(res.status())
        });
    }
    let mut ok = 0;
    while let Some(r) = asks.join_next().await {
        if r??.is_success() {
            ok += 1;
        }
    }
    let audit = upstream_server.simulator().summary();
    println!(
        "{ok} of 30 questions answered; the upstream saw {} requests and answered {} with 429",
        audit.total.requests, audit.total.rate_limited
    );
    let _ = stop.send(());
    app_task.await??;
    upstream_server.shutdown().await;
    assert_eq!(ok, 30);
    assert_eq!(audit.total.rate_limited, 0);
    Ok(())
}
