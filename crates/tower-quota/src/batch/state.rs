//! The layer's shared state: its configuration, its counters, the groups being collected and
//! the batches in flight.

use super::run::submit;
use crate::collect::Groups;
use crate::pack::{PackInner, PackRequestBody};
use http::Request;
use serde_json::Value;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

#[derive(Clone, Debug)]
pub(super) struct Config {
    pub(super) max_requests: usize,
    pub(super) max_bytes: usize,
    pub(super) max_wait: Duration,
    pub(super) all: bool,
    pub(super) first_poll: Duration,
    pub(super) max_poll: Duration,
}

#[derive(Default)]
pub(super) struct Stats {
    pub(super) queued: AtomicUsize,
    pub(super) in_flight: AtomicUsize,
    pub(super) submitted: AtomicU64,
    pub(super) delivered: AtomicU64,
    pub(super) polls: AtomicU64,
    pub(super) canceled: AtomicU64,
}

pub(crate) struct Shared {
    pub(super) config: Config,
    pub(super) groups: Arc<Groups<Group>>,
    /// Numbers the requests' `custom_id`s.
    pub(super) next: AtomicU64,
    pub(super) stats: Stats,
    /// The batches submitted and not finished, as their last poll counted them.
    pub(super) live: Mutex<Vec<BatchStatus>>,
}

/// A submitted batch's requests by state, as the last poll of
/// `GET /v1/messages/batches/{id}` counted them (its `request_counts`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestCounts {
    /// Not processed yet.
    pub processing: u64,
    /// Answered with a message.
    pub succeeded: u64,
    /// Answered with an error.
    pub errored: u64,
    /// Canceled before they were processed.
    pub canceled: u64,
    /// Expired before they were processed.
    pub expired: u64,
}

impl RequestCounts {
    pub(super) fn from_json(v: &Value) -> Option<Self> {
        let n = |k: &str| v[k].as_u64();
        Some(Self {
            processing: n("processing")?,
            succeeded: n("succeeded")?,
            errored: n("errored")?,
            canceled: n("canceled")?,
            expired: n("expired")?,
        })
    }
}

/// A batch submitted and not finished: see [`BatchHandle::batches`](super::BatchHandle::batches).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchStatus {
    /// The batch's id (`msgbatch_...`).
    pub id: String,
    /// Requests it was submitted with (callers that left since still count).
    pub requests: usize,
    /// Its requests by state, from its last poll; all `processing` before the first.
    pub counts: RequestCounts,
    /// Whether its results are being delivered (it ended).
    pub delivering: bool,
}

pub(super) use crate::collect::Answer;

pub(super) struct Item {
    pub(super) custom_id: String,
    pub(super) params: Value,
    pub(super) tx: Answer,
}

pub(super) struct Group {
    /// A request of the group: its method, headers and URI make the batch calls.
    pub(super) head: http::request::Parts,
    pub(super) items: Vec<Item>,
    pub(super) bytes: usize,
}

/// The group a request joins: same scheme and host, key and `anthropic-*` headers.
pub(super) fn group_key(parts: &http::request::Parts) -> String {
    let mut key = format!(
        "{}://{}\n",
        parts.uri.scheme_str().unwrap_or(""),
        parts.uri.authority().map_or("", |a| a.as_str())
    );
    for (name, value) in &parts.headers {
        let n = name.as_str();
        if n == "x-api-key" || n == "authorization" || n.starts_with("anthropic-") {
            key.push_str(n);
            key.push(':');
            key.push_str(&String::from_utf8_lossy(value.as_bytes()));
            key.push('\n');
        }
    }
    key
}

impl Shared {
    pub(super) fn live(&self) -> MutexGuard<'_, Vec<BatchStatus>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Updates a live batch's entry.
    pub(super) fn update(&self, id: &str, f: impl FnOnce(&mut BatchStatus)) {
        if let Some(b) = self.live().iter_mut().find(|b| b.id == id) {
            f(b);
        }
    }

    pub(super) fn add<S: PackInner<B>, B: PackRequestBody>(
        self: Arc<Self>,
        inner: S,
        parts: http::request::Parts,
        params: Value,
        tx: Answer,
    ) {
        let c = &self.config;
        let key = group_key(&parts);
        let size = params.to_string().len() + 64;
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let shared = self.clone();
        let send = move |g| submit(inner.clone(), shared.clone(), g);
        self.groups.add(
            &key,
            c.max_wait,
            send,
            |g| g.bytes + size > c.max_bytes,
            || {
                let mut head = Request::new(()).into_parts().0;
                head.method = parts.method;
                head.uri = parts.uri;
                head.headers = parts.headers;
                Group {
                    head,
                    items: Vec::new(),
                    bytes: 0,
                }
            },
            |g| {
                g.bytes += size;
                g.items.push(Item {
                    custom_id: format!("tq-{n}"),
                    params,
                    tx,
                });
                self.stats.queued.fetch_add(1, Ordering::SeqCst);
                g.items.len() >= c.max_requests
            },
        );
    }
}
