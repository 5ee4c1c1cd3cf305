//! Estimating what a request will cost.

use super::Cost;
use bytes::Bytes;
use http::{Extensions, HeaderMap};
use http_body::Body;
use serde_json::Value;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Estimates a request's [`Cost`] before it is sent. A closure
/// `Fn(&HeaderMap, &Extensions, Option<&[u8]>) -> Cost` is an estimator too. A [`Cost`] in the
/// request extensions always wins over the estimator.
pub trait Estimate: Send + Sync + 'static {
    /// The cost of a request with these headers, extensions and (when the body type exposes it)
    /// body bytes.
    fn estimate(&self, headers: &HeaderMap, extensions: &Extensions, body: Option<&[u8]>) -> Cost;
}

impl<F> Estimate for F
where
    F: Fn(&HeaderMap, &Extensions, Option<&[u8]>) -> Cost + Send + Sync + 'static,
{
    fn estimate(&self, headers: &HeaderMap, extensions: &Extensions, body: Option<&[u8]>) -> Cost {
        self(headers, extensions, body)
    }
}

/// The default estimator, for Messages-shaped JSON bodies (`messages`, `system`, `max_tokens`):
/// input tokens from the characters of text (one token per `chars_per_token` characters, rounded
/// up, plus 4 per message and 3 per request for the framing), output tokens reserved as
/// `max_tokens` (the most the request can use; the real usage settles it afterwards). A body it
/// cannot read costs one request and `default_max_tokens` of output.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MessagesEstimator {
    /// Characters per token. Default 4, the usual rule of thumb for English text; lower it to
    /// reserve more for code or other languages.
    pub chars_per_token: f64,
    /// The output reservation when the body has no `max_tokens`. Default 4096.
    pub default_max_tokens: u64,
}

impl Default for MessagesEstimator {
    fn default() -> Self {
        Self {
            chars_per_token: 4.0,
            default_max_tokens: 4096,
        }
    }
}

fn text_chars(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.chars().count() as u64,
        Value::Array(items) => items.iter().map(text_chars).sum(),
        Value::Object(o) => ["text", "content"]
            .iter()
            .filter_map(|k| o.get(*k))
            .map(text_chars)
            .sum(),
        _ => 0,
    }
}

impl Estimate for MessagesEstimator {
    fn estimate(&self, _: &HeaderMap, _: &Extensions, body: Option<&[u8]>) -> Cost {
        let parsed = body.and_then(|b| serde_json::from_slice::<Value>(b).ok());
        let Some(Value::Object(o)) = parsed else {
            return Cost::new(0, self.default_max_tokens);
        };
        let messages = o.get("messages").and_then(Value::as_array);
        let chars: u64 = messages.map_or(0, |m| {
            m.iter()
                .map(|msg| msg.get("content").map_or(0, text_chars))
                .sum()
        }) + o.get("system").map_or(0, text_chars);
        let per = self.chars_per_token.max(0.1);
        let input =
            (chars as f64 / per).ceil() as u64 + 4 * messages.map_or(0, Vec::len) as u64 + 3;
        let output = o
            .get("max_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(self.default_max_tokens);
        Cost::new(input, output)
    }
}

/// Request bodies whose bytes the estimator can read without consuming them.
pub trait BodyBytes {
    /// The whole body, if it is in memory.
    fn body_bytes(&self) -> Option<Bytes>;
}

impl BodyBytes for () {
    fn body_bytes(&self) -> Option<Bytes> {
        None
    }
}

impl BodyBytes for String {
    fn body_bytes(&self) -> Option<Bytes> {
        Some(Bytes::copy_from_slice(self.as_bytes()))
    }
}

impl BodyBytes for Bytes {
    fn body_bytes(&self) -> Option<Bytes> {
        Some(self.clone())
    }
}

impl BodyBytes for Vec<u8> {
    fn body_bytes(&self) -> Option<Bytes> {
        Some(Bytes::copy_from_slice(self))
    }
}

impl BodyBytes for &'static str {
    fn body_bytes(&self) -> Option<Bytes> {
        Some(Bytes::from_static(self.as_bytes()))
    }
}

impl<D> BodyBytes for http_body_util::Empty<D> {
    fn body_bytes(&self) -> Option<Bytes> {
        Some(Bytes::new())
    }
}

impl BodyBytes for http_body_util::Full<Bytes> {
    fn body_bytes(&self) -> Option<Bytes> {
        // `Full` yields its one frame at once: poll a clone with a no-op waker.
        let mut copy = self.clone();
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(&mut copy).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => frame.into_data().ok(),
            Poll::Ready(None) => Some(Bytes::new()),
            _ => None,
        }
    }
}

impl<B> BodyBytes for crate::retry::ReplayBody<B> {
    fn body_bytes(&self) -> Option<Bytes> {
        self.buffered()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    #[test]
    fn messages_bodies() {
        let e = MessagesEstimator::default();
        let body = br#"{"model":"m","max_tokens":300,"system":"abcd",
            "messages":[{"role":"user","content":"abcdefgh"},
                        {"role":"assistant","content":[{"type":"text","text":"abcd"}]}]}"#;
        let c = e.estimate(&HeaderMap::new(), &Extensions::new(), Some(body));
        assert_eq!(c, Cost::new(4 + 8 + 3, 300));
        let c = e.estimate(&HeaderMap::new(), &Extensions::new(), Some(b"not json"));
        assert_eq!(c, Cost::new(0, 4096));
        let c = e.estimate(&HeaderMap::new(), &Extensions::new(), None);
        assert_eq!(c.requests, 1);
    }

    #[test]
    fn body_bytes_without_consuming() {
        let full = Full::new(Bytes::from_static(b"abc"));
        assert_eq!(full.body_bytes().unwrap(), "abc");
        assert_eq!(full.body_bytes().unwrap(), "abc");
        assert_eq!("x".to_owned().body_bytes().unwrap(), "x");
    }
}
