//! The consistency auditor: samples decisions the cache served and asks the authorizer again,
//! off the request path (see [`AuditConfig`]).

use std::sync::Weak;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::Inner;
use super::epoch::EpochStamp;
use super::key::{CacheKey, ShortHash};
use crate::consistency::AuditConfig;
use crate::core::decision::DecisionSource;
use crate::invalidation::Invalidation;
use crate::stats::Stats;
use crate::{Decision, Permission, Principal};

/// Samples waiting for the auditor; more are dropped (the load cap holds either way).
const QUEUE: usize = 16;

/// The request side: whether this check is sampled, and the queue to the task.
pub(crate) struct Sampler {
    one_in: u32,
    tx: mpsc::Sender<Sample>,
}

/// One served decision, with the epochs it was served under.
pub(crate) struct Sample {
    key: CacheKey,
    principal: Principal,
    permission: Permission,
    allowed: bool,
    tier: &'static str,
    stamp: EpochStamp,
}

impl Sampler {
    /// The sampler and the receiving end for [`run`].
    pub(crate) fn new(config: &AuditConfig) -> (Self, mpsc::Receiver<Sample>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Self { one_in: config.one_in, tx }, rx)
    }

    /// Whether this check is the one in `one_in` (counted per thread: no shared state).
    #[inline]
    pub(crate) fn due(&self) -> bool {
        thread_local!(static TICK: std::cell::Cell<u32> = const { std::cell::Cell::new(0) });
        TICK.with(|t| {
            let n = t.get().wrapping_add(1);
            t.set(n);
            n % self.one_in == 0
        })
    }
}

impl Inner {
    /// Offers a served decision to the auditor (never waits; dropped when its queue is full).
    pub(super) fn offer_audit(&self, key: &CacheKey, principal: &Principal, permission: &Permission, d: &Decision) {
        let Some(sampler) = &self.auditor else { return };
        let tier = match d.source() {
            DecisionSource::L1 | DecisionSource::Grace => "l1",
            DecisionSource::Tier(level) => level,
            _ => return,
        };
        let sample = Sample {
            key: key.clone(),
            principal: principal.clone(),
            permission: permission.clone(),
            allowed: d.is_allowed(),
            tier,
            stamp: self.epochs.stamp(key),
        };
        if sampler.tx.try_send(sample).is_err() {
            Stats::incr(&self.stats.audits_dropped);
        }
    }

    /// One audit: the authorizer asked again, compared with what was served.
    async fn audit(&self, sample: Sample, invalidate: bool) {
        Stats::incr(&self.stats.audits);
        let call = self.authorizer.authorize_owned(sample.principal.clone(), sample.permission.clone());
        let Ok(Ok(truth)) = tokio::time::timeout(self.authorizer_timeout, call).await else {
            return; // no answer: nothing to compare (the request path counts authorizer failures)
        };
        if truth.is_allowed() == sample.allowed {
            return;
        }
        if self.epochs.stamp(&sample.key) != sample.stamp {
            return; // an invalidation covered the key since it was served: the hook works
        }
        Stats::incr(match sample.tier {
            "l1" => &self.stats.audit_mismatches_l1,
            "l2" => &self.stats.audit_mismatches_l2,
            _ => &self.stats.audit_mismatches_l3,
        });
        tracing::warn!(
            target: "authz_cache::audit",
            principal = %ShortHash::of(sample.principal.id()),
            resource = sample.permission.resource(),
            action = sample.permission.action(),
            tier = sample.tier,
            served = if sample.allowed { "allow" } else { "deny" },
            authorizer = if truth.is_allowed() { "allow" } else { "deny" },
            invalidated = invalidate,
            "consistency audit: a cached decision disagrees with the authorizer and no invalidation covered it \
             (an invalidation hook is missing for this change)"
        );
        if invalidate {
            let entry = Invalidation::entry(sample.principal.id(), sample.permission.clone());
            if self.apply_invalidation(&entry, None).await.is_ok() {
                Stats::incr(&self.stats.audit_invalidations);
            }
        }
    }
}

/// The auditor task: takes samples at most `max_per_second` a second, `concurrency` at once.
pub(super) async fn run(inner: Weak<Inner>, mut rx: mpsc::Receiver<Sample>, config: AuditConfig) {
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(config.concurrency));
    let spacing = Duration::from_secs(1) / config.max_per_second;
    let mut next = Instant::now();
    while let Some(sample) = rx.recv().await {
        let now = Instant::now();
        if now < next {
            tokio::time::sleep_until(next.into()).await;
        }
        next = next.max(now) + spacing;
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        let Some(inner) = inner.upgrade() else { return };
        tokio::spawn(async move {
            let _permit = permit;
            inner.audit(sample, config.invalidate).await;
        });
    }
}
