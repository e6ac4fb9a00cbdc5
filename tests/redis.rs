//! L2 on the real Redis (REDIS_URL, default redis://127.0.0.1:6379): sharing between instances,
//! invalidation delay, faults through a test-owned proxy, forged values, key privacy.
#![cfg(feature = "redis")]

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::percentiles;
use support::proxy::{FaultProxy, Mode};
use support::redis::{Namespace, SECRET};
use tower_authz_cache::{
    AuthzCache, BoxError, BreakerState, Decision, Invalidation, Permission, Principal, RedisTier, RedisTierBuilder,
};

/// The source of truth shared by every instance; each instance counts its own calls.
#[derive(Clone, Default)]
struct Policy {
    revoked: Arc<Mutex<HashSet<String>>>,
    calls: Arc<AtomicUsize>,
}

impl Policy {
    /// Another instance's view of the same truth, with its own call counter.
    fn instance(&self) -> Self {
        Self { revoked: self.revoked.clone(), calls: Arc::default() }
    }
    fn revoke(&self, who: &str) {
        self.revoked.lock().unwrap().insert(who.to_owned());
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

fn tier(ns: &Namespace, url: &str) -> RedisTierBuilder {
    RedisTier::builder(url).namespace(&ns.0).pool_size(8).timeout(Duration::from_millis(50))
}

fn build(tier: RedisTierBuilder, policy: &Policy, max_staleness: Duration) -> AuthzCache {
    build_under(SECRET, tier, policy, max_staleness)
}

fn build_under(secret: &[u8], tier: RedisTierBuilder, policy: &Policy, max_staleness: Duration) -> AuthzCache {
    let p = policy.clone();
    AuthzCache::builder(move |principal: Principal, _: Permission| {
        p.calls.fetch_add(1, Ordering::SeqCst);
        let revoked = p.revoked.lock().unwrap().contains(principal.id());
        async move { Ok::<_, BoxError>(Decision::from_bool(!revoked)) }
    })
    .secret(secret)
    .l2(tier.build().expect("valid tier"))
    .max_staleness(max_staleness)
    .build()
}

async fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

use support::redis::wait_trusted;

/// Two instances on one namespace, each with its own view of one shared truth, both heard. The
/// namespace is the caller's, declared before the pair, so that it outlives the caches and is
/// deleted after them.
async fn two_instances(
    ns: &Namespace,
    a_tier: impl FnOnce(RedisTierBuilder) -> RedisTierBuilder,
    staleness: Duration,
) -> Pair {
    let url = support::redis::url();
    support::redis::addr();
    let truth = Policy::default();
    let (pa, pb) = (truth.instance(), truth.instance());
    let a = build(a_tier(tier(ns, &url)), &pa, staleness);
    let b = build(tier(ns, &url), &pb, staleness);
    wait_trusted(&a).await;
    wait_trusted(&b).await;
    Pair { truth, pa, pb, a, b }
}

struct Pair {
    truth: Policy,
    pa: Policy,
    pb: Policy,
    a: AuthzCache,
    b: AuthzCache,
}

fn read(doc: u32) -> Permission {
    Permission::new(format!("documents:{doc}"), "read")
}

fn l2(cache: &AuthzCache) -> tower_authz_cache::RemoteTierSnapshot {
    cache.stats().tiers.l2.expect("l2 configured")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_computed_on_a_is_an_l2_hit_on_b_and_an_invalidation_on_a_reaches_b() {
    let ns = Namespace::new("share");
    let Pair { truth, pa, pb, a, b } = two_instances(&ns, |t| t, Duration::from_secs(1)).await;
    let bob = Principal::new("bob");

    assert!(a.check(&bob, &read(1)).await.unwrap().is_allowed());
    wait_for("a's write-behind", Duration::from_secs(2), || l2(&a).writes >= 1).await;
    assert!(b.check(&bob, &read(1)).await.unwrap().is_allowed());
    assert_eq!((pa.calls(), pb.calls()), (1, 0), "b answered from l2");
    assert_eq!(l2(&b).hits, 1);
    assert!(b.check(&bob, &read(1)).await.unwrap().is_allowed());
    assert_eq!(b.stats().tiers.l1.hits, 1, "the l2 hit was promoted to b's l1");

    truth.revoke("bob");
    a.invalidate(&Invalidation::principal("bob")).await.unwrap();
    let start = Instant::now();
    loop {
        let allowed = b.check(&bob, &read(1)).await.unwrap().is_allowed();
        if !allowed {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(1), "b still allowed bob 1 s after a's invalidation");
        tokio::task::yield_now().await;
    }
    assert_eq!(pb.calls(), 1, "b asked its authorizer again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_delay_from_a_to_b_over_1000_trials() {
    let ns = Namespace::new("delay");
    let Pair { pb, a, b, .. } = two_instances(&ns, |t| t, Duration::from_secs(1)).await;
    let mut delays = Vec::with_capacity(1000);
    for i in 0..1000 {
        let who = Principal::new(format!("user-{i}"));
        b.check(&who, &read(1)).await.unwrap();
        let before = pb.calls();
        b.check(&who, &read(1)).await.unwrap();
        assert_eq!(pb.calls(), before, "trial {i}: cached on b");
        a.invalidate(&Invalidation::principal(who.id())).await.unwrap();
        let returned = Instant::now();
        while pb.calls() == before {
            b.check(&who, &read(1)).await.unwrap();
            assert!(returned.elapsed() < Duration::from_secs(1), "trial {i}: b kept serving past max_staleness");
            tokio::task::yield_now().await;
        }
        delays.push(returned.elapsed());
    }
    let (p50, p99) = percentiles(&mut delays);
    println!("invalidation delay a -> b over 1000 trials: p50 {p50:.0} us, p99 {p99:.0} us");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_black_hole_mid_stream_fails_no_request_and_the_breaker_recovers() {
    let url = support::redis::url();
    let proxy = FaultProxy::start(support::redis::addr()).await;
    let ns = Namespace::new("blackhole");
    let policy = Policy::default();
    let c = build(tier(&ns, &proxy.url("redis")).open_for(Duration::from_millis(500)), &policy, Duration::from_secs(1));
    wait_trusted(&c).await;
    // A second instance straight on Redis, to see what c writes: no L1 and an authorizer that
    // never decides, so any allow it returns is c's entry read from Redis.
    let witness = AuthzCache::builder(|_: Principal, _: Permission| async {
        Err::<Decision, BoxError>("the witness never decides".into())
    })
    .l1_max_bytes(0)
    .secret(SECRET)
    .l2(tier(&ns, &url).build().unwrap())
    .build();

    let mut n = 0u32;
    let mut next = || {
        n += 1;
        Principal::new(format!("user-{n}"))
    };
    for _ in 0..200 {
        assert!(c.check(&next(), &read(1)).await.is_ok());
    }
    assert_eq!(l2(&c).breaker, BreakerState::Closed);

    proxy.set_mode(Mode::BlackHole);
    let outage = Instant::now();
    let mut latencies = Vec::new();
    let mut failed = 0;
    while outage.elapsed() < Duration::from_millis(1500) {
        let t = Instant::now();
        // New principals: every request goes past L1.
        if c.check(&next(), &read(1)).await.is_err() {
            failed += 1;
        }
        latencies.push(t.elapsed());
    }
    let during = l2(&c);
    let (p50, p99) = percentiles(&mut latencies);
    println!(
        "redis black hole: {} requests, {failed} failed, latency p50 {p50:.0} us p99 {p99:.0} us; breaker {:?} \
         after {} timeouts, {} calls skipped",
        latencies.len(),
        during.breaker,
        during.call_timeouts,
        during.calls_skipped
    );
    assert_eq!(failed, 0, "no request fails while redis is away");
    assert_eq!(during.breaker_opens, 1, "the breaker opened once");
    assert_eq!(during.breaker, BreakerState::Open);
    assert!(during.call_timeouts >= 5, "{during:?}");
    assert!(during.calls_skipped > 100, "requests skipped redis at no cost while open: {during:?}");
    let health = c.health();
    assert_eq!(health.tiers.l2.as_ref().unwrap().status, tower_authz_cache::HealthStatus::Down);
    assert_eq!(health.status, tower_authz_cache::HealthStatus::Degraded);
    assert!(health.is_ready(), "the authorizer still decides: ready");

    proxy.set_mode(Mode::Pass);
    // Recovery: the breaker's next probe after open_for, then the backplane's reconnect, whose
    // backoff may have grown to 2 s during the outage.
    wait_for("the breaker to close", Duration::from_secs(10), || l2(&c).breaker == BreakerState::Closed).await;
    wait_for("health to recover", Duration::from_secs(10), || c.health().status == tower_authz_cache::HealthStatus::Up)
        .await;
    // c writes again: a fresh decision on c becomes an l2 hit on the witness.
    let fresh = Principal::new("after-the-outage");
    c.check(&fresh, &read(9)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while !witness.check(&fresh, &read(9)).await.is_ok_and(|d| d.is_allowed()) {
        assert!(Instant::now() < deadline, "c's writes never reached redis after recovery");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(l2(&c).breaker_opens, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_backplane_stops_l1_allows_within_max_staleness_and_recovers() {
    let backplane = FaultProxy::start(support::redis::addr()).await;
    let staleness = Duration::from_millis(300);
    let bp_url = backplane.url("redis");
    let ns = Namespace::new("backplane");
    let Pair { truth, a, b, .. } = two_instances(&ns, |t| t.backplane_url(bp_url), staleness).await;
    let (bob, alice) = (Principal::new("bob"), Principal::new("alice"));
    for who in [&bob, &alice] {
        a.check(who, &read(1)).await.unwrap();
        a.check(who, &read(1)).await.unwrap();
    }
    assert_eq!(a.stats().tiers.l1.hits, 2);
    wait_for("a's writes", Duration::from_secs(2), || l2(&a).writes >= 2).await;

    backplane.set_mode(Mode::BlackHole);
    truth.revoke("bob");
    b.invalidate(&Invalidation::principal("bob")).await.unwrap();
    let revoked = Instant::now();
    while a.check(&bob, &read(1)).await.unwrap().is_allowed() {
        assert!(
            revoked.elapsed() < staleness + Duration::from_millis(150),
            "a served a revoked allow past max_staleness"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    println!("backplane cut: a stopped allowing bob {} ms after b's invalidation", revoked.elapsed().as_millis());
    let s = a.stats();
    assert!(!s.backplane.unwrap().l1_trusted);
    // Untrusted L1 is skipped; alice is answered from L2, checked against the shared epochs.
    let l2_hits = l2(&a).hits;
    assert!(a.check(&alice, &read(1)).await.unwrap().is_allowed());
    assert_eq!(l2(&a).hits, l2_hits + 1, "alice came from l2, not l1");
    assert!(a.stats().tiers.l1.untrusted >= 1);

    backplane.set_mode(Mode::Pass);
    wait_for("a to trust l1 again", Duration::from_secs(5), || a.stats().backplane.is_some_and(|b| b.l1_trusted)).await;
    let hits = a.stats().tiers.l1.hits;
    a.check(&alice, &read(1)).await.unwrap();
    a.check(&alice, &read(1)).await.unwrap();
    assert!(a.stats().tiers.l1.hits > hits, "l1 serves again after recovery");
    assert!(!a.check(&bob, &read(1)).await.unwrap().is_allowed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_or_corrupted_values_in_redis_are_never_served_as_allows() {
    let url = support::redis::url();
    support::redis::addr();
    let ns = Namespace::new("forged");
    let truth = Policy::default();
    truth.revoke("mallory");
    let writer = build(tier(&ns, &url), &truth.instance(), Duration::from_secs(1));
    wait_trusted(&writer).await;
    let mallory = Principal::new("mallory");
    let alice = Principal::new("alice");
    assert!(!writer.check(&mallory, &read(1)).await.unwrap().is_allowed());
    wait_for("mallory's deny in redis", Duration::from_secs(2), || l2(&writer).writes >= 1).await;
    let deny_key = ns.keys().into_iter().find(|k| k.contains(":d:")).expect("the deny entry");
    let deny_value = ns.get(&deny_key).unwrap();
    assert!(writer.check(&alice, &read(1)).await.unwrap().is_allowed());
    wait_for("alice's allow in redis", Duration::from_secs(2), || l2(&writer).writes >= 2).await;
    let allow_key = ns.keys().into_iter().find(|k| k.contains(":d:") && *k != deny_key).expect("the allow entry");
    let allow_value = ns.get(&allow_key).unwrap();

    // An allow envelope from an attacker who does not have the secret.
    let attacker_ns = Namespace::new("attacker");
    let attacker_policy = Policy::default();
    let attacker = build_under(
        b"the attacker's own secret, 32 b.",
        RedisTier::builder(url.as_str()).namespace(&attacker_ns.0),
        &attacker_policy,
        Duration::from_secs(1),
    );
    attacker.check(&mallory, &read(1)).await.unwrap();
    wait_for("the attacker's entry", Duration::from_secs(2), || l2(&attacker).writes >= 1).await;
    let forged = attacker_ns.get(&attacker_ns.keys().into_iter().find(|k| k.contains(":d:")).unwrap()).unwrap();

    let mut flipped = deny_value.clone();
    flipped[1] = 1; // the allow bit, MAC untouched
    let mut future = allow_value.clone();
    future[0] = 9;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("alice's allow copied onto mallory's key", allow_value.clone()),
        ("allow bit flipped", flipped),
        ("signed with another secret", forged),
        ("truncated", allow_value[..allow_value.len() - 1].to_vec()),
        ("future envelope version", future),
        ("garbage", b"allow".to_vec()),
        ("empty", Vec::new()),
    ];
    for (i, (what, value)) in cases.into_iter().enumerate() {
        ns.set(&deny_key, &value);
        let reader_policy = truth.instance();
        let reader = build(tier(&ns, &url), &reader_policy, Duration::from_secs(1));
        wait_trusted(&reader).await;
        let decision = reader.check(&mallory, &read(1)).await.unwrap();
        assert!(!decision.is_allowed(), "{what}: served as an allow");
        assert_eq!(reader_policy.calls(), 1, "{what}: the authorizer decided");
        assert_eq!(l2(&reader).rejected, 1, "{what}: counted as a rejected entry (case {i})");
        // The reader writes its fresh deny back; let that land before the next case overwrites it.
        wait_for("the reader's write", Duration::from_secs(2), || l2(&reader).writes >= 1).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_show_no_principal_token_or_resource() {
    let url = support::redis::url();
    support::redis::addr();
    let ns = Namespace::new("privacy");
    let policy = Policy::default();
    let c = build(tier(&ns, &url), &policy, Duration::from_secs(1));
    wait_trusted(&c).await;
    let who = Principal::new("zebra-principal-4711");
    let what = Permission::new("documents:okapi-0815", "read");
    c.check(&who, &what).await.unwrap();
    c.invalidate(&Invalidation::principal(who.id())).await.unwrap();
    c.invalidate(&Invalidation::resource(what.resource())).await.unwrap();
    c.invalidate(&Invalidation::entry(who.id(), what.clone())).await.unwrap();
    c.check(&who, &what).await.unwrap();
    wait_for("writes", Duration::from_secs(2), || l2(&c).writes >= 1).await;
    let keys = ns.keys();
    assert!(keys.len() >= 5, "entry, epochs and sequence were written: {keys:?}");
    for k in &keys {
        for secret in ["zebra", "4711", "okapi", "0815", "documents"] {
            assert!(!k.contains(secret), "{k} contains {secret}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_and_connection_resets_fail_no_request_and_the_backplane_reconnects() {
    let proxy = FaultProxy::start(support::redis::addr()).await;
    let ns = Namespace::new("resets");
    let policy = Policy::default();
    let c = build(tier(&ns, &proxy.url("redis")).open_for(Duration::from_millis(200)), &policy, Duration::from_secs(1));
    wait_trusted(&c).await;
    let subscriptions = c.stats().backplane.unwrap().subscriptions;
    let mut failed = 0;
    for round in 0..3u32 {
        match round {
            0 => proxy.restart(),
            1 => proxy.set_mode(Mode::Down),
            _ => proxy.set_mode(Mode::Pass),
        }
        let t = Instant::now();
        let mut i = 0u32;
        while t.elapsed() < Duration::from_millis(300) {
            i += 1;
            if c.check(&Principal::new(format!("r{round}-{i}")), &read(1)).await.is_err() {
                failed += 1;
            }
        }
    }
    assert_eq!(failed, 0);
    wait_for("the backplane to resubscribe", Duration::from_secs(5), || {
        c.stats().backplane.is_some_and(|b| b.subscriptions > subscriptions && b.l1_trusted)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_costs_a_breaker_not_a_request() {
    let proxy = FaultProxy::start(support::redis::addr()).await;
    let ns = Namespace::new("slow");
    let policy = Policy::default();
    let c = build(tier(&ns, &proxy.url("redis")), &policy, Duration::from_secs(1));
    wait_trusted(&c).await;
    // Twice the 50 ms call timeout.
    proxy.set_mode(Mode::Slow(Duration::from_millis(100)));
    for i in 0..50u32 {
        let d = c.check(&Principal::new(format!("s{i}")), &read(1)).await.expect("decided by the authorizer");
        assert!(d.is_allowed());
    }
    let s = l2(&c);
    println!("slow redis: {s:?}");
    assert_eq!(s.breaker_opens, 1, "{s:?}");
    assert!(s.call_timeouts >= 5, "{s:?}");
    assert_eq!(policy.calls(), 50);
}

/// Redis answers every call in about 20 ms (well within this test's 250 ms timeout, so a loaded
/// machine opens no breaker): a burst of 100 misses reads L2 in parallel, so 100 copies arrive at
/// once at a write queue of 4 drained by 4 writers that each take 20 ms per write. The queue fills,
/// every further write is dropped and counted, and no request waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_write_queue_drops_and_counts_and_never_blocks() {
    let ns = Namespace::new("queue");
    let policy = Policy::default();
    let proxy = FaultProxy::start(support::redis::addr()).await;
    let c = build(
        tier(&ns, &proxy.url("redis")).pool_size(128).write_queue(4).timeout(Duration::from_millis(250)),
        &policy,
        Duration::from_secs(1),
    );
    support::redis::wait_trusted(&c).await;
    let burst = |tag: &'static str| {
        let checks: Vec<_> = (0..100u32)
            .map(|i| {
                let c = c.clone();
                async move { c.check(&Principal::new(format!("{tag}{i}")), &read(1)).await.unwrap().is_allowed() }
            })
            .collect();
        futures_util::future::join_all(checks)
    };
    // The pool's connections are made first, at full speed.
    burst("warm").await;
    // Every warm-up read answered (or, on a loaded machine, timed out), and its writes settled.
    wait_for("the warm-up reads", Duration::from_secs(5), || l2(&c).misses + l2(&c).errors >= 100).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = l2(&c);
    // The measured burst needs a closed breaker: it is about the queue, not about timeouts.
    assert_eq!(before.breaker, BreakerState::Closed, "the warm-up opened the breaker: {before:?}");
    proxy.set_mode(Mode::Slow(Duration::from_millis(10)));
    let started = std::time::Instant::now();
    let answers = burst("q").await;
    let took = started.elapsed();
    assert!(answers.iter().all(|a| *a));
    let s = l2(&c);
    let dropped = s.write_drops - before.write_drops;
    // Reads that answered (a miss) queued a copy each; on a loaded machine a few may time out.
    let answered = s.misses - before.misses;
    println!(
        "write queue of 4, redis at ~20 ms per call: {dropped} of {answered} writes dropped, burst answered in {took:?}"
    );
    assert!(answered >= 50, "most reads answered: {s:?}");
    // At most the queue (4), the 4 writers and what they finish during the ~25 ms burst are kept.
    assert!(dropped + 16 >= answered, "{s:?}");
    assert!(took < Duration::from_secs(1), "the burst waited for the queue: {took:?}");
    assert_eq!(policy.calls(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_principals_leaves_only_expiring_keys() {
    let url = support::redis::url();
    support::redis::addr();
    let ns = Namespace::new("flood");
    let policy = Policy::default();
    let c = build(tier(&ns, &url), &policy, Duration::from_secs(1));
    wait_trusted(&c).await;
    for i in 0..2000u32 {
        let who = Principal::new(format!("flood-{i}"));
        c.check(&who, &read(i % 7)).await.unwrap();
        if i % 100 == 0 {
            c.invalidate(&Invalidation::principal(who.id())).await.unwrap();
        }
    }
    wait_for("the write-behind", Duration::from_secs(5), || l2(&c).writes >= 1990).await;
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let keys = ns.keys();
    assert!(keys.len() >= 2000, "{}", keys.len());
    let mut persistent = Vec::new();
    for k in &keys {
        let ttl: i64 = redis::cmd("PTTL").arg(k).query(&mut conn).unwrap();
        if ttl < 0 {
            persistent.push(k.clone());
        }
    }
    // Only the epoch sequence and the global epoch (a few bytes each) live without an expiry.
    assert!(persistent.iter().all(|k| k.ends_with(":e:seq") || k.ends_with(":e:g")), "{persistent:?}");
    assert!(persistent.len() <= 2);
}
