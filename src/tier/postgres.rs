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

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{Array, BigInt, Bool, Bytea, Nullable, Text};
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

use crate::cache::epoch::Target;
use crate::cache::key::Scope;
use crate::tier::pool::{self, Checked};
use crate::tier::shared::{
    Backlog, ChangeFeed, Drained, EpochTarget, KeyId, Notice, NoticeFuture, ScopeHashes, SharedTier, Subscription,
    TierError, TierFuture, TierRead, TierSettings, TierWrite, Transport, WarmSource,
};

/// The pool's manager: diesel-async's, with the suspect mark of `tier/pool.rs`.
pub(crate) type Manager = Checked<AsyncDieselConnectionManager<AsyncPgConnection>>;

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
    schema: String,
    pool_size: u32,
    connect_timeout: Duration,
    settings: TierSettings,
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
        self.settings.timeout = timeout;
        self
    }

    /// Consecutive failures that open the circuit breaker.
    pub fn failure_threshold(mut self, failures: u32) -> Self {
        self.settings.failure_threshold = failures.max(1);
        self
    }

    /// How long the breaker stays open before one probe is let through.
    pub fn open_for(mut self, duration: Duration) -> Self {
        self.settings.open_for = duration;
        self
    }

    /// Capacity of the background write queue; when it is full, writes are dropped and counted.
    pub fn write_queue(mut self, capacity: usize) -> Self {
        self.settings.write_queue = capacity.max(1);
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
                warm_teammates: self.warm_teammates,
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

pub(crate) type PgError = TierError;

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

/// Changes taken per drain transaction.
pub(crate) const DRAIN_BATCH: i64 = 256;

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
    settings: TierSettings,
    pub(crate) schema: String,
    pub(crate) epochs_channel: String,
    pub(crate) changes_channel: String,
    read_sql: [String; 6],
    pub(crate) sweep_every: Duration,
    pub(crate) sweep_batch: u32,
    pub(crate) warm_on_start: usize,
    pub(crate) warm_teammates: usize,
    hits: Mutex<HashMap<[u8; 32], i64>>,
    /// When hits were last flushed and rows last swept.
    upkeep: Mutex<(std::time::Instant, std::time::Instant)>,
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

    /// The entry and its durable epochs, in one round trip. A row written more than `max_age_ms`
    /// ago by Postgres's clock reads as absent: entry deadlines come from their writers' clocks,
    /// epoch retention from Postgres's, and this keeps every accepted row younger than the epochs
    /// that could have ended it, whatever the writers' clocks say.
    pub(crate) async fn read(
        &self,
        key_id: &[u8; 32],
        hashes: &ScopeHashes,
        max_age_ms: u64,
    ) -> Result<TierRead, PgError> {
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
        let read = TierRead::new(value, epochs);
        Ok(if changes_pending { read.with_pending_changes() } else { read })
    }

    /// Upserts a batch of rows (one statement).
    async fn write_batch(&self, rows: &[TierWrite]) -> Result<(), PgError> {
        let s = &self.schema;
        let sql = format!(
            "INSERT INTO {s}.authz_cache_entries (key, value, subject, principal_hash, expires_at) \
             SELECT k, v, sub, p, to_timestamp(e / 1000.0) FROM unnest($1, $2, $3, $4, $5) AS t(k, v, sub, p, e) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, subject = EXCLUDED.subject, \
             principal_hash = EXCLUDED.principal_hash, expires_at = EXCLUDED.expires_at, written_at = now()"
        );
        // Rows without a sealed subject (the cache seals one for every write to this tier) are
        // not written: warming could not open them.
        let rows: Vec<&TierWrite> = rows.iter().filter(|w| w.subject().is_some()).collect();
        let keys: Vec<&[u8]> = rows.iter().map(|w| &w.key_id()[..]).collect();
        let values: Vec<&[u8]> = rows.iter().map(|w| w.value()).collect();
        let subjects: Vec<&[u8]> = rows.iter().map(|w| w.subject().unwrap_or_default()).collect();
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
        u64::try_from(row.v).map_err(|_| TierError::new("negative epoch"))
    }

    /// Whether changes or Redis mirror debts wait in the change feed's tables (one round trip).
    pub(crate) async fn feed_backlog(&self) -> Result<Backlog, PgError> {
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
            .with_conn(async |conn| diesel::sql_query(sql).get_result::<Row>(conn).await.map_err(PgFailure::from))
            .await?;
        Ok(Backlog::new(row.changes, row.mirror))
    }

    /// Applies up to [`DRAIN_BATCH`] recorded changes in one transaction: takes them (rows that
    /// another instance is applying are skipped), names their targets with `targets` (a change
    /// without a principal is everything), bumps each once with `floor_us` and `ttl_ms`, records
    /// the values for Redis when `mirror`, deletes the changes, commits. Returns the changes
    /// applied and the values stored. Dropped or failed before the commit, nothing happened (the
    /// connection is discarded, which rolls the transaction back).
    pub(crate) async fn drain_changes(
        &self,
        targets: &(dyn Fn(Option<&str>) -> Vec<EpochTarget> + Send + Sync),
        floor_us: u64,
        ttl_ms: u64,
        mirror: bool,
    ) -> Result<Drained, PgError> {
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
        self.with_conn(async |conn| {
            conn.batch_execute("BEGIN").await.map_err(PgFailure::from)?;
            let changes = diesel::sql_query(take).load::<Change>(conn).await.map_err(PgFailure::from)?;
            if changes.is_empty() {
                conn.batch_execute("COMMIT").await.map_err(PgFailure::from)?;
                return Ok(Drained::default());
            }
            // Each target once, however many changes name it; everything covers the rest.
            let mut named: Vec<Target> = Vec::new();
            for change in &changes {
                for target in targets(change.principal.as_deref()).into_iter().map(|t| t.0) {
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
            Ok(Drained::new(changes.len(), values))
        })
        .await
    }

    /// Epoch values Redis has not been raised to yet (at most [`DRAIN_BATCH`]).
    pub(crate) async fn mirror_debts(&self) -> Result<Vec<(EpochTarget, u64)>, PgError> {
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
            .with_conn(async |conn| diesel::sql_query(sql).load::<Debt>(conn).await.map_err(PgFailure::from))
            .await?;
        Ok(debts
            .into_iter()
            .filter_map(|d| Some((target_of(&d.scope, d.hash)?, u64::try_from(d.value).ok()?)))
            .collect())
    }

    /// Records that Redis must be raised to `value` for `target` (an instance that could not
    /// reach Redis leaves the debt where every instance finds it).
    pub(crate) async fn owe_mirror(&self, target: EpochTarget, value: u64) -> Result<(), PgError> {
        self.settle_mirror(&[(target, value)], true).await
    }

    /// Removes mirror debts Redis has now been raised to (at or above their value).
    pub(crate) async fn paid_mirror(&self, paid: &[(EpochTarget, u64)]) -> Result<(), PgError> {
        self.settle_mirror(paid, false).await
    }

    async fn settle_mirror(&self, rows: &[(EpochTarget, u64)], owe: bool) -> Result<(), PgError> {
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
        let tags: Vec<&str> = rows.iter().map(|(t, _)| t.tag()).collect();
        let hashes: Vec<i64> = rows.iter().map(|(t, _)| t.hash() as i64).collect();
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
        self.with_conn(run).await
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
    pub(crate) async fn most_hit(
        &self,
        principal_hash: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(KeyId, Vec<u8>)>, PgError> {
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
        Ok(rows.into_iter().filter_map(|r| Some((r.key.try_into().ok()?, r.subject))).collect())
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
fn target_of(tag: &str, hash: i64) -> Option<EpochTarget> {
    EpochTarget::from_tag(tag, hash as u64)
}

/// How often counted hits are added to the rows.
const FLUSH_HITS_EVERY: Duration = Duration::from_secs(1);

impl PostgresShared {
    /// Raises a durable epoch to `value` (never lowering it) and notifies every listener.
    async fn raise(&self, target: EpochTarget, value: u64, ttl_ms: u64) -> Result<(), PgError> {
        let s = &self.schema;
        let sql = format!(
            "WITH up AS (INSERT INTO {s}.authz_cache_epochs AS e (scope, hash, value, expires_at) \
             VALUES (CAST($1 AS \"char\"), $2, $3, CASE WHEN $1 = 'g' OR $4 <= 0 THEN NULL \
             ELSE now() + $4 * interval '1 millisecond' END) \
             ON CONFLICT (scope, hash) DO UPDATE SET value = GREATEST(e.value, EXCLUDED.value), \
             expires_at = EXCLUDED.expires_at RETURNING e.value) \
             SELECT pg_notify($5, 'i ' || $1 || ' ' || lpad(to_hex($2), 16, '0') || ' ' || (SELECT value FROM up))"
        );
        let channel = &self.epochs_channel;
        self.with_conn(async |conn| {
            diesel::sql_query(sql)
                .bind::<Text, _>(target.tag())
                .bind::<BigInt, _>(target.hash() as i64)
                .bind::<BigInt, _>(i64::try_from(value).unwrap_or(i64::MAX))
                .bind::<BigInt, _>(i64::try_from(ttl_ms).unwrap_or(i64::MAX))
                .bind::<Text, _>(channel)
                .execute(conn)
                .await
                .map(|_| ())
                .map_err(PgFailure::from)
        })
        .await
    }

    /// Flushes hit counters every second and sweeps expired rows every `sweep_every` (in
    /// batches until one comes back short; bounded, so one sweep cannot run forever), each
    /// statement within the tier's timeout times ten.
    async fn maintain(&self) -> Result<u64, PgError> {
        let step = (self.settings.timeout * 10).max(Duration::from_secs(1));
        let (flush, sweep) = {
            let mut at = self.upkeep.lock().unwrap_or_else(|e| e.into_inner());
            let flush = at.0.elapsed() >= FLUSH_HITS_EVERY;
            let sweep = at.1.elapsed() >= self.sweep_every;
            if flush {
                at.0 = std::time::Instant::now();
            }
            if sweep {
                at.1 = std::time::Instant::now();
            }
            (flush, sweep)
        };
        if flush {
            match tokio::time::timeout(step, self.flush_hits()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(target: "authz_cache", error = %e, "l3 hit counters not flushed"),
                Err(_) => tracing::debug!(target: "authz_cache", "l3 hit counters not flushed: timed out"),
            }
        }
        let mut swept = 0;
        if sweep {
            for _ in 0..1000 {
                match tokio::time::timeout(step, self.sweep_once()).await {
                    Ok(Ok(n)) => {
                        swept += n;
                        if n < u64::from(self.sweep_batch) {
                            break;
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(target: "authz_cache", error = %e, "l3 sweep failed");
                        break;
                    }
                    Err(_) => {
                        tracing::debug!(target: "authz_cache", "l3 sweep timed out");
                        break;
                    }
                }
            }
        }
        Ok(swept)
    }
}

fn ms_of(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl SharedTier for PostgresTier {
    fn settings(&self) -> TierSettings {
        self.shared.settings
    }

    fn read<'a>(&'a self, key_id: &'a KeyId, scopes: &'a ScopeHashes, max_age: Duration) -> TierFuture<'a, TierRead> {
        Box::pin(self.shared.read(key_id, scopes, ms_of(max_age)))
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

/// LISTEN on the epochs and changes channels, on a connection of its own (not pooled); a
/// notice on the changes channel is [`Notice::Changed`].
impl Transport for PostgresTier {
    fn subscribe(&self) -> TierFuture<'_, Box<dyn Subscription>> {
        Box::pin(async move {
            let mut conn = self.shared.connect().await.map_err(TierError::new)?;
            let listen =
                format!("LISTEN \"{}\"; LISTEN \"{}\"", self.shared.epochs_channel, self.shared.changes_channel);
            conn.batch_execute(&listen).await.map_err(|e| TierError::new(PgFailure::from(e)))?;
            let changes = self.shared.changes_channel.clone();
            Ok(Box::new(PgSubscription { conn, changes }) as Box<dyn Subscription>)
        })
    }

    fn heartbeat<'a>(&'a self, instance: &'a str) -> TierFuture<'a, ()> {
        Box::pin(self.shared.heartbeat(instance))
    }
}

struct PgSubscription {
    conn: AsyncPgConnection,
    changes: String,
}

impl Subscription for PgSubscription {
    fn next(&mut self) -> NoticeFuture<'_> {
        Box::pin(async move {
            use futures_util::StreamExt;
            let changes = &self.changes;
            let mut stream = std::pin::pin!(self.conn.notifications_stream());
            Some(match stream.next().await? {
                Ok(n) if n.channel == *changes => Ok(Notice::Changed),
                Ok(n) => Ok(Notice::parse(&n.payload)),
                Err(e) => Err(TierError::new(PgFailure::from(e))),
            })
        })
    }
}

/// `authz_cache_changes` (see `migrations/0003_durable_changes.sql`).
impl ChangeFeed for PostgresTier {
    fn backlog(&self) -> TierFuture<'_, Backlog> {
        Box::pin(self.shared.feed_backlog())
    }

    fn drain<'a>(
        &'a self,
        targets: &'a (dyn Fn(Option<&str>) -> Vec<EpochTarget> + Send + Sync),
        floor: u64,
        retention: Duration,
        mirror: bool,
    ) -> TierFuture<'a, Drained> {
        Box::pin(self.shared.drain_changes(targets, floor, ms_of(retention), mirror))
    }

    fn mirror_debts(&self) -> TierFuture<'_, Vec<(EpochTarget, u64)>> {
        Box::pin(self.shared.mirror_debts())
    }

    fn owe_mirror(&self, target: EpochTarget, value: u64) -> TierFuture<'_, ()> {
        Box::pin(self.shared.owe_mirror(target, value))
    }

    fn paid_mirror<'a>(&'a self, paid: &'a [(EpochTarget, u64)]) -> TierFuture<'a, ()> {
        Box::pin(self.shared.paid_mirror(paid))
    }
}

/// The most-hit rows (hits counted per read and flushed every second), and team-mates from the
/// reference schema's `mv_team_collaboration_patterns`.
impl WarmSource for PostgresTier {
    fn most_hit(&self, principal_hash: Option<u64>, limit: usize) -> TierFuture<'_, Vec<(KeyId, Vec<u8>)>> {
        Box::pin(self.shared.most_hit(principal_hash, limit))
    }

    fn warm_on_start(&self) -> usize {
        self.shared.warm_on_start
    }

    fn warm_teammates(&self) -> usize {
        self.shared.warm_teammates
    }

    fn teammates<'a>(&'a self, principal: &'a str, limit: usize) -> TierFuture<'a, Vec<String>> {
        Box::pin(self.shared.teammates(principal, limit))
    }
}
