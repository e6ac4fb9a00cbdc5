//! L3 on PostgreSQL (feature `postgres`): [`PostgresTier`], a diesel-async bb8 pool behind the
//! guard, and [`PostgresTier::migrate`], which applies the embedded `migrations/`.
//!
//! Rows of `authz_cache_entries` are keyed by the same HMAC key id as Redis keys and hold the same
//! MAC-protected envelope, plus the tuple sealed under a key derived from the secret (for warming)
//! and the keyed principal hash. Shared epochs live durably in `authz_cache_epochs`: every L3 read
//! fetches the entry and the four epochs that cover it in one statement, so an L3 hit is always
//! checked against the durable epochs, whatever Redis or the backplane went through. Invalidations
//! bump those epochs first (and mirror them to Redis when L2 is configured). A maintenance task
//! sweeps expired rows in batches and flushes hit counters; a listener turns `NOTIFY`s into
//! invalidations (the change feed) and, without Redis, serves as the backplane.
//!
//! ```no_run
//! use tower_authz_cache::{AuthzCache, Decision, Permission, PostgresTier, Principal};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let l3 = PostgresTier::builder("postgres://app@127.0.0.1/app", std::env::var("AUTHZ_CACHE_SECRET")?)
//!     .schema("authz_cache")
//!     .pool_size(10)
//!     .build()?;
//! // Explicitly, once per deployment (or `authz-cache init`): never at request time.
//! l3.migrate().await?;
//! let cache = AuthzCache::builder(|_: Principal, _: Permission| async {
//!     Ok::<_, std::convert::Infallible>(Decision::allow())
//! })
//! .l3(l3)
//! .build();
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{Array, BigInt, Bytea, Nullable, Text};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, PoolError};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

use crate::cache::epoch::ScopeHashes;
use crate::cache::guard::{BreakerConfig, Guard, GuardError};
use crate::cache::key::Scope;

/// The migrations, in the order they apply: (name, SQL).
const MIGRATIONS: [(&str, &str); 2] = [
    ("0001_authz_cache", include_str!("../../migrations/0001_authz_cache.sql")),
    ("0002_reference_rbac", include_str!("../../migrations/0002_reference_rbac.sql")),
];

/// Builds a [`PostgresTier`]. Defaults: schema `authz_cache`, pool 10, connect timeout 2 s, call
/// timeout 100 ms, breaker opens after 5 consecutive failures for 30 s, write queue 10,000, sweep
/// every 30 s in batches of 1,000, warm the 1,000 most-hit entries at start-up.
#[must_use]
pub struct PostgresTierBuilder {
    url: String,
    secret: Vec<u8>,
    schema: String,
    pool_size: u32,
    connect_timeout: Duration,
    breaker: BreakerConfig,
    write_queue: usize,
    sweep_every: Duration,
    sweep_batch: u32,
    warm_on_start: usize,
    warm_teammates: usize,
}

impl fmt::Debug for PostgresTierBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresTierBuilder")
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("secret", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl PostgresTierBuilder {
    /// The schema holding the tables (created by [`PostgresTier::migrate`]); every instance that
    /// shares decisions uses the same one. Lowercase letters, digits and `_`, starting with a
    /// letter or `_`, at most 40 characters. Default `authz_cache`.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Largest number of pooled connections.
    pub fn pool_size(mut self, size: u32) -> Self {
        self.pool_size = size;
        self
    }

    /// How long to wait for a new connection.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long one Postgres call may take (pool checkout included) before it counts as a failure.
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

    /// How often expired rows are swept, and how many rows one sweep statement removes at most.
    pub fn sweep(mut self, every: Duration, batch: u32) -> Self {
        self.sweep_every = every.max(Duration::from_millis(10));
        self.sweep_batch = batch.max(1);
        self
    }

    /// How many of the most-hit valid entries are loaded into L1 when the cache starts (0: none).
    pub fn warm_on_start(mut self, entries: usize) -> Self {
        self.warm_on_start = entries;
        self
    }

    /// When a principal becomes active (its first check in this process within the allow ttl),
    /// load into L1 the `per_teammate` most-hit valid entries of each of its closest team-mates
    /// (from the reference schema's `mv_team_collaboration_patterns`), in the background.
    /// 0 (the default) turns it off.
    pub fn warm_teammates(mut self, per_teammate: usize) -> Self {
        self.warm_teammates = per_teammate;
        self
    }

    /// Validates the configuration and builds the tier. Connections are made lazily, so a
    /// Postgres that is down at start-up costs a breaker, not the application.
    pub fn build(self) -> Result<PostgresTier, PostgresTierError> {
        if self.secret.len() < 16 {
            return Err(PostgresTierError::config("secret must be at least 16 bytes"));
        }
        let schema_ok = !self.schema.is_empty()
            && self.schema.len() <= 40
            && !self.schema.starts_with(|c: char| c.is_ascii_digit())
            && self.schema.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !schema_ok {
            return Err(PostgresTierError::config("schema must be 1-40 of [a-z0-9_], not starting with a digit"));
        }
        if self.pool_size == 0 {
            return Err(PostgresTierError::config("pool size must be at least 1"));
        }
        if !(self.url.starts_with("postgres://") || self.url.starts_with("postgresql://")) {
            return Err(PostgresTierError::config("database url must start with postgres:// or postgresql://"));
        }
        let pool = bb8::Pool::builder()
            .max_size(self.pool_size)
            .connection_timeout(self.connect_timeout)
            .test_on_check_out(false)
            .retry_connection(false)
            .build_unchecked(Manager::new(AsyncDieselConnectionManager::new(self.url.as_str())));
        let s = &self.schema;
        Ok(PostgresTier {
            shared: Arc::new(PostgresShared {
                pool,
                url: self.url.clone(),
                connect_timeout: self.connect_timeout,
                guard: Guard::new("l3", self.breaker),
                secret: self.secret,
                epochs_channel: format!("{s}.authz_cache_epochs"),
                changes_channel: format!("{s}.authz_cache_changes"),
                read_sql: [
                    format!("SELECT (SELECT value FROM {s}.authz_cache_entries WHERE key = "),
                    format!(
                        "), COALESCE((SELECT value FROM {s}.authz_cache_epochs WHERE scope = 'g' AND hash = 0), 0), \
                         COALESCE((SELECT value FROM {s}.authz_cache_epochs WHERE scope = 'p' AND hash = "
                    ),
                    format!("), 0), COALESCE((SELECT value FROM {s}.authz_cache_epochs WHERE scope = 'r' AND hash = "),
                    format!("), 0), COALESCE((SELECT value FROM {s}.authz_cache_epochs WHERE scope = 'k' AND hash = "),
                    "), 0)".to_owned(),
                ],
                schema: self.schema,
                write_queue: self.write_queue,
                sweep_every: self.sweep_every,
                sweep_batch: self.sweep_batch,
                warm_on_start: self.warm_on_start,
                warm_teammates: self.warm_teammates,
                hits: Mutex::new(HashMap::new()),
            }),
        })
    }
}

/// L3 on PostgreSQL. Cheap to clone. Give it to
/// [`AuthzCacheBuilder::l3`](crate::AuthzCacheBuilder::l3).
#[derive(Clone)]
pub struct PostgresTier {
    pub(crate) shared: Arc<PostgresShared>,
}

impl fmt::Debug for PostgresTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresTier").field("schema", &self.shared.schema).finish_non_exhaustive()
    }
}

impl PostgresTier {
    /// Starts building a tier on `url` (`postgres://user@host:port/db`). `secret` keys the hashes,
    /// MACs and seals of everything this tier stores: every instance sharing the schema needs the
    /// same secret (at least 16 bytes; 32 random bytes recommended), and the same one as L2.
    pub fn builder(url: impl Into<String>, secret: impl AsRef<[u8]>) -> PostgresTierBuilder {
        PostgresTierBuilder {
            url: url.into(),
            secret: secret.as_ref().to_vec(),
            schema: "authz_cache".into(),
            pool_size: 10,
            connect_timeout: Duration::from_secs(2),
            breaker: BreakerConfig { timeout: Duration::from_millis(100), ..BreakerConfig::default() },
            write_queue: 10_000,
            sweep_every: Duration::from_secs(30),
            sweep_batch: 1000,
            warm_on_start: 1000,
            warm_teammates: 0,
        }
    }

    /// The schema this tier uses.
    pub fn schema(&self) -> &str {
        &self.shared.schema
    }

    /// The names of the embedded migrations, in the order [`migrate`](Self::migrate) applies them.
    pub fn migrations() -> impl Iterator<Item = &'static str> {
        MIGRATIONS.iter().map(|(name, _)| *name)
    }

    /// Creates the schema if needed and applies the embedded migrations it has not recorded yet,
    /// in one transaction, under an advisory lock (instances starting together apply them one at
    /// a time; an up-to-date schema costs one round trip and takes no lock on its tables). Every
    /// migration could also be applied again without harm. Never called implicitly.
    pub async fn migrate(&self) -> Result<(), PostgresTierError> {
        #[derive(diesel::QueryableByName)]
        struct Name {
            #[diesel(sql_type = Text)]
            name: String,
        }
        let failed = |e: diesel::result::Error| PostgresTierError::migration(format!("migrations failed: {e}"));
        let s = &self.shared.schema;
        let mut conn = self.shared.connect().await?;
        conn.batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({MIGRATION_LOCK}); CREATE SCHEMA IF NOT EXISTS {s}; \
             SET LOCAL search_path TO {s}; \
             CREATE TABLE IF NOT EXISTS authz_cache_migrations \
                (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());"
        ))
        .await
        .map_err(failed)?;
        let done: Vec<Name> =
            diesel::sql_query("SELECT name FROM authz_cache_migrations").load(&mut conn).await.map_err(failed)?;
        let mut sql = String::new();
        for (name, body) in MIGRATIONS.iter().filter(|(name, _)| !done.iter().any(|d| d.name == *name)) {
            sql.push_str(body);
            sql.push_str(&format!("\nINSERT INTO authz_cache_migrations (name) VALUES ('{name}');\n"));
        }
        // The global epoch exists from the start, at the current time in µs.
        sql.push_str(
            "INSERT INTO authz_cache_epochs (scope, hash, value) \
             VALUES ('g', 0, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint) ON CONFLICT DO NOTHING;\nCOMMIT;",
        );
        conn.batch_execute(&sql).await.map_err(failed)
    }
}

/// The advisory lock `migrate` holds (apps seeding the reference tables may take it too).
pub(crate) const MIGRATION_LOCK: i64 = 7_305_916_249_810_745_345;

/// The Postgres tier could not be configured, reached or migrated.
#[derive(Debug)]
pub struct PostgresTierError {
    message: String,
}

impl PostgresTierError {
    pub(crate) fn config(message: impl Into<String>) -> Self {
        Self { message: message.into() }
    }

    fn migration(message: impl Into<String>) -> Self {
        Self { message: message.into() }
    }
}

impl fmt::Display for PostgresTierError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PostgresTierError {}

/// Why one Postgres call failed (pool or query), as text: diesel's errors can carry the
/// statement's parameters, which must not reach logs.
#[derive(Debug)]
pub(crate) struct PgFailure(String);

impl fmt::Display for PgFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<diesel::result::Error> for PgFailure {
    fn from(e: diesel::result::Error) -> Self {
        use diesel::result::Error as E;
        PgFailure(match e {
            E::DatabaseError(kind, info) => format!("database error ({kind:?}): {}", info.message()),
            E::NotFound => "no row".to_owned(),
            other => format!("{other}"),
        })
    }
}

pub(crate) type PgError = GuardError<PgFailure>;

/// Like the Redis tier's manager: a connection is marked suspect for the length of each call and
/// the mark is cleared only when the call completed, so a call abandoned by a timeout (a black
/// hole, a stuck server) gets its connection dropped by bb8 instead of reused.
pub(crate) struct Manager(AsyncDieselConnectionManager<AsyncPgConnection>);

pub(crate) struct Tracked {
    conn: AsyncPgConnection,
    suspect: bool,
}

impl Manager {
    pub(crate) fn new(inner: AsyncDieselConnectionManager<AsyncPgConnection>) -> Self {
        Self(inner)
    }
}

impl Tracked {
    /// Marks the connection suspect while a call runs on it (see [`Manager`]).
    pub(crate) fn mark_suspect(&mut self, suspect: bool) {
        self.suspect = suspect;
    }

    pub(crate) fn connection(&mut self) -> &mut AsyncPgConnection {
        &mut self.conn
    }
}

impl bb8::ManageConnection for Manager {
    type Connection = Tracked;
    type Error = PoolError;

    async fn connect(&self) -> Result<Tracked, PoolError> {
        Ok(Tracked { conn: bb8::ManageConnection::connect(&self.0).await?, suspect: false })
    }

    async fn is_valid(&self, conn: &mut Tracked) -> Result<(), PoolError> {
        bb8::ManageConnection::is_valid(&self.0, &mut conn.conn).await
    }

    fn has_broken(&self, conn: &mut Tracked) -> bool {
        conn.suspect || bb8::ManageConnection::has_broken(&self.0, &mut conn.conn)
    }
}

/// The L3 read: the entry and its four epochs in one statement. A hand-built query (rather than
/// `sql_query`) so that diesel caches its prepared statement: one round trip per read.
struct ReadQuery<'a> {
    sql: &'a [String; 5],
    key: &'a [u8],
    hashes: [i64; 3],
}

impl QueryId for ReadQuery<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for ReadQuery<'_> {
    type SqlType = (Nullable<Bytea>, BigInt, BigInt, BigInt, BigInt);
}

impl QueryFragment<Pg> for ReadQuery<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> diesel::QueryResult<()> {
        out.push_sql(&self.sql[0]);
        out.push_bind_param::<Bytea, _>(&self.key)?;
        for (i, hash) in self.hashes.iter().enumerate() {
            out.push_sql(&self.sql[i + 1]);
            out.push_bind_param::<BigInt, _>(hash)?;
        }
        out.push_sql(&self.sql[4]);
        Ok(())
    }
}

/// What one L3 read returned: the value, if any, and the durable epochs covering the key
/// (global, principal, resource, entry; 0 when absent). `epochs` is `None` when one is unreadable.
pub(crate) struct L3Read {
    pub(crate) value: Option<Vec<u8>>,
    pub(crate) epochs: Option<[u64; 4]>,
}

/// One row to warm: its key id and sealed subject (the entry itself is read like any L3 hit).
pub(crate) struct WarmRow {
    pub(crate) key_id: [u8; 32],
    pub(crate) subject: Vec<u8>,
}

#[derive(diesel::QueryableByName)]
struct WarmRowSql {
    #[diesel(sql_type = Bytea)]
    key: Vec<u8>,
    #[diesel(sql_type = Bytea)]
    subject: Vec<u8>,
}

#[derive(diesel::QueryableByName)]
struct BigIntRow {
    #[diesel(sql_type = BigInt)]
    v: i64,
}

/// Most distinct keys whose hits are counted between two flushes; more are not counted.
const MAX_PENDING_HITS: usize = 10_000;

pub(crate) struct PostgresShared {
    pool: bb8::Pool<Manager>,
    url: String,
    connect_timeout: Duration,
    pub(crate) guard: Guard,
    pub(crate) secret: Vec<u8>,
    pub(crate) schema: String,
    pub(crate) epochs_channel: String,
    pub(crate) changes_channel: String,
    read_sql: [String; 5],
    pub(crate) write_queue: usize,
    pub(crate) sweep_every: Duration,
    pub(crate) sweep_batch: u32,
    pub(crate) warm_on_start: usize,
    pub(crate) warm_teammates: usize,
    hits: Mutex<HashMap<[u8; 32], i64>>,
}

impl PostgresShared {
    /// A connection of its own (not pooled), within the connect timeout.
    pub(crate) async fn connect(&self) -> Result<AsyncPgConnection, PostgresTierError> {
        match tokio::time::timeout(self.connect_timeout, AsyncPgConnection::establish(&self.url)).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(PostgresTierError::config(format!("cannot connect to postgres: {e}"))),
            Err(_) => Err(PostgresTierError::config("cannot connect to postgres: timed out")),
        }
    }

    /// Runs `f` on a pooled connection, under the guard (see [`Manager`]).
    async fn with_conn<T>(
        &self,
        f: impl AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, PgFailure>,
    ) -> Result<T, PgError> {
        self.guard
            .call(async {
                let mut conn = self.pool.get().await.map_err(|e| match e {
                    bb8::RunError::User(e) => PgFailure(format!("connect: {e}")),
                    bb8::RunError::TimedOut => PgFailure("timed out waiting for a connection".to_owned()),
                })?;
                conn.suspect = true;
                let result = f(&mut conn.conn).await;
                if result.is_ok() {
                    conn.suspect = false;
                }
                result
            })
            .await
    }

    /// The entry and its durable epochs, in one round trip.
    pub(crate) async fn read(&self, key_id: &[u8; 32], hashes: &ScopeHashes) -> Result<L3Read, PgError> {
        let query = ReadQuery {
            sql: &self.read_sql,
            key: key_id,
            hashes: [hashes.principal as i64, hashes.resource as i64, hashes.entry as i64],
        };
        let (value, g, p, r, k) = self
            .with_conn(async |conn| {
                query.get_result::<(Option<Vec<u8>>, i64, i64, i64, i64)>(conn).await.map_err(PgFailure::from)
            })
            .await?;
        let epochs = [g, p, r, k].map(|v| u64::try_from(v).ok());
        let epochs = match epochs {
            [Some(g), Some(p), Some(r), Some(k)] => Some([g, p, r, k]),
            _ => None,
        };
        Ok(L3Read { value, epochs })
    }

    /// Upserts a batch of rows (one statement).
    async fn write_batch(&self, rows: &[Write]) -> Result<(), PgError> {
        let s = &self.schema;
        let sql = format!(
            "INSERT INTO {s}.authz_cache_entries (key, value, subject, principal_hash, expires_at) \
             SELECT k, v, sub, p, to_timestamp(e / 1000.0) FROM unnest($1, $2, $3, $4, $5) AS t(k, v, sub, p, e) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, subject = EXCLUDED.subject, \
             principal_hash = EXCLUDED.principal_hash, expires_at = EXCLUDED.expires_at, written_at = now()"
        );
        let keys: Vec<&[u8]> = rows.iter().map(|w| &w.key_id[..]).collect();
        let values: Vec<&[u8]> = rows.iter().map(|w| &w.value[..]).collect();
        let subjects: Vec<&[u8]> = rows.iter().map(|w| &w.subject[..]).collect();
        let principals: Vec<i64> = rows.iter().map(|w| w.principal_hash as i64).collect();
        let expires: Vec<i64> = rows.iter().map(|w| i64::try_from(w.valid_until_ms).unwrap_or(i64::MAX)).collect();
        self.with_conn(async |conn| {
            diesel::sql_query(sql)
                .bind::<Array<Bytea>, _>(keys)
                .bind::<Array<Bytea>, _>(values)
                .bind::<Array<Bytea>, _>(subjects)
                .bind::<Array<BigInt>, _>(principals)
                .bind::<Array<BigInt>, _>(expires)
                .execute(conn)
                .await
                .map(|_| ())
                .map_err(PgFailure::from)
        })
        .await
    }

    /// Bumps a durable epoch (`None`: the global one) and notifies every listener; returns its
    /// new value.
    pub(crate) async fn bump(&self, scope: Option<(Scope, u64)>, floor_us: u64, ttl_ms: u64) -> Result<u64, PgError> {
        let (tag, hash) = match scope {
            None => ("g", 0),
            Some((s, h)) => (s.tag(), h),
        };
        let sql = format!("SELECT {}.authz_cache_bump(CAST($1 AS \"char\"), $2, $3, $4) AS v", self.schema);
        let row = self
            .with_conn(async |conn| {
                diesel::sql_query(sql)
                    .bind::<Text, _>(tag)
                    .bind::<BigInt, _>(hash as i64)
                    .bind::<BigInt, _>(i64::try_from(floor_us).unwrap_or(i64::MAX))
                    .bind::<BigInt, _>(i64::try_from(ttl_ms).unwrap_or(i64::MAX))
                    .get_result::<BigIntRow>(conn)
                    .await
                    .map_err(PgFailure::from)
            })
            .await?;
        u64::try_from(row.v).map_err(|_| GuardError::Failed(PgFailure("negative epoch".to_owned())))
    }

    /// The durable global epoch (0 before the first migration set it).
    pub(crate) async fn global_epoch(&self) -> Result<u64, PgError> {
        let sql = format!(
            "SELECT COALESCE((SELECT value FROM {}.authz_cache_epochs WHERE scope = 'g' AND hash = 0), 0) AS v",
            self.schema
        );
        let row = self
            .with_conn(async |conn| diesel::sql_query(sql).get_result::<BigIntRow>(conn).await.map_err(PgFailure::from))
            .await?;
        Ok(u64::try_from(row.v).unwrap_or(0))
    }

    /// Publishes a heartbeat on the epochs channel.
    pub(crate) async fn heartbeat(&self, instance: &str) -> Result<(), PgError> {
        let payload = format!("h {instance}");
        self.with_conn(async |conn| {
            diesel::sql_query("SELECT pg_notify($1, $2)")
                .bind::<Text, _>(&self.epochs_channel)
                .bind::<Text, _>(payload)
                .execute(conn)
                .await
                .map(|_| ())
                .map_err(PgFailure::from)
        })
        .await
    }

    /// Removes at most `sweep_batch` expired rows; returns how many went.
    pub(crate) async fn sweep_once(&self) -> Result<u64, PgError> {
        let sql = format!("SELECT {}.authz_cache_sweep($1)::bigint AS v", self.schema);
        let batch = i32::try_from(self.sweep_batch).unwrap_or(i32::MAX);
        let row = self
            .with_conn(async |conn| {
                diesel::sql_query(sql)
                    .bind::<diesel::sql_types::Integer, _>(batch)
                    .get_result::<BigIntRow>(conn)
                    .await
                    .map_err(PgFailure::from)
            })
            .await?;
        Ok(u64::try_from(row.v).unwrap_or(0))
    }

    /// Counts one L3 hit on `key_id`, for warming (flushed in the background).
    pub(crate) fn count_hit(&self, key_id: &[u8; 32]) {
        let mut hits = self.hits.lock().unwrap_or_else(|e| e.into_inner());
        if hits.len() < MAX_PENDING_HITS || hits.contains_key(key_id) {
            *hits.entry(*key_id).or_insert(0) += 1;
        }
    }

    /// Adds the counted hits to the rows.
    pub(crate) async fn flush_hits(&self) -> Result<(), PgError> {
        let pending = std::mem::take(&mut *self.hits.lock().unwrap_or_else(|e| e.into_inner()));
        if pending.is_empty() {
            return Ok(());
        }
        let (keys, counts): (Vec<Vec<u8>>, Vec<i64>) = pending.into_iter().map(|(k, n)| (k.to_vec(), n)).unzip();
        let sql = format!(
            "UPDATE {}.authz_cache_entries e SET hits = e.hits + t.n FROM unnest($1, $2) AS t(k, n) WHERE e.key = t.k",
            self.schema
        );
        self.with_conn(async |conn| {
            diesel::sql_query(sql)
                .bind::<Array<Bytea>, _>(keys)
                .bind::<Array<BigInt>, _>(counts)
                .execute(conn)
                .await
                .map(|_| ())
                .map_err(PgFailure::from)
        })
        .await
    }

    /// The `limit` most-hit rows that are still valid, optionally of one principal (by hash).
    pub(crate) async fn most_hit(&self, principal_hash: Option<u64>, limit: usize) -> Result<Vec<WarmRow>, PgError> {
        let s = &self.schema;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .with_conn(async |conn| {
                match principal_hash {
                    None => {
                        diesel::sql_query(format!(
                            "SELECT key, subject FROM {s}.authz_cache_entries WHERE expires_at > now() \
                         ORDER BY hits DESC LIMIT $1"
                        ))
                        .bind::<BigInt, _>(limit)
                        .load::<WarmRowSql>(conn)
                        .await
                    }
                    Some(p) => {
                        diesel::sql_query(format!(
                            "SELECT key, subject FROM {s}.authz_cache_entries WHERE principal_hash = $1 \
                         AND expires_at > now() ORDER BY hits DESC LIMIT $2"
                        ))
                        .bind::<BigInt, _>(p as i64)
                        .bind::<BigInt, _>(limit)
                        .load::<WarmRowSql>(conn)
                        .await
                    }
                }
                .map_err(PgFailure::from)
            })
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| Some(WarmRow { key_id: r.key.try_into().ok()?, subject: r.subject }))
            .collect())
    }

    /// The principals who share the most teams with `principal` (the reference schema's
    /// `mv_team_collaboration_patterns`).
    pub(crate) async fn teammates(&self, principal: &str, limit: usize) -> Result<Vec<String>, PgError> {
        #[derive(diesel::QueryableByName)]
        struct Mate {
            #[diesel(sql_type = Text)]
            teammate: String,
        }
        let sql = format!(
            "SELECT teammate FROM {}.mv_team_collaboration_patterns WHERE principal = $1 \
             ORDER BY shared_teams DESC, teammate LIMIT $2",
            self.schema
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mates = self
            .with_conn(async |conn| {
                diesel::sql_query(sql)
                    .bind::<Text, _>(principal)
                    .bind::<BigInt, _>(limit)
                    .load::<Mate>(conn)
                    .await
                    .map_err(PgFailure::from)
            })
            .await?;
        Ok(mates.into_iter().map(|m| m.teammate).collect())
    }
}

/// One background write.
pub(crate) struct Write {
    pub(crate) key_id: [u8; 32],
    pub(crate) value: Vec<u8>,
    pub(crate) subject: Vec<u8>,
    pub(crate) principal_hash: u64,
    pub(crate) valid_until_ms: u64,
}

/// Rows per upsert statement.
const WRITE_BATCH: usize = 256;

/// How long the writer waits for more rows after the first of a batch.
const WRITE_LINGER: Duration = Duration::from_millis(5);

/// Starts the write-behind worker: it drains the bounded queue in batches of up to
/// `WRITE_BATCH` rows per statement, and stops when the returned sender is dropped.
pub(crate) fn spawn_writer(
    shared: Arc<PostgresShared>,
    stats: Arc<crate::stats::Stats>,
    clock: crate::cache::clock::Clock,
) -> tokio::sync::mpsc::Sender<Write> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Write>(shared.write_queue);
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        while rx.recv_many(&mut batch, WRITE_BATCH).await > 0 {
            // Linger a little for more rows: an upsert costs Postgres about as much CPU for one
            // row as for ten, and a write-behind copy is not urgent.
            let linger = tokio::time::Instant::now() + WRITE_LINGER;
            while batch.len() < WRITE_BATCH {
                let room = WRITE_BATCH - batch.len();
                match tokio::time::timeout_at(linger, rx.recv_many(&mut batch, room)).await {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
            let now = clock.now_ms();
            batch.retain(|w| w.valid_until_ms > now);
            // One statement cannot upsert a key twice: keep the last write of each key.
            let mut seen = std::collections::HashSet::with_capacity(batch.len());
            let mut rows: Vec<Write> = batch.drain(..).rev().filter(|w| seen.insert(w.key_id)).collect();
            rows.reverse();
            if rows.is_empty() {
                continue;
            }
            let n = rows.len() as u64;
            match shared.write_batch(&rows).await {
                Ok(()) => {
                    stats.l3.writes.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => {
                    stats.l3.write_errors.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(target: "authz_cache", error = %e, rows = n, "l3 write failed");
                }
            }
        }
    });
    tx
}
