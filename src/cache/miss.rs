//! Past L1: single flight per key, the shared tiers in order, then the authorizer, with the
//! answer thrown away and asked again when an invalidation lands while it is computed.

use std::time::Instant;

use super::clock::ms;
use super::entry::Entry;
use tokio::time::error::Elapsed;

use super::epoch::EpochStamp;
use super::key::CacheKey;
use super::read::SharedRead;
use super::single_flight::{CatchUnwind, Join};
use super::{CheckError, CheckErrorKind, Inner, Outcome};
use crate::BoxError;
use crate::core::authorizer::BoxFuture;
use crate::core::decision::DecisionSource;
use crate::stats::Stats;
use crate::{Decision, Permission, Principal};

/// How many times an answer is computed when invalidations keep landing while it is computed:
/// at least `MIN_ATTEMPTS`, then more (up to `MAX_ATTEMPTS`) while the first attempt started less
/// than the authorizer timeout ago. A burst of invalidations (owed bumps repaid after an outage,
/// on every instance at once) is ridden out; a scope invalidated faster than the authorizer
/// answers, for longer than its timeout, fails as `Unstable`.
pub(super) const MIN_ATTEMPTS: usize = 3;
pub(super) const MAX_ATTEMPTS: usize = 16;

impl Inner {
    /// Past L1: join the flight for this key, or lead it.
    ///
    /// The leader computes inline, on its own task: no spawn, no cross-thread hop. If the
    /// leading request is dropped mid-computation, its flight closes without an answer and
    /// the followers race to lead a new one, so nobody is stranded. A panicking authorizer is
    /// caught and becomes an error for every waiter.
    pub(super) async fn miss(&self, key: CacheKey, principal: &Principal, permission: &Permission) -> Outcome {
        loop {
            match self.flights.join(&key) {
                Join::Leader(leader) => {
                    let computation = self.compute(&key, principal.clone(), permission.clone());
                    let outcome = CatchUnwind::new(computation).await.unwrap_or_else(|()| {
                        self.stats.authorizer_failed();
                        tracing::error!(target: "authz_cache::audit", "authorizer panicked: failing closed");
                        Err(CheckError::new(CheckErrorKind::Panicked, None))
                    });
                    leader.finish(outcome.clone());
                    return outcome;
                }
                Join::Follower(mut rx) => {
                    Stats::incr(&self.stats.single_flight_joins);
                    if let Ok(value) = rx.wait_for(Option::is_some).await {
                        if let Some(outcome) = value.clone() {
                            return outcome.map(|d| {
                                let at = d.computed_at_ms();
                                d.served_from(DecisionSource::Joined, at)
                            });
                        }
                    }
                    // The leader went away without an answer: take over.
                }
            }
        }
    }

    pub(super) async fn compute(&self, key: &CacheKey, principal: Principal, permission: Permission) -> Outcome {
        // Another flight may have filled L1 between our miss and our registration.
        if let Some(decision) = self.lookup_l1(key, false, true) {
            return Ok(decision);
        }
        // The shared-tier key id (an HMAC), computed once for the reads and the write-behind.
        let key_id = self.has_shared_tier().then(|| self.keys.key_id(key));
        // The deepest tier whose epochs were read: a fresh entry is copied to it and to the
        // tiers shallower than it (they mirror its epochs), never to a tier whose epochs were
        // not read. An entry whose stamp missed an invalidation a tier already had would otherwise
        // sit in that tier for a whole ttl, and outlive the epoch that ended it once that epoch
        // is forgotten.
        let mut fresh: Option<usize> = None;
        if let Some(key_id) = &key_id {
            for i in 0..self.tiers.len() {
                match self.lookup_shared(i, key, key_id).await {
                    SharedRead::Hit(entry) => {
                        return Ok(entry.decision(DecisionSource::Tier(self.tiers[i].tier.level)));
                    }
                    SharedRead::Miss => fresh = Some(i),
                    SharedRead::Unread => {}
                }
            }
            if let Some(decision) = self.lookup_rotation(key).await {
                return Ok(decision);
            }
        }
        let first = Instant::now();
        for attempt in 1..=MAX_ATTEMPTS {
            // Epochs are read before the authorizer is asked (no fill after invalidate).
            let stamp = self.epochs.stamp(key);
            Stats::incr(&self.stats.authorizer_calls);
            let answer = self.ask(self.authorizer.authorize_owned(principal.clone(), permission.clone())).await;
            let decision = match answer {
                Ok(Ok(decision)) => {
                    self.stats.authorizer_succeeded();
                    decision.served_from(DecisionSource::Authorizer, self.clock.now_ms())
                }
                Ok(Err(e)) => {
                    self.stats.authorizer_failed();
                    return self.within_grace(key).ok_or_else(|| CheckError::new(CheckErrorKind::Authorizer, Some(e)));
                }
                Err(_) => {
                    self.stats.authorizer_failed();
                    return self.within_grace(key).ok_or_else(|| CheckError::new(CheckErrorKind::Timeout, None));
                }
            };
            if self.epochs.stamp(key) != stamp {
                // An invalidation landed while the authorizer was thinking: its answer may
                // predate the change. Ask again.
                Stats::incr(&self.stats.invalidation_races);
                if attempt >= MIN_ATTEMPTS && first.elapsed() >= self.authorizer_timeout {
                    break;
                }
                continue;
            }
            self.store_fresh(key, key_id.as_ref(), fresh, &decision, stamp);
            return Ok(decision);
        }
        Err(CheckError::new(CheckErrorKind::Unstable, None))
    }

    /// One call to the authorizer (single or batch) under its timeout, its latency recorded.
    pub(super) async fn ask<T>(&self, call: BoxFuture<Result<T, BoxError>>) -> Result<Result<T, BoxError>, Elapsed> {
        let started = Instant::now();
        let answer = tokio::time::timeout(self.authorizer_timeout, call).await;
        let elapsed = started.elapsed();
        self.stats.authorizer_latency.record(elapsed);
        #[cfg(feature = "metrics")]
        crate::exposition::record(crate::exposition::AUTHORIZER_DURATION, &[], elapsed);
        answer
    }

    /// Caches an answer the authorizer gave under `stamp` (the epochs read before it was asked):
    /// in L1, and behind, in the shared tiers `0..=fresh` whose epochs were read.
    pub(super) fn store_fresh(
        &self,
        key: &CacheKey,
        key_id: Option<&[u8; 32]>,
        fresh: Option<usize>,
        decision: &Decision,
        stamp: EpochStamp,
    ) {
        let configured = if decision.is_allowed() { self.allow_ttl_ms } else { self.deny_ttl_ms };
        let ttl = decision.ttl_hint().map_or(configured, |hint| ms(hint).min(configured));
        if ttl > 0 {
            let valid_until_ms = self.clock.now_ms().saturating_add(ttl);
            let entry = Entry::new(decision, valid_until_ms, stamp);
            if let (Some(key_id), Some(deepest)) = (key_id, fresh) {
                self.write_behind(key, key_id, &entry, deepest);
            }
            self.insert_l1(key.clone(), entry);
        }
    }
}
