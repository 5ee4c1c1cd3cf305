//! What the layers record through the [`metrics`] facade, for a dashboard to read.
//!
//! # Why
//!
//! The handles ([`BudgetHandle`](crate::budget::BudgetHandle),
//! [`ConcurrencyHandle`](crate::concurrency::ConcurrencyHandle), ...) answer a program that asks;
//! the people running an API client in production watch a dashboard instead: the share of 429s,
//! how long requests queue, tokens spent against the limit, how long the partition was paused.
//! The [`metrics`] crate is the facade the Rust ecosystem records through: the layers record into
//! it, and whichever exporter the program installs (Prometheus with
//! `metrics-exporter-prometheus`, OpenTelemetry, StatsD) publishes it. With no recorder installed,
//! nothing is recorded and almost nothing is spent (see below).
//!
//! # How
//!
//! Every metric carries a `partition` label: the API key's fingerprint as 32 hex digits (the
//! [`PartitionKey`]'s `Display`), never the key; `global` for a budget's global cap, `shared` for a
//! concurrency limit shared by every key. Names follow Prometheus' conventions (`_total` for
//! counters, base units: seconds, tokens).
//!
//! | name | kind | labels | recorded by | what |
//! |---|---|---|---|---|
//! | `tower_quota_budget_admitted_total` | counter | partition | budget | requests admitted |
//! | `tower_quota_budget_refused_total` | counter | partition, reason | budget | requests refused at once: `queue_full`, `wait_too_long`, `too_large` (bigger than a bucket), `context_window` (over the model's window or its largest `max_tokens`) |
//! | `tower_quota_budget_waiting` | gauge | partition | budget | requests waiting for the budget now |
//! | `tower_quota_budget_wait_seconds` | histogram | partition | budget | time from arrival to admission, per admitted request |
//! | `tower_quota_tokens_reserved_total` | counter | partition, bucket | budget | units reserved at admission (`requests`, `input_tokens`, `output_tokens`, `tokens`) |
//! | `tower_quota_tokens_settled_total` | counter | partition, bucket | budget | units the requests really used, as settled (a refund settles at 0) |
//! | `tower_quota_limit` | gauge | partition, bucket | budget | the per-minute limit in force: configured, or learned from headers or 429s |
//! | `tower_quota_remaining` | gauge | partition, bucket | budget | the server's last `remaining` for the bucket |
//! | `tower_quota_answers_total` | counter | partition, outcome | budget | every answer from inside, judged by the classifier: `success`, `rate_limited` (429), `overloaded` (529/503), `server_error`, `transport`, `fatal` |
//! | `tower_quota_gate_closures_total` | counter | partition, source | Retry-After gate | times the partition was paused: `server` (a hint) or `inferred` |
//! | `tower_quota_gate_closed_seconds` | histogram | partition | Retry-After gate | each pause's length |
//! | `tower_quota_retries_total` | counter | partition, reason | retry | retries sent, by the outcome that caused them |
//! | `tower_quota_retry_give_ups_total` | counter | partition, reason | retry | requests the retry gave up on, by why ([`GiveUp::label`](crate::retry::GiveUp::label): `attempts`, `budget`, `not_replayable`, `hint_too_long`, `deadline`) |
//! | `tower_quota_concurrency_limit` | gauge | partition | concurrency | the limit now (an adaptive one moves) |
//! | `tower_quota_concurrency_in_flight` | gauge | partition | concurrency | requests holding a slot now (a streaming body holds it until it ends) |
//! | `tower_quota_round_trip_seconds` | histogram | partition, until | concurrency | per attempt, from the send to the response headers (`until="headers"`) and to the end of its body (`until="body_end"`); time queued in the layers is not in it |
//!
//! The budget and the concurrency limit register their handles once per partition, when they
//! first see it, and then only update them: install the recorder before the first request (a
//! partition first seen with no recorder records nothing until it is forgotten). With no
//! recorder a handle is a no-op and an update one branch; the per-request overhead bench measures
//! the stack with the facade in place (`cargo bench -p tower-quota --bench overhead`). The gate
//! and the retry record on the rarer events (a pause, a retry, a give-up) through the macros.
//! [`describe`] gives the exporter each metric's help text and unit.
//!
//! # Example
//!
//! A recording recorder (here `metrics-util`'s debugging one, installed for one thread) sees what
//! a burst did:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use metrics_util::debugging::{DebugValue, DebuggingRecorder};
//! use tower::{Layer, ServiceExt, service_fn};
//! use tower_quota::budget::{Limits, TokenBudgetLayer};
//!
//! let recorder = DebuggingRecorder::new();
//! let snapshotter = recorder.snapshotter();
//! let _guard = metrics::set_default_local_recorder(&recorder);
//! tower_quota::metrics::describe();
//!
//! let ok = service_fn(|_req: http::Request<String>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
//! });
//! let budget = TokenBudgetLayer::new(Limits::new().rpm(60)).layer(ok);
//! for _ in 0..3 {
//!     let req = http::Request::post("/v1/messages").header("x-api-key", "sk-1").body(String::new()).unwrap();
//!     budget.clone().oneshot(req).await.unwrap();
//! }
//! let admitted = snapshotter.snapshot().into_vec().into_iter().find_map(|(key, _, _, value)| {
//!     (key.key().name() == "tower_quota_budget_admitted_total").then_some(value)
//! });
//! assert_eq!(admitted, Some(DebugValue::Counter(3)));
//! # }
//! ```

use crate::classify::Outcome;
use crate::partition::PartitionKey;
use crate::signals::Bucket;
use ::metrics::{Counter, Gauge, Histogram, SharedString, Unit};

/// The metrics' names, for queries and tests.
pub mod names {
    /// Requests admitted by the budget (counter).
    pub const BUDGET_ADMITTED: &str = "tower_quota_budget_admitted_total";
    /// Requests refused at once by the budget, by `reason` (counter).
    pub const BUDGET_REFUSED: &str = "tower_quota_budget_refused_total";
    /// Requests waiting for the budget now (gauge).
    pub const BUDGET_WAITING: &str = "tower_quota_budget_waiting";
    /// Arrival to admission, seconds (histogram).
    pub const BUDGET_WAIT_SECONDS: &str = "tower_quota_budget_wait_seconds";
    /// Units reserved at admission, by `bucket` (counter).
    pub const TOKENS_RESERVED: &str = "tower_quota_tokens_reserved_total";
    /// Units used as settled, by `bucket` (counter).
    pub const TOKENS_SETTLED: &str = "tower_quota_tokens_settled_total";
    /// The per-minute limit in force, by `bucket` (gauge).
    pub const LIMIT: &str = "tower_quota_limit";
    /// The server's last remaining, by `bucket` (gauge).
    pub const REMAINING: &str = "tower_quota_remaining";
    /// Answers from inside the budget, by `outcome` (counter).
    pub const ANSWERS: &str = "tower_quota_answers_total";
    /// Pauses of a partition by the Retry-After gate, by `source` (counter).
    pub const GATE_CLOSURES: &str = "tower_quota_gate_closures_total";
    /// Each pause's length, seconds (histogram).
    pub const GATE_CLOSED_SECONDS: &str = "tower_quota_gate_closed_seconds";
    /// Retries sent, by `reason` (counter).
    pub const RETRIES: &str = "tower_quota_retries_total";
    /// Requests the retry gave up on, by `reason` (counter).
    pub const RETRY_GIVE_UPS: &str = "tower_quota_retry_give_ups_total";
    /// The concurrency limit now (gauge).
    pub const CONCURRENCY_LIMIT: &str = "tower_quota_concurrency_limit";
    /// Requests holding a concurrency slot now (gauge).
    pub const CONCURRENCY_IN_FLIGHT: &str = "tower_quota_concurrency_in_flight";
    /// Send to response headers (`until="headers"`) and to body end (`until="body_end"`),
    /// seconds (histogram).
    pub const ROUND_TRIP_SECONDS: &str = "tower_quota_round_trip_seconds";
}

/// Gives the installed recorder every metric's help text and unit (what an exporter prints as
/// `# HELP`). Call it once, after installing the recorder.
pub fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        names::BUDGET_ADMITTED,
        "Requests admitted by the token budget"
    );
    describe_counter!(
        names::BUDGET_REFUSED,
        "Requests the token budget refused at once, by reason"
    );
    describe_gauge!(
        names::BUDGET_WAITING,
        "Requests waiting for the token budget"
    );
    describe_histogram!(
        names::BUDGET_WAIT_SECONDS,
        Unit::Seconds,
        "Time from arrival to admission by the token budget"
    );
    describe_counter!(
        names::TOKENS_RESERVED,
        "Units reserved at admission, by bucket"
    );
    describe_counter!(
        names::TOKENS_SETTLED,
        "Units really used, as settled, by bucket"
    );
    describe_gauge!(
        names::LIMIT,
        "Per-minute limit in force (configured or learned), by bucket"
    );
    describe_gauge!(names::REMAINING, "The server's last remaining, by bucket");
    describe_counter!(
        names::ANSWERS,
        "Answers from inside the token budget, by outcome"
    );
    describe_counter!(
        names::GATE_CLOSURES,
        "Pauses of a partition by the Retry-After gate, by source"
    );
    describe_histogram!(
        names::GATE_CLOSED_SECONDS,
        Unit::Seconds,
        "Length of each Retry-After pause"
    );
    describe_counter!(names::RETRIES, "Retries sent, by reason");
    describe_counter!(
        names::RETRY_GIVE_UPS,
        "Requests the retry gave up on, by reason"
    );
    describe_gauge!(names::CONCURRENCY_LIMIT, "Concurrency limit now");
    describe_gauge!(
        names::CONCURRENCY_IN_FLIGHT,
        "Requests holding a concurrency slot"
    );
    describe_histogram!(
        names::ROUND_TRIP_SECONDS,
        Unit::Seconds,
        "Round trip per attempt: send to response headers, and to the end of the body"
    );
}

/// The `partition` label of `p`.
pub(crate) fn partition_label(p: PartitionKey) -> SharedString {
    if p == PartitionKey::GLOBAL {
        SharedString::const_str("global")
    } else {
        SharedString::from(p.to_string())
    }
}

/// The `bucket` label of `b`.
pub(crate) fn bucket_label(b: Bucket) -> &'static str {
    match b {
        Bucket::Requests => "requests",
        Bucket::Tokens => "tokens",
        Bucket::InputTokens => "input_tokens",
        Bucket::OutputTokens => "output_tokens",
    }
}

/// The `outcome` (or retry `reason`) label of `o`.
pub(crate) fn outcome_label(o: Outcome) -> &'static str {
    match o {
        Outcome::Success => "success",
        Outcome::RateLimited => "rate_limited",
        Outcome::Overloaded => "overloaded",
        Outcome::ServerError => "server_error",
        Outcome::Transport(_) => "transport",
        Outcome::Fatal => "fatal",
    }
}

const OUTCOMES: [Outcome; 6] = [
    Outcome::Success,
    Outcome::RateLimited,
    Outcome::Overloaded,
    Outcome::ServerError,
    Outcome::Transport(crate::classify::TransportKind::Connect),
    Outcome::Fatal,
];

fn outcome_index(o: Outcome) -> usize {
    match o {
        Outcome::Success => 0,
        Outcome::RateLimited => 1,
        Outcome::Overloaded => 2,
        Outcome::ServerError => 3,
        Outcome::Transport(_) => 4,
        Outcome::Fatal => 5,
    }
}

/// Why the budget refused a request at once.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Refusal {
    QueueFull = 0,
    WaitTooLong = 1,
    TooLarge = 2,
    ContextWindow = 3,
}

const REFUSALS: [&str; 4] = ["queue_full", "wait_too_long", "too_large", "context_window"];

/// One budget partition's handles, registered when the partition is first seen.
pub(crate) struct BudgetMetrics {
    admitted: Counter,
    refused: [Counter; 4],
    pub(crate) waiting: Gauge,
    wait: Histogram,
    reserved: [Counter; 4],
    settled: [Counter; 4],
    limit: [Gauge; 4],
    remaining: [Gauge; 4],
    answers: [Counter; 6],
}

impl BudgetMetrics {
    pub(crate) fn new(p: PartitionKey) -> Self {
        let part = partition_label(p);
        let by_bucket_c = |name: &'static str| {
            Bucket::ALL.map(|b| {
                ::metrics::counter!(name, "partition" => part.clone(), "bucket" => bucket_label(b))
            })
        };
        let by_bucket_g = |name: &'static str| {
            Bucket::ALL.map(|b| {
                ::metrics::gauge!(name, "partition" => part.clone(), "bucket" => bucket_label(b))
            })
        };
        Self {
            admitted: ::metrics::counter!(names::BUDGET_ADMITTED, "partition" => part.clone()),
            refused: REFUSALS.map(|r| {
                ::metrics::counter!(names::BUDGET_REFUSED, "partition" => part.clone(), "reason" => r)
            }),
            waiting: ::metrics::gauge!(names::BUDGET_WAITING, "partition" => part.clone()),
            wait: ::metrics::histogram!(names::BUDGET_WAIT_SECONDS, "partition" => part.clone()),
            reserved: by_bucket_c(names::TOKENS_RESERVED),
            settled: by_bucket_c(names::TOKENS_SETTLED),
            limit: by_bucket_g(names::LIMIT),
            remaining: by_bucket_g(names::REMAINING),
            answers: OUTCOMES.map(|o| {
                ::metrics::counter!(names::ANSWERS, "partition" => part.clone(), "outcome" => outcome_label(o))
            }),
        }
    }

    pub(crate) fn refused(&self, why: Refusal) {
        self.refused[why as usize].increment(1);
    }

    /// A request was admitted at `cost` after waiting `waited`.
    pub(crate) fn admitted(&self, cost: crate::budget::Cost, waited: std::time::Duration) {
        self.admitted.increment(1);
        self.wait.record(waited.as_secs_f64());
        add(&self.reserved, cost);
    }

    /// A reservation settled at `actual`.
    pub(crate) fn settled(&self, actual: crate::budget::Cost) {
        add(&self.settled, actual);
    }

    pub(crate) fn answer(&self, o: Outcome) {
        self.answers[outcome_index(o)].increment(1);
    }

    pub(crate) fn limit(&self, b: Bucket, per_minute: u64) {
        self.limit[b as usize].set(per_minute as f64);
    }

    pub(crate) fn remaining(&self, b: Bucket, remaining: u64) {
        self.remaining[b as usize].set(remaining as f64);
    }
}

fn add(counters: &[Counter; 4], cost: crate::budget::Cost) {
    for (b, n) in [
        (Bucket::Requests, cost.requests),
        (Bucket::Tokens, cost.input_tokens + cost.output_tokens),
        (Bucket::InputTokens, cost.input_tokens),
        (Bucket::OutputTokens, cost.output_tokens),
    ] {
        if n > 0 {
            counters[b as usize].increment(n);
        }
    }
}

impl std::fmt::Debug for BudgetMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BudgetMetrics")
    }
}

/// One concurrency limiter's handles.
pub(crate) struct LimiterMetrics {
    pub(crate) limit: Gauge,
    pub(crate) in_flight: Gauge,
    pub(crate) to_headers: Histogram,
    pub(crate) to_body_end: Histogram,
}

impl LimiterMetrics {
    /// `label`: the partition's, `shared` or `global`.
    pub(crate) fn new(label: SharedString) -> Self {
        Self {
            limit: ::metrics::gauge!(names::CONCURRENCY_LIMIT, "partition" => label.clone()),
            in_flight: ::metrics::gauge!(names::CONCURRENCY_IN_FLIGHT, "partition" => label.clone()),
            to_headers: ::metrics::histogram!(names::ROUND_TRIP_SECONDS, "partition" => label.clone(), "until" => "headers"),
            to_body_end: ::metrics::histogram!(names::ROUND_TRIP_SECONDS, "partition" => label, "until" => "body_end"),
        }
    }
}

impl std::fmt::Debug for LimiterMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LimiterMetrics")
    }
}

/// The gate of `p` closed for `length`, on the server's word or inferred.
pub(crate) fn gate_closed(p: PartitionKey, length: std::time::Duration, inferred: bool) {
    let part = partition_label(p);
    let source = if inferred { "inferred" } else { "server" };
    ::metrics::counter!(names::GATE_CLOSURES, "partition" => part.clone(), "source" => source)
        .increment(1);
    ::metrics::histogram!(names::GATE_CLOSED_SECONDS, "partition" => part)
        .record(length.as_secs_f64());
}

/// The retry sends again after `o`.
pub(crate) fn retried(p: PartitionKey, o: Outcome) {
    ::metrics::counter!(names::RETRIES, "partition" => partition_label(p), "reason" => outcome_label(o))
        .increment(1);
}

/// The retry gave up, for `reason`.
pub(crate) fn gave_up(p: PartitionKey, reason: &'static str) {
    ::metrics::counter!(names::RETRY_GIVE_UPS, "partition" => partition_label(p), "reason" => reason)
        .increment(1);
}
