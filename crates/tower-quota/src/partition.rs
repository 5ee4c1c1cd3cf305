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
//! The fingerprint is the first 128 bits of a SHA-256 of the key: stable across processes and
//! builds, so processes that share one key agree on its partition (the Redis store needs that);
//! not reversible into the key; and, since it is a cryptographic hash, a tenant choosing keys
//! cannot aim at another tenant's partition. A deployment that serves many tenants can key it with
//! a secret of its own ([`ApiKey::keyed`], the same secret across a fleet so Redis sharing still
//! works): then a fingerprint that leaks (in a log, in Redis) cannot even be tested against
//! guessed keys. The scheme of an `Authorization` header (`Bearer `) is not part of the key:
//! `x-api-key: K` and `Authorization: Bearer K` are one key, as the server counts them.

use http::{Extensions, HeaderMap, HeaderValue, Request};
use sha2::{Digest, Sha256};
use std::fmt;
use std::sync::Arc;

/// The partition a request belongs to: an opaque 128-bit fingerprint.
// Two words, high first (so the derived order is the number's), rather than a `u128`: aligned
// to 8 bytes, not 16, it adds no padding to the futures and states that hold it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PartitionKey([u64; 2]);

impl std::hash::Hash for PartitionKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // One write, as the `u128` it stands for (an array would add its length).
        state.write_u128(self.as_u128());
    }
}

impl PartitionKey {
    /// The partition of requests that carry no key.
    pub const ANONYMOUS: PartitionKey = PartitionKey::from_u128(0);

    /// The partition of a budget's global cap (shared by every key). Fingerprints are odd, so no
    /// key maps to it.
    pub const GLOBAL: PartitionKey = PartitionKey::from_u128(2);

    /// The fingerprint of `secret` (an API key or any label), unkeyed: what [`ApiKey::new`]
    /// gives a request carrying it.
    pub fn fingerprint(secret: &[u8]) -> Self {
        Self::keyed_fingerprint(&[], secret)
    }

    /// The fingerprint of `secret` under a deployment's own `key` (what [`ApiKey::keyed`] gives
    /// a request carrying it).
    pub fn keyed_fingerprint(key: &[u8], secret: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(b"tower-quota partition v1\0");
        h.update((key.len() as u64).to_le_bytes());
        h.update(key);
        h.update(secret);
        let digest = h.finalize();
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        PartitionKey::from_u128(u128::from_le_bytes(first) | 1) // never ANONYMOUS or GLOBAL
    }

    /// A partition chosen by number (for a fixed mapping of your own).
    pub const fn from_u128(n: u128) -> Self {
        PartitionKey([(n >> 64) as u64, n as u64])
    }

    /// A partition chosen by a small number.
    pub const fn from_u64(n: u64) -> Self {
        PartitionKey::from_u128(n as u128)
    }

    /// The partition of this key's requests to `pool`: the key itself for
    /// [`Pool::Messages`], a partition derived from it for the others (odd, like every
    /// fingerprint, so never [`ANONYMOUS`](Self::ANONYMOUS) or [`GLOBAL`](Self::GLOBAL)). The
    /// context applies it to every request ([`Pool::of_path`]): each layer then keeps the pools
    /// of one key apart.
    pub const fn in_pool(self, pool: Pool) -> PartitionKey {
        // Constants of no meaning (the fractional digits of pi and e): a derived partition
        // looks as random as the fingerprint it comes from.
        let salt: u128 = match pool {
            Pool::Messages => return self,
            Pool::Batches => 0x243f_6a88_85a3_08d3_1319_8a2e_0370_7344,
            Pool::CountTokens => 0xb7e1_5162_8aed_2a6a_bf71_5880_9cf4_f3c7,
        };
        PartitionKey::from_u128((self.as_u128() ^ salt) | 1)
    }

    /// The fingerprint as a number (safe to log: it is not the key).
    pub const fn as_u128(self) -> u128 {
        ((self.0[0] as u128) << 64) | self.0[1] as u128
    }
}

impl fmt::Debug for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PartitionKey({:032x})", self.as_u128())
    }
}

impl fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.as_u128())
    }
}

/// A rate-limit pool of an API key. Anthropic counts the Messages API, the Message Batches
/// endpoints and the token-counting endpoint apart: a 429 from one says nothing of the others,
/// and the limits in one's headers are not the others'. Every layer keys its state by
/// [`PartitionKey::in_pool`] of the request's pool, so a batch poll's 429 pauses the key's batch
/// calls and never its Messages calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Pool {
    /// `/v1/messages` and every other path: the requests, input and output tokens a minute.
    Messages,
    /// `/v1/messages/batches` and the paths under it.
    Batches,
    /// `/v1/messages/count_tokens`.
    CountTokens,
}

impl Pool {
    /// The pool of a request to `path`.
    pub fn of_path(path: &str) -> Pool {
        if path.ends_with("/messages/count_tokens") {
            Pool::CountTokens
        } else if path.contains("/messages/batches") {
            Pool::Batches
        } else {
            Pool::Messages
        }
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
/// fingerprint of the API key in `x-api-key`, else in `Authorization` (its scheme, such as
/// `Bearer `, stripped), else [`PartitionKey::ANONYMOUS`].
#[derive(Clone, Default)]
pub struct ApiKey {
    /// The deployment's own key for the fingerprints, if any.
    key: Option<Arc<[u8]>>,
}

impl ApiKey {
    /// Unkeyed fingerprints ([`PartitionKey::fingerprint`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Fingerprints keyed by `deployment_key` ([`PartitionKey::keyed_fingerprint`]). Use the same
    /// key in every process that shares a store.
    pub fn keyed(deployment_key: impl AsRef<[u8]>) -> Self {
        Self {
            key: Some(Arc::from(deployment_key.as_ref())),
        }
    }

    /// The partition of a request carrying `api_key`.
    pub fn fingerprint(&self, api_key: &[u8]) -> PartitionKey {
        match &self.key {
            Some(k) => PartitionKey::keyed_fingerprint(k, api_key),
            None => PartitionKey::fingerprint(api_key),
        }
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("keyed", &self.key.is_some())
            .finish()
    }
}

/// The key in an `x-api-key` value, or in an `Authorization` value without its scheme.
fn api_key(v: &HeaderValue, has_scheme: bool) -> &[u8] {
    let mut b = v.as_bytes().trim_ascii();
    if has_scheme {
        if let Some(i) = b.iter().position(|&c| c == b' ') {
            b = b[i + 1..].trim_ascii();
        }
    }
    b
}

impl Partitioner for ApiKey {
    fn partition(&self, h: &HeaderMap, extensions: &Extensions) -> PartitionKey {
        if let Some(k) = extensions.get::<PartitionKey>() {
            return *k;
        }
        let key = match h.get("x-api-key") {
            Some(v) => api_key(v, false),
            None => match h.get(http::header::AUTHORIZATION) {
                Some(v) => api_key(v, true),
                None => return PartitionKey::ANONYMOUS,
            },
        };
        self.fingerprint(key)
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
        let a = ApiKey::new().of(&req("sk-ant-secret-1"));
        let b = ApiKey::new().of(&req("sk-ant-secret-2"));
        assert_ne!(a, b);
        assert_eq!(a, ApiKey::new().of(&req("sk-ant-secret-1")));
        assert!(!format!("{a:?} {a}").contains("secret"));
        let bearer = Request::builder()
            .header("authorization", "Bearer sk-ant-secret-1")
            .body(())
            .unwrap();
        assert_ne!(ApiKey::new().of(&bearer), PartitionKey::ANONYMOUS);
        assert_eq!(ApiKey::new().of(&Request::new(())), PartitionKey::ANONYMOUS);
        let mut pinned = req("sk-ant-secret-1");
        pinned.extensions_mut().insert(PartitionKey::from_u64(7));
        assert_eq!(ApiKey::new().of(&pinned), PartitionKey::from_u64(7));
        assert_eq!(Single.of(&req("x")), PartitionKey::ANONYMOUS);
    }

    #[test]
    fn both_header_styles_are_one_key() {
        let x = Request::builder()
            .header("x-api-key", "sk-ant-secret-1")
            .body(())
            .unwrap();
        for auth in [
            "Bearer sk-ant-secret-1",
            "bearer  sk-ant-secret-1 ",
            "sk-ant-secret-1",
        ] {
            let a = Request::builder()
                .header("authorization", auth)
                .body(())
                .unwrap();
            if auth.contains(' ') {
                assert_eq!(ApiKey::new().of(&a), ApiKey::new().of(&x), "{auth:?}");
            }
        }
    }

    #[test]
    fn fingerprints_are_128_bit_and_keyed_on_request() {
        let req = Request::builder()
            .header("x-api-key", "sk-ant-secret-1")
            .body(())
            .unwrap();
        let plain = ApiKey::new().of(&req);
        assert_eq!(plain, PartitionKey::fingerprint(b"sk-ant-secret-1"));
        assert_ne!(plain.as_u128() >> 64, 0, "{plain}");
        assert_eq!(plain.to_string().len(), 32);
        let keyed = ApiKey::keyed("fleet-secret");
        assert_ne!(keyed.of(&req), plain);
        assert_eq!(keyed.of(&req), ApiKey::keyed("fleet-secret").of(&req));
        assert_eq!(
            keyed.of(&req),
            PartitionKey::keyed_fingerprint(b"fleet-secret", b"sk-ant-secret-1")
        );
        assert_ne!(keyed.of(&req), ApiKey::keyed("other").of(&req));
        assert!(!format!("{keyed:?}").contains("fleet"));
    }
}
