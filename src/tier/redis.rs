//! L2 on Redis (feature `redis`): [`RedisTier`], a bb8-redis pool behind the guard.
//!
//! Keys are `{namespace}:v1:d:{keyed hash}`; values are the MAC-protected envelope of
//! `cache/entry.rs` with a `PX` equal to the entry's remaining validity. Epochs live beside them
//! (`{namespace}:v1:e:...`, expiring once they can no longer matter) and every L2 read fetches
//! the entry and the epochs that cover it in one `MGET`, so an L2 hit is always checked against
//! the shared epochs, whatever this process has heard on the backplane.
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_authz_cache::{AuthzCache, Decision, Permission, Principal, RedisTier};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let redis = RedisTier::builder("redis://127.0.0.1:6379", std::env::var("AUTHZ_CACHE_SECRET")?)
//!     .namespace("myapp")
//!     .pool_size(50)
//!     .timeout(Duration::from_millis(50))
//!     .build()?;
//! let cache = AuthzCache::builder(|_: Principal, _: Permission| async {
//!     Ok::<_, std::convert::Infallible>(Decision::allow())
//! })
//! .l2(redis)
//! .build();
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bb8_redis::RedisConnectionManager;
use redis::aio::MultiplexedConnection;

use crate::cache::epoch::ScopeHashes;
use crate::cache::guard::{BreakerConfig, Guard, GuardError};
use crate::cache::key::{Scope, hex};

/// Builds a [`RedisTier`]. Defaults: pool 50, connect timeout 1 s, call timeout 50 ms, breaker
/// opens after 5 consecutive failures for 30 s, write queue 10,000.
#[must_use]
pub struct RedisTierBuilder {
    url: String,
    secret: Vec<u8>,
    namespace: String,
    pool_size: u32,
    connect_timeout: Duration,
    breaker: BreakerConfig,
    write_queue: usize,
    backplane_url: Option<String>,
}

impl fmt::Debug for RedisTierBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTierBuilder")
            .field("namespace", &self.namespace)
            .field("pool_size", &self.pool_size)
            .field("secret", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl RedisTierBuilder {
    /// The key prefix; every instance that shares decisions uses the same one. Letters, digits,
    /// `-`, `_`, `.` and `/`, at most 64 characters. Default `authz`.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Largest number of pooled connections (production: 50).
    pub fn pool_size(mut self, size: u32) -> Self {
        self.pool_size = size;
        self
    }

    /// How long to wait for a new connection.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long one Redis call may take (pool checkout included) before it counts as a failure.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.breaker.timeout = timeout;
        self
    }

    /// Consecutive failures that open the circuit breaker.
    pub fn failure_threshold(mut self, failures: u32) -> Self {
        self.breaker.failure_threshold = failures.max(1);
        self
    }

    /// How long the breaker stays open before one probe is let through.
    pub fn open_for(mut self, duration: Duration) -> Self {
        self.breaker.open_for = duration;
        self
    }

    /// Capacity of the background write queue; when it is full, writes are dropped and counted.
    pub fn write_queue(mut self, capacity: usize) -> Self {
        self.write_queue = capacity.max(1);
        self
    }

    /// Subscribe to the backplane through another URL than the pool's (default: the same).
    pub fn backplane_url(mut self, url: impl Into<String>) -> Self {
        self.backplane_url = Some(url.into());
        self
    }

    /// Validates the configuration and builds the tier. Connections are made lazily, so a Redis
    /// that is down at start-up costs a breaker, not the application.
    pub fn build(self) -> Result<RedisTier, RedisTierError> {
        if self.secret.len() < 16 {
            return Err(RedisTierError::config("secret must be at least 16 bytes"));
        }
        if !crate::tier::names::namespace_ok(&self.namespace) {
            return Err(RedisTierError::config("namespace must be 1-64 of [A-Za-z0-9-_./]"));
        }
        if self.pool_size == 0 {
            return Err(RedisTierError::config("pool size must be at least 1"));
        }
        let manager = RedisConnectionManager::new(self.url.as_str())
            .map_err(|e| RedisTierError::config(format!("invalid redis url: {e}")))?;
        let backplane = redis::Client::open(self.backplane_url.as_deref().unwrap_or(&self.url))
            .map_err(|e| RedisTierError::config(format!("invalid redis backplane url: {e}")))?;
        let pool = bb8::Pool::builder()
            .max_size(self.pool_size)
            .connection_timeout(self.connect_timeout)
            .test_on_check_out(false)
            .retry_connection(false)
            .build_unchecked(Manager(manager));
        let ns = format!("{}:v1", self.namespace);
        Ok(RedisTier {
            shared: Arc::new(RedisShared {
                pool,
                backplane,
                guard: Guard::new("l2", self.breaker),
                secret: self.secret,
                channel: format!("{ns}:inv"),
                seq_key: format!("{ns}:e:seq"),
                global_key: format!("{ns}:e:g"),
                ns,
                write_queue: self.write_queue,
                eviction: std::sync::atomic::AtomicU8::new(Eviction::Unknown as u8),
                keeps_epochs: std::sync::atomic::AtomicBool::new(false),
                high_water_seen: std::sync::atomic::AtomicU64::new(0),
                bump: redis::Script::new(&format!("{LUA_EPOCHS}{BUMP}")),
                raise: redis::Script::new(&format!("{LUA_EPOCHS}{RAISE}")),
            }),
        })
    }
}

/// L2 on Redis. Cheap to clone. Give it to [`AuthzCacheBuilder::l2`](crate::AuthzCacheBuilder::l2).
#[derive(Clone)]
pub struct RedisTier {
    pub(crate) shared: Arc<RedisShared>,
}

impl fmt::Debug for RedisTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTier").field("namespace", &self.shared.ns).finish_non_exhaustive()
    }
}

impl RedisTier {
    /// Starts building a tier on `url` (`redis://host:port/db`). `secret` keys the hashes and
    /// MACs of everything this tier stores: every instance sharing the namespace needs the same
    /// secret (at least 16 bytes; 32 random bytes recommended).
    pub fn builder(url: impl Into<String>, secret: impl AsRef<[u8]>) -> RedisTierBuilder {
        RedisTierBuilder {
            url: url.into(),
            secret: secret.as_ref().to_vec(),
            namespace: "authz".into(),
            pool_size: 50,
            connect_timeout: Duration::from_secs(1),
            breaker: BreakerConfig::default(),
            write_queue: 10_000,
            backplane_url: None,
        }
    }
}

/// The Redis tier could not be configured.
#[derive(Debug)]
pub struct RedisTierError {
    message: String,
}

impl RedisTierError {
    fn config(message: impl Into<String>) -> Self {
        Self { message: message.into() }
    }
}

impl fmt::Display for RedisTierError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RedisTierError {}

/// bb8-redis's manager reports a connection as never broken, so a multiplexed connection whose
/// socket died (a Redis restart, a black hole that ended) would stay in the pool, or every
/// checkout would pay a PING round trip. This wrapper marks a connection suspect for the length
/// of each command and clears the mark only when the command completed over a live socket: a
/// command that failed on I/O or was abandoned by a timeout leaves the mark, and bb8 drops the
/// connection when it comes back.
pub(crate) struct Manager(RedisConnectionManager);

pub(crate) struct Tracked {
    conn: MultiplexedConnection,
    suspect: bool,
}

impl bb8::ManageConnection for Manager {
    type Connection = Tracked;
    type Error = redis::RedisError;

    async fn connect(&self) -> Result<Tracked, redis::RedisError> {
        Ok(Tracked { conn: self.0.connect().await?, suspect: false })
    }

    async fn is_valid(&self, conn: &mut Tracked) -> Result<(), redis::RedisError> {
        self.0.is_valid(&mut conn.conn).await
    }

    fn has_broken(&self, conn: &mut Tracked) -> bool {
        conn.suspect
    }
}

/// Shared by both scripts: epoch values as Lua numbers. Lua's numbers are doubles, exact up to
/// 2^53 - 1 (about 285 years of microseconds); an absent key is 0, and a value that is not a
/// plain integer within that range (only a Redis writer could have stored one) is saturated:
/// `nil`, stored back as the largest bigint, which every instance reads as `EPOCH_MAX`.
const LUA_EPOCHS: &str = r"
local LIMIT = 9007199254740991
local SAT = '9223372036854775807'
local function num(s)
  if not s then return 0 end
  if not string.match(s, '^%d+$') then return nil end
  local n = tonumber(s)
  if n == nil or n > LIMIT then return nil end
  return n
end
local function str(n)
  if n == nil or n > LIMIT then return SAT end
  -- Lua 5.1 prints numbers past 14 digits in exponent form: format the integer explicitly.
  return string.format('%.0f', n)
end
local function store(key, s, px)
  if px == '0' then redis.call('SET', key, s) else redis.call('SET', key, s, 'PX', px) end
end
";

/// Bumps an epoch where it is stored: `max(stored + 1, floor, high water + 1)`, so the stored
/// value always rises, whatever the caller's clock, and never falls under any value assigned
/// before; stores it (with an expiry, except the global one), raises the high water, publishes
/// it, and returns it. KEYS: high water, epoch key. ARGV: floor, px (0 = none), channel, message
/// prefix.
const BUMP: &str = r"
local floor = num(ARGV[1])
local hw = num(redis.call('GET', KEYS[1]))
local cur = num(redis.call('GET', KEYS[2]))
local v = nil
if floor ~= nil and hw ~= nil and cur ~= nil then
  v = math.max(cur + 1, floor, hw + 1)
end
local s = str(v)
redis.call('SET', KEYS[1], s)
store(KEYS[2], s, ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4] .. s)
return s
";

/// Raises an epoch to a value assigned elsewhere (the durable epochs in Postgres): never lowers
/// it; a value that is no integer is replaced. Raises the high water too, and publishes the
/// value. KEYS: high water, epoch key. ARGV: value, px (0 = none), channel, message prefix.
const RAISE: &str = r"
local v = num(ARGV[1])
local raw = redis.call('GET', KEYS[2])
local cur = num(raw)
local garbage = raw and not string.match(raw, '^%d+$')
if v ~= nil and (garbage or (cur ~= nil and v > cur)) then
  store(KEYS[2], str(v), ARGV[2])
end
local hw = num(redis.call('GET', KEYS[1]))
if v ~= nil and hw ~= nil and v > hw then
  redis.call('SET', KEYS[1], str(v))
end
redis.call('PUBLISH', ARGV[3], ARGV[4] .. ARGV[1])
return 1
";

pub(crate) type RedisError = GuardError<redis::RedisError>;

/// What one L2 read returned: the value, if any, and the shared epochs covering the key
/// (global, principal, resource, entry; 0 when absent), and the epochs' high water.
pub(crate) struct L2Read {
    pub(crate) value: Option<Vec<u8>>,
    pub(crate) epochs: Option<[u64; 4]>,
    /// The high water of every epoch value Redis assigned (0 when absent: a Redis that lost its
    /// state); `None` when unreadable.
    pub(crate) high_water: Option<u64>,
}

pub(crate) struct RedisShared {
    pool: bb8::Pool<Manager>,
    pub(crate) backplane: redis::Client,
    pub(crate) guard: Guard,
    pub(crate) secret: Vec<u8>,
    pub(crate) channel: String,
    seq_key: String,
    global_key: String,
    pub(crate) ns: String,
    pub(crate) write_queue: usize,
    bump: redis::Script,
    raise: redis::Script,
    /// What the last `maxmemory-policy` check found (see [`Eviction`]).
    eviction: std::sync::atomic::AtomicU8,
    /// Whether Redis keeps the epochs (no L3 behind it): set by the cache when it is built.
    keeps_epochs: std::sync::atomic::AtomicBool,
    /// The highest epoch high water Redis reported (reads, bumps, re-subscriptions), to notice a
    /// Redis that lost its epochs.
    high_water_seen: std::sync::atomic::AtomicU64,
}

/// Whether Redis may evict keys the cache needs. Entries and epochs both carry expiries, so any
/// policy but `noeviction` (`volatile-*` as much as `allkeys-*`) can drop an epoch before the
/// entries it invalidated, and an entry whose epoch was dropped validates again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Eviction {
    /// Not checked yet.
    Unknown = 0,
    /// `noeviction`.
    Safe = 1,
    /// A policy that can evict epoch keys.
    Unsafe = 2,
    /// `CONFIG GET` is not allowed (a managed Redis): the policy cannot be verified.
    Unreadable = 3,
}

/// The health warning of a Redis whose policy can evict epoch keys.
pub(crate) const EVICTION_WARNING: &str =
    "redis maxmemory-policy can evict epoch keys (revoked entries could validate again): set noeviction";

/// The health warning of a Redis whose policy could not be read.
pub(crate) const EVICTION_UNKNOWN: &str =
    "redis maxmemory-policy could not be read (CONFIG GET refused): make sure it is noeviction";

impl RedisShared {
    pub(crate) fn set_keeps_epochs(&self, keeps: bool) {
        self.keeps_epochs.store(keeps, std::sync::atomic::Ordering::Release);
    }

    /// Whether Redis keeps the epochs (L2 without L3).
    pub(crate) fn keeps_epochs(&self) -> bool {
        self.keeps_epochs.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The highest epoch high water Redis reported so far: take it before a read, and give it to
    /// [`kept_its_epochs`](Self::kept_its_epochs) with what the read returned (a bump that
    /// completes while the read is in flight raises it, but cannot be in the read's answer).
    pub(crate) fn high_water_mark(&self) -> u64 {
        self.high_water_seen.load(std::sync::atomic::Ordering::Acquire)
    }

    /// With Redis keeping the epochs: whether the high water a read returned (`None`: could not
    /// be read) is still at least `mark`, the highest seen before that read was sent. A lower one
    /// means Redis lost its epochs (restarted empty, flushed); then, and when it cannot be read,
    /// this process forgets every shared value it holds ([`Epochs::reset_shared`]): a value Redis
    /// forgot would otherwise mask a lower one it assigns from now on, and an invalidation would
    /// go unnoticed here.
    ///
    /// [`Epochs::reset_shared`]: crate::cache::epoch::Epochs::reset_shared
    pub(crate) fn kept_its_epochs(
        &self,
        mark: u64,
        high_water: Option<u64>,
        epochs: &crate::cache::epoch::Epochs,
    ) -> bool {
        use std::sync::atomic::Ordering;
        match high_water {
            Some(now) if now >= mark => {
                self.high_water_seen.fetch_max(now, Ordering::AcqRel);
                return true;
            }
            Some(now) => {
                // Start again from what Redis has now (a mark below Redis's real high water can
                // only delay the next detection, never raise a false one).
                self.high_water_seen.store(now, Ordering::Release);
                tracing::warn!(
                    target: "authz_cache::audit",
                    seen = mark,
                    now,
                    "redis lost its epochs (restarted empty or flushed): shared epochs forgotten, L1 dropped"
                );
            }
            None => {
                tracing::warn!(target: "authz_cache::audit", "redis epoch high water unreadable: shared epochs forgotten");
            }
        }
        epochs.reset_shared();
        false
    }

    /// Redis's epoch high water (0 when it has none).
    pub(crate) async fn high_water(&self) -> Result<u64, RedisError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(&self.seq_key);
        let raw: Option<String> = self.run(&cmd).await?;
        Ok(raw.map_or(0, |v| {
            v.parse::<u64>().map_or(crate::cache::epoch::EPOCH_MAX, |v| v.min(crate::cache::epoch::EPOCH_MAX))
        }))
    }

    /// Reads `maxmemory-policy` and records it; logs on `authz_cache::audit` when it changes to
    /// one that breaks the staleness bound. A failed call leaves the last finding.
    pub(crate) async fn check_eviction(&self) {
        use std::sync::atomic::Ordering;
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg("maxmemory-policy");
        let found = match self.run::<Vec<String>>(&cmd).await {
            Ok(reply) => match reply.get(1).map(String::as_str) {
                Some("noeviction") => (Eviction::Safe, reply.get(1).cloned()),
                Some(_) => (Eviction::Unsafe, reply.get(1).cloned()),
                None => (Eviction::Unreadable, None),
            },
            Err(GuardError::Failed(e)) if e.kind() != redis::ErrorKind::Io && !e.is_connection_dropped() => {
                (Eviction::Unreadable, None)
            }
            Err(_) => return,
        };
        let before = self.eviction.swap(found.0 as u8, Ordering::AcqRel);
        if before != found.0 as u8 {
            match found {
                (Eviction::Unsafe, policy) => tracing::warn!(
                    target: "authz_cache::audit",
                    policy = policy.as_deref().unwrap_or("?"),
                    "security: {EVICTION_WARNING}"
                ),
                (Eviction::Unreadable, _) => tracing::warn!(target: "authz_cache::audit", "{EVICTION_UNKNOWN}"),
                _ => tracing::info!(target: "authz_cache::audit", "redis maxmemory-policy is noeviction"),
            }
        }
    }

    /// The health warning the last eviction check calls for, if any.
    pub(crate) fn warning(&self) -> Option<&'static str> {
        match self.eviction.load(std::sync::atomic::Ordering::Acquire) {
            2 => Some(EVICTION_WARNING),
            3 => Some(EVICTION_UNKNOWN),
            _ => None,
        }
    }

    pub(crate) fn data_key(&self, key_id: &[u8; 32]) -> String {
        format!("{}:d:{}", self.ns, hex(&key_id[..16]))
    }

    fn epoch_key(&self, scope: Scope, hash: u64) -> String {
        format!("{}:e:{}:{hash:016x}", self.ns, scope.tag())
    }

    /// Runs `f` on a pooled connection, under the guard. The connection stays marked suspect
    /// unless `f` completes without an I/O failure (see [`Manager`]).
    async fn with_conn<T>(
        &self,
        f: impl AsyncFnOnce(&mut MultiplexedConnection) -> redis::RedisResult<T>,
    ) -> Result<T, RedisError> {
        self.guard
            .call(async {
                let mut conn = self.pool.get().await.map_err(|e| match e {
                    bb8::RunError::User(e) => e,
                    bb8::RunError::TimedOut => {
                        redis::RedisError::from((redis::ErrorKind::Io, "timed out waiting for a connection"))
                    }
                })?;
                conn.suspect = true;
                let result = f(&mut conn.conn).await;
                if !matches!(&result, Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout()) {
                    conn.suspect = false;
                }
                result
            })
            .await
    }

    async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RedisError> {
        self.with_conn(async |conn| cmd.query_async(conn).await).await
    }

    /// The entry and its epochs, in one round trip.
    pub(crate) async fn read(&self, key_id: &[u8; 32], hashes: &ScopeHashes) -> Result<L2Read, RedisError> {
        let mut cmd = redis::cmd("MGET");
        cmd.arg(self.data_key(key_id))
            .arg(&self.global_key)
            .arg(self.epoch_key(Scope::Principal, hashes.principal))
            .arg(self.epoch_key(Scope::Resource, hashes.resource))
            .arg(self.epoch_key(Scope::Entry, hashes.entry))
            .arg(&self.seq_key);
        let mut values: Vec<Option<Vec<u8>>> = self.run(&cmd).await?;
        if values.len() != 6 {
            return Ok(L2Read { value: None, epochs: None, high_water: None });
        }
        // Values beyond what the stores hold saturate (see `epoch.rs`); what does not parse as an
        // integer at all is unreadable.
        let parse = |v: &Option<Vec<u8>>| -> Option<u64> {
            match v {
                None => Some(0),
                Some(b) => {
                    let s = std::str::from_utf8(b).ok()?;
                    match s.parse::<u64>() {
                        Ok(v) => Some(v.min(crate::cache::epoch::EPOCH_MAX)),
                        Err(_) if !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) => {
                            Some(crate::cache::epoch::EPOCH_MAX)
                        }
                        Err(_) => None,
                    }
                }
            }
        };
        // An epoch that does not parse cannot vouch for anything: no epochs, no L2 hit.
        let epochs = match (parse(&values[1]), parse(&values[2]), parse(&values[3]), parse(&values[4])) {
            (Some(g), Some(p), Some(r), Some(k)) => Some([g, p, r, k]),
            _ => None,
        };
        let high_water = parse(&values[5]);
        Ok(L2Read { value: values.swap_remove(0), epochs, high_water })
    }

    /// Stores an envelope that stays valid for `px_ms`.
    pub(crate) async fn write(&self, key: &str, value: &[u8], px_ms: u64) -> Result<(), RedisError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value).arg("PX").arg(px_ms.max(1));
        self.run::<()>(&cmd).await
    }

    /// Bumps a shared epoch (`None`: the global one) to `max(stored + 1, floor_us, high water +
    /// 1)`; returns the value stored (saturated values read as `EPOCH_MAX`).
    pub(crate) async fn bump(
        &self,
        scope: Option<(Scope, u64)>,
        floor_us: u64,
        forget_after_ms: u64,
    ) -> Result<u64, RedisError> {
        let (key, px, prefix) = match scope {
            None => (self.global_key.clone(), 0, "i g 0 ".to_owned()),
            Some((s, h)) => (self.epoch_key(s, h), forget_after_ms, format!("i {} {h:016x} ", s.tag())),
        };
        let mut invocation = self.bump.prepare_invoke();
        invocation.key(&self.seq_key).key(key).arg(floor_us).arg(px).arg(&self.channel).arg(prefix);
        let stored = self.with_conn(async |conn| invocation.invoke_async::<String>(conn).await).await?;
        let value =
            stored.parse::<u64>().map_or(crate::cache::epoch::EPOCH_MAX, |v| v.min(crate::cache::epoch::EPOCH_MAX));
        // The value a bump stores is Redis's new high water.
        self.high_water_seen.fetch_max(value, std::sync::atomic::Ordering::AcqRel);
        Ok(value)
    }

    /// Raises a shared epoch (`None`: the global one) to `value`, assigned by the durable store,
    /// and publishes it.
    pub(crate) async fn raise(
        &self,
        scope: Option<(Scope, u64)>,
        value: u64,
        forget_after_ms: u64,
    ) -> Result<(), RedisError> {
        let (key, px, prefix) = match scope {
            None => (self.global_key.clone(), 0, "i g 0 ".to_owned()),
            Some((s, h)) => (self.epoch_key(s, h), forget_after_ms, format!("i {} {h:016x} ", s.tag())),
        };
        let mut invocation = self.raise.prepare_invoke();
        invocation.key(&self.seq_key).key(key).arg(value).arg(px).arg(&self.channel).arg(prefix);
        self.with_conn(async |conn| invocation.invoke_async::<i64>(conn).await).await.map(|_| ())
    }

    /// Publishes a heartbeat.
    pub(crate) async fn heartbeat(&self, instance: &str) -> Result<(), RedisError> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(&self.channel).arg(format!("h {instance}"));
        self.run::<i64>(&cmd).await.map(|_| ())
    }
}

/// One background write.
pub(crate) struct Write {
    pub(crate) key: String,
    pub(crate) value: Vec<u8>,
    pub(crate) valid_until_ms: u64,
}

/// Concurrent writers draining the bounded write queue.
const WRITERS: usize = 4;

/// Starts the write-behind workers; they stop when the returned sender is dropped.
pub(crate) fn spawn_writers(
    shared: Arc<RedisShared>,
    stats: Arc<crate::stats::Stats>,
    clock: crate::cache::clock::Clock,
) -> tokio::sync::mpsc::Sender<Write> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Write>(shared.write_queue);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    for _ in 0..WRITERS {
        let (shared, stats, rx, clock) = (shared.clone(), stats.clone(), rx.clone(), clock.clone());
        tokio::spawn(async move {
            loop {
                let Some(w) = rx.lock().await.recv().await else { return };
                let remaining = w.valid_until_ms.saturating_sub(clock.now_ms());
                if remaining == 0 {
                    continue;
                }
                match shared.write(&w.key, &w.value, remaining).await {
                    Ok(()) => crate::stats::Stats::incr(&stats.l2.writes),
                    Err(e) => {
                        crate::stats::Stats::incr(&stats.l2.write_errors);
                        tracing::debug!(target: "authz_cache", error = %e, "l2 write failed");
                    }
                }
            }
        });
    }
    tx
}
