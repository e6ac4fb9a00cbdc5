//! Unit tests of what depends on shared tiers (owed bumps, mirroring, rotation, lost epochs, the
//! backplane, write-behind), on the in-process tier `tier::testing::MemoryShared`: no servers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::tier::testing::MemoryShared;
use crate::{AuthzCache, AuthzCacheBuilder, BoxError, Decision, Invalidation, Permission, Principal};

pub(super) const SECRET: &str = "unit-test secret, 32 bytes long!";
pub(super) const OTHER: &str = "the other secret of a rotation!!";

/// An authorizer that allows while `allow` is set, counting its calls.
#[derive(Clone, Default)]
pub(super) struct Truth {
    pub(super) deny: Arc<AtomicBool>,
    pub(super) calls: Arc<AtomicUsize>,
}

impl Truth {
    pub(super) fn builder(&self) -> AuthzCacheBuilder {
        let t = self.clone();
        AuthzCache::builder(move |_: Principal, _: Permission| {
            let t = t.clone();
            async move {
                t.calls.fetch_add(1, Ordering::SeqCst);
                Ok::<_, BoxError>(Decision::from_bool(!t.deny.load(Ordering::SeqCst)))
            }
        })
        .secret(SECRET)
        .max_staleness(Duration::from_millis(500))
    }

    pub(super) fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

pub(super) fn bob() -> Principal {
    Principal::new("bob")
}

pub(super) fn read(doc: u32) -> Permission {
    Permission::new(format!("documents:{doc}"), "read")
}

pub(super) async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(5), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub(super) async fn ready(cache: &AuthzCache) {
    tokio::time::timeout(Duration::from_secs(5), cache.ready()).await.expect("the backplane is heard");
}

/// A decision computed by one instance is a hit in another, written behind to the shared tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_one_instance_computed_is_a_hit_in_another() {
    let store = MemoryShared::new();
    let truth = Truth::default();
    let (a, b) = (truth.builder().l2(store.clone()).build(), truth.builder().l2(store.clone()).build());
    ready(&a).await;
    ready(&b).await;
    assert!(a.check(&bob(), &read(1)).await.unwrap().is_allowed());
    until("the write-behind", || store.entries() == 1).await;
    assert!(b.check(&bob(), &read(1)).await.unwrap().is_allowed());
    assert_eq!(truth.calls(), 1, "b read a's entry from the shared tier");
    assert_eq!(b.stats().tiers.l2.unwrap().hits, 1);
}

/// Debts: an invalidation the tier missed is owed to it; until it is paid the tier is not read
/// (its epochs cannot vouch for anything), then the janitor pays it and the tier is read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_the_tier_missed_is_owed_paid_and_the_tier_skipped_until_then() {
    let store = MemoryShared::new();
    let truth = Truth::default();
    let a = truth.builder().l2(store.clone()).build();
    ready(&a).await;
    a.check(&bob(), &read(1)).await.unwrap();
    until("the write-behind", || store.entries() == 1).await;
    let before = store.highest_epoch();

    store.fail(true);
    truth.deny.store(true, Ordering::SeqCst);
    assert!(a.invalidate(&Invalidation::principal("bob")).await.is_err(), "not delivered: the caller learns it");
    // This process is covered at once, whatever the tier says.
    assert!(!a.check(&bob(), &read(1)).await.unwrap().is_allowed());
    // The store answers reads again, but cannot take the bump yet: while owed, it is not read.
    store.refuse_epochs(true);
    store.fail(false);
    let reads = store.calls().0;
    a.check(&bob(), &read(2)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.check(&bob(), &read(3)).await.unwrap();
    assert_eq!(store.calls().0, reads, "a tier owed a bump is not read");
    assert_eq!(a.stats().tiers.l2.unwrap().owed, 1, "one debt, however many failed attempts");
    // The janitor pays within a tick; the store's epoch then covers bob, and it is read again.
    store.refuse_epochs(false);
    until("the owed bump to be paid", || store.highest_epoch() > before).await;
    until("the debt to be cleared", || a.stats().tiers.l2.unwrap().owed == 0).await;
    a.check(&bob(), &read(4)).await.unwrap();
    assert_eq!(store.calls().0, reads + 1, "read again once paid");
    // A fresh instance reading the shared tier gets no allow for bob: the stored entry is stale.
    let b = truth.builder().l2(store.clone()).build();
    ready(&b).await;
    assert!(!b.check(&bob(), &read(1)).await.unwrap().is_allowed(), "the owed invalidation reached the store");
    assert!(b.stats().tiers.l2.unwrap().stale >= 1);
}

/// Mirroring: the deepest tier assigns epoch values, the shallower one is raised to them; a
/// mirror that missed a raise is owed it and not read until it is paid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authority_assigns_and_a_mirror_that_missed_it_is_owed_the_raise() {
    let (mirror, authority) = (MemoryShared::new(), MemoryShared::new());
    let truth = Truth::default();
    let a = truth.builder().l2(mirror.clone()).l3(authority.clone()).build();
    ready(&a).await;
    a.invalidate(&Invalidation::principal("bob")).await.expect("both tiers up");
    let value = authority.highest_epoch();
    assert!(value > 0);
    assert_eq!(authority.calls().2, 1, "one bump, in the authority");
    assert_eq!(mirror.calls().2, 0, "the mirror is never bumped while the authority answers");
    assert_eq!(mirror.highest_epoch(), value, "the mirror holds the authority's value");

    mirror.fail(true);
    assert!(a.invalidate(&Invalidation::principal("alice")).await.is_err());
    let assigned = authority.highest_epoch();
    assert!(assigned > value);
    mirror.refuse_epochs(true);
    mirror.fail(false);
    let reads = mirror.calls().0;
    a.check(&Principal::new("carol"), &read(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(mirror.calls().0, reads, "a mirror owed a raise is not read");
    mirror.refuse_epochs(false);
    until("the raise to be paid", || mirror.highest_epoch() == assigned).await;
    until("the debt to be cleared", || a.stats().tiers.l2.unwrap().owed == 0).await;
    a.check(&Principal::new("carol"), &read(2)).await.unwrap();
    assert_eq!(mirror.calls().0, reads + 1, "read again once paid");
}

/// The authority down: the bump is owed to it, and a shallower tier tells the other instances
/// now. When the authority is back, it is paid with a value above the mirror's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_authority_down_a_mirror_carries_the_invalidation_until_it_is_paid() {
    let (mirror, authority) = (MemoryShared::new(), MemoryShared::new());
    let truth = Truth::default();
    let a = truth.builder().l2(mirror.clone()).l3(authority.clone()).build();
    ready(&a).await;
    authority.fail(true);
    assert!(a.invalidate(&Invalidation::principal("bob")).await.is_err());
    assert_eq!(mirror.calls().2, 1, "the mirror assigned a value for the other instances");
    let carried = mirror.highest_epoch();
    authority.fail(false);
    until("the owed bump to be paid", || authority.highest_epoch() > carried).await;
    until("the mirror to be raised to it", || mirror.highest_epoch() == authority.highest_epoch()).await;
}

/// Rotation: entries under the other secret are served until the rotation ends, never after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_under_the_rotations_other_secret_are_served_until_it_ends() {
    let store = MemoryShared::new();
    let truth = Truth::default();
    let old = truth.builder().secret(OTHER).l2(store.clone()).build();
    ready(&old).await;
    old.check(&bob(), &read(1)).await.unwrap();
    until("the write-behind", || store.entries() == 1).await;
    let end = SystemTime::now() + Duration::from_millis(600);
    let new = truth.builder().rotation_secret(OTHER, end).l1_max_bytes(0).l2(store.clone()).build();
    ready(&new).await;
    assert!(new.check(&bob(), &read(1)).await.unwrap().is_allowed());
    assert_eq!(truth.calls(), 1, "served from the entry under the other secret");
    tokio::time::sleep(Duration::from_millis(700)).await;
    new.check(&bob(), &read(1)).await.unwrap();
    assert_eq!(truth.calls(), 2, "never after the rotation's end");
}

/// A store that lost its epochs (restarted empty) is noticed by its high water: the instance
/// forgets the shared values it holds, so a lower value the store assigns next is not masked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_that_lost_its_epochs_is_noticed_and_its_values_forgotten() {
    let store = MemoryShared::new();
    let truth = Truth::default();
    let a = truth.builder().l2(store.clone()).build();
    ready(&a).await;
    for _ in 0..3 {
        a.invalidate(&Invalidation::principal("bob")).await.unwrap();
    }
    a.check(&bob(), &read(1)).await.unwrap();
    store.forget_everything();
    let rejected = a.stats().tiers.l2.unwrap().rejected;
    a.check(&Principal::new("dave"), &read(1)).await.unwrap();
    assert_eq!(a.stats().tiers.l2.unwrap().rejected, rejected + 1, "the lower high water was noticed");
}

/// The backplane over the tier's transport: another instance's invalidation ends this
/// instance's L1 entry within milliseconds; a tier that drops messages leaves the bound to the
/// heartbeat watchdog (L1 distrusted after max_staleness).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidations_reach_other_instances_over_the_transport() {
    let store = MemoryShared::new();
    let truth = Truth::default();
    let (a, b) = (truth.builder().l2(store.clone()).build(), truth.builder().l2(store.clone()).build());
    ready(&a).await;
    ready(&b).await;
    b.check(&bob(), &read(1)).await.unwrap();
    b.check(&bob(), &read(1)).await.unwrap();
    let calls = truth.calls();
    truth.deny.store(true, Ordering::SeqCst);
    a.invalidate(&Invalidation::principal("bob")).await.unwrap();
    until("b to hear it", || b.stats().backplane.is_some_and(|bp| bp.invalidations >= 1)).await;
    assert!(!b.check(&bob(), &read(1)).await.unwrap().is_allowed());
    assert_eq!(truth.calls(), calls + 1);

    store.drop_messages(true);
    until("b to distrust a silent backplane", || !b.stats().backplane.is_some_and(|bp| bp.l1_trusted)).await;
    store.drop_messages(false);
    until("b to hear it again", || b.stats().backplane.is_some_and(|bp| bp.l1_trusted)).await;
}

/// A hanging tier costs its timeout and then a breaker, never a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_tier_opens_the_breaker_and_requests_still_get_answers() {
    let store = MemoryShared::new();
    let truth = Truth::default();
    let a = truth.builder().l2(store.clone()).build();
    ready(&a).await;
    store.hang(true);
    for i in 0..8 {
        assert!(a.check(&Principal::new(format!("u{i}")), &read(1)).await.unwrap().is_allowed());
    }
    let l2 = a.stats().tiers.l2.unwrap();
    assert_eq!(l2.breaker, crate::BreakerState::Open, "{l2:?}");
    assert!(l2.call_timeouts >= 5, "{l2:?}");
    store.hang(false);
}
