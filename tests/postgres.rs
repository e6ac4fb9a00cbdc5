//! L3 on the real PostgreSQL (DATABASE_URL, default postgres://postgres@127.0.0.1:5432/test), each
//! test in a schema of its own: L3 hits across restarts and a Redis flush, the change feed from
//! the permission tables, the Postgres backplane, a Postgres cut off mid-stream, the sweeper,
//! tampered rows, pending invalidations, and warming.
#![cfg(all(feature = "postgres", feature = "redis"))]

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::percentiles;
use support::pg::{self, Schema};
use support::proxy::{FaultProxy, Mode};
use support::redis::{Namespace, SECRET};
use tower_authz_cache::{
    AuthzCache, AuthzCacheBuilder, BoxError, BreakerState, Decision, Invalidation, Permission, PostgresRbacAuthorizer,
    PostgresTier, PostgresTierBuilder, Principal, RedisTier,
};

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

fn l3(schema: &Schema, url: &str) -> PostgresTierBuilder {
    PostgresTier::builder(url).schema(&schema.0).pool_size(4).warm_on_start(0)
}

/// A migrated schema of the test's own.
async fn migrated(test: &str) -> Schema {
    let schema = Schema::new(test);
    let _ = pg::client().await; // fails with instructions when Postgres is down
    l3(&schema, &pg::url()).build().unwrap().migrate_with_reference_rbac().await.expect("migrations apply");
    schema
}

async fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits until the cache's backplane has been heard (L1 trusted); fails after 5 s.
async fn wait_trusted(cache: &AuthzCache) {
    wait_for("the backplane to be heard", Duration::from_secs(5), || {
        cache.stats().backplane.is_some_and(|b| b.l1_trusted)
    })
    .await;
}

fn read(doc: u32) -> Permission {
    Permission::new(format!("documents:{doc}"), "read")
}

async fn rows(schema: &Schema) -> i64 {
    let db = pg::client().await;
    db.query_one(&format!("SELECT count(*) FROM {}.authz_cache_entries", schema.0), &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_and_redis_flush_the_first_request_is_an_l3_hit() {
    let schema = migrated("restart").await;
    let policy = Policy::default();
    let bob = Principal::new("bob");
    {
        let ns = Namespace::new("pg-restart");
        let a = policy
            .builder()
            .secret(SECRET)
            .l2(RedisTier::builder(support::redis::url()).namespace(&ns.0).build().unwrap())
            .secret(SECRET)
            .l3(l3(&schema, &pg::url()).build().unwrap())
            .build();
        assert!(a.check(&bob, &read(1)).await.unwrap().is_allowed());
        assert_eq!(policy.calls(), 1);
        wait_for("the L3 write", Duration::from_secs(5), || a.stats().tiers.l3.unwrap().writes >= 1).await;
        assert_eq!(rows(&schema).await, 1);
        // The app goes away and Redis loses everything it held (this test's namespace is deleted:
        // the shared server is never flushed by a test).
    }
    let ns = Namespace::new("pg-restart-2");
    let b_policy = policy.instance();
    let b = b_policy
        .builder()
        .secret(SECRET)
        .l2(RedisTier::builder(support::redis::url()).namespace(&ns.0).build().unwrap())
        .secret(SECRET)
        .l3(l3(&schema, &pg::url()).build().unwrap())
        .build();
    // L1 and L2 are read once the change feed is known to be caught up.
    tokio::time::timeout(Duration::from_secs(5), b.ready()).await.expect("ready");
    assert!(b.check(&bob, &read(1)).await.unwrap().is_allowed());
    let stats = b.stats();
    assert_eq!(b_policy.calls(), 0, "answered from L3, not the authorizer: {stats:?}");
    assert_eq!(stats.tiers.l2.unwrap().misses, 1);
    assert_eq!(stats.tiers.l3.unwrap().hits, 1);
    // Promoted to L1 (the next check is an L1 hit) and to L2 (another instance reads it there).
    b.check(&bob, &read(1)).await.unwrap();
    assert_eq!(b.stats().tiers.l3.unwrap().hits, 1);
    wait_for("the promotion to L2", Duration::from_secs(5), || b.stats().tiers.l2.unwrap().writes >= 1).await;
    let c_policy = policy.instance();
    let c = c_policy
        .builder()
        .secret(SECRET)
        .l2(RedisTier::builder(support::redis::url()).namespace(&ns.0).build().unwrap())
        .secret(SECRET)
        .l3(l3(&schema, &pg::url()).build().unwrap())
        .build();
    // L2 is read once the change feed is known to be caught up.
    tokio::time::timeout(Duration::from_secs(5), c.ready()).await.expect("ready");
    assert!(c.check(&bob, &read(1)).await.unwrap().is_allowed());
    assert_eq!((c.stats().tiers.l2.unwrap().hits, c_policy.calls()), (1, 0));

    // An invalidation is durable: after it, a restarted instance does not take L3's old row.
    c.invalidate(&Invalidation::principal("bob")).await.unwrap();
    drop((b, c));
    let d_policy = policy.instance();
    let d = d_policy.builder().secret(SECRET).l3(l3(&schema, &pg::url()).build().unwrap()).build();
    assert!(d.check(&bob, &read(1)).await.unwrap().is_allowed());
    assert_eq!(d_policy.calls(), 1, "the row predates the invalidation: {:?}", d.stats().tiers.l3);
    assert_eq!(d.stats().tiers.l3.unwrap().stale, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_rows_are_misses_and_counted() {
    let schema = migrated("tamper").await;
    let policy = Policy::default();
    let a = policy.builder().secret(SECRET).l3(l3(&schema, &pg::url()).build().unwrap()).build();
    for who in ["bob", "carol"] {
        a.check(&Principal::new(who), &read(1)).await.unwrap();
    }
    wait_for("two L3 writes", Duration::from_secs(5), || a.stats().tiers.l3.unwrap().writes >= 2).await;
    drop(a);
    let db = pg::client().await;
    let s = &schema.0;
    // Bob's row gets carol's value (valid MAC, wrong key); carol's gets a flipped allow bit.
    db.batch_execute(&format!(
        "WITH v AS (SELECT value FROM {s}.authz_cache_entries ORDER BY key LIMIT 1)
         UPDATE {s}.authz_cache_entries SET value = (SELECT value FROM v)
         WHERE key = (SELECT key FROM {s}.authz_cache_entries ORDER BY key DESC LIMIT 1);
         UPDATE {s}.authz_cache_entries SET value = set_byte(value, 1, get_byte(value, 1) # 1)
         WHERE key = (SELECT key FROM {s}.authz_cache_entries ORDER BY key LIMIT 1);"
    ))
    .await
    .unwrap();
    let b_policy = policy.instance();
    let b = b_policy.builder().secret(SECRET).l3(l3(&schema, &pg::url()).build().unwrap()).build();
    for who in ["bob", "carol"] {
        assert!(b.check(&Principal::new(who), &read(1)).await.unwrap().is_allowed());
    }
    assert_eq!(b_policy.calls(), 2, "no tampered row was taken");
    assert_eq!(b.stats().tiers.l3.unwrap().rejected, 2);
    // Nothing in the table names a principal.
    let leaked: i64 = db
        .query_one(
            &format!(
                "SELECT count(*) FROM {s}.authz_cache_entries WHERE position('bob'::bytea IN value) > 0 \
                 OR position('bob'::bytea IN subject) > 0 OR position('bob'::bytea IN key) > 0"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leaked, 0);
}

/// Sets bob's role in the tables, the way an administrator would in psql.
async fn set_role(db: &tokio_postgres::Client, schema: &str, role: &str) {
    db.execute(&format!("UPDATE {schema}.user_roles SET role_id = $1 WHERE user_id = 'bob'"), &[&role]).await.unwrap();
}

async fn rbac_instance(schema: &Schema, redis: Option<&Namespace>) -> AuthzCache {
    let mut builder = AuthzCache::builder(PostgresRbacAuthorizer::new(&pg::url(), &schema.0).unwrap())
        .secret(SECRET)
        .l3(l3(schema, &pg::url()).build().unwrap())
        .max_staleness(Duration::from_millis(500));
    if let Some(ns) = redis {
        builder =
            builder.secret(SECRET).l2(RedisTier::builder(support::redis::url()).namespace(&ns.0).build().unwrap());
    }
    let cache = builder.build();
    wait_trusted(&cache).await;
    cache
}

/// An UPDATE of user_roles, made outside the app, reaches two running instances through the
/// triggers' NOTIFY: both deny bob on their next check, with no call to the invalidation service.
async fn change_feed_trials(schema: &Schema, redis: Option<&Namespace>, trials: usize) -> (f64, f64) {
    let db = pg::client().await;
    pg::seed_rbac(&db, &schema.0).await;
    let a = rbac_instance(schema, redis).await;
    let b = rbac_instance(schema, redis).await;
    let bob = Principal::new("bob");
    let mut delays = Vec::with_capacity(trials);
    for trial in 0..trials {
        let (role, allowed) = if trial % 2 == 0 { ("none", false) } else { ("viewer", true) };
        for cache in [&a, &b] {
            assert_eq!(cache.check(&bob, &read(1)).await.unwrap().is_allowed(), !allowed, "trial {trial}: cached");
        }
        let start = Instant::now();
        set_role(&db, &schema.0, role).await;
        let mut seen = [false, false];
        while seen != [true, true] {
            for (i, cache) in [&a, &b].into_iter().enumerate() {
                if !seen[i] && cache.check(&bob, &read(1)).await.unwrap().is_allowed() == allowed {
                    seen[i] = true;
                }
            }
            assert!(start.elapsed() < Duration::from_secs(5), "trial {trial}: the change never arrived");
            tokio::task::yield_now().await;
        }
        delays.push(start.elapsed());
    }
    // Each change was applied once, by whichever instance drained it first.
    let (sa, sb) = (a.stats(), b.stats());
    let applied = sa.change_feed_invalidations + sb.change_feed_invalidations;
    assert!(applied as usize >= trials, "{sa:?} {sb:?}");
    assert_eq!(sa.invalidations.principal + sb.invalidations.principal, 0, "nobody called the invalidation service");
    percentiles(&mut delays)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_change_in_the_tables_reaches_every_instance_over_postgres() {
    let schema = migrated("feed_pg").await;
    let (p50, p99) = change_feed_trials(&schema, None, 40).await;
    println!("change feed (Postgres only), UPDATE until both instances agree: p50 {p50:.0} us, p99 {p99:.0} us");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_change_in_the_tables_reaches_every_instance_with_redis_too() {
    let schema = migrated("feed_redis").await;
    let ns = Namespace::new("pg-feed");
    let (p50, p99) = change_feed_trials(&schema, Some(&ns), 40).await;
    println!("change feed (Redis + Postgres), UPDATE until both instances agree: p50 {p50:.0} us, p99 {p99:.0} us");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_reaches_the_other_instance_over_the_postgres_backplane() {
    let schema = migrated("backplane").await;
    let policy = Policy::default();
    let build = |p: &Policy| {
        p.builder()
            .secret(SECRET)
            .l3(l3(&schema, &pg::url()).build().unwrap())
            .max_staleness(Duration::from_millis(500))
            .build()
    };
    let (a, b) = (build(&policy), build(&policy.instance()));
    wait_trusted(&a).await;
    wait_trusted(&b).await;
    let bob = Principal::new("bob");
    assert!(b.check(&bob, &read(1)).await.unwrap().is_allowed());
    policy.revoked.lock().unwrap().insert("bob".into());
    let start = Instant::now();
    a.invalidate(&Invalidation::principal("bob")).await.unwrap();
    while b.check(&bob, &read(1)).await.unwrap().is_allowed() {
        assert!(start.elapsed() < Duration::from_secs(2), "B kept serving the revoked allow");
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    println!("postgres backplane: B denied {:?} after A's invalidation", start.elapsed());
    assert!(b.stats().backplane.unwrap().invalidations >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cut_off_mid_stream_fails_nothing_and_recovers() {
    let schema = migrated("cut").await;
    let proxy = FaultProxy::start(pg::addr()).await;
    let policy = Policy::default();
    let cache = policy
        .builder()
        .l1_max_bytes(0) // every check goes to L3 (or past it)
        .secret(SECRET)
        .l3(l3(&schema, &pg::url_via(proxy.addr()))
            .timeout(Duration::from_millis(50))
            .failure_threshold(5)
            .open_for(Duration::from_millis(500))
            .build()
            .unwrap())
        .build();
    let mut failed = 0usize;
    let mut total = 0usize;
    let mut latencies = Vec::new();
    let run =
        async |cache: &AuthzCache, for_: Duration, failed: &mut usize, total: &mut usize, lat: &mut Vec<Duration>| {
            let start = Instant::now();
            let mut i = 0u32;
            while start.elapsed() < for_ {
                i += 1;
                let t = Instant::now();
                if cache.check(&Principal::new(format!("user{}", i % 50)), &read(i % 20)).await.is_err() {
                    *failed += 1;
                }
                lat.push(t.elapsed());
                *total += 1;
            }
        };
    run(&cache, Duration::from_millis(700), &mut failed, &mut total, &mut latencies).await;
    let hits_before = cache.stats().tiers.l3.unwrap().hits;
    assert!(hits_before > 0, "L3 serves before the cut");
    proxy.set_mode(Mode::BlackHole);
    let mut during = Vec::new();
    run(&cache, Duration::from_millis(1500), &mut failed, &mut total, &mut during).await;
    let stats = cache.stats().tiers.l3.unwrap();
    assert!(stats.breaker_opens >= 1, "the breaker opened: {stats:?}");
    proxy.set_mode(Mode::Pass);
    // Requests keep flowing (and failing nothing) until the half-open probe closes the breaker.
    let recovering = Instant::now();
    while cache.stats().tiers.l3.unwrap().breaker != BreakerState::Closed {
        assert!(recovering.elapsed() < Duration::from_secs(5), "the breaker never closed");
        run(&cache, Duration::from_millis(50), &mut failed, &mut total, &mut latencies).await;
    }
    let mut after = Vec::new();
    run(&cache, Duration::from_millis(1500), &mut failed, &mut total, &mut after).await;
    let end = cache.stats().tiers.l3.unwrap();
    assert_eq!(failed, 0, "{total} requests");
    assert_eq!(end.breaker, BreakerState::Closed, "{end:?}");
    assert!(end.hits > stats.hits, "L3 hits resumed after recovery: {end:?}");
    let (p50, p99) = percentiles(&mut during);
    println!(
        "postgres black hole: {total} requests, 0 failed; during the outage p50 {p50:.0} us p99 {p99:.0} us; \
         breaker opened {} time(s)",
        end.breaker_opens
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidations_postgres_missed_are_paid_before_l3_is_read_again() {
    let schema = migrated("pending").await;
    let proxy = FaultProxy::start(pg::addr()).await;
    let policy = Policy::default();
    let cache = policy
        .builder()
        .l1_max_bytes(0)
        .secret(SECRET)
        .l3(l3(&schema, &pg::url_via(proxy.addr())).timeout(Duration::from_millis(100)).build().unwrap())
        .build();
    let bob = Principal::new("bob");
    cache.check(&bob, &read(1)).await.unwrap();
    wait_for("the L3 write", Duration::from_secs(5), || cache.stats().tiers.l3.unwrap().writes >= 1).await;
    proxy.set_mode(Mode::Down);
    assert!(
        cache.invalidate(&Invalidation::principal("bob")).await.is_err(),
        "not recorded durably: the caller learns"
    );
    proxy.set_mode(Mode::Pass);
    // Until the bump is paid, L3 is not read; once paid, bob's old row is stale there too.
    wait_for("the owed bump to be paid", Duration::from_secs(5), || {
        let db_has_it = std::thread::spawn({
            let schema = schema.0.clone();
            move || {
                tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async move {
                    let db = pg::client().await;
                    let n: i64 = db
                        .query_one(&format!("SELECT count(*) FROM {schema}.authz_cache_epochs WHERE scope = 'p'"), &[])
                        .await
                        .unwrap()
                        .get(0);
                    n
                })
            }
        })
        .join()
        .unwrap();
        // Recorded in Postgres, and known to be paid here.
        db_has_it == 1 && cache.stats().tiers.l3.unwrap().owed == 0
    })
    .await;
    let calls = policy.calls();
    cache.check(&bob, &read(1)).await.unwrap();
    assert_eq!(policy.calls(), calls + 1, "the old row is stale against the durable epoch");
    assert_eq!(cache.stats().tiers.l3.unwrap().stale, 1, "{:?}", cache.stats().tiers.l3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_keeps_the_table_bounded_under_distinct_keys() {
    let schema = migrated("sweep").await;
    let policy = Policy::default();
    let cache = policy
        .builder()
        .allow_ttl(Duration::from_millis(300))
        .deny_ttl(Duration::from_millis(300))
        .secret(SECRET)
        .l3(l3(&schema, &pg::url()).sweep(Duration::from_millis(200), 200).build().unwrap())
        .build();
    // 4,000 distinct keys over about 2 s, each valid 300 ms.
    let start = Instant::now();
    for i in 0..4000u32 {
        cache.check(&Principal::new(format!("user{i}")), &read(i)).await.unwrap();
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let streamed = start.elapsed();
    wait_for("the writes", Duration::from_secs(10), || {
        let s = cache.stats().tiers.l3.unwrap();
        s.writes + s.write_drops + s.write_errors >= 4000
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let left = rows(&schema).await;
    let swept = cache.stats().tiers.l3.unwrap().swept;
    println!("sweeper: 4,000 distinct keys in {streamed:?}; {swept} rows swept, {left} left 800 ms later");
    assert!(swept >= 3000, "swept {swept}");
    assert!(left < 500, "the table holds about one ttl's worth of rows, not all of them: {left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warming_loads_the_most_hit_rows_and_a_principals_teammates() {
    let schema = migrated("warm").await;
    let db = pg::client().await;
    pg::seed_rbac(&db, &schema.0).await;
    let authorizer = || PostgresRbacAuthorizer::new(&pg::url(), &schema.0).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = |calls: &Arc<AtomicUsize>| {
        let (inner, calls) = (Arc::new(authorizer()), calls.clone());
        move |p: Principal, perm: Permission| {
            calls.fetch_add(1, Ordering::SeqCst);
            let inner = inner.clone();
            async move { tower_authz_cache::Authorizer::authorize(&*inner, &p, &perm).await }
        }
    };
    let a = AuthzCache::builder(counted(&calls)).secret(SECRET).l3(l3(&schema, &pg::url()).build().unwrap()).build();
    let carol = Principal::new("carol");
    for doc in 1..=5 {
        a.check(&carol, &read(doc)).await.unwrap();
    }
    wait_for("the L3 writes", Duration::from_secs(5), || a.stats().tiers.l3.unwrap().writes >= 5).await;
    drop(a);

    // Start-up warming: the rows are in L1 before anyone asks.
    let calls_b = Arc::new(AtomicUsize::new(0));
    let b = AuthzCache::builder(counted(&calls_b))
        .secret(SECRET)
        .l3(l3(&schema, &pg::url()).warm_on_start(100).build().unwrap())
        .build();
    wait_for("start-up warming", Duration::from_secs(10), || b.stats().warmed >= 5).await;
    let l3_hits = b.stats().tiers.l3.unwrap().hits;
    for doc in 1..=5 {
        assert!(b.check(&carol, &read(doc)).await.unwrap().is_allowed());
    }
    assert_eq!(b.stats().tiers.l1.hits, 5, "every check was an L1 hit");
    assert_eq!((b.stats().tiers.l3.unwrap().hits, calls_b.load(Ordering::SeqCst)), (l3_hits, 0));
    drop(b);

    // Team-mate warming: bob becoming active warms carol (they share a team).
    let calls_c = Arc::new(AtomicUsize::new(0));
    let c = AuthzCache::builder(counted(&calls_c))
        .secret(SECRET)
        .warm_teammates(10, authorizer())
        .l3(l3(&schema, &pg::url()).build().unwrap())
        .build();
    wait_trusted(&c).await;
    c.check(&Principal::new("bob"), &read(1)).await.unwrap();
    wait_for("team-mate warming", Duration::from_secs(10), || c.stats().warmed >= 5).await;
    let before = c.stats();
    assert!(c.check(&carol, &read(3)).await.unwrap().is_allowed());
    assert_eq!(c.stats().tiers.l1.hits, before.tiers.l1.hits + 1, "carol's entry was warmed into L1");

    // Explicit warming goes through the tiers.
    let report = c.warm((6..=8).map(|d| (carol.clone(), read(d)))).await;
    assert_eq!((report.keys, report.loaded), (3, 3));
    let report = c.warm((6..=8).map(|d| (carol.clone(), read(d)))).await;
    assert_eq!(report.already_cached, 3);
}

/// `ready()` waits for every subscription (here the Postgres listener, whose first subscription
/// drops L1, beside a Redis backplane that is already up), and entries made after it stay in L1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_the_postgres_listener_and_l1_survives_after_it() {
    let schema = migrated("ready").await;
    let ns = Namespace::new("ready");
    let proxy = FaultProxy::start(pg::addr()).await;
    proxy.set_mode(Mode::Down);
    let policy = Policy::default();
    let cache = policy
        .builder()
        .secret(SECRET)
        .l2(RedisTier::builder(support::redis::url()).namespace(&ns.0).build().unwrap())
        .secret(SECRET)
        .l3(l3(&schema, &pg::url_via(proxy.addr())).build().unwrap())
        .build();
    support::redis::wait_trusted(&cache).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), cache.ready()).await.is_err(),
        "ready before the Postgres listener could subscribe"
    );
    proxy.set_mode(Mode::Pass);
    tokio::time::timeout(Duration::from_secs(10), cache.ready()).await.expect("ready once Postgres is reachable");
    let bob = Principal::new("bob");
    for _ in 0..3 {
        assert!(cache.check(&bob, &read(1)).await.unwrap().is_allowed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(policy.calls(), 1, "after ready, nothing drops the entry: {:?}", cache.stats().tiers.l1);
    assert_eq!(cache.stats().tiers.l1.hits, 2);
}

/// The cache's own migrations and the reference RBAC schema are applied separately: `migrate`
/// creates the cache's tables only, and the cache works on them (a decision written to L3 is an
/// L3 hit for another instance); `migrate_with_reference_rbac` adds the RBAC tables afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_migrates_without_the_reference_rbac_schema() {
    let schema = Schema::new("cacheonly");
    let db = pg::client().await;
    let tier = || l3(&schema, &pg::url()).build().unwrap();
    tier().migrate().await.expect("the cache's own migrations apply");
    let exists = async |table: &str| -> bool {
        db.query_one(&format!("SELECT to_regclass('{}.{table}') IS NOT NULL", schema.0), &[]).await.unwrap().get(0)
    };
    assert!(exists("authz_cache_entries").await && exists("authz_cache_changes").await);
    assert!(!exists("user_roles").await, "no reference RBAC table without asking for it");
    let policy = Policy::default();
    let a = policy.builder().secret(SECRET).l3(tier()).build();
    a.check(&Principal::new("bob"), &read(1)).await.unwrap();
    wait_for("the L3 write", Duration::from_secs(5), || a.stats().tiers.l3.unwrap().writes >= 1).await;
    let b = policy.builder().secret(SECRET).l1_max_bytes(0).l3(tier()).build();
    wait_trusted(&b).await;
    b.check(&Principal::new("bob"), &read(1)).await.unwrap();
    assert_eq!(b.stats().tiers.l3.unwrap().hits, 1, "{:?}", b.stats().tiers.l3);
    tier().migrate_with_reference_rbac().await.expect("the reference schema applies afterwards");
    assert!(exists("user_roles").await && exists("mv_user_authorization_context").await);
}

/// The reference authorizer answers a batch in one statement, in order, exactly as one check at
/// a time would; and a batch checked by one instance is answered from the tiers by the others:
/// from Redis when it is there, from L3 otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_one_statement_agree_with_single_checks_and_are_served_by_the_tiers() {
    use tower_authz_cache::{Authorizer, DecisionSource};
    let schema = migrated("batch").await;
    let db = pg::client().await;
    pg::seed_rbac(&db, &schema.0).await;
    let authorizer = PostgresRbacAuthorizer::new(&pg::url(), &schema.0).unwrap();
    let perms: Vec<Permission> = [
        ("documents:1", "read"),
        ("documents:2", "delete"),
        ("admin", "manage"),
        ("other:1", "read"),
        ("documents:9", "write"),
        ("documents:1", "read"),
    ]
    .into_iter()
    .map(|(r, a)| Permission::new(r, a))
    .collect();
    let mut allows = 0;
    for who in ["alice", "bob", "carol", "nobody"] {
        let p = Principal::new(who);
        let batch = authorizer.authorize_many(&p, &perms).await.unwrap();
        assert_eq!(batch.len(), perms.len());
        for (perm, decision) in perms.iter().zip(&batch) {
            assert_eq!(&authorizer.authorize(&p, perm).await.unwrap(), decision, "{who} {perm}");
            allows += usize::from(decision.is_allowed());
        }
    }
    assert_eq!(allows, 5 + 2 + 3, "alice: all but other:1; bob: the two reads; carol: the reads and the write");
    assert!(authorizer.authorize_many(&Principal::new("bob"), &[]).await.unwrap().is_empty());

    let ns = Namespace::new("batch");
    let instance = |redis: bool| {
        let mut b = AuthzCache::builder(PostgresRbacAuthorizer::new(&pg::url(), &schema.0).unwrap())
            .secret(SECRET)
            .l3(l3(&schema, &pg::url()).build().unwrap());
        if redis {
            b = b.l2(RedisTier::builder(support::redis::url()).namespace(&ns.0).build().unwrap());
        }
        b.build()
    };
    let carol = Principal::new("carol");
    let a = instance(true);
    let first = a.check_many(&carol, &perms).await;
    assert!(first.iter().all(|d| d.as_ref().unwrap().source() == DecisionSource::Authorizer), "{first:?}");
    wait_for("both tiers' copies", Duration::from_secs(5), || {
        let s = a.stats();
        s.tiers.l2.unwrap().writes >= 5 && s.tiers.l3.unwrap().writes >= 5
    })
    .await;
    let expected: Vec<bool> = first.iter().map(|d| d.as_ref().unwrap().is_allowed()).collect();
    for (redis, level) in [(true, "l2"), (false, "l3")] {
        let b = instance(redis);
        // A mirror (L2) is read once the change feed is known caught up.
        tokio::time::timeout(Duration::from_secs(5), b.ready()).await.expect("B's subscriptions and feed are up");
        let out = b.check_many(&carol, &perms).await;
        assert_eq!(out.iter().map(|d| d.as_ref().unwrap().is_allowed()).collect::<Vec<_>>(), expected);
        assert!(out.iter().all(|d| d.as_ref().unwrap().source() == DecisionSource::Tier(level)), "{level}: {out:?}");
        assert_eq!(b.stats().authorizer_calls, 0, "{level}");
    }
    // An invalidation through A: the batch read sees the new epoch and asks the authorizer.
    a.invalidate(&Invalidation::principal("carol")).await.unwrap();
    let b = instance(false);
    let out = b.check_many(&carol, &perms).await;
    assert!(out.iter().all(|d| d.as_ref().unwrap().source() == DecisionSource::Authorizer), "{out:?}");
}
