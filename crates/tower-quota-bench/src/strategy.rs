//! The client strategies compared.

use crate::{Base, BoxError, Client, Req, clone_request};
use http::Response;
use http_body_util::BodyExt;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tower::retry::Policy;
use tower::retry::backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_quota::budget::Limits;
use tower_quota::signals::Signals;
use tower_quota::{Preset, ServiceBuilderExt};

/// A way to send the burst.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Strategy {
    /// Every request at once, no retry.
    Naive,
    /// Every request at once, retried at once up to 5 times on any failure.
    Immediate,
    /// The seed recipe: a semaphore of 15 held across retries, `1 s * 2^n + U(0, 1 s)`, 5 attempts,
    /// Retry-After honoured, only 429s retried.
    Seed,
    /// tower's built-ins: `ConcurrencyLimit(15)` over `Retry` with tower's default
    /// `ExponentialBackoff` (50 ms doubling, 0.99 jitter), 5 retries of 429/5xx/transport errors.
    Tower,
    /// The official SDKs' policy: 2 retries, `min(0.5 s * 2^n, 8 s) * (1 - 0.25 * rand)`,
    /// Retry-After used whenever positive (the Anthropic SDK 2.14; OpenAI's 3.57 caps it at
    /// 120 s); 408/409/429/5xx/transport retried.
    Sdk,
    /// tower-quota's recommended stack with the server's limits configured.
    QuotaConfigured,
    /// tower-quota's recommended stack with no limits configured: all learned from the headers.
    QuotaLearned,
}

impl Strategy {
    /// Every strategy, in table order.
    pub const ALL: [Strategy; 7] = [
        Strategy::Naive,
        Strategy::Immediate,
        Strategy::Seed,
        Strategy::Tower,
        Strategy::Sdk,
        Strategy::QuotaConfigured,
        Strategy::QuotaLearned,
    ];

    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Naive => "naive",
            Strategy::Immediate => "immediate retry",
            Strategy::Seed => "seed recipe",
            Strategy::Tower => "tower built-ins",
            Strategy::Sdk => "SDK-like",
            Strategy::QuotaConfigured => "tower-quota (configured)",
            Strategy::QuotaLearned => "tower-quota (learned)",
        }
    }

    /// How many requests run at once: every one for the strategies that do not bound themselves
    /// ("unbounded"), else `tasks`.
    pub fn concurrency(self, tasks: usize, requests: usize) -> usize {
        match self {
            Strategy::Naive | Strategy::Immediate => requests,
            _ => tasks,
        }
    }

    /// The strategy over `base`. `limits` are the server's, for the configured stack (`None`:
    /// unknown, so it learns them as the learned one does).
    pub fn build(self, base: Base, limits: Option<Limits>, seed: u64) -> Built {
        let rng = Arc::new(Mutex::new(SmallRng::seed_from_u64(seed)));
        match self {
            Strategy::Naive => Built::plain(BoxCloneService::new(service_fn(move |req: Req| {
                let base = base.clone();
                async move { finish(base.oneshot(req).await?).await }
            }))),
            Strategy::Immediate => {
                Built::plain(BoxCloneService::new(service_fn(move |req: Req| {
                    let base = base.clone();
                    async move {
                        let mut last = Err(BoxError::from("no attempt"));
                        for _ in 0..6 {
                            last = match base.clone().oneshot(clone_request(&req)).await {
                                Ok(res) => finish(res).await,
                                Err(e) => Err(e),
                            };
                            if matches!(last, Ok(s) if s < 400) {
                                break;
                            }
                        }
                        last
                    }
                })))
            }
            Strategy::Seed => {
                let semaphore = Arc::new(Semaphore::new(15));
                Built::plain(BoxCloneService::new(service_fn(move |req: Req| {
                    let (base, semaphore, rng) = (base.clone(), semaphore.clone(), rng.clone());
                    async move {
                        let _permit = semaphore.acquire_owned().await?;
                        let max_retries = 5;
                        let mut status = 0;
                        for attempt in 0..max_retries {
                            let mut res = base.clone().oneshot(clone_request(&req)).await?;
                            let hint = Signals::of(&mut res).retry_after().map(|h| h.delay);
                            status = finish(res).await?;
                            if status != 429 {
                                // The recipe retries rate limits only; anything else ends it.
                                return Ok(status);
                            }
                            if attempt == max_retries - 1 {
                                break;
                            }
                            let wait = hint.unwrap_or_else(|| {
                                let u: f64 = rng.lock().unwrap().random();
                                Duration::from_secs_f64(2f64.powi(attempt) + u)
                            });
                            tokio::time::sleep(wait).await;
                        }
                        Ok(status)
                    }
                })))
            }
            Strategy::Tower => {
                let status = service_fn(move |req: Req| {
                    let base = base.clone();
                    async move { finish(base.oneshot(req).await?).await }
                });
                let svc = ServiceBuilder::new()
                    .concurrency_limit(15)
                    .retry(TowerPolicy::new())
                    .service(status);
                Built::plain(BoxCloneService::new(svc))
            }
            Strategy::Sdk => Built::plain(BoxCloneService::new(service_fn(move |req: Req| {
                let (base, rng) = (base.clone(), rng.clone());
                async move {
                    let mut last: Result<u16, BoxError> = Err(BoxError::from("no attempt"));
                    for attempt in 0..=2u32 {
                        let mut hint = None;
                        let mut should_retry = None;
                        last = match base.clone().oneshot(clone_request(&req)).await {
                            Ok(mut res) => {
                                let s = Signals::of(&mut res);
                                hint = s.retry_after().map(|h| h.delay);
                                should_retry = s.should_retry();
                                finish(res).await
                            }
                            Err(e) => Err(e),
                        };
                        let retryable = match &last {
                            Ok(s) => {
                                should_retry.unwrap_or(matches!(s, 408 | 409 | 429) || *s >= 500)
                            }
                            Err(_) => true,
                        };
                        if !retryable || attempt == 2 {
                            break;
                        }
                        let wait = match hint.filter(|d| !d.is_zero()) {
                            Some(d) => d,
                            None => {
                                let base = (0.5 * 2f64.powi(attempt as i32)).min(8.0);
                                let r: f64 = rng.lock().unwrap().random();
                                Duration::from_secs_f64(base * (1.0 - 0.25 * r))
                            }
                        };
                        tokio::time::sleep(wait).await;
                    }
                    last
                }
            }))),
            Strategy::QuotaConfigured | Strategy::QuotaLearned => {
                let limits = match self {
                    Strategy::QuotaConfigured => limits.unwrap_or_default(),
                    _ => Limits::new(),
                };
                let mut preset = Preset::anthropic(limits);
                // Seeded jitter, so the cell is the same on every run.
                preset.retry = preset.retry.seed(seed);
                preset.retry_after = preset.retry_after.seed(seed + 1);
                let svc = ServiceBuilder::new()
                    .quota_stack(preset.clone())
                    .service(base);
                // The preset's bodies fail with tower-http's boxed timeout error: already a
                // `BoxError` (the generic `finish` trips rustc's higher-ranked `Send` check).
                let svc = ServiceExt::<Req>::and_then(svc, finish_boxed);
                Built {
                    client: BoxCloneService::new(svc),
                    preset: Some(preset),
                }
            }
        }
    }
}

/// A built strategy: the client, and the tower-quota layers' handles when it is tower-quota.
pub struct Built {
    /// The strategy, ready to call.
    pub client: Client,
    /// The layers, for their live state.
    pub preset: Option<Preset>,
}

impl std::fmt::Debug for Built {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Built")
            .field("preset", &self.preset)
            .finish()
    }
}

impl Built {
    fn plain(client: Client) -> Self {
        Self {
            client,
            preset: None,
        }
    }
}

/// Reads a response to its end and returns its status.
pub async fn finish<B>(res: Response<B>) -> Result<u16, BoxError>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let status = res.status().as_u16();
    res.into_body().collect().await.map_err(Into::into)?;
    Ok(status)
}

/// As [`finish`], for a body whose error is already a [`BoxError`].
async fn finish_boxed<B>(res: Response<B>) -> Result<u16, BoxError>
where
    B: http_body::Body<Error = BoxError>,
{
    let status = res.status().as_u16();
    res.into_body().collect().await?;
    Ok(status)
}

/// tower's `Retry` policy for the comparison: 5 retries of 429, 5xx and transport errors, with
/// tower's default `ExponentialBackoff`.
#[derive(Clone)]
struct TowerPolicy {
    left: u32,
    backoff: ExponentialBackoff,
}

impl TowerPolicy {
    fn new() -> Self {
        Self {
            left: 5,
            backoff: ExponentialBackoffMaker::default().make_backoff(),
        }
    }
}

impl Policy<Req, u16, BoxError> for TowerPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _req: &mut Req,
        result: &mut Result<u16, BoxError>,
    ) -> Option<Self::Future> {
        let retryable = match result {
            Ok(s) => *s == 429 || *s >= 500,
            Err(_) => true,
        };
        if !retryable || self.left == 0 {
            return None;
        }
        self.left -= 1;
        Some(self.backoff.next_backoff())
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(clone_request(req))
    }
}
