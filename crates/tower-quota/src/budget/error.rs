//! Why [`TokenBudget`](super::TokenBudget) refused a request without sending it.

use super::Bucket;
use crate::partition::PartitionKey;
use std::fmt;
use std::time::Duration;
use tokio::time::Instant;

/// The budget refused a request without sending it: it could never fit
/// ([`is_too_large`](Self::is_too_large)), or it would wait past the cap
/// ([`is_wait_too_long`](Self::is_wait_too_long), with [`retry_at`](Self::retry_at)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BudgetError {
    kind: Kind,
    partition: PartitionKey,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    TooLarge {
        bucket: Bucket,
        needed: u64,
        capacity: u64,
    },
    WaitTooLong {
        retry_at: Instant,
        wait: Duration,
        cap: Duration,
    },
}

impl BudgetError {
    pub(crate) fn too_large(
        partition: PartitionKey,
        bucket: Bucket,
        needed: u64,
        capacity: u64,
    ) -> Self {
        Self {
            kind: Kind::TooLarge {
                bucket,
                needed,
                capacity,
            },
            partition,
        }
    }

    pub(crate) fn wait_too_long(partition: PartitionKey, wait: Duration, cap: Duration) -> Self {
        let now = Instant::now();
        let retry_at = now.checked_add(wait).unwrap_or(now + cap);
        Self {
            kind: Kind::WaitTooLong {
                retry_at,
                wait,
                cap,
            },
            partition,
        }
    }

    /// Whether the request costs more than a bucket holds when full: it could never be admitted.
    pub fn is_too_large(&self) -> bool {
        matches!(self.kind, Kind::TooLarge { .. })
    }

    /// Whether the wait for the budget would have exceeded the layer's cap.
    pub fn is_wait_too_long(&self) -> bool {
        matches!(self.kind, Kind::WaitTooLong { .. })
    }

    /// The partition that refused (a key fingerprint, or [`PartitionKey::GLOBAL`]).
    pub fn partition(&self) -> PartitionKey {
        self.partition
    }

    /// The bucket too small for the request, when it is too large.
    pub fn bucket(&self) -> Option<Bucket> {
        match self.kind {
            Kind::TooLarge { bucket, .. } => Some(bucket),
            Kind::WaitTooLong { .. } => None,
        }
    }

    /// What the request needs from that bucket, and what the bucket holds when full.
    pub fn needed_and_capacity(&self) -> Option<(u64, u64)> {
        match self.kind {
            Kind::TooLarge {
                needed, capacity, ..
            } => Some((needed, capacity)),
            Kind::WaitTooLong { .. } => None,
        }
    }

    /// When the budget expected to admit the request, when the wait was too long.
    pub fn retry_at(&self) -> Option<Instant> {
        match self.kind {
            Kind::WaitTooLong { retry_at, .. } => Some(retry_at),
            Kind::TooLarge { .. } => None,
        }
    }
}

impl fmt::Display for BudgetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let partition = self.partition;
        match self.kind {
            Kind::TooLarge {
                bucket,
                needed,
                capacity,
            } => write!(
                f,
                "request needs {needed} {bucket} but the {bucket} bucket of partition {partition} \
                 holds at most {capacity} (over by {})",
                needed.saturating_sub(capacity)
            ),
            Kind::WaitTooLong { wait, cap, .. } => write!(
                f,
                "partition {partition} could admit the request in {:.3} s, more than the cap of \
                 {:.3} s",
                wait.as_secs_f64(),
                cap.as_secs_f64()
            ),
        }
    }
}

impl std::error::Error for BudgetError {}

/// A request too long for its model's context window: found by the budget before sending
/// ([`is_from_server`](Self::is_from_server) false), or read from the server's 400
/// ([`from_error_body`](Self::from_error_body)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContextWindowError {
    pub(super) model: Option<String>,
    pub(super) input: u64,
    pub(super) max_tokens: Option<u64>,
    pub(super) window: u64,
    pub(super) from_server: bool,
    pub(super) counted: bool,
}

impl ContextWindowError {
    /// Reads the body of the server's 400 `invalid_request_error`: "prompt is too long: N
    /// tokens > M maximum", or "input length and `max_tokens` exceed context limit: N + T > M,
    /// ...": `Some` with the numbers when the body says either, `None` for any other body.
    pub fn from_error_body(body: &[u8]) -> Option<Self> {
        let message = error_message(body)?;
        let number = |s: &str| s.trim().parse::<u64>().ok();
        let (input, max_tokens, window) =
            if let Some(rest) = message.strip_prefix("prompt is too long: ") {
                let (tokens, rest) = rest.split_once(" tokens > ")?;
                (
                    number(tokens)?,
                    None,
                    number(rest.strip_suffix(" maximum")?)?,
                )
            } else {
                let rest =
                    message.strip_prefix("input length and `max_tokens` exceed context limit: ")?;
                let (input, rest) = rest.split_once(" + ")?;
                let (max_tokens, rest) = rest.split_once(" > ")?;
                let window = rest.split(',').next()?;
                (number(input)?, Some(number(max_tokens)?), number(window)?)
            };
        Some(Self {
            model: None,
            input,
            max_tokens,
            window,
            from_server: true,
            counted: false,
        })
    }

    /// The request's input tokens: the budget's estimate, or the server's count.
    pub fn input_tokens(&self) -> u64 {
        self.input
    }

    /// The request's `max_tokens`, when the budget found the error.
    pub fn max_tokens(&self) -> Option<u64> {
        self.max_tokens
    }

    /// The window it exceeded, in tokens.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// The model named in the request, when the budget read it.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Whether the server said so (its 400), rather than the budget's estimate.
    pub fn is_from_server(&self) -> bool {
        self.from_server
    }

    /// Whether the input tokens are an exact count (`count_tokens`), not an estimate.
    pub fn is_counted(&self) -> bool {
        self.counted || self.from_server
    }
}

impl fmt::Display for ContextWindowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let model = self.model.as_deref().unwrap_or("the model");
        match (self.from_server, self.max_tokens) {
            (false, Some(max)) => write!(
                f,
                "request of {}{} input tokens plus max_tokens {max} exceeds the context \
                 window of {} tokens of {model}",
                if self.counted { "" } else { "about " },
                self.input,
                self.window
            ),
            _ => write!(
                f,
                "prompt of {} tokens exceeds the context window of {} tokens",
                self.input, self.window
            ),
        }
    }
}

impl std::error::Error for ContextWindowError {}

/// A request whose `max_tokens` is more than its model allows: found by the budget before
/// sending ([`ContextWindows::model_max_tokens`](super::ContextWindows::model_max_tokens)), or
/// read from the server's 400 ([`from_error_body`](Self::from_error_body)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaxTokensError {
    pub(super) model: Option<String>,
    pub(super) max_tokens: u64,
    pub(super) limit: u64,
    pub(super) from_server: bool,
}

impl MaxTokensError {
    /// Reads the body of the server's 400 `invalid_request_error` "max_tokens: N > M, which is
    /// the maximum allowed number of output tokens for MODEL": `Some` with the numbers and the
    /// model when the body says so, `None` for any other body.
    pub fn from_error_body(body: &[u8]) -> Option<Self> {
        let message = error_message(body)?;
        let rest = message.strip_prefix("max_tokens: ")?;
        let (asked, rest) = rest.split_once(" > ")?;
        let (limit, rest) = rest.split_once(',')?;
        let model = rest
            .trim()
            .strip_prefix("which is the maximum allowed number of output tokens for ")
            .map(|m| m.trim().to_owned());
        Some(Self {
            model,
            max_tokens: asked.trim().parse().ok()?,
            limit: limit.trim().parse().ok()?,
            from_server: true,
        })
    }

    /// The request's `max_tokens`.
    pub fn max_tokens(&self) -> u64 {
        self.max_tokens
    }

    /// The largest `max_tokens` its model allows.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The model named in the request, when known.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Whether the server said so (its 400), rather than the budget's table.
    pub fn is_from_server(&self) -> bool {
        self.from_server
    }
}

impl fmt::Display for MaxTokensError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "max_tokens {} exceeds the largest {} of {}",
            self.max_tokens,
            self.limit,
            self.model.as_deref().unwrap_or("the model")
        )
    }
}

impl std::error::Error for MaxTokensError {}

/// The `error.message` of an API error body.
fn error_message(body: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    #[derive(serde::Deserialize)]
    struct Envelope<'a> {
        #[serde(borrow)]
        error: Inner<'a>,
    }
    #[derive(serde::Deserialize)]
    struct Inner<'a> {
        #[serde(borrow)]
        message: std::borrow::Cow<'a, str>,
    }
    let envelope: Envelope<'_> = serde_json::from_slice(body).ok()?;
    Some(envelope.error.message)
}
