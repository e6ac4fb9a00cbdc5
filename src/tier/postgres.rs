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
use diesel::sql_types::{Array, BigInt, Bool, Bytea, Nullable, Text};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, PoolError};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

use crate::cache::epoch::{ScopeHashes, Target};
use crate::cache::guard::{BreakerConfig, Guard, GuardError};
use crate::cache::key::Scope;

/// The migrations, in the order they apply: (name, SQL).
const MIGRATIONS: [(&str, &str); 4] = [
    ("0001_authz_cache", include_str!("../../migrations/0001_authz_cache.sql")),
    ("0002_reference_rbac", include_str!("../../migrations/0002_reference_rbac.sql")),
    ("0003_durable_changes", include_str!("../../migrations/0003_durable_changes.sql")),
    ("0004_rbac_change_feed", include_str!("../../migrations/0004_rbac_change_feed.sql")),
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
        if !crate::tier::names::schema_ok(&self.schema) {
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
                background_timeout: (self.breaker.timeout * 10).max(Duration::from_secs(1)),
                secret: self.secret,
                epochs_channel: format!("{s}.authz_cache_epochs"),
                changes_channel: format!("{s}.authz_cache_changes"),
                read_sql: [
                    format!("SELECT (SELECT value FROM {s}.authz_cache_entries WHERE key = "),
                    // A row older than the reader's longest ttl by Postgres's own clock is never
                    // accepted, whatever deadline its writer's clock gave it (see `read`).
                    " AND written_at > now() - interval '1 millisecond' * ".to_owned(),
                    format!(
                        "), COALESCE((SELECT value FROM {s}.authz_cache_epochs WHERE scope = 'g' AND hash = 0), 0), \
                         COALESCE((SELECT value FROM {s}.authz_cache_epochs WHERE scope = 'p' AND hash = "
                    ),
                    format!("), 0), COALESCE((SELECT value FROM {s}.authz_cache_epochs WHERE scope = 'r' AND hash = "),
                    format!("), 0), COALESCE((SELECT value FROM {s}.authz_cache_epochs WHERE scope = 'k' AND hash = "),
                    // A change recorded in the permission tables and not applied to the epochs yet
                    // may cover this entry: nothing is accepted until it is (see 0003).
                    format!("), 0), EXISTS (SELECT 1 FROM {s}.authz_cache_changes)"),
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
    sql: &'a [String; 6],
    key: &'a [u8],
    max_age_ms: i64,
    hashes: [i64; 3],
}

impl QueryId for ReadQuery<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for ReadQuery<'_> {
    type SqlType = (Nullable<Bytea>, BigInt, BigInt, BigInt, BigInt, Bool);
}

impl QueryFragment<Pg> for ReadQuery<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> diesel::QueryResult<()> {
        out.push_sql(&self.sql[0]);
        out.push_bind_param::<Bytea, _>(&self.key)?;
        out.push_sql(&self.sql[1]);
        out.push_bind_param::<BigInt, _>(&self.max_age_ms)?;
        for (i, hash) in self.hashes.iter().enumerate() {
            out.push_sql(&self.sql[i + 2]);
            out.push_bind_param::<BigInt, _>(hash)?;
        }
        out.push_sql(&self.sql[5]);
        Ok(())
    }
}

/// What one L3 read returned: the value, if any, and the durable epochs covering the key
/// (global, principal, resource, entry; 0 when absent). `epochs` is `None` when one is unreadable;
/// `changes_pending` when the permission tables recorded a change not applied to the epochs yet.
pub(crate) struct L3Read {
    pub(crate) value: Option<Vec<u8>>,
    pub(crate) epochs: Option<[u64; 4]>,
    pub(crate) changes_pending: bool,
}

/// What the change feed's poll found: changes not applied yet, epoch values not mirrored to
/// Redis yet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FeedBacklog {
    pub(crate) changes: bool,
    pub(crate) mirror: bool,
}

/// Changes taken per drain transaction.
pub(crate) const DRAIN_BATCH: i64 = 256;

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
    read_sql: [String; 6],
    /// The change feed's call timeout (see `with_conn_background`).
    background_timeout: Duration,
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
        self.guard.call(self.pooled(f)).await
    }

    /// Runs `f` on a pooled connection for the change feed: under [`background_timeout`] only,
    /// not the breaker. The feed runs off the request path, and must be able to confirm the
    /// moment Postgres is back rather than when the request path's breaker next probes.
    ///
    /// [`background_timeout`]: PostgresShared::background_timeout
    async fn with_conn_background<T>(
        &self,
        f: impl AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, PgFailure>,
    ) -> Result<T, PgError> {
        match tokio::time::timeout(self.background_timeout, self.pooled(f)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(GuardError::Failed(e)),
            Err(_) => Err(GuardError::Timeout),
        }
    }

    /// Runs `f` on a pooled connection, marked suspect unless `f` succeeds (see [`Manager`]).
    async fn pooled<T>(
        &self,
        f: impl AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, PgFailure>,
    ) -> Result<T, PgFailure> {
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
    }

    /// The entry and its durable epochs, in one round trip. A row written more than `max_age_ms`
    /// ago by Postgres's clock reads as absent: entry deadlines come from their writers' clocks,
    /// epoch retention from Postgres's, and this keeps every accepted row younger than the epochs
    /// that could have ended it, whatever the writers' clocks say.
    pub(crate) async fn read(
        &self,
        key_id: &[u8; 32],
        hashes: &ScopeHashes,
        max_age_ms: u64,
    ) -> Result<L3Read, PgError> {
        let query = ReadQuery {
            sql: &self.read_sql,
            key: key_id,
            max_age_ms: i64::try_from(max_age_ms).unwrap_or(i64::MAX),
            hashes: [hashes.principal as i64, hashes.resource as i64, hashes.entry as i64],
        };
        let (value, g, p, r, k, changes_pending) = self
            .with_conn(async |conn| {
                query.get_result::<(Option<Vec<u8>>, i64, i64, i64, i64, bool)>(conn).await.map_err(PgFailure::from)
            })
            .await?;
        let epochs = [g, p, r, k].map(|v| u64::try_from(v).ok());
        let epochs = match epochs {
            [Some(g), Some(p), Some(r), Some(k)] => Some([g, p, r, k]),
            _ => None,
        };
        Ok(L3Read { value, epochs, changes_pending })
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

    /// Whether changes or Redis mirror debts wait in the change feed's tables (one round trip).
    pub(crate) async fn feed_backlog(&self) -> Result<FeedBacklog, PgError> {
        #[derive(diesel::QueryableByName)]
        struct Row {
            #[diesel(sql_type = Bool)]
            changes: bool,
            #[diesel(sql_type = Bool)]
            mirror: bool,
        }
        let s = &self.schema;
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {s}.authz_cache_changes) AS changes, \
             EXISTS (SELECT 1 FROM {s}.authz_cache_mirror) AS mirror"
        );
        let row = self
            .with_conn_background(async |conn| {
                diesel::sql_query(sql).get_result::<Row>(conn).await.map_err(PgFailure::from)
            })
            .await?;
        Ok(FeedBacklog { changes: row.changes, mirror: row.mirror })
    }

    /// Applies up to [`DRAIN_BATCH`] recorded changes in one transaction: takes them (rows that
    /// another instance is applying are skipped), names their targets with `targets` (a change
    /// without a principal is everything), bumps each once with `floor_us` and `ttl_ms`, records
    /// the values for Redis when `mirror`, deletes the changes, commits. Returns the changes
    /// applied and the values stored. Dropped or failed before the commit, nothing happened (the
    /// connection is discarded, which rolls the transaction back).
    pub(crate) async fn drain_changes(
        &self,
        targets: impl Fn(Option<&str>) -> Vec<Target>,
        floor_us: u64,
        ttl_ms: u64,
        mirror: bool,
    ) -> Result<(usize, Vec<(Target, u64)>), PgError> {
        #[derive(diesel::QueryableByName)]
        struct Change {
            #[diesel(sql_type = BigInt)]
            seq: i64,
            #[diesel(sql_type = Nullable<Text>)]
            principal: Option<String>,
        }
        #[derive(diesel::QueryableByName)]
        struct Applied {
            #[diesel(sql_type = Text)]
            out_scope: String,
            #[diesel(sql_type = BigInt)]
            out_hash: i64,
            #[diesel(sql_type = BigInt)]
            out_value: i64,
        }
        let s = &self.schema;
        let take = format!(
            "SELECT seq, principal FROM {s}.authz_cache_changes ORDER BY seq LIMIT {DRAIN_BATCH} FOR UPDATE SKIP LOCKED"
        );
        let apply = format!(
            "SELECT out_scope::text AS out_scope, out_hash, out_value FROM {s}.authz_cache_apply_changes(\
             $1, CAST($2 AS \"char\"[]), $3, $4, $5, $6)"
        );
        self.with_conn_background(async |conn| {
            conn.batch_execute("BEGIN").await.map_err(PgFailure::from)?;
            let changes = diesel::sql_query(take).load::<Change>(conn).await.map_err(PgFailure::from)?;
            if changes.is_empty() {
                conn.batch_execute("COMMIT").await.map_err(PgFailure::from)?;
                return Ok((0, Vec::new()));
            }
            // Each target once, however many changes name it; everything covers the rest.
            let mut named: Vec<Target> = Vec::new();
            for change in &changes {
                for target in targets(change.principal.as_deref()) {
                    if !named.contains(&target) {
                        named.push(target);
                    }
                }
            }
            if named.contains(&None) {
                named.retain(Option::is_none);
            }
            let seqs: Vec<i64> = changes.iter().map(|c| c.seq).collect();
            let tags: Vec<&str> = named.iter().map(|t| t.map_or("g", |(scope, _)| scope.tag())).collect();
            let hashes: Vec<i64> = named.iter().map(|t| t.map_or(0, |(_, h)| h as i64)).collect();
            let applied = diesel::sql_query(apply)
                .bind::<Array<BigInt>, _>(seqs)
                .bind::<Array<Text>, _>(tags)
                .bind::<Array<BigInt>, _>(hashes)
                .bind::<BigInt, _>(i64::try_from(floor_us).unwrap_or(i64::MAX))
                .bind::<BigInt, _>(i64::try_from(ttl_ms).unwrap_or(i64::MAX))
                .bind::<Bool, _>(mirror)
                .load::<Applied>(conn)
                .await
                .map_err(PgFailure::from)?;
            conn.batch_execute("COMMIT").await.map_err(PgFailure::from)?;
            let values = applied
                .into_iter()
                .filter_map(|a| Some((target_of(&a.out_scope, a.out_hash)?, u64::try_from(a.out_value).ok()?)))
                .collect();
            Ok((changes.len(), values))
        })
        .await
    }

    /// Epoch values Redis has not been raised to yet (at most [`DRAIN_BATCH`]).
    pub(crate) async fn mirror_debts(&self) -> Result<Vec<(Target, u64)>, PgError> {
        #[derive(diesel::QueryableByName)]
        struct Debt {
            #[diesel(sql_type = Text)]
            scope: String,
            #[diesel(sql_type = BigInt)]
            hash: i64,
            #[diesel(sql_type = BigInt)]
            value: i64,
        }
        let sql = format!(
            "SELECT scope::text AS scope, hash, value FROM {}.authz_cache_mirror LIMIT {DRAIN_BATCH}",
            self.schema
        );
        let debts = self
            .with_conn_background(async |conn| diesel::sql_query(sql).load::<Debt>(conn).await.map_err(PgFailure::from))
            .await?;
        Ok(debts
            .into_iter()
            .filter_map(|d| Some((target_of(&d.scope, d.hash)?, u64::try_from(d.value).ok()?)))
            .collect())
    }

    /// Records that Redis must be raised to `value` for `target` (an instance that could not
    /// reach Redis leaves the debt where every instance finds it).
    pub(crate) async fn owe_mirror(&self, target: Target, value: u64) -> Result<(), PgError> {
        self.settle_mirror(&[(target, value)], true).await
    }

    /// Removes mirror debts Redis has now been raised to (at or above their value).
    pub(crate) async fn paid_mirror(&self, paid: &[(Target, u64)]) -> Result<(), PgError> {
        self.settle_mirror(paid, false).await
    }

    async fn settle_mirror(&self, rows: &[(Target, u64)], owe: bool) -> Result<(), PgError> {
        if rows.is_empty() {
            return Ok(());
        }
        let s = &self.schema;
        let sql = if owe {
            format!(
                "INSERT INTO {s}.authz_cache_mirror AS m (scope, hash, value) \
                 SELECT CAST(t.s AS \"char\"), t.h, t.v FROM unnest($1, $2, $3) AS t(s, h, v) \
                 ON CONFLICT (scope, hash) DO UPDATE SET value = GREATEST(m.value, EXCLUDED.value)"
            )
        } else {
            format!(
                "DELETE FROM {s}.authz_cache_mirror m USING unnest($1, $2, $3) AS t(s, h, v) \
                 WHERE m.scope = CAST(t.s AS \"char\") AND m.hash = t.h AND m.value <= t.v"
            )
        };
        let tags: Vec<&str> = rows.iter().map(|(t, _)| t.map_or("g", |(scope, _)| scope.tag())).collect();
        let hashes: Vec<i64> = rows.iter().map(|(t, _)| t.map_or(0, |(_, h)| h as i64)).collect();
        let values: Vec<i64> = rows.iter().map(|(_, v)| i64::try_from(*v).unwrap_or(i64::MAX)).collect();
        let run = async |conn: &mut AsyncPgConnection| {
            diesel::sql_query(sql)
                .bind::<Array<Text>, _>(tags)
                .bind::<Array<BigInt>, _>(hashes)
                .bind::<Array<BigInt>, _>(values)
                .execute(conn)
                .await
                .map(|_| ())
                .map_err(PgFailure::from)
        };
        // A debt is recorded on the invalidation's path (guarded); paid by the feed (background).
        if owe { self.with_conn(run).await } else { self.with_conn_background(run).await }
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

/// The target a scope tag and hash name in the epochs table.
fn target_of(tag: &str, hash: i64) -> Option<Target> {
    match tag {
        "g" => Some(None),
        tag => Some(Some((Scope::from_tag(tag)?, hash as u64))),
    }
}

/// One background write.
pub(crate) struct Write {
    pub(crate) key_id: [u8; 32],
    pub(crate) value: Vec<u8>,
    pub(crate) subject: Vec<u8>,
    pub(crate) principal_hash: u64,
    pub(crate) valid_until_ms: u64,
    /// When it was queued: a write that waited longer than [`MAX_WRITE_DELAY`] is dropped.
    pub(crate) queued_at: std::time::Instant,
}

/// How long a row may wait in the write queue. Readers accept a row for the longest ttl after
/// Postgres stored it (`written_at`); a row queued for longer than this would outlive what its
/// stamp was checked against by more than the retention margin allows, so it is dropped
/// (counted as a write drop).
pub(crate) const MAX_WRITE_DELAY: Duration = Duration::from_secs(2);

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
            let queued = batch.len();
            batch.retain(|w| w.queued_at.elapsed() < MAX_WRITE_DELAY);
            let late = queued - batch.len();
            if late > 0 {
                stats.l3.write_drops.fetch_add(late as u64, std::sync::atomic::Ordering::Relaxed);
            }
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
