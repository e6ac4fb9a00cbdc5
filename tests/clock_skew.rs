//! Two instances whose wall clocks are ten minutes apart (one five minutes ahead, one five
//! behind: the cache's clock is the seam, through the unstable `internals` hook), sharing the real
//! Redis and Postgres: concurrent bumps of one scope from both, role changes with their
//! invalidations, then the whole epoch retention period and more, while both instances and a
//! third, L1-less one keep asking. Zero stale allows: no entry revives once the epoch that ended
//! it is forgotten, whatever deadline its writer's clock gave it.
//!
//! Needs `--all-features` (the `internals` feature); compiles to nothing without it.
#![cfg(all(feature = "redis", feature = "postgres", feature = "internals"))]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::pg::{self, Schema};
use support::redis::{Namespace, SECRET};
use tower_authz_cache::{AuthzCache, BoxError, Decision, Invalidation, Permission, PostgresTier, Principal, RedisTier};

/// The shared tiers' call timeout in this test (see `Policy::cache`).
const TIER_TIMEOUT: Duration = Duration::from_millis(500);
const SKEW_MS: i64 = 5 * 60 * 1000;
const TTL: Duration = Duration::from_secs(1);
const AUTHZ_TIMEOUT: Duration = Duration::from_millis(200);
const MAX_STALENESS: Duration = Duration::from_millis(300);
/// Local retention is ttl + authorizer timeout + the late-write margin (2 s) + 1 s; shared stores
/// keep epochs 5 s longer.
const RETENTION: Duration = Duration::from_millis(1000 + 200 + 2000 + 1000 + 5000);

/// bob's current permission, the same for every instance.
#[derive(Clone, Default)]
struct Policy {
    allowed: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
}

impl Policy {
    fn cache(&self, offset_ms: i64, schema: Option<&Schema>, ns: &Namespace, l1: bool) -> AuthzCache {
        let p = self.clone();
        let mut builder = AuthzCache::builder(move |_: Principal, _: Permission| {
            p.calls.fetch_add(1, Ordering::SeqCst);
            let allowed = p.allowed.load(Ordering::SeqCst);
            async move { Ok::<_, BoxError>(Decision::from_bool(allowed)) }
        })
        .__wall_clock_offset(offset_ms)
        .allow_ttl(TTL)
        .deny_ttl(TTL)
        .authorizer_timeout(AUTHZ_TIMEOUT)
        .max_staleness(MAX_STALENESS)
        .l1_max_bytes(if l1 { 16 << 20 } else { 0 })
        .secret(SECRET)
        // Generous call timeouts: this test is about clocks, and every invalidation must reach the
        // shared tiers (on a loaded CI machine, the 50/100 ms defaults failed one now and then).
        .l2(RedisTier::builder(support::redis::url()).namespace(&ns.0).timeout(TIER_TIMEOUT).build().unwrap());
        if let Some(schema) = schema {
            builder = builder.l3(PostgresTier::builder(pg::url())
                .schema(&schema.0)
                .timeout(TIER_TIMEOUT)
                .pool_size(4)
                .warm_on_start(0)
                .sweep(Duration::from_millis(100), 1000)
                .build()
                .unwrap());
        }
        builder.build()
    }
}

fn read() -> Permission {
    Permission::new("documents:1", "read")
}

async fn allowed(cache: &AuthzCache) -> bool {
    cache.check(&Principal::new("bob"), &read()).await.is_ok_and(|d| d.is_allowed())
}

/// Runs the scenario on L1+L2 (Redis alone keeps the epochs) or L1+L2+L3 (Postgres does).
async fn skewed_instances_never_revive_a_revoked_allow(with_postgres: bool) {
    let schema = if with_postgres {
        let schema = Schema::new("skew");
        let _ = pg::client().await;
        PostgresTier::builder(pg::url())
            .schema(&schema.0)
            .build()
            .unwrap()
            .migrate_with_reference_rbac()
            .await
            .unwrap();
        Some(schema)
    } else {
        None
    };
    let ns = Namespace::new("skew");
    let policy = Policy::default();
    policy.allowed.store(true, Ordering::SeqCst);
    let ahead = policy.cache(SKEW_MS, schema.as_ref(), &ns, true);
    let behind = policy.cache(-SKEW_MS, schema.as_ref(), &ns, true);
    let shared_only = policy.cache(-SKEW_MS, schema.as_ref(), &ns, false);
    for cache in [&ahead, &behind, &shared_only] {
        tokio::time::timeout(Duration::from_secs(10), cache.ready()).await.expect("ready");
    }
    let caches = [&ahead, &behind, &shared_only];
    let mut stale = 0usize;
    let mut judge = async |caches: &[&AuthzCache], ended_at: Option<Instant>| {
        for cache in caches {
            if allowed(cache).await && ended_at.is_some_and(|t| t.elapsed() > MAX_STALENESS) {
                stale += 1;
            }
        }
    };

    // 1. Churn: bob's role flips every round, and both instances invalidate him at once (their
    //    clocks ten minutes apart, so their floors are too). The ahead instance writes the shared
    //    copies, with deadlines five minutes in everyone else's future.
    for round in 0..20 {
        let allow = round % 2 == 1;
        policy.allowed.store(allow, Ordering::SeqCst);
        let inv = Invalidation::principal("bob");
        let (a, b) = tokio::join!(ahead.invalidate(&inv), behind.invalidate(&inv));
        a.expect("invalidated through the ahead instance");
        b.expect("invalidated through the behind instance");
        // When bob's permission ended (revoked and invalidated), if it is ended now.
        let ended_at = (!allow).then(Instant::now);
        // Each instance, the invalidating one first of all, misses at once.
        for cache in [&ahead, &behind] {
            assert_eq!(allowed(cache).await, allow, "round {round}: an invalidating instance served the old answer");
        }
        for _ in 0..5 {
            judge(&caches, ended_at).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // 2. The last allow: written by the instance five minutes ahead, read (and promoted) by the
    //    others; then revoked for good.
    policy.allowed.store(true, Ordering::SeqCst);
    ahead.invalidate(&Invalidation::principal("bob")).await.unwrap();
    assert!(allowed(&ahead).await);
    tokio::time::sleep(Duration::from_millis(100)).await; // the write-behind lands
    assert!(allowed(&behind).await);
    assert!(allowed(&shared_only).await);
    policy.allowed.store(false, Ordering::SeqCst);
    // (Its pooled connections died with the server: retry until Redis has it, as callers must.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while behind.invalidate(&Invalidation::principal("bob")).await.is_err() {
        assert!(Instant::now() < deadline, "the invalidation never reached Redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ended = Instant::now();

    // 3. The full retention period and beyond: epochs are forgotten (locally, and swept or
    //    expired in the stores), entries written under the ahead clock still claim to be valid
    //    for minutes. Nothing may come back.
    let calls_before = policy.calls.load(Ordering::SeqCst);
    while ended.elapsed() < RETENTION + Duration::from_secs(2) {
        judge(&caches, Some(ended)).await;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(stale, 0, "stale allows (postgres: {with_postgres})");
    assert!(policy.calls.load(Ordering::SeqCst) > calls_before, "the deny entries expired and were asked again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clocks_ten_minutes_apart_revive_nothing_with_redis_alone() {
    skewed_instances_never_revive_a_revoked_allow(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clocks_ten_minutes_apart_revive_nothing_with_redis_and_postgres() {
    skewed_instances_never_revive_a_revoked_allow(true).await;
}

/// Redis alone keeps the epochs and restarts empty: it forgets the values it assigned, and the
/// next bump, from an instance whose clock is behind, gets a value below one the instance ahead
/// remembers. That instance must notice the loss (Redis's epoch high water went down) and forget
/// the values, or it would keep serving an allow the lower bump invalidated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_empty_cannot_hide_a_bump_behind_a_value_it_forgot() {
    let mut owned = tokio::task::block_in_place(support::faults::OwnedRedis::start);
    let policy = Policy::default();
    policy.allowed.store(true, Ordering::SeqCst);
    let url = owned.url();
    let build = |offset_ms: i64| {
        let p = policy.clone();
        AuthzCache::builder(move |_: Principal, _: Permission| {
            p.calls.fetch_add(1, Ordering::SeqCst);
            let allowed = p.allowed.load(Ordering::SeqCst);
            async move { Ok::<_, BoxError>(Decision::from_bool(allowed)) }
        })
        .__wall_clock_offset(offset_ms)
        .allow_ttl(Duration::from_secs(60))
        .max_staleness(MAX_STALENESS)
        .secret(SECRET)
        .l2(RedisTier::builder(url.as_str()).namespace("skew-restart").build().unwrap())
        .build()
    };
    let ahead = build(SKEW_MS);
    tokio::time::timeout(Duration::from_secs(10), ahead.ready()).await.expect("ready");
    // The instance ahead invalidates bob: Redis assigns a value five minutes in the future.
    ahead.invalidate(&Invalidation::principal("bob")).await.unwrap();
    assert!(allowed(&ahead).await);
    tokio::task::block_in_place(|| owned.restart_empty());
    // The instance behind starts after the restart: nothing tells it of the value Redis forgot
    // (its floor is its own clock). The instance ahead re-subscribes and computes bob's allow.
    let behind = build(-SKEW_MS);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ahead.stats().backplane.is_none_or(|b| b.subscriptions < 2) {
        assert!(Instant::now() < deadline, "the instance ahead re-subscribed after the restart");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for cache in [&ahead, &behind] {
        tokio::time::timeout(Duration::from_secs(10), cache.ready()).await.expect("ready after the restart");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !allowed(&ahead).await {
        assert!(Instant::now() < deadline, "the instance ahead answers again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(allowed(&ahead).await, "cached");
    // Revoked, and invalidated through the instance behind: Redis, empty, assigns a value from
    // that instance's clock, five minutes below the one the instance ahead had.
    policy.allowed.store(false, Ordering::SeqCst);
    // (Its pooled connections died with the server: retry until Redis has it, as callers must.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while behind.invalidate(&Invalidation::principal("bob")).await.is_err() {
        assert!(Instant::now() < deadline, "the invalidation never reached Redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ended = Instant::now();
    loop {
        let served = allowed(&ahead).await;
        if !served {
            break;
        }
        assert!(ended.elapsed() <= MAX_STALENESS, "the instance ahead kept serving the revoked allow");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(MAX_STALENESS).await;
    for _ in 0..20 {
        assert!(!allowed(&ahead).await, "revived");
        assert!(!allowed(&behind).await, "revived");
    }
}
