use super::body::BudgetBody;
use super::future::{Reserve, ResponseFuture};
use super::shared::Shared;
use super::window::{Verdict, model_of};
use super::{Cost, Limits, TokenBudgetLayer};
use crate::BoxError;
use crate::body::InMemoryBody;
use crate::partition::Pool;
use http::{Request, Response};
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::Service;

/// The service [`TokenBudgetLayer`] makes. See the [module docs](super).
///
/// It is always ready: the reservation is made in `call` when there is room (the partition and the
/// cost are known only from the request), else in the response future, and the inner service is
/// made ready only once it is granted, so a request waiting for its budget holds nothing of the
/// inner service.
pub struct TokenBudget<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> TokenBudget<S> {
    /// A layer with `limits` ([`TokenBudgetLayer::new`]).
    pub fn layer(limits: Limits) -> TokenBudgetLayer {
        TokenBudgetLayer::new(limits)
    }
}

inner_service!(TokenBudget);

impl<S: fmt::Debug> fmt::Debug for TokenBudget<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBudget")
            .field("inner", &self.inner)
            .field("limits", &self.shared.limits)
            .finish()
    }
}

impl<S, B, ResB> Service<Request<B>> for TokenBudget<S>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    B: InMemoryBody,
{
    type Response = Response<BudgetBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let shared = &self.shared;
        let partition = shared.ctx.partition(&mut req);
        let cost = match req.extensions().get::<Cost>() {
            Some(c) => *c,
            // The Message Batches and token-counting endpoints have limits of their own: their
            // calls spend nothing of the Messages buckets.
            None if Pool::of_path(req.uri().path()) != Pool::Messages => Cost::default(),
            None => {
                let body = req.body().body_bytes();
                shared
                    .estimator
                    .estimate(req.headers(), req.extensions(), body.as_deref())
            }
        };
        let verdict = match shared.windows.as_ref() {
            None => Verdict::Fits,
            Some(w) => w.judge(
                req.headers(),
                req.uri(),
                || req.body().body_bytes(),
                cost.input_tokens,
                cost.output_tokens,
            ),
        };
        // One span per request with OpenTelemetry's GenAI attributes; the body is read for the
        // model only when a subscriber wants the span.
        let span = tracing::info_span!(
            target: "tower_quota::gen_ai",
            "gen_ai.request",
            gen_ai.operation.name = "chat",
            gen_ai.request.model = tracing::field::Empty,
            gen_ai.request.max_tokens = cost.output_tokens,
            gen_ai.usage.input_tokens = tracing::field::Empty,
            gen_ai.usage.output_tokens = tracing::field::Empty,
            tower_quota.partition = %partition,
            tower_quota.estimated_input_tokens = cost.input_tokens,
        );
        if !span.is_disabled() {
            if let Some(model) = req.body().body_bytes().as_deref().and_then(model_of) {
                span.record("gen_ai.request.model", model.as_str());
            }
        }
        ResponseFuture::new(
            &mut self.inner,
            req,
            Reserve::new(shared.clone(), partition, cost, verdict, span),
        )
    }
}
