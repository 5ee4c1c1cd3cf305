//! Issue 11: learning limits that change and limits shared with others. The preset stack learns
//! every limit from the server (nothing configured), 64 callers at a time, against the in-process
//! simulator under paused time.

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt};
use tower_quota::budget::Limits as Learned;
use tower_quota::{BoxError, Preset, ServiceBuilderExt};
use tower_quota_sim::{Background, Dialect, Limits, MessagesRequest, SimConfig, Simulator};

type Svc = BoxCloneService<Request<Full<Bytes>>, (), BoxError>;

fn request(max_tokens: u64) -> Request<Full<Bytes>> {
    let m = MessagesRequest::user("claude-sim", "Name a colour.", max_tokens);
    Request::post("/v1/messages")
        .header("x-api-key", "sk-learning")
        .body(Full::new(m.to_bytes()))
        .unwrap()
}

/// The preset, learning everything; a body is read to its end.
fn stack(sim: &Simulator) -> Svc {
    let mut preset = Preset::anthropic(Learned::new());
    preset.retry = preset.retry.seed(1);
    preset.retry_after = preset.retry_after.seed(2);
    let svc = ServiceBuilder::new()
        .quota_stack(preset)
        .service(sim.clone());
    let svc = ServiceExt::<Request<Full<Bytes>>>::and_then(
        svc,
        |res: http::Response<tower_quota::body::PresetBody<tower_quota_sim::SimBody>>| async move {
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

/// What a run shows.
#[derive(Debug)]
struct Outcome {
    /// Until the last request ended.
    elapsed: Duration,
    /// Requests that failed in the end.
    failed: usize,
    /// Attempts the server saw, and those answered 429.
    attempts: u64,
    rate_limited: u64,
    /// Attempts that arrived during an announced cooldown.
    early: u64,
    /// The longest gap between two arrivals at the server, from `gap_from` on.
    longest_gap: Duration,
    /// Admitted requests per second, in one-second bins.
    per_second: Vec<u64>,
}

impl Outcome {
    fn share_429(&self) -> f64 {
        self.rate_limited as f64 / self.attempts.max(1) as f64
    }
}

/// `n` requests of `max_tokens`, 64 at a time.
async fn run(config: SimConfig, n: usize, max_tokens: u64, gap_from: Duration) -> Outcome {
    let sim = Simulator::new(config);
    let svc = stack(&sim);
    let t0 = Instant::now();
    let left = Arc::new(AtomicUsize::new(n));
    let mut set = JoinSet::new();
    for _ in 0..64 {
        let (svc, left) = (svc.clone(), left.clone());
        set.spawn(async move {
            let mut failed = 0;
            while left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| l.checked_sub(1))
                .is_ok()
            {
                failed += usize::from(svc.clone().oneshot(request(max_tokens)).await.is_err());
            }
            failed
        });
    }
    let mut failed = 0;
    while let Some(f) = set.join_next().await {
        failed += f.unwrap();
    }
    let elapsed = t0.elapsed();
    let audit = sim.audit();
    let s = sim.summary();
    let mut longest_gap = Duration::ZERO;
    let mut last = gap_from;
    let mut per_second = vec![0; elapsed.as_secs() as usize + 1];
    for r in &audit {
        if r.arrival >= gap_from {
            longest_gap = longest_gap.max(r.arrival.saturating_sub(last));
            last = r.arrival;
        }
        if r.outcome == tower_quota_sim::AuditOutcome::Ok {
            per_second[r.arrival.as_secs() as usize] += 1;
        }
    }
    Outcome {
        elapsed,
        failed,
        attempts: s.total.requests,
        rate_limited: s.total.rate_limited,
        early: s.total.early_arrivals,
        longest_gap,
        per_second,
    }
}

/// Requests bind: 1200 a minute, tokens unlimited.
fn requests(rpm: u64) -> Limits {
    Limits {
        rpm: Some(rpm),
        ..Limits::unlimited()
    }
}

/// A request limit that halves 5 s into a burst of 1800: 1200 sent from the burst and the refill
/// by then, the other 500 or so at 10 a second: about 56 s. No gap longer than two refill
/// intervals (0.2 s) of the new rate.
#[tokio::test(start_paused = true)]
async fn a_limit_that_drops_mid_burst_keeps_sending_at_the_new_rate() {
    let config =
        SimConfig::new(requests(1200)).with_limit_change(Duration::from_secs(5), requests(600));
    let o = run(config, 1800, 16, Duration::from_secs(5)).await;
    eprintln!("{o:?}");
    assert_eq!(o.failed, 0);
    assert_eq!(o.early, 0);
    assert!(o.elapsed <= Duration::from_secs(62), "{:?}", o.elapsed);
    assert!(
        o.longest_gap <= Duration::from_millis(200),
        "{:?}",
        o.longest_gap
    );
    // Every whole second after the drop at the new rate, 10 a second.
    let after = &o.per_second[6..o.per_second.len() - 1];
    assert!(after.iter().all(|n| (9..=11).contains(n)), "{after:?}");
}

/// A request limit that doubles 5 s in: about 650 sent by then (the burst of 600 and 10 a
/// second), the other 1150 at 20 a second: about 62.5 s; within 10 %.
#[tokio::test(start_paused = true)]
async fn a_limit_that_rises_mid_burst_is_used_at_once() {
    let config =
        SimConfig::new(requests(600)).with_limit_change(Duration::from_secs(5), requests(1200));
    let o = run(config, 1800, 16, Duration::from_secs(5)).await;
    eprintln!("{o:?}");
    assert_eq!(o.failed, 0);
    assert_eq!(o.early, 0);
    assert!(
        o.elapsed <= Duration::from_millis(62_500 * 11 / 10),
        "{:?}",
        o.elapsed
    );
    assert!(o.share_429() <= 0.02, "{}", o.share_429());
}

/// Another client takes half of the key's 20 requests a second from the start, and stops at 30 s:
/// the burst of 1200, 10 a second to 30 s (about 1500 by then), then the whole 20 a second.
/// At most 2 % of attempts answered 429, at least 95 % of what is left to this client while
/// shared, and the full rate back within 10 s of the other client's stop.
#[tokio::test(start_paused = true)]
async fn a_key_shared_with_another_client_paces_at_what_is_left() {
    let config = SimConfig::new(requests(1200)).with_background(Background {
        rpm: 600,
        from: Duration::ZERO,
        until: Duration::from_secs(30),
        ..Background::default()
    });
    let o = run(config, 2400, 16, Duration::from_secs(1)).await;
    eprintln!("{o:?} 429 share {:.3}", o.share_429());
    assert_eq!(o.failed, 0);
    assert_eq!(o.early, 0);
    assert!(o.share_429() <= 0.02, "{}", o.share_429());
    let shared: u64 = o.per_second[2..30].iter().sum();
    assert!(
        shared as f64 >= 0.95 * 10.0 * 28.0,
        "{shared} in 28 s shared"
    );
    let alone = &o.per_second[40..o.per_second.len() - 1];
    assert!(alone.iter().all(|&n| n >= 19), "{alone:?}");
}

/// The share of attempts answered 429 these runs stay under: the 3 %. Measured 2.0 % and
/// 2.1 % (18 of 918, 19 of 919: about ten are the first rush, the requests already in flight when
/// the burst runs out; the rest come while the first span is measured). Before the measuring
/// rules (spans counted by send time, blind admission a few held inside at a time): 2.9 % and
/// 3.0 %, and ten times that before any inference.
const NO_HEADERS_429S: f64 = 0.03;

/// A server that sends no rate-limit headers, only `retry-after` on a 429; requests bind (600 a
/// minute): the burst of 600, then 300 at 10 a second: about 30 s. Few 429s
/// ([`NO_HEADERS_429S`]), at least 95 % of the limit after the burst (before: one attempt in ten
/// answered 429).
#[tokio::test(start_paused = true)]
async fn no_headers_requests_bind_the_rate_is_inferred_from_429s() {
    let config = SimConfig::new(requests(600)).with_dialect(Dialect::None);
    let o = run(config, 900, 16, Duration::from_secs(1)).await;
    held_without_headers(&o);
}

/// No headers; output tokens bind: 60 000 a minute, each request admitted on its `max_tokens`
/// (200) and debited its real output (100): the burst of about 600, then 300 at 10 a second.
#[tokio::test(start_paused = true)]
async fn no_headers_output_tokens_bind_the_rate_is_inferred_from_429s() {
    let limits = Limits {
        otpm: Some(60_000),
        ..Limits::unlimited()
    };
    let config = SimConfig::new(limits)
        .with_dialect(Dialect::None)
        .with_output_fraction(0.5);
    let o = run(config, 900, 200, Duration::from_secs(1)).await;
    held_without_headers(&o);
}

/// What a run without headers must show: every request done, none early, few 429s, and the 300
/// requests after the burst at 95 % of 10 a second or better (31.6 s).
fn held_without_headers(o: &Outcome) {
    eprintln!("{o:?} 429 share {:.3}", o.share_429());
    assert_eq!(o.failed, 0);
    assert_eq!(o.early, 0);
    assert!(o.share_429() <= NO_HEADERS_429S, "{}", o.share_429());
    assert!(
        o.elapsed <= Duration::from_millis(31_600),
        "{:?}",
        o.elapsed
    );
}
