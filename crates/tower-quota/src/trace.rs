//! The context's classifier as a tower-http classifier, so tower-http's `TraceLayer` (and any
//! middleware built on `tower_http::classify`) logs the judgement the layers act on.
//!
//! The token budget also opens one `tracing` span per request, `gen_ai.request` (target
//! `tower_quota::gen_ai`), with OpenTelemetry's GenAI attributes: `gen_ai.operation.name`,
//! `gen_ai.request.model` (read from the body only when a subscriber wants the span),
//! `gen_ai.request.max_tokens`, and `gen_ai.usage.input_tokens` / `gen_ai.usage.output_tokens`
//! recorded when the response's usage settles the reservation (left empty when the server did no
//! work), plus `tower_quota.partition` (the key's fingerprint). The inner service is called and
//! polled inside it, so a client's own spans nest under it. With no subscriber it costs one
//! disabled-span check.
//!
//! # Why
//!
//! tower-http's own classifiers call every 5xx a failure and every 4xx a success: a 429 the
//! stack waits out and retries is logged as a success, and a 529 the same as a 500. Given
//! [`QuotaContext::trace_classifier`], `TraceLayer` logs what the retry, the gate, the budget and
//! the adaptive limit saw: a [`QuotaFailure`] with the [`Outcome`] and whether it is retryable.
//!
//! ```
//! use tower_http::trace::TraceLayer;
//! use tower_quota::QuotaContext;
//!
//! let ctx = QuotaContext::new();
//! let trace = TraceLayer::new(ctx.trace_classifier());
//! # let _ = trace;
//! ```

use crate::classify::{Classification, Outcome};
use crate::context::QuotaContext;
use http::{Response, StatusCode};
use std::fmt;
use tower_http::classify::{
    ClassifiedResponse, ClassifyResponse, NeverClassifyEos, SharedClassifier,
};

/// The context's classifier, for tower-http ([`QuotaContext::trace_classifier`]).
#[derive(Clone, Debug)]
pub struct QuotaClassifier {
    ctx: QuotaContext,
}

/// A result the classifier does not call a success: a response's status and judgement, or an
/// error's message (tower-http hands errors over as `Display` only).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum QuotaFailure {
    /// A response judged other than [`Outcome::Success`].
    Response {
        /// Its status.
        status: StatusCode,
        /// The judgement the layers act on.
        classification: Classification,
    },
    /// An error instead of a response.
    Error(String),
}

impl QuotaFailure {
    /// The judgement, for a response.
    pub fn classification(&self) -> Option<Classification> {
        match self {
            Self::Response { classification, .. } => Some(*classification),
            Self::Error(_) => None,
        }
    }
}

impl fmt::Display for QuotaFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Response {
                status,
                classification,
            } => write!(
                f,
                "status {} judged {:?}{}",
                status.as_u16(),
                classification.outcome,
                if classification.retryable {
                    " (retryable)"
                } else {
                    ""
                }
            ),
            Self::Error(e) => write!(f, "error: {e}"),
        }
    }
}

impl ClassifyResponse for QuotaClassifier {
    type FailureClass = QuotaFailure;
    type ClassifyEos = NeverClassifyEos<QuotaFailure>;

    fn classify_response<B>(
        self,
        res: &Response<B>,
    ) -> ClassifiedResponse<Self::FailureClass, Self::ClassifyEos> {
        let classification = self.ctx.classify(res);
        ClassifiedResponse::Ready(if classification.outcome == Outcome::Success {
            Ok(())
        } else {
            Err(QuotaFailure::Response {
                status: res.status(),
                classification,
            })
        })
    }

    fn classify_error<E>(self, error: &E) -> Self::FailureClass
    where
        E: fmt::Display + 'static,
    {
        QuotaFailure::Error(error.to_string())
    }
}

impl QuotaContext {
    /// This context's classifier for tower-http: `TraceLayer::new(ctx.trace_classifier())` logs
    /// the judgement the layers act on. See [`trace`](crate::trace).
    pub fn trace_classifier(&self) -> SharedClassifier<QuotaClassifier> {
        SharedClassifier::new(QuotaClassifier { ctx: self.clone() })
    }
}
