//! Refresh-ahead: an L1 hit in the last part of its entry's ttl recomputes the entry in the
//! background, so that a hot key never misses at its ttl boundary (see
//! [`AuthzCacheBuilder::refresh_ahead`](super::AuthzCacheBuilder::refresh_ahead)).

use std::sync::atomic::Ordering;

/// How long refresh-ahead stops after a refresh's authorizer call failed.
const REFRESH_PAUSE_MS: u64 = 1000;

use super::key::CacheKey;
use super::single_flight::Join;
use super::{AuthzCache, Inner};
use crate::core::decision::DecisionSource;
use crate::stats::Stats;
use crate::{Decision, Permission, Principal};

impl AuthzCache {
    /// Starts one background refresh of `key`, unless one (or a miss) is computing it already
    /// or every refresh permit is taken. Never waits.
    pub(super) fn refresh_ahead(&self, key: CacheKey, principal: &Principal, permission: &Permission) {
        if self.inner.clock.mono_ms() < self.inner.refresh_paused_until_ms.load(Ordering::Relaxed) {
            return;
        }
        let Ok(permit) = self.inner.refreshes.clone().try_acquire_owned() else { return };
        // The flight makes a miss of this key during the refresh wait for it, not ask again.
        let Join::Leader(leader) = self.inner.flights.join(&key) else { return };
        let (inner, principal, permission) = (self.inner.clone(), principal.clone(), permission.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match inner.refresh(&key, principal, permission).await {
                Some(decision) => leader.finish(Ok(decision)),
                // Nothing to hand over: the flight closes, and a waiting miss leads its own.
                None => drop(leader),
            }
        });
    }
}

impl Inner {
    /// Asks the authorizer again for `key` and puts the answer in L1 under the epochs read
    /// before the call; `None` when the call failed or an invalidation raced it (thrown away).
    /// L1 only: the shared tiers' epochs were not read, so no copy goes to them.
    async fn refresh(&self, key: &CacheKey, principal: Principal, permission: Permission) -> Option<Decision> {
        let stamp = self.epochs.stamp(key);
        Stats::incr(&self.stats.authorizer_calls);
        let answer = self.ask(self.authorizer.authorize_owned(principal, permission)).await;
        let decision = match answer {
            Ok(Ok(decision)) => {
                self.stats.authorizer_succeeded();
                decision.served_from(DecisionSource::Authorizer, self.clock.now_ms())
            }
            Ok(Err(_)) | Err(_) => {
                self.stats.authorizer_failed();
                Stats::incr(&self.stats.refreshes_discarded);
                // A failing authorizer is not asked again ahead of time for a while: hot keys
                // would otherwise keep every refresh permit busy against it.
                let until = self.clock.mono_ms().saturating_add(REFRESH_PAUSE_MS);
                self.refresh_paused_until_ms.fetch_max(until, Ordering::Relaxed);
                return None;
            }
        };
        if self.epochs.stamp(key) != stamp {
            Stats::incr(&self.stats.invalidation_races);
            Stats::incr(&self.stats.refreshes_discarded);
            return None;
        }
        Stats::incr(&self.stats.refreshes);
        self.store_fresh(key, None, None, &decision, stamp);
        Some(decision)
    }
}
