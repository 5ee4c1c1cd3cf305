//! The simulator as an in-process `tower::Service`.

use crate::api::{self, MessagesRequest};
use crate::audit::{AuditOutcome, AuditRecord, Summary};
use crate::body::{InFlight, SimBody};
use crate::bucket::TokenBucket;
use crate::config::{Dialect, Limits, RetryAfterStyle, SimConfig};
use crate::{BoxError, fingerprint};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, DATE, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// The simulated API. Cloning is cheap and every clone shares one state (buckets, audit, random
/// source), as clients of one server do.
///
/// Under `#[tokio::test(start_paused = true)]` everything it does runs on virtual time: buckets
/// refill, latency elapses and streams pace themselves with `tokio::time`.
#[derive(Clone)]
pub struct Simulator {
    shared: Arc<Shared>,
}

struct Shared {
    config: SimConfig,
    start: Instant,
    wall_start: SystemTime,
    in_flight: Arc<AtomicUsize>,
    /// The server-side concurrency cap (0: none); changeable while running.
    max_concurrency: AtomicUsize,
    /// The configuration's scheduled events, in time order.
    events: Vec<(Duration, Event)>,
    state: Mutex<State>,
    /// The Message Batches API's batches.
    batches: Mutex<crate::batch::Batches>,
}

struct State {
    keys: HashMap<String, KeyState>,
    /// Each key's `count_tokens` bucket, and the calls counted (every answer, 429s included).
    counting: HashMap<String, TokenBucket>,
    /// Each key's bucket of calls to the Message Batches endpoints.
    batching: HashMap<String, TokenBucket>,
    /// Until when each key was told to keep off the Message Batches endpoints (its last 429).
    batch_cooldown: HashMap<String, Instant>,
    count_calls: u64,
    rng: StdRng,
    audit: Vec<AuditRecord>,
    next_id: u64,
}

struct KeyState {
    fingerprint: String,
    rpm: Option<TokenBucket>,
    itpm: Option<TokenBucket>,
    otpm: Option<TokenBucket>,
    tpm: Option<TokenBucket>,
    /// The cooldown announced to this key: (when it started, when it ends).
    cooldown: Option<(Instant, Instant)>,
    /// How many of the configuration's scheduled events (limit changes, the other client's start
    /// and stop) this key has been through.
    events_done: usize,
}

impl KeyState {
    fn new(key: &str, limits: Limits, now: Instant) -> Self {
        let b = |l: Option<u64>| l.map(|l| TokenBucket::per_minute(l, limits.burst_fraction, now));
        Self {
            fingerprint: fingerprint(key),
            rpm: b(limits.rpm),
            itpm: b(limits.itpm),
            otpm: b(limits.otpm),
            tpm: b(limits.tpm),
            cooldown: None,
            events_done: 0,
        }
    }

    /// Applies the scheduled events due by `now`, each at its own time.
    fn catch_up(
        &mut self,
        cfg: &SimConfig,
        events: &[(Duration, Event)],
        start: Instant,
        now: Instant,
    ) {
        while let Some(&(at, event)) = events.get(self.events_done) {
            // An event too far away to name never comes.
            let Some(t) = start.checked_add(at).filter(|&t| t <= now) else {
                break;
            };
            self.events_done += 1;
            match event {
                Event::LimitChange(i) => {
                    let new = cfg.limit_changes[i].1;
                    for (bucket, limit) in [
                        (&mut self.rpm, new.rpm),
                        (&mut self.itpm, new.itpm),
                        (&mut self.otpm, new.otpm),
                        (&mut self.tpm, new.tpm),
                    ] {
                        *bucket = match (bucket.take(), limit) {
                            (Some(mut b), Some(l)) => {
                                b.rescale(l, new.burst_fraction, t);
                                Some(b)
                            }
                            (None, Some(l)) => {
                                Some(TokenBucket::per_minute(l, new.burst_fraction, t))
                            }
                            (_, None) => None,
                        };
                    }
                }
                Event::Background(on) => {
                    let bg = cfg.background.unwrap_or_default();
                    let rate = |r: u64| if on { r } else { 0 };
                    for (bucket, r) in [
                        (&mut self.rpm, rate(bg.rpm)),
                        (&mut self.itpm, rate(bg.itpm)),
                        (&mut self.otpm, rate(bg.otpm)),
                        (&mut self.tpm, rate(bg.itpm.saturating_add(bg.otpm))),
                    ] {
                        if let Some(b) = bucket {
                            b.set_drain(r, t);
                        }
                    }
                }
            }
        }
    }
}

/// A scheduled change to every key.
#[derive(Clone, Copy, Debug)]
enum Event {
    /// The limits become `limit_changes[i]`.
    LimitChange(usize),
    /// The other client starts (`true`) or stops.
    Background(bool),
}

/// The configuration's scheduled events, in time order.
fn scheduled(cfg: &SimConfig) -> Vec<(Duration, Event)> {
    let mut events: Vec<(Duration, Event)> = cfg
        .limit_changes
        .iter()
        .enumerate()
        .map(|(i, &(at, _))| (at, Event::LimitChange(i)))
        .collect();
    if let Some(bg) = cfg.background {
        events.push((bg.from, Event::Background(true)));
        events.push((bg.until, Event::Background(false)));
    }
    events.sort_by_key(|&(at, _)| at);
    events
}

impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulator")
            .field("config", &self.shared.config)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// What the simulator decided for one request.
enum Decision {
    /// Answer now (after `delay`) with this status and JSON body.
    Reply {
        status: StatusCode,
        body: serde_json::Value,
        headers: HeaderMap,
        delay: Duration,
    },
    /// Admitted: generate the answer.
    Admit(Box<Admitted>),
}

struct Admitted {
    id: String,
    req: MessagesRequest,
    input: u64,
    output: u64,
    headers: HeaderMap,
    latency: Duration,
    reset: bool,
    stream_error: bool,
    /// The reply's text when the prompt was packed (else the default filler).
    text: Option<String>,
    in_flight: InFlight,
}

impl Simulator {
    /// A simulator with `config`. Call it inside a tokio runtime (its clock starts now).
    pub fn new(config: SimConfig) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        let cap = config.max_concurrency.unwrap_or(0);
        let events = scheduled(&config);
        Self {
            shared: Arc::new(Shared {
                config,
                start: Instant::now(),
                wall_start: SystemTime::now(),
                in_flight: Arc::new(AtomicUsize::new(0)),
                max_concurrency: AtomicUsize::new(cap),
                events,
                state: Mutex::new(State {
                    keys: HashMap::new(),
                    counting: HashMap::new(),
                    batching: HashMap::new(),
                    batch_cooldown: HashMap::new(),
                    count_calls: 0,
                    rng,
                    audit: Vec::new(),
                    next_id: 0,
                }),
                batches: Mutex::default(),
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.shared.config
    }

    /// The simulator's wall clock: the real time it started plus tokio time since, so HTTP-dates
    /// advance with virtual time in paused tests.
    pub fn wall_now(&self) -> SystemTime {
        self.shared.wall_start + Instant::now().saturating_duration_since(self.shared.start)
    }

    /// Changes the server-side concurrency cap while running (`None`: no cap).
    pub fn set_max_concurrency(&self, cap: Option<usize>) {
        self.shared
            .max_concurrency
            .store(cap.unwrap_or(0), Ordering::SeqCst);
    }

    /// Requests being answered right now (streams count until their body ends).
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Every request seen so far.
    pub fn audit(&self) -> Vec<AuditRecord> {
        self.lock().audit.clone()
    }

    /// How many calls `POST /v1/messages/count_tokens` answered (refusals included); they are
    /// not in the audit, which is the Messages endpoint's.
    pub fn count_tokens_calls(&self) -> u64 {
        self.lock().count_calls
    }

    /// The summary of the audit.
    pub fn summary(&self) -> Summary {
        Summary::of(&self.lock().audit)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while the lock was held cannot leave the state half-written in a way that
        // matters for a simulator: keep serving.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn handle<B>(self, req: Request<B>) -> Result<Response<SimBody>, BoxError>
    where
        B: Body,
        B::Error: Into<BoxError>,
    {
        let arrival = Instant::now();
        let route = (req.method().clone(), req.uri().path().to_owned());
        match (&route.0, route.1.as_str()) {
            (&Method::GET, "/__audit") => {
                let body = serde_json::to_value(self.summary())?;
                return Ok(self.json(StatusCode::OK, &body, HeaderMap::new()));
            }
            (&Method::POST, "/v1/messages") => {}
            (&Method::POST, "/v1/messages/count_tokens") => return self.count_tokens(req).await,
            (_, path) if path.starts_with("/v1/messages/batches") => {
                return self.batches(req).await;
            }
            _ => {
                let d = self.record_only(arrival, None, AuditOutcome::NotFound);
                return self.finish(d).await;
            }
        }
        let key = api_key(req.headers());
        // The API's own request size limit: a larger body is refused, never buffered whole.
        let bytes = match http_body_util::Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                let d = self.record_only(arrival, key.as_deref(), AuditOutcome::TooLarge);
                return self.finish(d).await;
            }
            Err(e) => return Err(e),
        };
        let parsed = serde_json::from_slice::<MessagesRequest>(&bytes);
        let decision = self.decide(arrival, key, parsed);
        self.finish(decision).await
    }

    /// Calls to the Message Batches endpoints so far, and the requests received in batches.
    pub fn batch_calls(&self) -> crate::batch::BatchCalls {
        self.batch_state().calls
    }

    /// The caller's API key, or the 401 for a request without one (the endpoints outside the
    /// Messages audit).
    fn key_of(&self, headers: &HeaderMap) -> Result<String, Box<Response<SimBody>>> {
        api_key(headers).ok_or_else(|| {
            let body = api::error_body("authentication_error", "x-api-key header is required");
            Box::new(self.json(StatusCode::UNAUTHORIZED, &body, HeaderMap::new()))
        })
    }

    /// A 429 for an endpoint with a limit of its own: come back after `wait`, said in the
    /// configured Retry-After style.
    fn endpoint_429(&self, wait: Duration, what: &str) -> Response<SimBody> {
        let mut headers = HeaderMap::new();
        retry_after(
            &mut headers,
            self.shared.config.retry_after,
            wait,
            self.wall_now(),
        );
        let body = api::error_body(
            "rate_limit_error",
            &format!("This request would exceed the rate limit for {what}."),
        );
        self.json(StatusCode::TOO_MANY_REQUESTS, &body, headers)
    }

    /// The Message Batches API (see `batch.rs`).
    async fn batches<B>(self, req: Request<B>) -> Result<Response<SimBody>, BoxError>
    where
        B: Body,
        B::Error: Into<BoxError>,
    {
        let key = match self.key_of(req.headers()) {
            Ok(key) => key,
            Err(refused) => return Ok(*refused),
        };
        let base = req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map_or(String::new(), |h| format!("http://{h}"));
        let now = Instant::now();
        let refused = {
            let mut st = self.lock();
            let early = st
                .batch_cooldown
                .get(&key)
                .is_some_and(|&until| now < until);
            if early {
                self.batch_state().calls.early += 1;
            }
            endpoint_wait(&mut st.batching, &key, self.shared.config.batch_rpm)
        };
        if let Some(wait) = refused {
            self.batch_state().calls.refused += 1;
            let res = self.endpoint_429(wait, "the Message Batches API");
            if let Some(announced) = announced_wait(res.headers()) {
                self.lock().batch_cooldown.insert(key, now + announced);
            }
            return Ok(res);
        }
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let rest = path.trim_start_matches("/v1/messages/batches");
        let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
        let now = Instant::now();
        let cfg = &self.shared.config;
        let answer = match (&method, parts.as_slice()) {
            (&Method::POST, []) => {
                let bytes =
                    match http_body_util::Limited::new(req.into_body(), crate::batch::MAX_BYTES)
                        .collect()
                        .await
                    {
                        Ok(b) => b.to_bytes(),
                        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                            let body = api::error_body(
                                "request_too_large",
                                "Request exceeds the maximum allowed number of bytes.",
                            );
                            return Ok(self.json(
                                StatusCode::PAYLOAD_TOO_LARGE,
                                &body,
                                HeaderMap::new(),
                            ));
                        }
                        Err(e) => return Err(e),
                    };
                let judge = crate::batch::Judge {
                    output_fraction: cfg.output_fraction,
                    context_window: cfg.context_window,
                    max_output_tokens: cfg.max_output_tokens,
                    batch_rps: cfg.batch_rps,
                    batch_queue: cfg.batch_queue,
                    seed: cfg.seed,
                    wall: self.wall_now(),
                    base: &base,
                };
                self.batch_state().create(&key, &bytes, &judge, now)
            }
            (&Method::GET, []) => self.batch_state().list(&key, now, &base),
            (&Method::GET, [id]) => self.batch_state().retrieve(&key, id, now, &base),
            (&Method::DELETE, [id]) => self.batch_state().delete(&key, id, now),
            (&Method::POST, [id, "cancel"]) => self.batch_state().cancel(&key, id, now, &base),
            (&Method::GET, [id, "results"]) => match self.batch_state().results(&key, id, now) {
                Ok(lines) => {
                    let body = SimBody::full(Bytes::from(lines));
                    return Ok(self.response(
                        StatusCode::OK,
                        "application/x-jsonl",
                        HeaderMap::new(),
                        body,
                    ));
                }
                Err(answer) => answer,
            },
            _ => (404, api::error_body("not_found_error", "Not found")),
        };
        let status = StatusCode::from_u16(answer.0).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Ok(self.json(status, &answer.1, HeaderMap::new()))
    }

    fn batch_state(&self) -> std::sync::MutexGuard<'_, crate::batch::Batches> {
        self.shared
            .batches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// `POST /v1/messages/count_tokens`: the input tokens the Messages endpoint would count for
    /// the same body (`max_tokens` may be left out), counted as the context window check counts
    /// them. Limited per key by `count_tokens_rpm` alone (the real API counts tokens under limits
    /// of its own, apart from the Messages buckets) and not audited, only counted.
    async fn count_tokens<B>(self, req: Request<B>) -> Result<Response<SimBody>, BoxError>
    where
        B: Body,
        B::Error: Into<BoxError>,
    {
        let key = match self.key_of(req.headers()) {
            Ok(key) => key,
            Err(refused) => return Ok(*refused),
        };
        let refused = {
            let mut st = self.lock();
            st.count_calls += 1;
            endpoint_wait(&mut st.counting, &key, self.shared.config.count_tokens_rpm)
        };
        if let Some(wait) = refused {
            return Ok(self.endpoint_429(wait, "counting tokens"));
        }
        let bytes = req
            .into_body()
            .collect()
            .await
            .map_err(Into::into)?
            .to_bytes();
        let parsed = serde_json::from_slice::<Value>(&bytes).and_then(|mut v| {
            if let Some(o) = v.as_object_mut() {
                o.entry("max_tokens").or_insert(Value::from(0));
            }
            serde_json::from_value::<MessagesRequest>(v)
        });
        Ok(match parsed {
            Ok(r) => self.json(
                StatusCode::OK,
                &serde_json::json!({"input_tokens": api::input_tokens(&r)}),
                HeaderMap::new(),
            ),
            Err(e) => self.json(
                StatusCode::BAD_REQUEST,
                &api::error_body("invalid_request_error", &format!("invalid request: {e}")),
                HeaderMap::new(),
            ),
        })
    }

    fn record_only(&self, arrival: Instant, key: Option<&str>, outcome: AuditOutcome) -> Decision {
        let (status, kind, msg) = match outcome {
            AuditOutcome::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "x-api-key header is required",
            ),
            AuditOutcome::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                "Request exceeds the maximum allowed number of bytes (32 MB).",
            ),
            _ => (StatusCode::NOT_FOUND, "not_found_error", "Not found"),
        };
        let mut st = self.lock();
        st.audit.push(AuditRecord {
            arrival: arrival - self.shared.start,
            key: key.map(fingerprint).unwrap_or_default(),
            outcome,
            input_tokens: 0,
            output_tokens: 0,
            early: false,
        });
        Decision::Reply {
            status,
            body: api::error_body(kind, msg),
            headers: HeaderMap::new(),
            delay: self.error_latency(),
        }
    }

    fn error_latency(&self) -> Duration {
        self.shared.config.base_latency / 4
    }

    fn decide(
        &self,
        now: Instant,
        key: Option<String>,
        parsed: Result<MessagesRequest, serde_json::Error>,
    ) -> Decision {
        let Some(key) = key else {
            return self.record_only(now, None, AuditOutcome::Unauthorized);
        };
        let cfg = &self.shared.config;
        let wall = self.wall_now();
        let mut guard = self.lock();
        let st = &mut *guard;
        let ks = st
            .keys
            .entry(key.clone())
            .or_insert_with(|| KeyState::new(&key, cfg.limits_for(&key), self.shared.start));
        ks.catch_up(cfg, &self.shared.events, self.shared.start, now);
        let early = matches!(ks.cooldown, Some((issued, until))
            if now >= issued + cfg.early_grace && now < until);
        let mut record = AuditRecord {
            arrival: now - self.shared.start,
            key: ks.fingerprint.clone(),
            outcome: AuditOutcome::BadRequest,
            input_tokens: 0,
            output_tokens: 0,
            early,
        };
        let error_latency = self.error_latency();
        let reply = |record: AuditRecord,
                     audit: &mut Vec<AuditRecord>,
                     status: u16,
                     kind: &str,
                     msg: &str,
                     headers: HeaderMap| {
            audit.push(record);
            Decision::Reply {
                status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                body: api::error_body(kind, msg),
                headers,
                delay: error_latency,
            }
        };

        let req = match parsed {
            Ok(r) => r,
            Err(e) => {
                let msg = format!("invalid JSON body: {e}");
                return reply(
                    record,
                    &mut st.audit,
                    400,
                    "invalid_request_error",
                    &msg,
                    HeaderMap::new(),
                );
            }
        };
        let faults = cfg.faults;
        let mut draw = |p: f64| p > 0.0 && st.rng.random::<f64>() < p;
        if draw(faults.server_error) {
            record.outcome = AuditOutcome::ServerError;
            return reply(
                record,
                &mut st.audit,
                500,
                "api_error",
                "Internal server error",
                HeaderMap::new(),
            );
        }
        let cap = self.shared.max_concurrency.load(Ordering::SeqCst);
        let over_cap = cap > 0 && self.in_flight() >= cap;
        if draw(faults.overload) || over_cap {
            record.outcome = AuditOutcome::Overloaded;
            return reply(
                record,
                &mut st.audit,
                529,
                "overloaded_error",
                "Overloaded",
                HeaderMap::new(),
            );
        }
        let slow = draw(faults.slow);
        let reset = draw(faults.reset);
        let stream_error = req.stream && draw(faults.stream_error);

        let input = api::input_tokens(&req);
        if let Some(msg) = api::refusal(&req, input, cfg.context_window, cfg.max_output_tokens) {
            return reply(
                record,
                &mut st.audit,
                400,
                "invalid_request_error",
                &msg,
                HeaderMap::new(),
            );
        }
        let needs = [
            ("requests", ks.rpm.as_mut(), 1.0),
            ("input tokens", ks.itpm.as_mut(), input as f64),
            ("output tokens", ks.otpm.as_mut(), req.max_tokens as f64),
            (
                "tokens",
                ks.tpm.as_mut(),
                input.saturating_add(req.max_tokens) as f64,
            ),
        ];
        let mut wait = Duration::ZERO;
        for (name, bucket, need) in needs {
            let Some(bucket) = bucket else { continue };
            match bucket.wait_for(need, now) {
                Some(w) => wait = wait.max(w),
                None => {
                    let msg = format!(
                        "request needs {need} {name} but the {name} per minute limit is {}",
                        bucket.capacity()
                    );
                    return reply(
                        record,
                        &mut st.audit,
                        400,
                        "invalid_request_error",
                        &msg,
                        HeaderMap::new(),
                    );
                }
            }
        }
        if !wait.is_zero() {
            let mut headers = limit_headers(ks, now, wall, cfg.dialect);
            if let Some(announced) = retry_after(&mut headers, cfg.retry_after, wait, wall) {
                let until = now + announced;
                ks.cooldown = match ks.cooldown {
                    Some((issued, old)) if now < old => Some((issued, old.max(until))),
                    _ => Some((now, until)),
                };
            }
            record.outcome = AuditOutcome::RateLimited;
            let msg = "This request would exceed your organization's rate limit.";
            return reply(record, &mut st.audit, 429, "rate_limit_error", msg, headers);
        }

        // Admitted: the check was against max_tokens; the debit is the real output.
        let mut output = ((req.max_tokens as f64 * cfg.output_fraction).round() as u64)
            .clamp(1, req.max_tokens.max(1));
        // A packed prompt is answered by the protocol; its output is the answers' length.
        let text = match api::packed_items(&req).filter(|_| !req.stream) {
            None => None,
            Some(items) => {
                let pf = cfg.pack_faults;
                let mut draw = |p: f64| p > 0.0 && st.rng.random::<f64>() < p;
                let mut text = String::new();
                for (id, item) in &items {
                    if draw(pf.drop) {
                        continue;
                    }
                    let answer = api::packed_answer(item);
                    if draw(pf.garble) {
                        text.push_str(&format!("<answer id=\"{id}?\">\n{answer}\n\n"));
                        continue;
                    }
                    text.push_str(&format!("<answer id=\"{id}\">\n{answer}\n</answer>\n"));
                    if draw(pf.duplicate) {
                        let again = format!("<answer id=\"{id}\">\nAgain: {answer}\n</answer>\n");
                        text.push_str(&again);
                    }
                }
                let tokens = (text.chars().count() as u64).div_ceil(4).max(1);
                if tokens > req.max_tokens {
                    // Cut at max_tokens, as the model would stop.
                    text = text.chars().take((req.max_tokens * 4) as usize).collect();
                }
                output = tokens.min(req.max_tokens.max(1));
                Some(text)
            }
        };
        for (bucket, amount) in [
            (ks.rpm.as_mut(), 1),
            (ks.itpm.as_mut(), input),
            (ks.otpm.as_mut(), output),
            (ks.tpm.as_mut(), input.saturating_add(output)),
        ] {
            if let Some(b) = bucket {
                b.debit(amount as f64, now);
            }
        }
        let headers = limit_headers(ks, now, wall, cfg.dialect);
        record.outcome = if reset {
            AuditOutcome::Reset
        } else if stream_error {
            AuditOutcome::StreamError
        } else {
            AuditOutcome::Ok
        };
        record.input_tokens = input;
        record.output_tokens = output;
        st.audit.push(record);
        st.next_id += 1;
        let mut latency = cfg.base_latency
            + cfg
                .per_output_token
                .saturating_mul(output.min(u32::MAX as u64) as u32);
        if slow {
            latency += faults.slow_delay;
        }
        let load = self.shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(capacity) = cfg.service_capacity.filter(|&c| load > c) {
            latency = latency.mul_f64(load as f64 / capacity as f64);
        }
        Decision::Admit(Box::new(Admitted {
            id: format!("msg_sim_{:08}", st.next_id),
            req,
            input,
            output,
            headers,
            latency,
            reset,
            stream_error,
            text,
            in_flight: InFlight(self.shared.in_flight.clone()),
        }))
    }

    fn json(
        &self,
        status: StatusCode,
        body: &serde_json::Value,
        headers: HeaderMap,
    ) -> Response<SimBody> {
        let bytes = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
        self.response(status, "application/json", headers, SimBody::full(bytes))
    }

    fn response(
        &self,
        status: StatusCode,
        content_type: &'static str,
        headers: HeaderMap,
        body: SimBody,
    ) -> Response<SimBody> {
        let mut res = Response::new(body);
        *res.status_mut() = status;
        let h = res.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(self.wall_now())) {
            h.insert(DATE, v);
        }
        h.extend(headers);
        if self.shared.config.faults.garbage_headers {
            for (name, value) in [
                ("anthropic-ratelimit-requests-remaining", &b"lots"[..]),
                ("anthropic-ratelimit-tokens-reset", b"\xff\xfe"),
                ("x-ratelimit-remaining", b"-1"),
                ("x-ratelimit-reset-tokens", b"NaNs"),
                ("retry-after-ms", b"NaN"),
                ("ratelimit", b"(((("),
            ] {
                if let Ok(v) = HeaderValue::from_bytes(value) {
                    h.append(name, v);
                }
            }
        }
        res
    }

    async fn finish(&self, decision: Decision) -> Result<Response<SimBody>, BoxError> {
        match decision {
            Decision::Reply {
                status,
                body,
                headers,
                delay,
            } => {
                tokio::time::sleep(delay).await;
                Ok(self.json(status, &body, headers))
            }
            Decision::Admit(a) => {
                let a = *a;
                if a.req.stream && !a.reset {
                    tokio::time::sleep(self.shared.config.base_latency).await;
                    let generation = a.latency.saturating_sub(self.shared.config.base_latency);
                    let deltas = a.output.clamp(1, 16) as usize;
                    let mut events = api::stream_events(&a.id, &a.req, a.input, a.output, deltas);
                    if a.stream_error {
                        // Half the text, then the overload event ends the stream.
                        events.truncate(2 + deltas / 2);
                        let err = api::error_body("overloaded_error", "Overloaded");
                        events.push(api::sse("error", &err));
                    }
                    let step = generation / deltas as u32;
                    let paced: VecDeque<(Duration, Bytes)> = events
                        .into_iter()
                        .enumerate()
                        .map(|(i, e)| {
                            let pace = (2..2 + deltas).contains(&i);
                            (if pace { step } else { Duration::ZERO }, e)
                        })
                        .collect();
                    let body = SimBody::stream(paced, Some(a.in_flight));
                    return Ok(self.response(StatusCode::OK, "text/event-stream", a.headers, body));
                }
                tokio::time::sleep(a.latency).await;
                if a.reset {
                    drop(a.in_flight);
                    return Err(Box::new(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "simulated connection reset",
                    )));
                }
                let msg = api::message(&a.id, &a.req, a.input, a.output, a.text.as_deref());
                let res = self.json(StatusCode::OK, &msg, a.headers);
                // A whole body is in memory: the server's work is done.
                drop(a.in_flight);
                Ok(res.map(|b| b.with_in_flight(None)))
            }
        }
    }
}

/// The wait a 429's headers announce (`retry-after` seconds or `retry-after-ms`), if they say.
fn announced_wait(headers: &HeaderMap) -> Option<Duration> {
    let get = |name: &str| headers.get(name)?.to_str().ok()?.parse::<u64>().ok();
    get("retry-after-ms")
        .map(Duration::from_millis)
        .or_else(|| get("retry-after").map(Duration::from_secs))
}

/// The wait before `key` may call an endpoint limited to `rpm` calls a minute (its buckets in
/// `buckets`), or `None`: it may call now, and the call is counted.
fn endpoint_wait(
    buckets: &mut HashMap<String, TokenBucket>,
    key: &str,
    rpm: Option<u64>,
) -> Option<Duration> {
    let rpm = rpm?;
    let now = Instant::now();
    let bucket = buckets
        .entry(key.to_owned())
        .or_insert_with(|| TokenBucket::per_minute(rpm, 1.0, now));
    match bucket.wait_for(1.0, now) {
        Some(Duration::ZERO) => {
            bucket.debit(1.0, now);
            None
        }
        Some(wait) => Some(wait),
        // A limit of 0: never.
        None => Some(Duration::from_secs(60)),
    }
}

/// The largest request body the API takes: 32 MB.
const MAX_BODY: usize = 32 << 20;

fn api_key(headers: &HeaderMap) -> Option<String> {
    if let Some(k) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(k.to_owned());
    }
    let auth = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    auth.strip_prefix("Bearer ").map(str::to_owned)
}

/// Sets the Retry-After header in `style` for a wait of `wait`; returns the delay it announces.
fn retry_after(
    headers: &mut HeaderMap,
    style: RetryAfterStyle,
    wait: Duration,
    wall: SystemTime,
) -> Option<Duration> {
    let (name, value, announced) = match style {
        RetryAfterStyle::Seconds => {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            ("retry-after", secs.to_string(), Duration::from_secs(secs))
        }
        RetryAfterStyle::Ms => {
            let ms = (wait.as_secs_f64() * 1000.0).ceil().max(1.0) as u64;
            ("retry-after-ms", ms.to_string(), Duration::from_millis(ms))
        }
        RetryAfterStyle::HttpDate => {
            let target = (wall + wait).duration_since(SystemTime::UNIX_EPOCH).ok()?;
            let secs = target.as_secs() + u64::from(target.subsec_nanos() > 0);
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            let announced = at.duration_since(wall).ok()?;
            ("retry-after", httpdate::fmt_http_date(at), announced)
        }
        RetryAfterStyle::Garbage => {
            headers.insert("retry-after-ms", HeaderValue::from_static("NaN"));
            headers.insert("retry-after", HeaderValue::from_static("soon"));
            return None;
        }
        RetryAfterStyle::None => return None,
    };
    headers.insert(name, HeaderValue::from_str(&value).ok()?);
    Some(announced)
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A Go `time.Duration` string, rounded up to the millisecond: `12ms`, `1s`, `6m0s`, `1h2m3.5s`.
pub(crate) fn go_duration(d: Duration) -> String {
    let ms = d.as_millis() + u128::from(d.as_nanos() % 1_000_000 > 0);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m, s_ms) = (ms / 3_600_000, ms / 60_000 % 60, ms % 60_000);
    let s = if s_ms % 1000 == 0 {
        (s_ms / 1000).to_string()
    } else {
        format!("{}.{:03}", s_ms / 1000, s_ms % 1000)
            .trim_end_matches('0')
            .to_owned()
    };
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, m) => format!("{m}m{s}s"),
        (h, m) => format!("{h}h{m}m{s}s"),
    }
}

fn limit_headers(ks: &mut KeyState, now: Instant, wall: SystemTime, dialect: Dialect) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut put = |name: String, value: String| {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            h.insert(n, v);
        }
    };
    let remaining = |b: &mut TokenBucket| b.level(now).max(0.0).floor() as u64;
    match dialect {
        Dialect::Anthropic => {
            for (name, bucket) in [
                ("requests", ks.rpm.as_mut()),
                ("tokens", ks.tpm.as_mut()),
                ("input-tokens", ks.itpm.as_mut()),
                ("output-tokens", ks.otpm.as_mut()),
            ] {
                let Some(b) = bucket else { continue };
                let p = format!("anthropic-ratelimit-{name}");
                put(format!("{p}-limit"), b.limit_per_minute().to_string());
                put(format!("{p}-remaining"), remaining(b).to_string());
                put(format!("{p}-reset"), rfc3339(wall + b.until_full(now)));
            }
        }
        Dialect::Openai => {
            let tokens = if ks.tpm.is_some() {
                ks.tpm.as_mut()
            } else {
                ks.itpm.as_mut()
            };
            for (name, bucket) in [("requests", ks.rpm.as_mut()), ("tokens", tokens)] {
                let Some(b) = bucket else { continue };
                put(
                    format!("x-ratelimit-limit-{name}"),
                    b.limit_per_minute().to_string(),
                );
                put(
                    format!("x-ratelimit-remaining-{name}"),
                    remaining(b).to_string(),
                );
                put(
                    format!("x-ratelimit-reset-{name}"),
                    go_duration(b.until_full(now)),
                );
            }
        }
        Dialect::Ietf => {
            if let Some(b) = ks.rpm.as_mut() {
                let r = remaining(b);
                // `t`: when the next request fits if none is left, else when the quota is full.
                let t = if r == 0 {
                    b.wait_for(1.0, now).unwrap_or_default()
                } else {
                    b.until_full(now)
                };
                put(
                    "ratelimit-policy".into(),
                    format!("\"rpm\";q={};w=60", b.limit_per_minute()),
                );
                put(
                    "ratelimit".into(),
                    format!("\"rpm\";r={r};t={}", t.as_secs_f64().ceil() as u64),
                );
            }
        }
        Dialect::None => {}
    }
    h
}

impl<B> tower::Service<Request<B>> for Simulator
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<SimBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<SimBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        Box::pin(self.clone().handle(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(Duration::from_millis(12)), "12ms");
        assert_eq!(go_duration(Duration::from_secs(1)), "1s");
        assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(go_duration(Duration::from_millis(3_723_500)), "1h2m3.5s");
        assert_eq!(go_duration(Duration::from_micros(1500)), "2ms");
    }
}
