//! Warming from L3: the most-hit valid rows (the [`WarmSource`]).

use diesel::sql_types::{BigInt, Bytea};
use diesel_async::RunQueryDsl;

use super::{PgError, PgFailure, PostgresShared, PostgresTier};
use crate::tier::shared::{KeyId, TierFuture, WarmSource};

#[derive(diesel::QueryableByName)]
struct WarmRowSql {
    #[diesel(sql_type = Bytea)]
    key: Vec<u8>,
    #[diesel(sql_type = Bytea)]
    subject: Vec<u8>,
}

impl PostgresShared {
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
}
