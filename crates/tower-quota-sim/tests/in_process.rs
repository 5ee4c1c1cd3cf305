//! The simulator in process, under paused tokio time.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use std::time::Duration;
use tokio::time::{Instant, advance};
use tower::ServiceExt;
use tower_quota::classify::{Classify, DefaultClassifier, Outcome, TransportKind};
use tower_quota::signals::{Bucket, HintSource, Signals};
use tower_quota_sim::{
    AuditOutcome, Dialect, Faults, Limits, MessagesRequest, RetryAfterStyle, SimBody, SimConfig,
    Simulator,
};

fn request(key: Option<&str>, body: Bytes) -> Request<Full<Bytes>> {
    let mut b = Request::post("/v1/messages").header("content-type", "application/json");
    if let Some(k) = key {
        b = b.header("x-api-key", k);
    }
    b.body(Full::new(body)).unwrap()
}

async fn send(sim: &Simulator, key: &str, max_tokens: u64) -> Response<SimBody> {
    let body = MessagesRequest::user("claude-sim", "Hello there", max_tokens).to_bytes();
    sim.clone().oneshot(request(Some(key), body)).await.unwrap()
}

async fn json(res: Response<SimBody>) -> serde_json::Value {
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

fn rpm_only(rpm: u64) -> Limits {
    Limits {
        rpm: Some(rpm),
        ..Limits::unlimited()
    }
}

#[tokio::test(start_paused = true)]
async fn burst_against_60_rpm_admits_the_capacity_then_429_with_a_correct_retry_after() {
    let sim =
        Simulator::new(SimConfig::new(rpm_only(60)).with_latency(Duration::ZERO, Duration::ZERO));
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..100 {
        let res = send(&sim, "k", 10).await;
        statuses.push(res.status());
        if res.status() == StatusCode::TOO_MANY_REQUESTS {
            last = Some(res);
        }
    }
    let ok = statuses.iter().filter(|s| s.is_success()).count();
    assert_eq!(ok, 60);
    assert_eq!(statuses.len() - ok, 40);
    let mut res = last.unwrap();
    // The bucket refills at 1 request/s: the next one fits in 1 s.
    assert_eq!(res.headers()["retry-after"], "1");
    let signals = Signals::of(&mut res);
    assert_eq!(signals.bucket(Bucket::Requests).remaining, Some(0));
    assert_eq!(signals.bucket(Bucket::Requests).limit, Some(60));
    assert_eq!(signals.exhausted().collect::<Vec<_>>(), [Bucket::Requests]);
    let body = json(res).await;
    assert_eq!(body["error"]["type"], "rate_limit_error");

    // Waiting the announced time is enough.
    advance(Duration::from_secs(1)).await;
    assert_eq!(send(&sim, "k", 10).await.status(), StatusCode::OK);
    // And then the bucket is empty again.
    assert_eq!(
        send(&sim, "k", 10).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );

    let s = sim.summary();
    assert_eq!(s.total.requests, 102);
    assert_eq!(s.total.ok, 61);
    assert_eq!(s.total.rate_limited, 41);
    assert_eq!(s.keys.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn otpm_admits_by_max_tokens_and_debits_the_real_output() {
    let limits = Limits {
        otpm: Some(1000),
        ..Limits::unlimited()
    };
    let sim = Simulator::new(
        SimConfig::new(limits)
            .with_output_fraction(0.3)
            .with_latency(Duration::ZERO, Duration::ZERO),
    );
    let mut admitted = 0;
    let mut remaining = Vec::new();
    for _ in 0..10 {
        let res = send(&sim, "k", 500).await;
        if res.status() == StatusCode::OK {
            admitted += 1;
            remaining.push(
                res.headers()["anthropic-ratelimit-output-tokens-remaining"]
                    .to_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap(),
            );
            let body = json(res).await;
            assert_eq!(body["usage"]["output_tokens"], 150);
            assert_eq!(body["stop_reason"], "end_turn");
        }
    }
    // 1000 -> 850 -> 700 -> 550 -> 400 (< 500: the fifth needs max_tokens and waits).
    assert_eq!(admitted, 4);
    assert_eq!(remaining, [850, 700, 550, 400]);
    let s = sim.summary();
    assert_eq!(s.total.output_tokens, 600);
    assert_eq!(s.total.rate_limited, 6);
}

#[tokio::test(start_paused = true)]
async fn input_tokens_are_charged_from_the_content() {
    let limits = Limits {
        itpm: Some(100),
        ..Limits::unlimited()
    };
    let sim = Simulator::new(SimConfig::new(limits));
    // 400 characters: 100 tokens + 4 + 3 of framing > 100: can never fit, fails fast with a 400.
    let body = MessagesRequest::user("m", "x".repeat(400), 10).to_bytes();
    let res = sim.clone().oneshot(request(Some("k"), body)).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let v = DefaultClassifier.classify_response(res.status(), res.headers());
    assert_eq!((v.outcome, v.retryable), (Outcome::Fatal, false));
    assert!(
        json(res).await["error"]["message"]
            .as_str()
            .unwrap()
            .contains("input tokens")
    );
    // 160 characters: 40 + 7 = 47 tokens; two fit in 100, the third waits.
    let body = MessagesRequest::user("m", "x".repeat(160), 10).to_bytes();
    let mut codes = Vec::new();
    for _ in 0..3 {
        let res = sim
            .clone()
            .oneshot(request(Some("k"), body.clone()))
            .await
            .unwrap();
        codes.push(res.status().as_u16());
    }
    assert_eq!(codes, [200, 200, 429]);
    assert_eq!(sim.summary().total.input_tokens, 94);
}

#[tokio::test(start_paused = true)]
async fn every_retry_after_style_announces_an_instant_that_is_never_early() {
    for style in [
        RetryAfterStyle::Seconds,
        RetryAfterStyle::Ms,
        RetryAfterStyle::HttpDate,
    ] {
        let sim = Simulator::new(
            SimConfig::new(rpm_only(30))
                .with_retry_after(style)
                .with_latency(Duration::ZERO, Duration::ZERO),
        );
        for _ in 0..30 {
            assert_eq!(send(&sim, "k", 1).await.status(), 200);
        }
        // Half a second into the 2 s refill period of one request.
        advance(Duration::from_millis(500)).await;
        let mut res = send(&sim, "k", 1).await;
        assert_eq!(res.status(), 429, "{style:?}");
        // The client's clock is skewed by an hour; the Date header keeps dates honest.
        let skewed = sim.wall_now() + Duration::from_secs(3600);
        let signals = Signals::of_with(&mut res, &move || skewed);
        let hint = signals.hint().expect("a hint");
        let expected = match style {
            RetryAfterStyle::Seconds => HintSource::RetryAfterSeconds,
            RetryAfterStyle::Ms => HintSource::RetryAfterMs,
            _ => HintSource::RetryAfterDate,
        };
        assert_eq!(hint.source, expected);
        // The true wait is 1.5 s; the announcement rounds up (ms exactly, seconds to 2 s, a date to
        // the next whole second, measured from a Date header truncated to the second).
        assert!(
            hint.delay >= Duration::from_millis(1500),
            "{style:?}: {hint:?}"
        );
        assert!(
            hint.delay <= Duration::from_millis(3000),
            "{style:?}: {hint:?}"
        );
        let at = signals.retry_at().unwrap();
        tokio::time::sleep_until(at).await;
        assert_eq!(send(&sim, "k", 1).await.status(), 200, "{style:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn no_hint_and_garbage_hints() {
    for style in [RetryAfterStyle::None, RetryAfterStyle::Garbage] {
        let sim = Simulator::new(
            SimConfig::new(rpm_only(1))
                .with_retry_after(style)
                .with_dialect(Dialect::None),
        );
        send(&sim, "k", 1).await;
        let mut res = send(&sim, "k", 1).await;
        assert_eq!(res.status(), 429);
        assert!(Signals::of(&mut res).hint().is_none(), "{style:?}");
        // No announcement, so nothing counts as early.
        send(&sim, "k", 1).await;
        assert_eq!(sim.summary().total.early_arrivals, 0);
    }
}

#[tokio::test(start_paused = true)]
async fn early_arrivals_are_counted_after_the_grace() {
    let sim = Simulator::new(
        SimConfig::new(rpm_only(6))
            .with_latency(Duration::ZERO, Duration::ZERO)
            .with_early_grace(Duration::from_millis(100)),
    );
    for _ in 0..6 {
        send(&sim, "a", 1).await;
    }
    let res = send(&sim, "a", 1).await; // 429, retry-after 10 s
    assert_eq!(res.headers()["retry-after"], "10");
    send(&sim, "a", 1).await; // within the grace: in flight already, not early
    advance(Duration::from_secs(2)).await;
    send(&sim, "a", 1).await; // early
    send(&sim, "b", 1).await; // another key: not early
    advance(Duration::from_secs(8)).await;
    assert_eq!(send(&sim, "a", 1).await.status(), 200); // the cooldown is over
    let audit = sim.audit();
    let early: Vec<bool> = audit.iter().map(|r| r.early).collect();
    assert_eq!(
        early,
        [
            false, false, false, false, false, false, false, false, true, false, false
        ]
    );
    let s = sim.summary();
    assert_eq!(s.total.early_arrivals, 1);
    assert_eq!(s.keys.len(), 2);
    // The audit names keys by fingerprint only.
    assert!(
        audit
            .iter()
            .all(|r| r.key.starts_with("key-") && r.key.len() == 12)
    );
    assert!(!format!("{sim:?}").contains("\"a\""));
}

#[tokio::test(start_paused = true)]
async fn openai_and_ietf_dialects_are_read_by_the_signals_parser() {
    for dialect in [Dialect::Openai, Dialect::Ietf] {
        let sim = Simulator::new(SimConfig::new(rpm_only(2)).with_dialect(dialect));
        send(&sim, "k", 1).await;
        let mut res = send(&sim, "k", 1).await;
        assert_eq!(res.status(), 200);
        let s = Signals::of(&mut res);
        assert_eq!(s.bucket(Bucket::Requests).remaining, Some(0), "{dialect:?}");
        assert_eq!(s.bucket(Bucket::Requests).limit, Some(2), "{dialect:?}");
        let reset = s.bucket(Bucket::Requests).reset.unwrap();
        assert!(
            reset >= Duration::from_secs(30) && reset <= Duration::from_secs(60),
            "{dialect:?} {reset:?}"
        );
    }
    let sim = Simulator::new(SimConfig::new(rpm_only(2)).with_dialect(Dialect::Openai));
    let res = send(&sim, "k", 1).await;
    assert_eq!(res.headers()["x-ratelimit-reset-requests"], "30s");
}

#[tokio::test(start_paused = true)]
async fn faults_overload_server_error_and_reset() {
    let cfg = |faults| SimConfig::new(Limits::unlimited()).with_faults(faults);
    let sim = Simulator::new(cfg(Faults {
        overload: 1.0,
        ..Faults::default()
    }));
    let res = send(&sim, "k", 1).await;
    assert_eq!(res.status().as_u16(), 529);
    assert_eq!(json(res).await["error"]["type"], "overloaded_error");

    let sim = Simulator::new(cfg(Faults {
        server_error: 1.0,
        ..Faults::default()
    }));
    assert_eq!(send(&sim, "k", 1).await.status(), 500);

    let sim = Simulator::new(cfg(Faults {
        reset: 1.0,
        ..Faults::default()
    }));
    let body = MessagesRequest::user("m", "hi", 5).to_bytes();
    let err = sim
        .clone()
        .oneshot(request(Some("k"), body))
        .await
        .unwrap_err();
    let v = DefaultClassifier.classify_error(&*err);
    assert_eq!(v.outcome, Outcome::Transport(TransportKind::Reset));
    assert_eq!(sim.summary().total.resets, 1);
    assert_eq!(sim.in_flight(), 0);

    // Probabilities are drawn from the seed: the same seed gives the same outcomes.
    let outcomes = |seed| async move {
        let sim = Simulator::new(
            cfg(Faults {
                overload: 0.3,
                ..Faults::default()
            })
            .with_seed(seed),
        );
        let mut v = Vec::new();
        for _ in 0..50 {
            v.push(send(&sim, "k", 1).await.status().as_u16());
        }
        v
    };
    let a = outcomes(7).await;
    assert_eq!(a, outcomes(7).await);
    let overloaded = a.iter().filter(|&&c| c == 529).count();
    assert!((5..=25).contains(&overloaded), "{overloaded}");
}

#[tokio::test(start_paused = true)]
async fn slow_responses_take_longer() {
    let sim = Simulator::new(SimConfig::new(Limits::unlimited()).with_faults(Faults {
        slow: 1.0,
        slow_delay: Duration::from_secs(5),
        ..Faults::default()
    }));
    let t = Instant::now();
    assert_eq!(send(&sim, "k", 1).await.status(), 200);
    assert_eq!(t.elapsed(), Duration::from_millis(5020));
}

#[tokio::test(start_paused = true)]
async fn garbage_headers_do_not_hide_the_good_ones() {
    let sim = Simulator::new(SimConfig::new(rpm_only(10)).with_faults(Faults {
        garbage_headers: true,
        ..Faults::default()
    }));
    let mut res = send(&sim, "k", 1).await;
    assert_eq!(
        res.headers()
            .get_all("anthropic-ratelimit-requests-remaining")
            .iter()
            .count(),
        2
    );
    let s = Signals::of(&mut res);
    assert_eq!(s.bucket(Bucket::Requests).remaining, Some(9));
    assert!(s.retry_after().is_none());
}

#[tokio::test(start_paused = true)]
async fn bad_requests() {
    let sim = Simulator::new(SimConfig::default());
    let res = sim
        .clone()
        .oneshot(request(None, MessagesRequest::user("m", "x", 1).to_bytes()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let res = sim
        .clone()
        .oneshot(request(Some("k"), Bytes::from_static(b"{nope")))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let mut cfg = SimConfig::new(Limits::unlimited());
    cfg.context_window = 10;
    let sim2 = Simulator::new(cfg);
    let res = sim2
        .clone()
        .oneshot(request(
            Some("k"),
            MessagesRequest::user("m", "x".repeat(100), 1).to_bytes(),
        ))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert!(
        json(res).await["error"]["message"]
            .as_str()
            .unwrap()
            .contains("prompt is too long")
    );
    let res = sim
        .clone()
        .oneshot(
            Request::get("/elsewhere")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let s = sim.summary();
    assert_eq!(s.total.rejected, 3);
    assert_eq!(s.total.requests, 3);
    assert_eq!(
        sim.audit().iter().map(|r| r.outcome).collect::<Vec<_>>(),
        [
            AuditOutcome::Unauthorized,
            AuditOutcome::BadRequest,
            AuditOutcome::NotFound
        ]
    );
}

fn stream_request(max_tokens: u64) -> Request<Full<Bytes>> {
    let mut m = MessagesRequest::user("m", "hi", max_tokens);
    m.stream = true;
    request(Some("k"), m.to_bytes())
}

#[tokio::test(start_paused = true)]
async fn streams_pace_their_events_and_hold_their_slot_until_the_end() {
    let sim = Simulator::new(
        SimConfig::new(Limits::unlimited())
            .with_latency(Duration::from_millis(100), Duration::from_millis(16))
            .with_max_concurrency(1),
    );
    let t = Instant::now();
    let res = sim.clone().oneshot(stream_request(100)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    assert_eq!(t.elapsed(), Duration::from_millis(100));
    assert_eq!(sim.in_flight(), 1);
    // While it streams, the server's concurrency cap of 1 answers 529.
    assert_eq!(
        sim.clone()
            .oneshot(stream_request(10))
            .await
            .unwrap()
            .status()
            .as_u16(),
        529
    );
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    // 100 ms to the headers, the 529's 25 ms (errors take a quarter of the base latency) before the
    // body was polled, then 100 output tokens at 16 ms each in 16 deltas of 100 ms.
    assert_eq!(t.elapsed(), Duration::from_millis(100 + 25 + 1600));
    assert_eq!(sim.in_flight(), 0);
    let text = std::str::from_utf8(&bytes).unwrap();
    assert!(text.starts_with("event: message_start\n"));
    assert!(text.contains("\"output_tokens\":100"));
    assert!(
        text.trim_end()
            .ends_with("data: {\"type\":\"message_stop\"}")
    );

    // Dropping a stream mid-way returns the slot too.
    let res = sim.clone().oneshot(stream_request(100)).await.unwrap();
    assert_eq!(sim.in_flight(), 1);
    drop(res);
    assert_eq!(sim.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_stream_can_end_with_an_overload_event_inside_a_200() {
    let sim = Simulator::new(SimConfig::new(Limits::unlimited()).with_faults(Faults {
        stream_error: 1.0,
        ..Faults::default()
    }));
    let res = sim.clone().oneshot(stream_request(20)).await.unwrap();
    assert_eq!(res.status(), 200);
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let text = std::str::from_utf8(&bytes).unwrap();
    assert!(text.contains("event: error\ndata: {\"error\":{\"message\":\"Overloaded\",\"type\":\"overloaded_error\"}"), "{text}");
    assert!(!text.contains("message_stop"));
    assert_eq!(sim.summary().total.overloaded, 1);
}

#[tokio::test(start_paused = true)]
async fn keys_have_their_own_limits() {
    let sim = Simulator::new(SimConfig::new(rpm_only(2)).with_key("big", rpm_only(5)));
    let mut ok = std::collections::HashMap::new();
    for key in ["small", "big", "other"] {
        for _ in 0..10 {
            if send(&sim, key, 1).await.status() == 200 {
                *ok.entry(key).or_insert(0) += 1;
            }
        }
    }
    assert_eq!(ok["small"], 2);
    assert_eq!(ok["big"], 5);
    assert_eq!(ok["other"], 2);
    assert!(!format!("{:?}", sim.config()).contains("big"));
}

#[tokio::test(start_paused = true)]
async fn the_audit_endpoint_answers_the_summary() {
    let sim = Simulator::new(SimConfig::default());
    send(&sim, "k", 10).await;
    let res = sim
        .clone()
        .oneshot(
            Request::get("/__audit")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let v = json(res).await;
    assert_eq!(v["requests"], 1);
    assert_eq!(v["ok"], 1);
    assert_eq!(v["output_tokens"], 10);
}

/// `count_tokens` has a limit of its own (2 a minute here), apart from the Messages buckets: the
/// third call in a row gets a 429 with `retry-after`; every call is counted, none is audited. It
/// counts a prompt as the context window check does.
#[tokio::test(start_paused = true)]
async fn count_tokens_has_its_own_limit_and_counts_as_the_window_check() {
    let mut config = SimConfig::new(rpm_only(1));
    config.count_tokens_rpm = Some(2);
    config.context_window = 100;
    let sim = Simulator::new(config);
    let body = MessagesRequest::user("claude-sim", "x".repeat(1_000), 16).to_bytes();
    let count = || {
        Request::post("/v1/messages/count_tokens")
            .header("x-api-key", "sk-count")
            .body(Full::new(body.clone()))
            .unwrap()
    };
    let first = json(sim.clone().oneshot(count()).await.unwrap()).await;
    let counted = first["input_tokens"].as_u64().unwrap();
    assert!(counted > 100, "{counted}");
    assert_eq!(
        sim.clone().oneshot(count()).await.unwrap().status(),
        StatusCode::OK
    );
    let third = sim.clone().oneshot(count()).await.unwrap();
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(third.headers()["retry-after"], "30");
    assert_eq!(json(third).await["error"]["type"], "rate_limit_error");
    assert_eq!(sim.count_tokens_calls(), 3);
    assert!(sim.audit().is_empty());
    // The Messages endpoint (its own bucket untouched) refuses the same prompt with the same count.
    let res = sim
        .clone()
        .oneshot(request(Some("sk-count"), body.clone()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let msg = json(res).await["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        msg,
        format!("prompt is too long: {counted} tokens > 100 maximum")
    );
    // Half a minute later the count has room again.
    advance(Duration::from_secs(30)).await;
    assert_eq!(
        sim.clone().oneshot(count()).await.unwrap().status(),
        StatusCode::OK
    );
}
