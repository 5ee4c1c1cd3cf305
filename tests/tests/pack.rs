//! Packing small prompts into one call, against the simulator under paused time: an RPM-bound
//! workload of 5 000 short prompts.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, ServiceBuilder, ServiceExt};
use tower_quota::budget::{ContextWindows, Limit, Limits};
use tower_quota::pack::{PackLayer, Packed};
use tower_quota::{Preset, ServiceBuilderExt};
use tower_quota_sim::{MessagesRequest, PackFaults, SimConfig, Simulator, packed_answer};

const PROMPTS: usize = 5_000;

/// 600 requests a minute, held as the real API holds them: a bucket of 10 refilled at 10 a
/// second. Tokens are plentiful: requests bind.
fn sim(faults: PackFaults) -> Simulator {
    let limits = tower_quota_sim::Limits {
        burst_fraction: 10.0 / 600.0,
        ..tower_quota_sim::Limits::new(600, 10_000_000, 10_000_000)
    };
    Simulator::new(SimConfig::new(limits).with_pack_faults(faults).with_seed(7))
}

fn client_limits() -> Limits {
    Limits {
        requests: Some(Limit {
            per_minute: 600,
            burst: Some(10),
        }),
        ..Limits::new().itpm(10_000_000).otpm(10_000_000)
    }
}

fn prompt(i: usize) -> String {
    format!("Prompt {i}: what is {i} squared?")
}

/// What a run did.
#[derive(Debug)]
struct Run {
    elapsed: Duration,
    ok: usize,
    calls: u64,
    /// Answers split out of a pack, each checked to be its own prompt's.
    packed_answers: usize,
    /// Answers that came from a call of their own.
    alone: usize,
    /// Tokens the server counted.
    input_tokens: u64,
    output_tokens: u64,
}

impl Run {
    /// The run as a row of BENCHMARKS.md's table.
    fn row(&self, name: &str, resent: u64) -> String {
        format!(
            "| {name} | {:.0} | {:.1} s | {} | {} | {} | {} | {resent} |",
            self.prompts_per_minute(),
            self.elapsed.as_secs_f64(),
            self.calls,
            self.input_tokens,
            self.output_tokens,
            PROMPTS - self.ok,
        )
    }

    fn prompts_per_minute(&self) -> f64 {
        self.ok as f64 * 60.0 / self.elapsed.as_secs_f64()
    }
}

/// Sends every prompt at once through `pack` (if any) over the recommended stack.
async fn run(sim: &Simulator, pack: Option<PackLayer>) -> Run {
    let stack = ServiceBuilder::new()
        .quota_stack(Preset::anthropic(client_limits()))
        .service(sim.clone());
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..PROMPTS {
        let body = MessagesRequest::user("claude-sonnet-5-5", prompt(i), 32).to_bytes();
        let req = http::Request::post("/v1/messages")
            .header("x-api-key", "sk-pack")
            .body(Full::new(body))
            .unwrap();
        let (stack, pack) = (stack.clone(), pack.clone());
        tasks.spawn(async move {
            let (status, packed, bytes) = match pack {
                Some(pack) => {
                    let res = pack.layer(stack).oneshot(req).await.unwrap();
                    let packed = res.extensions().get::<Packed>().copied();
                    let status = res.status();
                    (
                        status,
                        packed,
                        res.into_body().collect().await.unwrap().to_bytes(),
                    )
                }
                None => {
                    let res = stack.oneshot(req).await.unwrap();
                    let status = res.status();
                    (
                        status,
                        None,
                        res.into_body().collect().await.unwrap().to_bytes(),
                    )
                }
            };
            (i, status, packed, bytes)
        });
    }
    let mut run = Run {
        elapsed: Duration::ZERO,
        ok: 0,
        calls: 0,
        packed_answers: 0,
        alone: 0,
        input_tokens: 0,
        output_tokens: 0,
    };
    while let Some(done) = tasks.join_next().await {
        let (i, status, packed, bytes): (usize, _, Option<Packed>, Bytes) = done.unwrap();
        assert_eq!(status, 200, "prompt {i}");
        run.ok += 1;
        let message: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(message["type"], "message", "prompt {i}");
        let text = message["content"][0]["text"].as_str().unwrap();
        match packed {
            Some(_) => {
                // Its own answer, never another prompt's.
                assert_eq!(text, packed_answer(&prompt(i)), "prompt {i}");
                run.packed_answers += 1;
            }
            None => run.alone += 1,
        }
    }
    run.elapsed = start.elapsed();
    let total = sim.summary().total;
    run.calls = total.ok;
    run.input_tokens = total.input_tokens;
    run.output_tokens = total.output_tokens;
    run
}

#[tokio::test(start_paused = true)]
async fn packing_does_eight_times_the_prompts_under_the_same_requests_per_minute() {
    let plain = run(&sim(PackFaults::default()), None).await;
    let pack = PackLayer::new().all(true);
    let packed = run(&sim(PackFaults::default()), Some(pack.clone())).await;
    eprintln!("{}", plain.row("unpacked", 0));
    eprintln!(
        "{}",
        packed.row("packed, 16 a call", pack.handle().resent_alone())
    );
    assert_eq!(plain.ok, PROMPTS);
    assert_eq!(packed.ok, PROMPTS);
    assert_eq!(
        packed.packed_answers, PROMPTS,
        "every prompt answered from a pack"
    );
    assert_eq!(pack.handle().resent_alone(), 0);
    let ratio = packed.prompts_per_minute() / plain.prompts_per_minute();
    assert!(ratio >= 8.0, "{ratio:.1}x");
}

#[tokio::test(start_paused = true)]
async fn with_a_tenth_of_the_answers_dropped_or_garbled_nothing_is_lost() {
    let faults = PackFaults {
        drop: 0.05,
        garble: 0.05,
        duplicate: 0.0,
    };
    let plain = run(&sim(faults), None).await;
    eprintln!("{}", plain.row("unpacked, same server", 0));
    for max_items in [16, 64] {
        let pack = PackLayer::new().all(true).max_items(max_items);
        let packed = run(&sim(faults), Some(pack.clone())).await;
        let h = pack.handle();
        let ratio = packed.prompts_per_minute() / plain.prompts_per_minute();
        let name = format!("packed, {max_items} a call, 10 % of answers bad ({ratio:.1}x)");
        eprintln!("{}", packed.row(&name, h.resent_alone()));
        assert_eq!(packed.ok, PROMPTS, "none lost");
        // Every prompt whose answer was bad was re-sent alone, and only those.
        assert_eq!(packed.alone as u64, h.resent_alone());
        assert_eq!(packed.packed_answers + packed.alone, PROMPTS);
        let share = h.resent_alone() as f64 / PROMPTS as f64;
        assert!((0.08..0.12).contains(&share), "{share}");
        if max_items == 64 {
            assert!(ratio >= 8.0, "{ratio:.1}x");
        }
    }
}

fn three_prompts() -> Vec<http::Request<Full<Bytes>>> {
    (0..3)
        .map(|i| {
            let body = MessagesRequest::user("claude-sonnet-5-5", prompt(i), 32).to_bytes();
            http::Request::post("/v1/messages")
                .header("x-api-key", "sk-pack")
                .body(Full::new(body))
                .unwrap()
        })
        .collect()
}

/// Sends [`three_prompts`] at once through `pack` over `sim`: each answer's status and
/// [`Packed`] mark.
async fn send_three(pack: &PackLayer, sim: &Simulator) -> Vec<(http::StatusCode, Option<Packed>)> {
    let api = pack.layer(sim.clone());
    let calls: Vec<_> = three_prompts()
        .into_iter()
        .map(|req| tokio::spawn(api.clone().oneshot(req)))
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        let res = call.await.unwrap().unwrap();
        answers.push((res.status(), res.extensions().get::<Packed>().copied()));
    }
    answers
}

/// A pack asks for at most its model's largest `max_tokens` (summed over its prompts): with the
/// table naming 64 for the model, three prompts of 32 make a pack of two and a prompt alone, and
/// the server (which allows 64) refuses nothing. Without the table, the one pack of three is
/// refused ("max_tokens: 96 > 64") and its prompts are re-sent alone.
#[tokio::test(start_paused = true)]
async fn a_pack_asks_for_at_most_its_models_largest_max_tokens() {
    let run = |windows: Option<ContextWindows>| async move {
        let mut cfg = SimConfig::new(tower_quota_sim::Limits::unlimited());
        cfg.max_output_tokens = 64;
        let sim = Simulator::new(cfg);
        let mut pack = PackLayer::new().all(true);
        if let Some(w) = windows {
            pack = pack.context_windows(w);
        }
        for (status, _) in send_three(&pack, &sim).await {
            assert_eq!(status, 200);
        }
        (pack.handle(), sim.summary().total)
    };
    let table = ContextWindows::default().model_max_tokens("claude-sonnet-5-5", 64);
    let (handle, total) = run(Some(table)).await;
    assert_eq!(
        (
            handle.items_packed(),
            handle.packed_calls(),
            handle.resent_alone()
        ),
        (2, 1, 0)
    );
    assert_eq!((total.rejected, total.ok), (0, 2), "{total:?}");
    let (handle, total) = run(None).await;
    assert_eq!((handle.packed_calls(), handle.resent_alone()), (1, 3));
    assert_eq!((total.rejected, total.ok), (1, 3), "{total:?}");
}

#[tokio::test(start_paused = true)]
async fn a_pack_refused_with_a_400_sends_each_prompt_alone() {
    // A window that holds one prompt but not three: the packed call is refused as too long.
    let mut cfg = SimConfig::new(tower_quota_sim::Limits::unlimited());
    cfg.context_window = 200;
    let sim = Simulator::new(cfg);
    let pack = PackLayer::new().all(true);
    for (status, packed) in send_three(&pack, &sim).await {
        assert_eq!(status, 200);
        assert!(packed.is_none());
    }
    assert_eq!(pack.handle().packed_calls(), 1);
    assert_eq!(pack.handle().resent_alone(), 3);
    let total = sim.summary().total;
    assert_eq!((total.rejected, total.ok), (1, 3), "{total:?}");
}

#[tokio::test(start_paused = true)]
async fn a_failure_the_stack_gave_up_on_reaches_every_caller_as_it_came() {
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = calls.clone();
    let overloaded = tower::service_fn(move |_req: http::Request<Full<Bytes>>| {
        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async {
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .status(529)
                    .header("x-request-id", "req_1")
                    .body(Full::new(Bytes::from_static(
                        br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
                    )))
                    .unwrap(),
            )
        }
    });
    let api = PackLayer::new().all(true).layer(overloaded);
    let futures: Vec<_> = three_prompts()
        .into_iter()
        .map(|req| tokio::spawn(api.clone().oneshot(req)))
        .collect();
    for f in futures {
        let res = f.await.unwrap().unwrap();
        assert_eq!(res.status(), 529);
        assert_eq!(res.headers()["x-request-id"], "req_1");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert!(body.starts_with(br#"{"type":"error""#));
    }
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one call for the three"
    );
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_gives_up_before_the_pack_leaves_is_left_out() {
    let sim = Simulator::new(SimConfig::new(tower_quota_sim::Limits::unlimited()));
    let pack = PackLayer::new().all(true);
    let api = pack.layer(sim.clone());
    let mut futures: Vec<_> = three_prompts()
        .into_iter()
        .map(|req| tokio::spawn(api.clone().oneshot(req)))
        .collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    futures.remove(1).abort();
    for f in futures {
        assert_eq!(f.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(pack.handle().items_packed(), 2);
    assert_eq!(sim.summary().total.requests, 1);
}

#[tokio::test(start_paused = true)]
async fn duplicated_and_cut_off_answers_are_resent_alone_and_never_given_to_another_prompt() {
    // A fifth of the answers given twice; and `max_tokens` 8 a prompt, less than an answer
    // ("Answer to: Prompt 12: what is 12 squared?" is about 11 tokens), so the packed reply is
    // cut short and the answers past the cut are missing or unterminated.
    let faults = PackFaults {
        duplicate: 0.2,
        ..PackFaults::default()
    };
    let sim = Simulator::new(
        SimConfig::new(tower_quota_sim::Limits::unlimited())
            .with_pack_faults(faults)
            .with_seed(3),
    );
    let pack = PackLayer::new().all(true);
    let api = pack.clone().layer(sim.clone());
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64 {
        let body = MessagesRequest::user("claude-sonnet-5-5", prompt(i), 8).to_bytes();
        let req = http::Request::post("/v1/messages")
            .header("x-api-key", "sk-pack")
            .body(Full::new(body))
            .unwrap();
        let api = api.clone();
        tasks.spawn(async move {
            let res = api.oneshot(req).await.unwrap();
            let packed = res.extensions().get::<Packed>().copied();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (i, packed, body)
        });
    }
    let (mut from_pack, mut alone) = (0, 0);
    while let Some(done) = tasks.join_next().await {
        let (i, packed, body) = done.unwrap();
        let message: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let text = message["content"][0]["text"].as_str().unwrap();
        if packed.is_some() {
            assert_eq!(text, packed_answer(&prompt(i)));
            from_pack += 1;
        } else {
            alone += 1;
        }
    }
    let h = pack.handle();
    assert_eq!(from_pack + alone, 64);
    assert_eq!(alone as u64, h.resent_alone());
    // Most answers of each pack of 16 are past the cut: far more than the duplicates alone.
    assert!(alone > 32, "{alone} re-sent alone");
    assert!(from_pack > 0, "some answers fit before the cut");
}
