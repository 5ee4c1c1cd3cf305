//! `ServiceBuilder` methods for each layer, and presets that build the recommended stack.
//!
//! # The recommended order, and why
//!
//! ```text
//! BackoffRetryLayer        one retry loop per call; every attempt passes the layers below again
//!   TokenBudgetLayer       reserve requests/tokens per minute, wait FIFO, settle with the usage
//!     ConcurrencyLimitLayer  slots per attempt, held until the response body ends
//!       RetryAfterLayer      the partition's gate, last before the wire
//!         ResponseBodyTimeoutLayer  (tower-http) the longest gap between body frames
//!           your HTTP client
//! ```
//!
//! Each attempt pays its budget and holds a slot exactly as the server counts it; the adaptive
//! limit sees every 429 (not a whole retry sequence as one slow round trip); the gate sits last,
//! so a request that queued in the budget or for a slot while a 429 arrived still waits for the
//! server's time. Other orders cost something: the retry inside the budget lets retries skip the
//! budget; the concurrency limit outside the retry holds a slot through every backoff sleep (the
//! seed recipe's semaphore does this); the gate outside the queues lets queued requests leave
//! during a cooldown. The body timeout is innermost so that a stalled stream's error passes
//! through every layer's body: each sees the body end and gives back its permit and settles its
//! reservation.

use crate::budget::{Limits, TokenBudgetLayer};
use crate::concurrency::{Aimd, ConcurrencyLimitLayer};
use crate::context::QuotaContext;
use crate::retry::BackoffRetryLayer;
use crate::retry_after::RetryAfterLayer;
use std::time::Duration;
use tower::ServiceBuilder;
use tower::layer::util::Stack;
use tower_http::timeout::ResponseBodyTimeoutLayer;

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
    /// Adds the four layers of a [`Preset`], in the recommended order, and innermost tower-http's
    /// [`ResponseBodyTimeoutLayer`] with the preset's [`body_idle_timeout`](Preset::body_idle_timeout).
    fn quota_stack(
        self,
        preset: Preset,
    ) -> ServiceBuilder<
        Stack<
            ResponseBodyTimeoutLayer,
            Stack<
                RetryAfterLayer,
                Stack<ConcurrencyLimitLayer, Stack<TokenBudgetLayer, Stack<BackoffRetryLayer, L>>>,
            >,
        >,
    > {
        let Preset {
            retry,
            budget,
            concurrency,
            retry_after,
            body_idle_timeout,
        } = preset;
        self.backoff_retry(retry)
            .token_budget(budget)
            .quota_concurrency(concurrency)
            .retry_after(retry_after)
            .layer(ResponseBodyTimeoutLayer::new(body_idle_timeout))
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
    /// The longest wait for the next frame of a response body (tower-http's
    /// [`ResponseBodyTimeoutLayer`], innermost): a stream that stalls ends with a
    /// [`tower_http::timeout::TimeoutError`] instead of holding its caller, its concurrency permit
    /// and its reservation for ever. The retry's attempt timeout covers the wait for the headers;
    /// this covers every gap after them. Default [`Preset::DEFAULT_BODY_IDLE_TIMEOUT`].
    pub body_idle_timeout: Duration,
}

impl Preset {
    /// The default [`body_idle_timeout`](Preset::body_idle_timeout): 2 minutes. A Messages
    /// stream sends an event at least every few seconds (`ping` events while the model thinks), and
    /// a response that is not streamed arrives whole after its headers, so two minutes without a
    /// frame is a stalled connection, not a slow model.
    pub const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

    /// Sets the longest wait for the next frame of a response body.
    ///
    /// # Panics
    ///
    /// If `timeout` is zero (every body would fail).
    pub fn body_idle_timeout(self, timeout: Duration) -> Self {
        assert!(
            !timeout.is_zero(),
            "a body idle timeout of zero fails every body"
        );
        Self {
            body_idle_timeout: timeout,
            ..self
        }
    }

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
    /// - Response bodies: at most 2 minutes between frames
    ///   ([`DEFAULT_BODY_IDLE_TIMEOUT`](Preset::DEFAULT_BODY_IDLE_TIMEOUT)).
    pub fn anthropic(limits: Limits) -> Self {
        Self {
            retry: BackoffRetryLayer::new()
                .attempt_timeout(Some(BackoffRetryLayer::DEFAULT_ATTEMPT_TIMEOUT)),
            budget: TokenBudgetLayer::new(limits),
            concurrency: ConcurrencyLimitLayer::adaptive(Aimd::default()),
            retry_after: RetryAfterLayer::new(),
            body_idle_timeout: Self::DEFAULT_BODY_IDLE_TIMEOUT,
        }
    }

    /// Gives all four layers one [`QuotaContext`]: one partitioner, one classifier and one wall
    /// clock for the whole stack, so a custom classifier changes every layer's judgement at once
    /// (the retry, the gate's pause, the budget's refund, the adaptive limit's decrease).
    ///
    /// # Panics
    ///
    /// If a layer is already in use (a handle or a service was made from it): give the context
    /// first, then read handles and build the stack.
    #[track_caller]
    pub fn context(self, ctx: QuotaContext) -> Self {
        Self {
            retry: self.retry.context(ctx.clone()),
            budget: self.budget.context(ctx.clone()),
            concurrency: self.concurrency.context(ctx.clone()),
            retry_after: self.retry_after.context(ctx),
            body_idle_timeout: self.body_idle_timeout,
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
            body_idle_timeout: Self::DEFAULT_BODY_IDLE_TIMEOUT,
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

    /// A body that sends one frame, then nothing, never waking its reader (a stalled stream).
    struct Stalled(bool);

    impl http_body::Body for Stalled {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            if std::mem::replace(&mut self.0, true) {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
                    b"event: ping\n\n",
                )))))
            }
        }
    }

    /// Issue 10: nothing waits for ever by default. A stream that stalls after its headers ends
    /// with tower-http's typed timeout error after the preset's idle timeout (2 minutes), and the
    /// permit it held is given back. Before, the body waited for ever and held its slot.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_stream_ends_with_a_timeout_and_gives_back_its_slot() {
        use http_body_util::BodyExt;
        let preset = Preset::anthropic(Limits::new().rpm(60));
        let slots = preset.concurrency.handle();
        let svc = ServiceBuilder::new()
            .quota_stack(preset)
            .service(service_fn(|_: Request<Full<Bytes>>| async {
                Ok::<_, std::io::Error>(Response::new(Stalled(false)))
            }));
        let res = svc
            .oneshot(Request::new(Full::new(Bytes::from_static(b"{}"))))
            .await
            .unwrap();
        // tower-http's timeout body holds its timer inline: it is `!Unpin`, so pin it to poll it.
        let mut body = std::pin::pin!(res.into_body());
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        assert_eq!(slots.in_flight(), 1);
        let t0 = tokio::time::Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(t0.elapsed(), Preset::DEFAULT_BODY_IDLE_TIMEOUT);
        assert!(err.is::<tower_http::timeout::TimeoutError>(), "{err:?}");
        assert_eq!(slots.in_flight(), 0, "the slot is given back at the error");
    }

    #[test]
    #[should_panic(expected = "zero")]
    fn a_zero_body_timeout_is_refused_at_construction() {
        let _ = Preset::anthropic(Limits::new()).body_idle_timeout(Duration::ZERO);
    }
}
