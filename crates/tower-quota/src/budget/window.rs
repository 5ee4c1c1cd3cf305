//! The context window guard: a request that cannot fit the model's context window fails before
//! any quota is reserved or any byte is sent.
//!
//! # Why
//!
//! A prompt over the model's window is sent, spends a request of the quota and a round trip, and
//! comes back as a 400 `invalid_request_error` ("prompt is too long: 201234 tokens > 200000
//! maximum") that no retry can fix. The budget already estimates every request's input tokens
//! and reads its `max_tokens`: with the model's window it can say so at once, with the numbers.
//!
//! # How
//!
//! [`ContextWindows`] maps model names to their windows (200 000 tokens for every model by
//! default, 1 000 000 for a request that opts in with the `context-1m` beta in its
//! `anthropic-beta` header). Given to the budget with
//! [`TokenBudgetLayer::context_windows`](super::TokenBudgetLayer::context_windows), a request
//! whose estimated input plus `max_tokens` exceeds its model's window fails with a
//! [`ContextWindowError`]. The model is read from the body only when the request does not fit the
//! smallest window of the table (the common request costs nothing more). The estimate is an
//! estimate (about four bytes a token): set a window somewhat under the real one to keep a
//! margin, or above it to leave the borderline cases to the server.
//!
//! Near the window the estimate can be wrong either way. Given a [`CountTokens`]
//! ([`ContextWindows::count_tokens`]), a request whose estimate lands within a margin of its
//! window (10 % by default, on either side) is counted exactly by `POST
//! /v1/messages/count_tokens` (free, with a rate limit of its own, not the Messages buckets)
//! before it joins the budget's queue: the count decides, and becomes the request's input
//! estimate. Requests far from the window are never counted; a count that fails (its own 429, a
//! network error) leaves the decision to the estimate.
//!
//! The table also holds, per model, the largest `max_tokens` the model allows
//! ([`ContextWindows::model_max_tokens`]): a request asking for more fails with a
//! [`MaxTokensError`], and [`PackLayer`](crate::pack::PackLayer) caps a pack's summed
//! `max_tokens` by it. No model has a largest `max_tokens` by default (it differs by model and
//! changes with each release: 64 000 for some current models, 128 000 for others); a model not
//! named is left to the server, unless [`default_max_tokens`](ContextWindows::default_max_tokens)
//! says otherwise.
//!
//! The server's own refusals read as the same errors: [`ContextWindowError::from_error_body`]
//! parses the 400's body ("prompt is too long: ...", or "input length and `max_tokens` exceed
//! context limit: ..."), numbers included, and [`MaxTokensError::from_error_body`] the refusal
//! of a `max_tokens` over the model's ("max_tokens: N > M, which is the maximum allowed number of
//! output tokens for MODEL"). The classifier already calls a 400 fatal, so neither is retried.

pub use super::error::{ContextWindowError, MaxTokensError};
use crate::BoxError;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tower::{Service, ServiceExt};

/// The context windows of the models, in tokens. See the [module docs](self).
#[derive(Clone, Debug)]
#[must_use]
pub struct ContextWindows {
    default: u64,
    long: u64,
    models: HashMap<String, u64>,
    /// The smallest window of the table: a request within it needs no model lookup.
    smallest: u64,
    /// The exact count near the window, if enabled.
    counter: Option<CountTokens>,
    /// The largest `max_tokens` of the models named.
    max_tokens: HashMap<String, u64>,
    /// The largest `max_tokens` of a model not named, if any.
    default_max_tokens: Option<u64>,
    /// The smallest largest `max_tokens` of the table: a request within it needs no model
    /// lookup (`u64::MAX` when the table has none).
    smallest_max_tokens: u64,
}

impl Default for ContextWindows {
    fn default() -> Self {
        Self::new(Self::DEFAULT_WINDOW)
    }
}

impl ContextWindows {
    /// The window of the current Claude models: 200 000 tokens.
    pub const DEFAULT_WINDOW: u64 = 200_000;
    /// The window of a request that opts in with the `context-1m` beta: 1 000 000 tokens.
    pub const LONG_WINDOW: u64 = 1_000_000;

    /// `default` tokens for every model not named with [`model`](Self::model).
    pub fn new(default: u64) -> Self {
        Self {
            default,
            long: Self::LONG_WINDOW,
            models: HashMap::new(),
            smallest: default,
            counter: None,
            max_tokens: HashMap::new(),
            default_max_tokens: None,
            smallest_max_tokens: u64::MAX,
        }
    }

    /// Counts a request exactly with `counter` when its estimate lands near its window (see the
    /// [module docs](self)).
    pub fn count_tokens(mut self, counter: CountTokens) -> Self {
        self.counter = Some(counter);
        self
    }

    /// The window of `model` (its exact name in the request body).
    pub fn model(mut self, model: impl Into<String>, window: u64) -> Self {
        self.models.insert(model.into(), window);
        self.smallest = self.smallest.min(window);
        self
    }

    /// The largest `max_tokens` `model` (its exact name in the request body) allows: a request
    /// asking for more fails with a [`MaxTokensError`], and a pack of its prompts asks for at
    /// most this many.
    pub fn model_max_tokens(mut self, model: impl Into<String>, max_tokens: u64) -> Self {
        self.max_tokens.insert(model.into(), max_tokens);
        self.smallest_max_tokens = self.smallest_max_tokens.min(max_tokens);
        self
    }

    /// The largest `max_tokens` of every model not named with
    /// [`model_max_tokens`](Self::model_max_tokens) (default: none, the server decides).
    pub fn default_max_tokens(mut self, max_tokens: u64) -> Self {
        self.default_max_tokens = Some(max_tokens);
        self.smallest_max_tokens = self.smallest_max_tokens.min(max_tokens);
        self
    }

    /// The largest `max_tokens` a request of `model` (if known) may ask for, if the table says.
    pub fn max_tokens(&self, model: Option<&str>) -> Option<u64> {
        model
            .and_then(|m| self.max_tokens.get(m).copied())
            .or(self.default_max_tokens)
    }

    /// The window of a request that opts in with the `context-1m` beta (default 1 000 000).
    pub fn long_context(mut self, window: u64) -> Self {
        self.long = window;
        self
    }

    /// The window a request of `model` (if known) with `headers` has.
    pub fn window(&self, model: Option<&str>, headers: &HeaderMap) -> u64 {
        let beta = headers
            .get_all("anthropic-beta")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|b| b.trim().starts_with("context-1m"));
        let window = model
            .and_then(|m| self.models.get(m).copied())
            .unwrap_or(self.default);
        if beta { window.max(self.long) } else { window }
    }

    /// Checks a request estimated at `input` tokens with `max_tokens`: `Err` when it cannot fit
    /// its model's window. `body` is asked for (and the model read from it) only when the request
    /// does not fit the smallest window.
    #[cfg(test)]
    pub(crate) fn check(
        &self,
        headers: &HeaderMap,
        body: impl FnOnce() -> Option<Bytes>,
        input: u64,
        max_tokens: u64,
    ) -> Result<(), BoxError> {
        match self.judge(headers, &Uri::default(), body, input, max_tokens) {
            Verdict::Fits => Ok(()),
            Verdict::Over(e) => Err(e),
            Verdict::Count(_) => unreachable!("no counter in the unit tests"),
        }
    }

    /// Judges a request estimated at `input` tokens with `max_tokens`: it fits, it does not, or
    /// (with a counter, near its window) an exact count will say. `body` is asked for only when
    /// the request does not fit the smallest window (less the counter's margin).
    pub(crate) fn judge(
        &self,
        headers: &HeaderMap,
        uri: &Uri,
        body: impl FnOnce() -> Option<Bytes>,
        input: u64,
        max_tokens: u64,
    ) -> Verdict {
        let needed = input.saturating_add(max_tokens);
        let margin = self.counter.as_ref().map_or(0.0, |c| c.margin);
        let near = |window: u64| (window as f64 * (1.0 - margin)) as u64;
        if needed <= near(self.smallest) && max_tokens <= self.smallest_max_tokens {
            return Verdict::Fits;
        }
        let body = body();
        let model = body.as_deref().and_then(model_of);
        if let Some(limit) = self.max_tokens(model.as_deref())
            && max_tokens > limit
        {
            return Verdict::Over(Box::new(MaxTokensError {
                model,
                max_tokens,
                limit,
                from_server: false,
            }));
        }
        let window = self.window(model.as_deref(), headers);
        let error = |input| ContextWindowError {
            model: model.clone(),
            input,
            max_tokens: Some(max_tokens),
            window,
            from_server: false,
            counted: false,
        };
        let far_over = (window as f64 * (1.0 + margin)) as u64;
        match (&self.counter, body) {
            (Some(counter), Some(body)) if needed > near(window) && needed <= far_over => {
                let count = (counter.count)(headers.clone(), uri.clone(), body);
                let guess = error(input);
                Verdict::Count(Box::pin(async move {
                    match count.await {
                        Ok(exact) if exact.saturating_add(max_tokens) > window => {
                            Err(ContextWindowError {
                                input: exact,
                                counted: true,
                                ..guess
                            })
                        }
                        Ok(exact) => Ok(Some(exact)),
                        // The count failed: the estimate decides.
                        Err(_) if needed > window => Err(guess),
                        Err(_) => Ok(None),
                    }
                }))
            }
            _ if needed <= window => Verdict::Fits,
            _ => Verdict::Over(Box::new(error(input))),
        }
    }
}

/// The window check's judgement of a request.
pub(crate) enum Verdict {
    Fits,
    /// It cannot fit: a [`ContextWindowError`] or a [`MaxTokensError`].
    Over(BoxError),
    /// An exact count decides: `Ok(Some(n))` it fits with `n` input tokens (`None`: the count
    /// failed and the estimate says it fits), `Err` it does not.
    Count(CountFuture),
}

/// The future of a count near the window.
pub(crate) type CountFuture =
    Pin<Box<dyn Future<Output = Result<Option<u64>, ContextWindowError>> + Send>>;

type Counter = Arc<
    dyn Fn(HeaderMap, Uri, Bytes) -> Pin<Box<dyn Future<Output = Result<u64, BoxError>> + Send>>
        + Send
        + Sync,
>;

/// Exact counts from `POST /v1/messages/count_tokens`, for requests near their window (see the
/// [module docs](self)).
#[derive(Clone)]
pub struct CountTokens {
    count: Counter,
    margin: f64,
}

impl fmt::Debug for CountTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountTokens")
            .field("margin", &self.margin)
            .finish_non_exhaustive()
    }
}

impl CountTokens {
    /// Counts through `service` (your HTTP client, not the quota stack: the endpoint has limits
    /// of its own): a `POST` to the request's own scheme and host, path
    /// `/v1/messages/count_tokens`, with the request's headers and its body's `model`,
    /// `messages`, `system`, `tools`, `tool_choice` and `thinking`.
    pub fn via<S, ResB>(service: S) -> Self
    where
        S: Service<Request<Full<Bytes>>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        ResB: http_body::Body + Send + 'static,
        ResB::Data: Send,
        ResB::Error: Into<BoxError>,
    {
        let count: Counter = Arc::new(move |headers: HeaderMap, uri: Uri, body: Bytes| {
            let service = service.clone();
            Box::pin(async move {
                let mut parts = uri.into_parts();
                parts.path_and_query = Some("/v1/messages/count_tokens".parse()?);
                let uri = Uri::from_parts(parts)?;
                let mut req = Request::post(uri).body(Full::new(count_body(&body)?))?;
                for (name, value) in &headers {
                    if name != http::header::CONTENT_LENGTH {
                        req.headers_mut().append(name, value.clone());
                    }
                }
                let res = service.oneshot(req).await.map_err(Into::into)?;
                if !res.status().is_success() {
                    return Err(format!("count_tokens answered {}", res.status()).into());
                }
                let bytes = res
                    .into_body()
                    .collect()
                    .await
                    .map_err(Into::into)?
                    .to_bytes();
                let v: serde_json::Value = serde_json::from_slice(&bytes)?;
                v["input_tokens"]
                    .as_u64()
                    .ok_or_else(|| "count_tokens: no input_tokens".into())
            })
        });
        Self { count, margin: 0.1 }
    }

    /// How near the window an estimate must land to be counted, as a share of the window, on
    /// either side (default 0.1).
    ///
    /// # Panics
    ///
    /// If `margin` is not within `[0, 1]` (a NaN included).
    pub fn margin(mut self, margin: f64) -> Self {
        assert!(
            (0.0..=1.0).contains(&margin),
            "a count-tokens margin is a share of the window, within [0, 1]: {margin}"
        );
        self.margin = margin;
        self
    }
}

/// The body of a count: the request's fields the endpoint takes.
fn count_body(body: &[u8]) -> Result<Bytes, BoxError> {
    let serde_json::Value::Object(mut all) = serde_json::from_slice(body)? else {
        return Err("count_tokens: the body is not a JSON object".into());
    };
    let keep = [
        "model",
        "messages",
        "system",
        "tools",
        "tool_choice",
        "thinking",
    ];
    all.retain(|k, _| keep.contains(&k.as_str()));
    Ok(serde_json::to_vec(&all)?.into())
}

/// The `model` of a Messages body, if it has one.
pub(crate) fn model_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Model<'a> {
        #[serde(borrow)]
        model: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_slice::<Model<'_>>(body)
        .ok()?
        .model
        .map(|m| m.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn the_window_of_a_model_and_of_the_long_context_beta() {
        let w = ContextWindows::default().model("small", 8_000);
        let plain = HeaderMap::new();
        assert_eq!(w.window(Some("claude-sonnet-5-5"), &plain), 200_000);
        assert_eq!(w.window(Some("small"), &plain), 8_000);
        assert_eq!(w.window(None, &plain), 200_000);
        let mut beta = HeaderMap::new();
        beta.append(
            "anthropic-beta",
            HeaderValue::from_static("other-2025-01-01, context-1m-2025-08-07"),
        );
        assert_eq!(w.window(Some("claude-sonnet-5-5"), &beta), 1_000_000);
    }

    #[test]
    fn a_request_over_its_window_is_refused_with_the_numbers() {
        let w = ContextWindows::default().model("small", 8_000);
        let h = HeaderMap::new();
        let body = br#"{"model":"small","max_tokens":1000,"messages":[]}"#;
        assert!(
            w.check(&h, || Some(Bytes::from_static(body)), 7_000, 1_000)
                .is_ok()
        );
        let e = w
            .check(&h, || Some(Bytes::from_static(body)), 7_001, 1_000)
            .unwrap_err()
            .downcast::<ContextWindowError>()
            .unwrap();
        assert_eq!(
            (e.model(), e.input_tokens(), e.max_tokens(), e.window()),
            (Some("small"), 7_001, Some(1_000), 8_000)
        );
        assert!(!e.is_from_server());
        // Another model has the default window; a body without a model too.
        let other = br#"{"model":"big","max_tokens":1000}"#;
        assert!(
            w.check(&h, || Some(Bytes::from_static(other)), 9_000, 1_000)
                .is_ok()
        );
        assert!(
            w.check(&h, || Some(Bytes::from_static(b"not json")), 199_001, 1_000)
                .is_err()
        );
    }

    #[test]
    fn the_servers_refusal_reads_as_the_same_error() {
        let body = br#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 201234 tokens > 200000 maximum"}}"#;
        let e = ContextWindowError::from_error_body(body).unwrap();
        assert_eq!((e.input_tokens(), e.window()), (201_234, 200_000));
        assert!(e.is_from_server());
        let both = br#"{"type":"error","error":{"type":"invalid_request_error","message":"input length and `max_tokens` exceed context limit: 178959 + 64000 > 200000, decrease input length or `max_tokens` and try again"}}"#;
        let e = ContextWindowError::from_error_body(both).unwrap();
        assert_eq!(
            (e.input_tokens(), e.max_tokens(), e.window()),
            (178_959, Some(64_000), 200_000)
        );
        let other = br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: must be positive"}}"#;
        assert_eq!(ContextWindowError::from_error_body(other), None);
        assert_eq!(ContextWindowError::from_error_body(b"garbage"), None);
    }

    #[test]
    fn a_max_tokens_over_its_models_largest_is_refused_with_the_numbers() {
        let w = ContextWindows::default().model_max_tokens("small", 8_000);
        let h = HeaderMap::new();
        let body = br#"{"model":"small","max_tokens":9000,"messages":[]}"#;
        assert!(
            w.check(&h, || Some(Bytes::from_static(body)), 10, 8_000)
                .is_ok()
        );
        let e = w
            .check(&h, || Some(Bytes::from_static(body)), 10, 8_001)
            .unwrap_err()
            .downcast::<MaxTokensError>()
            .unwrap();
        assert_eq!(
            (e.model(), e.max_tokens(), e.limit(), e.is_from_server()),
            (Some("small"), 8_001, 8_000, false)
        );
        assert_eq!(
            e.to_string(),
            "max_tokens 8001 exceeds the largest 8000 of small"
        );
        // A model the table does not name is left to the server, unless a default is set.
        let other = br#"{"model":"big","max_tokens":100000}"#;
        assert!(
            w.check(&h, || Some(Bytes::from_static(other)), 10, 100_000)
                .is_ok()
        );
        let w = w.default_max_tokens(64_000);
        assert!(
            w.check(&h, || Some(Bytes::from_static(other)), 10, 100_000)
                .unwrap_err()
                .is::<MaxTokensError>()
        );
        assert_eq!(w.max_tokens(Some("small")), Some(8_000));
        assert_eq!(w.max_tokens(None), Some(64_000));
    }

    #[test]
    fn the_servers_max_tokens_refusal_reads_as_the_same_error() {
        let body = br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: 100000 > 64000, which is the maximum allowed number of output tokens for claude-haiku-4-5-20251001"}}"#;
        let e = MaxTokensError::from_error_body(body).unwrap();
        assert_eq!(
            (e.max_tokens(), e.limit(), e.model(), e.is_from_server()),
            (100_000, 64_000, Some("claude-haiku-4-5-20251001"), true)
        );
        let window = br#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 201234 tokens > 200000 maximum"}}"#;
        assert_eq!(MaxTokensError::from_error_body(window), None);
        let other = br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: must be positive"}}"#;
        assert_eq!(MaxTokensError::from_error_body(other), None);
        assert_eq!(MaxTokensError::from_error_body(b"garbage"), None);
    }
}
