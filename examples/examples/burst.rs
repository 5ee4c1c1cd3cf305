//! The burst demo: a burst of concurrent Messages requests that would drown in 429s finishes
//! cleanly, close to the server's limit.
//!
//! Run with: `cargo run --release --example burst`
//!
//! With no arguments it starts the simulated API (`tower-quota-sim`) on a loopback port with
//! Anthropic-like limits (600 requests/min, a burst of 60) and sends 400 requests, 64 at a time,
//! through the full tower-quota stack over hyper-util's pooled client: about 35 s.
//!
//! - `--compare` runs the same burst with the naive loop, the seed recipe, tower's built-ins, the
//!   SDK-like policy and tower-quota, each against a fresh server, and prints them side by side.
//! - `--plot FILE.svg` draws successes and 429s per second against the limit, the limit the
//!   budget learned, and the queue depth over time; with `--compare`, one panel per strategy
//!   (from the simulator's own record of what it answered).
//! - `--base-url URL --api-key KEY` (default `$ANTHROPIC_API_KEY`) aims it at a real
//!   Anthropic-compatible API; the stack then learns the limits from the headers.
//! - `--json` prints the summary as one JSON object on the last line.
//! - `--batch` sends the burst through the batch layer (the Message Batches API of the simulator)
//!   and reports the requests that reached `/v1/messages`, the batches made, the time to the last
//!   result, and the cost at batch prices next to Messages prices (the model family's list
//!   prices from `tower_quota_sim::Price`, or `--price-in`, `--price-out` in dollars per million
//!   tokens; batches cost half, as Anthropic documents).

use bytes::Bytes;
use clap::Parser;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_quota::budget::{Bucket, Limits as BudgetLimits};
use tower_quota::partition::PartitionKey;
use tower_quota::{BoxError, Preset, ServiceBuilderExt};
use tower_quota_bench::scenario::{Scenario, Target, Unit, client_limits, run, table};
use tower_quota_bench::strategy::Strategy;
use tower_quota_sim::{AuditOutcome, Limits, MessagesRequest, SimConfig, Simulator};

#[derive(Parser)]
#[command(about = "Send a burst of concurrent Messages requests through the tower-quota stack")]
struct Args {
    /// Requests in the burst.
    #[arg(long, default_value_t = 400)]
    requests: usize,
    /// Requests at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Server to aim at, `http://host:port` (default: a simulator started on a loopback port).
    #[arg(long, value_parser = parse_base_url)]
    base_url: Option<String>,
    /// API key (default: $ANTHROPIC_API_KEY, or a test key for the simulator). Never printed.
    #[arg(long, value_parser = parse_api_key)]
    api_key: Option<String>,
    /// Model name.
    #[arg(long, default_value = "claude-sonnet-5-5")]
    model: String,
    /// max_tokens of each request.
    #[arg(long, default_value_t = 64)]
    max_tokens: u64,
    /// Learn the simulator's limits from its headers instead of configuring them.
    #[arg(long)]
    learn: bool,
    /// Run the same burst with every strategy and print them side by side.
    #[arg(long)]
    compare: bool,
    /// Draw requests/s over time against the limit, with 429s, the learned limit and the queue
    /// depth, into this SVG file (with `--compare`: one panel per strategy).
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
    /// Print the summary as one JSON object on the last line.
    #[arg(long)]
    json: bool,
    /// Send the burst through the Message Batches API (the batch layer) instead.
    #[arg(long)]
    batch: bool,
    /// Input price, dollars per million tokens (Messages; a batch costs half). Default: the
    /// model family's list price.
    #[arg(long)]
    price_in: Option<f64>,
    /// Output price, dollars per million tokens (Messages; a batch costs half). Default: the
    /// model family's list price.
    #[arg(long)]
    price_out: Option<f64>,
}

/// `--base-url`: an `http://` URL with a host (the demo's client speaks plain HTTP only).
fn parse_base_url(s: &str) -> Result<String, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("not a URL: {e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http"), Some(_)) => Ok(s.trim_end_matches('/').to_owned()),
        (Some("https"), _) => Err("the demo's client speaks plain HTTP only (no TLS): use an \
                                   http:// URL, such as a local quota-sim"
            .to_owned()),
        _ => Err("expected http://host[:port]".to_owned()),
    }
}

/// `--api-key`: a value a header can carry (no newline, no control character).
fn parse_api_key(s: &str) -> Result<String, String> {
    http::HeaderValue::from_str(s)
        .map(|_| s.to_owned())
        .map_err(|_| "an API key must be visible ASCII, with no newline".to_owned())
}

/// Why a request failed, in a few words (never the key).
fn cause(outcome: &Result<(bool, u16, Bytes), BoxError>) -> String {
    match outcome {
        Ok((_, status, _)) => format!("answered {status}"),
        Err(e) => {
            // The innermost cause says most: connection refused, timeout, ...
            let mut last: &(dyn std::error::Error + 'static) = &**e;
            while let Some(s) = last.source() {
                last = s;
            }
            let top = e.to_string();
            let root = last.to_string();
            if top == root {
                top
            } else {
                format!("{top}: {root}")
            }
        }
    }
}

/// The demo server's limits: Anthropic-like buckets, with a burst of a tenth of a minute so the
/// burst outlasts it.
fn demo_limits() -> Limits {
    Limits {
        rpm: Some(600),
        itpm: Some(400_000),
        otpm: Some(80_000),
        tpm: None,
        burst_fraction: 0.1,
    }
}

/// A request's attempts' round trips, summed (nanoseconds), carried in its extensions.
#[derive(Clone, Default)]
struct RoundTrips(Arc<std::sync::atomic::AtomicU64>);

#[derive(Default)]
struct Record {
    /// Seconds since the start at which each request succeeded.
    ok_at: Vec<f64>,
    /// Seconds since the start at which each 429 arrived.
    limited_at: Vec<f64>,
    latencies: Vec<Duration>,
    /// Per succeeded request: the time it waited in the layers (its latency less its attempts'
    /// round trips).
    waits: Vec<Duration>,
    /// Per attempt: send to response headers.
    round_trips: Vec<Duration>,
    /// Per attempt whose body was read to its end: send to the body's end.
    to_body_end: Vec<Duration>,
    failed: usize,
    /// Failures by cause.
    causes: std::collections::BTreeMap<String, usize>,
    input_tokens: u64,
    output_tokens: u64,
    /// Sampled by the progress ticker: (seconds since the start, requests queued in the layers,
    /// the requests/s the budget holds to then, if known).
    samples: Vec<(f64, usize, Option<f64>)>,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let local = args.base_url.is_none();
    let key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("ANTHROPIC_API_KEY").ok())
        .unwrap_or_else(|| "sk-sim-demo".to_owned());
    if let Err(e) = parse_api_key(&key) {
        eprintln!("error: $ANTHROPIC_API_KEY: {e}");
        std::process::exit(2);
    }

    if args.compare {
        return compare(&args, &key).await;
    }
    if args.batch {
        return batch(&args, &key).await;
    }

    let (base, server, sim) = match &args.base_url {
        Some(url) => (url.trim_end_matches('/').to_owned(), None, None),
        None => {
            let sim = Simulator::new(SimConfig::new(demo_limits()));
            let server = tower_quota_sim::serve(sim.clone(), "127.0.0.1:0".parse()?).await?;
            (server.base_url(), Some(server), Some(sim))
        }
    };
    let limits = if local && !args.learn {
        client_limits(demo_limits())
    } else {
        BudgetLimits::new()
    };
    let mut preset = Preset::anthropic(limits);
    // Short replies (`max_tokens` is small): a minute without an answer is a dead server.
    preset.retry = preset.retry.attempt_timeout(Some(Duration::from_secs(60)));
    let partition = PartitionKey::fingerprint(key.as_bytes());
    let start = Instant::now();
    let record = Arc::new(Mutex::new(Record::default()));

    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.concurrency)
        .build::<_, Full<Bytes>>(connector);
    let seen = record.clone();
    // Innermost: every attempt's answer as the server gave it, and its round trip (send to
    // response headers), added to its request's total through a request extension (the retry's
    // copies carry the extensions).
    let timed = service_fn(move |req: Request<Full<Bytes>>| {
        let total = req.extensions().get::<RoundTrips>().cloned();
        let attempt = client.request(req);
        let seen = seen.clone();
        async move {
            let t0 = Instant::now();
            let res = attempt.await?;
            let rtt = t0.elapsed();
            let res = res.map(|b| TimedBody {
                inner: b,
                t0,
                record: Some(seen.clone()),
            });
            if let Some(total) = total {
                total.0.fetch_add(rtt.as_nanos() as u64, Ordering::Relaxed);
            }
            let mut r = seen.lock().unwrap();
            r.round_trips.push(rtt);
            if res.status() == 429 {
                r.limited_at.push(start.elapsed().as_secs_f64());
            }
            drop(r);
            Ok::<_, hyper_util::client::legacy::Error>(res)
        }
    });
    let api = ServiceBuilder::new()
        .quota_stack(preset.clone())
        .service(timed);

    let progress = Progress::new(args.requests as u64);
    // The budget's requests/s: the configured rate, else the learned one (a learned bucket holds
    // a minute's worth, so its capacity is the per-minute rate).
    let configured = limits.requests.map(|l| l.per_minute as f64 / 60.0);
    let ticker = {
        let (preset, record, progress) = (preset.clone(), record.clone(), progress.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                progress.update(&preset, partition, &record, start);
                let queued = preset.budget.handle().queued() + preset.concurrency.handle().queued();
                let learned = requests_capacity(&preset, partition).await;
                let rate = configured.or(learned.map(|cap| cap / 60.0));
                let t = start.elapsed().as_secs_f64();
                record.lock().unwrap().samples.push((t, queued, rate));
            }
        })
    };

    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.max(1) {
        let (api, next, record, progress) =
            (api.clone(), next.clone(), record.clone(), progress.clone());
        let (base, key, model, max_tokens, n) = (
            base.clone(),
            key.clone(),
            args.model.clone(),
            args.max_tokens,
            args.requests,
        );
        workers.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let body =
                    MessagesRequest::user(&model, "Write a haiku about rate limits.", max_tokens)
                        .to_bytes();
                let mut req = Request::post(format!("{base}/v1/messages"))
                    .header("x-api-key", &key)
                    .header("anthropic-version", "2023-06-01")
                    .header("content-type", "application/json")
                    .body(Full::new(body))
                    .expect("a valid request");
                let trips = RoundTrips::default();
                req.extensions_mut().insert(trips.clone());
                let t0 = Instant::now();
                let outcome = async {
                    let res = api.clone().oneshot(req).await?;
                    let ok = res.status().is_success();
                    let status = res.status().as_u16();
                    let bytes = res.into_body().collect().await?.to_bytes();
                    Ok::<_, BoxError>((ok, status, bytes))
                }
                .await;
                let mut r = record.lock().unwrap();
                match outcome {
                    Ok((true, _, bytes)) => {
                        r.ok_at.push(start.elapsed().as_secs_f64());
                        let latency = t0.elapsed();
                        let on_wire = Duration::from_nanos(trips.0.load(Ordering::Relaxed));
                        r.latencies.push(latency);
                        r.waits.push(latency.saturating_sub(on_wire));
                        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
                            r.input_tokens += v["usage"]["input_tokens"].as_u64().unwrap_or(0);
                            r.output_tokens += v["usage"]["output_tokens"].as_u64().unwrap_or(0);
                        }
                    }
                    _ => {
                        r.failed += 1;
                        *r.causes.entry(cause(&outcome)).or_default() += 1;
                    }
                }
                drop(r);
                progress.inc();
            }
        });
    }
    while workers.join_next().await.is_some() {}
    ticker.abort();
    progress.finish();
    let elapsed = start.elapsed();

    let mut r = std::mem::take(&mut *record.lock().unwrap());
    let succeeded = r.ok_at.len();
    let retries = preset.retry.handle().retries();
    // Each sorted once; `pct` reads a sorted slice.
    for d in [
        &mut r.latencies,
        &mut r.waits,
        &mut r.round_trips,
        &mut r.to_body_end,
    ] {
        d.sort_unstable();
    }
    let pct = |sorted: &[Duration], p: f64| {
        sorted
            .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64())
    };
    let (lat, waits, trips, to_end) = (&r.latencies, &r.waits, &r.round_trips, &r.to_body_end);
    // The binding limit: the simulator's requests bucket, or the one the budget learned.
    let limit = if local {
        let l = demo_limits();
        Some((
            l.rpm.unwrap_or(0) as f64 * l.burst_fraction,
            l.rpm.unwrap_or(0) as f64 / 60.0,
        ))
    } else {
        requests_capacity(&preset, partition)
            .await
            .map(|cap| (cap, cap / 60.0))
    };
    let secs = elapsed.as_secs_f64();
    println!();
    println!("requests      {}", args.requests);
    println!("succeeded     {succeeded}");
    println!("failed        {}", args.requests - succeeded);
    for (cause, n) in &r.causes {
        println!("  {n:>6} x    {cause}");
    }
    println!("429s seen     {}", r.limited_at.len());
    println!("retries       {retries}");
    println!("elapsed       {secs:.2} s");
    match limit {
        Some((cap, rate)) => {
            let ideal = ((args.requests as f64 - cap).max(0.0)) / rate;
            let share = succeeded as f64 / (cap + rate * secs.max(ideal));
            println!(
                "goodput       {:.2} req/s, {:.1} % of the {:.0} requests/min limit",
                succeeded as f64 / secs,
                100.0 * share,
                rate * 60.0
            );
        }
        None => println!(
            "goodput       {:.2} req/s (the server sent no limit to compare with)",
            succeeded as f64 / secs
        ),
    }
    println!(
        "tokens        {} in, {} out",
        r.input_tokens, r.output_tokens
    );
    println!(
        "latency       p50 {:.2} s, p99 {:.2} s (per request, end to end)",
        pct(lat, 0.5),
        pct(lat, 0.99)
    );
    println!(
        "  waiting     p50 {:.2} s, p99 {:.2} s (in the layers: budget, slots, gate, backoff)",
        pct(waits, 0.5),
        pct(waits, 0.99)
    );
    println!(
        "  round trip  p50 {:.3} s, p99 {:.3} s (per attempt, send to response headers)",
        pct(trips, 0.5),
        pct(trips, 0.99)
    );
    println!(
        "  to body end p50 {:.3} s, p99 {:.3} s (per attempt read to its end, send to last byte)",
        pct(to_end, 0.5),
        pct(to_end, 0.99)
    );
    if let Some(sim) = &sim {
        let s = sim.summary();
        println!(
            "server saw    {} requests, {} ok, {} answered 429, {} early arrivals",
            s.total.requests, s.total.ok, s.total.rate_limited, s.total.early_arrivals
        );
    }
    if let Some(path) = &args.plot {
        plot(path, &r, limit.map(|l| l.1), secs)?;
        println!("plot          {}", path.display());
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "requests": args.requests,
                "succeeded": succeeded,
                "failed": args.requests - succeeded,
                "rate_limited": r.limited_at.len(),
                "retries": retries,
                "elapsed_s": secs,
                "goodput_rps": succeeded as f64 / secs,
                "latency_p50_s": pct(lat, 0.5),
                "latency_p99_s": pct(lat, 0.99),
                "waiting_p50_s": pct(waits, 0.5),
                "waiting_p99_s": pct(waits, 0.99),
                "round_trip_p50_s": pct(trips, 0.5),
                "round_trip_p99_s": pct(trips, 0.99),
                "body_end_p50_s": pct(to_end, 0.5),
                "body_end_p99_s": pct(to_end, 0.99),
            })
        );
    }
    let failed = args.requests - succeeded;
    drop(r);
    if let Some(server) = server {
        server.shutdown().await;
    }
    if failed > 0 {
        eprintln!("error: {failed} of {} requests failed", args.requests);
        std::process::exit(1);
    }
    Ok(())
}

/// The capacity of the budget's requests bucket for `partition`, once it has one (a learned
/// bucket holds a minute's worth: its capacity is the per-minute rate).
async fn requests_capacity(preset: &Preset, partition: PartitionKey) -> Option<f64> {
    let snapshot = preset.budget.handle().snapshot(partition).await.ok()??;
    snapshot.bucket(Bucket::Requests).map(|(_, cap)| cap as f64)
}

/// A response body that records, when it ends, the time from its attempt's send to its last byte.
struct TimedBody {
    inner: hyper::body::Incoming,
    t0: Instant,
    record: Option<Arc<Mutex<Record>>>,
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let frame = std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_frame(cx));
        if frame.is_none() {
            if let Some(record) = self.record.take() {
                let elapsed = self.t0.elapsed();
                record.lock().unwrap().to_body_end.push(elapsed);
            }
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The live display: a progress bar on a terminal, a plain line a second elsewhere.
#[derive(Clone)]
struct Progress {
    bar: Option<ProgressBar>,
    done: Arc<AtomicUsize>,
    last_line: Arc<Mutex<Instant>>,
}

impl Progress {
    fn new(total: u64) -> Self {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
                    .expect("a valid template"),
            );
            bar
        });
        Self {
            bar,
            done: Arc::default(),
            last_line: Arc::new(Mutex::new(Instant::now())),
        }
    }

    fn inc(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
        if let Some(b) = &self.bar {
            b.inc(1);
        }
    }

    fn update(
        &self,
        preset: &Preset,
        partition: PartitionKey,
        record: &Mutex<Record>,
        start: Instant,
    ) {
        let conc = preset.concurrency.handle();
        let cooldown = match preset.retry_after.handle().cooldown_until(partition) {
            Some(t) => format!(
                "cooldown {:.1} s",
                t.saturating_duration_since(Instant::now()).as_secs_f64()
            ),
            None => "open".to_owned(),
        };
        let done = self.done.load(Ordering::Relaxed);
        let limited = record.lock().unwrap().limited_at.len();
        let msg = format!(
            "in flight {} | queued {} | 429s {} | limit {} | {} | {:.1} req/s",
            conc.in_flight(),
            preset.budget.handle().queued() + conc.queued(),
            limited,
            conc.limit(),
            cooldown,
            done as f64 / start.elapsed().as_secs_f64().max(1e-9),
        );
        match &self.bar {
            Some(b) => b.set_message(msg),
            None => {
                let mut last = self.last_line.lock().unwrap();
                if last.elapsed() >= Duration::from_secs(1) {
                    *last = Instant::now();
                    println!("{done} done | {msg}");
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

/// Counts per one-second bin of `bins`.
fn per_second(ts: &[f64], bins: usize) -> Vec<u32> {
    let mut v = vec![0u32; bins];
    for &t in ts {
        v[(t.max(0.0) as usize).min(bins - 1)] += 1;
    }
    v
}

/// What one panel shows: successes and 429s per second against the server's limit (and, for a
/// single run, the limit the budget held to).
struct Panel<'a> {
    title: &'a str,
    ok_at: &'a [f64],
    limited_at: &'a [f64],
    /// The server's limit, requests/s.
    rate: Option<f64>,
    /// The limit the budget held to over time: (seconds, requests/s).
    learned: Vec<(f64, f64)>,
}

type Area<'a> =
    plotters::drawing::DrawingArea<plotters::backend::SVGBackend<'a>, plotters::coord::Shift>;

/// Draws `panel` on `area`, `bins` seconds wide, the y axis up to `top`.
fn draw_panel(area: &Area<'_>, panel: &Panel<'_>, bins: usize, top: f64) -> Result<(), BoxError> {
    use plotters::prelude::*;
    let ok = per_second(panel.ok_at, bins);
    let limited = per_second(panel.limited_at, bins);
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(45)
        .build_cartesian_2d(0f64..bins as f64, 0f64..top)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("requests/s")
        .draw()?;
    let at = |v: &[u32]| -> Vec<(f64, f64)> {
        v.iter()
            .enumerate()
            .map(|(i, n)| (i as f64 + 0.5, f64::from(*n)))
            .collect()
    };
    chart
        .draw_series(LineSeries::new(at(&ok), BLUE.stroke_width(3)))?
        .label("succeeded")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(3)));
    chart
        .draw_series(LineSeries::new(at(&limited), RED.stroke_width(2)))?
        .label("429s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    if let Some(rate) = panel.rate {
        let orange = RGBColor(255, 140, 0);
        chart
            .draw_series(LineSeries::new(
                vec![(0.0, rate), (bins as f64, rate)],
                orange.stroke_width(1),
            ))?
            .label("the server's limit")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], orange));
    }
    if !panel.learned.is_empty() {
        let green = RGBColor(0, 150, 70);
        chart
            .draw_series(LineSeries::new(
                panel.learned.iter().copied(),
                green.stroke_width(2),
            ))?
            .label("the budget's limit")
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], green.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// The y axis' top for these panels: the highest count, or the limit, with room above.
fn top_of(panels: &[Panel<'_>], bins: usize) -> f64 {
    let mut top = 1.0f64;
    for p in panels {
        for v in [per_second(p.ok_at, bins), per_second(p.limited_at, bins)] {
            top = top.max(f64::from(v.into_iter().max().unwrap_or(0)) * 1.1);
        }
        top = top.max(p.rate.unwrap_or(0.0) * 1.2);
        top = top.max(p.learned.iter().map(|l| l.1).fold(0.0, f64::max) * 1.1);
    }
    top
}

/// A single run: requests per second (successes, 429s, the server's limit, the budget's limit)
/// above, the queue depth below.
fn plot(path: &std::path::Path, r: &Record, rate: Option<f64>, secs: f64) -> Result<(), BoxError> {
    use plotters::prelude::*;
    let bins = secs.ceil().max(1.0) as usize;
    let panel = Panel {
        title: "requests per second",
        ok_at: &r.ok_at,
        limited_at: &r.limited_at,
        rate,
        learned: r
            .samples
            .iter()
            .filter_map(|(t, _, l)| l.map(|l| (*t, l)))
            .collect(),
    };
    let top = top_of(std::slice::from_ref(&panel), bins);
    let root = SVGBackend::new(path, (900, 650)).into_drawing_area();
    root.fill(&WHITE)?;
    let (upper, lower) = root.split_vertically(450);
    draw_panel(&upper, &panel, bins, top)?;
    let depth = r.samples.iter().map(|s| s.1).max().unwrap_or(0).max(1) as f64 * 1.1;
    let mut chart = ChartBuilder::on(&lower)
        .caption("requests queued in the layers", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(45)
        .build_cartesian_2d(0f64..bins as f64, 0f64..depth)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("queued")
        .draw()?;
    chart.draw_series(LineSeries::new(
        r.samples.iter().map(|(t, q, _)| (*t, *q as f64)),
        BLACK.stroke_width(2),
    ))?;
    root.present()?;
    Ok(())
}

/// Every strategy of a `--compare` run, one panel each, on one time scale and one y scale.
fn plot_compare(
    path: &std::path::Path,
    runs: &[(&str, Vec<f64>, Vec<f64>)],
    rate: f64,
) -> Result<(), BoxError> {
    use plotters::prelude::*;
    let secs = runs
        .iter()
        .flat_map(|(_, ok, limited)| ok.iter().chain(limited))
        .fold(1.0f64, |a, &b| a.max(b));
    let bins = secs.ceil() as usize;
    let panels: Vec<Panel<'_>> = runs
        .iter()
        .map(|(name, ok, limited)| Panel {
            title: name,
            ok_at: ok,
            limited_at: limited,
            rate: Some(rate),
            learned: Vec::new(),
        })
        .collect();
    let top = top_of(&panels, bins);
    let root = SVGBackend::new(path, (900, 260 * panels.len().max(1) as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    for (area, panel) in root
        .split_evenly((panels.len().max(1), 1))
        .iter()
        .zip(&panels)
    {
        draw_panel(area, panel, bins, top)?;
    }
    root.present()?;
    Ok(())
}

/// The burst through the batch layer, against the simulator's Message Batches API.
async fn batch(args: &Args, key: &str) -> Result<(), BoxError> {
    if args.base_url.is_some() {
        return Err("--batch runs against the simulator only (it reads its audit)".into());
    }
    let mut cfg = SimConfig::new(demo_limits());
    cfg.batch_rps = 200.0;
    let sim = Simulator::new(cfg);
    let server = tower_quota_sim::serve(sim.clone(), "127.0.0.1:0".parse()?).await?;
    let base = server.base_url();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let layer = tower_quota::batch::BatchLayer::new().all(true);
    let api = ServiceBuilder::new()
        .layer(layer.clone())
        .quota_stack(Preset::anthropic(client_limits(demo_limits())))
        .service(client);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.requests {
        let body = MessagesRequest::user(
            &args.model,
            "Write a haiku about rate limits.",
            args.max_tokens,
        )
        .to_bytes();
        let req = Request::post(format!("{base}/v1/messages"))
            .header("x-api-key", key)
            .header("anthropic-version", "2023-06-01")
            .header("content-type", "application/json")
            .body(Full::new(body))?;
        let api = api.clone();
        tasks.spawn(async move {
            let res = api.oneshot(req).await?;
            let ok = res.status().is_success();
            let bytes = res.into_body().collect().await?.to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            let usage = (
                v["usage"]["input_tokens"].as_u64().unwrap_or(0),
                v["usage"]["output_tokens"].as_u64().unwrap_or(0),
            );
            Ok::<_, BoxError>((ok, usage))
        });
    }
    let (mut ok, mut input, mut output) = (0, 0u64, 0u64);
    while let Some(done) = tasks.join_next().await {
        if let Ok(Ok((true, (i, o)))) = done {
            ok += 1;
            input += i;
            output += o;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let list = tower_quota_sim::Price::of(&args.model);
    let price = tower_quota_sim::Price {
        input: args.price_in.unwrap_or(list.input),
        output: args.price_out.unwrap_or(list.output),
    };
    let messages_cost = price.messages(input, output);
    let calls = sim.batch_calls();
    println!("requests             {}", args.requests);
    println!("succeeded            {ok}");
    println!("reached /v1/messages {}", sim.summary().total.requests);
    println!(
        "batches made         {} ({} requests in them)",
        calls.created, calls.requests
    );
    println!("polls                {}", layer.handle().polls());
    println!("last result after    {elapsed:.2} s");
    println!("tokens               {input} in, {output} out");
    println!(
        "cost                 ${:.4} at batch prices, ${messages_cost:.4} at Messages prices \
         (${} / ${} per million tokens in / out)",
        price.batch(input, output),
        price.input,
        price.output
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "requests": args.requests,
                "succeeded": ok,
                "messages_calls": sim.summary().total.requests,
                "batches": calls.created,
                "elapsed_s": elapsed,
                "input_tokens": input,
                "output_tokens": output,
                "cost_batch_usd": price.batch(input, output),
                "cost_messages_usd": messages_cost,
            })
        );
    }
    server.shutdown().await;
    if ok != args.requests {
        eprintln!(
            "error: {} of {} requests failed",
            args.requests - ok,
            args.requests
        );
        std::process::exit(1);
    }
    Ok(())
}

/// The same burst, every strategy, side by side.
async fn compare(args: &Args, key: &str) -> Result<(), BoxError> {
    let limits = demo_limits();
    let scenario = Scenario {
        name: "burst",
        sim: SimConfig::new(limits),
        keys: vec![(key.to_owned(), limits)],
        unit: Unit::Requests,
        requests: args.requests,
        prompt: "Write a haiku about rate limits.".to_owned(),
        max_tokens: args.max_tokens,
        limits_known: args.base_url.is_none() && !args.learn,
    };
    let strategies = [
        Strategy::Naive,
        Strategy::Seed,
        Strategy::Tower,
        Strategy::Sdk,
        Strategy::QuotaConfigured,
    ];
    let mut cells = Vec::new();
    // Per strategy, from the simulator's audit: when it answered 200s and 429s.
    let mut runs: Vec<(&str, Vec<f64>, Vec<f64>)> = Vec::new();
    if args.plot.is_some() && args.base_url.is_some() {
        return Err(
            "--compare --plot draws from the simulator's audit: not with --base-url".into(),
        );
    }
    for s in strategies {
        eprintln!("running {} ...", s.name());
        let cell = match &args.base_url {
            Some(url) => {
                let target = Target::Http(url.trim_end_matches('/').to_owned(), None);
                run(
                    &scenario,
                    s,
                    &target,
                    args.concurrency,
                    1,
                    Some(Duration::from_secs(120)),
                )
                .await
            }
            None => {
                let sim = scenario.simulator(1);
                let server = tower_quota_sim::serve(sim.clone(), "127.0.0.1:0".parse()?).await?;
                let target = Target::Http(server.base_url(), Some(sim.clone()));
                let cell = run(
                    &scenario,
                    s,
                    &target,
                    args.concurrency,
                    1,
                    Some(Duration::from_secs(120)),
                )
                .await;
                server.shutdown().await;
                let (mut ok, mut limited) = (Vec::new(), Vec::new());
                for a in sim.audit() {
                    match a.outcome {
                        AuditOutcome::Ok => ok.push(a.arrival.as_secs_f64()),
                        AuditOutcome::RateLimited => limited.push(a.arrival.as_secs_f64()),
                        _ => {}
                    }
                }
                runs.push((s.name(), ok, limited));
                cell
            }
        };
        cells.push(cell);
    }
    println!("\n{}", table(&cells));
    if let Some(path) = &args.plot {
        let rate = limits.rpm.unwrap_or(0) as f64 / 60.0;
        plot_compare(path, &runs, rate)?;
        println!("plot: {}", path.display());
    }
    if args.json {
        println!("{}", serde_json::to_string(&cells)?);
    }
    Ok(())
}
