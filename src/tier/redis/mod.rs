//! L2 on Redis (feature `redis`): [`RedisTier`], a bb8-redis pool, implementing
//! [`SharedTier`] with the Redis pub/sub backplane as its [`Transport`].
//!
//! Keys are `{namespace}:v1:d:{keyed hash}`; values are the MAC-protected envelope of
//! `cache/entry.rs` with a `PX` equal to the entry's remaining validity. Epochs live beside them
//! (`{namespace}:v1:e:...`, expiring once they can no longer matter) and every L2 read fetches
//! the entry, the epochs that cover it and the epoch high water in one `MGET`, so an L2 hit is
//! always checked against the shared epochs, whatever this process has heard on the backplane.
//! Bumps and raises are Lua scripts that store and publish in one step.
//!
//! Timeouts, the breaker and the write-behind queue are the cache's (`tier/guarded.rs`,
//! `cache/write_behind.rs`); this tier's builder only sets their values.
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_authz_cache::{AuthzCache, Decision, Permission, Principal, RedisTier};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let redis = RedisTier::builder("redis://127.0.0.1:6379")
//!     .namespace("myapp")
//!     .pool_size(50)
//!     .timeout(Duration::from_millis(50))
//!     .build()?;
//! let cache = AuthzCache::builder(|_: Principal, _: Permission| async {
//!     Ok::<_, std::convert::Infallible>(Decision::allow())
//! })
//! .secret(std::env::var("AUTHZ_CACHE_SECRET")?)
//! .l2(redis)
//! .build();
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

pub(crate) mod cluster;
mod eviction;
mod scripts;
mod transport;

use eviction::{EVICTION_CHECK_EVERY, EVICTION_UNKNOWN, EVICTION_WARNING, Eviction};
use scripts::{BUMP, LUA_EPOCHS, RAISE};

use bb8_redis::RedisConnectionManager;
use redis::aio::MultiplexedConnection;

use crate::cache::epoch::EPOCH_MAX;
use crate::cache::key::Scope;
use crate::tier::pool::{self, Checked};
use crate::tier::shared::{
    EpochTarget, KeyId, ScopeHashes, SharedTier, TierError, TierFuture, TierRead, TierSettings, TierWrite, Transport,
};

/// Builds a [`RedisTier`]. Defaults: pool 50, connect timeout 1 s, call timeout 50 ms, breaker
/// opens after 5 consecutive failures for 30 s, write queue 10,000.
#[must_use]
pub struct RedisTierBuilder {
    url: String,
    namespace: String,
    pool_size: u32,
    connect_timeout: Duration,
    settings: TierSettings,
    backplane_url: Option<String>,
}

impl fmt::Debug for RedisTierBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTierBuilder")
            .field("namespace", &self.namespace)
            .field("pool_size", &self.pool_size)
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

    crate::tier::shared::guard_setters!("Redis");

    /// Subscribe to the backplane through another URL than the pool's (default: the same).
    pub fn backplane_url(mut self, url: impl Into<String>) -> Self {
        self.backplane_url = Some(url.into());
        self
    }

    /// Validates the configuration and builds the tier. Connections are made lazily, so a Redis
    /// that is down at start-up costs a breaker, not the application.
    pub fn build(self) -> Result<RedisTier, RedisTierError> {
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
            .build_unchecked(Checked(manager));
        let ns = format!("{}:v1", self.namespace);
        Ok(RedisTier {
            shared: Arc::new(RedisShared {
                pool,
                backplane,
                settings: self.settings,
                channel: format!("{ns}:inv"),
                seq_key: format!("{ns}:e:seq"),
                global_key: format!("{ns}:e:g"),
                ns,
                eviction: AtomicU8::new(Eviction::Unknown as u8),
                eviction_checked: std::sync::Mutex::new(None),
                bump: redis::Script::new(&format!("{LUA_EPOCHS}{BUMP}")),
                raise: redis::Script::new(&format!("{LUA_EPOCHS}{RAISE}")),
            }),
        })
    }
}

/// L2 on Redis. Cheap to clone. Give it to [`AuthzCacheBuilder::l2`](crate::AuthzCacheBuilder::l2).
#[derive(Clone)]
pub struct RedisTier {
    shared: Arc<RedisShared>,
}

impl fmt::Debug for RedisTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTier").field("namespace", &self.shared.ns).finish_non_exhaustive()
    }
}

impl RedisTier {
    /// Starts building a tier on `url` (`redis://host:port/db`). The secret that keys what it
    /// stores is the cache's ([`AuthzCacheBuilder::secret`](crate::AuthzCacheBuilder::secret)).
    pub fn builder(url: impl Into<String>) -> RedisTierBuilder {
        RedisTierBuilder {
            url: url.into(),
            namespace: "authz".into(),
            pool_size: 50,
            connect_timeout: Duration::from_secs(1),
            settings: TierSettings::default(),
            backplane_url: None,
        }
    }

    /// The key prefix this tier uses (`{namespace}:v1`).
    pub fn prefix(&self) -> &str {
        &self.shared.ns
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

struct RedisShared {
    pool: bb8::Pool<Checked<RedisConnectionManager>>,
    backplane: redis::Client,
    settings: TierSettings,
    channel: String,
    seq_key: String,
    global_key: String,
    ns: String,
    bump: redis::Script,
    raise: redis::Script,
    /// What the last `maxmemory-policy` check found (see [`Eviction`]).
    eviction: AtomicU8,
    eviction_checked: std::sync::Mutex<Option<Instant>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn failed(e: redis::RedisError) -> TierError {
    TierError::new(e)
}

/// An epoch value as Redis holds it: values beyond what the stores hold saturate (see
/// `epoch.rs`); what does not parse as an integer at all is unreadable (`None`).
fn parse_epoch(v: &Option<Vec<u8>>) -> Option<u64> {
    match v {
        None => Some(0),
        Some(b) => {
            let s = std::str::from_utf8(b).ok()?;
            match s.parse::<u64>() {
                Ok(v) => Some(v.min(EPOCH_MAX)),
                Err(_) if !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) => Some(EPOCH_MAX),
                Err(_) => None,
            }
        }
    }
}

impl RedisShared {
    /// Runs `f` on a pooled connection, marked suspect unless it completes without an I/O
    /// failure (see `tier/pool.rs`).
    async fn with_conn<T>(
        &self,
        f: impl AsyncFnOnce(&mut MultiplexedConnection) -> redis::RedisResult<T>,
    ) -> redis::RedisResult<T> {
        pool::with_conn(
            &self.pool,
            |e| match e {
                bb8::RunError::User(e) => e,
                bb8::RunError::TimedOut => {
                    redis::RedisError::from((redis::ErrorKind::Io, "timed out waiting for a connection"))
                }
            },
            |result| !matches!(result, Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout()),
            f,
        )
        .await
    }

    async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        self.with_conn(async |conn| cmd.query_async(conn).await).await
    }

    fn data_key(&self, key_id: &KeyId) -> String {
        format!("{}:d:{}", self.ns, hex(&key_id[..16]))
    }

    fn epoch_key(&self, scope: Scope, hash: u64) -> String {
        format!("{}:e:{}:{hash:016x}", self.ns, scope.tag())
    }

    /// The key, expiry (ms, 0 = none) and message prefix of an epoch.
    fn epoch_of(&self, target: EpochTarget, retention: Duration) -> (String, u64, String) {
        match target.0 {
            None => (self.global_key.clone(), 0, "i g 0 ".to_owned()),
            Some((s, h)) => (
                self.epoch_key(s, h),
                u64::try_from(retention.as_millis()).unwrap_or(u64::MAX).max(1),
                format!("i {} {h:016x} ", s.tag()),
            ),
        }
    }
}

impl SharedTier for RedisTier {
    fn settings(&self) -> TierSettings {
        self.shared.settings
    }

    /// The entry, its epochs and the high water, in one `MGET`.
    fn read<'a>(&'a self, key_id: &'a KeyId, scopes: &'a ScopeHashes, _max_age: Duration) -> TierFuture<'a, TierRead> {
        Box::pin(async move {
            let s = &self.shared;
            let mut cmd = redis::cmd("MGET");
            cmd.arg(s.data_key(key_id))
                .arg(&s.global_key)
                .arg(s.epoch_key(Scope::Principal, scopes.principal))
                .arg(s.epoch_key(Scope::Resource, scopes.resource))
                .arg(s.epoch_key(Scope::Entry, scopes.entry))
                .arg(&s.seq_key);
            let mut values: Vec<Option<Vec<u8>>> = s.run(&cmd).await.map_err(failed)?;
            if values.len() != 6 {
                return Ok(TierRead::new(None, None).with_high_water(0));
            }
            // An epoch that does not parse cannot vouch for anything: no epochs, no L2 hit.
            let epochs = match (
                parse_epoch(&values[1]),
                parse_epoch(&values[2]),
                parse_epoch(&values[3]),
                parse_epoch(&values[4]),
            ) {
                (Some(g), Some(p), Some(r), Some(k)) => Some([g, p, r, k]),
                _ => None,
            };
            // An unreadable high water reads as 0: as if Redis had lost its epochs.
            let high_water = parse_epoch(&values[5]).unwrap_or(0);
            Ok(TierRead::new(values.swap_remove(0), epochs).with_high_water(high_water))
        })
    }

    /// The whole batch in one `MGET`: each entry with its three scoped epochs, and the global
    /// epoch and the high water once.
    fn read_many<'a>(&'a self, reads: &'a [(KeyId, ScopeHashes)], _max_age: Duration) -> TierFuture<'a, Vec<TierRead>> {
        Box::pin(async move {
            let s = &self.shared;
            let mut cmd = redis::cmd("MGET");
            cmd.arg(&s.global_key).arg(&s.seq_key);
            for (key_id, scopes) in reads {
                cmd.arg(s.data_key(key_id))
                    .arg(s.epoch_key(Scope::Principal, scopes.principal))
                    .arg(s.epoch_key(Scope::Resource, scopes.resource))
                    .arg(s.epoch_key(Scope::Entry, scopes.entry));
            }
            let values: Vec<Option<Vec<u8>>> = s.run(&cmd).await.map_err(failed)?;
            if values.len() != 2 + 4 * reads.len() {
                return Err(TierError::new("redis: MGET answered the wrong number of values"));
            }
            let global = parse_epoch(&values[0]);
            let high_water = parse_epoch(&values[1]).unwrap_or(0);
            let mut values = values.into_iter().skip(2);
            let mut out = Vec::with_capacity(reads.len());
            for _ in reads {
                let mut next = || values.next().flatten();
                let (value, p, r, k) = (next(), next(), next(), next());
                let epochs = match (global, parse_epoch(&p), parse_epoch(&r), parse_epoch(&k)) {
                    (Some(g), Some(p), Some(r), Some(k)) => Some([g, p, r, k]),
                    _ => None,
                };
                out.push(TierRead::new(value, epochs).with_high_water(high_water));
            }
            Ok(out)
        })
    }

    /// One `SET ... PX` per entry, pipelined.
    fn write<'a>(&'a self, batch: &'a [TierWrite]) -> TierFuture<'a, ()> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            for w in batch {
                let px = u64::try_from(w.remaining().as_millis()).unwrap_or(u64::MAX).max(1);
                pipe.cmd("SET").arg(self.shared.data_key(w.key_id())).arg(w.value()).arg("PX").arg(px).ignore();
            }
            self.shared.with_conn(async |conn| pipe.query_async::<()>(conn).await).await.map_err(failed)
        })
    }

    /// `max(stored + 1, floor, high water + 1)`, stored and published by one script; values
    /// beyond `i64::MAX` read as `EPOCH_MAX`.
    fn bump(&self, target: EpochTarget, floor: u64, retention: Duration) -> TierFuture<'_, u64> {
        Box::pin(async move {
            let s = &self.shared;
            let (key, px, prefix) = s.epoch_of(target, retention);
            let mut invocation = s.bump.prepare_invoke();
            invocation.key(&s.seq_key).key(key).arg(floor).arg(px).arg(&s.channel).arg(prefix);
            let stored =
                s.with_conn(async |conn| invocation.invoke_async::<String>(conn).await).await.map_err(failed)?;
            Ok(stored.parse::<u64>().map_or(EPOCH_MAX, |v| v.min(EPOCH_MAX)))
        })
    }

    fn raise(&self, target: EpochTarget, value: u64, retention: Duration) -> TierFuture<'_, ()> {
        Box::pin(async move {
            let s = &self.shared;
            let (key, px, prefix) = s.epoch_of(target, retention);
            let mut invocation = s.raise.prepare_invoke();
            invocation.key(&s.seq_key).key(key).arg(value).arg(px).arg(&s.channel).arg(prefix);
            s.with_conn(async |conn| invocation.invoke_async::<i64>(conn).await).await.map(|_| ()).map_err(failed)
        })
    }

    /// The high water of every epoch value Redis assigned (0 when it has none).
    fn high_water(&self) -> TierFuture<'_, Option<u64>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("GET");
            cmd.arg(&self.shared.seq_key);
            let raw: Option<String> = self.shared.run(&cmd).await.map_err(failed)?;
            Ok(Some(raw.map_or(0, |v| v.parse::<u64>().map_or(EPOCH_MAX, |v| v.min(EPOCH_MAX)))))
        })
    }

    fn transport(&self) -> Option<&dyn Transport> {
        Some(self)
    }

    /// Reads the eviction policy at start and every few seconds (an operator may change it).
    fn maintain(&self) -> TierFuture<'_, u64> {
        Box::pin(async move {
            let due = {
                let mut checked = self.shared.eviction_checked.lock().unwrap_or_else(|e| e.into_inner());
                let due = checked.is_none_or(|at| at.elapsed() >= EVICTION_CHECK_EVERY);
                if due {
                    *checked = Some(Instant::now());
                }
                due
            };
            if due {
                self.shared.check_eviction().await;
            }
            Ok(0)
        })
    }

    fn warning(&self) -> Option<&'static str> {
        match self.shared.eviction.load(Ordering::Acquire) {
            2 => Some(EVICTION_WARNING),
            3 => Some(EVICTION_UNKNOWN),
            _ => None,
        }
    }
}
