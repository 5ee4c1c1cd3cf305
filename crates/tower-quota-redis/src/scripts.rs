//! The Lua scripts, one per operation.
//!
//! Each bucket is a GCRA cell on the Redis server's clock (`TIME`, microseconds): its theoretical
//! arrival time `t<b>` says how much is used (`(tat - now) / interval` units), which is exactly a
//! continuously refilling token bucket: the level is `capacity - used`. A refund moves `tat` back
//! (never before `now`: a bucket never holds more than its capacity), a charge moves it forward
//! (past `now + capacity * interval` the bucket is in debt). Bucket numbers follow
//! `tower_quota::budget::Bucket::ALL`: 0 requests, 1 tokens, 2 input tokens, 3 output tokens.
//!
//! Keys: per partition, a state hash `{prefix}{<fingerprint>}:s` (fields `t<b>`, `i<b>` the interval
//! in microseconds, `c<b>` the capacity, `cd` the cooldown's end, `z` the moment every bucket
//! without a `t<b>` was last known empty) whose TTL is the time until every bucket is full again
//! and at least [`KEEP`] after its last write; a hash of learned limits
//! `{prefix}{<fingerprint>}:l` (fields `l<b>`, TTL one hour); and per granted reservation a
//! receipt `{prefix}{<fingerprint>}:r:<id>` (one minute). The braces make the partition's keys
//! share a hash slot (cluster-safe).
//!
//! Limits travel with every call (per scope: per-minute limit and capacity for each bucket, 0 for
//! unset), so changing them needs no migration.
//!
//! A state that vanished while a process still counts on it (`FLUSHALL`, a restart without
//! persistence) is not taken as full: each call says which of its scopes the process wrote within
//! [`KNOWN_FOR`] (shorter than [`KEEP`], so such a state cannot have expired on its own), and a
//! missing state of a known scope is recreated empty (`z` = now): it refills from nothing, at the
//! limit's rate. Redis has lost what the fleet spent; the safe side is to assume it spent it all.
//!
//! Replies are integers only: Lua numbers are doubles and Redis truncates them when it returns
//! them. Every script but the heartbeat ends its arguments with [`KEEP`] and the mask of the
//! scopes the caller knows (bit s for scope s: written by this process within [`KNOWN_FOR`]).

/// The fleet's heartbeat: KEYS[1] the workers' sorted set, ARGV[1] this process's id, ARGV[2] how
/// long a member counts after its last beat (ms). Reply: the processes alive now.
const HEARTBEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return redis.call('ZCARD', KEYS[1])
"#;

/// How long a partition's state outlives its last write (ms), at least.
pub(crate) const KEEP: u64 = 15 * 60 * 1000;

/// How long after its last write a process takes a partition's state as still in Redis (ms):
/// shorter than [`KEEP`] by a margin for the clocks.
pub(crate) const KNOWN_FOR: u64 = 10 * 60 * 1000;

/// What the scripts but the heartbeat share: the clock, the state, the limits, the buckets.
const PRELUDE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local EPS = 1e-6
local KEEP = tonumber(ARGV[#ARGV - 1])
-- How long a reservation's receipt lives (ms): its caller cancels it within this if the call
-- went unanswered.
local RECEIPT = 60000

-- The state hash; `known` says the caller wrote it recently, so if it is gone Redis lost it
-- (FLUSHALL, a restart without persistence): it comes back with every bucket empty now.
local function state(key, known)
  local raw = redis.call('HGETALL', key)
  local st = {}
  for i = 1, #raw, 2 do st[raw[i]] = tonumber(raw[i + 1]) end
  if #raw == 0 and known then
    st['z'] = now
    redis.call('HSET', key, 'z', string.format('%.0f', now))
    redis.call('PEXPIRE', key, KEEP)
  end
  return st
end

-- Whether scope s (from 0) is in the caller's mask of known scopes (the last argument).
local function known(s)
  return math.floor(tonumber(ARGV[#ARGV]) / 2 ^ s) % 2 == 1
end

-- The limit of bucket b: configured (per minute, capacity), else learned, else nil.
local function limit(lk, pm, cap, b)
  if pm == 0 then
    local l = redis.call('HGET', lk, 'l' .. b)
    if l then pm = tonumber(l); cap = pm end
  end
  if pm == nil or pm <= 0 then return nil end
  if cap == 0 then cap = pm end
  return pm, cap
end

-- Units used in bucket b of capacity cap under interval T. If the limit changed, what remains
-- stays, up to the new capacity (a debt stays a debt). A bucket never written since its state was
-- recreated empty refills from `z`.
local function used(st, b, T, cap)
  local tat = st['t' .. b]
  local oldT = st['i' .. b] or T
  if tat == nil then
    if st['z'] == nil then return 0 end
    tat = st['z'] + cap * T
    oldT = T
  end
  local u = 0
  if tat > now and oldT > 0 then u = (tat - now) / oldT end
  local oldcap = st['c' .. b]
  if oldcap and oldcap ~= cap then
    local remains = oldcap - u
    if remains > cap then remains = cap end
    u = cap - remains
  end
  return u
end

local function set(sk, st, b, T, cap, u)
  if u < 0 then u = 0 end
  st['t' .. b] = now + u * T
  st['i' .. b] = T
  st['c' .. b] = cap
  redis.call('HSET', sk, 't' .. b, string.format('%.3f', st['t' .. b]), 'i' .. b, string.format('%.6f', T), 'c' .. b, cap)
end

-- The state key lives until every bucket is full and the cooldown is over, and at least KEEP.
local function expire(sk, st)
  local horizon = (st['cd'] or 0) - now
  for b = 0, 3 do
    local tat = st['t' .. b]
    if tat and tat - now > horizon then horizon = tat - now end
  end
  local ms = math.floor(horizon / 1000) + 1000
  if ms < KEEP then ms = KEEP end
  redis.call('PEXPIRE', sk, ms)
end

-- Moves each charged bucket (bit 4s + b of mask) of the n scopes by its share of d (requests,
-- input, output), a refund never past full; the limits are in ARGV from index base.
local function shift(n, d, mask, base)
  local function delta(b)
    if b == 0 then return d[1] elseif b == 1 then return d[2] + d[3]
    elseif b == 2 then return d[2] else return d[3] end
  end
  for s = 0, n - 1 do
    local sk, lk = KEYS[2 * s + 1], KEYS[2 * s + 2]
    local st = state(sk, known(s))
    for b = 0, 3 do
      local bit = 2 ^ (4 * s + b)
      if math.floor(mask / bit) % 2 == 1 then
        local pm, cap = limit(lk, tonumber(ARGV[base + s * 8 + 2 * b]), tonumber(ARGV[base + 1 + s * 8 + 2 * b]), b)
        if pm then
          local T = 60000000 / pm
          set(sk, st, b, T, cap, used(st, b, T, cap) + delta(b))
        end
      end
    end
    expire(sk, st)
  end
end
"#;

/// KEYS: per scope, its state and learned keys, then the reservation's receipt. ARGV: scopes, cost
/// (requests, input, output), then per scope 8 numbers (per-minute limit and capacity of each
/// bucket). Reply: {0, 0, 0, 0, 0, 0, charged mask} granted (and the receipt written: what was
/// charged, for a cancellation); {1, wait µs, bucket or 4 for a cooldown, scope, 0, 0, 0} wait;
/// {2, 0, bucket, scope, needed, capacity, 0} too large; {3, 0, 0, 0, 0, 0, 0} cancelled before it
/// ran (the caller gave up on it).
const RESERVE: &str = r#"
local n = tonumber(ARGV[1])
local rk = KEYS[2 * n + 1]
if redis.call('EXISTS', rk) == 1 then return {3, 0, 0, 0, 0, 0, 0} end
local cost = {tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])}
local function need(b)
  if b == 0 then return cost[1] elseif b == 1 then return cost[2] + cost[3]
  elseif b == 2 then return cost[2] else return cost[3] end
end
local wait, wreason, wscope = 0, 0, 0
local plans = {}
for s = 0, n - 1 do
  local sk, lk = KEYS[2 * s + 1], KEYS[2 * s + 2]
  local st = state(sk, known(s))
  local plan = {sk = sk, st = st, buckets = {}}
  local cd = st['cd'] or 0
  if cd - now > wait then wait = cd - now; wreason = 4; wscope = s end
  for b = 0, 3 do
    local pm, cap = limit(lk, tonumber(ARGV[5 + s * 8 + 2 * b]), tonumber(ARGV[6 + s * 8 + 2 * b]), b)
    if pm then
      local T = 60000000 / pm
      local q = need(b)
      if q > cap then return {2, 0, b, s, q, cap, 0} end
      local u = used(st, b, T, cap)
      local missing = u + q - cap
      if missing > EPS and missing * T > wait then wait = missing * T; wreason = b; wscope = s end
      table.insert(plan.buckets, {b = b, T = T, cap = cap, u = u + q})
    end
  end
  plans[s + 1] = plan
end
if wait > 0 then
  local w = math.ceil(wait)
  if w < 1000 then w = 1000 end
  return {1, w, wreason, wscope, 0, 0, 0}
end
local mask = 0
for s = 0, n - 1 do
  local plan = plans[s + 1]
  for _, x in ipairs(plan.buckets) do
    set(plan.sk, plan.st, x.b, x.T, x.cap, x.u)
    mask = mask + 2 ^ (4 * s + x.b)
  end
  expire(plan.sk, plan.st)
end
redis.call('SET', rk, string.format('%d:%d:%d:%d', cost[1], cost[2], cost[3], mask), 'PX', RECEIPT)
return {0, 0, 0, 0, 0, 0, mask}
"#;

/// KEYS: as for reserve (without the receipt). ARGV: scopes, delta (requests, input, output),
/// charged mask, then the limits as for reserve. Moves each charged bucket by its delta (a refund
/// never past full).
const ADJUST: &str = r#"
shift(tonumber(ARGV[1]), {tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])}, tonumber(ARGV[5]), 6)
return 0
"#;

/// KEYS: as for reserve. ARGV: scopes, then the limits as for reserve. Cancels a reservation whose
/// caller gave up on it: refunded if Redis ran it, refused if Redis runs it later (the receipt
/// becomes `c`).
const CANCEL: &str = r#"
local n = tonumber(ARGV[1])
local rk = KEYS[2 * n + 1]
local r = redis.call('GET', rk)
redis.call('SET', rk, 'c', 'PX', RECEIPT)
if r and r ~= 'c' then
  local q, i, o, mask = string.match(r, '^(%d+):(%d+):(%d+):(%d+)$')
  if q then shift(n, {-tonumber(q), -tonumber(i), -tonumber(o)}, tonumber(mask), 2) end
end
return 0
"#;

/// KEYS: the state key. ARGV: the cooldown in µs. Extends the partition's cooldown.
const COOLDOWN: &str = r#"
local st = state(KEYS[1], known(0))
local until_ = now + tonumber(ARGV[1])
if until_ > (st['cd'] or 0) then
  st['cd'] = until_
  redis.call('HSET', KEYS[1], 'cd', string.format('%.0f', until_))
end
expire(KEYS[1], st)
return 0
"#;

/// KEYS: state, learned. ARGV: per bucket, limit and remaining (-1 for unknown). Learned limits are
/// stored; a remaining count pulls the bucket down to it, never up.
const LEARN: &str = r#"
local sk, lk = KEYS[1], KEYS[2]
local st = state(sk, known(0))
for b = 0, 3 do
  local l = tonumber(ARGV[1 + 2 * b])
  local r = tonumber(ARGV[2 + 2 * b])
  if l > 0 then
    redis.call('HSET', lk, 'l' .. b, l)
    redis.call('EXPIRE', lk, 3600)
  end
  if r >= 0 then
    local T = st['i' .. b]
    local cap = st['c' .. b]
    if not T then
      local learned = redis.call('HGET', lk, 'l' .. b)
      if learned then T = 60000000 / tonumber(learned); cap = tonumber(learned) end
    end
    if T then
      local u = used(st, b, T, cap)
      if cap - r > u then set(sk, st, b, T, cap, cap - r) end
    end
  end
end
expire(sk, st)
return 0
"#;

/// KEYS: state, learned. ARGV: the limits of one scope (8 numbers). Reply: per bucket {exists,
/// level in thousandths, capacity}, then the cooldown left in µs.
const SNAPSHOT: &str = r#"
local sk, lk = KEYS[1], KEYS[2]
local st = state(sk, known(0))
local out = {}
for b = 0, 3 do
  local pm, cap = limit(lk, tonumber(ARGV[1 + 2 * b]), tonumber(ARGV[2 + 2 * b]), b)
  if pm then
    local T = 60000000 / pm
    table.insert(out, 1)
    table.insert(out, math.floor((cap - used(st, b, T, cap)) * 1000 + 0.5))
    table.insert(out, cap)
  else
    table.insert(out, 0); table.insert(out, 0); table.insert(out, 0)
  end
end
local cd = (st['cd'] or 0) - now
if cd < 0 then cd = 0 end
table.insert(out, math.floor(cd))
return out
"#;

/// The scripts.
pub(crate) struct Scripts {
    pub(crate) heartbeat: redis::Script,
    pub(crate) reserve: redis::Script,
    pub(crate) adjust: redis::Script,
    pub(crate) cancel: redis::Script,
    pub(crate) cooldown: redis::Script,
    pub(crate) learn: redis::Script,
    pub(crate) snapshot: redis::Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        let s = |body: &str| redis::Script::new(&format!("{PRELUDE}{body}"));
        Self {
            heartbeat: redis::Script::new(HEARTBEAT),
            reserve: s(RESERVE),
            adjust: s(ADJUST),
            cancel: s(CANCEL),
            cooldown: s(COOLDOWN),
            learn: s(LEARN),
            snapshot: s(SNAPSHOT),
        }
    }
}
