//! Redis keeping the epochs (L2 without L3), against the real Redis: a bump never stores or
//! returns a value at or below the stored one (whatever was lost or written there), values near
//! `u64::MAX` saturate, an invalidation Redis could not record is owed and paid, and a
//! `maxmemory-policy` that can evict epoch keys is reported (on a test-owned `redis-server` with a
//! tiny `maxmemory`).
#![cfg(feature = "redis")]

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use support::faults::OwnedRedis;
use support::proxy::{FaultProxy, Mode};
use support::redis::{Namespace, SECRET};
use tower_authz_cache::{AuthzCache, BoxError, Decision, HealthStatus, Invalidation, Permission, Principal, RedisTier};

#[derive(Clone, Default)]
struct Policy {
    revoked: Arc<Mutex<HashSet<String>>>,
    calls: Arc<AtomicUsize>,
}

impl Policy {
    fn cache(&self, url: &str, ns: &str) -> AuthzCache {
        let p = self.clone();
        AuthzCache::builder(move |principal: Principal, _: Permission| {
            p.calls.fetch_add(1, Ordering::SeqCst);
            let revoked = p.revoked.lock().unwrap().contains(principal.id());
            async move { Ok::<_, BoxError>(Decision::from_bool(!revoked)) }
        })
        .max_staleness(Duration::from_millis(300))
        .secret(SECRET)
        .l2(RedisTier::builder(url).namespace(ns).timeout(Duration::from_millis(50)).build().unwrap())
        .build()
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

fn read() -> Permission {
    Permission::new("documents:1", "read")
}

fn conn(url: &str) -> redis::Connection {
    redis::Client::open(url).unwrap().get_connection().unwrap()
}

/// The one principal-epoch key of the namespace (the test invalidates one principal).
fn principal_epoch_key(ns: &Namespace) -> String {
    let keys: Vec<String> = ns.keys().into_iter().filter(|k| k.contains(":v1:e:p:")).collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    keys[0].clone()
}

fn value(url: &str, key: &str) -> String {
    redis::cmd("GET").arg(key).query::<String>(&mut conn(url)).unwrap()
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

async fn ready(cache: &AuthzCache) {
    tokio::time::timeout(Duration::from_secs(5), cache.ready()).await.expect("ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bump_never_stores_a_value_at_or_below_the_stored_one() {
    let url = support::redis::url();
    let ns = Namespace::new("bump-rises");
    let policy = Policy::default();
    let cache = policy.cache(&url, &ns.0);
    ready(&cache).await;
    let bob = Principal::new("bob");
    cache.invalidate(&Invalidation::principal("bob")).await.unwrap();
    let key = principal_epoch_key(&ns);
    let seq = format!("{}:v1:e:seq", ns.0);
    // Cases a store can be in: a value from a clock ten minutes ahead; the same with its high
    // water lost (the old script then set the scope from a fresh sequence, lowering it); a value
    // just under the largest one Lua's numbers hold exactly.
    let ahead = now_us() + 600_000_000;
    for (stored, lose_high_water) in [(ahead, false), (ahead + 1, true), ((1u64 << 53) - 2, true)] {
        let _: () = redis::cmd("SET").arg(&key).arg(stored.to_string()).query(&mut conn(&url)).unwrap();
        if lose_high_water {
            let _: () = redis::cmd("DEL").arg(&seq).query(&mut conn(&url)).unwrap();
        }
        assert!(cache.check(&bob, &read()).await.unwrap().is_allowed());
        let calls = policy.calls();
        cache.invalidate(&Invalidation::principal("bob")).await.unwrap();
        let after: u64 = value(&url, &key).parse().unwrap();
        assert!(after > stored, "stored {stored}, bumped to {after} (high water lost: {lose_high_water})");
        // The invalidating instance misses afterwards.
        assert!(cache.check(&bob, &read()).await.unwrap().is_allowed());
        assert_eq!(policy.calls(), calls + 1, "the invalidating instance asked again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epoch_values_near_u64_max_saturate_and_still_invalidate() {
    let url = support::redis::url();
    let ns = Namespace::new("bump-saturates");
    let policy = Policy::default();
    let cache = policy.cache(&url, &ns.0);
    ready(&cache).await;
    let bob = Principal::new("bob");
    cache.invalidate(&Invalidation::principal("bob")).await.unwrap();
    let key = principal_epoch_key(&ns);
    for garbage in ["18446744073709551615", "99999999999999999999999", "9223372036854775807"] {
        let _: () = redis::cmd("SET").arg(&key).arg(garbage).query(&mut conn(&url)).unwrap();
        // Reads see a saturated epoch: nothing cached before validates (fail closed), and the
        // cache answers.
        assert!(cache.check(&bob, &read()).await.unwrap().is_allowed());
        assert!(cache.check(&bob, &read()).await.unwrap().is_allowed());
        let calls = policy.calls();
        cache.invalidate(&Invalidation::principal("bob")).await.expect("a saturated epoch is still bumped");
        assert_eq!(value(&url, &key), "9223372036854775807", "saturated at the largest i64, not wrapped");
        assert!(cache.check(&bob, &read()).await.unwrap().is_allowed());
        assert_eq!(policy.calls(), calls + 1, "the invalidating instance misses after a saturated bump ({garbage})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_redis_could_not_record_is_owed_and_paid() {
    let url = support::redis::url();
    let ns = Namespace::new("redis-owed");
    let proxy = FaultProxy::start(support::redis::addr()).await;
    let policy = Policy::default();
    let a = policy.cache(&proxy.url("redis"), &ns.0);
    let b_policy = Policy { revoked: policy.revoked.clone(), calls: Arc::default() };
    let b = b_policy.cache(&url, &ns.0);
    ready(&a).await;
    ready(&b).await;
    let bob = Principal::new("bob");
    for cache in [&a, &b] {
        assert!(cache.check(&bob, &read()).await.unwrap().is_allowed());
    }
    policy.revoked.lock().unwrap().insert("bob".into());
    // A's data path to Redis is down (its backplane subscription was made before: it stays).
    proxy.set_mode(Mode::Down);
    assert!(a.invalidate(&Invalidation::principal("bob")).await.is_err(), "Redis could not record it");
    assert!(!a.check(&bob, &read()).await.unwrap().is_allowed(), "A itself is covered at once");
    assert!(b.check(&bob, &read()).await.unwrap().is_allowed(), "B has not heard of it yet");
    let restored = Instant::now();
    proxy.set_mode(Mode::Pass);
    // The debt is paid in the background: the bump reaches Redis and B's backplane.
    while b.check(&bob, &read()).await.unwrap().is_allowed() {
        assert!(restored.elapsed() < Duration::from_secs(5), "the owed invalidation was never paid");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("owed invalidation paid: B denied {:?} after Redis came back", restored.elapsed());
    // And A reads L2 again once nothing is owed.
    let hits = a.stats().tiers.l2.unwrap().hits;
    let carol = Principal::new("carol");
    assert!(b.check(&carol, &read()).await.unwrap().is_allowed());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(a.check(&carol, &read()).await.unwrap().is_allowed());
    assert_eq!(a.stats().tiers.l2.unwrap().hits, hits + 1, "L2 read again after the debt was paid");
}

/// Entries and epochs both expire in Redis, so an evicting policy can drop an epoch before the
/// entries it invalidated. The cache reads the policy at start and every few seconds, and
/// reports an unsafe one in `health()` (degraded, with the reason) and on the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_maxmemory_policy_that_can_evict_epochs_is_reported() {
    let owned = OwnedRedis::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru"]);
    let policy = Policy::default();
    let cache = policy.cache(&owned.url(), "evict");
    ready(&cache).await;
    let wait_l2 = async |want: HealthStatus, within: Duration| {
        let start = Instant::now();
        loop {
            let health = cache.health();
            let l2 = health.tiers.l2.clone().expect("l2 configured");
            if l2.status == want {
                return (health, l2);
            }
            assert!(start.elapsed() < within, "l2 health {:?}, wanted {want:?}: {:?}", l2.status, l2.reason);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (health, l2) = wait_l2(HealthStatus::Degraded, Duration::from_secs(2)).await;
    assert!(l2.reason.is_some_and(|r| r.contains("maxmemory-policy")), "{l2:?}");
    assert_eq!(health.status, HealthStatus::Degraded);
    assert_eq!(cache.stats().tiers.l2.unwrap().warning, l2.reason);
    let json = serde_json::to_value(health).unwrap();
    assert!(json["tiers"]["l2"]["reason"].as_str().is_some_and(|r| r.contains("noeviction")), "{json}");

    // What the warning is about: a flood of entries past maxmemory evicts keys, epochs among them.
    cache.invalidate(&Invalidation::principal("bob")).await.unwrap();
    for i in 0..20_000 {
        let _ = cache.check(&Principal::new(format!("user-{i}")), &read()).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let evicted: u64 = redis::cmd("INFO")
        .arg("stats")
        .query::<String>(&mut conn(&owned.url()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("evicted_keys:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    println!("allkeys-lru with maxmemory 2mb: {evicted} keys evicted during the flood");
    assert!(evicted > 0, "the flood went past maxmemory");

    // An operator fixes the policy: reported up again within the check interval.
    let mut c = conn(&owned.url());
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("0").query(&mut c).unwrap();
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("noeviction").query(&mut c).unwrap();
    let (_, l2) = wait_l2(HealthStatus::Up, Duration::from_secs(8)).await;
    assert_eq!(l2.reason, None);
}
