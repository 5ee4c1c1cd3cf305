//! Classification: one judgement of a result, shared by every layer.
//!
//! # Why one classifier
//!
//! Retry, adaptive concurrency and the token budget all ask the same question of a result: did it
//! succeed, was it pushed back (429, 529), did the server fail, did the network fail, or is it the
//! caller's own mistake that no retry will fix (a 400 for a prompt over the context window)? If each
//! layer answered on its own they would disagree at the edges, so the answer is a [`Classification`]
//! made by one [`Classify`] implementation. [`DefaultClassifier`] follows what the official
//! Anthropic and OpenAI SDKs do; implement the trait to change it.
//!
//! # The default table
//!
//! | result | [`Outcome`] | retryable |
//! |---|---|---|
//! | 1xx, 2xx, 3xx | `Success` | no |
//! | 429 | `RateLimited` | yes |
//! | 529, 503 | `Overloaded` | yes |
//! | 408, 409, other 5xx | `ServerError` | yes |
//! | other 4xx | `Fatal` | no |
//! | connect refused, reset, aborted, broken pipe, timeout, incomplete message | `Transport` | yes |
//! | any other error | `Fatal` | no |
//!
//! `x-should-retry: true|false` on a non-success response overrides the retryable column, as the
//! SDKs do; the outcome itself stays what the status says.
//!
//! # Example
//!
//! ```
//! use http::Response;
//! use tower_quota::classify::{Classify, DefaultClassifier, Outcome};
//!
//! let c = DefaultClassifier;
//! let res = Response::builder().status(529).body(()).unwrap();
//! let v = c.classify_response(res.status(), res.headers());
//! assert_eq!(v.outcome, Outcome::Overloaded);
//! assert!(v.retryable);
//!
//! let res = Response::builder().status(503).header("x-should-retry", "false").body(()).unwrap();
//! assert!(!c.classify_response(res.status(), res.headers()).retryable);
//! ```

use http::{HeaderMap, StatusCode};
use std::error::Error as StdError;
use std::io;

/// What a result was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The server did the work.
    Success,
    /// 429: the caller exceeded its quota.
    RateLimited,
    /// 529 or 503: the server is overloaded, whatever the caller's quota.
    Overloaded,
    /// Another server failure (other 5xx), or 408 / 409.
    ServerError,
    /// The request did not complete on the wire.
    Transport(TransportKind),
    /// The caller's own mistake (other 4xx) or an error no retry can fix.
    Fatal,
}

/// How a transport failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransportKind {
    /// The connection could not be made.
    Connect,
    /// The connection broke (reset, aborted, closed before the response was complete).
    Reset,
    /// A timeout expired.
    Timeout,
}

impl Outcome {
    /// Whether the server pushed back: a signal to send less (429, 529/503, a timeout).
    pub fn is_backpressure(self) -> bool {
        matches!(
            self,
            Outcome::RateLimited | Outcome::Overloaded | Outcome::Transport(TransportKind::Timeout)
        )
    }

    /// Whether the default rules retry this outcome.
    pub fn is_retryable_by_default(self) -> bool {
        !matches!(self, Outcome::Success | Outcome::Fatal)
    }
}

/// A judgement: what the result was, and whether to retry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Classification {
    /// What the result was.
    pub outcome: Outcome,
    /// Whether a retry may help (after `x-should-retry`).
    pub retryable: bool,
}

impl Classification {
    /// The classification the default rules give `outcome`.
    pub fn of(outcome: Outcome) -> Self {
        Self {
            outcome,
            retryable: outcome.is_retryable_by_default(),
        }
    }
}

/// Judges responses and errors. Implement it to change which results are retried or count as
/// back-pressure; [`DefaultClassifier`] is the default.
pub trait Classify: Send + Sync + 'static {
    /// Judges a response by its status and headers.
    fn classify_response(&self, status: StatusCode, headers: &HeaderMap) -> Classification;

    /// Judges an error returned instead of a response.
    fn classify_error(&self, error: &(dyn StdError + 'static)) -> Classification;
}

/// The default rules: see the [module docs](self).
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultClassifier;

/// The HTTP status Anthropic uses for "overloaded".
pub const STATUS_OVERLOADED: u16 = 529;

impl DefaultClassifier {
    /// The outcome of a status alone, before `x-should-retry`.
    pub fn outcome_of_status(status: StatusCode) -> Outcome {
        match status.as_u16() {
            100..=399 => Outcome::Success,
            429 => Outcome::RateLimited,
            503 | STATUS_OVERLOADED => Outcome::Overloaded,
            408 | 409 | 500..=599 => Outcome::ServerError,
            _ => Outcome::Fatal,
        }
    }

    /// The outcome of an error, found by walking its source chain for a known transport failure:
    /// an [`io::Error`] of a connection kind, a tower or tokio timeout, or a hyper error that says
    /// the connection broke. Anything else is [`Outcome::Fatal`]. (This crate's own give-ups are
    /// final for the retry loop whatever a classifier says: the loop checks them itself.)
    pub fn outcome_of_error(error: &(dyn StdError + 'static)) -> Outcome {
        let mut next = Some(error);
        while let Some(e) = next {
            if let Some(kind) = transport_kind(e) {
                return Outcome::Transport(kind);
            }
            next = e.source();
        }
        Outcome::Fatal
    }
}

fn transport_kind(e: &(dyn StdError + 'static)) -> Option<TransportKind> {
    if let Some(io) = e.downcast_ref::<io::Error>() {
        use io::ErrorKind::*;
        return match io.kind() {
            ConnectionRefused | NotConnected | AddrNotAvailable | HostUnreachable
            | NetworkUnreachable => Some(TransportKind::Connect),
            ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => {
                Some(TransportKind::Reset)
            }
            TimedOut => Some(TransportKind::Timeout),
            _ => None,
        };
    }
    if e.is::<tower::timeout::error::Elapsed>() || e.is::<tokio::time::error::Elapsed>() {
        return Some(TransportKind::Timeout);
    }
    if let Some(h) = e.downcast_ref::<hyper::Error>() {
        if h.is_timeout() {
            return Some(TransportKind::Timeout);
        }
        if h.is_incomplete_message() || h.is_closed() || h.is_canceled() {
            return Some(TransportKind::Reset);
        }
    }
    None
}

impl Classify for DefaultClassifier {
    fn classify_response(&self, status: StatusCode, headers: &HeaderMap) -> Classification {
        let mut c = Classification::of(Self::outcome_of_status(status));
        if c.outcome != Outcome::Success {
            let should = headers
                .get("x-should-retry")
                .and_then(|v| v.to_str().ok())
                .map(str::trim);
            match should {
                Some(v) if v.eq_ignore_ascii_case("true") => c.retryable = true,
                Some(v) if v.eq_ignore_ascii_case("false") => c.retryable = false,
                _ => {}
            }
        }
        c
    }

    fn classify_error(&self, error: &(dyn StdError + 'static)) -> Classification {
        Classification::of(Self::outcome_of_error(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn status(code: u16, should_retry: Option<&'static str>) -> Classification {
        let mut h = HeaderMap::new();
        if let Some(v) = should_retry {
            h.insert("x-should-retry", HeaderValue::from_static(v));
        }
        DefaultClassifier.classify_response(StatusCode::from_u16(code).unwrap(), &h)
    }

    #[test]
    fn status_table() {
        use Outcome::*;
        let table = [
            (200, Success, false),
            (201, Success, false),
            (304, Success, false),
            (400, Fatal, false),
            (401, Fatal, false),
            (403, Fatal, false),
            (404, Fatal, false),
            (413, Fatal, false),
            (408, ServerError, true),
            (409, ServerError, true),
            (429, RateLimited, true),
            (500, ServerError, true),
            (502, ServerError, true),
            (503, Overloaded, true),
            (504, ServerError, true),
            (529, Overloaded, true),
        ];
        for (code, outcome, retryable) in table {
            assert_eq!(
                status(code, None),
                Classification { outcome, retryable },
                "{code}"
            );
        }
    }

    #[test]
    fn should_retry_overrides() {
        assert!(!status(503, Some("false")).retryable);
        assert!(!status(429, Some("false")).retryable);
        assert_eq!(status(429, Some("false")).outcome, Outcome::RateLimited);
        assert!(status(400, Some("true")).retryable);
        assert!(status(409, Some("TRUE")).retryable);
        // Garbage changes nothing; a success is never "retryable".
        assert!(status(503, Some("nope")).retryable);
        assert!(!status(200, Some("true")).retryable);
    }

    #[derive(Debug)]
    struct Wrapped(io::Error);
    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("wrapped")
        }
    }
    impl StdError for Wrapped {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn errors() {
        let c = DefaultClassifier;
        let io = |k| io::Error::new(k, "x");
        let cases = [
            (
                io(io::ErrorKind::ConnectionRefused),
                Outcome::Transport(TransportKind::Connect),
            ),
            (
                io(io::ErrorKind::ConnectionReset),
                Outcome::Transport(TransportKind::Reset),
            ),
            (
                io(io::ErrorKind::TimedOut),
                Outcome::Transport(TransportKind::Timeout),
            ),
            (io(io::ErrorKind::InvalidData), Outcome::Fatal),
        ];
        for (e, outcome) in cases {
            let wrapped = Wrapped(io(e.kind()));
            assert_eq!(c.classify_error(&e).outcome, outcome);
            // Found through the source chain too.
            assert_eq!(c.classify_error(&wrapped).outcome, outcome);
        }
        let boxed: Box<dyn StdError + Send + Sync> =
            Box::new(tower::timeout::error::Elapsed::new());
        let v = c.classify_error(&*boxed);
        assert_eq!(v.outcome, Outcome::Transport(TransportKind::Timeout));
        assert!(v.retryable);
        assert!(v.outcome.is_backpressure());
        assert!(!c.classify_error(&std::fmt::Error).retryable);
    }
}
