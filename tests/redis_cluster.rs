//! L2 on a Redis Cluster the test starts itself (3 masters + 3 replicas from `redis-server`
//! binaries on loopback ports, torn down afterwards): sharing between instances, invalidation
//! across instances subscribed through different nodes, keys spread over the masters, a master
//! killed under load with revocations mixed in, health per node.
#![cfg(feature = "redis")]

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::cluster::OwnedCluster;
use support::redis::{SECRET, wait_trusted};
use tower_authz_cache::{
    AuthzCache, BoxError, Decision, HealthStatus, Invalidation, Permission, Principal, RedisClusterTier,
};

/// The source of truth shared by every instance (revocations, when they were made), and each
/// instance's authorizer calls.
#[derive(Clone, Default)]
struct Policy {
    revoked: Arc<Mutex<HashMap<String, Instant>>>,
    calls: Arc<AtomicUsize>,
}

impl Policy {
    fn instance(&self) -> Self {
        Self { revoked: self.revoked.clone(), calls: Arc::default() }
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

fn build(cluster: &OwnedCluster, first_seed: usize, ns: &str, policy: &Policy) -> AuthzCache {
    let tier = RedisClusterTier::builder(cluster.urls_from(first_seed))
        .namespace(ns)
        .timeout(Duration::from_millis(100))
        .open_for(Duration::from_millis(500))
        .build()
        .expect("valid tier");
    let p = policy.clone();
    AuthzCache::builder(move |principal: Principal, _: Permission| {
        p.calls.fetch_add(1, Ordering::SeqCst);
        let revoked = p.revoked.lock().unwrap().contains_key(principal.id());
        async move { Ok::<_, BoxError>(Decision::from_bool(!revoked)) }
    })
    .secret(SECRET)
    .l2(tier)
    .max_staleness(Duration::from_secs(2))
    .build()
}

async fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn heard(cache: &AuthzCache) -> u64 {
    cache.stats().backplane.map_or(0, |b| b.invalidations)
}

fn l2_writes(cache: &AuthzCache) -> u64 {
    cache.stats().tiers.l2.map_or(0, |t| t.writes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_decisions_and_hear_invalidations_through_different_nodes() {
    let cluster = OwnedCluster::start();
    let truth = Policy::default();
    let (pa, pb) = (truth.instance(), truth.instance());
    // A subscribes through node 0, B through node 4: different nodes (one of them a replica or
    // another master).
    let a = build(&cluster, 0, "share", &pa);
    let b = build(&cluster, 4, "share", &pb);
    wait_trusted(&a).await;
    wait_trusted(&b).await;
    let perm = Permission::new("documents:1", "read");
    let bob = Principal::new("bob");
    assert!(a.check(&bob, &perm).await.unwrap().is_allowed());
    wait_for("a's l2 write", Duration::from_secs(5), || l2_writes(&a) >= 1).await;
    assert!(b.check(&bob, &perm).await.unwrap().is_allowed());
    assert_eq!((pa.calls(), pb.calls()), (1, 0), "b answered from the cluster, not its authorizer");
    assert_eq!(b.stats().tiers.l2.unwrap().hits, 1);

    // Revoked at the source, invalidated through A: B (subscribed elsewhere) hears it.
    truth.revoked.lock().unwrap().insert("bob".into(), Instant::now());
    let heard_before = heard(&b);
    let sent = Instant::now();
    a.invalidate(&Invalidation::Principal("bob".into())).await.expect("recorded in the cluster");
    let before = b.stats().tiers.l1.stale;
    wait_for("b to hear the invalidation", Duration::from_secs(2), || heard(&b) > heard_before).await;
    let heard_after = sent.elapsed();
    assert!(!b.check(&bob, &perm).await.unwrap().is_allowed(), "b no longer allows bob");
    assert_eq!(pb.calls(), 1, "b asked its authorizer after the invalidation");
    assert!(b.stats().tiers.l1.stale > before);
    eprintln!("invalidation heard by the other instance after {heard_after:?}");

    // Health lists every node, all up (the upkeep reads the topology every 2 s).
    let listed = Instant::now();
    while a.health().tiers.l2.is_none_or(|l2| l2.nodes.len() != 6) {
        assert!(listed.elapsed() < Duration::from_secs(10), "health lists {:?}", a.health().tiers.l2.map(|l| l.nodes));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let health = a.health();
    let l2 = health.tiers.l2.expect("l2");
    let nodes = &l2.nodes;
    assert_eq!(nodes.len(), 6, "{nodes:?}");
    assert_eq!(nodes.iter().filter(|n| n.master).count(), 3);
    assert_eq!(nodes.iter().filter(|n| n.master).map(|n| n.slots).sum::<u32>(), 16_384);
    assert!(nodes.iter().all(|n| n.status == HealthStatus::Up));
    assert_eq!(l2.status, HealthStatus::Up, "{:?}", l2.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_keys_spread_over_every_master() {
    let cluster = OwnedCluster::start();
    let policy = Policy::default();
    let cache = build(&cluster, 0, "spread", &policy);
    let perm = Permission::new("documents:1", "read");
    const N: u64 = 10_000;
    for i in 0..N {
        cache.check(&Principal::new(format!("user-{i}")), &perm).await.unwrap();
    }
    wait_for("every entry written", Duration::from_secs(60), || l2_writes(&cache) >= N).await;
    let per_master: Vec<usize> =
        cluster.masters().iter().map(|m| cluster.count_keys(*m, "spread:v1:{p:*}:d:*")).collect();
    let total: usize = per_master.iter().sum();
    assert_eq!(total as u64, N, "{per_master:?}");
    for n in &per_master {
        assert!((*n as f64) < 0.45 * N as f64, "one master holds {n} of {N} entry keys: {per_master:?}");
    }
    eprintln!("entry keys per master: {per_master:?}");
}

/// The figures of a run under load, for the report.
#[derive(Default)]
struct Tally {
    checks: AtomicUsize,
    errors: AtomicUsize,
    stale: AtomicUsize,
    slowest_us: std::sync::atomic::AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_load_with_revocations_never_serves_a_stale_allow() {
    let mut cluster = OwnedCluster::start();
    let truth = Policy::default();
    let (pa, pb) = (truth.instance(), truth.instance());
    let a = Arc::new(build(&cluster, 0, "failover", &pa));
    let b = Arc::new(build(&cluster, 3, "failover", &pb));
    wait_trusted(&a).await;
    wait_trusted(&b).await;
    let perm = Permission::new("documents:1", "read");
    let users: Vec<String> = (0..200).map(|i| format!("u{i}")).collect();
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    // The bound for another instance: max_staleness; the invalidating instance: none.
    let bound = Duration::from_secs(2);
    let mut load = Vec::new();
    for (c, cache) in [a.clone(), b.clone(), a.clone(), b.clone()].into_iter().enumerate() {
        let (users, truth, tally, stop, perm) =
            (users.clone(), truth.clone(), tally.clone(), stop.clone(), perm.clone());
        let strict = c % 2 == 0; // a: the instance that invalidates
        load.push(tokio::spawn(async move {
            let mut i = c * 37;
            while !stop.load(Ordering::Relaxed) {
                i = (i + 7) % users.len();
                let who = &users[i];
                let started = Instant::now();
                let answer = cache.check(&Principal::new(who.as_str()), &perm).await;
                let took = started.elapsed();
                tally.checks.fetch_add(1, Ordering::Relaxed);
                tally.slowest_us.fetch_max(took.as_micros() as u64, Ordering::Relaxed);
                match answer {
                    Err(_) => {
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(d) if d.is_allowed() => {
                        // Allowed although the revocation was acknowledged before this check
                        // began (beyond the bound, for the other instance).
                        if let Some(acked) = truth.revoked.lock().unwrap().get(who.as_str()).copied() {
                            let limit = if strict { acked } else { acked + bound };
                            if started > limit {
                                tally.stale.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Ok(_) => {}
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }));
    }
    // Revocations mixed in, through A; the acknowledgement time is recorded when the cluster
    // confirmed (a failed invalidation is retried, as an application would).
    let revoker = {
        let (a, users, truth, stop) = (a.clone(), users.clone(), truth.clone(), stop.clone());
        tokio::spawn(async move {
            let mut failed = 0;
            for who in users.iter().step_by(5) {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                // Revoked at the source first (a far-future time: not acknowledged yet).
                truth.revoked.lock().unwrap().insert(who.clone(), Instant::now() + Duration::from_secs(3600));
                loop {
                    match a.invalidate(&Invalidation::Principal(who.clone())).await {
                        Ok(_) => break,
                        Err(_) => {
                            failed += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                truth.revoked.lock().unwrap().insert(who.clone(), Instant::now());
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            failed
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let distrusts = |c: &AuthzCache| c.stats().backplane.map_or(0, |b| b.distrusts);
    let distrusted = (distrusts(&a), distrusts(&b));
    let before = (pa.calls() + pb.calls(), tally.checks.load(Ordering::Relaxed));
    let victim = cluster.masters()[0];
    let killed_at = Instant::now();
    cluster.kill(victim);
    // The replica takes over (cluster-node-timeout 1 s).
    let c = &cluster;
    tokio::task::block_in_place(|| c.wait_ok(Duration::from_secs(30)));
    let failover = killed_at.elapsed();
    let during = (pa.calls() + pb.calls() - before.0, tally.checks.load(Ordering::Relaxed) - before.1);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // The promoted replica has no replica of its own: its invalidations cannot be confirmed
    // (they are retried) until the failed node comes back, as its replica.
    cluster.start_again(victim);
    let c = &cluster;
    tokio::task::block_in_place(|| c.wait_ok(Duration::from_secs(30)));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let failed_invalidations = revoker.await.unwrap();

    assert_eq!(tally.stale.load(Ordering::Relaxed), 0, "stale allows");
    // Heartbeats go through every master: the killed one's silence stopped both instances
    // trusting L1 (whatever node each was subscribed through), and they trust it again after.
    assert!(
        distrusts(&a) > distrusted.0 && distrusts(&b) > distrusted.1,
        "both instances distrusted L1 during the failover"
    );
    wait_trusted(&a).await;
    wait_trusted(&b).await;
    assert_eq!(tally.errors.load(Ordering::Relaxed), 0, "checks that failed while the authorizer was up");

    // Recovery: both instances owe nothing, their breakers close, and a new decision is shared
    // through the new master again.
    wait_for("debts paid and breakers closed", Duration::from_secs(15), || {
        [&a, &b].iter().all(|c| {
            let t = c.stats().tiers.l2.unwrap();
            t.owed == 0 && t.breaker == tower_authz_cache::BreakerState::Closed
        })
    })
    .await;
    let fresh = Principal::new("after-failover");
    let calls = pb.calls();
    let writes = l2_writes(&a);
    a.check(&fresh, &perm).await.unwrap();
    wait_for("a's write after the failover", Duration::from_secs(10), || l2_writes(&a) > writes).await;
    let hits = b.stats().tiers.l2.unwrap().hits;
    assert!(b.check(&fresh, &perm).await.unwrap().is_allowed());
    assert_eq!(pb.calls(), calls, "b answered from the cluster after the failover");
    assert_eq!(b.stats().tiers.l2.unwrap().hits, hits + 1);
    eprintln!(
        "failover: {failover:?} until cluster_state:ok; {} checks then, {} of them went to an authorizer; slowest check {} us; \
         {} checks in all, {} invalidations retried",
        during.1,
        during.0,
        tally.slowest_us.load(Ordering::Relaxed),
        tally.checks.load(Ordering::Relaxed),
        failed_invalidations
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_no_replica_confirms_is_not_acknowledged_and_is_paid_when_one_does() {
    let mut cluster = OwnedCluster::start();
    let policy = Policy::default();
    let cache = build(&cluster, 0, "wait", &policy);
    let perm = Permission::new("documents:1", "read");
    cache.check(&Principal::new("carol"), &perm).await.unwrap();
    cache.invalidate(&Invalidation::Principal("carol".into())).await.expect("confirmed by its replica");
    let masters = cluster.masters();
    let replicas: Vec<usize> = (0..6).filter(|i| !masters.contains(i)).collect();
    for r in &replicas {
        cluster.kill(*r);
    }
    // Acknowledged by a master alone, a bump could be lost in a failover: not acknowledged.
    assert!(cache.invalidate(&Invalidation::Principal("carol".into())).await.is_err());
    assert!(cache.stats().tiers.l2.unwrap().owed >= 1, "the cache owes the cluster the bump");
    let calls = policy.calls();
    cache.check(&Principal::new("carol"), &perm).await.unwrap();
    assert_eq!(policy.calls(), calls + 1, "owed, the cluster is not read: the authorizer answers");
    wait_for("the health warning", Duration::from_secs(10), || {
        cache
            .health()
            .tiers
            .l2
            .is_some_and(|l2| l2.status == HealthStatus::Degraded && l2.reason.is_some_and(|r| r.contains("replicas")))
    })
    .await;
    for r in &replicas {
        cluster.start_again(*r);
    }
    let c = &cluster;
    tokio::task::block_in_place(|| c.wait_ok(Duration::from_secs(30)));
    wait_for("the debt paid", Duration::from_secs(15), || cache.stats().tiers.l2.unwrap().owed == 0).await;
    cache.invalidate(&Invalidation::Principal("carol".into())).await.expect("confirmed again");
}

/// `authz-cache init` checks the cluster (state, every slot covered); `invalidate` goes through it.
#[cfg(feature = "cli")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_checks_the_cluster_and_invalidates_through_it() {
    let mut cluster = OwnedCluster::start();
    let nodes = cluster.urls().join(",");
    let run = |args: &'static [&'static str], nodes: String| {
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_authz-cache"));
            cmd.args(args);
            for var in ["REDIS_URL", "DATABASE_URL", "AUTHZ_CACHE_MODE", "AUTHZ_CACHE_NAMESPACE"] {
                cmd.env_remove(var);
            }
            cmd.env("REDIS_CLUSTER_NODES", nodes)
                .env("AUTHZ_CACHE_SECRET", std::str::from_utf8(SECRET).unwrap())
                .env("AUTHZ_CACHE_NAMESPACE", "cli");
            cmd.output().expect("the authz-cache binary runs")
        })
    };
    let out = run(&["init"], nodes.clone()).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("cluster_state:ok, 3 masters, 3 replicas, all 16384 slots covered"), "{text}");

    let out = run(&["invalidate", "--principal", "bob"], nodes.clone()).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("through the Redis Cluster at") && text.contains("consistency token: v1."), "{text}");

    // A master and its replica gone: slots without a master, and init says so.
    let masters = cluster.masters();
    for i in 0..6 {
        if !masters.contains(&i) {
            cluster.kill(i);
        }
    }
    cluster.kill(masters[0]);
    let live = cluster.urls_from(masters[1]).into_iter().take(1).collect::<Vec<_>>().join(",");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = run(&["init"], live.clone()).await.unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            assert!(text.contains("redis      FAIL  cluster"), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "init still passes without a master for a third of the slots: {text}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
