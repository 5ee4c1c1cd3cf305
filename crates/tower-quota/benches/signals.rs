//! Cost of parsing a response's rate-limit headers.
#![allow(missing_docs)] // criterion_group! generates an undocumented function.
//!
//! Run with: `cargo bench -p tower-quota --bench signals`
//!
//! `anthropic_200` parses the headers of a typical Anthropic 200 response (17 headers, 12 of them
//! rate-limit headers); divide by 17 for the cost per header.

use criterion::{BatchSize, Criterion, black_box, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Response};
use tower_quota::signals::{ParseContext, Signals, SystemClock};

mod support;
use support::anthropic_200;

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
