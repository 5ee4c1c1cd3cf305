//! Where budget state lives: the [`BudgetStore`] trait, the values it trades in, and the
//! in-memory store.
//!
//! A user of the budget needs [`MemoryStore`] (the default) or a store of another crate
//! (`tower-quota-redis`); the rest of this module is for those who implement a store: every
//! operation is atomic (a reservation takes every bucket of every scope or none), and
//! `budget::conformance` (feature `conformance`) is the suite each store must pass.

use super::{Bucket, Cost, Limits};
use crate::BoxError;
use crate::partition::PartitionKey;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// The future a store operation returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A store failed (a Redis store that cannot reach Redis, for example).
#[derive(Debug)]
pub struct StoreError(pub BoxError);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the budget store failed")
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// One set of buckets a reservation draws on: a partition (an API key fingerprint, or
/// [`PartitionKey::GLOBAL`]) with its configured limits. Limits travel with every call, so they can
/// change with no migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scope {
    /// The partition.
    pub partition: PartitionKey,
    /// Its configured limits (unset buckets use what the store learned).
    pub limits: Limits,
}

/// Why a reservation must wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WaitReason {
    /// This bucket has too little left.
    Bucket(Bucket),
    /// The partition is in a cooldown the server announced.
    Cooldown,
    /// The store tracks as many partitions as it may, none of them idle yet: a new partition
    /// waits until one is (forgetting a busy one would hand its key a fresh burst).
    StoreFull,
}

/// Which buckets of which scopes a reservation was charged to: bit `4 * scope + bucket` (scope as
/// its index in the slice, bucket as its index in [`Bucket::ALL`]). A bucket that did not exist
/// when the request was admitted (its limit not known yet) is not charged, so it must not be
/// refunded or settled either.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Charged(pub u16);

impl Charged {
    /// Every bucket of every scope.
    pub const ALL: Charged = Charged(u16::MAX);
    /// No bucket.
    pub const NONE: Charged = Charged(0);

    /// Whether bucket `b` of scope number `scope` is included.
    pub fn contains(self, scope: usize, b: Bucket) -> bool {
        scope < 4 && self.0 & (1 << (4 * scope + b as usize)) != 0
    }

    /// This set with bucket `b` of scope number `scope` added.
    pub fn with(self, scope: usize, b: Bucket) -> Self {
        if scope < 4 {
            Charged(self.0 | 1 << (4 * scope + b as usize))
        } else {
            self
        }
    }
}

impl Default for Charged {
    fn default() -> Self {
        Self::ALL
    }
}

/// The answer to a reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Admission {
    /// Reserved from every bucket of every scope that exists.
    Granted {
        /// The buckets charged.
        charged: Charged,
    },
    /// Nothing was reserved; ask again after `retry_in`.
    Wait {
        /// How long until the cost fits (or the cooldown ends).
        retry_in: Duration,
        /// The partition that binds.
        partition: PartitionKey,
        /// What binds.
        reason: WaitReason,
    },
    /// Nothing was reserved, and the cost never fits: it exceeds a bucket's capacity.
    TooLarge {
        /// The partition whose bucket is too small.
        partition: PartitionKey,
        /// The bucket.
        bucket: Bucket,
        /// What the request needs from it.
        needed: u64,
        /// What the bucket holds when full.
        capacity: u64,
    },
}

/// A signed change to the buckets of the scopes: negative refunds, positive charges more. Only the
/// buckets in `only` change (by default all).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// Requests.
    pub requests: i64,
    /// Input tokens.
    pub input_tokens: i64,
    /// Output tokens.
    pub output_tokens: i64,
    /// The buckets it applies to.
    pub only: Charged,
}

impl Delta {
    /// `actual - estimate`.
    pub fn between(estimate: Cost, actual: Cost) -> Self {
        // In i128, clamped: a huge charge stays a charge (never wraps into a refund).
        let d = |a: u64, e: u64| {
            (i128::from(a) - i128::from(e)).clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
        };
        Self {
            requests: d(actual.requests, estimate.requests),
            input_tokens: d(actual.input_tokens, estimate.input_tokens),
            output_tokens: d(actual.output_tokens, estimate.output_tokens),
            only: Charged::ALL,
        }
    }

    /// A refund of all of `cost`.
    pub fn refund(cost: Cost) -> Self {
        Self::between(cost, Cost::default())
    }

    /// The change to `bucket`.
    pub fn of(&self, bucket: Bucket) -> i64 {
        match bucket {
            Bucket::Requests => self.requests,
            Bucket::Tokens => self.input_tokens.saturating_add(self.output_tokens),
            Bucket::InputTokens => self.input_tokens,
            Bucket::OutputTokens => self.output_tokens,
        }
    }

    /// Whether it changes nothing.
    pub fn is_zero(&self) -> bool {
        (self.requests, self.input_tokens, self.output_tokens) == (0, 0, 0)
            || self.only == Charged::NONE
    }
}

/// What the server said about one bucket, for [`BudgetStore::learn`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Learned {
    /// The bucket.
    pub bucket: Bucket,
    /// Its capacity per minute, if the server said.
    pub limit: Option<u64>,
    /// What is left, if the server said.
    pub remaining: Option<u64>,
    /// The limit was inferred by the client (from 429s, when the server sends no rate-limit
    /// headers), not said by the server: a guess to pace by, and `remaining` is the client's
    /// reading of a 429 (empty). A store must not read it as the server's count (the
    /// `MemoryStore` does not estimate other clients' use from it).
    pub inferred: bool,
    /// Units this client admitted that the server has not counted yet (requests still held in
    /// the layers inside the budget): the level is pulled down to `remaining - unseen`.
    pub unseen: u64,
}

/// A view of one partition's buckets.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Per bucket ([`Bucket::ALL`] order): the level now and the capacity, if the bucket exists.
    pub buckets: [Option<(f64, u64)>; 4],
    /// How long the partition's cooldown still runs.
    pub cooldown: Option<Duration>,
}

impl Snapshot {
    /// The level and capacity of `bucket`.
    pub fn bucket(&self, bucket: Bucket) -> Option<(f64, u64)> {
        self.buckets[bucket as usize]
    }
}

/// Where budget state lives. Every operation is atomic: a reservation takes every bucket of every
/// scope or none. Implementations: [`MemoryStore`] (one process), the Redis store (many).
/// `budget::conformance` (feature `conformance`) has the suite each must pass.
pub trait BudgetStore: Send + Sync + 'static {
    /// Reserves `cost` from every bucket of every scope, or nothing.
    fn reserve<'a>(&'a self, scopes: &'a [Scope], cost: Cost) -> StoreFuture<'a, Admission>;

    /// As [`reserve`](Self::reserve), answered at once when the store can answer without waiting
    /// on anything (an in-memory store always can); `None` (the default): call `reserve`. The
    /// budget asks this first, so a store that answers here costs no allocation per request.
    fn try_reserve(&self, scopes: &[Scope], cost: Cost) -> Option<Result<Admission, StoreError>> {
        let _ = (scopes, cost);
        None
    }

    /// Applies a signed change to every bucket of every scope (a level may go below zero: the
    /// debt is paid by the refill).
    fn adjust<'a>(&'a self, scopes: &'a [Scope], delta: Delta) -> StoreFuture<'a, ()>;

    /// Pauses `partition` for `duration` (or longer, if it already is).
    fn cooldown<'a>(&'a self, partition: PartitionKey, duration: Duration) -> StoreFuture<'a, ()>;

    /// Re-seeds `partition` from the server's word: learned limits create missing buckets, a
    /// remaining count pulls a bucket's level down to it (never up).
    fn learn<'a>(&'a self, partition: PartitionKey, learned: &'a [Learned]) -> StoreFuture<'a, ()>;

    /// As [`learn`](Self::learn), done at once when the store can do it without waiting on
    /// anything; `None` (the default): call `learn`. The budget asks this first, on every answer
    /// that carries rate-limit headers, so a store that learns here costs no allocation per answer.
    fn try_learn(
        &self,
        partition: PartitionKey,
        learned: &[Learned],
    ) -> Option<Result<(), StoreError>> {
        let _ = (partition, learned);
        None
    }

    /// The partition's buckets now, with `limits` configured.
    fn snapshot<'a>(
        &'a self,
        partition: PartitionKey,
        limits: Limits,
    ) -> StoreFuture<'a, Option<Snapshot>>;
}

mod memory;

pub use memory::MemoryStore;
