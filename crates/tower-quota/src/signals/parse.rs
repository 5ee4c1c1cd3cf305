//! Primitive value parsers for the header dialects. Every function returns `None` for anything it
//! does not understand, and none of them can panic on any input.

use std::time::{Duration, SystemTime};

/// `1*DIGIT` as an unsigned integer. Rejects signs, spaces inside, and values that overflow `u64`.
pub(crate) fn uint(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// A non-negative, finite decimal number (`250`, `250.5`). Rejects `NaN`, `inf`, exponents and signs.
pub(crate) fn decimal(s: &str) -> Option<f64> {
    let s = s.trim();
    let mut dots = 0;
    if s.is_empty() || s == "." {
        return None;
    }
    for b in s.bytes() {
        match b {
            b'0'..=b'9' => {}
            b'.' => dots += 1,
            _ => return None,
        }
    }
    if dots > 1 {
        return None;
    }
    let v: f64 = s.parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some(v)
}

/// Seconds as a `Duration`, refusing values `Duration` cannot hold.
pub(crate) fn secs_f64(secs: f64) -> Option<Duration> {
    Duration::try_from_secs_f64(secs).ok()
}

/// Delta seconds as Retry-After sends them (`120`). A decimal (`1.5`) is accepted too: some servers
/// send one, and reading it is safer than falling back to a guess.
pub(crate) fn delta_seconds(s: &str) -> Option<Duration> {
    integer_or_decimal(s, Duration::from_secs, 1.0)
}

/// An integer in `unit`s, or a decimal scaled by `per_second`. An integer that overflows `u64` is
/// ignored rather than rounded through a float.
fn integer_or_decimal(s: &str, unit: fn(u64) -> Duration, per_second: f64) -> Option<Duration> {
    if let Some(n) = uint(s) {
        return Some(unit(n));
    }
    if s.trim().bytes().all(|b| b.is_ascii_digit()) {
        return None; // all digits, yet not a u64: it overflows
    }
    secs_f64(decimal(s)? / per_second)
}

/// Milliseconds, integer or float (`retry-after-ms: 1500` or `250.5`).
pub(crate) fn millis(s: &str) -> Option<Duration> {
    integer_or_decimal(s, Duration::from_millis, 1000.0)
}

/// An HTTP-date in any of the three RFC 9110 forms (IMF-fixdate, RFC 850, asctime).
pub(crate) fn http_date(s: &str) -> Option<SystemTime> {
    httpdate::parse_http_date(s.trim()).ok()
}

/// An RFC 3339 timestamp (`2026-11-29T01:02:03Z`, with or without fractions or an offset).
pub(crate) fn rfc3339(s: &str) -> Option<SystemTime> {
    let t = time::OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339)
        .ok()?;
    let since_epoch = t - time::OffsetDateTime::UNIX_EPOCH;
    if since_epoch.is_negative() {
        return None;
    }
    let d = Duration::try_from(since_epoch).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(d)
}

/// A Go `time.Duration` string as OpenAI sends it: `12ms`, `1s`, `6m0s`, `1h2m3.5s`, `250us`.
/// A sequence of decimal numbers each with a unit (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`); no sign.
/// `0` alone is accepted, as Go prints it.
pub(crate) fn go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    if s.is_empty() {
        return None;
    }
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .bytes()
            .position(|b| !(b.is_ascii_digit() || b == b'.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let value = decimal(&rest[..num_len])?;
        rest = &rest[num_len..];
        let unit_len = rest
            .char_indices()
            .find(|&(_, c)| c.is_ascii_digit() || c == '.')
            .map_or(rest.len(), |(i, _)| i);
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * scale;
    }
    if !total.is_finite() {
        return None;
    }
    secs_f64(total)
}

/// `true` or `false`, case-insensitively.
pub(crate) fn boolean(s: &str) -> Option<bool> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("true") {
        Some(true)
    } else if s.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uints() {
        assert_eq!(uint("120"), Some(120));
        assert_eq!(uint(" 7 "), Some(7));
        assert_eq!(uint("-1"), None);
        assert_eq!(uint("+1"), None);
        assert_eq!(uint(""), None);
        assert_eq!(uint("1 2"), None);
        assert_eq!(uint("99999999999999999999"), None);
        assert_eq!(uint("18446744073709551615"), Some(u64::MAX));
    }

    #[test]
    fn decimals() {
        assert_eq!(decimal("250.5"), Some(250.5));
        assert_eq!(decimal("NaN"), None);
        assert_eq!(decimal("inf"), None);
        assert_eq!(decimal("1e3"), None);
        assert_eq!(decimal("-3"), None);
        assert_eq!(decimal("1.2.3"), None);
        assert_eq!(decimal("."), None);
        assert_eq!(decimal(".5"), Some(0.5));
    }

    #[test]
    fn millis_and_seconds() {
        assert_eq!(millis("2500"), Some(Duration::from_millis(2500)));
        assert_eq!(millis("250.5"), Some(Duration::from_micros(250_500)));
        assert_eq!(delta_seconds("3"), Some(Duration::from_secs(3)));
        assert_eq!(delta_seconds("1.5"), Some(Duration::from_millis(1500)));
        // Huge but valid: kept, capping is the layers' decision.
        assert_eq!(
            delta_seconds("9999999999"),
            Some(Duration::from_secs(9_999_999_999))
        );
        // Larger than a Duration can hold: ignored.
        assert_eq!(millis(&"9".repeat(400)), None);
        assert_eq!(delta_seconds(&format!("{}.0", "9".repeat(400))), None);
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration("12ms"), Some(Duration::from_millis(12)));
        assert_eq!(go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(
            go_duration("1h2m3.5s"),
            Some(Duration::from_millis(3_723_500))
        );
        assert_eq!(go_duration("250us"), Some(Duration::from_micros(250)));
        assert_eq!(go_duration("250µs"), Some(Duration::from_micros(250)));
        assert_eq!(go_duration("0"), Some(Duration::ZERO));
        assert_eq!(go_duration("0s"), Some(Duration::ZERO));
        for bad in ["", "s", "5", "5x", "-1s", "1.2.3s", "NaNs", "1h-2m", "ms5"] {
            assert_eq!(go_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn rfc3339_forms() {
        let t = rfc3339("2026-11-29T01:00:00Z").unwrap();
        let u = rfc3339("2026-11-29T02:00:00.5+01:00").unwrap();
        assert_eq!(u.duration_since(t).unwrap(), Duration::from_millis(500));
        assert_eq!(rfc3339("yesterday"), None);
        assert_eq!(rfc3339("1969-12-31T23:59:59Z"), None);
    }

    #[test]
    fn booleans() {
        assert_eq!(boolean("true"), Some(true));
        assert_eq!(boolean("FALSE"), Some(false));
        assert_eq!(boolean("yes"), None);
    }
}
