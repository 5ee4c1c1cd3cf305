//! Scenarios, the runner, and the figures of one cell (a strategy in a scenario).

use crate::strategy::Strategy;
use crate::{Base, Body, BoxError, Probe, Recorder, Req};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt};
use tower_quota::budget::{Limit, Limits as ClientLimits};
use tower_quota_sim::{
    AuditOutcome, Background, Dialect, Faults, Limits, MessagesRequest, SimConfig, Simulator,
};

/// The bucket whose units measure goodput.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Requests per minute binds.
    Requests,
    /// Input tokens per minute binds.
    InputTokens,
    /// Output tokens per minute binds.
    OutputTokens,
}

/// A workload against a simulated server.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Its name in the tables.
    pub name: &'static str,
    /// The server's configuration (default limits ignored when `keys` is not empty).
    pub sim: SimConfig,
    /// The API keys used, round robin, each with the server's limits for it.
    pub keys: Vec<(String, Limits)>,
    /// What binds.
    pub unit: Unit,
    /// Requests in the burst.
    pub requests: usize,
    /// The prompt of every request.
    pub prompt: String,
    /// `max_tokens` of every request.
    pub max_tokens: u64,
    /// Whether the configured stack is told the limits (false: "limits unknown to the client").
    pub limits_known: bool,
}

/// Bucket capacity as a share of the per-minute limit in every scenario: a small burst, so the
/// figures measure the sustained rate, not how fast a client drains a full bucket.
pub const BURST: f64 = 0.1;

fn limits(rpm: u64, itpm: u64, otpm: u64) -> Limits {
    Limits {
        rpm: Some(rpm),
        itpm: Some(itpm),
        otpm: Some(otpm),
        tpm: None,
        burst_fraction: BURST,
    }
}

impl Scenario {
    /// The six scenarios of the benchmark, scaled by `requests` (2000 in the tables).
    pub fn all(requests: usize) -> Vec<Scenario> {
        let base = |name, l: Limits, unit, prompt: usize, max_tokens| Scenario {
            name,
            sim: SimConfig::new(l),
            keys: vec![("sk-bench-a".to_owned(), l)],
            unit,
            requests,
            prompt: "x".repeat(prompt),
            max_tokens,
            limits_known: true,
        };
        let rpm = base(
            "RPM-bound",
            limits(600, 10_000_000, 10_000_000),
            Unit::Requests,
            40,
            100,
        );
        let mut itpm = base(
            "ITPM-bound",
            limits(6_000, 60_000, 10_000_000),
            Unit::InputTokens,
            400,
            100,
        );
        itpm.name = "ITPM-bound";
        let mut otpm = base(
            "OTPM-bound, output 30 %",
            limits(6_000, 10_000_000, 60_000),
            Unit::OutputTokens,
            40,
            200,
        );
        otpm.sim = otpm.sim.with_output_fraction(0.3);
        let mut unknown = rpm.clone();
        unknown.name = "limits unknown to the client";
        unknown.limits_known = false;
        let mut overload = rpm.clone();
        overload.name = "10 % 529 overload";
        overload.sim = overload.sim.with_faults(Faults {
            overload: 0.1,
            ..Faults::default()
        });
        let mut three = rpm.clone();
        three.name = "three keys";
        three.keys = vec![
            ("sk-bench-a".into(), limits(300, 10_000_000, 10_000_000)),
            ("sk-bench-b".into(), limits(600, 10_000_000, 10_000_000)),
            ("sk-bench-c".into(), limits(900, 10_000_000, 10_000_000)),
        ];
        vec![rpm, itpm, otpm, unknown, overload, three]
    }

    /// The scenarios of learning limits that change or are shared (issue 11), scaled by
    /// `requests`: the request limit halves or doubles `change_at` in, another client takes half
    /// of the key, the server sends no rate-limit headers (requests bind, or output tokens bind).
    pub fn learning(requests: usize, change_at: Duration) -> Vec<Scenario> {
        let all = Self::all(requests);
        let rpm = |n| limits(n, 10_000_000, 10_000_000);
        let with = |name, l: Limits, sim: SimConfig| Scenario {
            name,
            sim,
            keys: vec![("sk-bench-a".to_owned(), l)],
            ..all[0].clone()
        };
        let halves = with(
            "limit halves mid-burst",
            rpm(1200),
            SimConfig::new(rpm(1200)).with_limit_change(change_at, rpm(600)),
        );
        let doubles = with(
            "limit doubles mid-burst",
            rpm(600),
            SimConfig::new(rpm(600)).with_limit_change(change_at, rpm(1200)),
        );
        let shared = with(
            "another client takes half",
            rpm(1200),
            SimConfig::new(rpm(1200)).with_background(Background {
                rpm: 600,
                from: Duration::ZERO,
                until: Duration::MAX,
                ..Background::default()
            }),
        );
        let mut quiet = all[0].clone();
        quiet.name = "no headers, requests bind";
        quiet.sim = quiet.sim.with_dialect(Dialect::None);
        let mut quiet_otpm = all[2].clone();
        quiet_otpm.name = "no headers, output tokens bind";
        quiet_otpm.sim = quiet_otpm.sim.with_dialect(Dialect::None);
        vec![halves, doubles, shared, quiet, quiet_otpm]
    }

    /// The same scenario with every limit (and the other client's share) `k` times higher, so a
    /// real-HTTP cell takes seconds, not minutes.
    pub fn scaled(mut self, k: u64) -> Scenario {
        let up = |l: &mut Limits| {
            l.rpm = l.rpm.map(|n| n * k);
            l.itpm = l.itpm.map(|n| n * k);
            l.otpm = l.otpm.map(|n| n * k);
            l.tpm = l.tpm.map(|n| n * k);
        };
        for (_, l) in &mut self.keys {
            up(l);
        }
        up(&mut self.sim.limits);
        for (_, l) in &mut self.sim.limit_changes {
            up(l);
        }
        if let Some(b) = &mut self.sim.background {
            b.rpm *= k;
            b.itpm *= k;
            b.otpm *= k;
        }
        self
    }

    /// The binding bucket's per-minute limit in `l` (0: none).
    pub fn per_minute(&self, l: &Limits) -> f64 {
        match self.unit {
            Unit::Requests => l.rpm,
            Unit::InputTokens => l.itpm,
            Unit::OutputTokens => l.otpm,
        }
        .unwrap_or(0) as f64
    }

    /// What the binding bucket of a key whose limits start as `l` allowed this client from the
    /// start until `t` seconds: its capacity, and the refill at the limit of each moment (the
    /// scheduled changes) less what another client takes. Exact: the rate is constant between
    /// the scheduled events.
    pub fn allowed(&self, l: Limits, t: f64) -> f64 {
        let taken = |s: f64| {
            self.sim.background.map_or(0.0, |b| {
                let on = s >= b.from.as_secs_f64() && s < b.until.as_secs_f64();
                let r = match self.unit {
                    Unit::Requests => b.rpm,
                    Unit::InputTokens => b.itpm,
                    Unit::OutputTokens => b.otpm,
                };
                if on { r as f64 } else { 0.0 }
            })
        };
        let limit_at = |s: f64| {
            self.sim
                .limit_changes
                .iter()
                .rev()
                .find(|(at, _)| at.as_secs_f64() <= s)
                .map_or(self.per_minute(&l), |(_, c)| self.per_minute(c))
        };
        // The moments the rate changes, within (0, t).
        let mut cuts: Vec<f64> = self
            .sim
            .limit_changes
            .iter()
            .map(|(at, _)| at.as_secs_f64())
            .chain(
                self.sim
                    .background
                    .iter()
                    .flat_map(|b| [b.from.as_secs_f64(), b.until.as_secs_f64()]),
            )
            .filter(|&c| c > 0.0 && c < t)
            .collect();
        cuts.sort_by(f64::total_cmp);
        let mut sum = self.per_minute(&l) * l.burst_fraction;
        let mut from = 0.0;
        for to in cuts.into_iter().chain([t]) {
            let limit = limit_at(from);
            let net = (limit - taken(from)).max(limit * 0.01);
            sum += net / 60.0 * (to - from).max(0.0);
            from = to;
        }
        sum
    }

    /// How long a perfect client needs for `units` of the binding bucket.
    pub fn ideal(&self, l: Limits, units: f64) -> f64 {
        let (mut lo, mut hi) = (0.0, 1.0);
        while self.allowed(l, hi) < units && hi < 1e6 {
            hi *= 2.0;
        }
        for _ in 0..40 {
            let mid = (lo + hi) / 2.0;
            if self.allowed(l, mid) < units {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        hi
    }

    /// The simulator for this scenario, `seed`ed.
    pub fn simulator(&self, seed: u64) -> Simulator {
        let mut cfg = self.sim.clone().with_seed(seed);
        for (k, l) in &self.keys {
            cfg = cfg.with_key(k.clone(), *l);
        }
        Simulator::new(cfg)
    }

    /// What the configured stack is told: the key's limits, or `None` when the scenario hides
    /// them or has several keys (the stack then learns them from the headers).
    pub fn client_limits(&self) -> Option<ClientLimits> {
        if !self.limits_known || self.keys.len() > 1 {
            return None;
        }
        Some(client_limits(self.keys[0].1))
    }

    /// Units of the binding bucket one successful request uses.
    pub fn units_per_request(&self) -> f64 {
        let m = MessagesRequest::user("claude-sim", self.prompt.clone(), self.max_tokens);
        match self.unit {
            Unit::Requests => 1.0,
            Unit::InputTokens => tower_quota_sim::input_tokens(&m) as f64,
            Unit::OutputTokens => ((self.max_tokens as f64 * self.sim.output_fraction).round())
                .clamp(1.0, self.max_tokens as f64),
        }
    }

    fn request(&self, base_url: &str, i: usize, probe: Probe) -> Req {
        let key = &self.keys[i % self.keys.len()].0;
        let body =
            MessagesRequest::user("claude-sim", self.prompt.clone(), self.max_tokens).to_bytes();
        let mut req = Request::post(format!("{base_url}/v1/messages"))
            .header("x-api-key", key)
            .header("anthropic-version", "2023-06-01")
            .header("content-type", "application/json")
            .body(Full::new(body))
            .expect("a valid request");
        req.extensions_mut().insert(probe);
        req
    }
}

/// The simulator's limits as a client configures them: the same per-minute figures, and a burst of
/// the same share of a minute.
pub fn client_limits(l: Limits) -> ClientLimits {
    let lim = |n: Option<u64>| {
        n.map(|n| Limit {
            per_minute: n,
            burst: Some(((n as f64) * l.burst_fraction).max(1.0) as u64),
        })
    };
    ClientLimits {
        requests: lim(l.rpm),
        input_tokens: lim(l.itpm),
        output_tokens: lim(l.otpm),
        tokens: lim(l.tpm),
    }
}

/// The figures of one strategy in one scenario.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Cell {
    /// The strategy.
    pub strategy: &'static str,
    /// Logical requests sent.
    pub requests: usize,
    /// Ended with a 2xx.
    pub succeeded: usize,
    /// Ended otherwise (given up, an error, or not done when a bounded run stopped).
    pub lost: usize,
    /// Share of logical requests that saw at least one 429.
    pub saw_429: f64,
    /// 429 answers in all (attempts).
    pub rate_limited: u64,
    /// Attempts sent in all.
    pub attempts: u64,
    /// Successful units of the binding bucket as a share of what it allowed over the run.
    pub goodput: f64,
    /// Median latency of a logical request, seconds.
    pub p50_s: f64,
    /// 99th percentile latency, seconds.
    pub p99_s: f64,
    /// From the first request to the last one done, seconds.
    pub elapsed_s: f64,
}

/// Where requests go.
#[derive(Clone, Debug)]
pub enum Target {
    /// The simulator, in process.
    InProcess(Simulator),
    /// A server at this base URL: the simulator served over HTTP (given, for its audit), or any
    /// Messages-compatible server (`None`: goodput is then counted from the client's successes,
    /// in requests).
    Http(String, Option<Simulator>),
}

impl Target {
    fn base(&self) -> (Base, String) {
        match self {
            Target::InProcess(sim) => {
                let svc = ServiceBuilder::new()
                    .map_response(|res: http::Response<tower_quota_sim::SimBody>| {
                        res.map(|b| Body::new(b.map_err(Into::into)))
                    })
                    .service(sim.clone());
                (BoxCloneService::new(Recorder(svc)), String::new())
            }
            Target::Http(url, _) => {
                let client = HyperClient::builder(TokioExecutor::new())
                    .pool_max_idle_per_host(1024)
                    .build_http::<Full<Bytes>>();
                let svc = ServiceBuilder::new()
                    .map_err(BoxError::from)
                    .map_response(|res: http::Response<hyper::body::Incoming>| {
                        res.map(|b| Body::new(b.map_err(Into::into)))
                    })
                    .service(client);
                (BoxCloneService::new(Recorder(svc)), url.clone())
            }
        }
    }

    fn simulator(&self) -> Option<&Simulator> {
        match self {
            Target::InProcess(s) => Some(s),
            Target::Http(_, s) => s.as_ref(),
        }
    }
}

/// Runs `strategy` in `scenario` against `target`, with at most `tasks` requests at once (for the
/// strategies that bound themselves) and at most `deadline` of run time (requests not done by then
/// are lost).
pub async fn run(
    scenario: &Scenario,
    strategy: Strategy,
    target: &Target,
    tasks: usize,
    seed: u64,
    deadline: Option<Duration>,
) -> Cell {
    let (base, url) = target.base();
    let built = strategy.build(base, scenario.client_limits(), seed);
    let client = built.client;
    let n = scenario.requests;
    let keys = scenario.keys.len();
    let start = Instant::now();
    let mut set = JoinSet::new();
    // One pool of workers per key, each taking that key's requests in order: keys are separate
    // tenants, so a slow key's queue must not hold the workers of a fast one.
    let per_key = strategy.concurrency(tasks, n).div_ceil(keys).max(1);
    for k in 0..keys {
        let next = Arc::new(AtomicUsize::new(0));
        for _ in 0..per_key {
            let (client, next, scenario, url) =
                (client.clone(), next.clone(), scenario.clone(), url.clone());
            set.spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = k + keys * next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let probe = Probe::default();
                    let req = scenario.request(&url, i, probe.clone());
                    let t0 = Instant::now();
                    let ok = matches!(client.clone().oneshot(req).await, Ok(s) if (200..300).contains(&s));
                    out.push((ok, t0.elapsed(), probe.saw_429(), probe.attempts(), Instant::now(), i, probe.limited()));
                }
                out
            });
        }
    }
    let mut results = Vec::with_capacity(n);
    let collect = async {
        while let Some(r) = set.join_next().await {
            if let Ok(r) = r {
                results.extend(r);
            }
        }
    };
    match deadline {
        Some(d) => {
            let _ = tokio::time::timeout(d, collect).await;
        }
        None => collect.await,
    }
    set.abort_all();
    let end = results.iter().map(|r| r.4).max().unwrap_or(start);
    let elapsed = end.saturating_duration_since(start);

    // Goodput, per key: the binding bucket's units served with success, over what the bucket
    // allowed from the start until the key's last request was done, or until a perfect client
    // could have finished the key's whole share of the burst, whichever is later (a strategy that
    // gives up early gets no credit for the work it dropped).
    let sim = target.simulator();
    let audit = sim.map(Simulator::audit).unwrap_or_default();
    let per_request = scenario.units_per_request();
    let (mut used, mut allowed) = (0.0, 0.0);
    for (k, (key, l)) in scenario.keys.iter().enumerate() {
        let fp = tower_quota_sim::fingerprint(key);
        let share = (0..n).filter(|i| i % scenario.keys.len() == k).count() as f64;
        let ideal = scenario.ideal(*l, share * per_request);
        let done = results
            .iter()
            .filter(|r| r.5 % scenario.keys.len() == k)
            .map(|r| r.4)
            .max()
            .unwrap_or(start)
            .saturating_duration_since(start)
            .as_secs_f64();
        allowed += scenario.allowed(*l, done.max(ideal));
        used += if sim.is_some() {
            audit
                .iter()
                .filter(|r| r.key == fp && r.outcome == AuditOutcome::Ok)
                .map(|r| match scenario.unit {
                    Unit::Requests => 1.0,
                    Unit::InputTokens => r.input_tokens as f64,
                    Unit::OutputTokens => r.output_tokens as f64,
                })
                .sum::<f64>()
        } else {
            results.iter().filter(|r| r.0 && r.5 % keys == k).count() as f64 * per_request
        };
    }
    let span = elapsed.as_secs_f64();
    let rate_limited: u64 = results.iter().map(|r| u64::from(r.6)).sum();
    let mut latencies: Vec<Duration> = results.iter().map(|r| r.1).collect();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64())
    };
    let succeeded = results.iter().filter(|r| r.0).count();
    Cell {
        strategy: strategy.name(),
        requests: n,
        succeeded,
        lost: n - succeeded,
        saw_429: results.iter().filter(|r| r.2).count() as f64 / n as f64,
        rate_limited,
        attempts: results.iter().map(|r| u64::from(r.3)).sum(),
        goodput: if allowed > 0.0 { used / allowed } else { 0.0 },
        p50_s: pct(0.5),
        p99_s: pct(0.99),
        elapsed_s: span,
    }
}

/// Formats cells as a Markdown table.
pub fn table(cells: &[Cell]) -> String {
    let mut s = String::from(
        "| strategy | goodput | saw a 429 | lost | p50 | p99 | 429s | attempts | elapsed |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for c in cells {
        s.push_str(&format!(
            "| {} | {:.1} % | {:.1} % | {} | {:.2} s | {:.2} s | {} | {} | {:.1} s |\n",
            c.strategy,
            100.0 * c.goodput,
            100.0 * c.saw_429,
            c.lost,
            c.p50_s,
            c.p99_s,
            c.rate_limited,
            c.attempts,
            c.elapsed_s,
        ));
    }
    s
}
