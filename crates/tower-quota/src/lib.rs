//! Rate-limit-aware [tower] layers for HTTP API clients.
//!
//! Programs that fan out many calls to a rate-limited API (LLM APIs above all) fail with
//! `429 Too Many Requests`: they retry at once, ignore `Retry-After`, launch unbounded concurrency,
//! count requests but not tokens, and waste quota. `tower-quota` is a set of separate, composable
//! layers that wrap any `http::Request<B> -> http::Response<B>` service (hyper-util's client, an
//! axum upstream, your own service) and get all of that right:
//!
//! | layer | what it does |
//! |---|---|
//! | [`retry::BackoffRetryLayer`] | retries what is retryable with exponential backoff and jitter, waits for the server's hint, bounded by attempts, a deadline and a shared retry budget; replays bodies |
//! | [`retry_after::RetryAfterLayer`] | reads `Retry-After`, `retry-after-ms` and reset headers, and pauses the whole partition (API key) until the server's time |
//! | [`concurrency::ConcurrencyLimitLayer`] | caps requests in flight, fixed or adaptive (AIMD), shared by all clones, with the slot held until the response body ends |
//! | [`budget::TokenBudgetLayer`] | requests, input tokens and output tokens per minute: reserve, wait in FIFO order, settle with the real usage, learn from the headers |
//!
//! They share one parser of server signals ([`signals`]) and one judgement of results
//! ([`classify`]); requests are keyed by [`partition`] (a SHA-256 fingerprint of the API key,
//! never the key). The partitioner, the classifier and the wall clock are configured once, in a
//! [`QuotaContext`], for every layer. The layers tell each other "come back at T" through
//! [`hint::RetryAt`]; their errors share the conventions of [`error`] (one [`retry_at`] for all);
//! request bodies they replay or read are [`body::InMemoryBody`]. [`Preset::anthropic`] builds
//! the recommended stack in one expression; the [`builder`] module explains the order.
//!
//! # Example
//!
//! hyper-util's pooled client under the full stack, against the simulated API of
//! `tower-quota-sim` on a loopback port:
//!
//! ```
//! use bytes::Bytes;
//! use http::Request;
//! use http_body_util::{BodyExt, Full};
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_quota::budget::Limits;
//! use tower_quota::{Preset, ServiceBuilderExt};
//! use tower_quota_sim::{MessagesRequest, SimConfig, Simulator};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_quota::BoxError> {
//! let server = tower_quota_sim::serve(Simulator::new(SimConfig::default()), "127.0.0.1:0".parse()?).await?;
//! let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let api = ServiceBuilder::new()
//!     .quota_stack(Preset::anthropic(Limits::new().rpm(50).itpm(30_000).otpm(8_000)))
//!     .service(client);
//!
//! let body = MessagesRequest::user("claude-sonnet-5-5", "Hello", 64).to_bytes();
//! let req = Request::post(format!("{}/v1/messages", server.base_url()))
//!     .header("x-api-key", "sk-example")
//!     .header("anthropic-version", "2023-06-01")
//!     .header("content-type", "application/json")
//!     .body(Full::new(body))?;
//! let res = api.oneshot(req).await?;
//! assert_eq!(res.status(), 200);
//! res.into_body().collect().await?; // reading the body settles the token reservation
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Backpressure
//!
//! tower's contract is that a service says "not now" in `poll_ready`. Most of this crate's waits
//! depend on the request (its API key's gate, its partition's budget and slots, its cost), which
//! `poll_ready` cannot see, so:
//!
//! - [`ConcurrencyLimit`](concurrency::ConcurrencyLimit) with one limit for every request (the
//!   default) reserves its slot in `poll_ready`, as tower's own `ConcurrencyLimit` does: while the
//!   limit is full it is pending, so `load_shed()` in front of it sheds and a `Buffer` in front of
//!   it queues.
//! - Every other service of the crate ([`BackoffRetry`](retry::BackoffRetry),
//!   [`TokenBudget`](budget::TokenBudget), [`RetryAfter`](retry_after::RetryAfter), and a
//!   per-partition concurrency limit) is always ready. A request admitted at once (the usual case)
//!   is sent from `call`, as tower's own layers do, when the inner service is ready too; one that
//!   must wait moves into the response future with a clone of the inner service and waits there
//!   (for its turn, its budget, its gate, its slot), then drives the clone to readiness and calls
//!   it. Waiting there holds nothing of the inner service. A `load_shed()` in front of those never
//!   sheds; bound the wait instead (each layer has a cap on how long it waits, and a timeout
//!   outside the stack bounds the whole call).
//!
//! To test back-pressure, poll the response future (it is pending while the request waits), as
//! `tests/tests/tokio_test_unit.rs` in the repository shows.
//!
//! # Testing under paused time
//!
//! Every wait goes through `tokio::time`, so stacks run deterministically and fast under
//! `#[tokio::test(start_paused = true)]`, against `tower-quota-sim`'s in-process `Simulator`. For
//! governor's limiters, the `governor` feature adds `clock::TokioClock`.
//!
//! # Feature flags
//!
//! None per layer: the four layers share the signals parser, the classifier, the partitions and
//! the request-body trait, and hand each other facts through extensions (a retry reads the gate's
//! `RetryAt`, the budget's wire mark is flipped by the layers inside it), so a build without one of
//! them would save little (the only dependencies beyond tower, http and tokio are small:
//! `httpdate`, `time`, `sfv`, `serde`) and would multiply the combinations to test. Use the layers
//! you need; the others cost nothing at run time. Two optional features add what only some users
//! need:
//!
//! - `conformance`: `budget::conformance`, the suite every
//!   [`BudgetStore`](budget::BudgetStore) implementation must pass (for a store's own tests).
//! - `governor`: `clock::TokioClock`, governor's limiters on tokio's pausable clock.
//!
//! # Minimum supported Rust version
//!
//! 1.85 (edition 2024; hyper-util needs it too).
//!
//! [tower]: https://docs.rs/tower

#![forbid(unsafe_code)]

#[macro_use]
mod macros;

mod admit;
pub mod batch;
pub mod body;
pub mod budget;
pub mod builder;
pub mod classify;
#[cfg(any(test, feature = "governor"))]
pub mod clock;
mod collect;
pub mod concurrency;
pub mod context;
pub mod error;
pub mod hint;
pub mod metrics;
pub mod pack;
pub mod partition;
pub mod retry;
pub mod retry_after;
pub mod signals;
pub mod trace;
mod util;
mod wire;

pub use builder::{Preset, ServiceBuilderExt};
pub use context::QuotaContext;
pub use error::retry_at;

/// A type-erased error, as tower uses.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
