//! Rate-limit-aware [tower] layers for HTTP API clients.
//!
//! Programs that fan out many calls to a rate-limited API (LLM APIs above all) fail with
//! `429 Too Many Requests`: they retry at once, ignore `Retry-After`, launch unbounded concurrency
//! and count requests but not tokens. `tower-quota` is a set of composable layers that wrap any
//! `http::Request<B> -> http::Response<B>` service and get all of that right.
//!
//! This release holds the foundation every layer builds on:
//!
//! - [`signals`]: one parser for every rate-limit header dialect (`Retry-After` in all its forms,
//!   `retry-after-ms`, `x-should-retry`, Anthropic, OpenAI, generic and IETF headers), cached in the
//!   response extensions;
//! - [`classify`]: one judgement of a response or transport error (success, rate limited,
//!   overloaded, server error, transport error, fatal), pluggable.
//!
//! # Example
//!
//! ```
//! use http::Response;
//! use tower_quota::classify::{Classify, DefaultClassifier, Outcome};
//! use tower_quota::signals::Signals;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let mut res = Response::builder()
//!     .status(429)
//!     .header("retry-after-ms", "2500")
//!     .body(())
//!     .unwrap();
//! let verdict = DefaultClassifier.classify_response(res.status(), res.headers());
//! assert_eq!(verdict.outcome, Outcome::RateLimited);
//! let hint = Signals::of(&mut res).hint().unwrap();
//! assert_eq!(hint.delay.as_millis(), 2500);
//! # }
//! ```
//!
//! # Minimum supported Rust version
//!
//! 1.85 (edition 2024; hyper-util needs it too).
//!
//! [tower]: https://docs.rs/tower

#![forbid(unsafe_code)]

pub mod budget;
pub mod classify;
pub mod clock;
pub mod concurrency;
pub mod partition;
pub mod retry;
pub mod retry_after;
pub mod signals;
mod wire;

/// A type-erased error, as tower uses.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
