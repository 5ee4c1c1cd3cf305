//! The audit of every request the simulator saw, and its summary.

use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// How the simulator answered a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditOutcome {
    /// 200 with a message (or a stream).
    Ok,
    /// 200 stream that ended with an SSE `overloaded_error` event.
    StreamError,
    /// 429.
    RateLimited,
    /// 529.
    Overloaded,
    /// 500.
    ServerError,
    /// Admitted, then the connection was dropped.
    Reset,
    /// 400 (bad JSON, prompt over the context window, a request larger than a whole bucket).
    BadRequest,
    /// 401: no API key.
    Unauthorized,
    /// 404: another path.
    NotFound,
    /// 413: a body over the API's 32 MB.
    TooLarge,
}

/// One request, as the simulator saw it.
#[derive(Clone, Debug, Serialize)]
pub struct AuditRecord {
    /// When it arrived, since the simulator started.
    #[serde(serialize_with = "secs")]
    pub arrival: Duration,
    /// The fingerprint of its API key (never the key itself); empty without one.
    pub key: String,
    /// How it was answered.
    pub outcome: AuditOutcome,
    /// Input tokens charged (0 unless admitted).
    pub input_tokens: u64,
    /// Output tokens generated (0 unless admitted).
    pub output_tokens: u64,
    /// Whether it arrived while a cooldown the server announced to its key was running (after the
    /// grace for requests already in flight).
    pub early: bool,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Counts over the audit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Requests seen.
    pub requests: u64,
    /// Answered 200 (streams that ended in an error event excluded).
    pub ok: u64,
    /// Answered 429.
    pub rate_limited: u64,
    /// Answered 529, or a stream ended by an overload event.
    pub overloaded: u64,
    /// Answered 500.
    pub server_errors: u64,
    /// Connections dropped after admission.
    pub resets: u64,
    /// Answered 400, 401, 404 or 413.
    pub rejected: u64,
    /// Input tokens charged.
    pub input_tokens: u64,
    /// Output tokens served.
    pub output_tokens: u64,
    /// Requests that arrived during an announced cooldown.
    pub early_arrivals: u64,
}

impl Counts {
    fn add(&mut self, r: &AuditRecord) {
        self.requests += 1;
        match r.outcome {
            AuditOutcome::Ok => self.ok += 1,
            AuditOutcome::StreamError | AuditOutcome::Overloaded => self.overloaded += 1,
            AuditOutcome::RateLimited => self.rate_limited += 1,
            AuditOutcome::ServerError => self.server_errors += 1,
            AuditOutcome::Reset => self.resets += 1,
            AuditOutcome::BadRequest
            | AuditOutcome::Unauthorized
            | AuditOutcome::NotFound
            | AuditOutcome::TooLarge => self.rejected += 1,
        }
        // Totals saturate: a client's absurd numbers never wrap them.
        self.input_tokens = self.input_tokens.saturating_add(r.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(r.output_tokens);
        self.early_arrivals += u64::from(r.early);
    }
}

/// The audit summary: totals, per key (by fingerprint), and the span of arrivals.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// Totals over every key.
    #[serde(flatten)]
    pub total: Counts,
    /// Totals per key fingerprint.
    pub keys: BTreeMap<String, Counts>,
    /// Seconds from the first arrival to the last.
    pub span_s: f64,
}

impl Summary {
    /// Summarizes `records`.
    pub fn of(records: &[AuditRecord]) -> Self {
        let mut s = Summary::default();
        for r in records {
            s.total.add(r);
            s.keys.entry(r.key.clone()).or_default().add(r);
        }
        if let (Some(first), Some(last)) = (records.first(), records.last()) {
            s.span_s = (last.arrival.saturating_sub(first.arrival)).as_secs_f64();
        }
        s
    }

    /// The summary as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}
