//! The goodput benchmark.
//!
//! Run with: `cargo run --release -p tower-quota-bench --bin goodput`
//!
//! Every strategy in every scenario against the in-process simulator under paused tokio time
//! (deterministic: the same seed gives the same tables), then a bounded real-HTTP run of the main
//! scenarios against the simulator served on a loopback port. Prints Markdown tables.

use clap::Parser;
use std::time::Duration;
use tower_quota_bench::batch;
use tower_quota_bench::scenario::{Scenario, Target, run, table};
use tower_quota_bench::strategy::Strategy;

#[derive(Parser)]
#[command(about = "Goodput of each client strategy against the simulated rate-limited API")]
struct Args {
    /// Requests per scenario in the in-process run.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Requests at once for the strategies that bound themselves.
    #[arg(long, default_value_t = 200)]
    tasks: usize,
    /// Seed of the simulator and of the strategies' jitter.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Requests per scenario in the real-HTTP run (0 skips it).
    #[arg(long, default_value_t = 1500)]
    http_requests: usize,
    /// Requests per scenario in the real-HTTP run of the learning scenarios at the real limits
    /// (the tower-quota strategies only; 0 skips it).
    #[arg(long, default_value_t = 600)]
    http_learning_requests: usize,
    /// Requests in the Message Batches rows (the RPM-bound burst through the Messages path and
    /// through the batch path; 0 skips them).
    #[arg(long, default_value_t = 20_000)]
    batch_requests: usize,
    /// Wall-clock cap on one real-HTTP cell, seconds.
    #[arg(long, default_value_t = 60)]
    http_deadline: u64,
    /// Only these strategies (default: all).
    #[arg(long, value_enum)]
    strategy: Vec<Strategy>,
    /// Only the scenarios whose name contains this (default: all; the batch rows are named
    /// "Message Batches").
    #[arg(long)]
    only: Option<String>,
    /// Print JSON lines instead of tables.
    #[arg(long)]
    json: bool,
}

impl Args {
    /// Whether `--only` lets `scenario` run.
    fn wants(&self, scenario: &Scenario) -> bool {
        self.only
            .as_deref()
            .is_none_or(|only| scenario.name.contains(only))
    }
}

/// Every strategy in each of `scenarios`, in process under paused time; prints a table each.
fn in_process(scenarios: Vec<Scenario>, strategies: &[Strategy], args: &Args) {
    for scenario in scenarios.into_iter().filter(|s| args.wants(s)) {
        let mut cells = Vec::new();
        for &s in strategies {
            // A fresh paused runtime per cell: every cell starts at the same virtual instant.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .expect("a runtime");
            let cell = rt.block_on(async {
                let target = Target::InProcess(scenario.simulator(args.seed));
                run(&scenario, s, &target, args.tasks, args.seed, None).await
            });
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"mode": "in-process", "scenario": scenario.name, "cell": cell})
                );
            }
            cells.push(cell);
        }
        if !args.json {
            println!("### {}\n\n{}", scenario.name, table(&cells));
        }
    }
}

fn main() {
    let args = Args::parse();
    let strategies = if args.strategy.is_empty() {
        Strategy::ALL.to_vec()
    } else {
        args.strategy.clone()
    };

    println!(
        "## In process, virtual time ({} requests, {} tasks, seed {})\n",
        args.requests, args.tasks, args.seed
    );
    in_process(Scenario::all(args.requests), &strategies, &args);

    println!(
        "## Learning limits that change or are shared: in process, virtual time ({} requests, {} \
         tasks, seed {})\n",
        args.requests, args.tasks, args.seed
    );
    in_process(
        Scenario::learning(args.requests, Duration::from_secs(20)),
        &strategies,
        &args,
    );

    let batch_rows = args
        .only
        .as_deref()
        .is_none_or(|only| "Message Batches".contains(only));
    if args.batch_requests > 0 && batch_rows {
        batching(&args);
    }

    if args.http_requests == 0 {
        return;
    }
    println!(
        "## Real HTTP on loopback ({} requests, {} tasks, at most {} s a cell)\n",
        args.http_requests, args.tasks, args.http_deadline
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    // The main scenarios, and the learning ones (the limit changing 2 s in), with limits ten
    // times higher so a cell takes seconds, not minutes.
    let scenarios: Vec<Scenario> = Scenario::all(args.http_requests)
        .into_iter()
        .filter(|s| matches!(s.name, "RPM-bound" | "OTPM-bound, output 30 %"))
        .chain(Scenario::learning(
            args.http_requests,
            Duration::from_secs(2),
        ))
        .map(|s| s.scaled(10))
        .collect();
    over_http(
        &rt,
        scenarios,
        &strategies,
        &args,
        args.http_deadline,
        "limits x10",
    );

    if args.http_learning_requests == 0 {
        return;
    }
    // The learning scenarios again at the real limits, the change 5 s in: the server's and the
    // stack's time constants (whole seconds of Retry-After, spans and windows of seconds) are not
    // scaled by ten, so the x10 cells above weigh the learning ten times more than a real run.
    let quota: Vec<Strategy> = strategies
        .iter()
        .copied()
        .filter(|s| matches!(s, Strategy::QuotaConfigured | Strategy::QuotaLearned))
        .collect();
    // A cell at the real limits runs about a minute: three times the x10 cap.
    let deadline = args.http_deadline * 3;
    println!(
        "## Learning over real HTTP at the real limits ({} requests, {} tasks, at most {deadline} \
         s a cell)\n",
        args.http_learning_requests, args.tasks,
    );
    over_http(
        &rt,
        Scenario::learning(args.http_learning_requests, Duration::from_secs(5)),
        &quota,
        &args,
        deadline,
        "real limits",
    );
}

/// The RPM-bound burst through the Messages path and through the batch path, in process under
/// paused time; prints a table.
fn batching(args: &Args) {
    let mut scenario = Scenario::all(args.batch_requests)
        .into_iter()
        .find(|s| s.name == "RPM-bound")
        .expect("the RPM-bound scenario");
    // The batch endpoints' own limit: 50 calls a minute, as at Anthropic's first tier.
    scenario.sim.batch_rpm = Some(50);
    println!(
        "## The Message Batches path: in process, virtual time ({} requests, RPM-bound, seed {})\n",
        args.batch_requests, args.seed
    );
    let mut cells = Vec::new();
    for via_batch in [false, true] {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a runtime");
        let cell = rt.block_on(batch::run(&scenario, via_batch, args.tasks, args.seed));
        if args.json {
            println!(
                "{}",
                serde_json::json!({"mode": "in-process", "scenario": "batching", "cell": cell})
            );
        }
        cells.push(cell);
    }
    if !args.json {
        println!("{}", batch::table(&cells));
    }
}

/// Every strategy in each of `scenarios` against the simulator served on a loopback port; prints
/// a table each, titled with `label`.
fn over_http(
    rt: &tokio::runtime::Runtime,
    scenarios: Vec<Scenario>,
    strategies: &[Strategy],
    args: &Args,
    deadline: u64,
    label: &str,
) {
    for scenario in scenarios.into_iter().filter(|s| args.wants(s)) {
        let mut cells = Vec::new();
        for &s in strategies {
            let cell = rt.block_on(async {
                let sim = scenario.simulator(args.seed);
                let server = tower_quota_sim::serve(sim.clone(), "127.0.0.1:0".parse().unwrap())
                    .await
                    .expect("a loopback port");
                let target = Target::Http(server.base_url(), Some(sim));
                let cell = run(
                    &scenario,
                    s,
                    &target,
                    args.tasks,
                    args.seed,
                    Some(Duration::from_secs(deadline)),
                )
                .await;
                server.shutdown().await;
                cell
            });
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"mode": "http", "scenario": scenario.name, "cell": cell})
                );
            }
            cells.push(cell);
        }
        if !args.json {
            println!("### {} ({label})\n\n{}", scenario.name, table(&cells));
        }
    }
}
