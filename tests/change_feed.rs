//! The durable change feed against the real PostgreSQL (and Redis): a revocation made in the
//! permission tables while no instance is listening is still applied, on every instance, within
//! `max_staleness` of its commit; with L1 on and off, with and without Redis in front; and a role
//! with 100,000 holders is revoked on two instances within the bound.
//!
//! "Not listening" covers every way a listener can be away: its LISTEN connection reset (and
//! refused while the change commits), black-holed (silent, never closed), every connection of the
//! instance dropped at once (a Postgres restart or failover), and no instance running at all.
#![cfg(all(feature = "postgres", feature = "redis"))]

mod support;

use std::time::{Duration, Instant};

use support::faults::{Cut, SplitProxy};
use support::pg::{self, Schema};
use support::redis::{Namespace, SECRET};
use tower_authz_cache::{AuthzCache, Permission, PostgresRbacAuthorizer, PostgresTier, Principal, RedisTier};

const MAX_STALENESS: Duration = Duration::from_millis(300);
/// What the test adds to the bound: its own polling, and the scheduling of a loaded CI machine.
const SLACK: Duration = Duration::from_millis(250);

fn read(doc: u32) -> Permission {
    Permission::new(format!("documents:{doc}"), "read")
}

/// A migrated schema with the demo's roles (bob is a viewer).
async fn seeded(test: &str) -> Schema {
    let schema = Schema::new(test);
    let db = pg::client().await;
    PostgresTier::builder(pg::url())
        .schema(&schema.0)
        .build()
        .unwrap()
        .migrate_with_reference_rbac()
        .await
        .expect("migrations");
    pg::seed_rbac(&db, &schema.0).await;
    schema
}

/// One instance, its Postgres connections through `proxy`.
fn instance(schema: &Schema, proxy: &SplitProxy, redis: Option<&Namespace>, l1: bool) -> AuthzCache {
    let url = pg::url_via(proxy.addr());
    let mut builder = AuthzCache::builder(PostgresRbacAuthorizer::new(&url, &schema.0).unwrap())
        .secret(SECRET)
        .l3(PostgresTier::builder(&url).schema(&schema.0).pool_size(4).warm_on_start(0).build().unwrap())
        .allow_ttl(Duration::from_secs(60))
        .max_staleness(MAX_STALENESS)
        .l1_max_bytes(if l1 { 16 << 20 } else { 0 });
    if let Some(ns) = redis {
        builder =
            builder.secret(SECRET).l2(RedisTier::builder(support::redis::url()).namespace(&ns.0).build().unwrap());
    }
    builder.build()
}

async fn ready(cache: &AuthzCache) {
    tokio::time::timeout(Duration::from_secs(10), cache.ready()).await.expect("the cache became ready");
}

async fn allowed(cache: &AuthzCache, who: &str, doc: u32) -> bool {
    cache.check(&Principal::new(who), &read(doc)).await.is_ok_and(|d| d.is_allowed())
}

/// After `committed`, every cache must deny `who` within the bound and never allow again for
/// `watch` afterwards. Returns when the last cache denied (since the commit).
async fn assert_revoked(
    caches: &[&AuthzCache],
    who: &str,
    committed: Instant,
    watch: Duration,
    what: &str,
) -> Duration {
    let mut denied_at = vec![None; caches.len()];
    let end = Instant::now() + watch;
    while Instant::now() < end || denied_at.iter().any(Option::is_none) {
        for (i, cache) in caches.iter().enumerate() {
            let allow = allowed(cache, who, 1).await;
            match (allow, denied_at[i]) {
                (false, None) => denied_at[i] = Some(committed.elapsed()),
                (true, Some(at)) => panic!("{what}: instance {i} allowed {who} again after denying at {at:?}"),
                (true, None) => assert!(
                    committed.elapsed() <= MAX_STALENESS + SLACK,
                    "{what}: instance {i} still allows {who} {:?} after the revocation committed (bound {MAX_STALENESS:?})",
                    committed.elapsed()
                ),
                (false, Some(_)) => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    denied_at.into_iter().flatten().max().unwrap_or_default()
}

async fn set_role(schema: &Schema, who: &str, role: &str) -> Instant {
    let db = pg::client().await;
    db.execute(&format!("UPDATE {}.user_roles SET role_id = $1 WHERE user_id = $2", schema.0), &[&role, &who])
        .await
        .unwrap();
    Instant::now()
}

/// How a listener is kept away while the change commits.
#[derive(Debug, Clone, Copy)]
enum Away {
    /// The LISTEN connections are reset, and refused until after the commit.
    ListenReset,
    /// The LISTEN connections are held silent (a black hole), until after the commit.
    ListenBlackHole,
    /// Every connection of the instances is dropped and refused (a Postgres restart).
    Restart,
}

impl Away {
    fn apply(self, proxy: &SplitProxy) {
        match self {
            Away::ListenReset => proxy.set_listen(Cut::Down),
            Away::ListenBlackHole => proxy.set_listen(Cut::BlackHole),
            Away::Restart => {
                proxy.set_listen(Cut::Down);
                proxy.set_data(Cut::Down);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_committed_while_no_instance_listens_is_applied_within_the_bound() {
    let mut report = Vec::new();
    for away in [Away::ListenReset, Away::ListenBlackHole, Away::Restart] {
        for (l1, redis) in [(true, false), (false, false), (true, true), (false, true)] {
            let what =
                format!("{away:?}, L1 {}, {}", if l1 { "on" } else { "off" }, if redis { "L2+L3" } else { "L3" });
            let schema = seeded("feed_away").await;
            let ns = redis.then(|| Namespace::new("feed-away"));
            let (pa, pb) = (SplitProxy::start(pg::addr()).await, SplitProxy::start(pg::addr()).await);
            let a = instance(&schema, &pa, ns.as_ref(), l1);
            let b = instance(&schema, &pb, ns.as_ref(), l1);
            ready(&a).await;
            ready(&b).await;
            // Both serve bob's allow from their tiers (L1, or L2/L3 with L1 off).
            for cache in [&a, &b] {
                assert!(allowed(cache, "bob", 1).await, "{what}: bob reads before");
                assert!(allowed(cache, "bob", 1).await, "{what}: bob reads before, cached");
            }
            for p in [&pa, &pb] {
                away.apply(p);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            // The revocation commits while neither instance listens: its NOTIFY is lost.
            let committed = set_role(&schema, "bob", "none").await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            for p in [&pa, &pb] {
                p.set_listen(Cut::Pass);
                p.set_data(Cut::Pass);
            }
            let took = assert_revoked(&[&a, &b], "bob", committed, Duration::from_millis(600), &what).await;
            report.push(format!("{what}: both instances denied {took:?} after the commit"));
            // Another principal keeps her access (once the authorizer's own pool, which went
            // through the same proxy, has reconnected).
            let deadline = Instant::now() + Duration::from_secs(3);
            while !allowed(&a, "carol", 1).await {
                assert!(Instant::now() < deadline, "{what}: carol never read again");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    for line in report {
        println!("{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_committed_while_no_instance_runs_is_never_served_from_the_shared_tiers() {
    for l1 in [true, false] {
        let schema = seeded("feed_none").await;
        let ns = Namespace::new("feed-none");
        let proxy = SplitProxy::start(pg::addr()).await;
        // bob's allows of documents 1..=docs, each written to L2 and L3 before the instance goes.
        // (A copy is written to the tiers whose epochs were read for it: on a loaded machine the
        // feed can be unconfirmed for a moment, and that computation then writes no L2 copy.)
        let mut docs = 0;
        {
            let a = instance(&schema, &proxy, Some(&ns), l1);
            ready(&a).await;
            let deadline = Instant::now() + Duration::from_secs(10);
            while a.stats().tiers.l3.unwrap().writes < 1 || a.stats().tiers.l2.unwrap().writes < 1 {
                assert!(Instant::now() < deadline, "the shared copies were written");
                docs += 1;
                assert!(allowed(&a, "bob", docs).await);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let committed = set_role(&schema, "bob", "none").await;
        // New instances start after the commit, with bob's allow still in L2 and L3.
        let b = instance(&schema, &proxy, Some(&ns), l1);
        let c = instance(&schema, &proxy, Some(&ns), l1);
        for cache in [&b, &c] {
            for doc in 1..=docs {
                assert!(!allowed(cache, "bob", doc).await, "a fresh instance served the revoked allow (L1 {l1})");
            }
        }
        assert_revoked(&[&b, &c], "bob", committed, Duration::from_millis(300), "no instance running").await;
    }
}

/// A role with 100,000 holders loses its permission in one statement: the bulk rule records one
/// change covering everything, and both instances deny every holder they had cached within the
/// bound (here the default 1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_with_100_000_holders_is_revoked_on_two_instances_within_max_staleness() {
    const HOLDERS: usize = 100_000;
    const BOUND: Duration = Duration::from_secs(1);
    let schema = seeded("feed_bulk").await;
    let db = pg::client().await;
    let s = &schema.0;
    db.batch_execute(&format!(
        "INSERT INTO {s}.roles VALUES ('crowd');
         INSERT INTO {s}.role_permissions VALUES ('crowd', 'documents:*', 'read');
         INSERT INTO {s}.users SELECT 'holder-' || g FROM generate_series(1, {HOLDERS}) g;
         INSERT INTO {s}.user_roles SELECT 'holder-' || g, 'crowd' FROM generate_series(1, {HOLDERS}) g;"
    ))
    .await
    .unwrap();
    let ns = Namespace::new("feed-bulk");
    let build = |_: usize| {
        AuthzCache::builder(PostgresRbacAuthorizer::new(&pg::url(), s).unwrap())
            .secret(SECRET)
            .l2(RedisTier::builder(support::redis::url()).namespace(&ns.0).build().unwrap())
            .secret(SECRET)
            .l3(PostgresTier::builder(pg::url()).schema(s).pool_size(4).warm_on_start(0).build().unwrap())
            .allow_ttl(Duration::from_secs(60))
            .max_staleness(BOUND)
            .build()
    };
    let (a, b) = (build(0), build(1));
    ready(&a).await;
    ready(&b).await;
    let sample: Vec<String> = (0..50).map(|i| format!("holder-{}", 1 + i * 1999)).collect();
    for cache in [&a, &b] {
        for who in &sample {
            assert!(allowed(cache, who, 1).await, "{who} reads before");
        }
    }
    let applied = || a.stats().change_feed.unwrap().applied + b.stats().change_feed.unwrap().applied;
    let before = applied();
    let started = Instant::now();
    db.execute(&format!("DELETE FROM {s}.role_permissions WHERE role_id = 'crowd'"), &[]).await.unwrap();
    let statement = started.elapsed();
    let committed = Instant::now();
    let mut waiting: Vec<(usize, &String)> = (0..2).flat_map(|i| sample.iter().map(move |w| (i, w))).collect();
    while !waiting.is_empty() {
        let mut still = Vec::new();
        for (i, who) in waiting {
            if allowed([&a, &b][i], who, 1).await {
                still.push((i, who));
            }
        }
        waiting = still;
        assert!(
            committed.elapsed() <= BOUND + SLACK,
            "{} holders still allowed {:?} after the commit",
            waiting.len(),
            committed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = committed.elapsed();
    assert_eq!(applied() - before, 1, "one change covering everything");
    println!(
        "bulk revocation: {HOLDERS} holders, statement {statement:?} (incl. the view refresh), \
         every cached holder denied on both instances {took:?} after the commit (bound {BOUND:?})"
    );
}
