//! The consistency auditor: it finds a change made without an invalidation within the bound
//! its sampling states, never blames a change that was invalidated, keeps to its load cap, and
//! optionally ends the stale entry.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use super::tests_shared::{bob, read, until};
use crate::consistency::AuditConfig;
use crate::{AuthzCache, BoxError, Decision, Invalidation, Permission, Principal};

#[derive(Clone, Default)]
struct Truth {
    revoked: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
}

impl Truth {
    fn cache(&self, audit: AuditConfig) -> AuthzCache {
        let t = self.clone();
        AuthzCache::builder(move |_: Principal, _: Permission| {
            t.calls.fetch_add(1, Ordering::SeqCst);
            let allowed = !t.revoked.load(Ordering::SeqCst);
            async move { Ok::<_, BoxError>(Decision::from_bool(allowed)) }
        })
        .audit(audit)
        .build()
    }
}

/// Checks bob's documents:1 until the auditor reports a mismatch; how many checks it took.
async fn checks_until_found(cache: &AuthzCache, limit: usize) -> usize {
    for n in 1..=limit {
        assert!(cache.check(&bob(), &read(1)).await.unwrap().is_allowed(), "the stale allow is served");
        // Let the auditor take the sample and ask (it runs on this thread's runtime).
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        if cache.stats().audit.mismatches() > 0 {
            return n;
        }
    }
    panic!("no mismatch found in {limit} checks: {:?}", cache.stats().audit);
}

/// A role changed in the store without an invalidation: found within `one_in` checks of the
/// key (the sampler takes one in `one_in` checks per thread; this runtime has one thread), so
/// at `r` checks a second within `one_in / r` seconds; and decisions that agree are never
/// reported.
#[tokio::test]
async fn a_missing_invalidation_is_found_within_one_in_checks() {
    const ONE_IN: u32 = 20;
    let truth = Truth::default();
    let cache = truth.cache(AuditConfig::one_in(ONE_IN).max_per_second(1000));
    for _ in 0..(3 * ONE_IN) {
        assert!(cache.check(&bob(), &read(1)).await.unwrap().is_allowed());
        tokio::task::yield_now().await;
    }
    until("the agreeing audits", || cache.stats().audit.audits >= 2).await;
    assert_eq!(cache.stats().audit.mismatches(), 0, "agreeing decisions are not mismatches");

    truth.revoked.store(true, Ordering::SeqCst); // no invalidation: the missing hook
    let n = checks_until_found(&cache, 3 * ONE_IN as usize).await;
    assert!(
        n <= ONE_IN as usize + 1,
        "found after {n} checks; the bound is one_in = {ONE_IN} (+1 for the audit's own round)"
    );
    let audit = cache.stats().audit;
    assert_eq!((audit.mismatches_l1, audit.invalidated), (1, 0));
    assert!(cache.check(&bob(), &read(1)).await.unwrap().is_allowed(), "without auto-invalidation it stays stale");
}

/// Batch checks are sampled too.
#[tokio::test]
async fn decisions_served_to_batches_are_audited() {
    let truth = Truth::default();
    let cache = truth.cache(AuditConfig::one_in(3).max_per_second(1000));
    let perms: Vec<Permission> = (1..=4).map(read).collect();
    cache.check_many(&bob(), &perms).await;
    truth.revoked.store(true, Ordering::SeqCst);
    for _ in 0..10 {
        assert!(cache.check_many(&bob(), &perms).await.iter().all(|d| d.as_ref().unwrap().is_allowed()));
        tokio::task::yield_now().await;
    }
    until("a mismatch found through batches", || cache.stats().audit.mismatches_l1 > 0).await;
}

/// With `invalidate_on_mismatch`, the stale decision stops at once.
#[tokio::test]
async fn with_auto_invalidation_the_stale_decision_stops() {
    let truth = Truth::default();
    let cache = truth.cache(AuditConfig::one_in(5).max_per_second(1000).invalidate_on_mismatch(true));
    assert!(cache.check(&bob(), &read(1)).await.unwrap().is_allowed());
    truth.revoked.store(true, Ordering::SeqCst);
    checks_until_found(&cache, 50).await;
    until("the auditor's invalidation", || cache.stats().audit.invalidated == 1).await;
    assert!(!cache.check(&bob(), &read(1)).await.unwrap().is_allowed(), "the next check asks again");
    assert_eq!(cache.stats().invalidations.entry, 1);
}

/// A change that was invalidated is not a mismatch, whatever was served before it.
#[tokio::test]
async fn an_invalidated_change_is_never_reported() {
    let truth = Truth::default();
    let cache = truth.cache(AuditConfig::one_in(1).max_per_second(1000));
    for round in 0..20 {
        truth.revoked.store(round % 2 == 1, Ordering::SeqCst);
        cache.invalidate(&Invalidation::principal("bob")).await.unwrap();
        for _ in 0..5 {
            cache.check(&bob(), &read(1)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await; // the auditor keeps up (1 ms spacing)
        }
    }
    until("the audits", || cache.stats().audit.audits >= 40).await;
    assert_eq!(cache.stats().audit.mismatches(), 0, "{:?}", cache.stats().audit);
}

/// The load cap: one in one sampled, at most 5 audits a second; the rest dropped.
#[tokio::test]
async fn the_auditor_keeps_to_its_cap_on_extra_authorizer_calls() {
    let truth = Truth::default();
    let cache = truth.cache(AuditConfig::one_in(1).max_per_second(5));
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(1000) {
        cache.check(&bob(), &read(1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let audit = cache.stats().audit;
    assert!(audit.audits as f64 <= 5.0 * elapsed + 2.0, "{} audits in {elapsed:.2} s: over the cap", audit.audits);
    assert!(audit.audits >= 2, "the auditor ran: {audit:?}");
    assert!(audit.dropped > 0, "samples past the cap are dropped: {audit:?}");
    assert_eq!(truth.calls.load(Ordering::SeqCst) as u64, 1 + audit.audits, "one check's call, plus the audits");
}
