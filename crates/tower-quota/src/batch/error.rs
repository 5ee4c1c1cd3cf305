//! Why a deferred request has no Messages answer.

use std::fmt;

/// Why a deferred request has no Messages answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchError {
    kind: Kind,
    message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Streaming,
    Canceled,
    Expired,
    Failed,
}

impl BatchError {
    pub(super) fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// The request asked for a stream, which a batch cannot give: nothing was sent.
    pub fn is_streaming(&self) -> bool {
        self.kind == Kind::Streaming
    }

    /// The batch was canceled before the request was processed.
    pub fn is_canceled(&self) -> bool {
        self.kind == Kind::Canceled
    }

    /// The batch expired (24 hours) before the request was processed.
    pub fn is_expired(&self) -> bool {
        self.kind == Kind::Expired
    }
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            Kind::Streaming => "a streaming request cannot be deferred to a batch",
            Kind::Canceled => "the batch was canceled before this request was processed",
            Kind::Expired => "the batch expired before this request was processed",
            Kind::Failed => "the batch failed",
        };
        if self.message.is_empty() {
            f.write_str(what)
        } else {
            write!(f, "{what}: {}", self.message)
        }
    }
}

impl std::error::Error for BatchError {}
