//! Batch checks: one principal, many permissions ("which of these 100 documents may bob
//! read"). L1 first; then single flight per key (a key another request is computing is waited
//! for, not asked again); then each shared tier once for every key still missing (one round
//! trip per tier, [`SharedTier::read_many`](crate::tier::SharedTier::read_many)); then the
//! authorizer once for the rest ([`Authorizer::authorize_many`](crate::Authorizer::authorize_many)).
//! Every rule of a single check holds for each key: epochs read before the authorizer is asked,
//! an answer raced by an invalidation asked again (alone, by the single path), fresh entries
//! copied only to the tiers whose epochs were read.

use std::collections::HashMap;
use std::time::Instant;

use super::key::{CacheKey, ShortHash};
use super::read::SharedRead;
use super::single_flight::{CatchUnwind, Join, Leader};
use super::{AuthzCache, CheckError, CheckErrorKind, Inner, Outcome};
use crate::core::decision::DecisionSource;
use crate::stats::Stats;
use crate::{Decision, Permission, Principal};

impl AuthzCache {
    /// Decides each of `permissions` for `principal`: the decisions in order, each as
    /// [`check`](AuthzCache::check) would decide it (an error is "not allowed"), at the cost of
    /// one tier round trip and at most one authorizer call for the whole batch
    /// ([`Authorizer::authorize_many`](crate::Authorizer::authorize_many)).
    ///
    /// ```
    /// use tower_authz_cache::{AuthzCache, Decision, Permission, Principal};
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let cache = AuthzCache::builder(|_: Principal, perm: Permission| async move {
    ///     Ok::<_, std::convert::Infallible>(Decision::from_bool(perm.resource() != "documents:2"))
    /// })
    /// .build();
    /// let bob = Principal::new("bob");
    /// let reads: Vec<Permission> = (1..=3).map(|i| Permission::new(format!("documents:{i}"), "read")).collect();
    /// let decisions = cache.check_many(&bob, &reads).await;
    /// let allowed: Vec<bool> = decisions.iter().map(|d| d.as_ref().is_ok_and(Decision::is_allowed)).collect();
    /// assert_eq!(allowed, [true, false, true]);
    /// # });
    /// ```
    pub async fn check_many(
        &self,
        principal: &Principal,
        permissions: &[Permission],
    ) -> Vec<Result<Decision, CheckError>> {
        let start = Instant::now();
        let (outcomes, missed) = self.inner.check_many(principal, permissions, || self.note_active(principal)).await;
        if missed {
            let elapsed = start.elapsed();
            self.inner.stats.miss_latency.record(elapsed);
            #[cfg(feature = "metrics")]
            crate::exposition::record(crate::exposition::CHECK_DURATION, &[("path", "miss")], elapsed);
        }
        if let Some(sampler) = &self.inner.auditor {
            for (permission, outcome) in permissions.iter().zip(&outcomes) {
                if let Ok(d) = outcome {
                    if d.source().is_hit() && sampler.due() {
                        let key = super::key::CacheKey::new(principal, permission);
                        self.inner.offer_audit(&key, principal, permission, d);
                    }
                }
            }
        }
        let undecided = outcomes.iter().filter(|o| o.is_err()).count();
        if undecided > 0 {
            Stats::add(&self.inner.stats.undecided, undecided);
            let error = outcomes.iter().find_map(|o| o.as_ref().err()).map(ToString::to_string).unwrap_or_default();
            tracing::warn!(
                target: "authz_cache::audit",
                principal = %ShortHash::of(principal.id()),
                undecided,
                of = outcomes.len(),
                error = %error,
                "no decision obtainable for part of a batch: failing closed"
            );
        }
        outcomes
    }

    /// The items `principal` may act on, in order: `permission` names what each one needs, and
    /// they are checked together ([`check_many`](AuthzCache::check_many)). Fails closed: if any
    /// item cannot be decided, the error, not a partial list.
    ///
    /// ```
    /// use tower_authz_cache::{AuthzCache, Decision, Permission, Principal};
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let cache = AuthzCache::builder(|_: Principal, perm: Permission| async move {
    ///     Ok::<_, std::convert::Infallible>(Decision::from_bool(perm.resource().ends_with('1')))
    /// })
    /// .build();
    /// let documents = vec![1, 2, 11, 12];
    /// let readable = cache
    ///     .filter_allowed(&Principal::new("bob"), documents, |id| Permission::new(format!("documents:{id}"), "read"))
    ///     .await
    ///     .unwrap();
    /// assert_eq!(readable, [1, 11]);
    /// # });
    /// ```
    pub async fn filter_allowed<T>(
        &self,
        principal: &Principal,
        items: Vec<T>,
        permission: impl Fn(&T) -> Permission,
    ) -> Result<Vec<T>, CheckError> {
        let permissions: Vec<Permission> = items.iter().map(permission).collect();
        let decisions = self.check_many(principal, &permissions).await;
        let mut kept = Vec::with_capacity(items.len());
        for (item, decision) in items.into_iter().zip(decisions) {
            if decision?.is_allowed() {
                kept.push(item);
            }
        }
        Ok(kept)
    }
}

impl Inner {
    /// The batch; also whether anything missed L1 (`on_miss` is called once if so).
    async fn check_many(
        &self,
        principal: &Principal,
        permissions: &[Permission],
        on_miss: impl FnOnce(),
    ) -> (Vec<Outcome>, bool) {
        let keys: Vec<CacheKey> = permissions.iter().map(|p| CacheKey::new(principal, p)).collect();
        let mut out: Vec<Option<Outcome>> = vec![None; keys.len()];
        let mut first: HashMap<&CacheKey, usize> = HashMap::new();
        let mut repeats = Vec::new();
        let mut led: Vec<(usize, Leader<Outcome>)> = Vec::new();
        let mut followed = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            if let Some(decision) = self.lookup_l1(key, true, true) {
                out[i] = Some(Ok(decision));
                continue;
            }
            // Only misses are de-duplicated (a repeated hit is just read twice).
            if let Some(&j) = first.get(key) {
                repeats.push((i, j));
                continue;
            }
            first.insert(key, i);
            match self.flights.join(key) {
                Join::Leader(leader) => led.push((i, leader)),
                Join::Follower(rx) => {
                    Stats::incr(&self.stats.single_flight_joins);
                    followed.push((i, rx));
                }
            }
        }
        let missed = !led.is_empty() || !followed.is_empty();
        if missed {
            on_miss();
        }
        // Lead first, then wait: a batch never waits while holding flights others wait for.
        if !led.is_empty() {
            let items: Vec<(&CacheKey, &Permission)> = led.iter().map(|(i, _)| (&keys[*i], &permissions[*i])).collect();
            let outcomes = CatchUnwind::new(self.compute_many(principal, &items)).await.unwrap_or_else(|()| {
                self.stats.authorizer_failed();
                tracing::error!(target: "authz_cache::audit", "authorizer panicked: failing closed");
                vec![Err(CheckError::new(CheckErrorKind::Panicked, None)); items.len()]
            });
            for ((i, leader), outcome) in led.into_iter().zip(outcomes) {
                leader.finish(outcome.clone());
                out[i] = Some(outcome);
            }
        }
        for (i, mut rx) in followed {
            let answer = match rx.wait_for(Option::is_some).await {
                Ok(value) => value.clone(),
                Err(_) => None,
            };
            out[i] = Some(match answer {
                Some(outcome) => outcome.map(|d| {
                    let at = d.computed_at_ms();
                    d.served_from(DecisionSource::Joined, at)
                }),
                // The leader went away without an answer: the single path takes over.
                None => Box::pin(self.miss(keys[i].clone(), principal, &permissions[i])).await,
            });
        }
        for (i, j) in repeats {
            out[i] = out[j].clone();
        }
        let outcomes = out
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(CheckError::new(CheckErrorKind::Unstable, None))))
            .collect();
        (outcomes, missed)
    }

    /// The led keys of a batch: L1 again (another flight may have filled it), each shared tier
    /// once for all keys still missing, then the authorizer once.
    async fn compute_many(&self, principal: &Principal, items: &[(&CacheKey, &Permission)]) -> Vec<Outcome> {
        let mut out: Vec<Option<Outcome>> =
            items.iter().map(|(key, _)| self.lookup_l1(key, false, true).map(Ok)).collect();
        let key_ids: Vec<Option<[u8; 32]>> =
            items.iter().map(|(key, _)| self.has_shared_tier().then(|| self.keys.key_id(key))).collect();
        // Per key, the deepest tier whose epochs were read (see `compute`).
        let mut fresh: Vec<Option<usize>> = vec![None; items.len()];
        if self.has_shared_tier() {
            for t in 0..self.tiers.len() {
                let pending: Vec<usize> = (0..items.len()).filter(|&j| out[j].is_none()).collect();
                if pending.is_empty() {
                    break;
                }
                let batch: Vec<_> = pending
                    .iter()
                    .filter_map(|&j| Some((items[j].0, key_ids[j]?, self.epochs.hashes(items[j].0))))
                    .collect();
                let reads = self.read_tier_batch(t, &self.keys, &batch).await;
                for ((&j, read), (key, key_id, _)) in pending.iter().zip(reads).zip(&batch) {
                    match read {
                        SharedRead::Hit(entry) => {
                            self.promote(t, key, key_id, &entry);
                            out[j] = Some(Ok(entry.decision(DecisionSource::Tier(self.tiers[t].tier.level))));
                        }
                        SharedRead::Miss => fresh[j] = Some(t),
                        SharedRead::Unread => {}
                    }
                }
            }
            for j in 0..items.len() {
                if out[j].is_none() {
                    if let Some(decision) = self.lookup_rotation(items[j].0).await {
                        out[j] = Some(Ok(decision));
                    }
                }
            }
        }
        let ask: Vec<usize> = (0..items.len()).filter(|&j| out[j].is_none()).collect();
        if !ask.is_empty() {
            // Epochs are read before the authorizer is asked (no fill after invalidate).
            let stamps: Vec<_> = ask.iter().map(|&j| self.epochs.stamp(items[j].0)).collect();
            Stats::add(&self.stats.authorizer_calls, ask.len());
            let permissions = ask.iter().map(|&j| items[j].1.clone()).collect();
            let answer = self.ask(self.authorizer.authorize_many_owned(principal.clone(), permissions)).await;
            let failed = match answer {
                Ok(Ok(decisions)) if decisions.len() == ask.len() => {
                    self.stats.authorizer_succeeded();
                    let now = self.clock.now_ms();
                    for ((&j, stamp), decision) in ask.iter().zip(stamps).zip(decisions) {
                        let (key, permission) = items[j];
                        if self.epochs.stamp(key) != stamp {
                            // An invalidation landed while the batch was decided: this key alone
                            // is asked again, by the single path (with its retry rules).
                            Stats::incr(&self.stats.invalidation_races);
                            out[j] = Some(Box::pin(self.compute(key, principal.clone(), permission.clone())).await);
                            continue;
                        }
                        let decision = decision.served_from(DecisionSource::Authorizer, now);
                        self.store_fresh(key, key_ids[j].as_ref(), fresh[j], &decision, stamp);
                        out[j] = Some(Ok(decision));
                    }
                    None
                }
                Ok(Ok(decisions)) => Some(CheckError::new(
                    CheckErrorKind::Authorizer,
                    Some(
                        format!("authorize_many answered {} decisions for {} permissions", decisions.len(), ask.len())
                            .into(),
                    ),
                )),
                Ok(Err(e)) => Some(CheckError::new(CheckErrorKind::Authorizer, Some(e))),
                Err(_) => Some(CheckError::new(CheckErrorKind::Timeout, None)),
            };
            if let Some(error) = failed {
                self.stats.authorizer_failed();
                for &j in &ask {
                    out[j] = Some(self.within_grace(items[j].0).ok_or_else(|| error.clone()));
                }
            }
        }
        out.into_iter().map(|o| o.unwrap_or_else(|| Err(CheckError::new(CheckErrorKind::Unstable, None)))).collect()
    }
}
