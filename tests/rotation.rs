//! Secret rotation on the real Redis and Postgres: entries written under the old secret are
//! served during the rotation window and never after it; invalidations during the window reach
//! entries under both secrets, from instances at either step of the rotation.
#![cfg(all(feature = "redis", feature = "postgres"))]

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use support::pg::{self, Schema};
use support::redis::{Namespace, wait_trusted};
use tower_authz_cache::{
    AuthzCache, AuthzCacheBuilder, BoxError, Decision, Invalidation, Permission, PostgresTier, Principal, RedisTier,
    RemoteTierSnapshot,
};

const OLD: &str = "the-OLD-secret-0123456789abcdef!";
const NEW: &str = "the-NEW-secret-fedcba9876543210!";

/// The source of truth shared by every instance; each instance counts its own calls.
#[derive(Clone, Default)]
struct Policy {
    revoked: Arc<Mutex<HashSet<String>>>,
    calls: Arc<AtomicUsize>,
}

impl Policy {
    fn instance(&self) -> Self {
        Self { revoked: self.revoked.clone(), calls: Arc::default() }
    }
    fn revoke(&self, who: &str) {
        self.revoked.lock().unwrap().insert(who.to_owned());
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    fn builder(&self) -> AuthzCacheBuilder {
        let p = self.clone();
        AuthzCache::builder(move |principal: Principal, _: Permission| {
            p.calls.fetch_add(1, Ordering::SeqCst);
            let revoked = p.revoked.lock().unwrap().contains(principal.id());
            async move { Ok::<_, BoxError>(Decision::from_bool(!revoked)) }
        })
    }
}

fn redis(ns: &Namespace) -> RedisTier {
    RedisTier::builder(support::redis::url())
        .namespace(&ns.0)
        .pool_size(4)
        .timeout(Duration::from_millis(200))
        .build()
        .expect("valid tier")
}

/// An instance on Redis under `secret`, with the other secret of the rotation until `until`.
/// `l1: false` makes every check read Redis (so the test sees what the shared tier says).
async fn instance(
    ns: &Namespace,
    policy: &Policy,
    secret: &str,
    rotation: Option<(&str, SystemTime)>,
    l1: bool,
) -> AuthzCache {
    let mut builder = policy.builder().secret(secret).l2(redis(ns)).l1_max_bytes(if l1 { 64 << 20 } else { 0 });
    if let Some((other, until)) = rotation {
        builder = builder.rotation_secret(other, until);
    }
    let cache = builder.build();
    wait_trusted(&cache).await;
    cache
}

async fn allowed(cache: &AuthzCache, who: &str) -> bool {
    cache.check(&Principal::new(who), &Permission::new("documents:1", "read")).await.expect("decided").is_allowed()
}

fn l2(cache: &AuthzCache) -> RemoteTierSnapshot {
    cache.stats().tiers.l2.expect("l2 configured")
}

fn l3(cache: &AuthzCache) -> RemoteTierSnapshot {
    cache.stats().tiers.l3.expect("l3 configured")
}

async fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn sleep_until(t: SystemTime) {
    if let Ok(left) = t.duration_since(SystemTime::now()) {
        tokio::time::sleep(left + Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_entries_under_the_old_secret_are_served_during_the_window_and_rejected_after() {
    let ns = Namespace::new("rotation");
    let truth = Policy::default();
    let until = SystemTime::now() + Duration::from_secs(3);

    // Before the rotation: an instance on OLD writes entries for bob, carol and erin.
    let (p_old, p_new, p_fresh) = (truth.instance(), truth.instance(), truth.instance());
    let old = instance(&ns, &p_old, OLD, None, false).await;
    for who in ["bob", "carol", "erin"] {
        assert!(allowed(&old, who).await);
    }
    wait_for("old's write-behind", Duration::from_secs(2), || l2(&old).writes >= 3).await;
    assert_eq!(p_old.calls(), 3);

    // Step 2 of the rotation: tiers on NEW, OLD honoured until `until`. Entries under OLD are
    // served (no authorizer call), and kept in L1.
    let new = instance(&ns, &p_new, NEW, Some((OLD, until)), true).await;
    assert!(allowed(&new, "bob").await);
    assert!(allowed(&new, "bob").await);
    assert_eq!(p_new.calls(), 0, "bob's entry under the old secret is served during the window");
    assert_eq!(new.stats().tiers.l1.hits, 1, "and kept in L1");

    // An invalidation during the window, from the NEW instance, reaches the entry under OLD: the
    // OLD instance (no L1) and a fresh NEW instance both ask the authorizer.
    truth.revoke("carol");
    new.invalidate(&Invalidation::Principal("carol".into())).await.expect("delivered");
    let fresh = instance(&ns, &p_fresh, NEW, Some((OLD, until)), false).await;
    assert!(!allowed(&fresh, "carol").await, "the entry under OLD is stale for a NEW instance");
    assert_eq!(p_fresh.calls(), 1);
    assert!(l2(&fresh).stale >= 1, "{:?}", l2(&fresh));
    let calls = p_old.calls();
    assert!(!allowed(&old, "carol").await, "the old instance sees the revocation");
    assert_eq!(p_old.calls(), calls + 1);

    // Step 1 of the rotation (tiers on OLD, NEW honoured): its invalidations reach entries written
    // under NEW. dave's entry under NEW is written by the NEW instance, then invalidated by it.
    let p_step1 = truth.instance();
    let step1 = instance(&ns, &p_step1, OLD, Some((NEW, until)), false).await;
    assert!(allowed(&new, "dave").await);
    wait_for("new's write-behind", Duration::from_secs(2), || l2(&new).writes >= 1).await;
    let calls = p_fresh.calls();
    assert!(allowed(&fresh, "dave").await);
    assert_eq!(p_fresh.calls(), calls, "dave's entry under NEW is shared");
    truth.revoke("dave");
    step1.invalidate(&Invalidation::Principal("dave".into())).await.expect("delivered");
    assert!(!allowed(&fresh, "dave").await, "an invalidation under both secrets reached the NEW entry");
    assert_eq!(p_fresh.calls(), calls + 1);

    // After the window: the entries under OLD are rejected by every instance configured with the
    // rotation (a fresh one, and bob's L1 copy, kept no later than `until`), although they are
    // still valid for an instance on OLD.
    sleep_until(until).await;
    let calls = p_new.calls();
    assert!(allowed(&new, "bob").await);
    assert_eq!(p_new.calls(), calls + 1, "bob's L1 copy of an OLD entry ended with the window");
    let p_after = truth.instance();
    let after = instance(&ns, &p_after, NEW, Some((OLD, until)), false).await;
    assert!(allowed(&after, "erin").await);
    assert_eq!(p_after.calls(), 1, "erin's entry under OLD is not read after the window");
    let calls = p_old.calls();
    assert!(allowed(&old, "erin").await);
    assert_eq!(p_old.calls(), calls, "erin's entry under OLD is still there and valid under OLD");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_entries_under_the_old_secret_are_served_during_the_window_and_rejected_after() {
    let schema = Schema::new("rotation");
    let _ = pg::client().await; // fails with instructions when Postgres is down
    let tier = || PostgresTier::builder(pg::url()).schema(&schema.0).pool_size(4).warm_on_start(0).build().unwrap();
    tier().migrate().await.expect("migrations apply");
    let truth = Policy::default();
    let until = SystemTime::now() + Duration::from_secs(3);
    let build = |policy: &Policy, secret: &str, rotation: Option<(&str, SystemTime)>| {
        let mut builder = policy.builder().secret(secret).l3(tier()).l1_max_bytes(0);
        if let Some((other, until)) = rotation {
            builder = builder.rotation_secret(other, until);
        }
        builder.build()
    };

    let (p_old, p_new) = (truth.instance(), truth.instance());
    let old = build(&p_old, OLD, None);
    for who in ["bob", "carol", "erin"] {
        assert!(allowed(&old, who).await);
    }
    wait_for("old's write-behind", Duration::from_secs(5), || l3(&old).writes >= 3).await;

    let new = build(&p_new, NEW, Some((OLD, until)));
    assert!(allowed(&new, "bob").await);
    assert_eq!(p_new.calls(), 0, "bob's L3 row under the old secret is served during the window");
    assert!(l3(&new).hits >= 1, "{:?}", l3(&new));

    truth.revoke("carol");
    new.invalidate(&Invalidation::Principal("carol".into())).await.expect("delivered");
    assert!(!allowed(&new, "carol").await, "the invalidation reached the row under OLD");
    assert!(!allowed(&old, "carol").await);
    assert_eq!(p_new.calls(), 1);

    sleep_until(until).await;
    assert!(allowed(&new, "erin").await);
    assert_eq!(p_new.calls(), 2, "erin's row under OLD is not read after the window");
    let calls = p_old.calls();
    assert!(allowed(&old, "erin").await);
    assert_eq!(p_old.calls(), calls, "erin's row is still there and valid under OLD");
}
