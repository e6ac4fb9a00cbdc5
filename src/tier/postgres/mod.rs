//! L3 on PostgreSQL (feature `postgres`): [`PostgresTier`], a diesel-async bb8 pool implementing
//! [`SharedTier`] with a durable [`ChangeFeed`], a LISTEN/NOTIFY [`Transport`] and a
//! [`WarmSource`], and [`PostgresTier::migrate`], which applies the embedded `migrations/`.
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
//! let l3 = PostgresTier::builder("postgres://app@127.0.0.1/app")
//!     .schema("authz_cache")
//!     .pool_size(10)
//!     .build()?;
//! // Explicitly, once per deployment (or `authz-cache init`): never at request time.
//! l3.migrate().await?;
//! let cache = AuthzCache::builder(|_: Principal, _: Permission| async {
//!     Ok::<_, std::convert::Infallible>(Decision::allow())
//! })
//! .secret(std::env::var("AUTHZ_CACHE_SECRET")?)
//! .l3(l3)
//! .build();
//! # Ok(()) }
//! ```

mod feed;
mod listen;
mod read;
mod upkeep;
mod warm;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel::sql_types::{BigInt, Text};
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

use crate::tier::pool::{self, Checked};
use crate::tier::shared::{
    ChangeFeed, EpochTarget, KeyId, ScopeHashes, SharedTier, TierError, TierFuture, TierRead, TierSettings, TierWrite,
    Transport, WarmSource,
};

/// The pool's manager: diesel-async's, with the suspect mark of `tier/pool.rs`.
pub(crate) type Manager = Checked<AsyncDieselConnectionManager<AsyncPgConnection>>;

/// The migrations, in the order they apply: (name, SQL).
/// The cache's own migrations (entries, epochs, the change feed's tables and functions).
const CACHE_MIGRATIONS: [(&str, &str); 2] = [
    ("0001_authz_cache", include_str!("../../../migrations/0001_authz_cache.sql")),
    ("0003_durable_changes", include_str!("../../../migrations/0003_durable_changes.sql")),
];

/// The reference RBAC schema (users, roles, the views `PostgresRbacAuthorizer` reads, and the
/// triggers that record its changes in the cache's change feed): applied only on request, after
/// the cache's own.
const REFERENCE_RBAC_MIGRATIONS: [(&str, &str); 2] = [
    ("0002_reference_rbac", include_str!("../../../migrations/0002_reference_rbac.sql")),
    ("0004_rbac_change_feed", include_str!("../../../migrations/0004_rbac_change_feed.sql")),
];

/// Builds a [`PostgresTier`]. Defaults: schema `authz_cache`, pool 10, connect timeout 2 s, call
/// timeout 100 ms, breaker opens after 5 consecutive failures for 30 s, write queue 10,000, sweep
/// every 30 s in batches of 1,000, warm the 1,000 most-hit entries at start-up.
#[must_use]
pub struct PostgresTierBuilder {
    url: String,
    schema: String,
    pool_size: u32,
    connect_timeout: Duration,
    settings: TierSettings,
    sweep_every: Duration,
    sweep_batch: u32,
    warm_on_start: usize,
}

impl fmt::Debug for PostgresTierBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresTierBuilder")
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
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

    crate::tier::shared::guard_setters!("Postgres");

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

    /// Validates the configuration and builds the tier. Connections are made lazily, so a
    /// Postgres that is down at start-up costs a breaker, not the application.
    pub fn build(self) -> Result<PostgresTier, PostgresTierError> {
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
            .build_unchecked(Checked(AsyncDieselConnectionManager::new(self.url.as_str())));
        let s = &self.schema;
        Ok(PostgresTier {
            shared: Arc::new(PostgresShared {
                pool,
                url: self.url.clone(),
                connect_timeout: self.connect_timeout,
                settings: self.settings,
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
                sweep_every: self.sweep_every,
                sweep_batch: self.sweep_batch,
                warm_on_start: self.warm_on_start,
                hits: Mutex::new(HashMap::new()),
                upkeep: Mutex::new((std::time::Instant::now(), std::time::Instant::now())),
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
    /// Starts building a tier on `url` (`postgres://user@host:port/db`). The secret that keys
    /// what it stores is the cache's ([`AuthzCacheBuilder::secret`](crate::AuthzCacheBuilder::secret)).
    pub fn builder(url: impl Into<String>) -> PostgresTierBuilder {
        PostgresTierBuilder {
            url: url.into(),
            schema: "authz_cache".into(),
            pool_size: 10,
            connect_timeout: Duration::from_secs(2),
            // One writer, up to 256 rows per upsert, lingering 5 ms for more: an upsert costs
            // Postgres about as much CPU for one row as for ten, and a copy is not urgent.
            settings: TierSettings::default()
                .timeout(Duration::from_millis(100))
                .writes(1, 256, Duration::from_millis(5))
                .stores_subjects(true),
            sweep_every: Duration::from_secs(30),
            sweep_batch: 1000,
            warm_on_start: 1000,
        }
    }

    /// The schema this tier uses.
    pub fn schema(&self) -> &str {
        &self.shared.schema
    }

    /// The names of every embedded migration, in the order
    /// [`migrate_with_reference_rbac`](Self::migrate_with_reference_rbac) applies them: the
    /// cache's own ([`cache_migrations`](Self::cache_migrations)), then the reference RBAC schema's.
    pub fn migrations() -> impl Iterator<Item = &'static str> {
        CACHE_MIGRATIONS.iter().chain(&REFERENCE_RBAC_MIGRATIONS).map(|(name, _)| *name)
    }

    /// The names of the cache's own migrations, in the order [`migrate`](Self::migrate) applies
    /// them.
    pub fn cache_migrations() -> impl Iterator<Item = &'static str> {
        CACHE_MIGRATIONS.iter().map(|(name, _)| *name)
    }

    /// Creates the schema if needed and applies the cache's own migrations (entries, epochs, the
    /// change feed) it has not recorded yet; the reference RBAC schema is not touched (see
    /// [`migrate_with_reference_rbac`](Self::migrate_with_reference_rbac)). One transaction,
    /// under an advisory lock (instances starting together apply them one at a time; an
    /// up-to-date schema costs one round trip and takes no lock on its tables). Every migration
    /// could also be applied again without harm. Never called implicitly.
    pub async fn migrate(&self) -> Result<(), PostgresTierError> {
        self.apply(&[&CACHE_MIGRATIONS]).await
    }

    /// [`migrate`](Self::migrate), then the reference RBAC schema (`users`, `roles`,
    /// `user_roles`, `role_permissions`, teams, the views `PostgresRbacAuthorizer` reads, and the
    /// triggers that record every change in the cache's change feed), in the same transaction.
    /// For the demo, the tests, and apps that adopt the reference schema.
    pub async fn migrate_with_reference_rbac(&self) -> Result<(), PostgresTierError> {
        self.apply(&[&CACHE_MIGRATIONS, &REFERENCE_RBAC_MIGRATIONS]).await
    }

    async fn apply(&self, sets: &[&[(&str, &str)]]) -> Result<(), PostgresTierError> {
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
        for (name, body) in
            sets.iter().flat_map(|set| set.iter()).filter(|(name, _)| !done.iter().any(|d| d.name == *name))
        {
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

pub(crate) type PgError = TierError;

#[derive(diesel::QueryableByName)]
pub(super) struct BigIntRow {
    #[diesel(sql_type = BigInt)]
    pub(super) v: i64,
}

pub(crate) struct PostgresShared {
    pub(super) pool: bb8::Pool<Manager>,
    pub(super) url: String,
    pub(super) connect_timeout: Duration,
    pub(super) settings: TierSettings,
    pub(crate) schema: String,
    pub(crate) epochs_channel: String,
    pub(crate) changes_channel: String,
    pub(super) read_sql: [String; 6],
    pub(crate) sweep_every: Duration,
    pub(crate) sweep_batch: u32,
    pub(crate) warm_on_start: usize,
    pub(super) hits: Mutex<HashMap<[u8; 32], i64>>,
    /// When hits were last flushed and rows last swept.
    pub(super) upkeep: Mutex<(std::time::Instant, std::time::Instant)>,
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

    /// Runs `f` on a pooled connection, marked suspect unless `f` succeeds (see `tier/pool.rs`).
    /// Timeouts and the breaker are the cache's.
    async fn with_conn<T>(
        &self,
        f: impl AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, PgFailure>,
    ) -> Result<T, TierError> {
        pool::with_conn(
            &self.pool,
            |e| match e {
                bb8::RunError::User(e) => PgFailure(format!("connect: {e}")),
                bb8::RunError::TimedOut => PgFailure("timed out waiting for a connection".to_owned()),
            },
            Result::is_ok,
            f,
        )
        .await
        .map_err(TierError::new)
    }
}

pub(super) fn ms_of(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl SharedTier for PostgresTier {
    fn settings(&self) -> TierSettings {
        self.shared.settings
    }

    fn read<'a>(&'a self, key_id: &'a KeyId, scopes: &'a ScopeHashes, max_age: Duration) -> TierFuture<'a, TierRead> {
        Box::pin(self.shared.read(key_id, scopes, ms_of(max_age)))
    }

    /// The whole batch in one statement.
    fn read_many<'a>(&'a self, reads: &'a [(KeyId, ScopeHashes)], max_age: Duration) -> TierFuture<'a, Vec<TierRead>> {
        Box::pin(self.shared.read_many(reads, ms_of(max_age)))
    }

    fn write<'a>(&'a self, batch: &'a [TierWrite]) -> TierFuture<'a, ()> {
        Box::pin(self.shared.write_batch(batch))
    }

    fn bump(&self, target: EpochTarget, floor: u64, retention: Duration) -> TierFuture<'_, u64> {
        Box::pin(self.shared.bump(target.0, floor, ms_of(retention)))
    }

    fn raise(&self, target: EpochTarget, value: u64, retention: Duration) -> TierFuture<'_, ()> {
        Box::pin(self.shared.raise(target, value, ms_of(retention)))
    }

    fn transport(&self) -> Option<&dyn Transport> {
        Some(self)
    }

    fn change_feed(&self) -> Option<&dyn ChangeFeed> {
        Some(self)
    }

    fn warm_source(&self) -> Option<&dyn WarmSource> {
        Some(self)
    }

    fn count_hit(&self, key_id: &KeyId) {
        self.shared.count_hit(key_id);
    }

    fn maintain(&self) -> TierFuture<'_, u64> {
        Box::pin(self.shared.maintain())
    }
}
