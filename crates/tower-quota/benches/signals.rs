//! Cost of parsing a response's rate-limit headers.
#![allow(missing_docs)] // criterion_group! generates an undocumented function.
//!
//! Run with: `cargo bench -p tower-quota --bench signals`
//!
//! `anthropic_200` parses the headers of a typical Anthropic 200 response (17 headers, 12 of them
//! rate-limit headers); divide by 17 for the cost per header.

use criterion::{BatchSize, Criterion, black_box, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue, Response};
use tower_quota::signals::{ParseContext, Signals, SystemClock};

fn anthropic_200() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in [
        ("date", "Sun, 29 Nov 2026 01:41:47 GMT"),
        ("content-type", "application/json"),
        ("request-id", "req_011CSHoEeqs5C35K2UUqR7Fy"),
        (
            "anthropic-organization-id",
            "00000000-0000-0000-0000-000000000000",
        ),
        ("via", "1.1 google"),
        ("anthropic-ratelimit-requests-limit", "4000"),
        ("anthropic-ratelimit-requests-remaining", "3999"),
        ("anthropic-ratelimit-requests-reset", "2026-11-29T01:41:48Z"),
        ("anthropic-ratelimit-tokens-limit", "480000"),
        ("anthropic-ratelimit-tokens-remaining", "479000"),
        ("anthropic-ratelimit-tokens-reset", "2026-11-29T01:41:48Z"),
        ("anthropic-ratelimit-input-tokens-limit", "400000"),
        ("anthropic-ratelimit-input-tokens-remaining", "400000"),
        (
            "anthropic-ratelimit-input-tokens-reset",
            "2026-11-29T01:41:47Z",
        ),
        ("anthropic-ratelimit-output-tokens-limit", "80000"),
        ("anthropic-ratelimit-output-tokens-remaining", "79000"),
        (
            "anthropic-ratelimit-output-tokens-reset",
            "2026-11-29T01:41:48Z",
        ),
    ] {
        h.insert(HeaderName::from_static(n), HeaderValue::from_static(v));
    }
    h
}

fn bench(c: &mut Criterion) {
    let headers = anthropic_200();
    let ctx = ParseContext::now(&SystemClock);
    c.bench_function("anthropic_200", |b| {
        b.iter(|| Signals::parse(black_box(&headers), black_box(&ctx)))
    });

    let mut none = HeaderMap::new();
    none.insert("content-type", HeaderValue::from_static("application/json"));
    none.insert(
        "date",
        HeaderValue::from_static("Sun, 29 Nov 2026 01:41:47 GMT"),
    );
    c.bench_function("no_rate_limit_headers", |b| {
        b.iter(|| Signals::parse(black_box(&none), black_box(&ctx)))
    });

    let mut retry = HeaderMap::new();
    retry.insert(
        "retry-after",
        HeaderValue::from_static("Sun, 29 Nov 2026 01:41:50 GMT"),
    );
    retry.insert(
        "date",
        HeaderValue::from_static("Sun, 29 Nov 2026 01:41:47 GMT"),
    );
    c.bench_function("retry_after_http_date", |b| {
        b.iter(|| Signals::parse(black_box(&retry), black_box(&ctx)))
    });

    let mut res = Response::new(());
    *res.headers_mut() = anthropic_200();
    let _ = Signals::of(&mut res);
    c.bench_function("of_cached", |b| b.iter(|| Signals::of(black_box(&mut res))));

    c.bench_function("of_first_time", |b| {
        b.iter_batched(
            || {
                let mut r = Response::new(());
                *r.headers_mut() = headers.clone();
                r
            },
            |mut r| Signals::of(&mut r),
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
