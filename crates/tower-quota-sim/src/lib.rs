//! A simulated rate-limited API shaped like Anthropic's Messages API, for tests, demos and
//! benchmarks of rate-limit-aware clients.
//!
//! # Why a simulator
//!
//! Every claim a rate-limit client makes ("no 429s", "98 % of the quota", "never retries early")
//! needs a server that limits the way real providers do, announces its waits in all the forms they
//! use, fails in the ways they fail, and keeps an honest record. This crate is that server:
//!
//! - `POST /v1/messages` with the real request and response JSON shapes, keyed by `x-api-key`
//!   (or `Authorization: Bearer`);
//! - requests, input-token and output-token per-minute token buckets refilled continuously;
//!   admission needs `max_tokens` of output tokens, the real output is what is debited;
//! - 429 with `retry-after` in the [`RetryAfterStyle`] chosen, and rate-limit headers in the
//!   [`Dialect`] chosen; 529 overload, 500s, connection resets, slow responses, garbage headers and
//!   an SSE `error` event mid-stream as [`Faults`], all drawn from a seeded random source;
//! - an [`audit`](Simulator::audit) of every request with a [`Summary`], including *early
//!   arrivals*: requests from a key that arrive while a cooldown the server announced to that key
//!   is running.
//!
//! It runs in process as a [`tower::Service`] ([`Simulator`]), so whole client stacks run under
//! paused tokio time, deterministic and fast; or as a real HTTP server ([`serve`], and the
//! `quota-sim` binary), which answers `GET /__audit` with the summary as JSON.
//!
//! # Example
//!
//! ```
//! use http::Request;
//! use http_body_util::Full;
//! use tower::ServiceExt;
//! use tower_quota_sim::{Limits, MessagesRequest, SimConfig, Simulator};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let sim = Simulator::new(SimConfig::new(Limits::new(60, 100_000, 10_000)));
//! let body = MessagesRequest::user("claude-sim", "Hello", 100).to_bytes();
//! let req = Request::post("/v1/messages")
//!     .header("x-api-key", "sk-test")
//!     .body(Full::new(body))
//!     .unwrap();
//! let res = sim.clone().oneshot(req).await.unwrap();
//! assert_eq!(res.status(), 200);
//! assert_eq!(sim.summary().total.ok, 1);
//! # }
//! ```

#![forbid(unsafe_code)]

mod api;
pub mod audit;
pub mod batch;
mod body;
mod bucket;
mod config;
pub mod prices;
mod server;
mod service;

pub use api::{Message, MessagesRequest, input_tokens, packed_answer};
pub use audit::{AuditOutcome, AuditRecord, Counts, Summary};
pub use batch::BatchCalls;
pub use body::{BodyError, SimBody};
pub use config::{Background, Dialect, Faults, Limits, PackFaults, RetryAfterStyle, SimConfig};
pub use prices::Price;
pub use server::{ServeOptions, ServerHandle, serve, serve_with};
pub use service::Simulator;

/// A type-erased error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A short, stable fingerprint of an API key for logs and the audit: never the key itself.
pub fn fingerprint(key: &str) -> String {
    // FNV-1a: stable across runs and Rust versions, which the audit's per-key summary needs.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("key-{:08x}", (h >> 32) as u32)
}
