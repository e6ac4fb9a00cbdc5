//! Warming: decisions loaded into L1 before requests ask for them.
//!
//! - [`AuthzCache::warm`]: explicit keys, through the usual tiers (L2, L3, then the authorizer);
//! - [`AuthzCache::warm_from_l3`]: the most-hit valid L3 rows (run at start-up with
//!   [`PostgresTierBuilder::warm_on_start`](crate::PostgresTierBuilder::warm_on_start));
//! - [`AuthzCache::warm_teammates`]: the most-hit rows of a principal's closest team-mates (run
//!   in the background when a principal becomes active, with
//!   [`PostgresTierBuilder::warm_teammates`](crate::PostgresTierBuilder::warm_teammates)).
//!
//! Rows loaded from L3 are checked exactly like an L3 hit (MAC, deadline, durable epochs); their
//! keys come from the sealed subject stored beside them, which opens only under the secret and
//! only for its own key id. Progress goes to tracing (`authz_cache` target) and to
//! [`StatsSnapshot::warmed`](crate::StatsSnapshot::warmed).
//!
//! ```
//! use tower_authz_cache::{AuthzCache, Decision, Permission, Principal};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let cache = AuthzCache::builder(|_: Principal, _: Permission| async {
//!     Ok::<_, std::convert::Infallible>(Decision::allow())
//! })
//! .build();
//! let keys = (1..=3).map(|d| (Principal::new("bob"), Permission::new(format!("documents:{d}"), "read")));
//! let report = cache.warm(keys).await;
//! assert_eq!((report.keys, report.loaded), (3, 3));
//! # });
//! ```

use std::time::Instant;

use serde::Serialize;

use super::AuthzCache;
use super::key::CacheKey;
#[cfg(feature = "postgres")]
use crate::stats::Stats;
use crate::{Permission, Principal};

/// What a warming run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct WarmReport {
    /// Keys (or rows) considered.
    pub keys: u64,
    /// Already valid in L1: nothing to do.
    pub already_cached: u64,
    /// Loaded into L1.
    pub loaded: u64,
    /// Not loaded: no valid entry (expired, invalidated, unverifiable) or no decision obtainable.
    pub skipped: u64,
    /// How long the run took, in milliseconds.
    pub elapsed_ms: u64,
}

/// Keys warmed at once by [`AuthzCache::warm`].
const PARALLEL: usize = 8;

impl AuthzCache {
    /// Loads the decisions for `keys` into L1, up to eight at a time, through the usual tiers
    /// (L2, L3, then the authorizer). Keys already valid in L1 cost nothing.
    pub async fn warm<I>(&self, keys: I) -> WarmReport
    where
        I: IntoIterator<Item = (Principal, Permission)>,
    {
        let start = Instant::now();
        let mut report = WarmReport::default();
        let mut running = tokio::task::JoinSet::new();
        let tally = |report: &mut WarmReport, ok: Result<bool, tokio::task::JoinError>| match ok {
            Ok(true) => report.loaded += 1,
            _ => report.skipped += 1,
        };
        for (principal, permission) in keys {
            report.keys += 1;
            if self.inner.lookup_l1(&CacheKey::new(&principal, &permission), false, true).is_some() {
                report.already_cached += 1;
                continue;
            }
            while running.len() >= PARALLEL {
                if let Some(done) = running.join_next().await {
                    tally(&mut report, done);
                }
            }
            let cache = self.clone();
            running.spawn(async move { cache.check(&principal, &permission).await.is_ok() });
        }
        while let Some(done) = running.join_next().await {
            tally(&mut report, done);
        }
        self.inner.stats.warmed.fetch_add(report.loaded, std::sync::atomic::Ordering::Relaxed);
        report.elapsed_ms = start.elapsed().as_millis() as u64;
        tracing::info!(
            target: "authz_cache",
            keys = report.keys,
            loaded = report.loaded,
            already_cached = report.already_cached,
            skipped = report.skipped,
            elapsed_ms = report.elapsed_ms,
            "warmed explicit keys"
        );
        report
    }

    /// Loads the `limit` most-hit valid L3 rows into L1 (feature `postgres`; nothing without L3).
    #[cfg(feature = "postgres")]
    pub async fn warm_from_l3(&self, limit: usize) -> WarmReport {
        let start = Instant::now();
        let Some(l3) = &self.inner.l3 else { return WarmReport::default() };
        match l3.pg.most_hit(None, limit).await {
            Ok(rows) => self.warm_rows(rows, "most-hit l3 rows", start).await,
            Err(e) => {
                tracing::warn!(target: "authz_cache", error = %e, "warming from l3 failed");
                WarmReport { elapsed_ms: start.elapsed().as_millis() as u64, ..WarmReport::default() }
            }
        }
    }

    /// Loads into L1 the `per_teammate` most-hit valid L3 rows of each of the (at most 16)
    /// principals sharing the most teams with `principal`, from the reference schema's
    /// `mv_team_collaboration_patterns` (feature `postgres`).
    #[cfg(feature = "postgres")]
    pub async fn warm_teammates(&self, principal: &str, per_teammate: usize) -> WarmReport {
        let start = Instant::now();
        let Some(l3) = &self.inner.l3 else { return WarmReport::default() };
        let mates = match l3.pg.teammates(principal, 16).await {
            Ok(mates) => mates,
            Err(e) => {
                tracing::debug!(target: "authz_cache", error = %e, "team-mates not read");
                return WarmReport::default();
            }
        };
        let mut rows = Vec::new();
        for mate in mates {
            let hash = self.inner.epochs.scope_hash(super::Scope::Principal, &mate);
            match l3.pg.most_hit(Some(hash), per_teammate).await {
                Ok(mut some) => rows.append(&mut some),
                Err(e) => {
                    tracing::debug!(target: "authz_cache", error = %e, "team-mate rows not read");
                    break;
                }
            }
        }
        self.warm_rows(rows, "team-mates", start).await
    }

    /// Checks and promotes L3 rows, reporting progress every tenth of the way.
    #[cfg(feature = "postgres")]
    async fn warm_rows(
        &self,
        rows: Vec<crate::tier::postgres::WarmRow>,
        what: &'static str,
        start: Instant,
    ) -> WarmReport {
        let mut report = WarmReport::default();
        let total = rows.len();
        let step = (total / 10).max(1);
        for (i, row) in rows.into_iter().enumerate() {
            report.keys += 1;
            match self.inner.keys.open_subject(&row.key_id, &row.subject) {
                None => {
                    report.skipped += 1;
                    Stats::incr(&self.inner.stats.l3.rejected);
                    tracing::warn!(target: "authz_cache::audit", "security: l3 subject failed verification, not warmed");
                }
                Some(key) if self.inner.lookup_l1(&key, false, true).is_some() => report.already_cached += 1,
                Some(key) => match self.inner.lookup_l3(&key, &row.key_id).await.hit() {
                    Some(_) => report.loaded += 1,
                    None => report.skipped += 1,
                },
            }
            if (i + 1) % step == 0 && total >= 10 {
                tracing::info!(target: "authz_cache", what, done = i + 1, total, loaded = report.loaded, "warming");
            }
        }
        self.inner.stats.warmed.fetch_add(report.loaded, std::sync::atomic::Ordering::Relaxed);
        report.elapsed_ms = start.elapsed().as_millis() as u64;
        tracing::info!(
            target: "authz_cache",
            what,
            rows = report.keys,
            loaded = report.loaded,
            already_cached = report.already_cached,
            skipped = report.skipped,
            elapsed_ms = report.elapsed_ms,
            "warmed from l3"
        );
        report
    }

    /// Team-mate warming: the first check of a principal in a while warms its team-mates in the
    /// background (at most two such runs at once; more are skipped).
    #[cfg(feature = "postgres")]
    pub(crate) fn note_active(&self, principal: &Principal) {
        let (Some(active), Some(l3)) = (&self.inner.active, &self.inner.l3) else { return };
        let id = principal.id_arc();
        if active.contains_key(id) {
            return;
        }
        active.insert(id.clone(), ());
        let Ok(permit) = l3.warmers.clone().try_acquire_owned() else { return };
        let (cache, id, per) = (self.clone(), id.clone(), l3.teammates);
        tokio::spawn(async move {
            cache.warm_teammates(&id, per).await;
            drop(permit);
        });
    }
}

/// Warms from L3 once the cache trusts L1 (its backplane was heard: a first subscription drops
/// L1, so warming before it would be wasted), waiting at most 10 s for that.
#[cfg(feature = "postgres")]
pub(super) async fn on_start(inner: std::sync::Weak<super::Inner>, limit: usize) {
    if limit == 0 {
        return;
    }
    for _ in 0..100 {
        match inner.upgrade() {
            None => return,
            Some(i) if i.l1_trusted() => break,
            Some(_) => {}
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let Some(inner) = inner.upgrade() else { return };
    AuthzCache { inner }.warm_from_l3(limit).await;
}
