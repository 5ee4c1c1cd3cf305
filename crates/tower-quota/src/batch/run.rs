//! A batch's life once submitted: the create call, the polls, the results read as a stream, and
//! each caller's answer.

use super::Batched;
use super::error::{BatchError, Kind};
use super::state::{Answer, Group, Item, Shared};
use super::state::{BatchStatus, RequestCounts};
use crate::BoxError;
use crate::collect;
use crate::pack::{PackInner, PackRequestBody};
use bytes::{Buf as _, Bytes, BytesMut};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tower::ServiceExt;

/// The URI of `path` on the host of `head`.
fn uri(head: &http::request::Parts, path: &str) -> Option<Uri> {
    let mut parts = head.uri.clone().into_parts();
    parts.path_and_query = Some(path.parse().ok()?);
    Uri::from_parts(parts).ok()
}

/// A request to the batch endpoints with the group's headers.
fn call<B: From<Bytes>>(
    head: &http::request::Parts,
    method: http::Method,
    path: &str,
    body: Bytes,
) -> Option<Request<B>> {
    let mut req = Request::new(B::from(body));
    *req.method_mut() = method;
    *req.uri_mut() = uri(head, path)?;
    *req.headers_mut() = head.headers.clone();
    req.headers_mut().remove(http::header::CONTENT_LENGTH);
    Some(req)
}

/// A response read whole.
async fn read<S: PackInner<B>, B: PackRequestBody>(
    inner: S,
    req: Request<B>,
) -> Result<(http::response::Parts, Bytes), BoxError> {
    let res = inner.oneshot(req).await.map_err(Into::into)?;
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.map_err(Into::into)?.to_bytes();
    Ok((parts, bytes))
}

fn fail_all(callers: HashMap<String, Answer>, e: &str) {
    for (_, tx) in callers {
        let _ = tx.send(Err(Box::new(BatchError::new(Kind::Failed, e.to_owned()))));
    }
}

/// The create call's body, `{"requests":[{"custom_id":..,"params":..},..]}`, written straight
/// from the items; each item's parsed request is dropped as it is written, so nothing of the
/// requests but their `custom_id`s outlives the submission (a batch lives for hours).
fn create_body(items: Vec<Item>, bytes: usize) -> (Bytes, HashMap<String, Answer>) {
    let mut body = Vec::with_capacity(bytes + 16);
    let mut callers = HashMap::with_capacity(items.len());
    body.extend_from_slice(b"{\"requests\":[");
    for (k, item) in items.into_iter().enumerate() {
        if k > 0 {
            body.push(b',');
        }
        body.extend_from_slice(b"{\"custom_id\":");
        serde_json::to_writer(&mut body, &item.custom_id).expect("a string serializes");
        body.extend_from_slice(b",\"params\":");
        serde_json::to_writer(&mut body, &item.params).expect("a JSON value serializes");
        body.push(b'}');
        callers.insert(item.custom_id, item.tx);
    }
    body.extend_from_slice(b"]}");
    (Bytes::from(body), callers)
}

/// Submits a batch, polls it, and answers its callers from its results.
pub(super) async fn submit<S: PackInner<B>, B: PackRequestBody>(
    inner: S,
    shared: Arc<Shared>,
    group: Group,
) {
    let stats = &shared.stats;
    stats.queued.fetch_sub(group.items.len(), Ordering::SeqCst);
    // A caller that gave up before submission is left out.
    let items: Vec<Item> = group
        .items
        .into_iter()
        .filter(|i| !i.tx.is_closed())
        .collect();
    if items.is_empty() {
        return;
    }
    let n = items.len();
    let (body, mut callers) = create_body(items, group.bytes);
    let head = group.head;
    let Some(req) = call::<B>(&head, http::Method::POST, "/v1/messages/batches", body) else {
        return fail_all(callers, "the request's URI has no host to send a batch to");
    };
    let (parts, bytes) = match read(inner.clone(), req).await {
        Ok(r) => r,
        Err(e) => return fail_all(callers, &e.to_string()),
    };
    if !parts.status.is_success() {
        // The create call's own answer (after the stack inside gave up), to every caller.
        for (_, tx) in callers {
            let _ = tx.send(Ok(collect::copy_of(&parts, &bytes)));
        }
        return;
    }
    let batch: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let Some(id) = batch["id"].as_str().map(str::to_owned) else {
        return fail_all(callers, "the create call's answer has no batch id");
    };
    stats.submitted.fetch_add(1, Ordering::Relaxed);
    stats.in_flight.fetch_add(1, Ordering::SeqCst);
    shared.live().push(BatchStatus {
        id: id.clone(),
        requests: n,
        counts: RequestCounts {
            processing: n as u64,
            ..RequestCounts::default()
        },
        delivering: false,
    });
    tracing::debug!(batch = %id, requests = n, "batch: submitted");
    let ended = poll(inner.clone(), &shared, &head, &id, &mut callers).await;
    if let Some(results_url) = ended {
        deliver(inner, &shared, &head, &id, &results_url, &mut callers).await;
    }
    for (_, tx) in callers {
        let _ = tx.send(Err(Box::new(BatchError::new(
            Kind::Failed,
            format!("batch {id} gave no result for this request"),
        ))));
    }
    shared.live().retain(|b| b.id != id);
    stats.in_flight.fetch_sub(1, Ordering::SeqCst);
}

/// Polls until the batch ends: its results URL, or `None` when every caller left (it is then
/// canceled).
async fn poll<S: PackInner<B>, B: PackRequestBody>(
    inner: S,
    shared: &Shared,
    head: &http::request::Parts,
    id: &str,
    callers: &mut HashMap<String, Answer>,
) -> Option<String> {
    let c = &shared.config;
    let mut wait = c.first_poll;
    loop {
        let jitter = wait.mul_f64(0.1 * rand::random::<f64>());
        tokio::time::sleep(wait + jitter).await;
        wait = wait.mul_f64(1.5).min(c.max_poll);
        callers.retain(|_, tx| !tx.is_closed());
        if callers.is_empty() {
            let path = format!("/v1/messages/batches/{id}/cancel");
            if let Some(req) = call::<B>(head, http::Method::POST, &path, Bytes::from_static(b"{}"))
            {
                let _ = read(inner.clone(), req).await;
            }
            shared.stats.canceled.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(batch = %id, "batch: every caller gone, canceled");
            return None;
        }
        let path = format!("/v1/messages/batches/{id}");
        let req = call::<B>(head, http::Method::GET, &path, Bytes::new())?;
        shared.stats.polls.fetch_add(1, Ordering::Relaxed);
        let Ok((parts, bytes)) = read(inner.clone(), req).await else {
            continue;
        };
        let signals =
            crate::signals::Signals::parse_now(&parts.headers, &crate::signals::SystemClock);
        if let Some(after) = signals.hint().map(|h| h.delay) {
            // Never earlier than the endpoint asked.
            wait = wait.max(after);
        }
        if !parts.status.is_success() {
            continue;
        }
        let batch: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        tracing::trace!(batch = %id, counts = %batch["request_counts"], "batch: polled");
        let ended = batch["processing_status"] == "ended";
        if let Some(counts) = RequestCounts::from_json(&batch["request_counts"]) {
            shared.update(id, |b| {
                b.counts = counts;
                b.delivering = ended;
            });
        }
        if ended {
            let url = batch["results_url"].as_str().map_or_else(
                || format!("/v1/messages/batches/{id}/results"),
                str::to_owned,
            );
            tracing::debug!(batch = %id, "batch: ended");
            return Some(url);
        }
    }
}

/// Reads the results file line by line as it arrives and answers each caller.
async fn deliver<S: PackInner<B>, B: PackRequestBody>(
    inner: S,
    shared: &Shared,
    head: &http::request::Parts,
    id: &str,
    results_url: &str,
    callers: &mut HashMap<String, Answer>,
) {
    let path = match results_url.parse::<Uri>() {
        Ok(u) => u
            .path_and_query()
            .map_or(results_url.to_owned(), |p| p.to_string()),
        Err(_) => results_url.to_owned(),
    };
    let Some(req) = call::<B>(head, http::Method::GET, &path, Bytes::new()) else {
        return;
    };
    let Ok(res) = inner.oneshot(req).await else {
        return;
    };
    if !res.status().is_success() {
        return;
    }
    let headers = res.headers().clone();
    let mut body = std::pin::pin!(res.into_body());
    let mut line = BytesMut::new();
    loop {
        let frame = match body.frame().await {
            Some(Ok(f)) => f,
            Some(Err(_)) | None => break,
        };
        let Ok(mut data) = frame.into_data() else {
            continue;
        };
        let chunk = data.copy_to_bytes(data.remaining());
        for piece in chunk.split_inclusive(|&b| b == b'\n') {
            line.extend_from_slice(piece);
            if line.ends_with(b"\n") {
                answer(shared, id, &headers, &line, callers);
                line.clear();
            }
        }
    }
    if !line.is_empty() {
        answer(shared, id, &headers, &line, callers);
    }
}

/// Answers the caller of one results line.
fn answer(
    shared: &Shared,
    id: &str,
    headers: &http::HeaderMap,
    line: &[u8],
    callers: &mut HashMap<String, Answer>,
) {
    let Ok(v) = serde_json::from_slice::<Value>(line) else {
        return;
    };
    let Some((custom_id, tx)) = v["custom_id"]
        .as_str()
        .and_then(|c| callers.remove_entry(c))
    else {
        return;
    };
    let result = &v["result"];
    let (status, body) = match result["type"].as_str() {
        Some("succeeded") => (StatusCode::OK, &result["message"]),
        Some("errored") => {
            let error = &result["error"];
            let kind = error["error"]["type"].as_str().unwrap_or("api_error");
            (status_of(kind), error)
        }
        Some("canceled") => {
            let _ = tx.send(Err(Box::new(BatchError::new(Kind::Canceled, ""))));
            return;
        }
        _ => {
            let _ = tx.send(Err(Box::new(BatchError::new(Kind::Expired, ""))));
            return;
        }
    };
    let mut res = Response::new(Full::new(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if let Some(r) = headers.get("request-id") {
        res.headers_mut().insert("request-id", r.clone());
    }
    res.extensions_mut().insert(Batched {
        batch_id: id.to_owned(),
        custom_id,
    });
    if tx.send(Ok(res)).is_ok() {
        shared.stats.delivered.fetch_add(1, Ordering::Relaxed);
    }
}

/// The HTTP status `/v1/messages` answers an error of this type with.
fn status_of(kind: &str) -> StatusCode {
    let code = match kind {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "billing_error" => 402,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "overloaded_error" => 529,
        "timeout_error" => 504,
        _ => 500,
    };
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}
