//! Background upkeep of L3: hit counters (flushed every second) and the sweeper of expired rows.

use std::time::Duration;

use diesel::sql_types::{Array, BigInt, Bytea};
use diesel_async::RunQueryDsl;

use super::{BigIntRow, PgError, PgFailure, PostgresShared};

/// Most distinct keys whose hits are counted between two flushes; more are not counted.
const MAX_PENDING_HITS: usize = 10_000;

/// How often counted hits are added to the rows.
const FLUSH_HITS_EVERY: Duration = Duration::from_secs(1);

impl PostgresShared {
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

    /// Flushes hit counters every second and sweeps expired rows every `sweep_every` (in
    /// batches until one comes back short; bounded, so one sweep cannot run forever), each
    /// statement within the tier's timeout times ten.
    pub(super) async fn maintain(&self) -> Result<u64, PgError> {
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
