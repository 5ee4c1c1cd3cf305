//! `ServiceBuilder` methods for each layer, and presets that build the recommended stack.
//!
//! # The recommended order, and why
//!
//! ```text
//! BackoffRetryLayer        one retry loop per call; every attempt passes the layers below again
//!   TokenBudgetLayer       reserve requests/tokens per minute, wait FIFO, settle with the usage
//!     ConcurrencyLimitLayer  slots per attempt, held until the response body ends
//!       RetryAfterLayer      the partition's gate, last before the wire
//!         your HTTP client
//! ```
//!
//! Each attempt pays its budget and holds a slot exactly as the server counts it; the adaptive
//! limit sees every 429 (not a whole retry sequence as one slow round trip); the gate sits last,
//! so a request that queued in the budget or for a slot while a 429 arrived still waits for the
//! server's time. Other orders cost something: the retry inside the budget lets retries skip the
//! budget; the concurrency limit outside the retry holds a slot through every backoff sleep (the
//! seed recipe's semaphore does this); the gate outside the queues lets queued requests leave
//! during a cooldown.

use crate::budget::{Limits, TokenBudgetLayer};
use crate::concurrency::{Aimd, ConcurrencyLimitLayer};
use crate::context::QuotaContext;
use crate::retry::BackoffRetryLayer;
use crate::retry_after::RetryAfterLayer;
use std::time::Duration;
use tower::ServiceBuilder;
use tower::layer::util::Stack;

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}

/// One `ServiceBuilder` method per layer of this crate. Sealed: implemented for `ServiceBuilder`
/// only.
pub trait ServiceBuilderExt<L>: sealed::Sealed + Sized {
    /// Adds a [`BackoffRetryLayer`].
    fn backoff_retry(self, layer: BackoffRetryLayer)
    -> ServiceBuilder<Stack<BackoffRetryLayer, L>>;
    /// Adds a [`TokenBudgetLayer`].
    fn token_budget(self, layer: TokenBudgetLayer) -> ServiceBuilder<Stack<TokenBudgetLayer, L>>;
    /// Adds a [`ConcurrencyLimitLayer`].
    fn quota_concurrency(
        self,
        layer: ConcurrencyLimitLayer,
    ) -> ServiceBuilder<Stack<ConcurrencyLimitLayer, L>>;
    /// Adds a [`RetryAfterLayer`].
    fn retry_after(self, layer: RetryAfterLayer) -> ServiceBuilder<Stack<RetryAfterLayer, L>>;
    /// Adds the four layers of a [`Preset`], in the recommended order.
    fn quota_stack(
        self,
        preset: Preset,
    ) -> ServiceBuilder<
        Stack<
            RetryAfterLayer,
            Stack<ConcurrencyLimitLayer, Stack<TokenBudgetLayer, Stack<BackoffRetryLayer, L>>>,
        >,
    > {
        let Preset {
            retry,
            budget,
            concurrency,
            retry_after,
        } = preset;
        self.backoff_retry(retry)
            .token_budget(budget)
            .quota_concurrency(concurrency)
            .retry_after(retry_after)
    }
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn backoff_retry(
        self,
        layer: BackoffRetryLayer,
    ) -> ServiceBuilder<Stack<BackoffRetryLayer, L>> {
        self.layer(layer)
    }

    fn token_budget(self, layer: TokenBudgetLayer) -> ServiceBuilder<Stack<TokenBudgetLayer, L>> {
        self.layer(layer)
    }

    fn quota_concurrency(
        self,
        layer: ConcurrencyLimitLayer,
    ) -> ServiceBuilder<Stack<ConcurrencyLimitLayer, L>> {
        self.layer(layer)
    }

    fn retry_after(self, layer: RetryAfterLayer) -> ServiceBuilder<Stack<RetryAfterLayer, L>> {
        self.layer(layer)
    }
}

/// The four layers, configured together. Keep the preset (it is cheap to clone) to read the live
/// state of each layer through its handles.
#[derive(Clone, Debug)]
pub struct Preset {
    /// The retry loop.
    pub retry: BackoffRetryLayer,
    /// The token budget.
    pub budget: TokenBudgetLayer,
    /// The concurrency limit.
    pub concurrency: ConcurrencyLimitLayer,
    /// The Retry-After gate.
    pub retry_after: RetryAfterLayer,
}

impl Preset {
    /// The recommended stack for Anthropic's Messages API.
    ///
    /// - Retry: 5 retries, 1 s base doubling to 60 s plus up to 1 s of jitter, each attempt cut
    ///   after 10 minutes without a response (the SDKs' timeout), a hinted wait of up
    ///   to 5 minutes (Anthropic's resets run to minutes; the SDK's 60 s cap turns them into
    ///   failures), the 20 % retry budget.
    /// - Budget: `limits` per API key (`Limits::new()` to learn them all from the
    ///   `anthropic-ratelimit-*` headers), the Messages estimator (output reserved as
    ///   `max_tokens`, settled with the real `usage`).
    /// - Concurrency: adaptive AIMD from 8 up to 200, 0.9 on 429/529: the budget paces the rate;
    ///   the limit guards against overload (529) that no quota predicts.
    /// - Retry-After: per-key gate, cap 5 minutes, up to 100 ms of jitter.
    pub fn anthropic(limits: Limits) -> Self {
        Self {
            retry: BackoffRetryLayer::new()
                .attempt_timeout(Some(BackoffRetryLayer::DEFAULT_ATTEMPT_TIMEOUT)),
            budget: TokenBudgetLayer::new(limits),
            concurrency: ConcurrencyLimitLayer::adaptive(Aimd::default()),
            retry_after: RetryAfterLayer::new(),
        }
    }

    /// Gives all four layers one [`QuotaContext`]: one partitioner, one classifier and one wall
    /// clock for the whole stack, so a custom classifier changes every layer's judgement at once
    /// (the retry, the gate's pause, the budget's refund, the adaptive limit's decrease).
    pub fn context(self, ctx: QuotaContext) -> Self {
        Self {
            retry: self.retry.context(ctx.clone()),
            budget: self.budget.context(ctx.clone()),
            concurrency: self.concurrency.context(ctx.clone()),
            retry_after: self.retry_after.context(ctx),
        }
    }

    /// The recommended stack for OpenAI's APIs: as [`Preset::anthropic`], with the retry's first
    /// delay at 0.5 s (OpenAI's resets are often sub-second, `x-ratelimit-reset-requests: 12ms`)
    /// and a hinted wait of up to 2 minutes. `limits` may set `rpm` and `tpm`; OpenAI counts
    /// `max_tokens` toward its token limit at admission, as the estimator does.
    pub fn openai(limits: Limits) -> Self {
        Self {
            retry: BackoffRetryLayer::new()
                .attempt_timeout(Some(BackoffRetryLayer::DEFAULT_ATTEMPT_TIMEOUT))
                .base(Duration::from_millis(500))
                .max_hint_wait(Some(Duration::from_secs(120))),
            budget: TokenBudgetLayer::new(limits),
            concurrency: ConcurrencyLimitLayer::adaptive(Aimd::default()),
            retry_after: RetryAfterLayer::new().max_wait(Some(Duration::from_secs(120))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::Full;
    use tower::{ServiceExt, service_fn};

    #[tokio::test(start_paused = true)]
    async fn the_preset_stacks_in_one_expression() {
        let preset = Preset::anthropic(Limits::new().rpm(60));
        let budget = preset.budget.handle();
        let svc = ServiceBuilder::new()
            .quota_stack(preset)
            .service(service_fn(|_: Request<Full<Bytes>>| async {
                Ok::<_, std::io::Error>(Response::new(Full::new(Bytes::new())))
            }));
        let res = svc
            .oneshot(Request::new(Full::new(Bytes::from_static(b"{}"))))
            .await;
        assert_eq!(res.unwrap().status(), 200);
        assert_eq!(budget.admitted(), 1);
    }
}
