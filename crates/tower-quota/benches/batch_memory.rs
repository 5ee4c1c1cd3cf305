//! The heap the batch layer holds while it delivers the results of a 100 000-request batch,
//! counted by dhat's allocator.
//!
//! Run with: `cargo bench -p tower-quota --bench batch_memory`
//!
//! The inner service is a stand-in for the Message Batches endpoints that keeps no copy of the
//! results: it answers the create call (keeping the `custom_id`s), says the batch ended at the
//! first poll, and writes the results file on demand, 64 lines a frame, each frame after one
//! `Pending` (as a socket would), so the results file never exists whole anywhere. Every caller
//! reads its answer and drops it. The main figure is the highest heap seen while the file is
//! read, less the heap when its first frame was asked for: what delivery adds, callers holding
//! nothing. Also printed: the heap at the create call and while the batch runs (per waiting
//! caller), each above the heap before the first caller was spawned.
#![allow(missing_docs)]

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tower::{Layer, ServiceExt, service_fn};
use tower_quota::batch::BatchLayer;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const N: usize = 100_000;
/// Lines a frame of the results file.
const LINES_PER_FRAME: usize = 64;

/// The heap when the first frame was asked for, and the highest seen after.
static AT_START: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static FILE_BYTES: AtomicUsize = AtomicUsize::new(0);
/// The heap at the create call, and at the first poll (the batch submitted, its callers waiting).
static AT_CREATE: AtomicUsize = AtomicUsize::new(0);
static AT_POLL: AtomicUsize = AtomicUsize::new(0);
static FILE_BYTES_CREATE: AtomicUsize = AtomicUsize::new(0);

fn heap() -> usize {
    dhat::HeapStats::get().curr_bytes
}

/// A short answer for a small JSON call, or the results file written as it is read.
enum ResBody {
    Whole(Option<Bytes>),
    Results {
        ids: Arc<Vec<String>>,
        next: usize,
        ready: bool,
    },
}

/// One results line: a succeeded message with a 1 KB text.
fn line(custom_id: &str, i: usize) -> String {
    let message = json!({
        "id": format!("msg_{i:024}"),
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-5-5",
        "content": [{"type": "text", "text": "x".repeat(1_000)}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {"input_tokens": 12, "output_tokens": 250},
    });
    let mut s = json!({
        "custom_id": custom_id,
        "result": {"type": "succeeded", "message": message},
    })
    .to_string();
    s.push('\n');
    s
}

impl Body for ResBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ResBody::Whole(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ResBody::Results { ids, next, ready } => {
                let now = heap();
                if *next == 0 && AT_START.load(Ordering::Relaxed) == 0 {
                    AT_START.store(now, Ordering::Relaxed);
                }
                PEAK.fetch_max(now, Ordering::Relaxed);
                if *next >= ids.len() {
                    return Poll::Ready(None);
                }
                // As a socket: a frame is not there on every poll.
                if !*ready {
                    *ready = true;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                *ready = false;
                let end = (*next + LINES_PER_FRAME).min(ids.len());
                // In the order opposite to the create call's: results come in any order.
                let mut chunk = String::new();
                for i in *next..end {
                    let k = ids.len() - 1 - i;
                    chunk.push_str(&line(&ids[k], k));
                }
                *next = end;
                FILE_BYTES.fetch_add(chunk.len(), Ordering::Relaxed);
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
            }
        }
    }
}

fn whole(v: Value) -> Response<ResBody> {
    Response::new(ResBody::Whole(Some(Bytes::from(v.to_string()))))
}

fn main() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let ids: Arc<Mutex<Arc<Vec<String>>>> = Arc::default();
        let seen = ids.clone();
        let endpoints = service_fn(move |req: Request<Full<Bytes>>| {
            let ids = seen.clone();
            async move {
                let path = req.uri().path().to_owned();
                let res = if path == "/v1/messages/batches" {
                    AT_CREATE.store(heap(), Ordering::Relaxed);
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    FILE_BYTES_CREATE.store(body.len(), Ordering::Relaxed);
                    let v: Value = serde_json::from_slice(&body).unwrap();
                    let got: Vec<String> = v["requests"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| r["custom_id"].as_str().unwrap().to_owned())
                        .collect();
                    *ids.lock().unwrap() = Arc::new(got);
                    whole(json!({"id": "msgbatch_bench", "processing_status": "in_progress"}))
                } else if path.ends_with("/results") {
                    let ids = ids.lock().unwrap().clone();
                    Response::new(ResBody::Results {
                        ids,
                        next: 0,
                        ready: false,
                    })
                } else {
                    if AT_POLL.load(Ordering::Relaxed) == 0 {
                        AT_POLL.store(heap(), Ordering::Relaxed);
                    }
                    whole(json!({
                        "id": "msgbatch_bench",
                        "processing_status": "ended",
                        "results_url": "http://api.test/v1/messages/batches/msgbatch_bench/results",
                    }))
                };
                Ok::<_, Infallible>(res)
            }
        });
        let api = BatchLayer::new()
            .all(true)
            .max_requests(N)
            .max_bytes(BatchLayer::API_MAX_BYTES)
            .layer(endpoints);
        let before = heap();
        let mut callers = tokio::task::JoinSet::new();
        for i in 0..N {
            let body = format!(
                r#"{{"model":"claude-sonnet-5-5","max_tokens":256,"messages":[{{"role":"user","content":"Classify item {i}."}}]}}"#
            );
            let req = Request::post("http://api.test/v1/messages")
                .header("x-api-key", "sk-bench")
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let api = api.clone();
            callers.spawn(async move {
                let res = api.oneshot(req).await.unwrap();
                assert_eq!(res.status(), 200);
                // Read and dropped: the caller holds nothing.
                res.into_body().collect().await.unwrap().to_bytes().len()
            });
        }
        let spawned = heap();
        let mut answered = 0usize;
        while let Some(len) = callers.join_next().await {
            assert!(len.unwrap() > 1_000);
            answered += 1;
        }
        assert_eq!(answered, N);
        let start = AT_START.load(Ordering::Relaxed);
        let peak = PEAK.load(Ordering::Relaxed);
        let mb = |b: usize| b.saturating_sub(before) as f64 / (1 << 20) as f64;
        let each = |b: usize| b.saturating_sub(before) as f64 / N as f64 / 1024.0;
        let polled = AT_POLL.load(Ordering::Relaxed);
        println!(
            "{N} callers spawned, none run yet: {:.1} MB ({:.2} KB each: the bench's own tasks \
             and requests)",
            mb(spawned),
            each(spawned)
        );
        println!(
            "at the create call: {:.1} MB (the create body, {:.1} MB, included)",
            mb(AT_CREATE.load(Ordering::Relaxed)),
            FILE_BYTES_CREATE.load(Ordering::Relaxed) as f64 / (1 << 20) as f64
        );
        println!(
            "while the batch runs (its first poll): {:.1} MB ({:.2} KB a waiting caller: its \
             task, its answer's channel, its custom_id)",
            mb(polled),
            each(polled)
        );
        println!(
            "delivering {N} results ({:.0} MB of JSONL): at most +{:.2} MB above the heap when \
             delivery began, every caller reading and dropping its answer",
            FILE_BYTES.load(Ordering::Relaxed) as f64 / (1 << 20) as f64,
            peak.saturating_sub(start) as f64 / (1 << 20) as f64,
        );
        assert!(
            peak.saturating_sub(start) < 8 << 20,
            "delivery held {:.1} MB",
            mb(peak - start + before)
        );
        // A waiting caller holds its answer's channel and custom_id, not its request: the
        // layer once kept a parsed copy of every request for the batch's whole life (3 KB).
        assert!(each(polled) < 1.5, "{:.2} KB a waiting caller", each(polled));
    });
}
