//! Partitions: which quota a request draws on.
//!
//! # Why partitions
//!
//! Providers limit per API key (per organisation), not per process or per connection. A 429 for one
//! key says nothing about another, so a cooldown or a budget must be scoped to the key the request
//! carries. A [`Partitioner`] maps a request to a [`PartitionKey`]; the default, [`ApiKey`], uses a
//! fingerprint of the `x-api-key` header, else of `Authorization`, so the raw key is never stored,
//! logged or printed. A caller can also pin a request to a partition by putting a [`PartitionKey`]
//! in its extensions; that always wins.
//!
//! The fingerprint is a 64-bit FNV-1a hash: stable across processes and builds, so processes that
//! share one key agree on its partition (the Redis store needs that), and not reversible into a
//! high-entropy API key.

use http::{Extensions, HeaderMap, Request};
use std::fmt;

/// The partition a request belongs to: an opaque 64-bit fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey(u64);

impl PartitionKey {
    /// The partition of requests that carry no key.
    pub const ANONYMOUS: PartitionKey = PartitionKey(0);

    /// The partition of a budget's global cap (shared by every key). Fingerprints are odd, so no
    /// key maps to it.
    pub const GLOBAL: PartitionKey = PartitionKey(2);

    /// The fingerprint of `secret` (an API key or any label).
    pub fn fingerprint(secret: &[u8]) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in secret {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        PartitionKey(h | 1) // never ANONYMOUS
    }

    /// A partition chosen by number (for a fixed mapping of your own).
    pub const fn from_u64(n: u64) -> Self {
        PartitionKey(n)
    }

    /// The fingerprint as a number (safe to log: it is not the key).
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PartitionKey({:016x})", self.0)
    }
}

impl fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Maps a request to its partition, from its headers and extensions. A closure
/// `Fn(&HeaderMap, &Extensions) -> PartitionKey` is a partitioner too.
pub trait Partitioner: Send + Sync + 'static {
    /// The partition of a request with these headers and extensions.
    fn partition(&self, headers: &HeaderMap, extensions: &Extensions) -> PartitionKey;

    /// The partition of `req`.
    fn of<B>(&self, req: &Request<B>) -> PartitionKey
    where
        Self: Sized,
    {
        self.partition(req.headers(), req.extensions())
    }
}

impl<F> Partitioner for F
where
    F: Fn(&HeaderMap, &Extensions) -> PartitionKey + Send + Sync + 'static,
{
    fn partition(&self, headers: &HeaderMap, extensions: &Extensions) -> PartitionKey {
        self(headers, extensions)
    }
}

/// The default partitioner: a [`PartitionKey`] in the request extensions if present, else the
/// fingerprint of `x-api-key`, else of `Authorization`, else [`PartitionKey::ANONYMOUS`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ApiKey;

impl Partitioner for ApiKey {
    fn partition(&self, h: &HeaderMap, extensions: &Extensions) -> PartitionKey {
        if let Some(k) = extensions.get::<PartitionKey>() {
            return *k;
        }
        h.get("x-api-key")
            .or_else(|| h.get(http::header::AUTHORIZATION))
            .map_or(PartitionKey::ANONYMOUS, |v| {
                PartitionKey::fingerprint(v.as_bytes())
            })
    }
}

/// One partition for everything: every request shares one gate or budget (a [`PartitionKey`] in
/// the request extensions still wins).
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Partitioner for Single {
    fn partition(&self, _: &HeaderMap, extensions: &Extensions) -> PartitionKey {
        extensions
            .get::<PartitionKey>()
            .copied()
            .unwrap_or(PartitionKey::ANONYMOUS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_partitions_never_show_the_key() {
        let req = |k: &str| Request::builder().header("x-api-key", k).body(()).unwrap();
        let a = ApiKey.of(&req("sk-ant-secret-1"));
        let b = ApiKey.of(&req("sk-ant-secret-2"));
        assert_ne!(a, b);
        assert_eq!(a, ApiKey.of(&req("sk-ant-secret-1")));
        assert!(!format!("{a:?} {a}").contains("secret"));
        let bearer = Request::builder()
            .header("authorization", "Bearer sk-ant-secret-1")
            .body(())
            .unwrap();
        assert_ne!(ApiKey.of(&bearer), PartitionKey::ANONYMOUS);
        assert_eq!(ApiKey.of(&Request::new(())), PartitionKey::ANONYMOUS);
        let mut pinned = req("sk-ant-secret-1");
        pinned.extensions_mut().insert(PartitionKey::from_u64(7));
        assert_eq!(ApiKey.of(&pinned), PartitionKey::from_u64(7));
        assert_eq!(Single.of(&req("x")), PartitionKey::ANONYMOUS);
    }
}
