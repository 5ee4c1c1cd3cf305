use super::*;
use http::{HeaderName, HeaderValue};
use proptest::prelude::*;

/// 1994-11-06T08:49:37Z, the instant of RFC 9110's example dates.
fn rfc_example() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777)
}

fn ctx(wall: SystemTime) -> ParseContext {
    ParseContext {
        received_at: Instant::now(),
        wall,
    }
}

fn parse_at(wall: SystemTime, headers: &[(&str, &[u8])]) -> Signals {
    let mut map = HeaderMap::new();
    for (n, v) in headers {
        map.append(
            HeaderName::from_bytes(n.as_bytes()).unwrap(),
            HeaderValue::from_bytes(v).unwrap(),
        );
    }
    Signals::parse(&map, &ctx(wall))
}

fn parse(headers: &[(&str, &str)]) -> Signals {
    let h: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
    parse_at(rfc_example(), &h)
}

fn hint(headers: &[(&str, &str)]) -> Option<(Duration, HintSource)> {
    parse(headers).hint().map(|h| (h.delay, h.source))
}

#[test]
fn retry_after_seconds() {
    assert_eq!(
        hint(&[("retry-after", "120")]),
        Some((Duration::from_secs(120), HintSource::RetryAfterSeconds))
    );
    assert_eq!(
        hint(&[("retry-after", "0")]),
        Some((Duration::ZERO, HintSource::RetryAfterSeconds))
    );
}

#[test]
fn retry_after_http_date_all_three_forms() {
    // RFC 9110 §5.6.7's three examples name the same instant, 3 s after our wall clock.
    let wall = rfc_example() - Duration::from_secs(3);
    for form in [
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
    ] {
        let s = parse_at(wall, &[("retry-after", form.as_bytes())]);
        let h = s.hint().expect(form);
        assert_eq!(h.delay, Duration::from_secs(3), "{form}");
        assert_eq!(h.source, HintSource::RetryAfterDate);
    }
}

#[test]
fn retry_after_date_in_the_past_means_now() {
    let s = parse_at(
        rfc_example() + Duration::from_secs(3600),
        &[("retry-after", b"Sun, 06 Nov 1994 08:49:37 GMT")],
    );
    assert_eq!(s.hint().unwrap().delay, Duration::ZERO);
}

#[test]
fn retry_after_date_is_measured_against_the_date_header() {
    // The client's clock is a day fast; the server's Date says the retry instant is 3 s away.
    let skewed = rfc_example() + Duration::from_secs(86_400);
    let s = parse_at(
        skewed,
        &[
            ("date", b"Sun, 06 Nov 1994 08:49:34 GMT"),
            ("retry-after", b"Sun, 06 Nov 1994 08:49:37 GMT"),
        ],
    );
    assert_eq!(s.hint().unwrap().delay, Duration::from_secs(3));
    // A garbage Date falls back to the wall clock (here: the date is in the past, so "now").
    let s = parse_at(
        skewed,
        &[
            ("date", b"yesterday"),
            ("retry-after", b"Sun, 06 Nov 1994 08:49:37 GMT"),
        ],
    );
    assert_eq!(s.hint().unwrap().delay, Duration::ZERO);
}

#[test]
fn retry_after_ms_wins_and_accepts_floats() {
    assert_eq!(
        hint(&[("retry-after", "3"), ("retry-after-ms", "2500")]),
        Some((Duration::from_millis(2500), HintSource::RetryAfterMs))
    );
    assert_eq!(
        hint(&[("retry-after-ms", "250.5")]),
        Some((Duration::from_micros(250_500), HintSource::RetryAfterMs))
    );
    // A garbage retry-after-ms leaves the seconds form in charge.
    assert_eq!(
        hint(&[("retry-after", "3"), ("retry-after-ms", "soon")]),
        Some((Duration::from_secs(3), HintSource::RetryAfterSeconds))
    );
}

#[test]
fn malformed_values_are_ignored() {
    for bad in [
        "-1",
        "NaN",
        "inf",
        "99999999999999999999",
        "",
        "soon",
        "1e3",
        "Sun, 32 Nov 1994 08:49:37 GMT",
    ] {
        assert_eq!(hint(&[("retry-after", bad)]), None, "retry-after {bad:?}");
        assert_eq!(
            hint(&[("retry-after-ms", bad)]),
            None,
            "retry-after-ms {bad:?}"
        );
        let s = parse(&[
            ("anthropic-ratelimit-requests-remaining", bad),
            ("x-ratelimit-reset-tokens", bad),
            ("x-should-retry", bad),
        ]);
        assert!(s.is_empty(), "{bad:?}: {s:?}");
    }
    // Non-UTF-8 bytes.
    let s = parse_at(
        rfc_example(),
        &[
            ("retry-after", b"\xff\xfe3"),
            ("anthropic-ratelimit-requests-remaining", b"\xc3\x28"),
        ],
    );
    assert!(s.is_empty());
}

#[test]
fn huge_but_valid_values_are_kept() {
    assert_eq!(
        hint(&[("retry-after-ms", "259200000")]).unwrap().0,
        Duration::from_secs(3 * 86_400)
    );
    assert_eq!(
        hint(&[("retry-after", "18446744073709551615")]).unwrap().0,
        Duration::from_secs(u64::MAX)
    );
    // The instant is out of tokio's range: no panic, no retry_at.
    let s = parse(&[("retry-after", "18446744073709551615")]);
    assert_eq!(s.retry_at(), None);
}

#[test]
fn should_retry() {
    assert_eq!(
        parse(&[("x-should-retry", "true")]).should_retry(),
        Some(true)
    );
    assert_eq!(
        parse(&[("x-should-retry", "false")]).should_retry(),
        Some(false)
    );
    assert_eq!(parse(&[("x-should-retry", "maybe")]).should_retry(), None);
}

#[test]
fn anthropic_429_from_the_wild() {
    // whoz-oss/coday#110: the input-token bucket is the exhausted one.
    let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600); // 2026-01-01T00:00:00Z
    let h: &[(&str, &[u8])] = &[
        ("x-should-retry", b"true"),
        ("retry-after", b"16"),
        ("anthropic-ratelimit-input-tokens-limit", b"200000"),
        ("anthropic-ratelimit-input-tokens-remaining", b"0"),
        (
            "anthropic-ratelimit-input-tokens-reset",
            b"2026-01-01T00:00:16Z",
        ),
        ("anthropic-ratelimit-output-tokens-limit", b"80000"),
        ("anthropic-ratelimit-output-tokens-remaining", b"80000"),
        (
            "anthropic-ratelimit-output-tokens-reset",
            b"2026-01-01T00:00:00Z",
        ),
        ("anthropic-ratelimit-requests-limit", b"4000"),
        ("anthropic-ratelimit-requests-remaining", b"4000"),
        (
            "anthropic-ratelimit-requests-reset",
            b"2026-01-01T00:00:00.5Z",
        ),
        ("anthropic-ratelimit-tokens-limit", b"280000"),
        ("anthropic-ratelimit-tokens-remaining", b"80000"),
    ];
    let s = parse_at(wall, h);
    assert_eq!(s.should_retry(), Some(true));
    assert_eq!(s.exhausted().collect::<Vec<_>>(), [Bucket::InputTokens]);
    let input = s.bucket(Bucket::InputTokens);
    assert_eq!(
        *input,
        BucketState {
            limit: Some(200_000),
            remaining: Some(0),
            reset: Some(Duration::from_secs(16)),
        }
    );
    assert_eq!(
        s.bucket(Bucket::Requests).reset,
        Some(Duration::from_millis(500))
    );
    assert_eq!(s.bucket(Bucket::Tokens).limit, Some(280_000));
    assert_eq!(s.bucket(Bucket::Tokens).reset, None);
    // Retry-After wins over the bucket reset.
    assert_eq!(s.hint().unwrap().source, HintSource::RetryAfterSeconds);
    assert_eq!(
        s.retry_at(),
        Some(s.received_at() + Duration::from_secs(16))
    );

    // Without Retry-After the exhausted bucket's reset is the hint.
    let without: Vec<_> = h
        .iter()
        .filter(|(n, _)| *n != "retry-after")
        .copied()
        .collect();
    let s = parse_at(wall, &without);
    assert_eq!(
        s.hint(),
        Some(RetryHint {
            delay: Duration::from_secs(16),
            source: HintSource::BucketReset(Bucket::InputTokens),
        })
    );
}

#[test]
fn anthropic_reset_uses_the_date_header() {
    let skewed = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
    let s = parse_at(
        skewed,
        &[
            ("date", b"Thu, 01 Jan 2026 00:00:00 GMT"),
            ("anthropic-ratelimit-requests-remaining", b"0"),
            (
                "anthropic-ratelimit-requests-reset",
                b"2026-01-01T00:00:07Z",
            ),
        ],
    );
    assert_eq!(s.hint().unwrap().delay, Duration::from_secs(7));
}

#[test]
fn openai_headers() {
    let s = parse(&[
        ("x-ratelimit-limit-requests", "10000"),
        ("x-ratelimit-remaining-requests", "9999"),
        ("x-ratelimit-reset-requests", "6m0s"),
        ("x-ratelimit-limit-tokens", "2000000"),
        ("x-ratelimit-remaining-tokens", "0"),
        ("x-ratelimit-reset-tokens", "1h2m3.5s"),
    ]);
    assert_eq!(
        *s.bucket(Bucket::Requests),
        BucketState {
            limit: Some(10_000),
            remaining: Some(9_999),
            reset: Some(Duration::from_secs(360)),
        }
    );
    assert_eq!(s.exhausted().collect::<Vec<_>>(), [Bucket::Tokens]);
    assert_eq!(s.hint().unwrap().delay, Duration::from_millis(3_723_500));
    let s = parse(&[("x-ratelimit-reset-requests", "12ms")]);
    assert_eq!(
        s.bucket(Bucket::Requests).reset,
        Some(Duration::from_millis(12))
    );
}

#[test]
fn azure_negative_values_are_ignored() {
    let s = parse(&[
        ("x-ratelimit-remaining-requests", "-1"),
        ("x-ratelimit-limit-requests", "0"),
    ]);
    assert_eq!(s.bucket(Bucket::Requests).remaining, None);
    assert_eq!(s.bucket(Bucket::Requests).limit, Some(0));
}

#[test]
fn generic_headers() {
    let s = parse(&[
        ("x-ratelimit-limit", "60"),
        ("x-ratelimit-remaining", "0"),
        ("x-ratelimit-reset", "30"),
    ]);
    assert_eq!(
        s.hint(),
        Some(RetryHint {
            delay: Duration::from_secs(30),
            source: HintSource::BucketReset(Bucket::Requests),
        })
    );
    // A unix timestamp 42 s ahead of the wall clock.
    let now = 1_767_225_600u64;
    let ts = (now + 42).to_string();
    let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(now);
    let s = parse_at(
        wall,
        &[
            ("x-ratelimit-remaining", b"0"),
            ("x-ratelimit-reset", ts.as_bytes()),
        ],
    );
    assert_eq!(s.hint().unwrap().delay, Duration::from_secs(42));
    // The older `RateLimit-*` trio.
    let s = parse(&[
        ("ratelimit-limit", "100"),
        ("ratelimit-remaining", "0"),
        ("ratelimit-reset", "5"),
    ]);
    assert_eq!(s.hint().unwrap().delay, Duration::from_secs(5));
}

#[test]
fn ietf_structured_fields() {
    let s = parse(&[
        (
            "ratelimit-policy",
            r#""burst";q=100;w=60,"daily";q=1000;w=86400"#,
        ),
        ("ratelimit", r#""burst";r=0;t=30, "daily";r=900;t=3600"#),
    ]);
    assert_eq!(
        *s.bucket(Bucket::Requests),
        BucketState {
            limit: Some(100),
            remaining: Some(0),
            reset: Some(Duration::from_secs(30)),
        }
    );
    assert_eq!(s.hint().unwrap().delay, Duration::from_secs(30));
    // Retry-After takes precedence over `t`.
    let s = parse(&[("ratelimit", r#""default";r=0;t=30"#), ("retry-after", "7")]);
    assert_eq!(s.hint().unwrap().delay, Duration::from_secs(7));
    // Non-request quota units are not request buckets.
    let s = parse(&[
        (
            "ratelimit-policy",
            r#""bytes";q=1000;w=60;qu="content-bytes""#,
        ),
        ("ratelimit", r#""bytes";r=0;t=30"#),
    ]);
    assert!(s.is_empty());
    // Malformed fields are ignored.
    for bad in [r#""default";r=-1;t=x"#, "((((", r#""a";r=1.5"#, ""] {
        assert!(parse(&[("ratelimit", bad)]).is_empty(), "{bad:?}");
    }
}

#[test]
fn provider_headers_win_over_generic_ones() {
    let s = parse(&[
        ("x-ratelimit-remaining", "5"),
        ("anthropic-ratelimit-requests-remaining", "0"),
    ]);
    assert_eq!(s.bucket(Bucket::Requests).remaining, Some(0));
}

#[tokio::test]
async fn parsed_once_and_cached() {
    let mut res = Response::builder()
        .header("retry-after", "5")
        .body(())
        .unwrap();
    assert!(Signals::cached(&res).is_none());
    let a = Signals::of(&mut res);
    // Changing the header afterwards does not change the cached snapshot.
    res.headers_mut()
        .insert("retry-after", HeaderValue::from_static("9"));
    let b = Signals::of(&mut res);
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(b.hint().unwrap().delay, Duration::from_secs(5));
}

proptest! {
    #[test]
    fn never_panics_on_arbitrary_headers(
        entries in proptest::collection::vec(
            (
                prop_oneof![
                    Just("retry-after".to_owned()),
                    Just("retry-after-ms".to_owned()),
                    Just("date".to_owned()),
                    Just("x-should-retry".to_owned()),
                    Just("ratelimit".to_owned()),
                    Just("ratelimit-policy".to_owned()),
                    Just("x-ratelimit-reset".to_owned()),
                    Just("x-ratelimit-reset-tokens".to_owned()),
                    Just("anthropic-ratelimit-tokens-reset".to_owned()),
                    Just("anthropic-ratelimit-input-tokens-remaining".to_owned()),
                    "[a-z0-9-]{1,40}",
                ],
                proptest::collection::vec(any::<u8>(), 0..64),
            ),
            0..16,
        ),
        wall_secs in any::<u32>(),
    ) {
        let mut map = HeaderMap::new();
        for (name, value) in &entries {
            let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(value)) else {
                continue;
            };
            map.append(n, v);
        }
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from(wall_secs));
        let s = Signals::parse(&map, &ctx(wall));
        let _ = (s.hint(), s.retry_at(), s.exhausted().count(), s.is_empty());
    }

    #[test]
    fn never_panics_on_printable_values(
        name in prop_oneof![
            Just("retry-after"), Just("retry-after-ms"), Just("ratelimit"),
            Just("x-ratelimit-reset-requests"), Just("anthropic-ratelimit-requests-reset"),
            Just("date"),
        ],
        value in "[ -~]{0,80}",
    ) {
        let Ok(v) = HeaderValue::from_str(&value) else { return Ok(()) };
        let mut map = HeaderMap::new();
        map.insert(name, v);
        let s = Signals::parse(&map, &ctx(rfc_example()));
        let _ = s.hint();
    }
}
