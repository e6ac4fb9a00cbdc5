//! L3's entries and epochs: the read (the entry and its four epochs in one prepared statement),
//! the batched upsert, bumps and raises.

use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{Array, BigInt, Bool, Bytea, Nullable, Text};
use diesel_async::RunQueryDsl;

use super::{BigIntRow, PgError, PgFailure, PostgresShared};
use crate::cache::key::Scope;
use crate::tier::shared::{EpochTarget, ScopeHashes, TierError, TierRead, TierWrite};

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

impl PostgresShared {
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

    /// Several reads in one statement (the same rules as [`read`](Self::read)), in order.
    pub(crate) async fn read_many(
        &self,
        reads: &[([u8; 32], ScopeHashes)],
        max_age_ms: u64,
    ) -> Result<Vec<TierRead>, PgError> {
        #[derive(diesel::QueryableByName)]
        struct Row {
            #[diesel(sql_type = Nullable<Bytea>)]
            value: Option<Vec<u8>>,
            #[diesel(sql_type = BigInt)]
            g: i64,
            #[diesel(sql_type = BigInt)]
            p: i64,
            #[diesel(sql_type = BigInt)]
            r: i64,
            #[diesel(sql_type = BigInt)]
            k: i64,
            #[diesel(sql_type = Bool)]
            pending: bool,
        }
        let s = &self.schema;
        let epoch = |tag: &str, hash: &str| {
            format!("COALESCE((SELECT value FROM {s}.authz_cache_epochs WHERE scope = '{tag}' AND hash = {hash}), 0)")
        };
        let sql = format!(
            "SELECT (SELECT value FROM {s}.authz_cache_entries WHERE key = t.key \
               AND written_at > now() - interval '1 millisecond' * $2) AS value, \
             {} AS g, {} AS p, {} AS r, {} AS k, EXISTS (SELECT 1 FROM {s}.authz_cache_changes) AS pending \
             FROM unnest($1, $3, $4, $5) WITH ORDINALITY AS t(key, ph, rh, kh, n) ORDER BY t.n",
            epoch("g", "0"),
            epoch("p", "t.ph"),
            epoch("r", "t.rh"),
            epoch("k", "t.kh"),
        );
        let keys: Vec<&[u8]> = reads.iter().map(|(k, _)| &k[..]).collect();
        let hash = |f: fn(&ScopeHashes) -> u64| reads.iter().map(|(_, h)| f(h) as i64).collect::<Vec<i64>>();
        let (ph, rh, kh) = (hash(|h| h.principal), hash(|h| h.resource), hash(|h| h.entry));
        let max_age_ms = i64::try_from(max_age_ms).unwrap_or(i64::MAX);
        let rows = self
            .with_conn(async |conn| {
                diesel::sql_query(sql)
                    .bind::<Array<Bytea>, _>(keys)
                    .bind::<BigInt, _>(max_age_ms)
                    .bind::<Array<BigInt>, _>(ph)
                    .bind::<Array<BigInt>, _>(rh)
                    .bind::<Array<BigInt>, _>(kh)
                    .load::<Row>(conn)
                    .await
                    .map_err(PgFailure::from)
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let epochs = match [row.g, row.p, row.r, row.k].map(|v| u64::try_from(v).ok()) {
                    [Some(g), Some(p), Some(r), Some(k)] => Some([g, p, r, k]),
                    _ => None,
                };
                let read = TierRead::new(row.value, epochs);
                if row.pending { read.with_pending_changes() } else { read }
            })
            .collect())
    }

    /// Upserts a batch of rows (one statement).
    pub(super) async fn write_batch(&self, rows: &[TierWrite]) -> Result<(), PgError> {
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

    /// Raises a durable epoch to `value` (never lowering it) and notifies every listener.
    pub(super) async fn raise(&self, target: EpochTarget, value: u64, ttl_ms: u64) -> Result<(), PgError> {
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
}
