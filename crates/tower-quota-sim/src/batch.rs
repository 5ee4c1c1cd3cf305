//! The Message Batches API: create, retrieve, list, cancel, delete, and results as JSONL.
//!
//! A batch's requests are judged when it is created (a request that is not a valid Messages
//! request errors inside the batch, not the batch) and then finish one after another at
//! [`SimConfig::batch_rps`](crate::SimConfig::batch_rps) a second of simulated time, so a
//! batch's state is a function of the time it is asked: `in_progress` while some are processing,
//! `ended` once all are done, canceled (after a cancel) or expired (24 hours after creation). The
//! batch pool is apart from the Messages buckets: batch requests never spend them; a key may have
//! at most [`SimConfig::batch_queue`](crate::SimConfig::batch_queue) requests processing in
//! batches (429 beyond). Results come in a shuffled order, as the real API's do.

use crate::api::{self, MessagesRequest};
use rand::seq::SliceRandom;
use rand::{SeedableRng, rngs::StdRng};
use serde_json::{Value, json};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// The most requests a batch takes.
pub const MAX_REQUESTS: usize = 100_000;
/// The largest batch body: 256 MB.
pub const MAX_BYTES: usize = 256 << 20;
/// How long a batch may take before what is left expires.
pub const EXPIRES_AFTER: Duration = Duration::from_secs(24 * 3600);

/// What one request of a batch comes to, if it is processed.
enum Judged {
    Succeeded(Value),
    Errored(Value),
}

struct Item {
    custom_id: String,
    judged: Judged,
}

/// One batch.
pub(crate) struct Batch {
    id: String,
    key: String,
    created: Instant,
    created_wall: SystemTime,
    items: Vec<Item>,
    /// Seconds of simulated time per request.
    per_item: f64,
    cancel_at: Option<Instant>,
    /// The order results are written in (a shuffle of the items).
    order: Vec<usize>,
}

/// Counts of the batch endpoints' calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BatchCalls {
    /// `POST /v1/messages/batches` answered 200.
    pub created: u64,
    /// `GET /v1/messages/batches/{id}`.
    pub retrieved: u64,
    /// `GET /v1/messages/batches/{id}/results`.
    pub results: u64,
    /// `POST /v1/messages/batches/{id}/cancel`.
    pub canceled: u64,
    /// Requests received inside batches.
    pub requests: u64,
    /// Calls refused with a 429 (the batch endpoints' own requests-per-minute limit).
    pub refused: u64,
    /// Calls that came before the wait the key's last 429 announced had passed.
    pub early: u64,
}

#[derive(Default)]
pub(crate) struct Batches {
    batches: Vec<Batch>,
    pub(crate) calls: BatchCalls,
    next: u64,
}

/// An answer: status, body.
pub(crate) type Answer = (u16, Value);

fn error(status: u16, kind: &str, message: &str) -> Answer {
    (status, api::error_body(kind, message))
}

fn rfc3339(t: SystemTime) -> Value {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .map_or(Value::Null, Value::String)
}

impl Batch {
    /// When item `i` is done.
    fn done_at(&self, i: usize) -> Instant {
        self.created + Duration::from_secs_f64(self.per_item * (i + 1) as f64)
    }

    fn expires(&self) -> Instant {
        self.created + EXPIRES_AFTER
    }

    /// The state of item `i` at `now`: processing, its result, canceled or expired.
    fn state(&self, i: usize, now: Instant) -> &'static str {
        let done = self.done_at(i);
        let stop = self
            .cancel_at
            .map_or(self.expires(), |c| c.min(self.expires()));
        if done <= now && done <= stop {
            match self.items[i].judged {
                Judged::Succeeded(_) => "succeeded",
                Judged::Errored(_) => "errored",
            }
        } else if stop <= now {
            if self.cancel_at.is_some_and(|c| c <= self.expires()) {
                "canceled"
            } else {
                "expired"
            }
        } else {
            "processing"
        }
    }

    /// When it ended (all done, canceled or expired), if it has.
    fn ended_at(&self, now: Instant) -> Option<Instant> {
        let last = self.done_at(self.items.len().saturating_sub(1));
        let stop = self
            .cancel_at
            .map_or(self.expires(), |c| c.min(self.expires()));
        let end = last.min(stop);
        (end <= now).then_some(end)
    }

    fn processing(&self, now: Instant) -> u64 {
        (0..self.items.len())
            .filter(|&i| self.state(i, now) == "processing")
            .count() as u64
    }

    fn object(&self, now: Instant, base: &str) -> Value {
        let mut counts =
            json!({"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0});
        for i in 0..self.items.len() {
            let s = self.state(i, now);
            counts[s] = json!(counts[s].as_u64().unwrap_or(0) + 1);
        }
        let wall =
            |t: Instant| rfc3339(self.created_wall + t.saturating_duration_since(self.created));
        let ended = self.ended_at(now);
        let status = match (ended, self.cancel_at) {
            (Some(_), _) => "ended",
            (None, Some(c)) if c <= now => "canceling",
            _ => "in_progress",
        };
        json!({
            "id": self.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts,
            "ended_at": ended.map_or(Value::Null, wall),
            "created_at": rfc3339(self.created_wall),
            "expires_at": wall(self.expires()),
            "archived_at": null,
            "cancel_initiated_at": self.cancel_at.filter(|&c| c <= now).map_or(Value::Null, wall),
            "results_url": ended.map_or(Value::Null, |_| {
                Value::String(format!("{base}/v1/messages/batches/{}/results", self.id))
            }),
        })
    }

    /// The results file, one JSON line per request, in the batch's shuffled order.
    fn results(&self, now: Instant) -> String {
        let mut out = String::new();
        for &i in &self.order {
            let item = &self.items[i];
            let result = match (self.state(i, now), &item.judged) {
                ("succeeded", Judged::Succeeded(m)) => json!({"type": "succeeded", "message": m}),
                ("errored", Judged::Errored(e)) => json!({"type": "errored", "error": e}),
                (other, _) => json!({"type": other}),
            };
            out.push_str(&json!({"custom_id": item.custom_id, "result": result}).to_string());
            out.push('\n');
        }
        out
    }
}

/// The `custom_id` rule: 1 to 64 of `[a-zA-Z0-9_-]`.
fn valid_custom_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// What the simulator needs to judge a batch's requests.
pub(crate) struct Judge<'a> {
    pub(crate) output_fraction: f64,
    pub(crate) context_window: u64,
    pub(crate) max_output_tokens: u64,
    pub(crate) batch_rps: f64,
    pub(crate) batch_queue: Option<u64>,
    pub(crate) seed: u64,
    pub(crate) wall: SystemTime,
    pub(crate) base: &'a str,
}

impl Batches {
    /// `POST /v1/messages/batches`.
    pub(crate) fn create(&mut self, key: &str, body: &[u8], j: &Judge<'_>, now: Instant) -> Answer {
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            return error(400, "invalid_request_error", "invalid JSON body");
        };
        let Some(requests) = v.get("requests").and_then(Value::as_array) else {
            return error(400, "invalid_request_error", "requests: Field required");
        };
        if requests.is_empty() || requests.len() > MAX_REQUESTS {
            let msg = format!("requests: between 1 and {MAX_REQUESTS} requests");
            return error(400, "invalid_request_error", &msg);
        }
        let mut seen = std::collections::HashSet::new();
        let mut items = Vec::with_capacity(requests.len());
        for (n, r) in requests.iter().enumerate() {
            let custom_id = r.get("custom_id").and_then(Value::as_str).unwrap_or("");
            if !valid_custom_id(custom_id) {
                let msg = format!("requests.{n}.custom_id: 1 to 64 of [a-zA-Z0-9_-]");
                return error(400, "invalid_request_error", &msg);
            }
            if !seen.insert(custom_id.to_owned()) {
                let msg = format!("requests.{n}.custom_id: duplicate {custom_id}");
                return error(400, "invalid_request_error", &msg);
            }
            let judged = match r
                .get("params")
                .cloned()
                .map(serde_json::from_value::<MessagesRequest>)
            {
                Some(Ok(req)) if !req.stream => {
                    let input = api::input_tokens(&req);
                    let refusal = api::refusal(&req, input, j.context_window, j.max_output_tokens);
                    if let Some(msg) = refusal {
                        Judged::Errored(api::error_body("invalid_request_error", &msg))
                    } else {
                        let output = ((req.max_tokens as f64 * j.output_fraction).round() as u64)
                            .clamp(1, req.max_tokens.max(1));
                        let id = format!("msg_sim_batch_{:08}_{n}", self.next);
                        Judged::Succeeded(api::message(&id, &req, input, output, None))
                    }
                }
                Some(Ok(_)) => Judged::Errored(api::error_body(
                    "invalid_request_error",
                    "stream: batch requests cannot be streamed",
                )),
                Some(Err(e)) => {
                    Judged::Errored(api::error_body("invalid_request_error", &e.to_string()))
                }
                None => Judged::Errored(api::error_body(
                    "invalid_request_error",
                    "params: Field required",
                )),
            };
            items.push(Item {
                custom_id: custom_id.to_owned(),
                judged,
            });
        }
        if let Some(cap) = j.batch_queue {
            let waiting: u64 = self
                .batches
                .iter()
                .filter(|b| b.key == key)
                .map(|b| b.processing(now))
                .sum();
            if waiting + items.len() as u64 > cap {
                let msg = format!(
                    "Number of requests waiting in batches would exceed your limit of {cap}."
                );
                return error(429, "rate_limit_error", &msg);
            }
        }
        self.next += 1;
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(j.seed ^ self.next));
        self.calls.created += 1;
        self.calls.requests += items.len() as u64;
        let batch = Batch {
            id: format!("msgbatch_sim_{:08}", self.next),
            key: key.to_owned(),
            created: now,
            created_wall: j.wall,
            items,
            per_item: 1.0 / j.batch_rps.max(1e-9),
            cancel_at: None,
            order,
        };
        let object = batch.object(now, j.base);
        self.batches.push(batch);
        (200, object)
    }

    fn find(&self, key: &str, id: &str) -> Option<usize> {
        self.batches.iter().position(|b| b.id == id && b.key == key)
    }

    fn not_found(id: &str) -> Answer {
        error(404, "not_found_error", &format!("No batch with id {id}"))
    }

    /// `GET /v1/messages/batches/{id}`.
    pub(crate) fn retrieve(&mut self, key: &str, id: &str, now: Instant, base: &str) -> Answer {
        self.calls.retrieved += 1;
        match self.find(key, id) {
            Some(i) => (200, self.batches[i].object(now, base)),
            None => Self::not_found(id),
        }
    }

    /// `GET /v1/messages/batches`: newest first, all on one page.
    pub(crate) fn list(&self, key: &str, now: Instant, base: &str) -> Answer {
        let data: Vec<Value> = self
            .batches
            .iter()
            .rev()
            .filter(|b| b.key == key)
            .map(|b| b.object(now, base))
            .collect();
        let first = data.first().map_or(Value::Null, |b| b["id"].clone());
        let last = data.last().map_or(Value::Null, |b| b["id"].clone());
        (
            200,
            json!({"data": data, "has_more": false, "first_id": first, "last_id": last}),
        )
    }

    /// `POST /v1/messages/batches/{id}/cancel`.
    pub(crate) fn cancel(&mut self, key: &str, id: &str, now: Instant, base: &str) -> Answer {
        self.calls.canceled += 1;
        match self.find(key, id) {
            Some(i) => {
                let b = &mut self.batches[i];
                if b.ended_at(now).is_none() && b.cancel_at.is_none() {
                    b.cancel_at = Some(now);
                }
                (200, b.object(now, base))
            }
            None => Self::not_found(id),
        }
    }

    /// `DELETE /v1/messages/batches/{id}`: only an ended batch.
    pub(crate) fn delete(&mut self, key: &str, id: &str, now: Instant) -> Answer {
        match self.find(key, id) {
            Some(i) if self.batches[i].ended_at(now).is_some() => {
                self.batches.remove(i);
                (200, json!({"id": id, "type": "message_batch_deleted"}))
            }
            Some(_) => error(
                400,
                "invalid_request_error",
                "A batch can be deleted only once it has ended; cancel it first.",
            ),
            None => Self::not_found(id),
        }
    }

    /// `GET /v1/messages/batches/{id}/results`: JSONL, once ended.
    pub(crate) fn results(&mut self, key: &str, id: &str, now: Instant) -> Result<String, Answer> {
        self.calls.results += 1;
        match self.find(key, id) {
            Some(i) if self.batches[i].ended_at(now).is_some() => Ok(self.batches[i].results(now)),
            Some(_) => Err(error(
                400,
                "invalid_request_error",
                "Results are available once the batch has ended.",
            )),
            None => Err(Self::not_found(id)),
        }
    }
}
