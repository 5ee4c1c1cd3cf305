//! A Redis [`BudgetStore`] for [tower-quota]: many processes, one API key, one quota.
//!
//! # Why
//!
//! Limits belong to the API key, not to the process. When many workers share one key, budgets kept
//! in each process's memory each believe they own the whole quota, and the fleet sends N times too
//! much (LiteLLM's distributed TPM check has exactly this bug: its cap becomes limit x replicas).
//! [`RedisStore`] keeps the buckets in Redis, so every process reserves from the same ones.
//!
//! # How
//!
//! - **One Lua script per operation** (reserve, adjust, cooldown, learn, snapshot): GCRA per bucket
//!   on the Redis server's clock (`TIME`, so the workers' clocks do not matter), weighted costs,
//!   every bucket of every scope admitted or none, signed adjustments (refunds, extra charges), the
//!   partition's cooldown checked in the same script, the state key's TTL set to the time until
//!   every bucket is full, integer replies only. Limits travel with every call: change them with no
//!   migration.
//! - **EVALSHA, reloading the script** when the server lost it (a restart, `SCRIPT FLUSH`): redis-rs's
//!   [`redis::Script`] does this.
//! - **Keys** carry the partition's fingerprint (never the API key) inside braces, so a partition's
//!   keys share a hash slot (cluster-safe). A reservation over two scopes (a key and the global
//!   cap) touches two slots: on Redis Cluster, give the store one hash tag for everything
//!   ([`RedisStore::single_slot`]).
//! - **Only the head of each process's queue asks Redis**: the [`TokenBudgetLayer`] admits requests
//!   of a partition one at a time in FIFO order, so a process with a thousand waiting requests
//!   sends one script call per wait, not a thousand.
//! - **When Redis is slow or down**: every call has a short timeout (default 50 ms). On a failure
//!   the store switches to its [`OnFailure`] policy: by default a local in-memory budget with each
//!   limit divided by the number of processes sharing the key; or admit everything (fail open); or
//!   refuse (fail closed). The number of processes is learned: every store beats a heartbeat set
//!   in Redis each second, and the fallback divides by the larger of the configured count and the
//!   last count it saw. The fallback starts empty at each switch, so no process takes a fresh
//!   burst the fleet has already spent. It tries Redis again every second and switches back as
//!   soon as it answers; a store can start while Redis is down. Every switch is a `tracing` event.
//!   What each process admitted on its fallback is charged to Redis when it answers again, so a
//!   Redis that comes back (empty after a restart, or stale after a stall) learns what the fleet
//!   spent meanwhile.
//! - **A reservation whose call went unanswered is cancelled**: each reservation carries an id,
//!   and a granted one leaves a receipt in Redis for a minute (what it charged). A call that timed
//!   out may still run when a stalled Redis wakes; its caller was told otherwise (and may have
//!   been served by the fallback, which is charged separately). When Redis answers again, the
//!   store cancels each such id: a receipt found is refunded, and an id not yet run is marked so
//!   that it is refused when it does run. Kept for up to 10 000 unanswered calls.
//! - **When Redis loses the state while it stays up** (`FLUSHALL`, or a restart no process
//!   noticed): a partition's state outlives its last write by 15 minutes at least, and each call
//!   tells the script which of its partitions this process wrote within the last 10. A state that
//!   is gone though this process wrote it recently was lost, not expired: it comes back with every
//!   bucket empty and refills at the limit's rate, instead of handing the fleet a fresh burst it
//!   has already spent. (A process that never wrote the partition cannot tell, and takes it as
//!   new: at most one burst of slack, when a process joins right after a flush.)
//!
//! # Example
//!
//! ```no_run
//! use tower_quota::budget::{Limits, TokenBudgetLayer};
//! use tower_quota_redis::{OnFailure, RedisStore};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let store = RedisStore::connect("redis://127.0.0.1:6379/")
//!     .await?
//!     .on_failure(OnFailure::Fallback { workers: 4 });
//! let budget = TokenBudgetLayer::new(Limits::new().rpm(50).itpm(30_000).otpm(8_000)).store(store);
//! # let _ = budget; Ok(()) }
//! ```
//!
//! [tower-quota]: tower_quota
//! [`TokenBudgetLayer`]: tower_quota::budget::TokenBudgetLayer

#![forbid(unsafe_code)]

mod scripts;

use redis::aio::ConnectionManager;
use redis::{Client, RedisError};
use scripts::Scripts;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower_quota::budget::store::{
    Admission, BudgetStore, Charged, Delta, Learned, MemoryStore, Scope, Snapshot, StoreError,
    StoreFuture, WaitReason,
};
use tower_quota::budget::{Bucket, Cost, Limit, Limits};
use tower_quota::partition::PartitionKey;

/// What the store does while Redis does not answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// Keep a local in-memory budget, each limit divided by `workers` (the processes expected to
    /// share the key) or by the fleet's size counted through Redis if that is larger, starting
    /// empty, so the fleet stays within the quota without Redis. The default, with 1 worker.
    Fallback {
        /// How many processes share each key.
        workers: u32,
    },
    /// Admit every request (rely on the server's 429s and the Retry-After gate).
    FailOpen,
    /// Refuse every reservation with an error until Redis answers.
    FailClosed,
}

/// A [`BudgetStore`] in Redis, shared by every process that uses the same Redis and prefix.
/// Cloning is cheap; clones share the connection and the health state.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// The connection, once made: a store may start while Redis is down.
    conn: tokio::sync::OnceCell<ConnectionManager>,
    /// What to connect with, when the store was given a URL.
    client: Option<Client>,
    scripts: Scripts,
    prefix: String,
    single_slot: bool,
    timeout: Duration,
    on_failure: OnFailure,
    fallback: MemoryStore,
    health: Mutex<Health>,
    /// This process's id in the fleet's heartbeat set.
    id: String,
    /// The processes the heartbeat last counted (0: not known yet).
    live_workers: AtomicU32,
    /// When this process last wrote each partition's state in Redis: a state that is gone though
    /// it was written within [`scripts::KNOWN_FOR`] was lost by Redis (`FLUSHALL`, a restart
    /// without persistence), and comes back empty instead of full.
    known: Mutex<HashMap<PartitionKey, Instant>>,
    /// What this process admitted (and settled) on its fallback, not yet told to Redis: charged to
    /// Redis when it answers again, so a Redis that comes back (empty after a restart, or stale
    /// after a stall) learns what the fleet spent meanwhile.
    debts: Mutex<HashMap<Vec<PartitionKey>, (Vec<Scope>, Delta)>>,
    /// The next reservation's number (its id is this process's id and the number).
    next_id: AtomicU64,
    /// Reservations whose calls went unanswered, each with its id: cancelled when Redis answers
    /// again.
    late: Mutex<Vec<(Vec<Scope>, String)>>,
}

impl Inner {
    /// The default settings and a fresh state over `conn` (or a connection made from `client`).
    fn fresh(conn: tokio::sync::OnceCell<ConnectionManager>, client: Option<Client>) -> Self {
        Self {
            conn,
            client,
            scripts: Scripts::new(),
            prefix: "tq:".to_owned(),
            single_slot: false,
            timeout: RedisStore::DEFAULT_TIMEOUT,
            on_failure: OnFailure::Fallback { workers: 1 },
            fallback: MemoryStore::starting_empty(MemoryStore::DEFAULT_MAX_PARTITIONS),
            health: Mutex::new(Health {
                down_since: None,
                next_try: Instant::now(),
            }),
            id: process_id(),
            live_workers: AtomicU32::new(0),
            known: Mutex::new(HashMap::new()),
            debts: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            late: Mutex::new(Vec::new()),
        }
    }
}

/// The most sets of scopes a fallback keeps debts for (beyond, new ones are not recorded).
const MAX_DEBTS: usize = 10_000;

/// The most unanswered reservations a process keeps to cancel (beyond, one that Redis runs late
/// is charged: the budget errs on the side of less).
const MAX_LATE: usize = 10_000;

/// How a script call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unanswered {
    /// Never sent (Redis known down, or no connection).
    NotSent,
    /// Sent, and no answer in time (or an error): Redis may have run it, or may run it later.
    Sent,
}

/// The most partitions a process remembers writing (beyond, a new one is not remembered: if Redis
/// loses its state, it comes back full, as it would for a process that never wrote it).
const MAX_KNOWN: usize = 10_000;

#[derive(Debug)]
struct Health {
    down_since: Option<Instant>,
    next_try: Instant,
}

/// How often a store beats the fleet's heartbeat (a process counts for three beats).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// A process id for the heartbeat set: random, never the key or anything about the host.
fn process_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// How long Redis is left alone after a failure before it is tried again.
const RETRY_REDIS_AFTER: Duration = Duration::from_secs(1);

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .field("on_failure", &self.inner.on_failure)
            .field("redis_up", &self.is_up())
            .finish()
    }
}

impl RedisStore {
    /// Default timeout of one script call: 50 ms, a hundred times a loopback round trip, short
    /// enough that a stalled Redis costs a request little before the fallback takes over.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);

    /// Connects to `url` (`redis://host:port/db`) with a `ConnectionManager` (reconnects on its
    /// own), keys prefixed `tq:`, the default timeout and the local fallback for one worker.
    ///
    /// Redis need not be up: a store that cannot reach it yet starts on its failure policy (the
    /// local fallback by default) and connects once Redis answers, tried at most once a second.
    ///
    /// # Errors
    ///
    /// If the URL is invalid.
    pub async fn connect(url: &str) -> Result<Self, RedisError> {
        let client = Client::open(url)?;
        let store = Self::build(tokio::sync::OnceCell::new(), Some(client));
        let _ = store.connection().await;
        store.start_heartbeat();
        Ok(store)
    }

    /// A store over an existing connection manager.
    pub fn from_connection(conn: ConnectionManager) -> Self {
        let store = Self::build(tokio::sync::OnceCell::new_with(Some(conn)), None);
        store.start_heartbeat();
        store
    }

    fn build(conn: tokio::sync::OnceCell<ConnectionManager>, client: Option<Client>) -> Self {
        Self {
            inner: Arc::new(Inner::fresh(conn, client)),
        }
    }

    /// Beats the fleet's heartbeat every [`HEARTBEAT_EVERY`] while any clone of the store lives,
    /// keeping the count of live processes the fallback divides the limits by.
    fn start_heartbeat(&self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        rt.spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let store = RedisStore { inner };
                store.beat().await;
                drop(store);
                tokio::time::sleep(HEARTBEAT_EVERY).await;
            }
        });
    }

    async fn beat(&self) {
        let Some(mut conn) = self.inner.conn.get().cloned() else {
            return;
        };
        let key = format!("{{{}}}workers", self.inner.prefix);
        let ttl = u64::try_from((HEARTBEAT_EVERY * 3).as_millis()).unwrap_or(u64::MAX);
        let mut inv = self.inner.scripts.heartbeat.prepare_invoke();
        inv.key(key).arg(&self.inner.id).arg(ttl);
        let beat = tokio::time::timeout(self.inner.timeout * 4, inv.invoke_async::<u32>(&mut conn));
        if let Ok(Ok(n)) = beat.await {
            self.inner.live_workers.store(n, Ordering::Relaxed);
        }
    }

    /// Records what the fallback admitted or settled for `scopes`, to be charged to Redis later.
    fn owe(&self, scopes: &[Scope], delta: Delta) {
        if delta.is_zero() {
            return;
        }
        let key: Vec<PartitionKey> = scopes.iter().map(|s| s.partition).collect();
        let mut debts = self.inner.debts.lock().unwrap_or_else(|e| e.into_inner());
        if !debts.contains_key(&key) && debts.len() >= MAX_DEBTS {
            return;
        }
        let (_, owed) = debts.entry(key).or_insert_with(|| {
            (
                scopes.to_vec(),
                Delta {
                    only: delta.only,
                    ..Delta::default()
                },
            )
        });
        owed.requests = owed.requests.saturating_add(delta.requests);
        owed.input_tokens = owed.input_tokens.saturating_add(delta.input_tokens);
        owed.output_tokens = owed.output_tokens.saturating_add(delta.output_tokens);
        owed.only = Charged(owed.only.0 | delta.only.0);
    }

    /// Charges Redis what the fallback admitted meanwhile (in the background: called as Redis
    /// answers again).
    fn repay(&self) {
        let debts =
            std::mem::take(&mut *self.inner.debts.lock().unwrap_or_else(|e| e.into_inner()));
        if debts.is_empty() {
            return;
        }
        self.in_background(|store| async move {
            for (_, (scopes, delta)) in debts {
                if !store.redis_adjust(&scopes, delta).await {
                    store.owe(&scopes, delta);
                }
            }
        });
    }

    /// The mask of `scopes` this process wrote within [`scripts::KNOWN_FOR`] (bit s for scope s).
    fn known_mask(&self, scopes: &[Scope]) -> u64 {
        let known = self.inner.known.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let fresh = Duration::from_millis(scripts::KNOWN_FOR);
        scopes
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                known
                    .get(&s.partition)
                    .is_some_and(|&at| now.saturating_duration_since(at) < fresh)
            })
            .fold(0, |mask, (i, _)| mask | (1 << i))
    }

    /// Remembers that this process wrote the state of `partitions` in Redis just now.
    fn wrote(&self, partitions: impl IntoIterator<Item = PartitionKey>) {
        let mut known = self.inner.known.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        for p in partitions {
            if known.len() >= MAX_KNOWN && !known.contains_key(&p) {
                let fresh = Duration::from_millis(scripts::KNOWN_FOR);
                known.retain(|_, &mut at| now.saturating_duration_since(at) < fresh);
                if known.len() >= MAX_KNOWN {
                    continue;
                }
            }
            known.insert(p, now);
        }
    }

    /// Ends a script call's arguments as every script but the heartbeat expects: how long a state
    /// outlives its last write, and the mask of the scopes this process knows.
    fn tail(&self, inv: &mut redis::ScriptInvocation<'_>, scopes: &[Scope]) {
        inv.arg(scripts::KEEP).arg(self.known_mask(scopes));
    }

    /// Adds the state and learned-limits keys of every scope to a script call.
    fn scope_keys(&self, inv: &mut redis::ScriptInvocation<'_>, scopes: &[Scope]) {
        for s in scopes {
            let (sk, lk) = self.keys(s.partition);
            inv.key(sk).key(lk);
        }
    }

    /// Applies `delta` in Redis; whether Redis took it.
    async fn redis_adjust(&self, scopes: &[Scope], delta: Delta) -> bool {
        let mut inv = self.inner.scripts.adjust.prepare_invoke();
        self.scope_keys(&mut inv, scopes);
        inv.arg(scopes.len())
            .arg(delta.requests)
            .arg(delta.input_tokens)
            .arg(delta.output_tokens)
            .arg(delta.only.0)
            .arg(Self::invoke_args(scopes));
        self.tail(&mut inv, scopes);
        self.call::<i64>("adjust", &inv).await.is_some()
    }

    /// The processes the fallback divides each limit by: the configured count, or the fleet's
    /// last counted size if larger (the safe side).
    fn fallback_workers(&self, configured: u32) -> u32 {
        configured.max(self.inner.live_workers.load(Ordering::Relaxed))
    }

    fn rebuild(&self, f: impl FnOnce(&mut Inner)) -> Self {
        let i = &self.inner;
        // The settings carry over; the state (health, fallback, debts, heartbeat) starts afresh.
        let mut inner = Inner::fresh(i.conn.clone(), i.client.clone());
        inner.prefix = i.prefix.clone();
        inner.single_slot = i.single_slot;
        inner.timeout = i.timeout;
        inner.on_failure = i.on_failure;
        f(&mut inner);
        let store = Self {
            inner: Arc::new(inner),
        };
        // The old state's heartbeat ends with it.
        store.start_heartbeat();
        store
    }

    /// The key prefix (default `tq:`): stores with different prefixes share nothing.
    pub fn prefix(self, prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        self.rebuild(|i| i.prefix = prefix)
    }

    /// One hash slot for every key, so reservations over several scopes work on Redis Cluster.
    pub fn single_slot(self) -> Self {
        self.rebuild(|i| i.single_slot = true)
    }

    /// The timeout of one script call.
    pub fn timeout(self, timeout: Duration) -> Self {
        self.rebuild(|i| i.timeout = timeout)
    }

    /// What to do while Redis does not answer.
    pub fn on_failure(self, policy: OnFailure) -> Self {
        self.rebuild(|i| i.on_failure = policy)
    }

    /// Whether the last call reached Redis.
    pub fn is_up(&self) -> bool {
        self.health().down_since.is_none()
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.inner.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A key of partition `p` (`s` its state, `l` its learned limits, `r:<id>` a receipt), in the
    /// partition's hash slot, or in the store's one slot ([`RedisStore::single_slot`]).
    fn key(&self, p: PartitionKey, suffix: &str) -> String {
        let prefix = &self.inner.prefix;
        if self.inner.single_slot {
            format!("{{{prefix}}}{p}:{suffix}")
        } else {
            format!("{prefix}{{{p}}}:{suffix}")
        }
    }

    /// The state and learned-limits keys of partition `p`.
    fn keys(&self, p: PartitionKey) -> (String, String) {
        (self.key(p, "s"), self.key(p, "l"))
    }

    /// Whether to ask Redis now (up, or down long enough to try again).
    fn should_try(&self) -> bool {
        let h = self.health();
        h.down_since.is_none() || Instant::now() >= h.next_try
    }

    fn mark(&self, ok: bool, what: &str, error: Option<&str>) {
        let mut h = self.health();
        let now = Instant::now();
        match (ok, h.down_since) {
            (true, Some(since)) => {
                tracing::info!(
                    down_for_ms = now.saturating_duration_since(since).as_millis() as u64,
                    "budget store: Redis answers again, back to the shared budget"
                );
                h.down_since = None;
                self.repay();
                self.cancel_late();
            }
            (false, None) => {
                tracing::warn!(
                    operation = what,
                    error = error.unwrap_or("timeout"),
                    policy = ?self.inner.on_failure,
                    "budget store: Redis failed, switching to the failure policy"
                );
                h.down_since = Some(now);
                h.next_try = now + RETRY_REDIS_AFTER;
                // The fallback takes over from nothing: what it held from an earlier outage
                // (full buckets by now) would be a fresh burst the fleet has already spent.
                self.inner.fallback.clear();
            }
            (false, Some(_)) => h.next_try = now + RETRY_REDIS_AFTER,
            (true, None) => {}
        }
    }

    /// The connection, made now if it was not yet (when Redis may be tried); `None` while Redis
    /// cannot be reached.
    async fn connection(&self) -> Option<ConnectionManager> {
        if let Some(c) = self.inner.conn.get() {
            return Some(c.clone());
        }
        let client = self.inner.client.as_ref()?;
        if !self.should_try() {
            return None;
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(200)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1);
        let made = ConnectionManager::new_with_config(client.clone(), config);
        match tokio::time::timeout(Duration::from_millis(500), made).await {
            Ok(Ok(c)) => {
                // Another task may have connected meanwhile: either connection serves.
                let _ = self.inner.conn.set(c.clone());
                Some(c)
            }
            Ok(Err(e)) => {
                self.mark(false, "connect", Some(&e.to_string()));
                None
            }
            Err(_) => {
                self.mark(false, "connect", None);
                None
            }
        }
    }

    /// Runs a script on Redis within the timeout; `None` (and Redis marked down) if it fails.
    async fn call<T: redis::FromRedisValue>(
        &self,
        what: &str,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Option<T> {
        self.try_call(what, inv).await.ok()
    }

    /// As [`RedisStore::call`], telling a failure after the call was sent (Redis may still run it)
    /// from one before.
    async fn try_call<T: redis::FromRedisValue>(
        &self,
        what: &str,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<T, Unanswered> {
        if !self.should_try() {
            return Err(Unanswered::NotSent);
        }
        let mut conn = self.connection().await.ok_or(Unanswered::NotSent)?;
        match tokio::time::timeout(self.inner.timeout, inv.invoke_async(&mut conn)).await {
            Ok(Ok(v)) => {
                self.mark(true, what, None);
                Ok(v)
            }
            Ok(Err(e)) => {
                self.mark(false, what, Some(&e.to_string()));
                Err(Unanswered::Sent)
            }
            Err(_) => {
                self.mark(false, what, None);
                Err(Unanswered::Sent)
            }
        }
    }

    /// Runs `work` with a clone of the store on the current tokio runtime (nothing, outside one).
    fn in_background<F, Fut>(&self, work: F)
    where
        F: FnOnce(RedisStore) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(work(self.clone()));
        }
    }

    /// Remembers a reservation whose call went unanswered, to cancel it when Redis answers again.
    fn unsure(&self, scopes: &[Scope], id: String) {
        let mut late = self.inner.late.lock().unwrap_or_else(|e| e.into_inner());
        if late.len() < MAX_LATE {
            late.push((scopes.to_vec(), id));
        }
    }

    /// Cancels the reservations whose calls went unanswered (in the background: called as Redis
    /// answers again). One that Redis ran late is refunded; one it has not run yet never will be.
    fn cancel_late(&self) {
        let late = std::mem::take(&mut *self.inner.late.lock().unwrap_or_else(|e| e.into_inner()));
        if late.is_empty() {
            return;
        }
        self.in_background(|store| async move {
            for (scopes, id) in late {
                let mut inv = store.inner.scripts.cancel.prepare_invoke();
                store.scope_keys(&mut inv, &scopes);
                inv.key(store.receipt_key(&scopes, &id));
                inv.arg(scopes.len()).arg(Self::invoke_args(&scopes));
                store.tail(&mut inv, &scopes);
                if store.call::<i64>("cancel", &inv).await.is_none() {
                    store.unsure(&scopes, id);
                }
            }
        });
    }

    /// The key of a reservation's receipt (in its first scope's hash slot).
    fn receipt_key(&self, scopes: &[Scope], id: &str) -> String {
        let p = scopes
            .first()
            .map_or(PartitionKey::ANONYMOUS, |s| s.partition);
        self.key(p, &format!("r:{id}"))
    }

    /// The scopes as the fallback sees them: each limit divided among the workers.
    fn local_scopes(&self, scopes: &[Scope], workers: u32) -> Vec<Scope> {
        scopes
            .iter()
            .map(|s| {
                let mut limits = s.limits;
                for b in Bucket::ALL {
                    limits.set(b, s.limits.get(b).map(|l| share(l, workers)));
                }
                Scope {
                    partition: s.partition,
                    limits,
                }
            })
            .collect()
    }

    /// A scope of `partition` alone, for the scripts of one partition.
    fn bare(partition: PartitionKey) -> Scope {
        Scope {
            partition,
            limits: Limits::new(),
        }
    }

    fn invoke_args(scopes: &[Scope]) -> Vec<u64> {
        let mut v = Vec::with_capacity(8 * scopes.len());
        for s in scopes {
            v.extend(limit_args(&s.limits));
        }
        v
    }

    async fn redis_reserve(&self, scopes: &[Scope], cost: Cost) -> Option<Admission> {
        let id = format!(
            "{}-{}",
            self.inner.id,
            self.inner.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let mut inv = self.inner.scripts.reserve.prepare_invoke();
        self.scope_keys(&mut inv, scopes);
        inv.key(self.receipt_key(scopes, &id));
        inv.arg(scopes.len())
            .arg(cost.requests)
            .arg(cost.input_tokens)
            .arg(cost.output_tokens)
            .arg(Self::invoke_args(scopes));
        self.tail(&mut inv, scopes);
        let reply: Vec<i64> = match self.try_call("reserve", &inv).await {
            Ok(reply) => reply,
            Err(Unanswered::Sent) => {
                // Redis may run it later: the caller will not have it, so neither may Redis.
                self.unsure(scopes, id);
                return None;
            }
            Err(Unanswered::NotSent) => return None,
        };
        let admission = decode_admission(&reply, scopes);
        if let Admission::Granted { charged } = admission {
            // The scopes with a charged bucket now have a state in Redis.
            self.wrote(
                scopes
                    .iter()
                    .enumerate()
                    .filter(|&(i, _)| (charged.0 >> (4 * i)) & 0xf != 0)
                    .map(|(_, s)| s.partition),
            );
        }
        Some(admission)
    }
}

/// The refusal of a cost that needs a bucket configured at 0 a minute, if any.
fn zero_limit(scopes: &[Scope], cost: Cost) -> Option<Admission> {
    scopes.iter().find_map(|s| {
        Bucket::ALL.into_iter().find_map(|b| {
            let needed = cost.of(b);
            let zero = s.limits.get(b).is_some_and(|l| l.capacity() == 0);
            (zero && needed > 0).then_some(Admission::TooLarge {
                partition: s.partition,
                bucket: b,
                needed,
                capacity: 0,
            })
        })
    })
}

/// A limit's share for one of `workers` processes (a limit of 0 stays 0).
fn share(l: Limit, workers: u32) -> Limit {
    if l.capacity() == 0 {
        return Limit::per_minute(0);
    }
    let w = u64::from(workers.max(1));
    Limit {
        per_minute: (l.per_minute / w).max(1),
        burst: Some((l.capacity() / w).max(1)),
    }
}

fn limit_args(l: &Limits) -> [u64; 8] {
    let mut a = [0; 8];
    for (i, b) in Bucket::ALL.into_iter().enumerate() {
        if let Some(limit) = l.get(b) {
            a[2 * i] = limit.per_minute;
            a[2 * i + 1] = limit.capacity();
        }
    }
    a
}

fn bucket(n: i64) -> Bucket {
    Bucket::ALL[(n.clamp(0, 3)) as usize]
}

fn decode_admission(r: &[i64], scopes: &[Scope]) -> Admission {
    let get = |i: usize| r.get(i).copied().unwrap_or(0);
    let partition = scopes
        .get(get(3).max(0) as usize)
        .map_or(PartitionKey::ANONYMOUS, |s| s.partition);
    match get(0) {
        // 3 (cancelled before it ran) reaches no caller: its caller gave up on the call.
        0 => Admission::Granted {
            charged: Charged(get(6) as u16),
        },
        1 => Admission::Wait {
            retry_in: Duration::from_micros(get(1).max(0) as u64),
            partition,
            reason: if get(2) == 4 {
                WaitReason::Cooldown
            } else {
                WaitReason::Bucket(bucket(get(2)))
            },
        },
        _ => Admission::TooLarge {
            partition,
            bucket: bucket(get(2)),
            needed: get(4).max(0) as u64,
            capacity: get(5).max(0) as u64,
        },
    }
}

fn failed_closed() -> StoreError {
    StoreError("Redis does not answer and the store fails closed".into())
}

impl BudgetStore for RedisStore {
    fn reserve<'a>(&'a self, scopes: &'a [Scope], cost: Cost) -> StoreFuture<'a, Admission> {
        Box::pin(async move {
            // A configured limit of 0 refuses whatever the state: answered here, so the scripts
            // (where 0 means "not configured, use the learned limit") never see it.
            if let Some(refused) = zero_limit(scopes, cost) {
                return Ok(refused);
            }
            if let Some(a) = self.redis_reserve(scopes, cost).await {
                return Ok(a);
            }
            match self.inner.on_failure {
                OnFailure::Fallback { workers } => {
                    let local = self.local_scopes(scopes, self.fallback_workers(workers));
                    let answer = self.inner.fallback.reserve_now(&local, cost);
                    if let Admission::Granted { charged } = answer {
                        self.owe(
                            scopes,
                            Delta {
                                only: charged,
                                ..Delta::between(Cost::default(), cost)
                            },
                        );
                    }
                    Ok(answer)
                }
                // Nothing charged anywhere: nothing to settle later.
                OnFailure::FailOpen => Ok(Admission::Granted {
                    charged: Charged::NONE,
                }),
                OnFailure::FailClosed => Err(failed_closed()),
            }
        })
    }

    fn adjust<'a>(&'a self, scopes: &'a [Scope], delta: Delta) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            if self.redis_adjust(scopes, delta).await {
                return Ok(());
            }
            if let OnFailure::Fallback { workers } = self.inner.on_failure {
                let local = self.local_scopes(scopes, self.fallback_workers(workers));
                self.inner.fallback.adjust_now(&local, delta);
                self.owe(scopes, delta);
            }
            Ok(())
        })
    }

    fn cooldown<'a>(&'a self, partition: PartitionKey, duration: Duration) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let (sk, _) = self.keys(partition);
            let us = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX / 2);
            let mut inv = self.inner.scripts.cooldown.prepare_invoke();
            inv.key(sk).arg(us);
            self.tail(&mut inv, &[Self::bare(partition)]);
            if self.call::<i64>("cooldown", &inv).await.is_none() {
                self.inner.fallback.cooldown(partition, duration).await?;
            } else {
                self.wrote([partition]);
            }
            Ok(())
        })
    }

    fn learn<'a>(&'a self, partition: PartitionKey, learned: &'a [Learned]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let (sk, lk) = self.keys(partition);
            let mut args = [-1i64; 8];
            for l in learned {
                let i = l.bucket as usize;
                args[2 * i] = l.limit.map_or(-1, |n| n.min(i64::MAX as u64) as i64);
                // Redis's levels do not go below empty on a count: what is unseen is taken from
                // the remaining count, down to nothing.
                args[2 * i + 1] = l.remaining.map_or(-1, |n| {
                    n.saturating_sub(l.unseen).min(i64::MAX as u64) as i64
                });
            }
            let mut inv = self.inner.scripts.learn.prepare_invoke();
            inv.key(sk).key(lk).arg(&args[..]);
            self.tail(&mut inv, &[Self::bare(partition)]);
            if self.call::<i64>("learn", &inv).await.is_none() {
                if let OnFailure::Fallback { workers } = self.inner.on_failure {
                    let w = u64::from(self.fallback_workers(workers).max(1));
                    let local: Vec<Learned> = learned
                        .iter()
                        .map(|l| Learned {
                            bucket: l.bucket,
                            limit: l.limit.map(|n| (n / w).max(1)),
                            remaining: l.remaining.map(|n| n / w),
                            inferred: l.inferred,
                            unseen: l.unseen / w,
                        })
                        .collect();
                    self.inner.fallback.learn(partition, &local).await?;
                }
            }
            Ok(())
        })
    }

    fn snapshot<'a>(
        &'a self,
        partition: PartitionKey,
        limits: Limits,
    ) -> StoreFuture<'a, Option<Snapshot>> {
        Box::pin(async move {
            let (sk, lk) = self.keys(partition);
            let mut inv = self.inner.scripts.snapshot.prepare_invoke();
            inv.key(sk).key(lk).arg(&limit_args(&limits)[..]);
            self.tail(&mut inv, &[Self::bare(partition)]);
            let Some(r) = self.call::<Vec<i64>>("snapshot", &inv).await else {
                return self.inner.fallback.snapshot(partition, limits).await;
            };
            let mut snap = Snapshot::default();
            for b in 0..4 {
                if r.get(3 * b).copied() == Some(1) {
                    let level = r.get(3 * b + 1).copied().unwrap_or(0) as f64 / 1000.0;
                    let cap = r.get(3 * b + 2).copied().unwrap_or(0).max(0) as u64;
                    snap.buckets[b] = Some((level, cap));
                }
            }
            let cd = r.get(12).copied().unwrap_or(0);
            snap.cooldown = (cd > 0).then(|| Duration::from_micros(cd as u64));
            Ok(Some(snap))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_and_args() {
        assert_eq!(
            share(Limit::per_minute(100), 4),
            Limit {
                per_minute: 25,
                burst: Some(25)
            }
        );
        assert_eq!(share(Limit::per_minute(3), 4).per_minute, 1);
        let a = limit_args(&Limits::new().rpm(60).otpm(8000));
        assert_eq!(a, [60, 60, 0, 0, 0, 0, 8000, 8000]);
    }

    #[test]
    fn replies_decode() {
        let scopes = [Scope {
            partition: PartitionKey::from_u64(5),
            limits: Limits::new(),
        }];
        assert_eq!(
            decode_admission(&[0, 0, 0, 0, 0, 0, 3], &scopes),
            Admission::Granted {
                charged: Charged(3)
            }
        );
        assert_eq!(
            decode_admission(&[1, 1500, 4, 0, 0, 0, 0], &scopes),
            Admission::Wait {
                retry_in: Duration::from_micros(1500),
                partition: PartitionKey::from_u64(5),
                reason: WaitReason::Cooldown
            }
        );
        assert_eq!(
            decode_admission(&[2, 0, 2, 0, 250, 100, 0], &scopes),
            Admission::TooLarge {
                partition: PartitionKey::from_u64(5),
                bucket: Bucket::InputTokens,
                needed: 250,
                capacity: 100
            }
        );
    }
}
