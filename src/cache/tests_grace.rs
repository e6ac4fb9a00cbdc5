//! Grace during authorizer outages and refresh-ahead, on a manual clock.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::clock::Clock;
use super::tests_shared::{bob, read, until};
use crate::tier::testing::MemoryShared;
use crate::{
    AuthzCache, AuthzCacheBuilder, BoxError, CheckErrorKind, Decision, DecisionSource, Invalidation, Permission,
    Principal,
};

/// The source of truth: allows while `allow` is set, fails while `down`, hangs while `hang`;
/// invalidates bob's documents:1 entry during its next call when `race` is set.
#[derive(Clone, Default)]
struct Truth {
    allow: Arc<AtomicBool>,
    down: Arc<AtomicBool>,
    hang: Arc<AtomicBool>,
    race: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
    cache: Arc<OnceLock<AuthzCache>>,
}

impl Truth {
    fn new() -> Self {
        let t = Self::default();
        t.allow.store(true, Ordering::SeqCst);
        t
    }

    fn builder(&self, clock: &Clock) -> AuthzCacheBuilder {
        let t = self.clone();
        AuthzCache::builder(move |_: Principal, _: Permission| {
            let t = t.clone();
            async move {
                t.calls.fetch_add(1, Ordering::SeqCst);
                if t.hang.load(Ordering::SeqCst) {
                    std::future::pending::<()>().await;
                }
                if t.down.load(Ordering::SeqCst) {
                    return Err::<Decision, BoxError>("policy engine unreachable".into());
                }
                let answer = Decision::from_bool(t.allow.load(Ordering::SeqCst));
                if t.race.swap(false, Ordering::SeqCst) {
                    let cache = t.cache.get().expect("installed").clone();
                    cache.invalidate(&Invalidation::entry("bob", read(1))).await.unwrap();
                }
                Ok(answer)
            }
        })
        .allow_ttl(Duration::from_secs(60))
        .deny_ttl(Duration::from_secs(60))
        .authorizer_timeout(Duration::from_millis(100))
        .clock(clock.clone())
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

async fn decide(cache: &AuthzCache, doc: u32) -> Result<(bool, DecisionSource), CheckErrorKind> {
    cache.check(&bob(), &read(doc)).await.map(|d| (d.is_allowed(), d.source())).map_err(|e| e.kind())
}

/// With grace: an expired entry answers while the authorizer fails or times out, until the
/// grace ends; an invalidated one never does; nothing cached is still a 503; health shows it.
#[tokio::test]
async fn grace_answers_expired_entries_during_an_outage_but_never_invalidated_ones() {
    let clock = Clock::manual();
    let truth = Truth::new();
    let cache = truth.builder(&clock).grace(Duration::from_secs(30)).build();
    let plain = truth.builder(&clock).build();
    for c in [&cache, &plain] {
        assert_eq!(decide(c, 1).await, Ok((true, DecisionSource::Authorizer)));
        assert_eq!(decide(c, 2).await, Ok((true, DecisionSource::Authorizer)));
    }
    cache.invalidate(&Invalidation::entry("bob", read(2))).await.unwrap();
    clock.advance(Duration::from_secs(61));
    truth.down.store(true, Ordering::SeqCst);

    assert_eq!(decide(&cache, 1).await, Ok((true, DecisionSource::Grace)), "expired 1 s ago, within grace");
    assert_eq!(decide(&cache, 2).await, Err(CheckErrorKind::Authorizer), "an invalidated entry is never served");
    assert_eq!(decide(&cache, 3).await, Err(CheckErrorKind::Authorizer), "nothing cached: still an error");
    assert_eq!(decide(&plain, 1).await, Err(CheckErrorKind::Authorizer), "off by default");
    truth.down.store(false, Ordering::SeqCst);
    truth.hang.store(true, Ordering::SeqCst);
    assert_eq!(decide(&cache, 1).await, Ok((true, DecisionSource::Grace)), "a timeout counts as a failure");
    truth.hang.store(false, Ordering::SeqCst);
    truth.down.store(true, Ordering::SeqCst);

    let batch = cache.check_many(&bob(), &[read(1), read(2)]).await;
    assert_eq!(batch[0].as_ref().map(Decision::source).ok(), Some(DecisionSource::Grace), "batches too");
    assert!(batch[1].is_err());

    assert_eq!(cache.stats().grace_answers, 3);
    let health = cache.health();
    assert_eq!(health.grace_answers, 3);
    assert_eq!(health.authorizer.status, crate::HealthStatus::Down);
    assert_eq!(health.authorizer.reason, Some("authorizer down: expired decisions answered within grace"));

    clock.advance(Duration::from_secs(30));
    assert_eq!(decide(&cache, 1).await, Err(CheckErrorKind::Authorizer), "grace over: 61 + 30 s after the ttl began");
    // The authorizer back: a fresh answer, and the entry is an ordinary L1 hit again.
    truth.down.store(false, Ordering::SeqCst);
    assert_eq!(decide(&cache, 1).await, Ok((true, DecisionSource::Authorizer)));
    assert_eq!(decide(&cache, 1).await, Ok((true, DecisionSource::L1)));
}

/// Grace never answers from an L1 that is not trusted (the backplane silent past
/// max_staleness): another instance's invalidation may be in what it did not hear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_needs_a_trusted_l1() {
    let clock = Clock::manual();
    let truth = Truth::new();
    let store = MemoryShared::new();
    let cache = truth
        .builder(&clock)
        .secret(super::tests_shared::SECRET)
        .l2(store.clone())
        .max_staleness(Duration::from_millis(300))
        .grace(Duration::from_secs(30))
        .build();
    super::tests_shared::ready(&cache).await;
    assert!(decide(&cache, 1).await.unwrap().0);
    clock.advance(Duration::from_secs(61));
    truth.down.store(true, Ordering::SeqCst);
    assert_eq!(decide(&cache, 1).await, Ok((true, DecisionSource::Grace)), "trusted: grace applies");
    store.drop_messages(true);
    until("the silent backplane to be distrusted", || cache.stats().backplane.is_some_and(|b| !b.l1_trusted)).await;
    assert_eq!(decide(&cache, 1).await, Err(CheckErrorKind::Authorizer), "untrusted L1: no grace");
}

/// A hit in the last fifth of the ttl recomputes the entry in the background: the key never
/// misses at its ttl, the refreshed entry carries the truth at refresh time, and it costs one
/// authorizer call per ttl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_ahead_recomputes_a_hot_key_before_its_ttl() {
    let clock = Clock::manual();
    let truth = Truth::new();
    let cache = truth.builder(&clock).refresh_ahead(0.2).build();
    let plain = truth.builder(&clock).build();
    for c in [&cache, &plain] {
        assert_eq!(decide(c, 1).await, Ok((true, DecisionSource::Authorizer)));
    }
    clock.advance(Duration::from_secs(47));
    assert_eq!(decide(&cache, 1).await, Ok((true, DecisionSource::L1)));
    assert_eq!(truth.calls(), 2, "not in the last fifth yet (48 s of 60)");
    clock.advance(Duration::from_secs(2));
    truth.allow.store(false, Ordering::SeqCst);
    assert_eq!(decide(&plain, 1).await, Ok((true, DecisionSource::L1)), "off by default");
    assert_eq!(truth.calls(), 2);
    assert_eq!(decide(&cache, 1).await, Ok((true, DecisionSource::L1)), "the hit answers at once");
    until("the background refresh", || cache.stats().refreshes == 1).await;
    assert_eq!(truth.calls(), 3);
    clock.advance(Duration::from_secs(20));
    // 69 s after the first answer: past its ttl, yet a hit, carrying the truth at refresh time.
    assert_eq!(decide(&cache, 1).await, Ok((false, DecisionSource::L1)));
    assert_eq!(truth.calls(), 3);
    assert_eq!(cache.stats().tiers.l1.misses, 1, "only the first check missed");
}

/// A refresh raced by an invalidation is thrown away; a failed one pauses refresh-ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_keep_the_epoch_rules_and_back_off_on_failure() {
    let clock = Clock::manual();
    let truth = Truth::new();
    let cache = truth.builder(&clock).refresh_ahead(0.5).build();
    let _ = truth.cache.set(cache.clone());
    decide(&cache, 1).await.unwrap();
    clock.advance(Duration::from_secs(31));
    truth.race.store(true, Ordering::SeqCst);
    decide(&cache, 1).await.unwrap();
    until("the raced refresh to be thrown away", || cache.stats().refreshes_discarded == 1).await;
    assert_eq!(cache.stats().refreshes, 0);
    // The invalidation ended the old entry too: the next check asks.
    let calls = truth.calls();
    assert_eq!(decide(&cache, 1).await, Ok((true, DecisionSource::Authorizer)));
    assert_eq!(truth.calls(), calls + 1);

    clock.advance(Duration::from_secs(31));
    truth.down.store(true, Ordering::SeqCst);
    decide(&cache, 1).await.unwrap();
    until("the failed refresh", || cache.stats().refreshes_discarded == 2).await;
    let calls = truth.calls();
    for _ in 0..20 {
        assert_eq!(decide(&cache, 1).await, Ok((true, DecisionSource::L1)), "the entry still answers");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(truth.calls(), calls, "no refresh for a second after a failure");
    truth.down.store(false, Ordering::SeqCst);
    clock.advance(Duration::from_millis(1001));
    decide(&cache, 1).await.unwrap();
    until("refreshing again", || cache.stats().refreshes == 1).await;
}
