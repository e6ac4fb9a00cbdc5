//! The durable change feed on `authz_cache_changes` and the mirror debts in `authz_cache_mirror`
//! (see `migrations/0003_durable_changes.sql`): the SQL behind [`ChangeFeed`].

use std::time::Duration;

use diesel::sql_types::{Array, BigInt, Bool, Nullable, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

use super::{PgError, PgFailure, PostgresShared, PostgresTier, ms_of};
use crate::cache::epoch::Target;
use crate::tier::shared::{Backlog, ChangeFeed, Drained, EpochTarget, TierFuture};

/// Changes taken per drain transaction.
pub(crate) const DRAIN_BATCH: i64 = 256;

impl PostgresShared {
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
}

/// The target a scope tag and hash name in the epochs table.
fn target_of(tag: &str, hash: i64) -> Option<EpochTarget> {
    EpochTarget::from_tag(tag, hash as u64)
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
