//! A [`reqwest::Client`] as a tower [`Service`] of [`http::Request`], so [tower-quota]'s layers
//! (and any other tower middleware written for `http` types) can wrap the client a program already
//! has.
//!
//! # Why
//!
//! Most Rust programs that call LLM APIs use reqwest: the community Anthropic and OpenAI crates are
//! built on it. `reqwest::Client` is a tower service already, but of its own
//! [`reqwest::Request`] and [`reqwest::Response`], while tower middleware (tower-quota's layers,
//! tower-http's) speaks `http::Request<B>` and `http::Response<B>`. [`ReqwestService`] is the
//! small translation between the two, with nothing else in it: the client keeps its own pool,
//! TLS, proxies and timeouts, and the layers above it keep their own judgement.
//!
//! - **Request bodies** of any [`http_body::Body`] type are handed to reqwest as they are
//!   ([`reqwest::Body::wrap`]), so the layers' replayable bodies (a `Full<Bytes>`, a `String`)
//!   pass through unchanged and every retry sends its own copy.
//! - **Response bodies** are reqwest's own [`reqwest::Body`], an [`http_body::Body`] of
//!   [`Bytes`]: the layers read the `usage` out of it (streamed or not) and settle their
//!   reservations when it ends, exactly as with hyper-util's client.
//! - **Errors** are [`Error`], which keeps the [`reqwest::Error`] and makes its transport failures
//!   visible to tower-quota's classifier: a timeout raised by reqwest itself (its `timeout` or
//!   `read_timeout`) carries an [`io::Error`] of kind [`TimedOut`](io::ErrorKind::TimedOut) in its
//!   source chain, so it is retried as a timeout; connect and reset failures carry their own
//!   `io::Error` already.
//!
//! Why a crate of its own rather than a feature of `tower-quota`: reqwest changes major version
//! more often than tower does (0.11, 0.12 and 0.13 in three years); a separate crate can follow it
//! without a breaking release of the layers.
//!
//! A [`reqwest_middleware`](https://docs.rs/reqwest-middleware) `Middleware` that runs the stack
//! is not offered: its `Next` borrows the rest of the chain for one call, while the stack's futures
//! must own their inner service (the retry sends again after the call that produced its first
//! answer has returned). Put the layers around the client, as below, instead.
//!
//! # Example
//!
//! The full tower-quota stack over a `reqwest::Client`, against the simulated API on a loopback
//! port:
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_quota::budget::Limits;
//! use tower_quota::{Preset, ServiceBuilderExt};
//! use tower_quota_reqwest::ReqwestService;
//! use tower_quota_sim::{MessagesRequest, SimConfig, Simulator};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_quota::BoxError> {
//! let server = tower_quota_sim::serve(Simulator::new(SimConfig::default()), "127.0.0.1:0".parse()?).await?;
//! let api = ServiceBuilder::new()
//!     .quota_stack(Preset::anthropic(Limits::new().rpm(50).itpm(30_000).otpm(8_000)))
//!     .service(ReqwestService::new(reqwest::Client::new()));
//!
//! let body = MessagesRequest::user("claude-sonnet-5-5", "Hello", 64).to_bytes();
//! let req = http::Request::post(format!("{}/v1/messages", server.base_url()))
//!     .header("x-api-key", "sk-example")
//!     .header("anthropic-version", "2023-06-01")
//!     .header("content-type", "application/json")
//!     .body(Full::new(body))?;
//! let res = api.oneshot(req).await?;
//! assert_eq!(res.status(), 200);
//! res.into_body().collect().await?; // reading the body settles the token reservation
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! [tower-quota]: https://docs.rs/tower-quota

use bytes::Bytes;
use http_body::Body as HttpBody;
use pin_project_lite::pin_project;
use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::{fmt, io};
use tower::Service;

type BoxError = Box<dyn StdError + Send + Sync>;

/// A [`reqwest::Client`] as a [`Service`] of `http::Request<B>` answering
/// `http::Response<reqwest::Body>`. Cheap to clone (the client is an `Arc` inside); always ready.
/// See the [crate docs](crate).
#[derive(Clone, Debug, Default)]
pub struct ReqwestService {
    client: reqwest::Client,
}

impl ReqwestService {
    /// Sends every request through `client`.
    pub fn new(client: reqwest::Client) -> Self {
        Self { client }
    }

    /// The client requests are sent through.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

impl From<reqwest::Client> for ReqwestService {
    fn from(client: reqwest::Client) -> Self {
        Self::new(client)
    }
}

impl<B> Service<http::Request<B>> for ReqwestService
where
    B: HttpBody + Send + Sync + 'static,
    B::Data: Into<Bytes>,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<reqwest::Body>;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> ResponseFuture {
        let state = match reqwest::Request::try_from(req.map(reqwest::Body::wrap)) {
            Ok(req) => State::Sending {
                pending: Service::call(&mut self.client, req),
            },
            Err(e) => State::Refused {
                error: Some(Error::new(e)),
            },
        };
        ResponseFuture { state }
    }
}

/// reqwest's own response future (its type is not exported under a name of its own).
type Pending = <reqwest::Client as Service<reqwest::Request>>::Future;

pin_project! {
    /// The future of [`ReqwestService::call`].
    pub struct ResponseFuture {
        #[pin]
        state: State,
    }
}

pin_project! {
    #[project = StateProj]
    enum State {
        Sending { #[pin] pending: Pending },
        Refused { error: Option<Error> },
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<reqwest::Body>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Sending { pending } => {
                let res = ready!(pending.poll(cx)).map_err(Error::new)?;
                Poll::Ready(Ok(http::Response::from(res)))
            }
            StateProj::Refused { error } => Poll::Ready(Err(error
                .take()
                .expect("ResponseFuture polled after completion"))),
        }
    }
}

/// What [`ReqwestService`] fails with: the [`reqwest::Error`], its transport failures made
/// visible to classifiers that walk the source chain for an [`io::Error`] (see the
/// [crate docs](crate)).
pub struct Error {
    inner: reqwest::Error,
    /// An `io::Error` of kind `TimedOut` when reqwest timed out on its own (its own timeout leaves
    /// no `io::Error` in the chain).
    timed_out: Option<io::Error>,
}

impl Error {
    fn new(inner: reqwest::Error) -> Self {
        let timed_out = inner
            .is_timeout()
            .then(|| io::Error::new(io::ErrorKind::TimedOut, "reqwest timed out"));
        Self { inner, timed_out }
    }

    /// Whether reqwest timed out (its `timeout`, `connect_timeout` or `read_timeout`).
    pub fn is_timeout(&self) -> bool {
        self.inner.is_timeout()
    }

    /// Whether connecting failed.
    pub fn is_connect(&self) -> bool {
        self.inner.is_connect()
    }

    /// The reqwest error.
    pub fn get_ref(&self) -> &reqwest::Error {
        &self.inner
    }

    /// The reqwest error, owned.
    pub fn into_inner(self) -> reqwest::Error {
        self.inner
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.inner, f)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner, f)
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match &self.timed_out {
            Some(t) => Some(t),
            None => self.inner.source(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower_quota::classify::{Classify, DefaultClassifier, Outcome, TransportKind};

    #[tokio::test]
    async fn a_refused_connection_is_a_retryable_connect_failure() {
        // A port that was bound and released: nothing listens there now.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut svc = ReqwestService::new(reqwest::Client::new());
        let req = http::Request::get(format!("http://127.0.0.1:{port}/"))
            .body(String::new())
            .unwrap();
        let e = Service::call(&mut svc, req).await.unwrap_err();
        assert!(e.is_connect(), "{e:?}");
        let c = DefaultClassifier.classify_error(&e);
        assert_eq!(c.outcome, Outcome::Transport(TransportKind::Connect));
        assert!(c.retryable);
    }

    #[tokio::test]
    async fn reqwests_own_timeout_is_classified_as_a_timeout() {
        // A listener that accepts and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                open.push(s);
            }
        });
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_millis(50))
            .build()
            .unwrap();
        let mut svc = ReqwestService::new(client);
        let req = http::Request::get(format!("http://{addr}/"))
            .body(String::new())
            .unwrap();
        let e = Service::call(&mut svc, req).await.unwrap_err();
        assert!(e.is_timeout(), "{e:?}");
        let c = DefaultClassifier.classify_error(&e);
        assert_eq!(c.outcome, Outcome::Transport(TransportKind::Timeout));
    }

    #[tokio::test]
    async fn a_uri_reqwest_cannot_send_is_an_error_not_a_panic() {
        let mut svc = ReqwestService::new(reqwest::Client::new());
        let req = http::Request::get("/relative/only")
            .body(String::new())
            .unwrap();
        let e = Service::call(&mut svc, req).await.unwrap_err();
        assert!(e.get_ref().is_builder(), "{e:?}");
        assert_eq!(DefaultClassifier.classify_error(&e).outcome, Outcome::Fatal);
    }
}
