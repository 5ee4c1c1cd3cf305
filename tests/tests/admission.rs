//! The admission layers (token budget, concurrency limit) in the full stack against the in-process
//! simulator, under paused time.

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt};
use tower_quota::BoxError;
use tower_quota::body::QuotaBody;
use tower_quota::budget::{Limits as BudgetLimits, TokenBudgetLayer};
use tower_quota::concurrency::{Aimd, ConcurrencyHandle, ConcurrencyLimitLayer};
use tower_quota::retry::BackoffRetryLayer;
use tower_quota::retry_after::RetryAfterLayer;
use tower_quota_sim::{Limits, MessagesRequest, SimBody, SimConfig, Simulator, Summary};

type Svc = BoxCloneService<Request<Full<Bytes>>, (), BoxError>;

fn request(key: &str, max_tokens: u64, stream: bool) -> Request<Full<Bytes>> {
    let mut m = MessagesRequest::user(
        "claude-sim",
        "Summarise the plot of Hamlet in one line.",
        max_tokens,
    );
    m.stream = stream;
    Request::post("/v1/messages")
        .header("x-api-key", key)
        .body(Full::new(m.to_bytes()))
        .unwrap()
}

/// The recommended stack; the body is read to its end (so usage settles and slots free).
fn stack(sim: &Simulator, budget: TokenBudgetLayer, concurrency: ConcurrencyLimitLayer) -> Svc {
    let svc = ServiceBuilder::new()
        .layer(BackoffRetryLayer::new().seed(1).max_retries(10))
        .layer(budget)
        .layer(concurrency)
        .layer(RetryAfterLayer::new().seed(2))
        .service(sim.clone());
    let svc = ServiceExt::<Request<Full<Bytes>>>::and_then(
        svc,
        |res: http::Response<QuotaBody<SimBody>>| async move {
            let status = res.status();
            res.into_body().collect().await?;
            if status.is_success() {
                Ok(())
            } else {
                Err(BoxError::from(format!("status {status}")))
            }
        },
    );
    BoxCloneService::new(svc)
}

struct Run {
    ok: usize,
    failed: usize,
    elapsed: Duration,
    summary: Summary,
}

async fn run(
    sim: &Simulator,
    svc: Svc,
    tasks: usize,
    per_task: usize,
    max_tokens: u64,
    key: &'static str,
) -> Run {
    let t0 = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..tasks {
        let svc = svc.clone();
        set.spawn(async move {
            let mut results = Vec::new();
            for _ in 0..per_task {
                results.push(
                    svc.clone()
                        .oneshot(request(key, max_tokens, false))
                        .await
                        .is_ok(),
                );
            }
            results
        });
    }
    let (mut ok, mut failed) = (0, 0);
    while let Some(r) = set.join_next().await {
        for good in r.unwrap() {
            if good { ok += 1 } else { failed += 1 }
        }
    }
    Run {
        ok,
        failed,
        elapsed: t0.elapsed(),
        summary: sim.summary(),
    }
}

/// Successes as a share of what a bucket of `capacity` refilled at `rate`/s admits from the first
/// arrival to the last success.
fn goodput(sim: &Simulator, capacity: f64, rate: f64) -> f64 {
    let audit = sim.audit();
    let first = audit.first().unwrap().arrival;
    let ok: Vec<_> = audit
        .iter()
        .filter(|r| r.outcome == tower_quota_sim::AuditOutcome::Ok)
        .collect();
    let last = ok.last().unwrap().arrival;
    ok.len() as f64 / (capacity + rate * (last - first).as_secs_f64())
}

/// 1200 RPM, ample ITPM, 60 000 OTPM: with `max_tokens` 100, output binds at 10 requests/s
/// (a burst of 600).
fn sim_limits() -> Limits {
    Limits {
        rpm: Some(1200),
        itpm: Some(1_000_000),
        otpm: Some(60_000),
        tpm: None,
        burst_fraction: 1.0,
    }
}

fn client_limits() -> BudgetLimits {
    BudgetLimits::new().rpm(1200).itpm(1_000_000).otpm(60_000)
}

#[tokio::test(start_paused = true)]
async fn configured_limits_2000_requests_from_200_tasks_with_no_429() {
    let sim = Simulator::new(SimConfig::new(sim_limits()));
    let svc = stack(
        &sim,
        TokenBudgetLayer::new(client_limits()),
        ConcurrencyLimitLayer::adaptive(Aimd::default()),
    );
    let r = run(&sim, svc, 200, 10, 100, "sk-configured").await;
    assert_eq!((r.ok, r.failed), (2000, 0));
    assert_eq!(r.summary.total.rate_limited, 0, "{:?}", r.summary.total);
    let g = goodput(&sim, 600.0, 10.0);
    eprintln!("configured: goodput {:.4}, elapsed {:?}", g, r.elapsed);
    assert!(g >= 0.97, "goodput {g}");
}

#[tokio::test(start_paused = true)]
async fn learned_limits_keep_429s_under_two_percent() {
    let sim = Simulator::new(SimConfig::new(sim_limits()));
    let svc = stack(
        &sim,
        TokenBudgetLayer::new(BudgetLimits::new()),
        ConcurrencyLimitLayer::adaptive(Aimd::default()),
    );
    let r = run(&sim, svc, 200, 10, 100, "sk-learned").await;
    assert_eq!((r.ok, r.failed), (2000, 0));
    let share = r.summary.total.rate_limited as f64 / r.summary.total.requests as f64;
    let g = goodput(&sim, 600.0, 10.0);
    eprintln!(
        "learned: 429 share {:.4} ({} of {}), goodput {:.4}",
        share, r.summary.total.rate_limited, r.summary.total.requests, g
    );
    assert!(share <= 0.02, "429 share {share}");
    assert_eq!(r.summary.total.early_arrivals, 0);
}

#[tokio::test(start_paused = true)]
async fn reconciliation_doubles_otpm_bound_goodput_when_output_is_30_percent() {
    let mut throughput = Vec::new();
    for reconcile in [false, true] {
        let sim = Simulator::new(SimConfig::new(sim_limits()).with_output_fraction(0.3));
        let svc = stack(
            &sim,
            TokenBudgetLayer::new(client_limits()).reconcile(reconcile),
            ConcurrencyLimitLayer::adaptive(Aimd::default()),
        );
        let r = run(&sim, svc, 200, 15, 100, "sk-otpm").await;
        assert_eq!((r.ok, r.failed), (3000, 0));
        assert_eq!(r.summary.total.rate_limited, 0);
        throughput.push(r.ok as f64 / r.elapsed.as_secs_f64());
    }
    eprintln!(
        "otpm 30 %: without {:.1}/s, with {:.1}/s",
        throughput[0], throughput[1]
    );
    assert!(throughput[1] >= 2.0 * throughput[0], "{throughput:?}");
}

/// The recommended stack with an adaptive limit from 4 (at most 100), no quota: its handle too.
fn adaptive_stack(sim: &Simulator, latency_tolerance: Option<f64>) -> (Svc, ConcurrencyHandle) {
    let concurrency = ConcurrencyLimitLayer::adaptive(Aimd {
        initial: 4,
        min: 1,
        max: 100,
        decrease_ratio: 0.9,
        latency_tolerance,
    });
    let handle = concurrency.handle();
    let budget = TokenBudgetLayer::new(BudgetLimits::new());
    (stack(sim, budget, concurrency), handle)
}

#[tokio::test(start_paused = true)]
async fn adaptive_concurrency_settles_under_a_server_cap_and_recovers_when_it_lifts() {
    let sim = Simulator::new(
        SimConfig::new(Limits::unlimited())
            .with_latency(Duration::from_millis(100), Duration::ZERO)
            .with_max_concurrency(10),
    );
    let (svc, handle) = adaptive_stack(&sim, None);
    // Sample the limit every 100 ms from the 5th second on (after the climb from 4).
    let sampler = {
        let handle = handle.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let mut samples = Vec::new();
            for _ in 0..100 {
                samples.push(handle.limit());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            samples
        })
    };
    let r = run(&sim, svc.clone(), 50, 40, 10, "sk-aimd").await;
    assert_eq!(r.failed, 0);
    let mut samples = sampler.await.unwrap();
    samples.sort_unstable();
    let median = samples[samples.len() / 2];
    let overloaded = r.summary.total.overloaded as f64 / r.summary.total.requests as f64;
    eprintln!(
        "capped: median limit {median} (min {}, max {}), 529 share {overloaded:.4}, elapsed {:?}",
        samples[0],
        samples[samples.len() - 1],
        r.elapsed
    );
    // AIMD probes the cap from below: it sits at the cap and touches cap + 1 now and then.
    assert!(median <= 10 && samples[0] >= 7, "{samples:?}");
    assert!(overloaded < 0.03, "{overloaded}");

    sim.set_max_concurrency(None);
    let r = run(&sim, svc, 50, 40, 10, "sk-aimd").await;
    assert_eq!(r.failed, 0);
    eprintln!("lifted: limit {}", handle.limit());
    assert!(handle.limit() >= 25, "limit {}", handle.limit());
}

#[tokio::test(start_paused = true)]
async fn a_streaming_response_keeps_its_slot_until_its_body_ends() {
    let sim = Simulator::new(
        SimConfig::new(Limits::unlimited())
            .with_latency(Duration::from_millis(50), Duration::from_millis(10)),
    );
    let concurrency = ConcurrencyLimitLayer::fixed(1);
    let handle = concurrency.handle();
    let svc = ServiceBuilder::new()
        .layer(concurrency)
        .service(sim.clone());
    let t0 = Instant::now();
    let first = svc.clone().oneshot(request("k", 100, true)).await.unwrap();
    assert_eq!(handle.in_flight(), 1);
    let second = tokio::spawn(svc.clone().oneshot(request("k", 10, false)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The stream is still going: the second request has not reached the server.
    assert_eq!(sim.summary().total.requests, 1);
    first.into_body().collect().await.unwrap();
    let stream_end = t0.elapsed();
    second.await.unwrap().unwrap();
    let arrivals: Vec<Duration> = sim.audit().iter().map(|r| r.arrival).collect();
    assert!(arrivals[1] >= stream_end, "{arrivals:?} vs {stream_end:?}");
    // 50 ms to the first byte, 500 ms unread, then 100 tokens at 10 ms (the simulator paces its
    // events from when they are polled; timers round each of 16 deltas up to the millisecond).
    assert!(stream_end >= Duration::from_millis(1550), "{stream_end:?}");
}

/// Counts at most `burst + rate * window` (plus one for the boundary) in every window.
fn held(arrivals: &[Duration], burst: f64, rate: f64, window: Duration) -> bool {
    let mut j = 0;
    (0..arrivals.len()).all(|i| {
        while j < arrivals.len() && arrivals[j] < arrivals[i] + window {
            j += 1;
        }
        ((j - i) as f64) <= burst + rate * window.as_secs_f64() + 1.0
    })
}

#[tokio::test(start_paused = true)]
async fn three_keys_with_different_limits_and_a_global_cap() {
    use tower_quota::budget::Limit;
    use tower_quota::partition::PartitionKey;
    let tiers = [("sk-a", 300u64), ("sk-b", 600), ("sk-c", 900)];
    let sim_limits = |rpm| Limits {
        rpm: Some(rpm),
        burst_fraction: 0.1,
        ..Limits::unlimited()
    };
    let mut cfg = SimConfig::new(Limits::unlimited());
    for (k, rpm) in tiers {
        cfg = cfg.with_key(k, sim_limits(rpm));
    }
    let sim = Simulator::new(cfg);
    let client = |rpm: u64| BudgetLimits {
        requests: Some(Limit {
            per_minute: rpm,
            burst: Some(rpm / 10),
        }),
        ..BudgetLimits::new()
    };
    let budget = TokenBudgetLayer::new(client(60))
        .partition_limits(move |p| {
            tiers
                .iter()
                .find(|(k, _)| PartitionKey::fingerprint(k.as_bytes()) == p)
                .map(|(_, rpm)| client(*rpm))
        })
        .global_cap(BudgetLimits {
            requests: Some(Limit {
                per_minute: 1200,
                burst: Some(20),
            }),
            ..BudgetLimits::new()
        });
    let svc = stack(
        &sim,
        budget,
        ConcurrencyLimitLayer::adaptive(Aimd::default()),
    );
    let mut set = JoinSet::new();
    for (key, _) in tiers {
        let svc = svc.clone();
        set.spawn(async move { run_key(svc, key, 200).await });
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(r.unwrap(), 200);
    }
    let audit = sim.audit();
    let summary = sim.summary();
    assert_eq!(summary.total.rate_limited, 0, "{:?}", summary.total);
    let all: Vec<Duration> = audit.iter().map(|r| r.arrival).collect();
    for w in [1, 5] {
        let w = Duration::from_secs(w);
        assert!(held(&all, 20.0, 20.0, w), "the global cap, {w:?}");
        for (key, rpm) in tiers {
            let fp = tower_quota_sim::fingerprint(key);
            let mine: Vec<Duration> = audit
                .iter()
                .filter(|r| r.key == fp)
                .map(|r| r.arrival)
                .collect();
            let rpm = rpm as f64;
            assert!(held(&mine, rpm / 10.0, rpm / 60.0, w), "{key}, {w:?}");
        }
    }
    // The global cap binds while all three keys have work (600 requests would need 29 s at 20/s);
    // the slowest key's own limit binds last: 200 at 5/s after a burst of 30 is 34 s.
    let span = all.last().unwrap().as_secs_f64();
    assert!((34.0..35.0).contains(&span), "{span}");
}

/// Sends `n` requests for `key`, 20 at a time; returns the successes.
async fn run_key(svc: Svc, key: &'static str, n: usize) -> usize {
    let mut set = JoinSet::new();
    let per = n / 20;
    for _ in 0..20 {
        let svc = svc.clone();
        set.spawn(async move {
            let mut ok = 0;
            for _ in 0..per {
                ok += usize::from(svc.clone().oneshot(request(key, 10, false)).await.is_ok());
            }
            ok
        });
    }
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        ok += r.unwrap();
    }
    ok
}

/// A server that slows as it fills (it shares its time among the requests beyond 10) and refuses
/// beyond 20 (529): AIMD on 529s alone climbs to the refusals, latency doubled on the way; with a
/// latency tolerance the limit holds where the server starts to slow.
#[tokio::test(start_paused = true)]
async fn a_latency_tolerance_holds_a_slowing_server_near_its_capacity() {
    let mut results = Vec::new();
    for tolerance in [None, Some(1.5)] {
        let sim = Simulator::new(
            SimConfig::new(Limits::unlimited())
                .with_latency(Duration::from_millis(100), Duration::ZERO)
                .with_service_capacity(10)
                .with_max_concurrency(20),
        );
        let (svc, handle) = adaptive_stack(&sim, tolerance);
        let sampler = {
            let handle = handle.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                let (mut limits, mut rtts) = (Vec::new(), Vec::new());
                for _ in 0..50 {
                    limits.push(handle.limit());
                    rtts.push(
                        handle
                            .round_trip(tower_quota::partition::PartitionKey::GLOBAL)
                            .unwrap_or_default(),
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                limits.sort_unstable();
                rtts.sort_unstable();
                (limits[limits.len() / 2], rtts[rtts.len() / 2])
            })
        };
        let r = run(&sim, svc, 50, 40, 10, "sk-slowing").await;
        assert_eq!(r.failed, 0);
        let (limit, rtt) = sampler.await.unwrap();
        let total = r.summary.total;
        let overloaded = total.overloaded as f64 / total.requests as f64;
        let throughput = r.ok as f64 / r.elapsed.as_secs_f64();
        // Little's law: 50 callers one request at a time, so the mean time a request takes.
        let mean_latency = r.elapsed.as_secs_f64() * 50.0 / r.ok as f64;
        eprintln!(
            "tolerance {tolerance:?}: median limit {limit}, median round trip {rtt:?}, 529s {} of \
             {} ({overloaded:.4}), {throughput:.1}/s, mean time a request {mean_latency:.3} s",
            total.overloaded, total.requests
        );
        results.push((limit, rtt, total.overloaded, throughput));
    }
    let (without, with) = (results[0], results[1]);
    // Without: the limit climbs to the refusals (20) and each round trip doubles.
    assert!(without.0 >= 18, "{without:?}");
    // With: held near 1.5 times the capacity, round trips a tenth shorter at least, fewer
    // refusals, the same throughput (the server's capacity bounds both).
    assert!(with.0 <= 15, "{with:?}");
    assert!(
        with.1.as_secs_f64() <= 0.9 * without.1.as_secs_f64(),
        "{with:?} {without:?}"
    );
    assert!(with.2 < without.2, "{with:?} {without:?}");
    assert!(with.3 >= 0.97 * without.3, "{with:?} {without:?}");
}
