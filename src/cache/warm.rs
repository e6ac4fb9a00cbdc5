//! Warming: decisions loaded into L1 before requests ask for them.
//!
//! - [`AuthzCache::warm`]: explicit keys, through the usual tiers (L2, L3, then the authorizer);
//! - [`AuthzCache::warm_from_l3`]: the most-hit valid rows of the deepest tier that counts hits
//!   (a [`WarmSource`](crate::tier::WarmSource); run at start-up with its `warm_on_start`, e.g.
//!   [`PostgresTierBuilder::warm_on_start`](crate::PostgresTierBuilder::warm_on_start));
//! - [`AuthzCache::warm_teammates`]: the most-hit rows of a principal's closest team-mates, as a
//!   [`Teammates`](crate::tier::Teammates) plug-in names them (run in the background when a
//!   principal becomes active, with
//!   [`AuthzCacheBuilder::warm_teammates`](crate::AuthzCacheBuilder::warm_teammates)).
//!
//! Rows loaded from a tier are checked exactly like a hit of that tier (MAC, deadline, durable epochs); their
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

use std::sync::Arc;

use super::key::CacheKey;
use super::{AuthzCache, Inner, Slot};
use crate::stats::Stats;
use crate::tier::shared::{KeyId, Teammates as TeammatesSource, WarmSource};
use crate::{Permission, Principal};

/// Team-mate warming's state: who the team-mates are, principals seen recently, and the runs
/// allowed at once.
pub(super) struct Teammates {
    source: Box<dyn TeammatesSource>,
    active: mini_moka::sync::Cache<Arc<str>, ()>,
    per_teammate: usize,
    permits: Arc<tokio::sync::Semaphore>,
}

impl Teammates {
    /// On with a source, a tier that warms, and a non-zero count.
    pub(super) fn new(
        tiers: &[Slot],
        config: Option<(usize, Box<dyn TeammatesSource>)>,
        longest_ttl: std::time::Duration,
    ) -> Option<Self> {
        let (per_teammate, source) = config?;
        tiers.iter().rev().find_map(|slot| slot.tier.tier.warm_source())?;
        (per_teammate > 0).then(|| Self {
            source,
            active: mini_moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(longest_ttl.max(std::time::Duration::from_secs(1)))
                .build(),
            per_teammate,
            permits: Arc::new(tokio::sync::Semaphore::new(2)),
        })
    }
}

impl Inner {
    /// The deepest tier that can warm, and its source.
    pub(super) fn warm_source(&self) -> Option<(usize, &dyn WarmSource)> {
        self.tiers.iter().enumerate().rev().find_map(|(i, slot)| Some((i, slot.tier.tier.warm_source()?)))
    }
}

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

    /// Loads the `limit` most-hit valid rows of the deepest tier that counts hits (L3 on
    /// Postgres) into L1; nothing without such a tier.
    pub async fn warm_from_l3(&self, limit: usize) -> WarmReport {
        let start = Instant::now();
        let Some((i, source)) = self.inner.warm_source() else { return WarmReport::default() };
        let tier = &self.inner.tiers[i].tier;
        match tier.call(source.most_hit(None, limit)).await {
            Ok(rows) => self.warm_rows(i, rows, "most-hit l3 rows", start).await,
            Err(e) => {
                tracing::warn!(target: "authz_cache", error = %e, "warming from l3 failed");
                WarmReport { elapsed_ms: start.elapsed().as_millis() as u64, ..WarmReport::default() }
            }
        }
    }

    /// Loads into L1 the `per_teammate` most-hit valid rows of each of the (at most 16)
    /// principals closest to `principal`, as the [`Teammates`](crate::tier::Teammates) plug-in
    /// given to [`AuthzCacheBuilder::warm_teammates`](crate::AuthzCacheBuilder::warm_teammates)
    /// names them; nothing without one.
    pub async fn warm_teammates(&self, principal: &str, per_teammate: usize) -> WarmReport {
        let start = Instant::now();
        let Some(warming) = &self.inner.warming else { return WarmReport::default() };
        let Some((i, source)) = self.inner.warm_source() else { return WarmReport::default() };
        let tier = &self.inner.tiers[i].tier;
        let mates = match tier.call(warming.source.teammates(principal, 16)).await {
            Ok(mates) => mates,
            Err(e) => {
                tracing::debug!(target: "authz_cache", error = %e, "team-mates not read");
                return WarmReport::default();
            }
        };
        let mut rows = Vec::new();
        for mate in mates {
            let hash = self.inner.epochs.scope_hash(super::key::Scope::Principal, &mate);
            match tier.call(source.most_hit(Some(hash), per_teammate)).await {
                Ok(mut some) => rows.append(&mut some),
                Err(e) => {
                    tracing::debug!(target: "authz_cache", error = %e, "team-mate rows not read");
                    break;
                }
            }
        }
        self.warm_rows(i, rows, "team-mates", start).await
    }

    /// Checks and promotes rows of tier `tier`, reporting progress every tenth of the way.
    async fn warm_rows(
        &self,
        tier: usize,
        rows: Vec<(KeyId, Vec<u8>)>,
        what: &'static str,
        start: Instant,
    ) -> WarmReport {
        let mut report = WarmReport::default();
        let total = rows.len();
        let step = (total / 10).max(1);
        let counters = &self.inner.tiers[tier].tier.counters;
        for (i, (key_id, subject)) in rows.into_iter().enumerate() {
            report.keys += 1;
            match self.inner.keys.open_subject(&key_id, &subject) {
                None => {
                    report.skipped += 1;
                    Stats::incr(&counters.rejected);
                    tracing::warn!(target: "authz_cache::audit", "security: warming subject failed verification, not warmed");
                }
                Some(key) if self.inner.lookup_l1(&key, false, true).is_some() => report.already_cached += 1,
                Some(key) => match self.inner.lookup_shared(tier, &key, &key_id).await {
                    super::read::SharedRead::Hit(_) => report.loaded += 1,
                    _ => report.skipped += 1,
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
    pub(crate) fn note_active(&self, principal: &Principal) {
        let Some(warming) = &self.inner.warming else { return };
        let id = principal.id_arc();
        if warming.active.contains_key(id) {
            return;
        }
        warming.active.insert(id.clone(), ());
        let Ok(permit) = warming.permits.clone().try_acquire_owned() else { return };
        let (cache, id, per) = (self.clone(), id.clone(), warming.per_teammate);
        tokio::spawn(async move {
            cache.warm_teammates(&id, per).await;
            drop(permit);
        });
    }
}

/// Warms from the warming tier once the cache trusts L1 (its backplane was heard: a first
/// subscription drops L1, so warming before it would be wasted), waiting at most 10 s for that.
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
