//! Invalidation: an epoch bump, first in the shared tiers (the authority assigns the value and
//! the mirrors are raised to it, so every instance agrees on it), then in this process. A tier
//! that cannot be reached is owed the bump (`debts.rs`); a bump dropped midway still applies
//! (`unfinished.rs`).

use std::time::Duration;

use super::debts::Owed;
use super::epoch::Target;
use super::key::{CacheKey, Keys, Scope, ShortHash};
use super::{Inner, unfinished};
use crate::Principal;
use crate::consistency::ConsistencyToken;
use crate::invalidation::Invalidation;
use crate::stats::Stats;
use crate::tier::shared::EpochTarget;

impl Inner {
    /// Applies an invalidation; on success, the token of the epoch value it produced.
    pub(super) async fn apply_invalidation(
        &self,
        invalidation: &Invalidation,
        by: Option<&str>,
    ) -> Result<ConsistencyToken, ()> {
        let now = self.clock.now_ms();
        Stats::incr(match invalidation {
            Invalidation::Principal(_) => &self.stats.inv_principal,
            Invalidation::Resource(_) => &self.stats.inv_resource,
            Invalidation::Entry { .. } => &self.stats.inv_entry,
            Invalidation::All => &self.stats.inv_all,
        });
        let target = epoch_target(&self.keys, invalidation);
        // During a rotation, the same scope under the other secret too: entries under either
        // secret may be served until the rotation ends. (The global epoch has no hash.)
        let other = self
            .rotation
            .as_ref()
            .filter(|r| now < r.until_ms && target.is_some())
            .map(|r| epoch_target(&r.keys, invalidation));
        // Cancellation safety: the other secret's scope is covered from the start, so a
        // drop during the first bump still applies it; its own bump takes the cover over.
        let other_unfinished = other.map(|o| unfinished::Unfinished::new(self, o));
        let (mut outcome, value) = self.bump_epochs(target).await;
        if let Some(other) = other {
            if let Some(cover) = other_unfinished {
                cover.finish();
            }
            outcome &= self.bump_epochs(other).await.0;
        }
        audit_invalidation(invalidation, outcome, by);
        let outcome = match value {
            Some(value) if outcome => Ok(ConsistencyToken::issue(&self.keys, target, value)),
            _ => Err(()),
        };
        // Space reclamation, after the epochs made the entries stale (see MemoryTier::remove).
        match invalidation {
            Invalidation::Entry { principal, permission } => {
                self.l1.remove(&CacheKey::new(&Principal::new(principal.as_str()), permission));
            }
            Invalidation::All => self.l1.clear(),
            _ => {}
        }
        outcome
    }

    /// Bumps one target's epoch (shared, then local); whether every shared tier got it, and the
    /// value it now has everywhere (the authority's, or this process's without a shared tier).
    ///
    /// Shared first: the value the authority (the deepest tier) assigns is the one every
    /// instance, and every shared entry stamped from now on, agrees on; the mirrors are raised
    /// to it. The floor sent is above every value this process has seen. A tier that cannot be
    /// reached is owed the bump or the raise (paid in the background; the tier is not read until
    /// then, and a mirror debt is also recorded in the authority's change feed, if it has one,
    /// for every instance to pay). When the authority fails, a shallower tier assigns a value so
    /// that the others hear of it now. This process is covered either way (a local bump), and
    /// the caller learns that the others may not be.
    async fn bump_epochs(&self, target: Target) -> (bool, Option<u64>) {
        let Some(authority) = self.tiers.len().checked_sub(1) else {
            return (true, Some(self.epochs.bump_target(target)));
        };
        let before = self.epochs.current_of(target);
        let retention = Duration::from_millis(self.shared_retention_ms);
        let shared = EpochTarget(target);
        let mut delivered = true;
        let mut settled = false;
        let mut assigned = None;
        // Cancellation safety: dropped at an await below, what a failure there applies.
        let mut unfinished = unfinished::Unfinished::new(self, target);
        let tier = &self.tiers[authority].tier;
        match tier.bump(shared, self.epochs.floor(), retention).await {
            Ok(value) => {
                self.epochs.settle_from(target, before, value);
                settled = true;
                assigned = Some(value);
                unfinished.assigned(value, 0);
                for m in 0..authority {
                    let mirror = &self.tiers[m].tier;
                    let raised = mirror.raise(shared, value, retention).await;
                    unfinished.assigned(value, m + 1);
                    if let Err(e) = raised {
                        self.owe(m, target, Owed::Raise(value));
                        delivered = false;
                        tracing::warn!(target: "authz_cache::audit", tier = mirror.level, error = %e, "invalidation not mirrored: tier skipped until it is");
                        if let Some(feed) = tier.tier.change_feed() {
                            if tier.call(feed.owe_mirror(shared, value)).await.is_err() {
                                tracing::debug!(target: "authz_cache", "mirror debt not recorded durably");
                            }
                        }
                    }
                }
            }
            Err(e) => {
                self.owe(authority, target, Owed::Bump);
                unfinished.authority_owed();
                delivered = false;
                tracing::warn!(target: "authz_cache::audit", tier = tier.level, error = %e, "invalidation not recorded by the authority: tiers skipped until it is");
                // A shallower tier tells the other instances now (its value is not durable; the
                // authority's, when paid, rises above it).
                for m in (0..authority).rev() {
                    if let Ok(value) = self.tiers[m].tier.bump(shared, self.epochs.floor(), retention).await {
                        self.epochs.settle_from(target, before, value);
                        settled = true;
                        break;
                    }
                }
            }
        }
        if !settled {
            self.epochs.bump_local_only(target);
        }
        unfinished.finish();
        (delivered, assigned)
    }
}

/// The epoch an invalidation bumps, named under `keys`: `None` is the global epoch.
fn epoch_target(keys: &Keys, invalidation: &Invalidation) -> Target {
    Some(match invalidation {
        Invalidation::Principal(id) => (Scope::Principal, keys.scope_hash(Scope::Principal, id)),
        Invalidation::Resource(resource) => (Scope::Resource, keys.scope_hash(Scope::Resource, resource)),
        Invalidation::Entry { principal, permission } => {
            (Scope::Entry, keys.entry_hash(&CacheKey::new(&Principal::new(principal.as_str()), permission)))
        }
        Invalidation::All => return None,
    })
}

/// The audit event of an invalidation: its scope and target, whether it reached the shared tier,
/// and who asked (a short keyed hash, like every principal in logs).
fn audit_invalidation(invalidation: &Invalidation, shared: bool, by: Option<&str>) {
    let by = by.map(|p| ShortHash::of(p).to_string()).unwrap_or_else(|| "-".to_owned());
    match invalidation {
        Invalidation::Principal(id) => {
            tracing::info!(target: "authz_cache::audit", scope = "principal", principal = %ShortHash::of(id), shared, by = %by, "invalidated");
        }
        Invalidation::Resource(resource) => {
            tracing::info!(target: "authz_cache::audit", scope = "resource", resource = %resource, shared, by = %by, "invalidated");
        }
        Invalidation::Entry { principal, permission } => {
            tracing::info!(target: "authz_cache::audit", scope = "entry", principal = %ShortHash::of(principal), permission = %permission, shared, by = %by, "invalidated");
        }
        Invalidation::All => {
            tracing::info!(target: "authz_cache::audit", scope = "all", shared, by = %by, "invalidated")
        }
    }
}
