//! Batch checks (`check_many`, `filter_allowed`): order, one authorizer call and one read per
//! tier per batch, single flight with single checks, races, failures, cancellation.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use super::tests_shared::{SECRET, until};
use crate::tier::testing::MemoryShared;
use crate::{
    Authorizer, AuthzCache, BoxError, CheckErrorKind, Decision, DecisionSource, Invalidation, Permission, Principal,
};

/// Allows even documents (and documents in `also`); records every batch's size.
#[derive(Clone, Default)]
struct Batches {
    singles: Arc<AtomicUsize>,
    sizes: Arc<Mutex<Vec<usize>>>,
    also: Arc<Mutex<Vec<String>>>,
    fail: Arc<AtomicBool>,
    wrong_length: Arc<AtomicBool>,
    panic: Arc<AtomicBool>,
    hang: Arc<AtomicBool>,
    slow: Arc<AtomicBool>,
    /// Invalidates this resource's entry for bob (and then allows it) while the next batch is
    /// decided.
    race: Arc<Mutex<Option<String>>>,
    cache: Arc<OnceLock<AuthzCache>>,
}

impl Batches {
    fn allows(&self, p: &Permission) -> bool {
        let n: u32 = p.resource().trim_start_matches("documents:").parse().unwrap_or(1);
        n % 2 == 0 || self.also.lock().unwrap().iter().any(|r| r == p.resource())
    }

    fn sizes(&self) -> Vec<usize> {
        self.sizes.lock().unwrap().clone()
    }

    fn cache(&self) -> AuthzCache {
        self.builder().build()
    }

    fn builder(&self) -> crate::AuthzCacheBuilder {
        AuthzCache::builder(self.clone()).secret(SECRET).authorizer_timeout(Duration::from_millis(500))
    }

    fn install(&self, cache: &AuthzCache) {
        let _ = self.cache.set(cache.clone());
    }
}

impl Authorizer for Batches {
    async fn authorize(&self, _: &Principal, p: &Permission) -> Result<Decision, BoxError> {
        self.singles.fetch_add(1, Ordering::SeqCst);
        if self.slow.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Decision::from_bool(self.allows(p)))
    }

    async fn authorize_many(&self, _: &Principal, ps: &[Permission]) -> Result<Vec<Decision>, BoxError> {
        self.sizes.lock().unwrap().push(ps.len());
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.panic.load(Ordering::SeqCst) {
            panic!("batch authorizer panicked");
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err("policy engine unreachable".into());
        }
        let decisions: Vec<Decision> = ps.iter().map(|p| Decision::from_bool(self.allows(p))).collect();
        let raced = self.race.lock().unwrap().take();
        if let Some(resource) = raced {
            // The truth changes and the application invalidates, while this batch's (now old)
            // answers are on their way.
            self.also.lock().unwrap().push(resource.clone());
            let cache = self.cache.get().expect("installed").clone();
            cache.invalidate(&Invalidation::entry("bob", Permission::new(resource, "read"))).await.unwrap();
        }
        if self.wrong_length.load(Ordering::SeqCst) {
            return Ok(decisions[1..].to_vec());
        }
        Ok(decisions)
    }
}

fn bob() -> Principal {
    Principal::new("bob")
}

fn docs(range: std::ops::Range<u32>) -> Vec<Permission> {
    range.map(|i| Permission::new(format!("documents:{i}"), "read")).collect()
}

fn allowed(outcomes: &[Result<Decision, crate::CheckError>]) -> Vec<bool> {
    outcomes.iter().map(|o| o.as_ref().expect("decided").is_allowed()).collect()
}

#[tokio::test]
async fn a_batch_answers_in_order_with_one_authorizer_call_for_its_misses() {
    let truth = Batches::default();
    let cache = truth.cache();
    let perms = docs(0..100);
    let expected: Vec<bool> = (0..100).map(|i| i % 2 == 0).collect();
    let first = cache.check_many(&bob(), &perms).await;
    assert_eq!(allowed(&first), expected);
    assert!(first.iter().all(|d| d.as_ref().unwrap().source() == DecisionSource::Authorizer));
    assert_eq!(truth.sizes(), [100], "one batch call for the 100 misses");
    assert_eq!(truth.singles.load(Ordering::SeqCst), 0);
    assert_eq!(cache.stats().authorizer_calls, 100, "counted per decision asked");

    // Now all in L1: no call at all.
    let again = cache.check_many(&bob(), &perms).await;
    assert_eq!(allowed(&again), expected);
    assert!(again.iter().all(|d| d.as_ref().unwrap().source() == DecisionSource::L1));
    assert_eq!(truth.sizes(), [100]);

    // 10 invalidated: one call of 10.
    for i in (0..100).step_by(10) {
        cache.invalidate(&Invalidation::entry("bob", perms[i].clone())).await.unwrap();
    }
    assert_eq!(allowed(&cache.check_many(&bob(), &perms).await), expected);
    assert_eq!(truth.sizes(), [100, 10]);

    // Repeats within a batch are asked once, answered each time.
    let repeated = [perms[1].clone(), Permission::new("documents:200", "read"), perms[1].clone()];
    cache.invalidate(&Invalidation::principal("bob")).await.unwrap();
    assert_eq!(allowed(&cache.check_many(&bob(), &repeated).await), [false, true, false]);
    assert_eq!(truth.sizes(), [100, 10, 2]);
    assert!(cache.check_many(&bob(), &[]).await.is_empty());
}

/// With two shared tiers, another instance answers the batch from L2 in one read, L3 untouched,
/// and its authorizer is never asked; a batch that misses everywhere reads each tier once.
#[tokio::test]
async fn a_batch_reads_each_shared_tier_once() {
    let truth = Batches::default();
    let (l2, l3) = (MemoryShared::new(), MemoryShared::new());
    let a = truth.builder().l2(l2.clone()).l3(l3.clone()).build();
    let perms = docs(0..50);
    let before = (l2.calls().0, l3.calls().0);
    assert_eq!(allowed(&a.check_many(&bob(), &perms).await), (0..50).map(|i| i % 2 == 0).collect::<Vec<_>>());
    assert_eq!((l2.calls().0, l3.calls().0), (before.0 + 1, before.1 + 1), "one read per tier for 50 misses");
    until("the write-behind of 50 entries to both tiers", || l2.entries() == 50 && l3.entries() == 50).await;

    let other = Batches::default();
    let b = other.builder().l2(l2.clone()).l3(l3.clone()).build();
    let reads = (l2.calls().0, l3.calls().0);
    let from_b = b.check_many(&bob(), &perms).await;
    assert!(from_b.iter().all(|d| d.as_ref().unwrap().source() == DecisionSource::Tier("l2")), "{from_b:?}");
    assert_eq!((l2.calls().0, l3.calls().0), (reads.0 + 1, reads.1), "one L2 read, no L3 read");
    assert!(other.sizes().is_empty(), "B's authorizer was never asked");
    // Invalidated through A: B's batch sees the shared epoch in the same read and asks again.
    a.invalidate(&Invalidation::principal("bob")).await.unwrap();
    b.check_many(&bob(), &perms).await;
    assert_eq!(other.sizes(), [50]);
}

/// An invalidation that lands while a batch is being decided: the raced key is asked again
/// (alone) and the batch answers with the new truth; the others keep the batch's answers.
#[tokio::test]
async fn a_key_invalidated_during_its_batch_is_asked_again() {
    let truth = Batches::default();
    let cache = truth.cache();
    truth.install(&cache);
    *truth.race.lock().unwrap() = Some("documents:3".to_owned());
    let out = cache.check_many(&bob(), &docs(0..6)).await;
    assert_eq!(allowed(&out), [true, false, true, true, true, false], "documents:3 reflects the change");
    assert_eq!(truth.singles.load(Ordering::SeqCst), 1, "the raced key alone, by the single path");
    assert_eq!(cache.stats().invalidation_races, 1);
    // And what L1 keeps is the new answer.
    assert!(cache.check(&bob(), &docs(3..4)[0]).await.unwrap().is_allowed());
}

/// A key a single check is computing is waited for, not asked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_joins_a_flight_in_progress() {
    let truth = Batches::default();
    truth.slow.store(true, Ordering::SeqCst);
    let cache = truth.cache();
    let single = tokio::spawn({
        let cache = cache.clone();
        async move { cache.check(&bob(), &docs(4..5)[0]).await }
    });
    until("the single check to lead its flight", || truth.singles.load(Ordering::SeqCst) == 1).await;
    let out = cache.check_many(&bob(), &docs(3..6)).await;
    assert_eq!(allowed(&out), [false, true, false]);
    assert_eq!(out[1].as_ref().unwrap().source(), DecisionSource::Joined);
    assert_eq!(truth.sizes(), [2], "documents:4 was not in the batch call");
    assert!(single.await.unwrap().unwrap().is_allowed());
    assert_eq!(cache.stats().single_flight_joins, 1);
}

/// A failed, wrongly sized or panicking batch call: every key it was asked for is an error
/// (fail closed), the L1 hits of the same batch still answer, and the flights are released.
#[tokio::test]
async fn a_failed_batch_fails_closed_for_its_misses_only() {
    let truth = Batches::default();
    let cache = truth.cache();
    cache.check_many(&bob(), &docs(0..2)).await;
    for (switch, kind) in [
        (&truth.fail, CheckErrorKind::Authorizer),
        (&truth.wrong_length, CheckErrorKind::Authorizer),
        (&truth.panic, CheckErrorKind::Panicked),
    ] {
        switch.store(true, Ordering::SeqCst);
        let out = cache.check_many(&bob(), &docs(0..4)).await;
        assert!(out[0].as_ref().unwrap().is_allowed() && out[1].is_ok(), "L1 hits still answer");
        for o in &out[2..] {
            assert_eq!(o.as_ref().unwrap_err().kind(), kind);
        }
        switch.store(false, Ordering::SeqCst);
    }
    assert_eq!(cache.stats().undecided, 6);
    // Nothing was cached from a failed call, and no flight was left behind.
    assert_eq!(allowed(&cache.check_many(&bob(), &docs(2..4)).await), [true, false]);
}

/// A batch dropped while its authorizer call hangs releases its flights: a single check of one
/// of its keys afterwards leads a new flight instead of waiting forever.
#[tokio::test]
async fn a_dropped_batch_releases_its_flights() {
    let truth = Batches::default();
    let cache = truth.cache();
    truth.hang.store(true, Ordering::SeqCst);
    let dropped = tokio::time::timeout(Duration::from_millis(50), cache.check_many(&bob(), &docs(0..3))).await;
    assert!(dropped.is_err(), "the batch hung and was dropped");
    truth.hang.store(false, Ordering::SeqCst);
    let single = tokio::time::timeout(Duration::from_secs(2), cache.check(&bob(), &docs(0..1)[0])).await;
    assert!(single.expect("not stranded behind the dropped batch").unwrap().is_allowed());
}

#[tokio::test]
async fn filter_allowed_keeps_the_allowed_items_in_order_and_fails_closed() {
    let truth = Batches::default();
    let cache = truth.cache();
    let ids = vec![7u32, 2, 4, 9, 10];
    let permission = |id: &u32| Permission::new(format!("documents:{id}"), "read");
    assert_eq!(cache.filter_allowed(&bob(), ids.clone(), permission).await.unwrap(), [2, 4, 10]);
    truth.fail.store(true, Ordering::SeqCst);
    let more = vec![1u32, 2, 3];
    let e = cache.filter_allowed(&bob(), more, permission).await.unwrap_err();
    assert_eq!(e.kind(), CheckErrorKind::Authorizer, "an undecidable item is an error, not a shorter list");
}
