//! The context window guard (issue 13, part 2) against the simulator, under paused time.

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt};
use tower_quota::budget::{ContextWindowError, ContextWindows, Limits, TokenBudgetLayer};
use tower_quota::{Preset, ServiceBuilderExt};
use tower_quota_sim::{MessagesRequest, SimConfig, Simulator};

/// A Messages request with a prompt of `bytes` bytes (about `bytes / 4` tokens).
fn request(bytes: usize, max_tokens: u64) -> Request<Full<Bytes>> {
    let m = MessagesRequest::user("claude-sim", "x".repeat(bytes), max_tokens);
    Request::post("/v1/messages")
        .header("x-api-key", "sk-window")
        .body(Full::new(m.to_bytes()))
        .unwrap()
}

/// A request over its model's window fails with the typed error before anything is reserved or
/// sent: the server sees no call, the store holds nothing for the key.
#[tokio::test(start_paused = true)]
async fn a_request_over_the_window_fails_before_any_quota_or_byte() {
    let sim = Simulator::new(SimConfig::new(tower_quota_sim::Limits::unlimited()));
    let layer = TokenBudgetLayer::new(Limits::new().rpm(100))
        .context_windows(ContextWindows::new(200_000).model("claude-sim", 2_000));
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(sim.clone());
    // About 500 input tokens and 1 000 of output: fits the 2 000 window.
    let res = svc.clone().oneshot(request(2_000, 1_000)).await.unwrap();
    assert!(res.status().is_success());
    // About 1 500 and 1 000: does not.
    let err = svc.oneshot(request(6_000, 1_000)).await.unwrap_err();
    let err = err.downcast_ref::<ContextWindowError>().expect("typed");
    assert_eq!(err.window(), 2_000);
    assert_eq!(err.model(), Some("claude-sim"));
    assert_eq!(err.max_tokens(), Some(1_000));
    assert!(err.input_tokens() > 1_000, "{}", err.input_tokens());
    assert!(
        err.to_string().contains("context window of 2000 tokens"),
        "{err}"
    );
    // One call reached the server (the request that fit); the store charged that one only.
    assert_eq!(sim.summary().total.requests, 1);
    let p = tower_quota::partition::PartitionKey::fingerprint(b"sk-window");
    let snap = handle
        .snapshot(p)
        .await
        .unwrap()
        .expect("the partition of the first request");
    // One request spent (less the refill during its 20 ms round trip); none for the refused one.
    let (level, capacity) = snap.buckets[0].unwrap();
    assert!(
        (capacity as f64 - level - 1.0).abs() < 0.1,
        "{level} of {capacity}"
    );
}

/// The server's own refusal ("prompt is too long: N tokens > M maximum", a 400) is not retried
/// by the preset and reads as the same error, with both numbers.
#[tokio::test(start_paused = true)]
async fn the_servers_prompt_too_long_is_not_retried_and_reads_as_the_same_error() {
    let mut config = SimConfig::new(tower_quota_sim::Limits::unlimited());
    config.context_window = 1_000;
    let sim = Simulator::new(config);
    let svc = ServiceBuilder::new()
        .quota_stack(Preset::anthropic(Limits::new()))
        .service(sim.clone());
    let res = svc.oneshot(request(8_000, 16)).await.unwrap();
    assert_eq!(res.status(), http::StatusCode::BAD_REQUEST);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let err = ContextWindowError::from_error_body(&body).expect("prompt too long");
    assert!(err.is_from_server());
    assert_eq!(err.window(), 1_000);
    assert!(err.input_tokens() > 1_000);
    assert_eq!(sim.summary().total.requests, 1, "never retried");
}

/// The server's other refusal, the prompt and `max_tokens` together over the window, reads the
/// same way, `max_tokens` included.
#[tokio::test(start_paused = true)]
async fn the_servers_input_plus_max_tokens_refusal_reads_as_the_same_error() {
    let mut config = SimConfig::new(tower_quota_sim::Limits::unlimited());
    config.context_window = 1_000;
    let sim = Simulator::new(config);
    let res = sim.clone().oneshot(request(2_000, 800)).await.unwrap();
    assert_eq!(res.status(), http::StatusCode::BAD_REQUEST);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let err = ContextWindowError::from_error_body(&body).expect("over the window");
    assert_eq!((err.max_tokens(), err.window()), (Some(800), 1_000));
    assert!(err.input_tokens() <= 1_000);
}

/// With a counter, only a request whose estimate lands near its window is counted exactly
/// (`count_tokens`), and the count decides: a request just under the window is sent (with the
/// count reserved as its input), one just over is refused with the exact figure and never sent;
/// requests far from the window on either side are never counted.
#[tokio::test(start_paused = true)]
async fn count_tokens_decides_near_the_window_and_only_there() {
    use tower_quota::budget::ReservationHandle;
    use tower_quota::budget::window::CountTokens;
    let sim = Simulator::new(SimConfig::new(tower_quota_sim::Limits::unlimited()));
    let windows = ContextWindows::new(200_000)
        .model("claude-sim", 2_000)
        .count_tokens(CountTokens::via(sim.clone()));
    let layer = TokenBudgetLayer::new(Limits::new().rpm(100)).context_windows(windows);
    let svc = ServiceBuilder::new().layer(layer).service(sim.clone());
    let exact = |bytes: usize, max_tokens: u64| {
        tower_quota_sim::input_tokens(&MessagesRequest::user(
            "claude-sim",
            "x".repeat(bytes),
            max_tokens,
        ))
    };

    // Far under: no count.
    let res = svc.clone().oneshot(request(400, 100)).await.unwrap();
    assert!(res.status().is_success());
    assert_eq!(sim.count_tokens_calls(), 0);

    // Just under (the exact total 1 990 of 2 000): counted, then sent with the count reserved.
    let bytes = 4_000;
    let under = 1_990 - exact(bytes, 0);
    let res = svc.clone().oneshot(request(bytes, under)).await.unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    assert_eq!(sim.count_tokens_calls(), 1);
    let reserved = res
        .extensions()
        .get::<ReservationHandle>()
        .unwrap()
        .estimate();
    assert_eq!(reserved.input_tokens, exact(bytes, 0));

    // Just over (2 010): counted, refused with the exact figure, never sent.
    let sent = sim.summary().total.requests;
    let over = 2_010 - exact(bytes, 0);
    let err = svc.clone().oneshot(request(bytes, over)).await.unwrap_err();
    let err = err.downcast_ref::<ContextWindowError>().expect("typed");
    assert!(err.is_counted() && !err.is_from_server());
    assert_eq!(err.input_tokens(), exact(bytes, 0));
    assert_eq!(sim.count_tokens_calls(), 2);

    // Far over: refused on the estimate alone, not counted.
    let err = svc.clone().oneshot(request(40_000, 100)).await.unwrap_err();
    assert!(
        !err.downcast_ref::<ContextWindowError>()
            .unwrap()
            .is_counted()
    );
    assert_eq!(sim.count_tokens_calls(), 2);
    // Neither refusal reached the Messages endpoint (count_tokens calls are not in the audit).
    assert_eq!(sim.summary().total.requests, sent);
}

/// A `max_tokens` over its model's largest (the table's) fails with a [`MaxTokensError`] before
/// anything is reserved or sent; the server's own refusal of it (a 400 worded "max_tokens: N > M,
/// which is the maximum allowed number of output tokens for MODEL") is not retried by the preset
/// and reads as the same error.
#[tokio::test(start_paused = true)]
async fn a_max_tokens_over_the_models_largest_is_refused_before_sending_and_by_the_server() {
    use tower_quota::budget::MaxTokensError;
    let mut config = SimConfig::new(tower_quota_sim::Limits::unlimited());
    config.max_output_tokens = 4_000;
    let sim = Simulator::new(config);
    let layer = TokenBudgetLayer::new(Limits::new().rpm(100))
        .context_windows(ContextWindows::default().model_max_tokens("claude-sim", 4_000));
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(sim.clone());
    let res = svc.clone().oneshot(request(40, 4_000)).await.unwrap();
    assert!(res.status().is_success());
    let err = svc.oneshot(request(40, 4_001)).await.unwrap_err();
    let err = err.downcast_ref::<MaxTokensError>().expect("typed");
    assert_eq!(
        (
            err.model(),
            err.max_tokens(),
            err.limit(),
            err.is_from_server()
        ),
        (Some("claude-sim"), 4_001, 4_000, false)
    );
    assert_eq!(
        sim.summary().total.requests,
        1,
        "the refused one never sent"
    );
    assert_eq!(handle.admitted(), 1, "nothing reserved for the refused one");

    // The server's refusal, through the preset with no table.
    let svc = ServiceBuilder::new()
        .quota_stack(Preset::anthropic(Limits::new()))
        .service(sim.clone());
    let res = svc.oneshot(request(40, 4_001)).await.unwrap();
    assert_eq!(res.status(), http::StatusCode::BAD_REQUEST);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let err = MaxTokensError::from_error_body(&body).expect("max_tokens refused");
    assert_eq!(
        (
            err.model(),
            err.max_tokens(),
            err.limit(),
            err.is_from_server()
        ),
        (Some("claude-sim"), 4_001, 4_000, true)
    );
    assert_eq!(sim.summary().total.requests, 2, "never retried");
}
