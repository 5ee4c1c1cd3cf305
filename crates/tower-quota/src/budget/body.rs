use super::Cost;
use super::reservation::ReservationHandle;
use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use serde_json::Value;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

/// The most of a JSON body kept to read its `usage` at the end.
const JSON_CAP: usize = 1 << 20;
/// The longest SSE line kept.
const LINE_CAP: usize = 1 << 20;

/// Reads `usage` from a Messages (or Chat Completions) response as it streams past.
#[derive(Debug, Default)]
pub(crate) struct Scanner {
    sse: bool,
    buf: Vec<u8>,
    overflow: bool,
    input: Option<u64>,
    output: Option<u64>,
}

impl Scanner {
    pub(crate) fn new(sse: bool) -> Self {
        Self {
            sse,
            ..Self::default()
        }
    }

    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        if self.overflow {
            // A JSON body past the cap is not read; in a stream, skip to the end of the overlong
            // line, then read on.
            if let Some(i) = chunk.iter().position(|&b| b == b'\n').filter(|_| self.sse) {
                self.overflow = false;
                self.feed(&chunk[i + 1..]);
            }
            return;
        }
        self.buf.extend_from_slice(chunk);
        if self.sse {
            while let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                self.line(&line);
            }
            if self.buf.len() > LINE_CAP {
                self.buf.clear();
                self.overflow = true;
            }
        } else if self.buf.len() > JSON_CAP {
            self.buf = Vec::new();
            self.overflow = true;
        }
    }

    fn line(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        if !contains(data, b"usage") {
            return;
        }
        if let Ok(v) = serde_json::from_slice::<Value>(data.trim_ascii()) {
            self.take_usage(&v);
        }
    }

    fn take_usage(&mut self, v: &Value) {
        for usage in [
            v.get("usage"),
            v.get("message").and_then(|m| m.get("usage")),
        ]
        .into_iter()
        .flatten()
        {
            // A server's absurd counts are clamped (and logged), never wrapped.
            let n = |k: &str| usage.get(k).and_then(Value::as_u64).map(clamp_usage);
            let input = n("input_tokens")
                .map(|i| {
                    clamp_usage(i.saturating_add(n("cache_creation_input_tokens").unwrap_or(0)))
                })
                .or(n("prompt_tokens"));
            if let Some(i) = input {
                self.input = Some(self.input.map_or(i, |x| x.max(i)));
            }
            if let Some(o) = n("output_tokens").or(n("completion_tokens")) {
                // Anthropic's message_delta carries the cumulative count.
                self.output = Some(self.output.map_or(o, |x| x.max(o)));
            }
        }
    }

    /// Reads what is left at the end of the body.
    pub(crate) fn finish(&mut self) {
        if self.sse {
            let rest = std::mem::take(&mut self.buf);
            self.line(&rest);
        } else if !self.overflow {
            if let Ok(v) = serde_json::from_slice::<Value>(&self.buf) {
                self.take_usage(&v);
            }
            self.buf = Vec::new();
        }
    }

    /// The usage seen, filling what was not seen from `estimate`.
    pub(crate) fn usage(&self, estimate: Cost) -> Option<Cost> {
        if self.input.is_none() && self.output.is_none() {
            return None;
        }
        Some(Cost {
            requests: estimate.requests,
            input_tokens: self.input.unwrap_or(estimate.input_tokens),
            output_tokens: self.output.unwrap_or(estimate.output_tokens),
        })
    }

    fn complete(&self) -> bool {
        self.input.is_some() && self.output.is_some()
    }
}

/// The most tokens one response may report: 2^40 (about 10^12, far beyond any context window).
/// A count over it is a server's bug or an attack; it is charged as this much, and logged.
const MAX_USAGE: u64 = 1 << 40;

fn clamp_usage(n: u64) -> u64 {
    if n > MAX_USAGE {
        tracing::warn!(
            reported = n,
            charged = MAX_USAGE,
            "budget: absurd usage clamped"
        );
        return MAX_USAGE;
    }
    n
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

pin_project! {
    /// A response body that reads the real usage as it passes and settles the request's reservation
    /// when the body ends (or when it is dropped after the usage was seen).
    pub struct BudgetBody<B> {
        #[pin]
        inner: B,
        scanner: Scanner,
        handle: Option<ReservationHandle>,
    }

    impl<B> PinnedDrop for BudgetBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(h) = this.handle.take() {
                if this.scanner.complete() {
                    if let Some(u) = this.scanner.usage(h.estimate()) {
                        h.settle(u);
                    }
                }
            }
        }
    }
}

impl<B> BudgetBody<B> {
    pub(crate) fn new(inner: B, handle: Option<ReservationHandle>, sse: bool) -> Self {
        Self {
            inner,
            scanner: Scanner::new(sse),
            handle,
        }
    }
}

impl<B: fmt::Debug> fmt::Debug for BudgetBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BudgetBody")
            .field("inner", &self.inner)
            .field("reservation", &self.handle)
            .finish()
    }
}

impl<B> Body for BudgetBody<B>
where
    B: Body,
    B::Data: Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let (Some(data), Some(_)) = (f.data_ref(), this.handle.as_ref()) {
                    this.scanner.feed(data.chunk());
                }
            }
            None => {
                if let Some(h) = this.handle.take() {
                    this.scanner.finish();
                    if let Some(u) = this.scanner.usage(h.estimate()) {
                        h.settle(u);
                    }
                }
            }
            // A broken body keeps its estimate.
            Some(Err(_)) => *this.handle = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_usage() {
        let mut s = Scanner::new(false);
        let body = br#"{"id":"x","usage":{"input_tokens":12,"output_tokens":30}}"#;
        s.feed(&body[..10]);
        s.feed(&body[10..]);
        s.finish();
        assert_eq!(s.usage(Cost::new(1, 100)), Some(Cost::new(12, 30)));
        let mut s = Scanner::new(false);
        s.feed(br#"{"usage":{"prompt_tokens":5,"completion_tokens":7}}"#);
        s.finish();
        assert_eq!(s.usage(Cost::new(1, 100)), Some(Cost::new(5, 7)));
        let mut s = Scanner::new(false);
        s.feed(b"garbage");
        s.finish();
        assert_eq!(s.usage(Cost::new(1, 100)), None);
    }

    #[test]
    fn sse_usage_split_across_chunks() {
        let stream = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"hi\"}}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n",
        );
        let mut s = Scanner::new(true);
        for chunk in stream.as_bytes().chunks(7) {
            s.feed(chunk);
        }
        s.finish();
        assert_eq!(s.usage(Cost::new(100, 100)), Some(Cost::new(25, 15)));
        assert!(s.complete());
    }
}
