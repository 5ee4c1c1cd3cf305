//! What the benches share.

use http::{HeaderMap, HeaderName, HeaderValue};

/// The headers of a typical Anthropic 200 response: 17, 12 of them rate-limit headers.
pub(crate) fn anthropic_200() -> HeaderMap {
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
