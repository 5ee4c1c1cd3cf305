//! What every layer of a stack shares: how requests map to partitions, how results are judged,
//! and the wall clock. Configured once, handed to each layer.
//!
//! # Why one context
//!
//! The four layers ask the same questions of each request and each result: which API key's quota
//! is this ([`Partitioner`]), did it succeed or was it pushed back ([`Classify`]), and, for an
//! HTTP-date without a `Date` header, what time is it ([`WallClock`]). If each layer had its own
//! answer, a classifier given to one layer would split the judgement: the retry would retry what
//! the gate does not pause for, the budget would refund what the adaptive limit counts as a
//! success. A [`QuotaContext`] holds the three answers; every layer takes it (`.context(ctx)`),
//! and [`Preset::context`](crate::Preset::context) gives one to all four at once.
//!
//! Per request, the partition is computed once and cached in the request's extensions (the layers
//! below read it back), as the parsed [`Signals`] are cached in the response's. A cached partition
//! remembers which partitioner made it, so layers given different contexts never read each
//! other's answers. The classification is not cached: the classifier is a pure function of the
//! status and headers, cheaper to ask again than to store.
//!
//! # Example
//!
//! A classifier that calls a 418 "rate limited" changes all four layers at once: the gate closes,
//! the budget refunds, the adaptive limit decreases, the retry retries.
//!
//! ```
//! use http::{HeaderMap, StatusCode};
//! use tower_quota::budget::Limits;
//! use tower_quota::classify::{Classification, Classify, DefaultClassifier, Outcome};
//! use tower_quota::{Preset, QuotaContext};
//!
//! struct Teapot;
//! impl Classify for Teapot {
//!     fn classify_response(&self, status: StatusCode, headers: &HeaderMap) -> Classification {
//!         if status == StatusCode::IM_A_TEAPOT {
//!             return Classification::of(Outcome::RateLimited);
//!         }
//!         DefaultClassifier.classify_response(status, headers)
//!     }
//!     fn classify_error(&self, e: &(dyn std::error::Error + 'static)) -> Classification {
//!         DefaultClassifier.classify_error(e)
//!     }
//! }
//!
//! let preset = Preset::anthropic(Limits::new().rpm(50))
//!     .context(QuotaContext::new().classifier(Teapot));
//! # let _ = preset;
//! ```

use crate::classify::{Classification, Classify, DefaultClassifier};
use crate::partition::{ApiKey, PartitionKey, Partitioner, Pool};
use crate::signals::{Signals, SystemClock, WallClock};
use crate::wire::WireMark;
use http::{Request, Response};
use std::error::Error as StdError;
use std::fmt;
use std::sync::{Arc, OnceLock};

/// The partitioner, classifier and wall clock a stack's layers share. Cheap to clone (three
/// `Arc`s). See the [module docs](self).
#[derive(Clone)]
pub struct QuotaContext {
    partitioner: Arc<dyn Partitioner>,
    classifier: Arc<dyn Classify>,
    wall: Arc<dyn WallClock>,
}

impl Default for QuotaContext {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for QuotaContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaContext").finish_non_exhaustive()
    }
}

/// What the layers of a stack leave on a request for the layers below it, in one extension (one
/// insert per request for all of it): the partition and the partitioner that computed it, and the
/// budget's [`WireMark`].
#[derive(Clone, Default)]
pub(crate) struct Stamp {
    partition: Option<(usize, PartitionKey)>,
    pub(crate) wire: Option<WireMark>,
}

/// The address of the value behind an `Arc`: which partitioner or classifier made a cache entry.
fn identity<T: ?Sized>(a: &Arc<T>) -> usize {
    Arc::as_ptr(a).cast::<()>() as usize
}

impl QuotaContext {
    /// Partitions by API key ([`ApiKey`]: a fingerprint of `x-api-key` or `Authorization`, never
    /// the key), judges by the [`DefaultClassifier`] (what the official SDKs retry), and reads the
    /// system clock for HTTP-dates when a response has no `Date` header.
    pub fn new() -> Self {
        // One default of each, shared by every default context: layers built each with its own
        // default context still share the cached partition of a request (the cache is keyed by
        // the partitioner's identity), so the key's fingerprint is computed once per request.
        static DEFAULTS: OnceLock<QuotaContext> = OnceLock::new();
        DEFAULTS
            .get_or_init(|| Self {
                partitioner: Arc::new(ApiKey::new()),
                classifier: Arc::new(DefaultClassifier),
                wall: Arc::new(SystemClock),
            })
            .clone()
    }

    /// How requests map to partitions.
    pub fn partitioner(mut self, p: impl Partitioner) -> Self {
        self.partitioner = Arc::new(p);
        self
    }

    /// How results are judged: what is retried, what pauses the partition, what is refunded, what
    /// counts as back-pressure.
    pub fn classifier(mut self, c: impl Classify) -> Self {
        self.classifier = Arc::new(c);
        self
    }

    /// The wall clock HTTP-dates are measured against when a response has no `Date` header.
    pub fn wall_clock(mut self, w: impl WallClock) -> Self {
        self.wall = Arc::new(w);
        self
    }

    /// The partition of `req`: computed once per request and cached in its extensions.
    pub(crate) fn partition<B>(&self, req: &mut Request<B>) -> PartitionKey {
        if let Some(key) = self.cached_partition(req) {
            return key;
        }
        let key = self.partition_of(req);
        req.extensions_mut()
            .get_or_insert_default::<Stamp>()
            .partition = Some((identity(&self.partitioner), key));
        key
    }

    /// The partition this context's partitioner gave `req` already, if any.
    fn cached_partition<B>(&self, req: &Request<B>) -> Option<PartitionKey> {
        let (made_by, key) = req.extensions().get::<Stamp>()?.partition?;
        (made_by == identity(&self.partitioner)).then_some(key)
    }

    /// The partition of `req`, read from the cache if a layer above computed it, else computed
    /// and not cached: for the innermost layer (the Retry-After gate), where no layer below would
    /// read it and the cache would cost an allocation per request.
    pub(crate) fn partition_here<B>(&self, req: &Request<B>) -> PartitionKey {
        self.cached_partition(req)
            .unwrap_or_else(|| self.partition_of(req))
    }

    /// The partitioner's key for `req`, in the pool of its path.
    fn partition_of<B>(&self, req: &Request<B>) -> PartitionKey {
        self.partitioner
            .partition(req.headers(), req.extensions())
            .in_pool(Pool::of_path(req.uri().path()))
    }

    /// The judgement of `res`. Not cached: a classifier is a pure function of the status and
    /// headers (the default one a match and at most one header lookup), cheaper than an
    /// extension insert; every layer asking the same classifier is what makes it one judgement.
    pub(crate) fn classify<B>(&self, res: &Response<B>) -> Classification {
        self.classifier
            .classify_response(res.status(), res.headers())
    }

    /// The judgement of an error returned instead of a response.
    pub(crate) fn classify_error(&self, e: &(dyn StdError + 'static)) -> Classification {
        self.classifier.classify_error(e)
    }

    /// The parsed signals of `res` (cached in its extensions).
    pub(crate) fn signals<B>(&self, res: &mut Response<B>) -> Arc<Signals> {
        Signals::of_with(res, &*self.wall)
    }

    /// The signals of `res`: the cached snapshot if a layer parsed it already, else parsed now
    /// without caching (for a success no other layer of the stack reads them again, and the cache
    /// would cost two allocations per request).
    pub(crate) fn signals_once<B>(&self, res: &Response<B>) -> Signals {
        match Signals::cached(res) {
            Some(s) => Signals::clone(&s),
            None => Signals::parse_now(res.headers(), &*self.wall),
        }
    }
}
